// A free list of paged-KV cache blocks with reference counts.
//
// A block is a fixed number of token slots in every layer's K and V cache.
// Sequences hold blocks through their block tables; a block held by several
// sequences (samples forked from one prompt) has a reference count above one
// and returns to the free list only when its last holder lets it go.
#pragma once

#include <cstdint>
#include <vector>

namespace fastcodegen {

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  // Takes one free block; its reference count becomes 1. Throws
  // std::runtime_error when none is free (callers check num_free() first).
  int32_t allocate();

  // Takes n blocks, all or nothing.
  std::vector<int32_t> allocate_many(int64_t n);

  // One more holder of an allocated block.
  void incref(int32_t block);

  // One holder fewer; returns true when the block went back to the free list.
  bool decref(int32_t block);

  // decref() on each block of a block table, last to first, so that the
  // blocks a sequence took last are the first handed out again.
  void release(const std::vector<int32_t>& blocks);

  int32_t refcount(int32_t block) const;
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }

 private:
  void check_allocated(int32_t block, const char* what) const;

  std::vector<int32_t> free_;      // a stack: the top is handed out next
  std::vector<int32_t> refcount_;  // [num_blocks]; 0 = free
};

}  // namespace fastcodegen
