// The scheduler: which tokens of which sequences run in each step, and what
// the step's outputs do to them.
//
// It owns the sequences (token ids, block tables, decoded text) so that a step
// costs Python O(1) work plus O(events), whatever the batch size:
//   schedule()  picks the step's tokens and writes the step's metadata
//               (token ids, positions, KV slots, query starts, context lengths,
//               block-table rows, which logits to sample with what parameters,
//               block copies) into arrays the caller bound once, one per field
//               of FASTCODEGEN_STEP_FIELDS;
//   update()    appends the sampled tokens, checks end-of-text, stop tokens,
//               stop strings and lengths, detokenizes incrementally, publishes
//               full blocks to the prefix cache, frees finished sequences'
//               blocks, and reports events: each sequence that finished, and
//               each token of a request that asked for them, with the text
//               bytes not reported before.
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
// A request that scores its prompt (prompt_logprobs) needs the logits at
// every prompt position, not only the last: each prompt token computed is a
// logits row too (prompt_logits_indices), sharing the sampled rows' cap
// (max_samples), which limits its chunks; prefix-cache hits are taken only
// over positions already scored (after a preemption, all of them).
//
// Speculative decoding (num_speculative_tokens k > 0): a sequence ready to
// decode may run m <= k proposed tokens after its last one, in one step of
// m + 1 query tokens with a sampled row at each; update() appends the row
// tokens in order while each equals the proposal it checks, and stops at the
// first that differs (the target's own token there) or when the sequence
// ends. Whatever the proposer, that rule is exact: a proposal is kept only
// where the target drew it. Proposals are never part of `tokens`: only
// verified positions count as computed, so the prefix cache never sees an
// unverified token, and blocks held only for rejected proposals are freed.
// Proposers: prompt lookup (an earlier occurrence of the sequence's longest
// trailing n-gram, ngram_max down to ngram_min, proposes the tokens that
// followed it), done here; or a draft model (draft_proposals): schedule()
// leaves kDraftPending in the proposals' input ids and spec_token rows, and
// the caller writes the draft's tokens into both before update().
#pragma once

#include <algorithm>
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
  int32_t max_samples = 0;               // sampled rows of a step; 0: 2 * max_num_seqs (room for n-sample forks)
  int32_t watermark_blocks = 0;          // kept free when admitting
  bool enable_prefix_caching = true;
  std::vector<int32_t> eos_token_ids;
  int32_t num_speculative_tokens = 0;  // k: most proposals verified per sequence and step (0: no speculation)
  int32_t ngram_min = 1, ngram_max = 4; // prompt lookup: the n-gram lengths matched
  int32_t speculative_max_rows = 0;    // speculate only in steps with at most this many decoding sequences (0: any)
  bool draft_proposals = false;        // the caller proposes (a draft model) instead of prompt lookup
};

// spec_token of a proposal row the caller's draft model has yet to fill.
inline constexpr int32_t kDraftPending = -2;

// The sampled rows of a step when max_samples is 0: a row per sequence, and as
// many again for n-sample forks.
inline int32_t default_max_samples(int32_t max_num_seqs) {
  return static_cast<int32_t>(std::min<int64_t>(2LL * max_num_seqs, INT32_MAX));
}

struct RequestConfig {
  int32_t n = 1;
  int32_t max_tokens = 16;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;
  bool host_sampled = false;   // seeded, logprobs, penalties or logit bias: Python samples its rows itself
  bool report_tokens = false;  // an event for every token (streaming, stop patterns, logprobs)
  bool prompt_logprobs = false; // logits rows at every prompt position (the prompt's own log-probabilities)
  bool speculate = true;        // may verify proposals (not with penalties, whose logits depend on each token drawn)
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;  // UTF-8
};

// Why a sequence ended: X(enumerator, value, the name Python shows).
#define FASTCODEGEN_FINISH_REASONS(X) \
  X(kStop, 1, "stop")                 \
  X(kLength, 2, "length")             \
  X(kAbort, 3, "abort")               \
  X(kError, 4, "error") /* the model produced non-finite logits */

