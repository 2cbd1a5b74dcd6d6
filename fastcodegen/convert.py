"""Conversion of a transformers CodeGen checkpoint into the engine's layout.

    python -m fastcodegen.convert SRC DST [--dtype float16]

reads `pytorch_model.bin` (with `torch.load(weights_only=True)`: no arbitrary
unpickling) or safetensors, single or sharded, and writes `DST/model.safetensors`
in the layout `weights.py` describes, plus `DST/fastcodegen.json` and the
tokenizer files. The engine runs the same conversion on first use of a
checkpoint, into a cache directory.

Two things happen to the weights besides fusing them:

* **The qkv untangling.** `qkv_proj.weight` [3d, d] is four shards
  (`mp_num = 4`) of 3d/4 rows, each ordered q, v, k; heads are numbered shard
  by shard. `W.view(4, 3, d/4, d)[:, j].reshape(d, d)` for j = 0, 1, 2 gives
  Wq, Wv, Wk with ordinary per-head row blocks.
* **The rotary regrouping.** CodeGen rotates interleaved pairs
  (x[2i], x[2i+1]) of the first rotary_dim dims of each q and k head. The
  rows of Wq and Wk are regrouped (`weights.InProjLayout`) so that each head
  reads as half-split pairs (x[i], x[i + rd/2]), which kernels rotate without
  lane shuffles. q.k is unchanged because q and k are regrouped alike; V is
  not.

The conversion streams: the output header is computed from the config first,
then one layer at a time is read (memory-mapped), fused and written, so a 16B
checkpoint never has two copies in memory. It writes into a temporary
directory renamed into place at the end, so a failure leaves nothing behind
that looks valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open

from .config import QKV_SHARDS, ModelConfig, dtype_name, parse_dtype, read_checkpoint_config
from .tokenizer import TOKENIZER_FILES
from .weights import CONFIG_FILE, WEIGHTS_FILE, converted_metadata, is_converted, read_converted_config, tensor_shapes

# Buffers some transformers versions saved with the weights; not parameters.
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|bias|embed_positions)$")

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


# --------------------------------------------------------------------------- source


class SourceCheckpoint:
    """The tensors of a transformers checkpoint directory, read lazily."""

    def __init__(self, path: Path):
        self.path = path
        self.hf_config, self.config = read_checkpoint_config(path)
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._opened: dict[Path, Any] = {}
        self.format = self._index()

    def _index(self) -> str:
        p = self.path
        for fmt, single, index in (
            ("safetensors", "model.safetensors", "model.safetensors.index.json"),
            ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (p / index).is_file():
                weight_map = json.loads((p / index).read_text()).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{p / index}: no weight_map")
                for name, file in weight_map.items():
                    if not (p / file).is_file():
                        raise FileNotFoundError(f"{p / index}: shard {file} (holding {name!r}) is missing")
                    self._files[name] = p / file
                return fmt
            if (p / single).is_file():
                for name in self._open(p / single).keys() if fmt == "safetensors" else self._open(p / single):
                    self._files[name] = p / single
                return fmt
        raise FileNotFoundError(
            f"{p}: no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin "
            "or pytorch_model.bin.index.json)"
        )

    def _open(self, file: Path) -> Any:
        if file not in self._opened:
            if file.suffix == ".safetensors":
                self._opened[file] = safe_open(str(file), framework="pt", device="cpu")
            else:
                self._opened[file] = _load_bin(file)
        return self._opened[file]

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._open(self._files[name])
        if self.format == "safetensors":
            return tuple(f.get_slice(name).get_shape())
        return tuple(f[name].shape)

    def get(self, name: str) -> torch.Tensor:
        f = self._open(self._files[name])
        return f.get_tensor(name) if self.format == "safetensors" else f[name]

    def dtype(self) -> torch.dtype:
        return self.get("transformer.h.0.attn.qkv_proj.weight").dtype

    def close(self) -> None:
        self._opened.clear()


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` as a dict of tensors, memory-mapped when the file allows it."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Files in the legacy (pre-zip) format cannot be mapped.
        obj = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: not a state dict of tensors")
    return obj


def expected_source_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a transformers CodeGenForCausalLM checkpoint must hold."""
    d, f, v = config.n_embd, config.n_inner, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes.update(
            {
                f"{h}.ln_1.weight": (d,),
                f"{h}.ln_1.bias": (d,),
                f"{h}.attn.qkv_proj.weight": (3 * d, d),
                f"{h}.attn.out_proj.weight": (d, d),
                f"{h}.mlp.fc_in.weight": (f, d),
                f"{h}.mlp.fc_in.bias": (f,),
                f"{h}.mlp.fc_out.weight": (d, f),
                f"{h}.mlp.fc_out.bias": (d,),
            }
        )
    shapes.update(
        {
            "transformer.ln_f.weight": (d,),
            "transformer.ln_f.bias": (d,),
            "lm_head.weight": (v, d),
            "lm_head.bias": (v,),
        }
    )
    return shapes


