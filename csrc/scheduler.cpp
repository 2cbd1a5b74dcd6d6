#include "scheduler.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastcodegen {

namespace {

// The config with its defaults filled in; checked before anything divides by it.
SchedulerConfig resolved(SchedulerConfig cfg) {
  if (cfg.block_size <= 0) throw std::invalid_argument("block_size must be positive");
  if (cfg.max_num_seqs <= 0 || cfg.max_model_len <= 0) {
    throw std::invalid_argument("max_num_seqs and max_model_len must be positive");
  }
  if (cfg.max_samples == 0) cfg.max_samples = default_max_samples(cfg.max_num_seqs);
  if (cfg.num_speculative_tokens < 0 || cfg.speculative_max_rows < 0) {
    throw std::invalid_argument("num_speculative_tokens and speculative_max_rows must be >= 0");
  }
  if (cfg.ngram_min < 1 || cfg.ngram_max < cfg.ngram_min) {
    throw std::invalid_argument("ngram_min must be >= 1 and ngram_max >= ngram_min");
  }
  return cfg;
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : cfg_(resolved(config)),
      max_blocks_((cfg_.max_model_len + cfg_.block_size - 1) / cfg_.block_size),
      pool_(cfg_.num_blocks, cfg_.block_size),
      eos_(cfg_.eos_token_ids.begin(), cfg_.eos_token_ids.end()) {
  if (cfg_.max_num_batched_tokens < cfg_.max_num_seqs) {
    throw std::invalid_argument("max_num_batched_tokens must be at least max_num_seqs (a decode token for every row)");
  }
  if (cfg_.max_samples < cfg_.max_num_seqs) throw std::invalid_argument("max_samples must be at least max_num_seqs");
  if (cfg_.num_blocks < max_blocks_) {
    throw std::invalid_argument("the KV cache must hold one sequence of max_model_len tokens");
  }
}

std::vector<int64_t> Scheduler::field_shape(const StepField& f) const {
  switch (f.capacity) {
    case Capacity::kTokens:
      return {cfg_.max_num_batched_tokens + f.extra};
    case Capacity::kRows:
      return {cfg_.max_num_seqs + f.extra};
    case Capacity::kSamples:
      return {cfg_.max_samples + f.extra};
    case Capacity::kBlockTable:
      return {cfg_.max_num_seqs + f.extra, max_blocks_};
  }
  throw std::logic_error(std::string("no capacity for step field ") + f.name);
}

void Scheduler::set_vocabulary(std::vector<std::string> token_bytes, const std::vector<int32_t>& special_ids) {
  token_bytes_ = std::move(token_bytes);
  special_.assign(token_bytes_.size(), 0);
  for (int32_t id : special_ids) {
    if (id >= 0 && static_cast<size_t>(id) < special_.size()) special_[id] = 1;
  }
}

Sequence* Scheduler::new_sequence(Request* req, int32_t index) {
  auto s = std::make_unique<Sequence>();
  s->id = next_seq_++;
  s->req = req;
  s->index = index;
  Sequence* raw = s.get();
  seqs_.emplace(raw->id, std::move(s));
  req->seqs.push_back(raw);
  return raw;
}

int64_t Scheduler::add_request(const std::vector<int32_t>& prompt, const RequestConfig& cfg) {
  if (prompt.empty()) throw std::invalid_argument("empty prompt");
  if (static_cast<int32_t>(prompt.size()) >= cfg_.max_model_len) throw std::invalid_argument("prompt fills the context");
  if (cfg.n < 1 || cfg.n > cfg_.max_num_seqs) throw std::invalid_argument("n must be in [1, max_num_seqs]");
  auto req = std::make_unique<Request>();
  req->id = next_request_++;
  req->cfg = cfg;
  for (const auto& s : cfg.stop_strings) req->max_stop_len = std::max(req->max_stop_len, s.size());
  Sequence* s = new_sequence(req.get(), 0);
  // Room for every token it may get, so appends never move it.
  s->tokens.reserve(std::min<size_t>(prompt.size() + static_cast<size_t>(std::max(cfg.max_tokens, 0)), cfg_.max_model_len));
  s->tokens = prompt;
  s->num_prompt = static_cast<int32_t>(prompt.size());
  s->forked = cfg.n == 1;
  s->waiting = true;
  waiting_.push_back(s);
  const int64_t id = req->id;
  requests_.emplace(id, std::move(req));
  return id;
}

const Sequence& Scheduler::seq(int64_t id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("no sequence " + std::to_string(id));
  return *it->second;
}

const Request& Scheduler::request(int64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("no request " + std::to_string(id));
  return *it->second;
}

// ---------------------------------------------------------------------------- blocks

const BlockHash& Scheduler::hash_at(Sequence* s, int32_t i) {
  const int32_t bs = cfg_.block_size;
  while (static_cast<int32_t>(s->hashes.size()) <= i) {
    const int32_t k = static_cast<int32_t>(s->hashes.size());
    const BlockHash parent = k == 0 ? BlockHash{} : s->hashes[k - 1];
    s->hashes.push_back(chain(parent, s->tokens.data() + static_cast<size_t>(k) * bs, bs));
  }
  return s->hashes[i];
}

void Scheduler::match_prefix(Sequence* s) {
  if (!cfg_.enable_prefix_caching) return;
  // Hits stop one token short of the end: the last token must be computed for its logits.
  // A sequence scoring its prompt must compute every position not scored yet, too.
  const int32_t end = s->req->cfg.prompt_logprobs ? std::min(s->num_tokens() - 1, s->prompt_scored) : s->num_tokens() - 1;
  const int32_t max_hits = end / cfg_.block_size;
  for (int32_t i = 0; i < max_hits; ++i) {
    const BlockHash parent = i == 0 ? BlockHash{} : s->hashes[i - 1];
    const BlockHash& h = hash_at(s, i);
    const int32_t b = pool_.lookup(parent, h, s->tokens.data() + static_cast<size_t>(i) * cfg_.block_size);
    if (b < 0) break;
    s->blocks.push_back(b);
  }
  s->num_computed = static_cast<int32_t>(s->blocks.size()) * cfg_.block_size;
  s->num_published = static_cast<int32_t>(s->blocks.size());
}

// Blocks for `tokens` more tokens of s; a decode write into a block shared
// with a sibling copies it first. False (nothing changed) if too few are free.
bool Scheduler::reserve(Sequence* s, int32_t tokens) {
  const int32_t bs = cfg_.block_size;
  const int32_t first = s->num_computed;
  const int32_t need = std::max(0, blocks_for(first + tokens) - static_cast<int32_t>(s->blocks.size()));
  const int32_t cow_block = first / bs;
  // Shared with a sibling: held by others than this sequence and the pending copies out of it.
  const bool cow = first % bs != 0 && cow_block < static_cast<int32_t>(s->blocks.size()) &&
                   pool_.refcount(s->blocks[cow_block]) - copy_holds(s->blocks[cow_block]) > 1;
  if (need + (cow ? 1 : 0) > pool_.num_free()) return false;
  if (cow) {  // the copy itself is issued with the step's metadata, and released in update()
    s->copy_src = s->blocks[cow_block];
    ++copy_holds_[s->copy_src];
    s->copy_dst = pool_.allocate();
    s->blocks[cow_block] = s->copy_dst;
    ++stats_.block_copies;
  }
  for (int32_t i = 0; i < need; ++i) s->blocks.push_back(pool_.allocate());
  if (s->slot >= 0 && (need > 0 || cow)) write_row(s);
  return true;
}

void Scheduler::release_blocks(Sequence* s) {
  drop_copy_source(s);
  pool_.release(s->blocks);
  s->blocks.clear();
  s->num_computed = 0;
  s->num_published = 0;
}

void Scheduler::drop_copy_source(Sequence* s) {
  if (s->copy_src >= 0) {
    if (--copy_holds_[s->copy_src] == 0) copy_holds_.erase(s->copy_src);
    pool_.decref(s->copy_src);
  }
  s->copy_src = s->copy_dst = -1;
}

int32_t Scheduler::copy_holds(int32_t block) const {
  auto it = copy_holds_.find(block);
  return it == copy_holds_.end() ? 0 : it->second;
}

void Scheduler::write_row(const Sequence* s) {
  std::copy(s->blocks.begin(), s->blocks.end(), buf_.block_tables + static_cast<size_t>(s->slot) * max_blocks_);
}

void Scheduler::publish_computed(Sequence* s) {
  if (!cfg_.enable_prefix_caching) return;
  const int32_t bs = cfg_.block_size;
  const int32_t full = s->num_computed / bs;
  for (int32_t i = s->num_published; i < full; ++i) {
    const BlockHash parent = i == 0 ? BlockHash{} : hash_at(s, i - 1);
    pool_.publish(s->blocks[i], parent, hash_at(s, i), s->tokens.data() + static_cast<size_t>(i) * bs);
  }
  s->num_published = std::max(s->num_published, full);
}

// ---------------------------------------------------------------------------- running set

void Scheduler::admit(Sequence* s) {
  s->waiting = false;
  s->running = true;
  s->slot = static_cast<int32_t>(running_.size());
  s->age = next_age_++;
  running_.push_back(s);
  by_age_.push_back(s);
  write_row(s);
}

void Scheduler::remove_running(Sequence* s) {
  const int32_t slot = s->slot;
  Sequence* last = running_.back();
  if (last != s) {  // keep the rows dense: the last row moves into the hole
    running_[slot] = last;
    last->slot = slot;
    write_row(last);
  }
  running_.pop_back();
  by_age_.erase(std::find(by_age_.begin(), by_age_.end(), s));
  s->slot = -1;
  s->running = false;
}

void Scheduler::preempt(Sequence* s) {
  s->draft.clear();
  remove_running(s);
  release_blocks(s);
  s->q_len = 0;
  s->waiting = true;
  waiting_.push_front(s);
  ++stats_.preemptions;
}

// ---------------------------------------------------------------------------- scheduling

int32_t Scheduler::samples_needed(const Sequence* s) const { return s->forked ? 1 : s->req->cfg.n; }

// Prompt positions not scored yet among the next `chunk` tokens of s (prompt_logprobs
// requests; the last prompt position is the first sampled row, not a prompt row).
int32_t Scheduler::prompt_rows(const Sequence* s, int32_t chunk) const {
  if (!s->req->cfg.prompt_logprobs) return 0;
  const int32_t first = std::max(s->num_computed, s->prompt_scored);
  return std::max(0, std::min(s->num_computed + chunk, s->num_prompt - 1) - first);
}

// The logits rows s's next `chunk` tokens need: prompt rows, and the sampled rows if the chunk ends s.
int32_t Scheduler::logits_rows(const Sequence* s, int32_t chunk) const {
  const bool ends = s->num_computed + chunk == s->num_tokens();
  return prompt_rows(s, chunk) + (ends ? samples_needed(s) : 0);
}

// How many of s's remaining tokens fit the budget and the logits-row limit (0: none).
int32_t Scheduler::plan_chunk(Sequence* s, const Budget& budget) {
  const int32_t remaining = s->num_tokens() - s->num_computed;
  int32_t chunk = std::min(remaining, budget.tokens);
  if (s->req->cfg.prompt_logprobs) {  // a row per position not scored yet: prompt_rows(c) <= c - skipped
    const int32_t skipped = std::max(0, s->prompt_scored - s->num_computed);
    chunk = std::min(chunk, skipped + std::max(0, cfg_.max_samples - budget.samples));
  }
  if (chunk == remaining && budget.samples + logits_rows(s, chunk) > cfg_.max_samples) chunk = remaining - 1;
  return std::max(chunk, 0);
}

// s runs `chunk` tokens this step (its blocks already reserved).
void Scheduler::take(Sequence* s, int32_t chunk, Budget& budget) {
  s->q_len = chunk;
  budget.tokens -= chunk;
  budget.samples += logits_rows(s, chunk);
}

StepInfo Scheduler::schedule() {
  if (buf_.input_ids == nullptr) throw std::logic_error("schedule() before bind()");
  Budget budget{cfg_.max_num_batched_tokens, 0};
  for (Sequence* s : running_) s->q_len = 0;
  schedule_decodes(budget);
  continue_prompts(budget);
  admit_waiting(budget);
  return write_step();
}

// How many proposals s may verify this step: none unless it decodes one token of its own, and never
// past max_tokens or the context end (the run's last token is drawn by the target).
int32_t Scheduler::speculation_room(const Sequence* s) const {
  const RequestConfig& c = s->req->cfg;
  if (!c.speculate || samples_needed(s) != 1 || prompt_rows(s, 1) != 0) return 0;
  const int64_t by_length = std::min<int64_t>(static_cast<int64_t>(c.max_tokens) - s->num_output(),
                                              static_cast<int64_t>(cfg_.max_model_len) - s->num_tokens()) - 1;
  return static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(cfg_.num_speculative_tokens, by_length)));
}

