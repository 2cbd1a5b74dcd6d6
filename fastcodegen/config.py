"""Configuration dataclasses: the model's architecture and the engine's settings.

`ModelConfig` is the one description of a CodeGen architecture that the
converter, the weight loader, the model and the registry share. It is read
from a checkpoint's `config.json` (never assumed) or from the built-in table
of official checkpoints in `registry.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

# The qkv projection of every released CodeGen checkpoint is split into this
# many shards (a TPU-v4 leftover); see `convert.py`.
QKV_SHARDS = 4

# Speculative decoding. NGRAM names the prompt-lookup proposer.
NGRAM = "[ngram]"
DEFAULT_SPECULATIVE_TOKENS = 4
MAX_SPECULATIVE_TOKENS = 32
# A step of R decoding sequences verifying k = 4 proposals each runs 5R tokens. A half-precision
# matmul on an H100 is bound by reading its weights up to about 295 tokens (989 TFLOP/s over
# 3.35 TB/s, 2 FLOPs per 2-byte weight and token); 32 rows (160 tokens) stay well inside that,
# so rejected proposals cost little there. Beyond it speculation is turned down.
DEFAULT_SPECULATIVE_MAX_ROWS = 32


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one CodeGen model."""

    n_layer: int
    n_embd: int
    n_head: int
    rotary_dim: int
    vocab_size: int = 51200
    n_positions: int = 2048
    n_inner: int = 0  # 0 means 4 * n_embd, as in transformers
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: Optional[int] = 50256
    eos_token_ids: tuple[int, ...] = (50256,)

    def __post_init__(self) -> None:
        if self.n_inner == 0:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        for name in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size", "n_positions", "n_inner"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % QKV_SHARDS:
            raise ValueError(
                f"model config: n_head={self.n_head} is not divisible by {QKV_SHARDS}, "
                "the number of shards of CodeGen's qkv projection"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"model config: rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}"
            )
        if self.activation_function != "gelu_new":
            raise ValueError(
                f"model config: activation_function={self.activation_function!r} is not supported "
                "(CodeGen uses 'gelu_new')"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        d, f, v = self.n_embd, self.n_inner, self.vocab_size
        per_layer = 2 * d + (3 * d + f) * d + f + d * (d + f) + d
        return v * d + self.n_layer * per_layer + 2 * d + v * d + v

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layer * self.n_embd * element

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds the config from a transformers `config.json` dict, checking it is CodeGen."""
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type != "codegen":
            raise ValueError(
                f"{source}: model_type is {model_type!r} (architectures {architectures}), not 'codegen'; "
                "fastcodegen runs CodeGen checkpoints only"
            )
        missing = [k for k in ("n_layer", "n_embd", "n_head", "rotary_dim", "vocab_size") if hf.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        try:
            return cls(
                n_layer=hf["n_layer"],
                n_embd=hf["n_embd"],
                n_head=hf["n_head"],
                rotary_dim=hf["rotary_dim"],
                vocab_size=hf["vocab_size"],
                n_positions=hf.get("n_positions") or 2048,
                n_inner=hf.get("n_inner") or 0,
                layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                activation_function=hf.get("activation_function", "gelu_new"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers `config.json` fields of this architecture (the inverse of `from_hf_config`)."""
        return {
            "model_type": "codegen",
            "architectures": ["CodeGenForCausalLM"],
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "rotary_dim": self.rotary_dim,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids) or None,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def read_json_file(file: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `file`.

    A file that is not one (truncated, damaged, not UTF-8, or holding another
    JSON value) raises ValueError naming the file and saying what is wrong,
    followed by `fix`, how to repair it.
    """
    try:
        obj = json.loads(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e}); the file is damaged; {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e}); the file is truncated or damaged; {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{file}: holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def read_checkpoint_config(directory: Path) -> tuple[dict[str, Any], ModelConfig]:
    """A transformers checkpoint directory's config.json: the dict as written, and the architecture it describes.

    A missing config.json raises FileNotFoundError; an unreadable one (truncated,
    not JSON) or one that does not describe CodeGen raises ValueError naming it.
    """
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json; not a transformers checkpoint directory")
    hf = read_json_file(config_file, "download the checkpoint again or restore its config.json")
    return hf, ModelConfig.from_hf_config(hf, source=str(config_file))


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: "str | torch.dtype", device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (the released checkpoints' precision) and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_device(device: "str | torch.device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine: `Engine`'s keyword arguments, resolved ("auto" values decided).

    Attributes:
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
        speculative_model: speculative decoding's proposer: "[ngram]" for
            prompt lookup (the sequence's longest trailing n-gram found
            earlier in its prompt or output proposes the tokens that followed
            it), or a draft model (a name or directory, as for `model`: a
            smaller CodeGen with the same tokenizer); None: off. Exact:
            outputs are distributed as without it (greedy ones are the same
            tokens).
        num_speculative_tokens: most proposals verified per sequence and step
            (default 4 with a speculative_model, else 0).
        ngram_min, ngram_max: the n-gram lengths prompt lookup matches,
            longest first.
        speculative_max_rows: speculate only in steps with at most this many
            decoding sequences (0: always). A step verifying k proposals for
            each of R sequences runs R * (k + 1) tokens; past the point where
            that many tokens make a forward compute-bound rather than bound by
            reading the weights, rejected proposals cost real time.
    """

    model: str
    device: torch.device
    dtype: torch.dtype
    backend: str = "torch"
    load_format: str = "auto"
    revision: Optional[str] = None
    download: bool = True
    cache_dir: Optional[str] = None
    seed: Optional[int] = 0
    max_model_len: int = 2048
    block_size: int = 16
    kv_cache_tokens: Optional[int] = None
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    speculative_model: Optional[str] = None
    num_speculative_tokens: int = 0
    ngram_min: int = 1
    ngram_max: int = 4
    speculative_max_rows: int = DEFAULT_SPECULATIVE_MAX_ROWS

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {self.backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_tokens is not None and (
            not isinstance(self.kv_cache_tokens, int) or self.kv_cache_tokens < self.max_model_len
        ):
            raise ValueError(
                f"kv_cache_tokens must be an integer of at least max_model_len={self.max_model_len} "
                f"(one full-length sequence must fit), got {self.kv_cache_tokens!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                f"max_num_seqs={self.max_num_seqs}: a decode step has a token for every sequence"
            )
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if self.speculative_model is not None and (
            not isinstance(self.speculative_model, str) or not self.speculative_model.strip()
        ):
            raise ValueError(
                f"speculative_model must be {NGRAM!r} (prompt lookup), a draft model's name or directory, or None, "
                f"got {self.speculative_model!r}"
            )
        for name in ("num_speculative_tokens", "ngram_min", "ngram_max", "speculative_max_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max, got "
                             f"{self.ngram_min} and {self.ngram_max}")
        if self.num_speculative_tokens and self.speculative_model is None:
            raise ValueError("num_speculative_tokens needs a speculative_model ('[ngram]' or a draft model)")

    @property
    def draft_model(self) -> Optional[str]:
        """The draft model speculative decoding uses, if it uses one (not prompt lookup)."""
        return self.speculative_model if self.speculative_model not in (None, NGRAM) else None

    @property
    def speculating_rows(self) -> int:
        """Most sequences that verify proposals in one step (0 without speculative decoding)."""
        if not self.num_speculative_tokens:
            return 0
        return min(self.max_num_seqs, self.speculative_max_rows or self.max_num_seqs)

    @property
    def max_samples(self) -> int:
        """Most logits rows one step samples (the native scheduler's rule)."""
        from . import _C

        return _C.default_max_samples(self.max_num_seqs)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode and verify steps are captured as CUDA graphs (the triton backend on CUDA, unless eager)."""
        return self.device.type == "cuda" and self.backend == "triton" and not self.enforce_eager


def engine_options(
    device: "str | torch.device",
    dtype: "str | torch.dtype",
    backend: str,
    seed: object,
    gpu_memory_utilization: object,
    **integers: object,
) -> dict[str, Any]:
    """`Engine`'s options checked and resolved ("auto" device, dtype and backend; a random seed for None).

    `integers` are the options that must be integers or None (numpy integers
    accepted); max_model_len is checked against the model later.
    """
    from .sampling_params import as_float, as_int

    out: dict[str, Any] = {}
    for name, value in {**integers, "seed": seed}.items():
        out[name] = None if value is None else as_int(value)
        if value is not None and out[name] is None:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if out["seed"] is not None and not 0 <= out["seed"] < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    if out["seed"] is None:
        out["seed"] = int.from_bytes(os.urandom(7), "little")
    out["gpu_memory_utilization"] = as_float(gpu_memory_utilization)
    if out["gpu_memory_utilization"] is None:
        raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {gpu_memory_utilization!r}")
    out["device"] = parse_device(device)
    out["dtype"] = parse_dtype(dtype, out["device"])
    out["backend"] = resolve_backend(backend, out["device"], out["dtype"])
    return out


def check_max_model_len(max_model_len: Optional[int], model: ModelConfig) -> int:
    """The engine's context limit: at most the model's n_positions (its default)."""
    if max_model_len is None:
        return model.n_positions
    if not 0 < max_model_len <= model.n_positions:
        raise ValueError(f"max_model_len must be in [1, n_positions={model.n_positions}], got {max_model_len!r}")
    return max_model_len


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """ "auto" is triton on CUDA (float16 and bfloat16) when Triton is installed, else torch."""
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
