"""Engine: load a CodeGen model and generate completions."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import operator
import os
from pathlib import Path
from typing import Iterator, Optional, Union
from typing import Sequence as Seq

import torch

from . import hub, registry
from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig, parse_device, parse_dtype
from .model_runner import ModelRunner
from .outputs import RequestOutput
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence
from .stopping import Stop, StopRules
from .tokenizer import IncrementalDetokenizer, Tokenizer
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
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most prompt tokens in one prefill step.
        progress: show progress bars (conversion, generation of many prompts).
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
        max_num_batched_tokens: Optional[int] = None,
        progress: bool = True,
    ):
        dev = parse_device(device)
        backend = _resolve_backend(backend, dev)
        dt = parse_dtype(dtype, dev)
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
            max_num_batched_tokens=max_num_batched_tokens or max(8192, max_model_len),
        )
        self.model_config = model_config
        self.tokenizer = self._load_tokenizer(tokenizer, source, model)

        if load_format == "dummy":
            weights = dummy_weights(model_config, dev, dt, seed=seed)
        else:
            weights = load_weights(source, model_config, dev, dt, progress=progress)
        self._runner = ModelRunner(model_config, self.config, weights)
        kv = self._runner.kv_cache
        logger.info("KV cache: %d blocks of %d tokens (%d tokens)", kv.num_blocks, kv.block_size, kv.num_tokens)
        self._block_manager = BlockManager(kv.num_blocks, self.config.block_size)
        self._scheduler = Scheduler(self._block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self._generator = torch.Generator(device=dev)
        self._generator.manual_seed(seed)
        self.vocab_limit = self.tokenizer.vocab_limit if self.tokenizer else model_config.vocab_size
        self._sampler = Sampler(min(self.vocab_limit, model_config.vocab_size), self._generator)
        self._eos = frozenset(model_config.eos_token_ids)
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()

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
        from .convert import SourceCheckpoint, ensure_converted

        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        if load_format == "dummy":
            name = registry.official_name(model)
            if name is not None:
                return registry.MODELS[name], None
            path = Path(model).expanduser()
            if is_converted(path):
                return read_converted_config(path)[0], None
            if (path / "config.json").is_file():
                return SourceCheckpoint(path).config, None
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
        for path in candidates:
            try:
                return Tokenizer.from_dir(path)
            except FileNotFoundError:
                continue
        logger.warning("no tokenizer found for %s: prompts must be token ids and outputs have no text", model)
        return None

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
                request's RequestOutput each time it has new tokens, its text
                so far (less any characters a stop string may still remove);
                the last one yielded for a request has `finished=True`.

        Raises:
            ValueError: a prompt is empty, does not fit the context, or holds
                an id outside the vocabulary; or a parameter is invalid. The
                engine is unchanged and stays usable.
        """
        requests = self._make_requests(prompts, prompt_token_ids, sampling_params)
        if stream:
            return self._stream(requests)
        from tqdm.auto import tqdm

        show = use_tqdm and self.progress and len(requests) > 1
        with tqdm(total=len(requests), desc="generating", unit="prompt", disable=not show) as bar:
            for req in self._run(requests):
                if req.finished:
                    bar.update(1)
        return [r.output() for r in requests]

    def _make_requests(
        self,
        prompts: Union[str, Seq[str], None],
        prompt_token_ids: Union[Seq[int], Seq[Seq[int]], None],
        sampling_params: Union[SamplingParams, Seq[SamplingParams], None],
    ) -> list[Request]:
        """Validates every input and builds the requests; changes no engine state."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompts must be a string or a list of strings")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompt_token_ids instead of text prompts")
            texts: list[Optional[str]] = list(prompts)
            id_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            first = prompt_token_ids[0] if len(prompt_token_ids) > 0 else None
            if isinstance(first, int) or getattr(first, "ndim", None) == 0:  # one prompt, not a list of them
                prompt_token_ids = [prompt_token_ids]
            id_lists = [_token_ids(ids, i) for i, ids in enumerate(prompt_token_ids)]
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

        requests = []
        for text, ids, p in zip(texts, id_lists, params):
            rules = StopRules(p, self._eos, limit)
            req = Request(str(next(self._request_ids)), text, ids, p, rules)
            for j in range(p.n):
                gen = None
                if p.seed is not None:
                    gen = torch.Generator(device=self.config.device)
                    gen.manual_seed(_sample_seed(p.seed, j))
                detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens) if self.tokenizer else None
                req.seqs.append(Sequence(next(self._seq_ids), req, j, gen, detok))
            requests.append(req)
        return requests

    def _stream(self, requests: list[Request]) -> Iterator[RequestOutput]:
        for req in self._run(requests):
            out = req.output()
            if not out.finished:
                for c, s in zip(out.outputs, req.seqs):
                    c.text = s.stable_text()
            yield out

    def _run(self, requests: list[Request]) -> Iterator[Request]:
        """Runs steps until every request is finished, yielding each request a step advanced."""
        for req in requests:
            for seq in req.seqs:
                self._scheduler.add(seq)
        ours = {id(r) for r in requests}
        try:
            while ours:
                seqs = self._step()
                touched = {id(s.request): s.request for s in seqs if id(s.request) in ours}
                for key, req in touched.items():
                    if req.finished:
                        ours.discard(key)
                    yield req
        finally:
            # An error, or a consumer that stopped early: free what is left.
            left = [s for r in requests for s in r.seqs if not s.finished]
            if left:
                self._scheduler.abort(left)
                for s in left:
                    s.finish(Stop("abort"))

    def _step(self) -> list[Sequence]:
        """Runs one scheduled step and returns the sequences it advanced."""
        seqs, is_prefill = self._scheduler.schedule()
        if not seqs:
            raise RuntimeError("the scheduler found nothing to run")
        logits = self._runner.execute(seqs, is_prefill)
        result = self._sampler(logits, [s.sampling_row for s in seqs])
        for seq, token, logprobs in zip(seqs, result.token_ids, result.logprobs):
            seq.append(token, logprobs)
        self._scheduler.retire(seqs)
        return seqs

    # ------------------------------------------------------------------ introspection

    @property
    def num_free_kv_blocks(self) -> int:
        return self._block_manager.num_free_blocks

    @property
    def kv_cache_tokens(self) -> int:
        """How many tokens the KV cache holds."""
        return self._runner.kv_cache.num_tokens


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return backend
    have_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and have_triton else "torch"
    if not have_triton:
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' runs on CUDA devices; on the CPU only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before starting Python)"
        )
    return backend


def _token_ids(ids: object, i: int) -> list[int]:
    """A prompt's ids as a list of ints (numpy and torch integers accepted)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Seq) and not hasattr(ids, "tolist"):
        raise ValueError(f"prompt {i}: prompt_token_ids must be lists of integers")
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    try:
        out = [operator.index(t) for t in ids]
    except TypeError:
        raise ValueError(f"prompt {i}: token ids must be integers") from None
    if any(isinstance(t, bool) for t in ids):
        raise ValueError(f"prompt {i}: token ids must be integers, not booleans")
    return out


def _sample_seed(seed: int, index: int) -> int:
    """A generator seed per (request seed, completion index), mixed so neighbours don't collide."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
