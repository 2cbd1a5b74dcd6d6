// The scheduler: which tokens of which sequences run in each step, and what
// the step's outputs do to them.
//
// It owns the sequences (token ids, block tables, decoded text) so that a step
// costs Python O(1) work plus O(events), whatever the batch size:
//   schedule()  picks the step's tokens and writes the step's metadata
//               (token ids, positions, KV slots, query starts, context lengths,
//               block-table rows, which logits to sample with what parameters,
//               block copies) into arrays the caller bound once;
//   update()    appends the sampled tokens, checks end-of-text, stop tokens,
//               stop strings and lengths, detokenizes incrementally, publishes
//               full blocks to the prefix cache, frees finished sequences'
//               blocks, and reports which sequences finished.
//
// Policy, per step, first come first served:
//   1. every running sequence ready to decode gets its one token (a full
//      block table is extended; a block shared with a sibling sample is copied
//      first); when no block is free, the most recently admitted sequence is
//      preempted: its blocks are freed and it waits to be recomputed;
//   2. running sequences in the middle of their prompt get chunks of the
//      remaining token budget;
//   3. waiting sequences are admitted while a row, the budget and blocks
//      (above a small watermark) allow, after looking up their prompt's full
//      blocks in the prefix cache.
// A request with n samples computes its prompt once: the step that finishes
// the prompt samples n tokens from its logits, and the sequence forks into n
// sharing the prompt's blocks.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "block_pool.h"
#include "utf8.h"

namespace fastcodegen {

struct SchedulerConfig {
  int64_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t max_num_seqs = 256;            // rows of a step
  int32_t max_num_batched_tokens = 8192; // tokens of a step
  int32_t max_model_len = 2048;
  int32_t max_samples = 512;             // sampled rows of a step (n-sample forks need n)
  int32_t watermark_blocks = 0;          // kept free when admitting
  bool enable_prefix_caching = true;
  std::vector<int32_t> eos_token_ids;
};

struct RequestConfig {
  int32_t n = 1;
  int32_t max_tokens = 16;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  bool special = false;  // seeded or wants logprobs: Python handles its sampled rows itself
  bool watch = false;    // Python wants to see its new text every step (streaming, stop patterns)
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;  // UTF-8
};

enum Finish : int32_t { kNotFinished = 0, kStop = 1, kLength = 2, kAbort = 3 };

struct Request;

struct Sequence {
  int64_t id = 0;
  Request* req = nullptr;
  int32_t index = 0;          // completion index within the request
  std::vector<int32_t> tokens;
  int32_t num_prompt = 0;
  int32_t num_computed = 0;   // tokens whose K/V are in the cache
  std::vector<int32_t> blocks;
  std::vector<BlockHash> hashes;  // of the full blocks of `tokens`, as far as computed
  int32_t num_published = 0;      // blocks published to the prefix cache
  bool running = false;
  bool waiting = false;
  bool forked = false;        // an n-sample request's prompt sequence has forked
  int32_t slot = -1;          // row in the running batch
  // A copy-on-write not yet confirmed by update(): the table already points
  // at copy_dst; copy_src stays held (and the copy is re-issued each step)
  // until a step that made the copy completes.
  int32_t copy_src = -1, copy_dst = -1;
  uint64_t age = 0;           // admission order
  int32_t q_len = 0;          // tokens scheduled this step
  std::string text;           // decoded output, UTF-8
  Utf8Decoder utf8;
  int32_t finish = kNotFinished;
  int32_t stop_string = -1;   // which stop string ended it
  int32_t stop_token = -1;    // which stop token ended it

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t num_output() const { return num_tokens() - num_prompt; }
};

struct Request {
  int64_t id = 0;
  RequestConfig cfg;
  size_t max_stop_len = 0;
  std::vector<Sequence*> seqs;
  int32_t num_finished = 0;
};

struct StepInfo {
  int32_t num_rows = 0;      // rows of the batch: every running sequence, in slot order
  int32_t num_tokens = 0;    // tokens computed this step
  int32_t num_samples = 0;   // logits rows to sample
  int32_t num_special = 0;   // of those, rows Python samples itself (seeded / logprobs)
  int32_t num_copies = 0;    // block copies to make before the forward
  int32_t max_query_len = 0;
  int32_t max_context_len = 0;
  bool is_decode = false;    // every row has exactly one new token
};

// Where schedule() writes; the caller allocates these once and keeps them alive.
struct StepBuffers {
  int64_t* input_ids = nullptr;        // [max_num_batched_tokens]
  int64_t* positions = nullptr;        // [max_num_batched_tokens]
  int64_t* slot_mapping = nullptr;     // [max_num_batched_tokens]
  int32_t* query_start_loc = nullptr;  // [max_num_seqs + 1]
  int32_t* context_lens = nullptr;     // [max_num_seqs]
  int32_t* block_tables = nullptr;     // [max_num_seqs, max_blocks_per_seq]; rows follow the slots
  int64_t* logits_indices = nullptr;   // [max_samples] token index of each sampled row
  float* temperature = nullptr;        // [max_samples]
  int32_t* top_k = nullptr;            // [max_samples]
  float* top_p = nullptr;              // [max_samples]
  int64_t* sample_seq = nullptr;       // [max_samples] the sequence sampled (after update: the one that got the token)
  int32_t* sample_index = nullptr;     // [max_samples] completion index of the token
  int64_t* sample_request = nullptr;   // [max_samples]
  int32_t* special_rows = nullptr;     // [max_samples]
  int64_t* copy_src = nullptr;         // [max_num_seqs] blocks to copy before the forward
  int64_t* copy_dst = nullptr;         // [max_num_seqs]
};

struct Stats {
  int64_t computed_tokens = 0;   // tokens run through the model
  int64_t prefix_hit_tokens = 0; // prompt tokens found in the prefix cache
  int64_t preemptions = 0;
  int64_t block_copies = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& cfg);

