"""The engine's weight layout: names, shapes, loading and dummy weights.

A converted checkpoint is a directory with `fastcodegen.json` (the model config
and a format version) and `model.safetensors` holding, per layer `i`:

    layers.{i}.ln.weight, layers.{i}.ln.bias   [d]         ln_1
    layers.{i}.w_in                            [3d + f, d] rows: q | k | v | fc_in
    layers.{i}.b_in                            [3d + f]    zeros | fc_in bias
    layers.{i}.w_out                           [d, d + f]  columns: out_proj | fc_out
    layers.{i}.b_out                           [d]         fc_out bias

plus `wte` [V, d], `ln_f.weight`/`ln_f.bias` [d], `lm_head.weight` [V, d] and
`lm_head.bias` [V] (d = n_embd, f = n_inner, V = vocab_size). Thanks to the
parallel residual a layer is two GEMMs: `ln(x) @ w_in^T` and
`[attn | gelu(mlp)] @ w_out^T`. q, k and v rows are ordinary per-head blocks
(head h is rows h*hd .. (h+1)*hd) and the first rotary_dim rows of each q and
k head are permuted from CodeGen's interleaved rotary pairs to the half-split
order, so rotary is `x * cos + rotate_half(x) * sin` (see `convert.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from .config import ModelConfig, dtype_name

FORMAT_VERSION = 1
CONFIG_FILE = "fastcodegen.json"
WEIGHTS_FILE = "model.safetensors"


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
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_converted_config(path: Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole `fastcodegen.json` of a converted checkpoint."""
    meta = json.loads((path / CONFIG_FILE).read_text())
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path / CONFIG_FILE}: format version {version!r}, this fastcodegen reads version "
            f"{FORMAT_VERSION}; convert the checkpoint again"
        )
    return ModelConfig.from_dict(meta["model"]), meta


def load_weights(
    path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> CodeGenWeights:
    """Maps `model.safetensors` and moves each tensor to `device` as `dtype`.

    The file is memory-mapped; a tensor already in the right dtype on the CPU
    stays a view of the mapping, elsewhere it is copied once to its place.
    """
    from tqdm.auto import tqdm

    expected = tensor_shapes(config)
    file = path / WEIGHTS_FILE

    def named() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(file), framework="pt", device="cpu") as f, tqdm(
            total=file.stat().st_size, unit="B", unit_scale=True, desc="loading weights", disable=not progress
        ) as bar:
            present = set(f.keys())
            for name, shape in expected.items():
                if name not in present:
                    raise ValueError(f"{file}: tensor {name!r} is missing")
                t = f.get_tensor(name)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{file}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
                yield name, t.to(device=device, dtype=dtype)
                bar.update(t.numel() * t.element_size())

    return CodeGenWeights.from_named(config, named())


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


def converted_metadata(config: ModelConfig, dtype: torch.dtype, source: Optional[dict] = None) -> dict:
    """The contents of `fastcodegen.json`."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": "codegen",
        "dtype": dtype_name(dtype),
        "layout": "fused w_in [q|k|v|fc_in], w_out [out_proj|fc_out]; rotary half-split",
        "model": config.to_dict(),
        "source": source or {},
    }