// Prompt lookup: an earlier occurrence of s's longest trailing n-gram proposes the up to `most` tokens
// that followed it: the most recent occurrence followed by `most` tokens, else the one followed by
// the most (a match just behind the end, inside a run that repeats, is followed by few).
void Scheduler::propose_ngram(Sequence* s, int32_t most) const {
  const std::vector<int32_t>& t = s->tokens;
  const int32_t len = s->num_tokens();
  for (int32_t n = std::min(cfg_.ngram_max, len - 1); n >= cfg_.ngram_min; --n) {
    const int32_t* tail = t.data() + (len - n);
    int32_t best_from = -1, best = 0;
    for (int32_t start = len - n - 1; start >= 0 && best < most; --start) {
      if (t[start] != tail[0] || !std::equal(tail, tail + n, t.data() + start)) continue;
      const int32_t follow = std::min(most, len - (start + n));
      if (follow > best) best = follow, best_from = start + n;
    }
    if (best_from >= 0) {
      s->draft.assign(t.begin() + best_from, t.begin() + best_from + best);
      return;
    }
  }
}

// 1. Decodes, oldest first; make room by preempting the youngest. With speculation, the rows and
// tokens every decode needs are set aside first; proposals get what is left, oldest first.
void Scheduler::schedule_decodes(Budget& budget) {
  int32_t spare_rows = 0, spare_tokens = 0, ready = 0;
  if (cfg_.num_speculative_tokens > 0) {
    for (const Sequence* s : by_age_) ready += s->num_computed == s->num_tokens() - 1;
    if (cfg_.speculative_max_rows == 0 || ready <= cfg_.speculative_max_rows) {
      spare_rows = std::max(0, cfg_.max_samples - budget.samples - ready);
      spare_tokens = std::max(0, budget.tokens - ready);
    }
  }
  for (size_t i = 0; i < by_age_.size(); ++i) {
    Sequence* s = by_age_[i];
    s->draft.clear();
    if (s->num_computed != s->num_tokens() - 1 || budget.samples + logits_rows(s, 1) > cfg_.max_samples) continue;
    const int32_t most = std::min({speculation_room(s), spare_rows, spare_tokens});
    if (most > 0) {
      if (cfg_.draft_proposals) {
        s->draft.assign(most, kDraftPending);
      } else {
        propose_ngram(s, most);
      }
      const int32_t m = static_cast<int32_t>(s->draft.size());
      // Only from blocks no other decode of the step may need.
      const int32_t extra = blocks_for(s->num_computed + 1 + m) - static_cast<int32_t>(s->blocks.size());
      if (m > 0 && extra + ready <= pool_.num_free() && reserve(s, 1 + m)) {
        spare_rows -= m;
        spare_tokens -= m;
        s->q_len = 1 + m;
        budget.tokens -= 1 + m;
        budget.samples += 1 + m;
        continue;
      }
      s->draft.clear();  // too few free blocks for the proposals: a plain decode
    }
    bool ok = reserve(s, 1);
    while (!ok) {
      Sequence* victim = by_age_.back();
      preempt(victim);
      if (victim == s) break;
      ok = reserve(s, 1);
    }
    if (!ok) break;  // s itself was the youngest: nothing after it is running
    take(s, 1, budget);
  }
}

