"""Engine: load a CodeGen model and serve completions.

A step is three calls (`Engine._step`): the native scheduler decides it
(continuous batching, chunked prefill, prefix cache, n-sample forks,
preemption) and writes its inputs; the model runner runs the forward (a CUDA
graph for decode and verify steps on CUDA) and samples the tokens; the scheduler appends
them (stops, lengths and detokenizing, natively) and returns the step's
events, which the output processor turns into outputs for whichever reader
owns each request: a `generate` call, a stream, or `step()`. Python does O(1)
work per step plus O(events).

Threads: the public methods may be called from several threads at once. One
lock serialises the steps and every change to the requests; each caller
reads its own requests' outputs, whoever ran the step that made them.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Iterator, Optional, Union
from typing import Sequence as Seq

import torch

from .config import (
    DEFAULT_SPECULATIVE_MAX_ROWS,
    DEFAULT_SPECULATIVE_TOKENS,
    EngineConfig,
    check_max_model_len,
    engine_options,
)
from .kv_cache import num_kv_blocks
from .loading import load_config, load_draft, load_model_weights, load_tokenizer
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import GenerationError, RequestOutput
from .request import Reader
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .validation import Limits, validate

logger = logging.getLogger("fastcodegen")


def _locked(method):
    """An Engine method run under the engine's lock, on an open engine."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._check_open()
            return method(self, *args, **kwargs)

    return locked