def check_source(src: SourceCheckpoint) -> None:
    """Every tensor present with its shape, nothing unknown; raises naming the first bad tensor."""
    expected = expected_source_shapes(src.config)
    present = set(src.names())
    for name, shape in expected.items():
        if name not in present:
            raise ValueError(f"{src.path}: tensor {name!r} is missing")
        got = src.shape(name)
        if got != shape:
            raise ValueError(
                f"{src.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)} "
                f"for n_embd={src.config.n_embd}, n_inner={src.config.n_inner}, vocab_size={src.config.vocab_size}"
            )
    unknown = sorted(n for n in present - set(expected) if not _IGNORED.match(n))
    if unknown:
        raise ValueError(
            f"{src.path}: unexpected tensor {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + "; is this a CodeGen checkpoint?"
        )


# --------------------------------------------------------------------------- the transformation


def split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CodeGen's [3d, d] qkv_proj weight -> (Wq, Wk, Wv), each [d, d] with per-head row blocks."""
    d = config.n_embd
    w = qkv.view(QKV_SHARDS, 3, d // QKV_SHARDS, d)
    wq, wv, wk = (w[:, j].reshape(d, d) for j in range(3))
    return wq, wk, wv


def _rotary_groups(w: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A q or k weight [d, d] (per-head rows, interleaved rotary pairs) -> its rows (first, second, pass).

    first = rows 0, 2, .., rd-2 of each head; second = rows 1, 3, .., rd-1;
    pass = rows rd .. hd-1; each stacked head after head.
    """
    rd = config.rotary_dim
    heads = w.view(config.n_head, config.head_dim, -1)
    first, second, rest = heads[:, 0:rd:2], heads[:, 1:rd:2], heads[:, rd:]
    return tuple(t.reshape(-1, w.shape[1]) for t in (first, second, rest))


def convert_layer(src: SourceCheckpoint, i: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer i of the source in the engine's layout."""
    c = src.config
    h = f"transformer.h.{i}"
    get = lambda name: src.get(f"{h}.{name}").to(dtype)  # noqa: E731
    wq, wk, wv = split_qkv(get("attn.qkv_proj.weight"), c)
    q1, q2, qp = _rotary_groups(wq, c)
    k1, k2, kp = _rotary_groups(wk, c)
    w_in = torch.cat([q1, k1, q2, k2, qp, kp, wv, get("mlp.fc_in.weight")])  # InProjLayout's order
    return {
        f"layers.{i}.ln.weight": get("ln_1.weight"),
        f"layers.{i}.ln.bias": get("ln_1.bias"),
        f"layers.{i}.w_in": w_in,
        f"layers.{i}.b_in": torch.cat([torch.zeros(3 * c.n_embd, dtype=dtype), get("mlp.fc_in.bias")]),
        f"layers.{i}.w_out": torch.cat([get("attn.out_proj.weight"), get("mlp.fc_out.weight")], dim=1),
        f"layers.{i}.b_out": get("mlp.fc_out.bias"),
    }


def _converted_tensors(src: SourceCheckpoint, dtype: torch.dtype):
    """Yields (name, tensor) in file order, one layer in memory at a time."""
    yield "wte", src.get("transformer.wte.weight").to(dtype)
    for i in range(src.config.n_layer):
        yield from convert_layer(src, i, dtype).items()
    for ours, theirs in (
        ("ln_f.weight", "transformer.ln_f.weight"),
        ("ln_f.bias", "transformer.ln_f.bias"),
        ("lm_head.weight", "lm_head.weight"),
        ("lm_head.bias", "lm_head.bias"),
    ):
        yield ours, src.get(theirs).to(dtype)


# --------------------------------------------------------------------------- writing


class _StreamingSafetensorsWriter:
    """Writes a safetensors file tensor by tensor, its header computed up front."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, metadata: dict[str, str]):
        element = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, shape in shapes.items():
            nbytes = element * _numel(shape)
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self._order = iter(shapes.items())
        self._dtype = dtype
        self._file = open(path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape = next(self._order, (None, None))
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != self._dtype:
            raise AssertionError(f"writer expected {want} {shape}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if next(self._order, None) is not None:
            raise AssertionError("not every tensor was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def convert(
    src_dir: "str | Path",
    dst_dir: "str | Path",
    dtype: "str | torch.dtype" = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Converts the transformers checkpoint at `src_dir` into `dst_dir`.

    `dtype` is the stored precision: 'auto' keeps the source's, or 'float32',
    'float16', 'bfloat16'. Raises ValueError naming the tensor when one is
    missing or misshapen, and when the checkpoint is not CodeGen. Returns
    `dst_dir`.
    """
    src_dir, dst_dir = Path(src_dir).expanduser(), Path(dst_dir).expanduser()
    if dst_dir.exists() and any(dst_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst_dir} exists and is not empty (pass overwrite=True / --force to replace it)")
    src = SourceCheckpoint(src_dir)
    try:
        check_source(src)
        out_dtype = src.dtype() if dtype == "auto" else parse_dtype(dtype, torch.device("cpu"))
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{src_dir}: weights are {out_dtype}; pass dtype= to convert them")
        dst_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.partial-", dir=dst_dir.parent))
        try:
            _write(src, tmp, out_dtype, progress)
            if dst_dir.exists():
                shutil.rmtree(dst_dir)
            os.replace(tmp, dst_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        src.close()
    return dst_dir


def _write(src: SourceCheckpoint, out: Path, dtype: torch.dtype, progress: bool) -> None:
    from tqdm.auto import tqdm

    shapes = tensor_shapes(src.config)
    meta = converted_metadata(
        src.config, dtype, {"path": str(src.path), "format": src.format, "hf_config": src.hf_config}
    )
    writer = _StreamingSafetensorsWriter(out / WEIGHTS_FILE, shapes, dtype, {"format": "pt", "fastcodegen": "1"})
    total = sum(_numel(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {src.path.name}", disable=not progress) as bar:
        for name, tensor in _converted_tensors(src, dtype):
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
    writer.close()
    for name in TOKENIZER_FILES:
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, out / name)
    # The config goes last: its presence marks a complete conversion.
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- the engine's cache


def default_cache_root() -> Path:
    return Path(os.environ.get("FASTCODEGEN_CACHE") or os.path.expanduser("~/.cache/fastcodegen"))


def cache_key(src_dir: Path, dtype: torch.dtype) -> str:
    """A directory name that changes when the source checkpoint or the dtype does."""
    parts = src_dir.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        # A Hugging Face cache snapshot: its commit hash names it.
        return f"{parts[-3].removeprefix('models--')}/{parts[-1]}/{dtype_name(dtype)}"
    h = hashlib.sha256(str(src_dir.resolve()).encode())
    for f in sorted(src_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"local/{src_dir.name}-{h.hexdigest()[:16]}/{dtype_name(dtype)}"


def ensure_converted(
    src_dir: Path, dtype: torch.dtype, cache_root: Optional[Path] = None, progress: bool = True
) -> Path:
    """The converted copy of `src_dir` in the cache, converting it on first use."""
    dst = (cache_root or default_cache_root()) / cache_key(src_dir, dtype)
    if is_converted(dst):
        try:
            read_converted_config(dst)
            return dst
        except ValueError:
            pass  # an older format: convert again
    try:
        return convert(src_dir, dst, dtype=dtype, progress=progress, overwrite=True)
    except OSError:
        # Another process may have finished the same conversion first.
        if is_converted(dst):
            return dst
        raise


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a transformers CodeGen checkpoint directory")
    p.add_argument("dst", help="where to write the converted checkpoint (a new directory)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="stored precision (default: the source's)",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, progress=not args.quiet, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    echo(f"wrote {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcodegen.convert", description="Convert a CodeGen checkpoint.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