// How much of `chunk` fits in the blocks s has and the free ones; younger
// unscheduled prompts are preempted if not even one token fits.
int32_t Scheduler::prompt_room(Sequence* s, int32_t chunk) {
  auto fits = [&]() {
    const int64_t capacity = (static_cast<int64_t>(s->blocks.size()) + pool_.num_free()) * cfg_.block_size;
    return static_cast<int32_t>(std::min<int64_t>(chunk, capacity - s->num_computed));
  };
  while (chunk > 0 && fits() <= 0) {
    Sequence* victim = nullptr;
    for (auto it = by_age_.rbegin(); it != by_age_.rend() && *it != s; ++it) {
      if ((*it)->q_len == 0) {
        victim = *it;
        break;
      }
    }
    if (victim == nullptr) break;
    preempt(victim);
  }
  return std::min(chunk, fits());
}

// 2. Prompts under way, oldest first, in chunks of what the budget leaves.
void Scheduler::continue_prompts(Budget& budget) {
  for (size_t i = 0; i < by_age_.size() && budget.tokens > 0; ++i) {
    Sequence* s = by_age_[i];
    if (s->q_len > 0 || s->num_computed >= s->num_tokens() - 1) continue;
    const int32_t chunk = prompt_room(s, plan_chunk(s, budget));
    if (chunk <= 0) continue;
    reserve(s, chunk);  // fits: cannot fail
    take(s, chunk, budget);
  }
}