class Engine:
    """A CodeGen model ready to generate.

    Example:
        >>> from fastcodegen import Engine, SamplingParams
        >>> engine = Engine("codegen-350M-mono")
        >>> out = engine.generate(["def fib(n):"], SamplingParams(max_tokens=64, temperature=0.2, top_p=0.95))
        >>> print(out[0].outputs[0].text)

    Keywords other than `tokenizer` and `progress` are the engine's settings,
    kept as `engine.config`: `EngineConfig` documents each.

    Args:
        model: an official name (`codegen-350M-mono` ... `codegen-16B-nl`, with or
            without `Salesforce/`), a Hugging Face repo id, or a checkpoint directory
            (transformers' or `fastcodegen convert`'s). Names are found in the Hugging
            Face cache or downloaded; a transformers checkpoint is converted once.
        tokenizer: a directory to load the tokenizer from instead of the
            checkpoint's.
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
        speculative_model: Optional[str] = None,
        num_speculative_tokens: Optional[int] = None,
        ngram_min: int = 1,
        ngram_max: int = 4,
        speculative_max_rows: Optional[int] = None,
        progress: bool = True,
    ):
        if num_speculative_tokens is None:
            num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS if speculative_model is not None else 0
        if speculative_max_rows is None:
            speculative_max_rows = DEFAULT_SPECULATIVE_MAX_ROWS
        opts = engine_options(
            device, dtype, backend, seed, gpu_memory_utilization, max_model_len=max_model_len, block_size=block_size,
            kv_cache_tokens=kv_cache_tokens, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            num_speculative_tokens=num_speculative_tokens, ngram_min=ngram_min, ngram_max=ngram_max,
            speculative_max_rows=speculative_max_rows,
        )  # fmt: skip
        self.progress = progress
        m, source = load_config(model, load_format, revision, download, cache_dir, opts["dtype"], progress)
        self.checkpoint = source  # the converted checkpoint's directory; None for dummy weights
        opts["max_model_len"] = check_max_model_len(opts["max_model_len"], m)
        self.model_config, self.config = m, EngineConfig(
            model, load_format=load_format, revision=revision, download=download, cache_dir=cache_dir,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            speculative_model=speculative_model, **opts,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(tokenizer, source, model)
        c = self.config
        weights = load_model_weights(source, m, c.device, c.dtype, c.seed, progress)
        self.vocab_limit = self.tokenizer.vocab_limit if self.tokenizer else m.vocab_size
        draft = load_draft(c, m, self.tokenizer, self.vocab_limit, progress) if c.draft_model else None
        draft_bytes = draft[1].nbytes() if draft else 0
        num_blocks = num_kv_blocks(m, c, weights.nbytes() + draft_bytes, draft[0] if draft else None)
        self._scheduler = Scheduler(c, num_blocks, m.eos_token_ids, self.tokenizer)
        self._runner = ModelRunner(m, c, weights, num_blocks, self._scheduler.fields, self.vocab_limit, draft)
        self._outputs = OutputProcessor(self._scheduler)
        self._limits = Limits(self.vocab_limit, m.vocab_size, c.max_model_len, c.max_num_seqs)
        self._step_reader = Reader()  # the reader of add_request's requests: step()
        self._lock = threading.RLock()
        self._closed = False

    def close(self) -> None:
        """Aborts what runs and frees the engine's memory (on CUDA back to the device, for another engine).

        A closed engine cannot be used; closing it again does nothing. `with
        Engine(...) as engine:` closes it at the end of the block.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                runner, self._runner = self._runner, None
                self._scheduler = self._outputs = None
                runner.close()

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

    @_locked
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
        if request_id is not None and (not isinstance(request_id, str) or request_id in self._outputs.by_user_id):
            raise ValueError(f"request_id must be a new string, got {request_id!r}")
        ids = None if prompt_token_ids is None else [prompt_token_ids]
        [(text, ids, params)] = validate(prompt, ids, sampling_params, self.tokenizer, self._limits)
        return self._outputs.add(
            text, ids, params, self._step_reader, report_tokens=True, request_id=request_id
        ).request_id

    @_locked
    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the outputs of the requests added with `add_request` that advanced.

        A request's text so far, and once more with `finished=True` when it
        ends. Progress made meanwhile by `generate` calls is reported too.
        """
        if self._scheduler.has_unfinished():
            self._step()
        return self._outputs.take_news(self._step_reader)

    @_locked
    def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV cache; unknown or finished ids are ignored.

        `step()` does not report it again; a `generate` stream yields its last
        output (unfinished completions with finish_reason "abort") and ends.
        """
        req = self._outputs.requests.get(self._outputs.by_user_id.get(request_id, -1))
        if req is not None and req.owner is self._step_reader:
            self._outputs.forget(req)
        elif req is not None and not req.finished:
            self._outputs.abort(req)
            req.owner.unread.add(req.core_id)

    def has_unfinished_requests(self) -> bool:
        """Whether any request (of add_request or a generate call under way) is still running or waiting."""
        with self._lock:
            return not self._closed and self._scheduler.has_unfinished()

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
            ValueError: a prompt is empty, too long, or holds an id outside the
                vocabulary; or a parameter is invalid. The engine is unchanged.
            GenerationError: some requests failed (NaN or infinite logits); the
                others ran to the end, and every output is in the error's
                `outputs` (when streaming: raised after the last output).
        """
        with self._lock:
            self._check_open()
            validated = validate(prompts, prompt_token_ids, sampling_params, self.tokenizer, self._limits)
        outputs = self._consume(validated, report_tokens=stream)
        if stream:
            return (out for _, out in outputs)
        from tqdm.auto import tqdm

        finals: list[RequestOutput] = [None] * len(validated)
        show = use_tqdm and self.progress and len(validated) > 1
        with tqdm(total=len(validated), desc="generating", unit="prompt", disable=not show) as bar:
            for i, out in outputs:  # requests that do not report their tokens have one output, when finished
                finals[i] = out
                bar.update(1)
        return finals

    def _consume(self, validated: list, report_tokens: bool) -> Iterator[tuple[int, RequestOutput]]:
        """Queues the requests, then yields (prompt position, output) as they come, stepping when none waits.

        Outputs made by other callers' steps come too. However it ends, what is left is aborted and forgotten.
        """
        reader = Reader()
        with self._lock:
            self._check_open()
            requests = [self._outputs.add(t, ids, p, reader, report_tokens) for t, ids, p in validated]
        position = {r.request_id: i for i, r in enumerate(requests)}
        last: list[Optional[RequestOutput]] = [None] * len(requests)
        pending = len(requests)
        try:
            while pending:
                with self._lock:
                    self._check_open()
                    if not reader.unread:
                        self._step()
                    outs = self._outputs.take_news(reader)
                for out in outs:
                    i = position[out.request_id]
                    last[i], pending = out, pending - out.finished
                    yield i, out
        finally:
            with self._lock:
                if not self._closed:
                    self._outputs.forget_all(requests)
        _raise_for_errors([out for out in last if out is not None])

    def _step(self) -> None:
        """Schedule, run, update: one step for every request under way."""
        step = self._scheduler.schedule()
        if step.num_tokens == 0:
            raise RuntimeError("the scheduler could not schedule any token")
        sampled = self._runner.run(step, self._outputs.requests)
        self._outputs.process(step, sampled, self._scheduler.update(sampled.tokens, sampled.finite))

    @property
    @_locked
    def num_free_kv_blocks(self) -> int:
        return self._scheduler.num_free_blocks

    @property
    @_locked
    def kv_cache_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        return self._runner.kv_cache.num_tokens

    @property
    @_locked
    def stats(self):
        """A snapshot (`SchedulerStats`): computed, prefix-hit and preempted tokens, block copies, running, waiting, free blocks."""
        return self._scheduler.stats


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
