// The pool of paged-KV cache blocks: reference counts, a free list, and the prefix cache.
//
// A block is `block_size` token slots in every layer's K and V cache. Each
// block is in exactly one of three states:
//   held       refcount > 0: in the block table of one or more sequences
//   evictable  refcount 0, holding a cached full block of some prefix: still
//              findable by `lookup`, reused last (least recently freed first)
//   free       refcount 0, no content worth keeping
// A full block is published under the hash of its tokens and of every token
// before them (`chain`), so a later prompt that starts with the same tokens
// finds it and skips computing it. A hit is confirmed against the stored
// tokens and parent hash, so a hash collision cannot hand out wrong K/V.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace fastcodegen {

struct BlockHash {
  uint64_t a = 0, b = 0;
  bool operator==(const BlockHash& o) const { return a == o.a && b == o.b; }
};

struct BlockHashOf {
  size_t operator()(const BlockHash& h) const { return static_cast<size_t>(h.a ^ (h.b * 0x9E3779B97F4A7C15ULL)); }
};

// The hash of a full block: its tokens after everything its parent hash covers.
BlockHash chain(const BlockHash& parent, const int32_t* tokens, int32_t n);

class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int32_t block_size);

  // Takes a block (refcount 1): a free one if any, else the least recently
  // freed cached one, which leaves the cache. Throws std::runtime_error when
  // every block is held.
  int32_t allocate();
  std::vector<int32_t> allocate_many(int64_t n);  // all or nothing

  void incref(int32_t block);
  // One holder fewer; true when the block stopped being held.
  bool decref(int32_t block);
  // decref() on each block of a table, last to first; validates first, so a
  // bad table changes nothing.
  void release(const std::vector<int32_t>& blocks);

  // The cached block holding `tokens` after `parent`, now held once more
  // (revived if it was evictable), or -1.
  int32_t lookup(const BlockHash& parent, const BlockHash& hash, const int32_t* tokens);
  // Makes a held, full block findable under `hash`. No-op if that hash is
  // already cached (another block computed the same prefix).
  void publish(int32_t block, const BlockHash& parent, const BlockHash& hash, const int32_t* tokens);

  int32_t refcount(int32_t block) const;
  bool is_cached(int32_t block) const;
  int64_t num_free() const { return static_cast<int64_t>(free_.size()) + num_evictable_; }  // allocatable now
  int64_t num_evictable() const { return num_evictable_; }
  int64_t num_cached() const { return static_cast<int64_t>(cache_.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  int32_t block_size() const { return block_size_; }
  // Forgets every cached prefix (held blocks keep their contents).
  void clear_cache();
  // Throws std::logic_error if the three states do not partition the blocks.
  void check() const;

 private:
  void check_held(int32_t block, const char* what) const;
  void lru_push(int32_t block);
  void lru_remove(int32_t block);
  void uncache(int32_t block);

  int32_t block_size_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;  // a stack: the top is handed out next
  // Evictable blocks, a doubly linked list from least to most recently freed.
  std::vector<int32_t> prev_, next_;
  int32_t lru_head_ = -1, lru_tail_ = -1;
  int64_t num_evictable_ = 0;
  // The prefix cache: hash -> block, and per block what it holds.
  std::unordered_map<BlockHash, int32_t, BlockHashOf> cache_;
  std::vector<uint8_t> cached_;
  std::vector<BlockHash> hash_, parent_;
  std::vector<int32_t> tokens_;  // [num_blocks * block_size]
};

}  // namespace fastcodegen