// 3. Admit waiting sequences in arrival order while a row, budget and blocks allow.
void Scheduler::admit_waiting(Budget& budget) {
  while (!waiting_.empty() && budget.tokens > 0 && static_cast<int32_t>(running_.size()) < cfg_.max_num_seqs) {
    Sequence* s = waiting_.front();
    match_prefix(s);
    const int32_t chunk = plan_chunk(s, budget);
    const int32_t need = blocks_for(s->num_computed + chunk) - static_cast<int32_t>(s->blocks.size());
    const int64_t spare = running_.empty() ? 0 : cfg_.watermark_blocks;
    if (chunk <= 0 || need + spare > pool_.num_free()) {
      release_blocks(s);  // give the prefix hits back; they stay cached
      break;
    }
    stats_.prefix_hit_tokens += s->num_computed;
    waiting_.pop_front();
    admit(s);
    reserve(s, chunk);
    take(s, chunk, budget);
  }
}

// The step's metadata, row by row in slot order.
StepInfo Scheduler::write_step() {
  StepInfo info;
  int32_t min_q = INT32_MAX;
  samples_.clear();
  buf_.query_start_loc[0] = 0;
  for (size_t r = 0; r < running_.size(); ++r) {
    Sequence* s = running_[r];
    if (s->copy_src >= 0) {  // new this step, or left over from a step that did not complete
      buf_.copy_src[info.num_copies] = s->copy_src;
      buf_.copy_dst[info.num_copies] = s->copy_dst;
      ++info.num_copies;
    }
    const int32_t k = s->q_len, context = s->num_computed + k;
    write_tokens(s, info.num_tokens);
    if (!s->draft.empty()) {
      write_verify_rows(s, info.num_tokens, info);
    } else if (k > 0) {
      write_prompt_logits(s, info.num_tokens, info);
    }
    info.num_tokens += k;
    buf_.query_start_loc[r + 1] = info.num_tokens;
    buf_.context_lens[r] = context;
    info.max_query_len = std::max(info.max_query_len, k);
    info.max_context_len = std::max(info.max_context_len, context);
    min_q = std::min(min_q, k);
    if (k > 0 && context == s->num_tokens() && s->draft.empty()) write_samples(s, info.num_tokens - 1, info);
  }
  stats_.computed_tokens += info.num_tokens;
  info.num_rows = static_cast<int32_t>(running_.size());
  info.is_decode = info.num_rows > 0 && min_q == 1 && info.max_query_len == 1;
  return info;
}