enum Finish : int32_t {
  kNotFinished = 0,
#define FASTCODEGEN_FINISH_ENUM(name, value, text) name = value,
  FASTCODEGEN_FINISH_REASONS(FASTCODEGEN_FINISH_ENUM)
#undef FASTCODEGEN_FINISH_ENUM
};

struct Request;

struct Sequence {
  int64_t id = 0;
  Request* req = nullptr;
  int32_t index = 0;          // completion index within the request
  std::vector<int32_t> tokens;
  int32_t num_prompt = 0;
  int32_t num_computed = 0;   // tokens whose K/V are in the cache
  int32_t prompt_scored = 0;  // prompt_logprobs: positions [0, prompt_scored) had their logits computed
  std::vector<int32_t> draft; // proposals verified this step, after the last token (not in `tokens`)
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
  size_t reported = 0;        // bytes of `text` handed to Python in events
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
  int32_t num_rows = 0;          // rows of the batch: every running sequence, in slot order
  int32_t num_tokens = 0;        // tokens computed this step
  int32_t num_samples = 0;       // logits rows to sample
  int32_t num_host_sampled = 0;  // of those, rows Python samples on the request's terms
  int32_t num_prompt_logits = 0; // logits rows at prompt positions, scored not sampled (prompt_logprobs)
  int32_t num_copies = 0;        // block copies to make before the forward
  int32_t max_query_len = 0;
  int32_t max_context_len = 0;
  bool is_decode = false;        // every row has exactly one new token
};

// A step buffer's first dimension: max_num_batched_tokens, max_num_seqs or
// max_samples (block tables: max_num_seqs rows of max_blocks_per_seq).
enum class Capacity : int32_t { kTokens, kRows, kSamples, kBlockTable };

// Every buffer schedule() writes, once:
//   X(name, C type, dtype, capacity, count, extra, on_device)
// A buffer holds `capacity` (+ extra) rows; a step uses the first
// StepInfo::count (+ extra) of them. on_device: the model or the sampler reads
// it on the accelerator (else only Python reads it, on the host).
#define FASTCODEGEN_STEP_FIELDS(X)                                                                                     \
  X(input_ids, int64_t, "int64", kTokens, num_tokens, 0, true)                                                         \
  X(positions, int64_t, "int64", kTokens, num_tokens, 0, true)                                                         \
  X(slot_mapping, int64_t, "int64", kTokens, num_tokens, 0, true)               /* KV slot of each token */            \
  X(query_start_loc, int32_t, "int32", kRows, num_rows, 1, true)                /* row r: tokens [qsl[r], qsl[r+1]) */ \
  X(context_lens, int32_t, "int32", kRows, num_rows, 0, true)                                                          \
  X(block_tables, int32_t, "int32", kBlockTable, num_rows, 0, true)             /* rows follow the slots */            \
  X(logits_indices, int64_t, "int64", kSamples, num_samples, 0, true)           /* token of each sampled row */        \
  X(temperature, float, "float32", kSamples, num_samples, 0, true)                                                     \
  X(top_k, int32_t, "int32", kSamples, num_samples, 0, true)                                                           \
  X(top_p, float, "float32", kSamples, num_samples, 0, true)                                                           \
  X(sample_index, int32_t, "int32", kSamples, num_samples, 0, false)            /* completion index of the token */    \
  X(sample_request, int64_t, "int64", kSamples, num_samples, 0, false)                                                 \
  X(host_sampled_rows, int32_t, "int32", kSamples, num_host_sampled, 0, false)  /* rows Python samples */              \
  X(prompt_logits_indices, int64_t, "int64", kSamples, num_prompt_logits, 0, true)  /* token of each prompt row */   \
  X(prompt_logits_request, int64_t, "int64", kSamples, num_prompt_logits, 0, false)                                    \
  X(prompt_logits_position, int32_t, "int32", kSamples, num_prompt_logits, 0, false) /* scores prompt token p + 1 */ \
  X(spec_token, int32_t, "int32", kSamples, num_samples, 0, false)  /* the proposal a row checks; -1: none */           \
  X(row_kept, int32_t, "int32", kSamples, num_samples, 0, false)    /* update(): 1 if the row's token was appended */   \
  X(copy_src, int64_t, "int64", kRows, num_copies, 0, false)                    /* copies before the forward */        \
  X(copy_dst, int64_t, "int64", kRows, num_copies, 0, false)

