"""The engine's weight layout: names, shapes, loading and dummy weights.

A converted checkpoint is a directory with `fastcodegen.json` (the model config
and a format version) and `model.safetensors` holding, per layer `i`:

    layers.{i}.ln.weight, layers.{i}.ln.bias   [d]         ln_1
    layers.{i}.w_in                            [3d + f, d] q, k, v and fc_in rows (order below)
    layers.{i}.b_in                            [3d + f]    zeros, then the fc_in bias
    layers.{i}.w_out                           [d, d + f]  columns: out_proj | fc_out
    layers.{i}.b_out                           [d]         fc_out bias

plus `wte` [V, d], `ln_f.weight`/`ln_f.bias` [d], `lm_head.weight` [V, d] and
`lm_head.bias` [V] (d = n_embd, f = n_inner, V = vocab_size). Thanks to the
parallel residual a layer is two GEMMs: `ln(x) @ w_in^T` and
`[attn | gelu(mlp)] @ w_out^T`.

The rows of `w_in` are grouped for the fused projection kernel
(`InProjLayout`): `[Q1 | K1 | Q2 | K2 | QP | KP | V | M]`. With r = rotary_dim/2,
Q1 holds rows 0, 2, .., rotary_dim-2 of every q head (head after head, r rows
each), Q2 rows 1, 3, .., rotary_dim-1, QP the rows past rotary_dim; K1, K2, KP
the same for k; V the v heads as they are; M fc_in. Reassembled per head as
[Q1 | Q2 | QP], a head's dims are CodeGen's interleaved rotary pairs
(x[2i], x[2i+1]) regrouped into the half-split pairs (x[i], x[i + r]), so
rotary is `x * cos + rotate_half(x) * sin`; q.k is unchanged because q and k
are regrouped alike (V is not). And a kernel finds the partner of a Q1 or K1
column at a fixed distance (`InProjLayout.rotary_partner`) in the same GEMM,
so rotary is an elementwise epilogue.

`fastcodegen.json` also records the size and sha256 of every file the
conversion wrote (`files`); `integrity.py` checks them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig, dtype_name, read_json_file

logger = logging.getLogger("fastcodegen")

FORMAT_VERSION = 2
CONFIG_FILE = "fastcodegen.json"
WEIGHTS_FILE = "model.safetensors"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class InProjLayout:
    """Where q, k, v and fc_in live among the output columns of `ln(x) @ w_in^T`."""

    n_head: int
    head_dim: int
    rotary_dim: int
    n_embd: int
    n_inner: int

    @classmethod
    def of(cls, config: ModelConfig) -> "InProjLayout":
        return cls(config.n_head, config.head_dim, config.rotary_dim, config.n_embd, config.n_inner)

    @property
    def half(self) -> int:  # r: rotary pairs per head
        return self.rotary_dim // 2

    @property
    def rotary_width(self) -> int:  # columns of Q1 (and of each of K1, Q2, K2)
        return self.n_head * self.half

    @property
    def pass_dim(self) -> int:  # dims per head past the rotary ones
        return self.head_dim - self.rotary_dim

    @property
    def rotary_partner(self) -> int:  # Q1/K1 column c pairs with column c + rotary_partner
        return 2 * self.rotary_width

    def _span(self, start: int, width: int) -> slice:
        return slice(start, start + width)

    @property
    def q1(self) -> slice:
        return self._span(0, self.rotary_width)

    @property
    def k1(self) -> slice:
        return self._span(self.rotary_width, self.rotary_width)

    @property
    def q2(self) -> slice:
        return self._span(2 * self.rotary_width, self.rotary_width)

    @property
    def k2(self) -> slice:
        return self._span(3 * self.rotary_width, self.rotary_width)

    @property
    def qp(self) -> slice:
        return self._span(4 * self.rotary_width, self.n_head * self.pass_dim)

    @property
    def kp(self) -> slice:
        return self._span(self.qp.stop, self.n_head * self.pass_dim)

    @property
    def v(self) -> slice:
        return self._span(self.kp.stop, self.n_embd)

    @property
    def m(self) -> slice:
        return self._span(self.v.stop, self.n_inner)

    @property
    def width(self) -> int:
        return self.m.stop

    def heads(self, y: torch.Tensor, which: str) -> torch.Tensor:
        """q or k [T, n_head, head_dim] (half-split order) from GEMM output columns y [T, width]."""
        t, h = y.shape[0], self.n_head
        first, second, rest = (self.q1, self.q2, self.qp) if which == "q" else (self.k1, self.k2, self.kp)
        return torch.cat(
            [
                y[:, first].view(t, h, self.half),
                y[:, second].view(t, h, self.half),
                y[:, rest].view(t, h, self.pass_dim),
            ],
            dim=-1,
        )


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the layout with its shape, in file order."""
    d, f, v = config.n_embd, config.n_inner, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (v, d)}
    for i in range(config.n_layer):
        shapes[f"layers.{i}.ln.weight"] = (d,)
        shapes[f"layers.{i}.ln.bias"] = (d,)
        shapes[f"layers.{i}.w_in"] = (3 * d + f, d)
        shapes[f"layers.{i}.b_in"] = (3 * d + f,)
        shapes[f"layers.{i}.w_out"] = (d, d + f)
        shapes[f"layers.{i}.b_out"] = (d,)
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    shapes["lm_head.bias"] = (v,)
    return shapes


@dataclass
class LayerWeights:
    ln_weight: torch.Tensor  # [d]
    ln_bias: torch.Tensor  # [d]
    w_in: torch.Tensor  # [3d + f, d]
    b_in: torch.Tensor  # [3d + f]
    w_out: torch.Tensor  # [d, d + f]
    b_out: torch.Tensor  # [d]