// s's tokens of the step, from index t of the step's tokens on.
void Scheduler::write_tokens(const Sequence* s, int32_t t) {
  const int32_t bs = cfg_.block_size, start = s->num_computed;
  const int32_t len = s->num_tokens();
  for (int32_t p = start; p < start + s->q_len; ++p, ++t) {
    buf_.input_ids[t] = p < len ? s->tokens[p] : s->draft[p - len];
    buf_.positions[t] = p;
    buf_.slot_mapping[t] = static_cast<int64_t>(s->blocks[p / bs]) * bs + p % bs;
  }
}

// The rows sampled from the logits of s's last token: one, or n for a prompt about to fork.
void Scheduler::write_samples(Sequence* s, int32_t logits_index, StepInfo& info) {
  const int32_t n = samples_needed(s);
  // Forks first, the prompt sequence's own token last (update() forks from the unextended prompt).
  for (int32_t j = 0; j < n; ++j) write_sample_row(s, n == 1 ? s->index : (j + 1) % n, logits_index, -1, info);
}

// A speculating sequence's rows, one per query token (its tokens start at index t of the step's):
// row i checks proposal i; the last row draws the token after the last proposal.
void Scheduler::write_verify_rows(Sequence* s, int32_t t, StepInfo& info) {
  const int32_t m = static_cast<int32_t>(s->draft.size());
  for (int32_t i = 0; i <= m; ++i) write_sample_row(s, s->index, t + i, i < m ? s->draft[i] : -1, info);
}

