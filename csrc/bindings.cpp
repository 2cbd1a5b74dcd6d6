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

template <typename T>
T* buffer(py::array& a, const char* name, py::ssize_t min_size) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) || !a.writeable()) {
    throw std::invalid_argument(std::string("bind: ") + name + " must be a writable C-contiguous array of the right dtype");
  }
  if (a.size() < min_size) {
    throw std::invalid_argument(std::string("bind: ") + name + " holds " + std::to_string(a.size()) + " elements, needs " +
                                std::to_string(min_size));
  }
  return static_cast<T*>(a.mutable_data());
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
      .def_readwrite("eos_token_ids", &SchedulerConfig::eos_token_ids);

  py::class_<RequestConfig>(m, "RequestConfig")
      .def(py::init<>())
      .def_readwrite("n", &RequestConfig::n)
      .def_readwrite("max_tokens", &RequestConfig::max_tokens)
      .def_readwrite("ignore_eos", &RequestConfig::ignore_eos)
      .def_readwrite("skip_special_tokens", &RequestConfig::skip_special_tokens)
      .def_readwrite("temperature", &RequestConfig::temperature)
      .def_readwrite("top_p", &RequestConfig::top_p)
      .def_readwrite("top_k", &RequestConfig::top_k)
      .def_readwrite("special", &RequestConfig::special)
      .def_readwrite("watch", &RequestConfig::watch)
      .def_readwrite("stop_token_ids", &RequestConfig::stop_token_ids)
      .def_readwrite("stop_strings", &RequestConfig::stop_strings);

  py::class_<StepInfo>(m, "StepInfo", "The shape of a scheduled step.")
      .def(py::init<>())
      .def_readwrite("num_rows", &StepInfo::num_rows)
      .def_readwrite("num_tokens", &StepInfo::num_tokens)
      .def_readwrite("num_samples", &StepInfo::num_samples)
      .def_readwrite("num_special", &StepInfo::num_special)
      .def_readwrite("num_copies", &StepInfo::num_copies)
      .def_readwrite("max_query_len", &StepInfo::max_query_len)
      .def_readwrite("max_context_len", &StepInfo::max_context_len)
      .def_readwrite("is_decode", &StepInfo::is_decode);

  py::class_<Stats>(m, "SchedulerStats")
      .def_readonly("computed_tokens", &Stats::computed_tokens)
      .def_readonly("prefix_hit_tokens", &Stats::prefix_hit_tokens)
      .def_readonly("preemptions", &Stats::preemptions)
      .def_readonly("block_copies", &Stats::block_copies);

  py::class_<Scheduler>(m, "Scheduler", "Continuous batching over the paged KV cache (see csrc/scheduler.h).")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def(
          "bind",
          [](Scheduler& s, py::array input_ids, py::array positions, py::array slot_mapping, py::array query_start_loc,
             py::array context_lens, py::array block_tables, py::array logits_indices, py::array temperature,
             py::array top_k, py::array top_p, py::array sample_seq, py::array sample_index, py::array sample_request,
             py::array special_rows, py::array copy_src, py::array copy_dst) {
            const auto& c = s.config();
            const py::ssize_t t = c.max_num_batched_tokens, r = c.max_num_seqs, n = c.max_samples;
            StepBuffers b;
            b.input_ids = buffer<int64_t>(input_ids, "input_ids", t);
            b.positions = buffer<int64_t>(positions, "positions", t);
            b.slot_mapping = buffer<int64_t>(slot_mapping, "slot_mapping", t);
            b.query_start_loc = buffer<int32_t>(query_start_loc, "query_start_loc", r + 1);
            b.context_lens = buffer<int32_t>(context_lens, "context_lens", r);
            b.block_tables = buffer<int32_t>(block_tables, "block_tables", r * s.max_blocks_per_seq());
            b.logits_indices = buffer<int64_t>(logits_indices, "logits_indices", n);
            b.temperature = buffer<float>(temperature, "temperature", n);
            b.top_k = buffer<int32_t>(top_k, "top_k", n);
            b.top_p = buffer<float>(top_p, "top_p", n);
            b.sample_seq = buffer<int64_t>(sample_seq, "sample_seq", n);
            b.sample_index = buffer<int32_t>(sample_index, "sample_index", n);
            b.sample_request = buffer<int64_t>(sample_request, "sample_request", n);
            b.special_rows = buffer<int32_t>(special_rows, "special_rows", n);
            b.copy_src = buffer<int64_t>(copy_src, "copy_src", r);
            b.copy_dst = buffer<int64_t>(copy_dst, "copy_dst", r);
            s.bind(b);
          },
          "Where schedule() writes; the arrays must outlive the scheduler's use of them.")
      .def(
          "set_vocabulary",
          [](Scheduler& s, const std::vector<py::bytes>& token_bytes, const std::vector<int32_t>& special_ids) {
            std::vector<std::string> bytes;
            bytes.reserve(token_bytes.size());
            for (const auto& b : token_bytes) bytes.emplace_back(b);
            s.set_vocabulary(std::move(bytes), special_ids);
          },
          py::arg("token_bytes"), py::arg("special_ids"))
      .def("add_request", &Scheduler::add_request, py::arg("prompt"), py::arg("config"))
      .def("abort", &Scheduler::abort, py::arg("request"))
      .def("stop", &Scheduler::stop, py::arg("seq"), py::arg("cut_bytes"))
      .def("remove_request", &Scheduler::remove_request, py::arg("request"))
      .def("schedule", &Scheduler::schedule)
      .def(
          "update",
          [](Scheduler& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast> sampled) {
            std::vector<Scheduler::Event> finished, watched;
            s.update(sampled.data(), static_cast<int32_t>(sampled.size()), finished, watched);
            return py::make_tuple(finished, watched);
          },
          py::arg("sampled"),
          "Apply a step's sampled tokens; returns ([(seq, request)] finished, [(seq, request)] watched with new text).")
      .def(
          "output_tokens",
          [](const Scheduler& s, int64_t id) {
            const Sequence& q = s.seq(id);
            return std::vector<int32_t>(q.tokens.begin() + q.num_prompt, q.tokens.end());
          },
          py::arg("seq"))
      .def(
          "text", [](const Scheduler& s, int64_t id, size_t start, int64_t end) {
            const std::string& t = s.seq(id).text;
            const size_t e = end < 0 ? t.size() : std::min<size_t>(static_cast<size_t>(end), t.size());
            return py::bytes(start < e ? t.substr(start, e - start) : std::string());
          },
          py::arg("seq"), py::arg("start") = 0, py::arg("end") = -1, "A sequence's text bytes [start, end).")
      .def("text_len", [](const Scheduler& s, int64_t id) { return s.seq(id).text.size(); }, py::arg("seq"))
      .def("stable_text_len", &Scheduler::stable_text_len, py::arg("seq"))
      .def(
          "seq_info",
          [](const Scheduler& s, int64_t id) {
            const Sequence& q = s.seq(id);
            return py::dict(py::arg("request") = q.req->id, py::arg("index") = q.index, py::arg("finish") = q.finish,
                            py::arg("stop_string") = q.stop_string, py::arg("stop_token") = q.stop_token,
                            py::arg("num_prompt") = q.num_prompt, py::arg("num_tokens") = q.num_tokens(),
                            py::arg("num_computed") = q.num_computed, py::arg("running") = q.running,
                            py::arg("waiting") = q.waiting, py::arg("blocks") = q.blocks,
                            py::arg("copy_src") = q.copy_src);
          },
          py::arg("seq"))
      .def(
          "request_seqs",
          [](const Scheduler& s, int64_t id) {
            std::vector<int64_t> out;
            for (const Sequence* q : s.request(id).seqs) out.push_back(q->id);
            return out;
          },
          py::arg("request"))
      .def("request_num_finished", [](const Scheduler& s, int64_t id) { return s.request(id).num_finished; }, py::arg("request"))
      .def_property_readonly("stats", &Scheduler::stats)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("max_blocks_per_seq", &Scheduler::max_blocks_per_seq)
      .def_property_readonly("pool", py::overload_cast<>(&Scheduler::pool, py::const_), py::return_value_policy::reference_internal)
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("check", &Scheduler::check, "Raise if sequences and block references disagree.");
}
