#include "block_allocator.h"

#include <stdexcept>
#include <string>
#include <unordered_map>

namespace fastcodegen {

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31), got " + std::to_string(num_blocks));
  }
  refcount_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Pushed in reverse so that a fresh allocator hands out 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) throw std::runtime_error("no free KV cache block");
  const int32_t block = free_.back();
  free_.pop_back();
  refcount_[block] = 1;
  return block;
}

std::vector<int32_t> BlockAllocator::allocate_many(int64_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate a negative number of blocks");
  if (n > num_free()) {
    throw std::runtime_error("asked for " + std::to_string(n) + " KV cache blocks, " +
                             std::to_string(num_free()) + " are free");
  }
  std::vector<int32_t> blocks;
  blocks.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) blocks.push_back(allocate());
  return blocks;
}

void BlockAllocator::check_allocated(int32_t block, const char* what) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument(std::string(what) + ": block " + std::to_string(block) +
                                " is out of range [0, " + std::to_string(num_blocks()) + ")");
  }
  if (refcount_[block] == 0) {
    throw std::invalid_argument(std::string(what) + ": block " + std::to_string(block) + " is not allocated");
  }
}

void BlockAllocator::incref(int32_t block) {
  check_allocated(block, "incref");
  ++refcount_[block];
}

bool BlockAllocator::decref(int32_t block) {
  check_allocated(block, "decref");
  if (--refcount_[block] > 0) return false;
  free_.push_back(block);
  return true;
}

void BlockAllocator::release(const std::vector<int32_t>& blocks) {
  // Validate first so that a bad table changes nothing, counting blocks the
  // table lists more than once against their holders.
  std::unordered_map<int32_t, int32_t> uses;
  for (int32_t b : blocks) {
    check_allocated(b, "release");
    if (++uses[b] > refcount_[b]) {
      throw std::invalid_argument("release: block " + std::to_string(b) + " is listed " + std::to_string(uses[b]) +
                                  " times but has " + std::to_string(refcount_[b]) + " holder(s)");
    }
  }
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) decref(*it);
}

int32_t BlockAllocator::refcount(int32_t block) const {
  if (block < 0 || block >= num_blocks()) {
    throw std::invalid_argument("refcount: block " + std::to_string(block) + " is out of range");
  }
  return refcount_[block];
}

}  // namespace fastcodegen