// The next sampled row: completion `index` of s draws from the logits of token `logits_index`,
// checking proposal `spec` (-1: none), on its request's sampling terms.
void Scheduler::write_sample_row(Sequence* s, int32_t index, int32_t logits_index, int32_t spec, StepInfo& info) {
  const RequestConfig& c = s->req->cfg;
  const int32_t row = info.num_samples++;
  buf_.logits_indices[row] = logits_index;
  buf_.temperature[row] = c.temperature;
  buf_.top_k[row] = c.top_k;
  buf_.top_p[row] = c.top_p;
  buf_.sample_index[row] = index;
  buf_.sample_request[row] = s->req->id;
  buf_.spec_token[row] = spec;
  if (c.host_sampled) buf_.host_sampled_rows[info.num_host_sampled++] = row;
  samples_.emplace_back(index, s);
}

// The prompt rows of s's tokens this step, which start at index t of the step's tokens.
void Scheduler::write_prompt_logits(const Sequence* s, int32_t t, StepInfo& info) {
  const int32_t rows = prompt_rows(s, s->q_len);
  const int32_t first = std::max(s->num_computed, s->prompt_scored);
  for (int32_t p = first; p < first + rows; ++p) {
    const int32_t row = info.num_prompt_logits++;
    buf_.prompt_logits_indices[row] = t + (p - s->num_computed);
    buf_.prompt_logits_request[row] = s->req->id;
    buf_.prompt_logits_position[row] = p;
  }
}

// ---------------------------------------------------------------------------- outputs

Sequence* Scheduler::fork(Sequence* parent, int32_t index) {
  Sequence* s = new_sequence(parent->req, index);
  s->tokens.reserve(parent->tokens.capacity());
  s->tokens = parent->tokens;
  s->num_prompt = parent->num_prompt;
  s->prompt_scored = parent->prompt_scored;
  s->hashes = parent->hashes;
  s->forked = true;
  if (static_cast<int32_t>(running_.size()) < cfg_.max_num_seqs) {
    s->blocks = parent->blocks;
    for (int32_t b : s->blocks) pool_.incref(b);
    s->num_computed = parent->num_computed;
    s->num_published = parent->num_published;
    admit(s);
  } else {  // no row free: wait, and find the prompt's full blocks in the prefix cache later
    s->waiting = true;
    waiting_.push_front(s);
  }
  return s;
}

void Scheduler::append(Sequence* s, int32_t token) {
  const RequestConfig& c = s->req->cfg;
  s->tokens.push_back(token);
  if (!c.ignore_eos && eos_.count(token)) {
    finish(s, kStop, -1);
    return;
  }
  if (std::find(c.stop_token_ids.begin(), c.stop_token_ids.end(), token) != c.stop_token_ids.end()) {
    s->stop_token = token;
    finish(s, kStop, -1);
    return;
  }
  if (!token_bytes_.empty() && token >= 0 && static_cast<size_t>(token) < token_bytes_.size() &&
      !(c.skip_special_tokens && special_[token])) {
    const size_t old = s->text.size();
    const std::string& bytes = token_bytes_[token];
    s->utf8.decode(bytes.data(), bytes.size(), s->text);
    if (s->text.size() > old && !c.stop_strings.empty()) {
      // A match ends in the new bytes (the old text had none), so it starts
      // at or after old - max_stop_len + 1: never before stable_text_len() of
      // the old text, and so never inside text already reported.
      const size_t from = old >= s->req->max_stop_len ? old - s->req->max_stop_len + 1 : 0;
      size_t best = std::string::npos;
      for (size_t k = 0; k < c.stop_strings.size(); ++k) {
        const size_t at = s->text.find(c.stop_strings[k], from);
        if (at < best) {
          best = at;
          s->stop_string = static_cast<int32_t>(k);
        }
      }
      if (best != std::string::npos) {
        finish(s, kStop, static_cast<int64_t>(best));
        return;
      }
    }
  }
  if (s->num_output() >= c.max_tokens || s->num_tokens() >= cfg_.max_model_len) finish(s, kLength, -1);
}

void Scheduler::finish(Sequence* s, int32_t reason, int64_t cut) {
  if (s->finish != kNotFinished) return;
  if (cut >= 0) {
    s->text.resize(std::min<size_t>(static_cast<size_t>(cut), s->text.size()));
  } else {
    s->utf8.flush(s->text);
  }
  s->finish = reason;
  s->draft.clear();
  if (s->running) remove_running(s);
  if (s->waiting) {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), s));
    s->waiting = false;
  }
  if (!s->blocks.empty()) release_blocks(s);
  s->q_len = 0;
  ++s->req->num_finished;
}