  void bind(const StepBuffers& buffers) { buf_ = buffers; }
  // token id -> its bytes (byte-level BPE); special tokens are skipped from
  // text when a request asks so. Without it, sequences have no text.
  void set_vocabulary(std::vector<std::string> token_bytes, const std::vector<int32_t>& special_ids);

  int64_t add_request(const std::vector<int32_t>& prompt, const RequestConfig& cfg);
  void abort(int64_t request);
  // Ends a sequence from outside (a stop pattern matched): text cut at
  // `cut_bytes` (or kept whole if negative), finish reason stop.
  void stop(int64_t seq, int64_t cut_bytes);
  // Forgets a finished request.
  void remove_request(int64_t request);

  StepInfo schedule();
  // sampled[i] is the token drawn for sampled row i of the last schedule().
  // Appends (sequence id, request id) of each sequence that finished to
  // `finished`, and of each running sequence of a watched request whose text
  // grew to `watched`.
  using Event = std::pair<int64_t, int64_t>;
  void update(const int32_t* sampled, int32_t n, std::vector<Event>& finished, std::vector<Event>& watched);

  const Sequence& seq(int64_t id) const;
  const Request& request(int64_t id) const;
  // Length of a running sequence's text that no later token can take back.
  size_t stable_text_len(int64_t seq) const;

  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t max_blocks_per_seq() const { return max_blocks_; }
  const SchedulerConfig& config() const { return cfg_; }
  const Stats& stats() const { return stats_; }
  BlockPool& pool() { return pool_; }
  const BlockPool& pool() const { return pool_; }
  // Throws std::logic_error if block references and sequences disagree.
  void check() const;

 private:
  int32_t blocks_for(int32_t tokens) const { return (tokens + cfg_.block_size - 1) / cfg_.block_size; }
  const BlockHash& hash_at(Sequence* s, int32_t i);
  void match_prefix(Sequence* s);
  bool reserve(Sequence* s, int32_t tokens);
  int32_t samples_needed(const Sequence* s) const;
  int32_t plan_chunk(Sequence* s, int32_t budget, int32_t samples);
  void admit(Sequence* s);
  void remove_running(Sequence* s);
  void preempt(Sequence* s);
  void release_blocks(Sequence* s);
  void drop_copy_source(Sequence* s);
  int32_t copy_holds(int32_t block) const;
  void write_row(const Sequence* s);
  void publish_computed(Sequence* s);
  void append(Sequence* s, int32_t token, std::vector<Event>& finished);
  void prefetch_append(const Sequence* s, int32_t token) const;
  static constexpr int32_t kPrefetchAhead = 6;
  void finish(Sequence* s, int32_t reason, int64_t cut, std::vector<Event>* finished);
  Sequence* fork(Sequence* parent, int32_t index);
  Sequence* new_sequence(Request* req, int32_t index);

  SchedulerConfig cfg_;
  int32_t max_blocks_;
  BlockPool pool_;
  StepBuffers buf_;
  std::vector<std::string> token_bytes_;
  std::vector<uint8_t> special_;
  std::unordered_set<int32_t> eos_;
  std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> requests_;
  std::vector<Sequence*> running_;  // slot order
  std::vector<Sequence*> by_age_;   // running, oldest admitted first
  std::deque<Sequence*> waiting_;
  std::unordered_map<int32_t, int32_t> copy_holds_;  // block -> pending copies reading it
  std::vector<std::pair<int32_t, Sequence*>> samples_;  // last schedule(): (completion index, sequence) per row
  int64_t next_seq_ = 0, next_request_ = 0;
  uint64_t next_age_ = 0;
  Stats stats_;
};

}  // namespace fastcodegen
