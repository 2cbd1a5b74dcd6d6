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
checkpoint never has two copies in memory. Every byte written is hashed on its
way to the disk: `fastcodegen.json` records each file's size and sha256, which
`integrity.verify_converted` checks when the checkpoint is loaded (and
`fastcodegen convert --verify DIR` on demand).

It writes into a temporary directory, `.<DST name>.partial-XXXX` next to DST,
renamed into place at the end, so a failure leaves nothing behind that looks
valid. The converting process holds an exclusive `flock` on a lock file inside
that directory for the whole conversion. A process killed outright (SIGKILL,
power loss) cannot remove its directory, but its lock dies with it: the next
conversion into the same DST (and every use of the engine's cache entry)
removes the partial directories whose lock it can take, never one that a live
process holds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from .config import QKV_SHARDS, ModelConfig, dtype_name, parse_dtype, read_checkpoint_config, read_json_file
from .integrity import DamagedCheckpointError, verify_converted
from .tokenizer import TOKENIZER_FILES
from .weights import CONFIG_FILE, WEIGHTS_FILE, converted_metadata, is_converted, tensor_shapes

logger = logging.getLogger("fastcodegen")

# Buffers some transformers versions saved with the weights; not parameters.
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|bias|embed_positions)$")

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
# safetensors' dtype codes, by torch's names, for the error naming a source tensor's dtype.
_SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}
# Source weights the conversion can cast without losing their meaning.
_SOURCE_DTYPES = ("float32", "float16", "bfloat16", "float64")