// Sampled row `row` of s held non-finite logits: the whole request ends with
// kError, s's event first (on that row), then its siblings' (row -1).
void Scheduler::fail_request(Sequence* s, int32_t row) {
  finish(s, kError, -1);
  report(s, row, s->text.size());
  for (Sequence* q : s->req->seqs) {
    if (q->finish != kNotFinished) continue;
    finish(q, kError, -1);
    report(q, -1, q->text.size());
  }
}

// An event for s with its text from what was reported up to `end`.
void Scheduler::report(Sequence* s, int32_t row, size_t end) {
  if (end < s->reported || end > s->text.size()) {
    throw std::logic_error("a sequence's text was cut before what was reported");
  }
  Event e;
  e.seq = s->id;
  e.request = s->req->id;
  e.index = s->index;
  e.row = row;
  e.finish = s->finish;
  e.begin = events_.bytes.size();
  events_.bytes.append(s->text, s->reported, end - s->reported);
  e.end = events_.bytes.size();
  events_.events.push_back(e);
  s->reported = end;
}

// What append() will touch for a sequence, fetched a few rows ahead: a step
// visits hundreds of sequences whose token lists, texts and request configs
// are scattered over the heap and rarely still in cache.
void Scheduler::prefetch_append(const Sequence* s, int32_t token) const {
  if (s == nullptr) return;
  __builtin_prefetch(s->tokens.data() + s->tokens.size(), 1);
  __builtin_prefetch(s->text.data() + s->text.size(), 1);
  __builtin_prefetch(&s->req->cfg);
  if (!s->req->cfg.stop_strings.empty()) __builtin_prefetch(s->req->cfg.stop_strings.data());
  if (token >= 0 && static_cast<size_t>(token) < token_bytes_.size()) __builtin_prefetch(&token_bytes_[token]);
}

const Events& Scheduler::update(const int32_t* sampled, const uint8_t* finite, int32_t n) {
  if (n != static_cast<int32_t>(samples_.size())) {
    throw std::invalid_argument("update() got " + std::to_string(n) + " tokens for " + std::to_string(samples_.size()) +
                                " sampled rows");
  }
  events_.clear();
  std::fill(buf_.row_kept, buf_.row_kept + n, 0);
  // The step's tokens are in the cache now, and its block copies made (a speculating sequence's last
  // token; its proposals count once verified).
  for (Sequence* s : running_) {
    s->num_computed += s->draft.empty() ? s->q_len : 1;
    if (s->req->cfg.prompt_logprobs) s->prompt_scored = std::max(s->prompt_scored, std::min(s->num_computed, s->num_prompt - 1));
    publish_computed(s);
    drop_copy_source(s);
  }
  for (int32_t j = 0; j < n; ++j) {
    if (j + kPrefetchAhead < n) prefetch_append(samples_[j + kPrefetchAhead].second, sampled[j + kPrefetchAhead]);
    auto [index, s] = samples_[j];
    // Aborted, stopped or removed since schedule(), or its request failed on an earlier row.
    if (s == nullptr || s->finish != kNotFinished) continue;
    if (!s->draft.empty()) {
      j = accept(s, j, sampled, finite) - 1;
      continue;
    }
    if (finite != nullptr && !finite[j]) {
      fail_request(s, j);
      continue;
    }
    buf_.row_kept[j] = 1;
    Sequence* target = s;
    if (index != s->index) {
      target = fork(s, index);
    } else if (!s->forked) {
      s->forked = true;  // the prompt sequence keeps completion 0
    }
    append(target, sampled[j]);
    report_appended(target, j);
  }
  for (Sequence* s : running_) s->q_len = 0;
  samples_.clear();
  return events_;
}

// The rows j.. of a speculating sequence: appends row tokens while each equals its proposal (and the
// sequence runs); returns the row after its last. Each proposal kept was computed this step with the
// context it now has, so it counts as computed before the next token is appended.
int32_t Scheduler::accept(Sequence* s, int32_t j, const int32_t* sampled, const uint8_t* finite) {
  const int32_t m = static_cast<int32_t>(s->draft.size());
  int32_t last = j;
  ++stats_.spec_runs;
  stats_.spec_proposed += m;
  for (int32_t i = 0; i <= m; ++i) {
    const int32_t row = j + i;
    if (finite != nullptr && !finite[row]) {
      s->draft.clear();
      fail_request(s, row);
      return j + m + 1;
    }
    if (i > 0) {
      ++s->num_computed;
      publish_computed(s);
    }
    const int32_t token = sampled[row];
    append(s, token);
    buf_.row_kept[row] = 1;
    last = row;
    // The proposal as the step's buffer holds it: a draft model's was written there after schedule().
    if (s->finish != kNotFinished || i == m || token != buf_.spec_token[row]) break;
    ++stats_.spec_accepted;
  }
  s->draft.clear();
  if (s->finish == kNotFinished) trim_blocks(s);
  report_appended(s, last);
  return j + m + 1;
}

