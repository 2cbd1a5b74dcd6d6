#include "block_pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace fastcodegen {

namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

}  // namespace

BlockHash chain(const BlockHash& parent, const int32_t* tokens, int32_t n) {
  // Two independent 64-bit lanes: a false match needs both to collide.
  uint64_t a = mix64(parent.a ^ 0x243F6A8885A308D3ULL);
  uint64_t b = mix64(parent.b ^ 0x13198A2E03707344ULL);
  for (int32_t i = 0; i < n; ++i) {
    const uint64_t t = static_cast<uint32_t>(tokens[i]);
    a = mix64(a ^ t);
    b = mix64(b + t * 0xFF51AFD7ED558CCDULL);
  }
  return {a, b};
}

BlockPool::BlockPool(int64_t num_blocks, int32_t block_size) : block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31), got " + std::to_string(num_blocks));
  }
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  const size_t n = static_cast<size_t>(num_blocks);
  refcount_.assign(n, 0);
  prev_.assign(n, -1);
  next_.assign(n, -1);
  cached_.assign(n, 0);
  hash_.assign(n, BlockHash{});
  parent_.assign(n, BlockHash{});
  tokens_.assign(n * static_cast<size_t>(block_size), 0);
  free_.reserve(n);
  // Pushed in reverse so that a fresh pool hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

void BlockPool::lru_push(int32_t block) {
  prev_[block] = lru_tail_;
  next_[block] = -1;
  if (lru_tail_ >= 0) next_[lru_tail_] = block; else lru_head_ = block;
  lru_tail_ = block;
  ++num_evictable_;
}

void BlockPool::lru_remove(int32_t block) {
  if (prev_[block] >= 0) next_[prev_[block]] = next_[block]; else lru_head_ = next_[block];
  if (next_[block] >= 0) prev_[next_[block]] = prev_[block]; else lru_tail_ = prev_[block];
  prev_[block] = next_[block] = -1;
  --num_evictable_;
}

void BlockPool::uncache(int32_t block) {
  cache_.erase(hash_[block]);
  cached_[block] = 0;
}

int32_t BlockPool::allocate() {
  int32_t block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else if (lru_head_ >= 0) {
    block = lru_head_;  // evict the least recently freed cached block
    lru_remove(block);
    uncache(block);
  } else {
    throw std::runtime_error("no free KV cache block");
  }
  refcount_[block] = 1;
  return block;
}

std::vector<int32_t> BlockPool::allocate_many(int64_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate a negative number of blocks");
  if (n > num_free()) {
    throw std::runtime_error("asked for " + std::to_string(n) + " KV cache blocks, " + std::to_string(num_free()) +
                             " are free");
  }
  std::vector<int32_t> blocks;
  blocks.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) blocks.push_back(allocate());
  return blocks;
}

void BlockPool::check_held(int32_t block, const char* what) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument(std::string(what) + ": block " + std::to_string(block) + " is out of range [0, " +
                                std::to_string(num_blocks()) + ")");
  }
  if (refcount_[block] == 0) {
    throw std::invalid_argument(std::string(what) + ": block " + std::to_string(block) + " is not allocated");
  }
}

void BlockPool::incref(int32_t block) {
  check_held(block, "incref");
  ++refcount_[block];
}

bool BlockPool::decref(int32_t block) {
  check_held(block, "decref");
  if (--refcount_[block] > 0) return false;
  if (cached_[block]) lru_push(block); else free_.push_back(block);
  return true;
}

void BlockPool::release(const std::vector<int32_t>& blocks) {
  // Validate first so that a bad table changes nothing, counting blocks the
  // table lists more than once against their holders.
  std::unordered_map<int32_t, int32_t> uses;
  for (int32_t b : blocks) {
    check_held(b, "release");
    if (++uses[b] > refcount_[b]) {
      throw std::invalid_argument("release: block " + std::to_string(b) + " is listed " + std::to_string(uses[b]) +
                                  " times but has " + std::to_string(refcount_[b]) + " holder(s)");
    }
  }
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) decref(*it);
}

int32_t BlockPool::lookup(const BlockHash& parent, const BlockHash& hash, const int32_t* tokens) {
  auto it = cache_.find(hash);
  if (it == cache_.end()) return -1;
  const int32_t block = it->second;
  if (!(parent_[block] == parent) ||
      !std::equal(tokens, tokens + block_size_, tokens_.begin() + static_cast<size_t>(block) * block_size_)) {
    return -1;  // a hash collision: not this prefix
  }
  if (refcount_[block] == 0) lru_remove(block);
  ++refcount_[block];
  return block;
}

void BlockPool::publish(int32_t block, const BlockHash& parent, const BlockHash& hash, const int32_t* tokens) {
  check_held(block, "publish");
  if (cached_[block] || cache_.count(hash)) return;
  cache_.emplace(hash, block);
  cached_[block] = 1;
  hash_[block] = hash;
  parent_[block] = parent;
  std::copy(tokens, tokens + block_size_, tokens_.begin() + static_cast<size_t>(block) * block_size_);
}

int32_t BlockPool::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("refcount: block " + std::to_string(block) + " is out of range");
  }
  return refcount_[block];
}

bool BlockPool::is_cached(int32_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("is_cached: block " + std::to_string(block) + " is out of range");
  }
  return cached_[block] != 0;
}

void BlockPool::clear_cache() {
  while (lru_head_ >= 0) {
    const int32_t block = lru_head_;
    lru_remove(block);
    uncache(block);
    free_.push_back(block);
  }
  for (auto& [hash, block] : cache_) cached_[block] = 0;
  cache_.clear();
}

void BlockPool::check() const {
  const int64_t n = num_blocks();
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  for (int32_t b : free_) {
    if (refcount_[b] != 0 || cached_[b] || seen[b]++) throw std::logic_error("free list corrupt at block " + std::to_string(b));
  }
  int64_t evictable = 0;
  for (int32_t b = lru_head_; b >= 0; b = next_[b]) {
    if (refcount_[b] != 0 || !cached_[b] || seen[b]++) throw std::logic_error("LRU list corrupt at block " + std::to_string(b));
    ++evictable;
  }
  if (evictable != num_evictable_) throw std::logic_error("evictable count is off");
  for (int64_t b = 0; b < n; ++b) {
    if (refcount_[b] < 0) throw std::logic_error("negative refcount");
    if (!seen[b] && refcount_[b] == 0) throw std::logic_error("block " + std::to_string(b) + " is lost");
    if (refcount_[b] > 0 && seen[b]) throw std::logic_error("held block on a free list");
  }
  int64_t cached = 0;
  for (int64_t b = 0; b < n; ++b) cached += cached_[b];
  if (cached != static_cast<int64_t>(cache_.size())) throw std::logic_error("cache map and flags disagree");
  for (const auto& [hash, block] : cache_) {
    if (!cached_[block] || !(hash_[block] == hash)) throw std::logic_error("cache map points at the wrong block");
  }
}

}  // namespace fastcodegen