@dataclass
class CodeGenWeights:
    wte: torch.Tensor  # [V, d]
    layers: list[LayerWeights]
    ln_f_weight: torch.Tensor  # [d]
    ln_f_bias: torch.Tensor  # [d]
    lm_head_weight: torch.Tensor  # [V, d]
    lm_head_bias: torch.Tensor  # [V]

    def nbytes(self) -> int:
        """Bytes the weights' tensors take."""
        tensors = [self.wte, self.ln_f_weight, self.ln_f_bias, self.lm_head_weight, self.lm_head_bias]
        tensors += [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def from_named(cls, config: ModelConfig, named: Iterator[tuple[str, torch.Tensor]]) -> "CodeGenWeights":
        tensors = dict(named)
        return cls(
            wte=tensors["wte"],
            layers=[
                LayerWeights(
                    ln_weight=tensors[f"layers.{i}.ln.weight"],
                    ln_bias=tensors[f"layers.{i}.ln.bias"],
                    w_in=tensors[f"layers.{i}.w_in"],
                    b_in=tensors[f"layers.{i}.b_in"],
                    w_out=tensors[f"layers.{i}.w_out"],
                    b_out=tensors[f"layers.{i}.b_out"],
                )
                for i in range(config.n_layer)
            ],
            ln_f_weight=tensors["ln_f.weight"],
            ln_f_bias=tensors["ln_f.bias"],
            lm_head_weight=tensors["lm_head.weight"],
            lm_head_bias=tensors["lm_head.bias"],
        )


def is_converted(path: Path) -> bool:
    """Whether `path` holds a converted checkpoint's files (whether they are intact: `integrity.verify_converted`)."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_converted_config(path: Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole `fastcodegen.json` of a converted checkpoint.

    Raises ValueError naming `fastcodegen.json` when it is truncated or not
    JSON, was written by another format version, or holds a bad model config
    or file record.
    """
    file = Path(path) / CONFIG_FILE
    fix = "convert the checkpoint again (fastcodegen convert SRC DST --force)"
    meta = read_json_file(file, fix)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: format version {version!r}, this fastcodegen reads version {FORMAT_VERSION}; {fix}")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{file}: no 'model' config; {fix}")
    try:
        config = ModelConfig.from_dict(model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}; {fix}") from None
    if "files" in meta:
        _check_files_record(file, meta["files"], fix)
    return config, meta


def _check_files_record(file: Path, files: Any, fix: str) -> None:
    """The `files` entry must map plain file names, the weights among them, to a size and a sha256."""
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise ValueError(
            f"{file}: 'files' must map each written file, {WEIGHTS_FILE} among them, to its checksum; {fix}"
        )
    for name, rec in files.items():
        ok_name = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        ok_rec = (
            isinstance(rec, dict)
            and isinstance(rec.get("size"), int)
            and not isinstance(rec.get("size"), bool)
            and rec["size"] >= 0
            and isinstance(rec.get("sha256"), str)
            and _SHA256.fullmatch(rec["sha256"]) is not None
        )
        if not (ok_name and ok_rec):
            raise ValueError(f"{file}: bad 'files' entry {name!r}: {rec!r}; {fix}")


def fix_hint(path: Path, meta: dict) -> str:
    """How to rebuild a damaged converted checkpoint: the convert command from its recorded source."""
    source = (meta.get("source") or {}).get("path")
    return f"convert it again: fastcodegen convert {source or 'SRC'} {path} --force"


def load_weights(
    path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> CodeGenWeights:
    """Maps `model.safetensors` and moves each tensor to `device` as `dtype`.

    Check the files first (`integrity.verify_converted`). The file is
    memory-mapped; a tensor already in the right dtype on the CPU stays a view
    of the mapping, elsewhere it is copied once to its place.
    """
    from tqdm.auto import tqdm

    expected = tensor_shapes(config)
    file = path / WEIGHTS_FILE

    def named() -> Iterator[tuple[str, torch.Tensor]]:
        with (
            safe_open(str(file), framework="pt", device="cpu") as f,
            tqdm(
                total=file.stat().st_size, unit="B", unit_scale=True, desc="loading weights", disable=not progress
            ) as bar,
        ):
            present = set(f.keys())
            for name, shape in expected.items():
                if name not in present:
                    raise ValueError(f"{file}: tensor {name!r} is missing")
                t = f.get_tensor(name)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{file}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
                yield name, t.to(device=device, dtype=dtype)
                bar.update(t.numel() * t.element_size())

    try:
        return CodeGenWeights.from_named(config, named())
    except SafetensorError as e:
        raise ValueError(f"{file}: {e}; {fix_hint(path, read_converted_config(path)[1])}") from None


def dummy_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> CodeGenWeights:
    """Seeded random weights at the model's real shapes, made on the device.

    Matrices are N(0, 0.02) like transformers' initialisation; LayerNorm scales
    are near 1 and biases small, so activations stay finite in float16 and a
    benchmark times real arithmetic (never zeros).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def named() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in tensor_shapes(config).items():
            mean = 1.0 if name.endswith(("ln.weight", "ln_f.weight")) else 0.0
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(mean, 0.02, generator=gen)

    return CodeGenWeights.from_named(config, named())


def converted_metadata(
    config: ModelConfig, dtype: torch.dtype, source: Optional[dict] = None, files: Optional[dict] = None
) -> dict:
    """The contents of `fastcodegen.json`; `files` maps each written file's name to its `size` and `sha256`."""
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": "codegen",
        "dtype": dtype_name(dtype),
        "layout": "w_in rows [Q1|K1|Q2|K2|QP|KP|V|M], w_out columns [out_proj|fc_out]; rotary half-split",
        "model": config.to_dict(),
        "source": source or {},
    }
    if files is not None:
        meta["files"] = files
    return meta