// The event owed for s after update() appended its token(s) up to sampled row `row`: it finished, or
// its request reports its tokens.
void Scheduler::report_appended(Sequence* s, int32_t row) {
  if (s->finish != kNotFinished) {
    report(s, row, s->text.size());
  } else if (s->req->cfg.report_tokens) {
    report(s, row, stable_len(*s));
  }
}

// Frees the blocks past s's computed tokens (held only for rejected proposals): s then holds what a
// plain decode step would have left it.
void Scheduler::trim_blocks(Sequence* s) {
  const int32_t keep = blocks_for(s->num_computed);
  if (static_cast<int32_t>(s->blocks.size()) <= keep) return;
  while (static_cast<int32_t>(s->blocks.size()) > keep) {
    pool_.decref(s->blocks.back());
    s->blocks.pop_back();
  }
  if (s->slot >= 0) write_row(s);
}

size_t Scheduler::stable_len(const Sequence& s) const {
  if (s.finish != kNotFinished || s.req->max_stop_len == 0) return s.text.size();
  const size_t hold = s.req->max_stop_len - 1;
  return utf8_floor(s.text, s.text.size() > hold ? s.text.size() - hold : 0);
}

void Scheduler::abort(int64_t request) {
  auto it = requests_.find(request);
  if (it == requests_.end()) return;
  for (Sequence* s : it->second->seqs) finish(s, kAbort, -1);
}

void Scheduler::stop(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) throw std::out_of_range("no sequence " + std::to_string(id));
  finish(it->second.get(), kStop, -1);
}

void Scheduler::remove_request(int64_t request) {
  auto it = requests_.find(request);
  if (it == requests_.end()) return;
  for (Sequence* s : it->second->seqs) {
    if (s->finish == kNotFinished) finish(s, kAbort, -1);
    for (auto& sample : samples_) {
      if (sample.second == s) sample.second = nullptr;  // rows keep their places; update() skips them
    }
    seqs_.erase(s->id);
  }
  requests_.erase(it);
}

void Scheduler::check() const {
  pool_.check();
  std::unordered_map<int32_t, int32_t> refs;
  for (const auto& [id, s] : seqs_) {
    for (int32_t b : s->blocks) ++refs[b];
    if (s->copy_src >= 0) ++refs[s->copy_src];
    if (s->running && (s->slot < 0 || running_[s->slot] != s.get())) throw std::logic_error("slot map broken");
    if (s->running && s->waiting) throw std::logic_error("sequence both running and waiting");
    if (!s->running && !s->waiting && !s->blocks.empty()) throw std::logic_error("idle sequence holds blocks");
    if (s->num_computed > s->num_tokens()) throw std::logic_error("computed past the end");
    if (s->reported > s->text.size()) throw std::logic_error("reported past the end of the text");
    if (static_cast<int32_t>(s->blocks.size()) < blocks_for(s->num_computed)) throw std::logic_error("computed without blocks");
    if (s->running) {
      const int32_t* row = buf_.block_tables + static_cast<size_t>(s->slot) * max_blocks_;
      if (!std::equal(s->blocks.begin(), s->blocks.end(), row)) throw std::logic_error("block-table row is stale");
    }
  }
  for (int64_t b = 0; b < pool_.num_blocks(); ++b) {
    const int32_t held = refs.count(static_cast<int32_t>(b)) ? refs[static_cast<int32_t>(b)] : 0;
    if (held != pool_.refcount(static_cast<int32_t>(b))) {
      throw std::logic_error("block " + std::to_string(b) + " has refcount " + std::to_string(pool_.refcount(b)) +
                             " but " + std::to_string(held) + " holders");
    }
  }
  if (running_.size() != by_age_.size()) throw std::logic_error("running lists disagree");
}

}  // namespace fastcodegen
