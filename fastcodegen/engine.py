"""Engine: load a CodeGen model and serve completions.

The engine loop: the native scheduler picks a step's tokens (continuous
batching, chunked prefill, prefix cache, n-sample forks, preemption), the
model runner computes their logits (a CUDA graph for decode steps on CUDA),
the sampler draws tokens, and the scheduler appends them, checks stops and
frees what finished. Python does O(1) work per step plus O(events): a
sequence that finished, a seeded or logprobs row, a watched request's text.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Union
from typing import Sequence as Seq

import numpy as np
import torch

from . import hub, registry
from .config import EngineConfig, ModelConfig, parse_device, parse_dtype, read_checkpoint_config
from .cuda_graphs import default_buckets
from .integrity import verify_converted
from .model_runner import ModelRunner
from .outputs import CompletionOutput, GenerationError, RequestOutput
from .request import RequestState
from .sampler import Sampler, sampling_inputs
from .sampling_params import SamplingParams, as_float, as_int, check_utf8
from .scheduler import FINISH_REASONS, Scheduler
from .stopping import PatternStops
from .tokenizer import Tokenizer
from .weights import dummy_weights, is_converted, load_weights, read_converted_config

logger = logging.getLogger("fastcodegen")


class Engine:
    """A CodeGen model ready to generate.

    Example:
        >>> from fastcodegen import Engine, SamplingParams
        >>> engine = Engine("codegen-350M-mono")
        >>> out = engine.generate(["def fib(n):"], SamplingParams(max_tokens=64, temperature=0.2, top_p=0.95))
        >>> print(out[0].outputs[0].text)

    Args:
        model: an official name (`codegen-350M-mono` ... `codegen-16B-nl`, with
            or without `Salesforce/`), a Hugging Face repo id, or the path of a
            checkpoint directory (a transformers one, or one written by
            `fastcodegen convert`). Names are found in the local Hugging Face
            cache (HF_HUB_CACHE / HF_HOME) or downloaded; a transformers
            checkpoint is converted once into `cache_dir`.
        device: "cuda", "cpu", or "auto" (CUDA when available).
        dtype: "float16", "bfloat16", "float32", or "auto" (float16 on CUDA,
            float32 on the CPU).
        backend: "triton" (the Triton kernels; CUDA, or the CPU under
            TRITON_INTERPRET=1), "torch" (plain PyTorch, any device), or
            "auto": triton on CUDA when Triton is installed, else torch.
        load_format: "auto" (the checkpoint's weights) or "dummy" (seeded
            random weights at the model's real shapes: benchmarks without a
            download).
        revision: the Hugging Face revision to use (a branch, tag or commit).
        download: whether a model missing from the cache may be downloaded
            (also off when HF_HUB_OFFLINE is set).
        cache_dir: where converted checkpoints are kept (default
            FASTCODEGEN_CACHE, else ~/.cache/fastcodegen).
        tokenizer: a directory to load the tokenizer from instead of the
            checkpoint's.
        seed: seed of the draws of requests that set no seed of their own
            (None: a random one).
        max_model_len: the longest sequence (prompt plus completion), at most
            the model's n_positions (its default).
        block_size: tokens per KV cache block.
        kv_cache_tokens: KV cache capacity in tokens (default: sized from free
            GPU memory on CUDA, 4 full-length sequences on the CPU).
        gpu_memory_utilization: fraction of the GPU's memory the engine may
            use in all (weights, KV cache, working memory).
        max_num_seqs: most sequences running at once (rows of a step).
        max_num_batched_tokens: most tokens in one step; longer prompts are
            prefilled in chunks while running sequences keep decoding.
        enable_prefix_caching: reuse the KV cache of prompt prefixes computed
            before (full blocks).
        enforce_eager: never use CUDA graphs.
        progress: show progress bars (conversion, loading, generation of many
            prompts).
    """

    def __init__(
        self,
        model: str,
        *,
        device: "str | torch.device" = "auto",
        dtype: "str | torch.dtype" = "auto",
        backend: str = "auto",
        load_format: str = "auto",
        revision: Optional[str] = None,
        download: bool = True,
        cache_dir: Optional[str] = None,
        tokenizer: Optional[str] = None,
        seed: Optional[int] = 0,
        max_model_len: Optional[int] = None,
        block_size: int = 16,
        kv_cache_tokens: Optional[int] = None,
        gpu_memory_utilization: float = 0.90,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        progress: bool = True,
    ):
        dev = parse_device(device)
        dt = parse_dtype(dtype, dev)
        backend = _resolve_backend(backend, dev, dt)
        max_model_len, block_size, kv_cache_tokens, max_num_seqs, max_num_batched_tokens, seed = (
            _int_option(name, value)
            for name, value in (
                ("max_model_len", max_model_len),
                ("block_size", block_size),
                ("kv_cache_tokens", kv_cache_tokens),
                ("max_num_seqs", max_num_seqs),
                ("max_num_batched_tokens", max_num_batched_tokens),
                ("seed", seed),
            )
        )
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        utilization = as_float(gpu_memory_utilization)
        if utilization is None:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {gpu_memory_utilization!r}")
        gpu_memory_utilization = utilization
        self.progress = progress
        model_config, source = self._load_config(model, load_format, revision, download, cache_dir, dt)
        if max_model_len is None:
            max_model_len = model_config.n_positions
        if not isinstance(max_model_len, int) or not 0 < max_model_len <= model_config.n_positions:
            raise ValueError(
                f"max_model_len must be in [1, n_positions={model_config.n_positions}], got {max_model_len!r}"
            )
        if seed is None:
            seed = int.from_bytes(os.urandom(7), "little")
        self.config = EngineConfig(
            model=model,
            device=dev,
            dtype=dt,
            backend=backend,
            load_format=load_format,
            revision=revision,
            download=download,
            cache_dir=cache_dir,
            seed=seed,
            max_model_len=max_model_len,
            block_size=block_size,
            kv_cache_tokens=kv_cache_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
        )
        self.model_config = model_config
        self.tokenizer = self._load_tokenizer(tokenizer, source, model)

        if load_format == "dummy":
            weights = dummy_weights(model_config, dev, dt, seed=seed)
        else:
            verify_converted(source, progress=progress)  # a damaged file: a ValueError naming it
            weights = load_weights(source, model_config, dev, dt, progress=progress)
        self._runner = ModelRunner(model_config, self.config, weights)
        kv = self._runner.kv_cache
        logger.info("KV cache: %d blocks of %d tokens: %d tokens fit", kv.num_blocks, kv.block_size, kv.num_tokens)
        self._scheduler = Scheduler(self.config, kv.num_blocks, model_config.eos_token_ids)
        if self.tokenizer is not None:
            self._scheduler.set_vocabulary(self.tokenizer)
        if self.config.uses_cuda_graphs:
            self._runner.capture_cuda_graphs(self._scheduler, default_buckets(max_num_seqs))
        self._generator = torch.Generator(device=dev)
        self._generator.manual_seed(seed)
        self.vocab_limit = self.tokenizer.vocab_limit if self.tokenizer else model_config.vocab_size
        self._sampler = Sampler(min(self.vocab_limit, model_config.vocab_size), self._generator)
        self._requests: dict[int, RequestState] = {}  # by the scheduler's id
        self._by_user_id: dict[str, int] = {}
        self._news: set[int] = set()  # requests of add_request() with news step() has not reported
        self._request_ids = itertools.count()
        self._closed = False

    # ------------------------------------------------------------------ loading

    def _load_config(
        self,
        model: str,
        load_format: str,
        revision: Optional[str],
        download: bool,
        cache_dir: Optional[str],
        dtype: torch.dtype,
    ) -> tuple[ModelConfig, Optional[Path]]:
        """The model config and the converted checkpoint directory (None for dummy weights)."""
        # Imported here, not at the top: `python -m fastcodegen.convert` must find
        # the module unimported when the package initialises.
        from .convert import ensure_converted

        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        if load_format == "dummy":
            name = registry.official_name(model)
            if name is not None:
                return registry.MODELS[name], None
            path = registry.bundled_path(model) or Path(model).expanduser()
            if is_converted(path):
                return read_converted_config(path)[0], None
            if (path / "config.json").is_file():
                return read_checkpoint_config(path)[1], None
            raise ValueError(
                f"load_format='dummy' needs an official model name or a checkpoint directory with a config, got {model!r}"
            )
        path = hub.locate(model, revision=revision, download=download)
        if not is_converted(path):
            path = ensure_converted(path, dtype, Path(cache_dir) if cache_dir else None, progress=self.progress)
        return read_converted_config(path)[0], path

    def _load_tokenizer(self, tokenizer: Optional[str], source: Optional[Path], model: str) -> Optional[Tokenizer]:
        if tokenizer is not None:
            return Tokenizer.from_dir(tokenizer)
        candidates = [source] if source is not None else []
        local = Path(model).expanduser()
        if local.is_dir():
            candidates.append(local)
        shipped = registry.bundled_tokenizer(model)  # an official name: CodeGen's tokenizer, shipped
        if shipped is not None:
            candidates.append(shipped)
        for path in candidates:
            try:
                return Tokenizer.from_dir(path)
            except FileNotFoundError:
                continue
        logger.warning("no tokenizer found for %s: prompts must be token ids and outputs have no text", model)
        return None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Frees the engine's memory (weights, KV cache, CUDA graphs); the engine cannot be used afterwards.

        Requests still running are aborted. On CUDA the memory goes back to
        the device (`torch.cuda.empty_cache`), so another engine can take it.
        Calling it again does nothing. `with Engine(...) as engine:` closes
        the engine at the end of the block.
        """
        if self._closed:
            return
        self._closed = True
        self._requests.clear()
        self._by_user_id.clear()
        self._news.clear()
        self._runner.close()
        self._runner = None
        self._scheduler = None
        self._sampler = None
        gc.collect()
        if self.config.device.type == "cuda":
            torch.cuda.synchronize(self.config.device)
            torch.cuda.empty_cache()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed (Engine.close() was called); create a new one")

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: Optional[str] = None,
        sampling_params: Optional[SamplingParams] = None,
        *,
        prompt_token_ids: Optional[Seq[int]] = None,
        request_id: Optional[str] = None,
    ) -> str:
        """Queues a request; `step()` advances it with everything else that runs. Returns its id.

        Raises ValueError on a bad prompt or parameters (see `generate`); the
        engine is unchanged then.
        """
        self._check_open()
        if request_id is not None and (not isinstance(request_id, str) or request_id in self._by_user_id):
            raise ValueError(f"request_id must be a new string, got {request_id!r}")
        [(text, ids, params)] = self._validate(
            prompt, None if prompt_token_ids is None else [prompt_token_ids], sampling_params
        )
        return self._add(text, ids, params, watch=True, request_id=request_id, served=True).request_id

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests added with `add_request` that advanced.

        A request's text so far, and once more with `finished=True` when it
        ends. Progress made meanwhile by `generate` calls is reported too.
        """
        self._check_open()
        if self._scheduler.core.has_unfinished():
            self._step()
        outs = []
        for core_id in sorted(self._news):
            req = self._requests[core_id]
            outs.append(self._output(req))
            if req.finished:
                self._forget(req)
        self._news.clear()
        return outs

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV cache; unknown or finished ids are ignored."""
        self._check_open()
        core_id = self._by_user_id.get(request_id)
        if core_id is not None:
            self._abort(self._requests[core_id])
            self._forget(self._requests[core_id])

    def has_unfinished_requests(self) -> bool:
        """Whether any request (of add_request or a generate call under way) is still running or waiting."""
        return not self._closed and self._scheduler.core.has_unfinished()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Union[str, Seq[str], None] = None,
        sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
        prompt_token_ids: Union[Seq[int], Seq[Seq[int]], None] = None,
        use_tqdm: bool = True,
        stream: bool = False,
    ) -> Union[list[RequestOutput], Iterator[RequestOutput]]:
        """Completes prompts, returning one RequestOutput per prompt, in order.

        Args:
            prompts: a prompt or a list of prompts (text).
            sampling_params: one SamplingParams for all prompts, or one per
                prompt (default: SamplingParams()).
            prompt_token_ids: prompts as token ids instead of text (a list of
                ids, or a list of such lists).
            use_tqdm: show a progress bar when there are several prompts.
            stream: instead of a list, return an iterator that yields a
                request's RequestOutput each time its text grows, with its
                text so far (less any characters a stop string or pattern may
                still remove); the last one yielded for a request has
                `finished=True`.

        Raises:
            ValueError: a prompt is empty, does not fit the context, or holds
                an id outside the vocabulary; or a parameter is invalid. The
                engine is unchanged and stays usable.
            GenerationError: some requests failed (the model produced NaN or
                infinite logits for them); the others ran to the end, and
                every output is in the error's `outputs`. When streaming, it is
                raised after the last output. The engine stays usable.
        """
        self._check_open()
        validated = self._validate(prompts, prompt_token_ids, sampling_params)
        if stream:
            return self._stream(validated)
        from tqdm.auto import tqdm

        requests = [self._add(t, ids, p, watch=False) for t, ids, p in validated]
        show = use_tqdm and self.progress and len(requests) > 1
        try:
            with tqdm(total=len(requests), desc="generating", unit="prompt", disable=not show) as bar:
                for req in self._run(requests):
                    if req.finished:
                        bar.update(1)
            outputs = [self._output(r) for r in requests]
        finally:
            self._settle(requests)
        _raise_for_errors(outputs)
        return outputs

    def _stream(self, validated: list) -> Iterator[RequestOutput]:
        requests = [self._add(t, ids, p, watch=True) for t, ids, p in validated]
        last: dict[int, RequestOutput] = {}
        try:
            for req in self._run(requests):
                last[req.core_id] = out = self._output(req)
                yield out
        finally:
            self._settle(requests)
        _raise_for_errors([last[r.core_id] for r in requests if r.core_id in last])

    def _run(self, requests: list[RequestState]) -> Iterator[RequestState]:
        """Runs steps until every request of `requests` is finished, yielding each one a step advanced."""
        ours = {r.core_id for r in requests}
        pending = set(ours)
        while pending:
            for core_id in self._step():
                if core_id in ours:
                    req = self._requests[core_id]
                    if req.finished:
                        pending.discard(core_id)
                    yield req

    def _settle(self, requests: list[RequestState]) -> None:
        """After a generate call, however it ended: abort what is left, forget everything."""
        for req in requests:
            if not req.finished:
                self._abort(req)
            self._forget(req)

    def _validate(
        self, prompts, prompt_token_ids, sampling_params
    ) -> list[tuple[Optional[str], list[int], SamplingParams]]:
        """Checks every input; (text, token ids, params) per prompt. Changes no engine state."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be a string or a list of strings")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompt_token_ids instead of text prompts")
            for i, p in enumerate(prompts):
                check_utf8(f"prompt {i}", p)
            texts: list[Optional[str]] = list(prompts)
            id_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            id_lists = _prompt_id_lists(prompt_token_ids)
            texts = [None] * len(id_lists)
        if not id_lists:
            raise ValueError("no prompts given")

        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(id_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(id_lists) or not all(isinstance(p, SamplingParams) for p in params):
                raise ValueError(
                    f"sampling_params must be one SamplingParams or a list of {len(id_lists)} (one per prompt)"
                )

        limit = self.config.max_model_len
        for i, (ids, p) in enumerate(zip(id_lists, params)):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            bad = next((t for t in ids if not 0 <= t < self.vocab_limit), None)
            if bad is not None:
                raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {self.vocab_limit})")
            if len(ids) >= limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; the context holds {limit} (max_model_len), "
                    "which leaves no room to generate. Shorten the prompt."
                )
            bad = next((t for t in p.stop_token_ids if t >= self.model_config.vocab_size), None)
            if bad is not None:
                raise ValueError(f"stop_token_ids: {bad} is outside the vocabulary [0, {self.model_config.vocab_size})")
            if self.tokenizer is None and (p.stop or p.stop_patterns):
                raise ValueError("stop strings and stop_patterns need a tokenizer, and this engine has none")
            if p.n > self.config.max_num_seqs:
                raise ValueError(
                    f"n={p.n} is more than max_num_seqs={self.config.max_num_seqs} sequences can run at once"
                )
        return list(zip(texts, id_lists, params))

    def _add(
        self,
        text: Optional[str],
        ids: list[int],
        params: SamplingParams,
        watch: bool,
        request_id: Optional[str] = None,
        served: bool = False,
    ) -> RequestState:
        patterns = PatternStops(params.stop_patterns) if params.stop_patterns else None
        core_id = self._scheduler.add(ids, params, watch=watch or patterns is not None)
        while request_id is None or request_id in self._by_user_id:  # never a live request's id
            request_id = str(next(self._request_ids))
        req = RequestState(
            request_id=request_id,
            core_id=core_id,
            prompt=text,
            prompt_token_ids=ids,
            params=params,
            patterns=patterns,
            watch=watch or patterns is not None,
            served=served,
        )
        self._requests[core_id] = req
        self._by_user_id[req.request_id] = core_id
        return req

    def _abort(self, req: RequestState) -> None:
        if not req.finished:
            self._scheduler.core.abort(req.core_id)
            req.finished = req.aborted = True

    def _forget(self, req: RequestState) -> None:
        self._news.discard(req.core_id)
        self._scheduler.core.remove_request(req.core_id)
        self._requests.pop(req.core_id, None)
        self._by_user_id.pop(req.request_id, None)

    # ------------------------------------------------------------------ one step

    def _step(self) -> set[int]:
        """Runs one step; the scheduler ids of the requests with news (finished, or watched text grew)."""
        sched = self._scheduler
        step = sched.schedule()
        if step.info.num_tokens == 0:
            raise RuntimeError("the scheduler could not schedule any token")
        logits = self._runner.execute(step)
        generators, logprobs = {}, {}
        for row in step.special_rows.tolist():
            req = self._requests[int(step.sample_request[row])]
            if req.params.seed is not None:
                generators[row] = req.generator(int(step.sample_index[row]), self.config.device)
            if req.params.logprobs is not None:
                logprobs[row] = req.params.logprobs
        inputs = sampling_inputs(step.temperature, step.top_k, step.top_p, self.config.device, generators, logprobs)
        sampled = self._sampler(logits, inputs)
        failed = self._fail_non_finite(step, sampled.finite)
        finished, watched = sched.update(sampled.tokens)

        for row, lp in sampled.logprobs.items():
            seq = sched.sampled_seq(row)
            if seq >= 0:
                self._requests[int(step.sample_request[row])].logprobs.setdefault(seq, []).append(lp)
        news = set(failed)
        for seq, core_id in watched:
            req = self._requests[core_id]
            seen = req.text_bytes.get(seq, 0)
            chunk = sched.text(seq, seen)
            req.text_bytes[seq] = seen + len(chunk)
            req.texts[seq] = req.texts.get(seq, "") + chunk.decode()
            news.add(core_id)
            hit = req.patterns.search(req.texts[seq]) if req.patterns else None
            if hit is not None:
                cut, pattern = hit
                sched.core.stop(seq, len(req.texts[seq][:cut].encode()))
                req.pattern_stops[seq] = pattern
                finished.append((seq, core_id))
        for _, core_id in finished:
            req = self._requests[core_id]
            news.add(core_id)
            if sched.core.request_num_finished(core_id) == req.params.n:
                req.finished = True
        self._news.update(c for c in news if self._requests[c].served)
        return news

    def _fail_non_finite(self, step, finite: np.ndarray) -> set[int]:
        """Ends the requests whose logits held a NaN or an infinity this step; their scheduler ids.

        Runs between schedule() and update(): update() then skips their rows,
        so no meaningless token is appended; the other requests go on.
        """
        failed: set[int] = set()
        if finite.all():
            return failed
        for row in np.flatnonzero(~finite).tolist():
            core_id = int(step.sample_request[row])
            req = self._requests.get(core_id)
            if core_id in failed or req is None or req.finished:
                continue
            failed.add(core_id)
            self._scheduler.core.abort(core_id)
            req.finished = req.aborted = True
            req.error = (
                f"request {req.request_id}: the model produced non-finite logits (NaN or infinity), so no token "
                "could be drawn; its completions were stopped. Check the weights (a damaged or overflowing "
                "checkpoint) and the dtype (float16 overflows where bfloat16 does not)"
            )
            logger.error(req.error)
        return failed

    # ------------------------------------------------------------------ outputs

    def _output(self, req: RequestState) -> RequestOutput:
        core = self._scheduler.core
        completions = []
        for seq in core.request_seqs(req.core_id):
            info = core.seq_info(seq)
            done = info["finish"] != 0
            text = self._scheduler.text(seq).decode()
            reason = FINISH_REASONS.get(info["finish"]) if done else None
            if req.error is not None:
                reason = "error"
            stop_reason = None
            if info["stop_string"] >= 0:
                stop_reason = req.params.stop[info["stop_string"]]
            elif info["stop_token"] >= 0:
                stop_reason = info["stop_token"]
            if req.patterns is not None:
                # A pattern may match text that arrived with the last token, after the sequence finished.
                hit = req.patterns.search(text)
                if hit is not None:
                    text, reason, stop_reason = text[: hit[0]], ("stop" if done else None), hit[1]
                elif seq in req.pattern_stops:
                    reason, stop_reason = "stop", req.pattern_stops[seq]
            if not done:
                text = text[: len(self._scheduler.text(seq, 0, core.stable_text_len(seq)).decode())]
                if req.patterns is not None:
                    text = text[: PatternStops.stable_len(text)]
            lps = req.logprobs.get(seq) if req.params.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=info["index"],
                    text=text,
                    token_ids=core.output_tokens(seq),
                    finish_reason=reason if done else None,
                    stop_reason=stop_reason if done else None,
                    logprobs=list(lps or []) if req.params.logprobs is not None else None,
                    cumulative_logprob=(
                        sum(d[t] for d, t in zip(lps or [], core.output_tokens(seq)))
                        if req.params.logprobs is not None
                        else None
                    ),
                )
            )
        if req.finished and len(completions) < req.params.n:
            # Ended before its prompt forked into n samples (aborted, or failed): the missing ones are empty.
            have = {c.index for c in completions}
            reason = "error" if req.error is not None else "abort"
            completions += [
                CompletionOutput(
                    index=i, finish_reason=reason, logprobs=[] if req.params.logprobs is not None else None,
                    cumulative_logprob=0.0 if req.params.logprobs is not None else None,
                )  # fmt: skip
                for i in range(req.params.n)
                if i not in have
            ]
        completions.sort(key=lambda c: c.index)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            outputs=completions,
            finished=req.finished,
            error=req.error,
        )

    # ------------------------------------------------------------------ introspection

    @property
    def num_free_kv_blocks(self) -> int:
        self._check_open()
        return self._scheduler.core.pool.num_free

    @property
    def kv_cache_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        self._check_open()
        return self._runner.kv_cache.num_tokens

    @property
    def stats(self):
        """Scheduler counters: computed_tokens, prefix_hit_tokens, preemptions, block_copies."""
        self._check_open()
        return self._scheduler.core.stats


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return backend
    have_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        # The kernels are built for float16 and bfloat16 on CUDA; float32 runs on the torch backend there.
        use = device.type == "cuda" and have_triton and dtype != torch.float32
        return "triton" if use else "torch"
    if not have_triton:
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' runs on CUDA devices; on the CPU only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before starting Python)"
        )
    if device.type == "cuda" and dtype == torch.float32:
        raise ValueError(
            "backend='triton' runs float16 and bfloat16 on CUDA, not float32 (its kernels would spill registers); "
            "pass dtype='float16' or 'bfloat16', or backend='torch' (or 'auto') for float32"
        )
    return backend


def _int_option(name: str, value: object) -> Optional[int]:
    """An Engine option that must be an integer (numpy integers accepted) or None, as a Python int."""
    if value is None:
        return None
    out = as_int(value)
    if out is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return out


def _prompt_id_lists(prompt_token_ids: object) -> list[list[int]]:
    """prompt_token_ids as lists of ints: one prompt (a list of ids) or a list of them.

    Lists, tuples, numpy arrays and torch tensors (one or two dimensions) are
    accepted, with numpy and torch integers; a bare integer, a string, a set,
    a dict or an iterator is not (an order or a length would be guessed).
    """
    if hasattr(prompt_token_ids, "tolist") and getattr(prompt_token_ids, "ndim", 1) in (1, 2):
        prompt_token_ids = prompt_token_ids.tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise ValueError(
            "prompt_token_ids must be a list of token ids or a list of such lists "
            f"(a list, tuple, numpy array or tensor), got {type(prompt_token_ids).__name__}"
        )
    if len(prompt_token_ids) > 0 and as_int(prompt_token_ids[0]) is not None:  # one prompt, not a list of them
        prompt_token_ids = [prompt_token_ids]
    return [_token_ids(ids, i) for i, ids in enumerate(prompt_token_ids)]


def _token_ids(ids: object, i: int) -> list[int]:
    """A prompt's ids as a list of ints (numpy and torch integers accepted)."""
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt {i}: prompt_token_ids must be lists of integers, got {type(ids).__name__}")
    out = [as_int(t) for t in ids]
    if any(t is None for t in out):
        bad = next(t for t, o in zip(ids, out) if o is None)
        raise ValueError(f"prompt {i}: token ids must be integers, not {bad!r}")
    return out


def _raise_for_errors(outputs: list[RequestOutput]) -> None:
    """Raises GenerationError naming the failed requests of a generate call, if any failed."""
    failed = [(i, o) for i, o in enumerate(outputs) if o.error is not None]
    if failed:
        lines = "; ".join(f"prompt {i}: {o.error}" for i, o in failed)
        raise GenerationError(
            f"{len(failed)} of {len(outputs)} prompts failed ({lines}). The other prompts completed: every "
            "output is in this error's `outputs`.",
            outputs,
        )