// Where schedule() writes; the caller allocates these once and keeps them alive.
struct StepBuffers {
#define FASTCODEGEN_STEP_MEMBER(name, ctype, dtype, capacity, count, extra, on_device) ctype* name = nullptr;
  FASTCODEGEN_STEP_FIELDS(FASTCODEGEN_STEP_MEMBER)
#undef FASTCODEGEN_STEP_MEMBER
};

// One row of the table, as the bindings hand it out.
struct StepField {
  const char* name;
  const char* dtype;
  Capacity capacity;
  const char* count;  // the StepInfo member that sizes a step's part
  int32_t extra;
  bool on_device;
};

inline constexpr StepField kStepFields[] = {
#define FASTCODEGEN_STEP_ROW(name, ctype, dtype, capacity, count, extra, on_device) \
  {#name, dtype, Capacity::capacity, #count, extra, on_device},
    FASTCODEGEN_STEP_FIELDS(FASTCODEGEN_STEP_ROW)
#undef FASTCODEGEN_STEP_ROW
};

// The table's dtype column must name its C type.
template <typename T>
constexpr const char* dtype_name();
template <>
constexpr const char* dtype_name<int64_t>() { return "int64"; }
template <>
constexpr const char* dtype_name<int32_t>() { return "int32"; }
template <>
constexpr const char* dtype_name<float>() { return "float32"; }
constexpr bool same_name(const char* a, const char* b) { return *a == *b && (*a == '\0' || same_name(a + 1, b + 1)); }
#define FASTCODEGEN_STEP_DTYPE(name, ctype, dtype, capacity, count, extra, on_device) \
  static_assert(same_name(dtype_name<ctype>(), dtype), #name ": dtype and C type disagree");
FASTCODEGEN_STEP_FIELDS(FASTCODEGEN_STEP_DTYPE)
#undef FASTCODEGEN_STEP_DTYPE

// What update() tells Python about one sequence: it finished (finish != 0),
// or its request reports every token. Its new text is bytes [begin, end) of
// the update's byte arena.
struct Event {
  int64_t seq = 0;
  int64_t request = 0;
  int32_t index = 0;   // completion index
  int32_t row = -1;    // sampled row of the step, or -1 (a sibling ended with it)
  int32_t finish = kNotFinished;
  size_t begin = 0, end = 0;
};

struct Events {
  std::vector<Event> events;
  std::string bytes;
  void clear() {
    events.clear();
    bytes.clear();
  }
};

struct Stats {
  int64_t computed_tokens = 0;   // tokens run through the model
  int64_t prefix_hit_tokens = 0; // prompt tokens found in the prefix cache
  int64_t preemptions = 0;
  int64_t block_copies = 0;
  int64_t spec_runs = 0;         // sequences that verified proposals in a step
  int64_t spec_proposed = 0;     // proposals verified
  int64_t spec_accepted = 0;     // of those, kept
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& cfg);

  void bind(const StepBuffers& buffers) { buf_ = buffers; }
  // The shape of a step buffer under this scheduler's limits.
  std::vector<int64_t> field_shape(const StepField& f) const;
  // token id -> its bytes (byte-level BPE); special tokens are skipped from
  // text when a request asks so. Without it, sequences have no text.
  void set_vocabulary(std::vector<std::string> token_bytes, const std::vector<int32_t>& special_ids);

  int64_t add_request(const std::vector<int32_t>& prompt, const RequestConfig& cfg);
  void abort(int64_t request);
  // Ends a sequence from outside (a stop pattern matched; Python cut its
  // text): finish reason stop.
  void stop(int64_t seq);
  // Forgets a finished request.
  void remove_request(int64_t request);

  StepInfo schedule();
  // sampled[i] is the token drawn for sampled row i of the last schedule();
  // finite[i] == 0 (finite may be null: all finite) says that row's logits
  // were not finite, which ends its request with kError. Returns the events,
  // in row order, valid until the next update().
  const Events& update(const int32_t* sampled, const uint8_t* finite, int32_t n);

  const Sequence& seq(int64_t id) const;
  const Request& request(int64_t id) const;
  // Length of a running sequence's text that no later token can take back.
  size_t stable_text_len(int64_t seq) const { return stable_len(this->seq(seq)); }

  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t max_blocks_per_seq() const { return max_blocks_; }
  const SchedulerConfig& config() const { return cfg_; }  // max_samples resolved
  const Stats& stats() const { return stats_; }
  BlockPool& pool() { return pool_; }
  const BlockPool& pool() const { return pool_; }
  // Throws std::logic_error if block references and sequences disagree.
  void check() const;

 private:
  // What a step has left while schedule() fills it.
  struct Budget {
    int32_t tokens = 0;
    int32_t samples = 0;
  };

  int32_t blocks_for(int32_t tokens) const { return (tokens + cfg_.block_size - 1) / cfg_.block_size; }
  const BlockHash& hash_at(Sequence* s, int32_t i);
  void match_prefix(Sequence* s);
  bool reserve(Sequence* s, int32_t tokens);
  int32_t samples_needed(const Sequence* s) const;
  int32_t prompt_rows(const Sequence* s, int32_t chunk) const;
  int32_t logits_rows(const Sequence* s, int32_t chunk) const;
  int32_t plan_chunk(Sequence* s, const Budget& budget);
  int32_t prompt_room(Sequence* s, int32_t chunk);
  void take(Sequence* s, int32_t chunk, Budget& budget);
  void schedule_decodes(Budget& budget);
  int32_t speculation_room(const Sequence* s) const;
  void propose_ngram(Sequence* s, int32_t most) const;
  int32_t accept(Sequence* s, int32_t j, const int32_t* sampled, const uint8_t* finite);
  void trim_blocks(Sequence* s);
  void continue_prompts(Budget& budget);
  void admit_waiting(Budget& budget);
  StepInfo write_step();
  void write_tokens(const Sequence* s, int32_t t);
  void write_samples(Sequence* s, int32_t logits_index, StepInfo& info);
  void write_prompt_logits(const Sequence* s, int32_t t, StepInfo& info);
  void write_verify_rows(Sequence* s, int32_t t, StepInfo& info);
  void write_sample_row(Sequence* s, int32_t index, int32_t logits_index, int32_t spec, StepInfo& info);
  void admit(Sequence* s);
  void remove_running(Sequence* s);
  void preempt(Sequence* s);
  void release_blocks(Sequence* s);
  void drop_copy_source(Sequence* s);
  int32_t copy_holds(int32_t block) const;
  void write_row(const Sequence* s);
  void publish_computed(Sequence* s);
  void append(Sequence* s, int32_t token);
  void prefetch_append(const Sequence* s, int32_t token) const;
  static constexpr int32_t kPrefetchAhead = 6;
  void finish(Sequence* s, int32_t reason, int64_t cut);
  void fail_request(Sequence* s, int32_t row);
  void report(Sequence* s, int32_t row, size_t end);
  void report_appended(Sequence* s, int32_t row);
  size_t stable_len(const Sequence& s) const;
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
  Events events_;  // of the last update(); reused so that a step allocates nothing for them
  int64_t next_seq_ = 0, next_request_ = 0;
  uint64_t next_age_ = 0;
  Stats stats_;
};

}  // namespace fastcodegen
