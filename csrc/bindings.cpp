// Python bindings of the native runtime: `fastcodegen._C`.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "block_pool.h"
#include "scheduler.h"
#include "utf8.h"

namespace py = pybind11;
using namespace fastcodegen;

namespace {

py::tuple hash_tuple(const BlockHash& h) { return py::make_tuple(h.a, h.b); }
BlockHash tuple_hash(const py::tuple& t) { return {t[0].cast<uint64_t>(), t[1].cast<uint64_t>()}; }

// The scheduler as Python holds it: with the arrays it writes, so that they
// live as long as it may write them.
struct BoundScheduler : Scheduler {
  using Scheduler::Scheduler;
  py::tuple buffers;
};

// The array bound to step field f, checked against the table and this scheduler's limits.
template <typename T>
T* field_buffer(const py::dict& buffers, const Scheduler& s, const StepField& f, py::list& keep) {
  const std::string name = f.name;
  if (!buffers.contains(f.name)) throw std::invalid_argument("bind: no array for step field " + name);
  py::handle obj = buffers[f.name];
  if (!py::isinstance<py::array>(obj)) throw std::invalid_argument("bind: " + name + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<T>>(a)) {
    const std::string got = py::str(a.dtype());
    throw std::invalid_argument("bind: " + name + " must have dtype " + f.dtype + ", got " + got);
  }
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument("bind: " + name + " must be C-contiguous");
  if (!a.writeable()) throw std::invalid_argument("bind: " + name + " must be writable");
  py::ssize_t capacity = 1;
  for (int64_t d : s.field_shape(f)) capacity *= d;
  if (a.size() < capacity) {
    throw std::invalid_argument("bind: " + name + " holds " + std::to_string(a.size()) + " elements, needs " +
                                std::to_string(capacity));
  }
  keep.append(a);
  return static_cast<T*>(a.mutable_data());
}

// Binds every field of FASTCODEGEN_STEP_FIELDS by name; nothing changes unless all are right.
void bind_by_name(BoundScheduler& s, const py::dict& buffers) {
  for (const auto& item : buffers) {
    const std::string key = py::str(item.first);
    bool known = false;
    for (const StepField& f : kStepFields) known = known || key == f.name;
    if (!known) throw std::invalid_argument("bind: no step field named " + key);
  }
  StepBuffers b;
  py::list keep;
  size_t i = 0;
#define FASTCODEGEN_BIND_FIELD(name, ctype, dtype, capacity, count, extra, on_device) \
  b.name = field_buffer<ctype>(buffers, s, kStepFields[i++], keep);
  FASTCODEGEN_STEP_FIELDS(FASTCODEGEN_BIND_FIELD)
#undef FASTCODEGEN_BIND_FIELD
  s.bind(b);
  s.buffers = py::tuple(keep);
}

py::list step_fields(const BoundScheduler& s) {
  py::list out;
  for (const StepField& f : kStepFields) {
    const std::vector<int64_t> shape = s.field_shape(f);
    out.append(py::make_tuple(f.name, f.dtype, py::tuple(py::cast(shape)), f.count, f.extra, f.on_device));
  }
  return out;
}

// update()'s events as (seq, request, index, row, finish, new_bytes) tuples.
py::list update(BoundScheduler& s, const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sampled,
                const py::object& finite) {
  using Bools = py::array_t<bool, py::array::c_style | py::array::forcecast>;
  Bools ok = finite.is_none() ? py::reinterpret_steal<Bools>(py::handle()) : Bools::ensure(finite);  // none: all finite
  if (!finite.is_none()) {
    if (!ok) throw std::invalid_argument("update: finite must be an array of bools");
    if (ok.size() != sampled.size()) {
      throw std::invalid_argument("update: finite has " + std::to_string(ok.size()) + " entries for " +
                                  std::to_string(sampled.size()) + " sampled tokens");
    }
  }
  const auto* ok_data = ok ? reinterpret_cast<const uint8_t*>(ok.data()) : nullptr;
  const Events& ev = s.update(sampled.data(), ok_data, static_cast<int32_t>(sampled.size()));
  py::list out(ev.events.size());
  for (size_t i = 0; i < ev.events.size(); ++i) {
    const Event& e = ev.events[i];
    const py::bytes text(ev.bytes.data() + e.begin, e.end - e.begin);
    out[i] = py::make_tuple(e.seq, e.request, e.index, e.row, e.finish, text);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcodegen native runtime: KV block pool with prefix cache, scheduler, incremental UTF-8 decoding";

  py::class_<BlockPool>(m, "BlockPool", "Paged-KV cache blocks: reference counts, free list, prefix cache.")
      .def(py::init<int64_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size") = 16)
      .def("allocate", &BlockPool::allocate, "Take one block (reference count 1).")
      .def("allocate_many", &BlockPool::allocate_many, py::arg("n"), "Take n blocks, all or nothing.")
      .def("incref", &BlockPool::incref, py::arg("block"))
      .def("decref", &BlockPool::decref, py::arg("block"), "Drop a holder; True when the block stopped being held.")
      .def("release", &BlockPool::release, py::arg("blocks"), "Drop one holder of each block of a block table.")
      .def("refcount", &BlockPool::refcount, py::arg("block"))
      .def("is_cached", &BlockPool::is_cached, py::arg("block"))
      .def(
          "lookup",
          [](BlockPool& p, const py::tuple& parent, const py::tuple& hash, const std::vector<int32_t>& tokens) {
            if (static_cast<int32_t>(tokens.size()) != p.block_size()) throw std::invalid_argument("lookup: one block of tokens");
            return p.lookup(tuple_hash(parent), tuple_hash(hash), tokens.data());
          },
          py::arg("parent"), py::arg("hash"), py::arg("tokens"))
      .def(
          "publish",
          [](BlockPool& p, int32_t block, const py::tuple& parent, const py::tuple& hash, const std::vector<int32_t>& tokens) {
            if (static_cast<int32_t>(tokens.size()) != p.block_size()) throw std::invalid_argument("publish: one block of tokens");
            p.publish(block, tuple_hash(parent), tuple_hash(hash), tokens.data());
          },
          py::arg("block"), py::arg("parent"), py::arg("hash"), py::arg("tokens"))
      .def("clear_cache", &BlockPool::clear_cache)
      .def("check", &BlockPool::check, "Raise if the free, evictable and held blocks do not partition the pool.")
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def_property_readonly("num_evictable", &BlockPool::num_evictable)
      .def_property_readonly("num_cached", &BlockPool::num_cached)
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("block_size", &BlockPool::block_size);

  m.def(
      "chain_hash",
      [](const py::tuple& parent, const std::vector<int32_t>& tokens) {
        return hash_tuple(chain(tuple_hash(parent), tokens.data(), static_cast<int32_t>(tokens.size())));
      },
      py::arg("parent"), py::arg("tokens"), "The prefix-cache hash of a block of tokens after a parent hash ((0, 0): none).");

  py::class_<Utf8Decoder>(m, "Utf8Decoder", "Incremental UTF-8 decoding with U+FFFD for invalid bytes.")
      .def(py::init<>())
      .def(
          "decode",
          [](Utf8Decoder& d, const py::bytes& data, bool final) {
            std::string in = data, out;
            d.decode(in.data(), in.size(), out, final);
            return py::bytes(out);
          },
          py::arg("data"), py::arg("final") = false);

  py::dict reasons;
#define FASTCODEGEN_FINISH_NAME(name, value, text) reasons[py::int_(static_cast<int>(name))] = text;
  FASTCODEGEN_FINISH_REASONS(FASTCODEGEN_FINISH_NAME)
#undef FASTCODEGEN_FINISH_NAME
  m.attr("FINISH_REASONS") = reasons;  // finish code -> the finish_reason Python reports
  m.attr("DRAFT_PENDING") = kDraftPending;  // spec_token of a proposal row a draft model has yet to fill
  m.attr("NOT_FINISHED") = static_cast<int>(kNotFinished);
  m.def("default_max_samples", &default_max_samples, py::arg("max_num_seqs"),
        "Sampled rows of a step when SchedulerConfig.max_samples is 0 (the engine's setting).");

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init<>())
      .def_readwrite("num_blocks", &SchedulerConfig::num_blocks)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readwrite("max_model_len", &SchedulerConfig::max_model_len)
      .def_readwrite("max_samples", &SchedulerConfig::max_samples)
      .def_readwrite("watermark_blocks", &SchedulerConfig::watermark_blocks)
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readwrite("eos_token_ids", &SchedulerConfig::eos_token_ids)
      .def_readwrite("num_speculative_tokens", &SchedulerConfig::num_speculative_tokens)
      .def_readwrite("ngram_min", &SchedulerConfig::ngram_min)
      .def_readwrite("ngram_max", &SchedulerConfig::ngram_max)
      .def_readwrite("speculative_max_rows", &SchedulerConfig::speculative_max_rows)
      .def_readwrite("draft_proposals", &SchedulerConfig::draft_proposals);

  py::class_<RequestConfig>(m, "RequestConfig")
      .def(py::init<>())
      .def_readwrite("n", &RequestConfig::n)
      .def_readwrite("max_tokens", &RequestConfig::max_tokens)
      .def_readwrite("ignore_eos", &RequestConfig::ignore_eos)
      .def_readwrite("skip_special_tokens", &RequestConfig::skip_special_tokens)
      .def_readwrite("temperature", &RequestConfig::temperature)
      .def_readwrite("top_p", &RequestConfig::top_p)
      .def_readwrite("top_k", &RequestConfig::top_k)
      .def_readwrite("host_sampled", &RequestConfig::host_sampled)
      .def_readwrite("report_tokens", &RequestConfig::report_tokens)
      .def_readwrite("prompt_logprobs", &RequestConfig::prompt_logprobs)
      .def_readwrite("speculate", &RequestConfig::speculate)
      .def_readwrite("stop_token_ids", &RequestConfig::stop_token_ids)
      .def_readwrite("stop_strings", &RequestConfig::stop_strings);

  py::class_<StepInfo>(m, "StepInfo", "The shape of a scheduled step.")
      .def(py::init<>())
      .def_readwrite("num_rows", &StepInfo::num_rows)
      .def_readwrite("num_tokens", &StepInfo::num_tokens)
      .def_readwrite("num_samples", &StepInfo::num_samples)
      .def_readwrite("num_host_sampled", &StepInfo::num_host_sampled)
      .def_readwrite("num_prompt_logits", &StepInfo::num_prompt_logits)
      .def_readwrite("num_copies", &StepInfo::num_copies)
      .def_readwrite("max_query_len", &StepInfo::max_query_len)
      .def_readwrite("max_context_len", &StepInfo::max_context_len)
      .def_readwrite("is_decode", &StepInfo::is_decode)
      .def(
          "as_dict",
          [](const StepInfo& i) {
            return py::dict(py::arg("num_rows") = i.num_rows, py::arg("num_tokens") = i.num_tokens,
                            py::arg("num_samples") = i.num_samples, py::arg("num_host_sampled") = i.num_host_sampled,
                            py::arg("num_prompt_logits") = i.num_prompt_logits,
                            py::arg("num_copies") = i.num_copies, py::arg("max_query_len") = i.max_query_len,
                            py::arg("max_context_len") = i.max_context_len, py::arg("is_decode") = i.is_decode);
          },
          "Every field by name, in one call (a step reads them all).");

  py::class_<Stats>(m, "SchedulerStats")
      .def_readonly("computed_tokens", &Stats::computed_tokens)
      .def_readonly("prefix_hit_tokens", &Stats::prefix_hit_tokens)
      .def_readonly("preemptions", &Stats::preemptions)
      .def_readonly("block_copies", &Stats::block_copies)
      .def_readonly("spec_runs", &Stats::spec_runs)
      .def_readonly("spec_proposed", &Stats::spec_proposed)
      .def_readonly("spec_accepted", &Stats::spec_accepted);

  py::class_<BoundScheduler>(m, "Scheduler", "Continuous batching over the paged KV cache (see csrc/scheduler.h).")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def("step_fields", &step_fields,
           "The step buffers schedule() writes, in table order: (name, dtype, shape, count, extra, on_device); "
           "shape is the capacity under this scheduler's limits, a step uses its first StepInfo.<count> + extra rows.")
      .def("bind", &bind_by_name, py::arg("buffers"),
           "Where schedule() writes: {field name: numpy array} for every field of step_fields(); the scheduler keeps "
           "the arrays alive.")
      .def(
          "set_vocabulary",
          [](BoundScheduler& s, const std::vector<py::bytes>& token_bytes, const std::vector<int32_t>& special_ids) {
            std::vector<std::string> bytes;
            bytes.reserve(token_bytes.size());
            for (const auto& b : token_bytes) bytes.emplace_back(b);
            s.set_vocabulary(std::move(bytes), special_ids);
          },
          py::arg("token_bytes"), py::arg("special_ids"))
      .def("add_request", &Scheduler::add_request, py::arg("prompt"), py::arg("config"))
      .def("abort", &Scheduler::abort, py::arg("request"))
      .def("stop", &Scheduler::stop, py::arg("seq"), "End a sequence with finish reason stop (a stop pattern matched).")
      .def("remove_request", &Scheduler::remove_request, py::arg("request"))
      .def("schedule", &Scheduler::schedule)
      .def("update", &update, py::arg("sampled"), py::arg("finite") = py::none(),
           "Apply a step's sampled tokens (and which rows had finite logits; None: all). Returns the events, in row "
           "order: (seq, request, index, row, finish, new_bytes) for each sequence that finished and each token of a "
           "request with report_tokens; row -1: a sibling ended with its request.")
      .def(
          "output_tokens",
          [](const BoundScheduler& s, int64_t id) {
            const Sequence& q = s.seq(id);
            return std::vector<int32_t>(q.tokens.begin() + q.num_prompt, q.tokens.end());
          },
          py::arg("seq"))
      .def(
          "text", [](const BoundScheduler& s, int64_t id, size_t start, int64_t end) {
            const std::string& t = s.seq(id).text;
            const size_t e = end < 0 ? t.size() : std::min<size_t>(static_cast<size_t>(end), t.size());
            return py::bytes(start < e ? t.substr(start, e - start) : std::string());
          },
          py::arg("seq"), py::arg("start") = 0, py::arg("end") = -1, "A sequence's text bytes [start, end).")
      .def("stable_text_len", &Scheduler::stable_text_len, py::arg("seq"),
           "Length of a sequence's text that no later token can take back.")
      .def(
          "seq_info",
          [](const BoundScheduler& s, int64_t id) {
            const Sequence& q = s.seq(id);
            return py::dict(py::arg("request") = q.req->id, py::arg("index") = q.index, py::arg("finish") = q.finish,
                            py::arg("stop_string") = q.stop_string, py::arg("stop_token") = q.stop_token,
                            py::arg("num_prompt") = q.num_prompt, py::arg("num_tokens") = q.num_tokens(),
                            py::arg("num_computed") = q.num_computed, py::arg("running") = q.running,
                            py::arg("waiting") = q.waiting, py::arg("blocks") = q.blocks,
                            py::arg("copy_src") = q.copy_src, py::arg("reported") = q.reported,
                            py::arg("prompt_scored") = q.prompt_scored);
          },
          py::arg("seq"))
      .def(
          "request_seqs",
          [](const BoundScheduler& s, int64_t id) {
            std::vector<int64_t> out;
            for (const Sequence* q : s.request(id).seqs) out.push_back(q->id);
            return out;
          },
          py::arg("request"))
      .def("request_num_finished", [](const BoundScheduler& s, int64_t id) { return s.request(id).num_finished; }, py::arg("request"))
      .def_property_readonly(
          "config", [](const BoundScheduler& s) { return s.config(); }, "The configuration, max_samples resolved.")
      .def_property_readonly("stats", &Scheduler::stats)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("max_blocks_per_seq", &Scheduler::max_blocks_per_seq)
      .def_property_readonly("pool", py::overload_cast<>(&Scheduler::pool, py::const_), py::return_value_policy::reference_internal)
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("check", &Scheduler::check, "Raise if sequences and block references disagree.");
}