# The temporary directory of a conversion into DST is `.<DST name>` + this + a random suffix.
PARTIAL_INFIX = ".partial-"
# Inside it, the file its converting process holds an exclusive flock on.
LOCK_FILE = ".fastcodegen-convert.lock"
# A partial directory without a lock file (an older fastcodegen's, or one killed
# between creating the directory and its lock) is removed once nothing in it
# has changed for this long.
UNLOCKED_PARTIAL_AGE_S = 3600.0
_COPY_CHUNK_BYTES = 16 << 20


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
                weight_map = read_json_file(p / index, "download the checkpoint again").get("weight_map")
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
                try:
                    self._opened[file] = safe_open(str(file), framework="pt", device="cpu")
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{file}: not a readable safetensors file ({e}); download it again") from None
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

    def dtype_name(self, name: str) -> str:
        """A tensor's dtype as torch names it ('float16', 'int64', ...), read without loading the tensor."""
        f = self._open(self._files[name])
        if self.format == "safetensors":
            code = f.get_slice(name).get_dtype()
            return _SAFETENSORS_DTYPE_NAMES.get(code, code)
        return dtype_name(f[name].dtype)

    def close(self) -> None:
        self._opened.clear()


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` as a dict of tensors, memory-mapped when the file allows it."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files in the legacy (pre-zip) format cannot be mapped.
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        # A truncated download, another format, pickled objects weights_only refuses to build, or bytes that
        # send the unpickler anywhere (IndexError, KeyError, struct.error, ...): all "not a checkpoint".
        raise ValueError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})"[:500]) from None
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
    """Every tensor present with its shape and a floating dtype, nothing unknown; raises naming the first bad tensor.

    Integer, bool and complex tensors (a quantized or damaged checkpoint)
    raise ValueError naming the tensor and its dtype: cast to floats they
    would convert into garbage.
    """
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
        dt = src.dtype_name(name)
        if dt not in _SOURCE_DTYPES:
            raise ValueError(
                f"{src.path}: tensor {name!r} has dtype {dt}; CodeGen weights are floating point "
                "(float32, float16 or bfloat16): is this a quantized or damaged checkpoint?"
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
    """Writes a safetensors file tensor by tensor, its header computed up front.

    `size` and `sha256` describe the bytes written so far: hashed as they are
    written, so no one reads the file back to checksum it.
    """

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
        self._hash = hashlib.sha256()
        self.size = 0
        self._file = open(path, "wb")
        self._put(len(blob).to_bytes(8, "little"))
        self._put(blob)

    def _put(self, data: "bytes | memoryview") -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, shape = next(self._order, (None, None))
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != self._dtype:
            raise AssertionError(f"writer expected {want} {shape}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._put(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

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
    missing, misshapen or not floating point, and naming the file when a
    config is unreadable or the checkpoint is not CodeGen. Returns `dst_dir`.

    The files are written into a locked temporary directory next to
    `dst_dir` and renamed into place at the end; `fastcodegen.json` records
    each file's size and sha256. Temporary directories that earlier
    conversions into `dst_dir` left behind when they were killed are removed
    first (`remove_stale_partials`).
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
        remove_stale_partials(dst_dir)
        with _locked_partial_dir(dst_dir) as tmp:
            _write(src, tmp, out_dtype, progress)
            # Unlocked now, yet freshly changed: other processes leave it alone until the rename.
            (tmp / LOCK_FILE).unlink()
            _fsync_dir(tmp)
            if dst_dir.exists():
                shutil.rmtree(dst_dir)
            os.replace(tmp, dst_dir)
            _fsync_dir(dst_dir.parent)
    finally:
        src.close()
    return dst_dir


@contextlib.contextmanager
def _locked_partial_dir(dst_dir: Path) -> Iterator[Path]:
    """A new temporary directory next to `dst_dir`, exclusively flocked while in use, removed on failure."""
    # A Ctrl-C between the directory's creation and the cleanup's reach would leave it behind: interrupts
    # wait until the directory is in hand, then arrive inside the try that removes it.
    deferred = _defer_interrupts()
    try:
        tmp = _new_partial_dir(dst_dir)
    except BaseException:
        _allow_interrupts(deferred)
        raise
    fd = None
    try:
        _allow_interrupts(deferred)
        fd = os.open(tmp / LOCK_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a file nobody else has opened yet: never waits
        except OSError as e:
            # A filesystem without locks: cleaners cannot lock it either, so they leave it alone.
            logger.info("cannot lock %s (%s): if this conversion is killed, remove it by hand", tmp, e)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def _defer_interrupts() -> Optional[set]:
    """Blocks SIGINT and SIGTERM for this thread; the mask to restore (None where signals cannot be masked)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)


def _allow_interrupts(previous: Optional[set]) -> None:
    """Restores the mask `_defer_interrupts` replaced; a signal that came meanwhile is delivered now."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _new_partial_dir(dst_dir: Path) -> Path:
    # Not tempfile.mkdtemp: its mode 0700 would stay on the converted directory after the rename.
    while True:
        tmp = dst_dir.parent / f".{dst_dir.name}{PARTIAL_INFIX}{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def remove_stale_partials(dst_dir: "str | Path") -> list[Path]:
    """Removes the temporary directories of dead conversions into `dst_dir`; returns those removed.

    A partial directory (`.<name>.partial-*` beside `dst_dir`) is removed when
    its lock file can be locked without waiting, that is when no process holds
    it: its conversion was killed. One without a lock file is removed only when
    nothing in it has changed for `UNLOCKED_PARTIAL_AGE_S`. Directories of
    live conversions, and anything else, are left alone.
    """
    dst_dir = Path(dst_dir).expanduser()
    prefix = f".{dst_dir.name}{PARTIAL_INFIX}"
    try:
        candidates = [p for p in dst_dir.parent.iterdir() if p.name.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for partial in candidates:
        if not partial.is_symlink() and partial.is_dir() and _remove_if_abandoned(partial):
            logger.info("removed %s, left behind by an interrupted conversion", partial)
            removed.append(partial)
    return removed


def _remove_if_abandoned(partial: Path) -> bool:
    try:
        fd = os.open(partial / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        try:
            idle = time.time() - _last_change(partial)
        except FileNotFoundError:
            return False  # renamed into place, or removed, meanwhile
        if idle < UNLOCKED_PARTIAL_AGE_S:
            return False
        shutil.rmtree(partial, ignore_errors=True)
        return not partial.exists()
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: its conversion is alive
        # Removed while holding the lock, so no other cleaner works on it at the same time.
        shutil.rmtree(partial, ignore_errors=True)
        return not partial.exists()
    finally:
        os.close(fd)


def _last_change(directory: Path) -> float:
    """The newest mtime of a directory and the files in it (a partial directory is flat)."""
    newest = directory.stat().st_mtime
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _fsync_dir(directory: Path) -> None:
    # Makes the directory's entries (new files, a rename) survive a power loss.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(src: SourceCheckpoint, out: Path, dtype: torch.dtype, progress: bool) -> None:
    from tqdm.auto import tqdm

    shapes = tensor_shapes(src.config)
    writer = _StreamingSafetensorsWriter(out / WEIGHTS_FILE, shapes, dtype, {"format": "pt", "fastcodegen": "1"})
    total = sum(_numel(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {src.path.name}", disable=not progress) as bar:
        for name, tensor in _converted_tensors(src, dtype):
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
    writer.close()
    files = {WEIGHTS_FILE: {"size": writer.size, "sha256": writer.sha256}}
    for name in TOKENIZER_FILES:
        if (src.path / name).is_file():
            files[name] = _copy_hashed(src.path / name, out / name)
    meta = converted_metadata(
        src.config, dtype, {"path": str(src.path), "format": src.format, "hf_config": src.hf_config}, files
    )
    # The config goes last: its presence marks a complete conversion.
    with open(out / CONFIG_FILE, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _copy_hashed(src: Path, dst: Path) -> dict[str, Any]:
    """Copies a file, durably; returns the `size` and `sha256` of what was written."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK_BYTES):
            fout.write(chunk)
            h.update(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return {"size": size, "sha256": h.hexdigest()}


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
    """The converted copy of `src_dir` in the cache, converting it on first use.

    A cache entry is checked with `verify_converted` (sizes, and hashes when a
    file changed since its last check): one that is damaged (a file missing,
    truncated or altered), unreadable, or of an older format is converted
    again, with a warning naming the bad file. Temporary directories of
    conversions into this entry that were killed are removed.
    """
    dst = (cache_root or default_cache_root()) / cache_key(src_dir, dtype)
    remove_stale_partials(dst)
    if is_converted(dst):
        try:
            verify_converted(dst, progress=progress)
            return dst
        except DamagedCheckpointError as e:
            logger.warning("cached conversion damaged: %s %s; converting %s again", e.file, e.problem, src_dir)
        except (ValueError, FileNotFoundError) as e:
            logger.warning("cached conversion unusable: %s; converting %s again", e, src_dir)
    try:
        return convert(src_dir, dst, dtype=dtype, progress=progress, overwrite=True)
    except OSError:
        # Another process may have finished the same conversion first.
        if is_converted(dst):
            return dst
        raise


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `fastcodegen convert`: SRC DST [--dtype] [--force] [--quiet], or --verify DIR."""
    p.add_argument("src", nargs="?", help="a transformers CodeGen checkpoint directory")
    p.add_argument("dst", nargs="?", help="where to write the converted checkpoint (a new directory)")
    p.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of converting, check a converted directory: every file's size and sha256 against those "
        "recorded at conversion",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="stored precision (default: the source's)",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, echo: Callable[[str], None] = print) -> int:
    """Runs `fastcodegen convert`; prints one `error: ...` line and returns 2 on a bad input or a damaged file."""
    try:
        if args.verify is not None:
            if args.src is not None or args.dst is not None:
                raise ValueError("--verify DIR checks a converted directory and takes no SRC or DST")
            echo(verify_converted(args.verify, full=True, progress=not args.quiet).summary())
            return 0
        if args.src is None or args.dst is None:
            raise ValueError("convert needs SRC and DST (or --verify DIR)")
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
