"""Conversion and the converted cache under faults.

Killed conversions leave temporary directories that a later conversion
removes, never one a live process is writing (checked with real second
processes, one of them killed with SIGKILL mid-conversion); every written
file's size and sha256 is recorded, computed here independently with
hashlib, and checked on load: a truncated or altered file is converted again
in the engine's cache and named in a ValueError for a directory given
directly; truncated JSON configs and non-floating source tensors are named
in a ValueError.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastcodegen.cli as cli
import fastcodegen.convert as convert_mod
import fastcodegen.integrity as integrity_mod
from conftest import TOKENIZER_SIZE, copy_checkpoint, hf_greedy, rewrite_weights
from fastcodegen import Engine, SamplingParams
from fastcodegen.convert import LOCK_FILE, UNLOCKED_PARTIAL_AGE_S, convert, ensure_converted, remove_stale_partials
from fastcodegen.integrity import DamagedCheckpointError, verify_converted

NEW_TOKENS = 6


def _partials(dst: Path) -> list[Path]:
    return sorted(p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial-"))


def _converted_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("fastcodegen.json")) if root.exists() else []


def _assert_matches_transformers(engine: Engine, hf) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, TOKENIZER_SIZE, (n,), generator=g).tolist() for n in (5, 11)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"prompt {prompt}"


def _data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _flip_bytes(file: Path, seed: int, keep_times: bool = False) -> None:
    """Inverts 16 bytes at a random place in the tensor data: same size, other contents."""
    st = file.stat()
    start = _data_start(file)
    offset = start + int(torch.randint(0, st.st_size - start - 16, (1,), generator=torch.Generator().manual_seed(seed)))
    with open(file, "r+b") as f:
        f.seek(offset)
        old = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    if keep_times:
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file.stat().st_size == st.st_size


def _truncate(file: Path, keep: int) -> None:
    with open(file, "r+b") as f:
        f.truncate(keep)


def _settle(directory: Path) -> None:
    """Waits until the filesystem's clock has moved past the last change of the files in `directory`.

    Timestamps are coarse (a clock tick, up to seconds on some filesystems): a
    file changed in the tick its hashing starts in is never remembered as
    verified, so a test expecting it to be must first let the tick pass.
    """
    last = max(f.stat().st_ctime_ns for f in directory.iterdir())
    probe = directory.parent / ".clock-probe"
    deadline = time.monotonic() + 5.0
    while True:
        probe.write_bytes(b"")
        ahead = probe.stat().st_ctime_ns > last
        probe.unlink()
        if ahead or time.monotonic() > deadline:
            return
        time.sleep(0.01)


# --------------------------------------------------------------------------- temporary directories of killed conversions

# A conversion that stops in the middle of layer 1 (after writing layer 0) and waits to be killed.
_SLOW_CONVERSION = r"""
import sys, time
from pathlib import Path
import fastcodegen.convert as c

src, dst, marker = sys.argv[1:4]
real = c.convert_layer

def slow(source, i, dtype):
    if i == 1:
        Path(marker).write_text("in layer 1")
        time.sleep(600)
    return real(source, i, dtype)

c.convert_layer = slow
c.convert(src, dst, progress=False)
"""

# Holds an exclusive flock on argv[1] until its standard input closes.
_LOCK_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the converting process exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the converting process never reached layer 1")
        time.sleep(0.05)


def test_killed_conversion_is_cleaned_up_by_the_next_one(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    dst = tmp_path / "out" / "c"
    marker, log = tmp_path / "in-layer-1", tmp_path / "child.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_CONVERSION, str(src), str(dst), str(marker)], stdout=err, stderr=err
        )
    try:
        _wait_for(marker, proc, log)
        [partial] = _partials(dst)
        assert (partial / LOCK_FILE).is_file() and (partial / "model.safetensors").stat().st_size > 0

        # Another conversion into the same destination while the first is alive: it never touches the live one.
        convert(src, dst, progress=False)
        assert _partials(dst) == [partial] and (partial / "model.safetensors").is_file()
        assert verify_converted(dst, full=True).checksums
        assert LOCK_FILE not in os.listdir(dst)

        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        assert _partials(dst) == [partial]  # nothing ran in the killed process to clean up
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The next conversion into the same place removes the dead one's directory.
    convert(src, dst, progress=False, overwrite=True)
    assert _partials(dst) == []
    assert sorted(p.name for p in dst.parent.iterdir()) == ["c"]
    verify_converted(dst, full=True)


def _fake_partial(parent: Path, name: str, lock: bool) -> Path:
    p = parent / name
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"\0" * 64)
    if lock:
        (p / LOCK_FILE).write_text("12345\n")
    return p


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    dst = parent / "c"
    dst.mkdir()
    live = _fake_partial(parent, ".c.partial-live", lock=True)
    dead = _fake_partial(parent, ".c.partial-dead", lock=True)  # a lock file nobody holds: its writer died
    young = _fake_partial(parent, ".c.partial-young", lock=False)  # no lock file yet, just created
    old = _fake_partial(parent, ".c.partial-old", lock=False)  # no lock file, untouched for long
    past = time.time() - UNLOCKED_PARTIAL_AGE_S - 60
    for path in (old / "model.safetensors", old):
        os.utime(path, (past, past))
    other = _fake_partial(parent, ".d.partial-dead", lock=True)  # another destination's
    not_a_dir = parent / ".c.partial-file"
    not_a_dir.write_text("x")

    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(live / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = remove_stale_partials(dst)
        assert sorted(removed) == sorted([dead, old])
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            ["c", live.name, young.name, other.name, not_a_dir.name]
        )
        assert (live / "model.safetensors").is_file() and (live / LOCK_FILE).is_file()
        # Its lock still held by the other process: a second pass keeps it too.
        assert remove_stale_partials(dst) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # Its process gone, the lock is free: the directory is stale now.
    assert remove_stale_partials(dst) == [live]
    assert sorted(p.name for p in parent.iterdir()) == sorted(["c", young.name, other.name, not_a_dir.name])


def test_lock_is_held_for_the_whole_conversion(checkpoint, tmp_path, monkeypatch):
    """While the layers are written, the partial directory's lock cannot be taken (from another open file)."""
    src, _ = checkpoint("hd64")
    dst = tmp_path / "out" / "c"
    real = convert_mod.convert_layer
    seen = []

    def probing(source, i, dtype):
        [partial] = _partials(dst)
        fd = os.open(partial / LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert remove_stale_partials(dst) == []
        seen.append(i)
        return real(source, i, dtype)

    monkeypatch.setattr(convert_mod, "convert_layer", probing)
    convert(src, dst, progress=False)
    assert seen == [0, 1]
    assert _partials(dst) == [] and LOCK_FILE not in os.listdir(dst)


def test_cache_hit_removes_stale_partials(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    cache = tmp_path / "cache"
    entry = ensure_converted(src, torch.float32, cache, progress=False)
    dead = _fake_partial(entry.parent, f".{entry.name}.partial-dead", lock=True)
    assert ensure_converted(src, torch.float32, cache, progress=False) == entry
    assert not dead.exists()


def test_converted_directory_has_ordinary_permissions(checkpoint, tmp_path):
    """The umask decides, as for any directory: a converted checkpoint can be shared."""
    src, _ = checkpoint("hd64")
    umask = os.umask(0o022)
    os.umask(umask)
    dst = convert(src, tmp_path / "c", progress=False)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~umask
    verify_converted(dst)
    assert stat.S_IMODE((dst / integrity_mod.STAMP_FILE).stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------- recorded checksums


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_conversion_records_size_and_sha256_of_every_file(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    files = json.loads((dst / "fastcodegen.json").read_text())["files"]
    written = sorted(p.name for p in dst.iterdir() if p.name != "fastcodegen.json")
    assert sorted(files) == written and "model.safetensors" in written and "tokenizer.json" in written
    for name, rec in files.items():
        assert rec == {"size": (dst / name).stat().st_size, "sha256": _sha256(dst / name)}, name


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not os.access("/proc/self/io", os.R_OK), reason="needs Linux's /proc/self/io")
def test_conversion_hashes_without_reading_the_file_back(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    convert(src, tmp_path / "warm-up", progress=False)  # imports and caches, so they do not count below
    before = _bytes_read()
    dst = convert(src, tmp_path / "c", progress=False)
    read = _bytes_read() - before
    size = (dst / "model.safetensors").stat().st_size
    # The source is memory-mapped and only the small tokenizer files are read:
    # reading the 7 MB output back to hash it would show here.
    assert read < size // 2, (read, size)


def test_hashes_are_checked_once_then_when_a_file_changes(checkpoint, tmp_path, monkeypatch, fresh_seed):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    recorded = sorted(json.loads((dst / "fastcodegen.json").read_text())["files"])
    weights = dst / "model.safetensors"
    real = integrity_mod.file_sha256
    hashed = []
    monkeypatch.setattr(integrity_mod, "file_sha256", lambda f, progress=False: hashed.append(f.name) or real(f))

    def check(full=False) -> list[str]:
        hashed.clear()
        verify_converted(dst, full=full)
        return sorted(hashed)

    _settle(dst)
    assert check() == recorded  # the first load hashes everything
    assert check() == []  # unchanged since: sizes only
    assert check(full=True) == recorded  # on demand: everything again
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    _settle(dst)
    assert check() == ["model.safetensors"]
    assert check() == []

    # Altered in place, same size, mtime set back: still caught (ctime changed).
    _flip_bytes(weights, fresh_seed, keep_times=True)
    with pytest.raises(DamagedCheckpointError) as e:
        verify_converted(dst)
    assert e.value.file == weights and "sha256" in str(e.value)
    with pytest.raises(DamagedCheckpointError):
        verify_converted(dst)  # and never remembered as good


def test_unwritable_directory_still_verifies(checkpoint, tmp_path, monkeypatch, caplog):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)

    real_open = os.open

    def refuse_in_dst(file, *args, **kwargs):  # as a read-only directory would
        if Path(file).parent == dst and kwargs.get("flags", args[0] if args else 0) & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_in_dst)
    with caplog.at_level(logging.WARNING, logger="fastcodegen"):
        first = verify_converted(dst)
    assert "could not record the verification" in caplog.text and str(dst) in caplog.text
    assert sorted(first.hashed) == sorted(json.loads((dst / "fastcodegen.json").read_text())["files"])
    assert verify_converted(dst).hashed == first.hashed  # nothing remembered: hashed again


# --------------------------------------------------------------------------- damaged converted checkpoints


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_cache_entry_is_converted_again(checkpoint, tmp_path, monkeypatch, caplog, damage, fresh_seed):
    src, hf = checkpoint("hd64")
    cache = tmp_path / "cache"
    Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))  # converts, and verifies once
    [entry] = _converted_dirs(cache)
    weights = entry / "model.safetensors"
    if damage == "truncated":
        _truncate(weights, weights.stat().st_size - 1000)
    else:
        _flip_bytes(weights, fresh_seed, keep_times=True)

    real = convert_mod.convert
    calls = []
    monkeypatch.setattr(convert_mod, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="fastcodegen"):
        engine = Engine(str(src), device="cpu", progress=False, cache_dir=str(cache))
    assert len(calls) == 1
    assert str(weights) in caplog.text and "again" in caplog.text
    assert _converted_dirs(cache) == [entry]
    verify_converted(entry, full=True)
    _assert_matches_transformers(engine, hf)


@pytest.mark.parametrize("damage", ["fastcodegen.json", "tokenizer.json"])
def test_other_damaged_cache_files_are_converted_again(checkpoint, tmp_path, caplog, damage):
    src, _ = checkpoint("hd64")
    cache = tmp_path / "cache"
    entry = ensure_converted(src, torch.float32, cache, progress=False)
    if damage == "fastcodegen.json":
        _truncate(entry / damage, 100)
    else:
        (entry / damage).unlink()
    with caplog.at_level(logging.WARNING, logger="fastcodegen"):
        assert ensure_converted(src, torch.float32, cache, progress=False) == entry
    assert str(entry / damage) in caplog.text
    verify_converted(entry, full=True)


def _damage(dst: Path, how: str, seed: int) -> Path:
    """Damages a converted directory; returns the file now bad."""
    weights = dst / "model.safetensors"
    if how == "truncated":
        _truncate(weights, weights.stat().st_size - 4096)
    elif how == "header-only":
        _truncate(weights, _data_start(weights))
    elif how == "altered":
        _flip_bytes(weights, seed)
    elif how == "trailing-data":
        with open(weights, "ab") as f:
            f.write(b"\0" * 8)
    elif how == "tokenizer-missing":
        (dst / "tokenizer.json").unlink()
        return dst / "tokenizer.json"
    return weights


@pytest.mark.parametrize("how", ["truncated", "header-only", "altered", "trailing-data", "tokenizer-missing"])
def test_damaged_converted_directory_given_directly_raises(checkpoint, tmp_path, how, fresh_seed):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    bad = _damage(dst, how, fresh_seed)
    with pytest.raises(ValueError) as e:
        Engine(str(dst), device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert str(bad) in msg, msg
    assert f"fastcodegen convert {src} {dst} --force" in msg, msg
    assert not (tmp_path / "cache").exists()  # a directory given directly is never converted behind one's back


@pytest.mark.parametrize("how", ["truncated", "header-only", "trailing-data"])
def test_old_converted_directory_without_checksums(checkpoint, tmp_path, how, fresh_seed):
    """Directories converted before checksums were recorded: loaded, their size checked against the header."""
    src, hf = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    meta = json.loads((dst / "fastcodegen.json").read_text())
    del meta["files"]
    (dst / "fastcodegen.json").write_text(json.dumps(meta))
    result = verify_converted(dst, full=True)
    assert not result.checksums and result.hashed == () and "no checksums" in result.summary()
    if how == "truncated":
        _assert_matches_transformers(Engine(str(dst), device="cpu", progress=False), hf)
    bad = _damage(dst, how, fresh_seed)
    with pytest.raises(ValueError) as e:
        Engine(str(dst), device="cpu", progress=False)
    assert str(bad) in str(e.value) and "header" in str(e.value)


# --------------------------------------------------------------------------- fastcodegen convert --verify


def test_verify_command(checkpoint, tmp_path, capsys, fresh_seed):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    assert cli.main(["convert", "--verify", str(dst), "--quiet"]) == 0
    out = capsys.readouterr().out
    n = len(json.loads((dst / "fastcodegen.json").read_text())["files"])
    assert str(dst) in out and f"{n} files intact" in out

    _flip_bytes(dst / "model.safetensors", fresh_seed, keep_times=True)
    assert cli.main(["convert", "--verify", str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(dst / "model.safetensors") in err[0]

    assert cli.main(["convert", "--verify", str(tmp_path / "nothing-here"), "--quiet"]) == 2
    assert "nothing-here" in capsys.readouterr().err
    assert cli.main(["convert", "--verify", str(dst), str(src), "--quiet"]) == 2
    assert "--verify" in capsys.readouterr().err
    assert cli.main(["convert", str(src), "--quiet"]) == 2
    assert "SRC and DST" in capsys.readouterr().err


# --------------------------------------------------------------------------- unreadable JSON


def test_truncated_checkpoint_config_is_named(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    bad = copy_checkpoint(src, tmp_path / "bad")
    config = bad / "config.json"
    config.write_bytes(config.read_bytes()[:40])
    with pytest.raises(ValueError, match="not valid JSON") as e:
        convert(bad, tmp_path / "out" / "c", progress=False)
    assert str(config) in str(e.value)
    assert not (tmp_path / "out" / "c").exists()
    with pytest.raises(ValueError) as e:
        Engine(str(bad), device="cpu", progress=False, cache_dir=str(tmp_path / "cache"))
    assert str(config) in str(e.value)

    config.write_bytes(b"\xff\xfe{not text")
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out" / "c", progress=False)
    assert str(config) in str(e.value)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out" / "c", progress=False)
    assert str(config) in str(e.value)


def test_truncated_shard_index_is_named(checkpoint, tmp_path):
    src, _ = checkpoint("hd64", "sharded-safetensors")
    bad = copy_checkpoint(src, tmp_path / "bad")
    index = bad / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes()[:-20])
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out", progress=False)
    assert str(index) in str(e.value)


def test_truncated_converted_config_given_directly_is_named(checkpoint, tmp_path):
    src, _ = checkpoint("hd64")
    dst = convert(src, tmp_path / "c", progress=False)
    config = dst / "fastcodegen.json"
    config.write_bytes(config.read_bytes()[:-30])
    with pytest.raises(ValueError) as e:
        Engine(str(dst), device="cpu", progress=False)
    assert str(config) in str(e.value) and "convert" in str(e.value)


# --------------------------------------------------------------------------- source dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_source_tensor_raises(checkpoint, tmp_path, dtype):
    src, _ = checkpoint("hd64")
    name = "transformer.h.1.mlp.fc_in.weight"

    def edit(t):
        t[name] = t[name].to(dtype)

    bad = rewrite_weights(copy_checkpoint(src, tmp_path / "bad"), edit)
    dst = tmp_path / "out" / "c"
    with pytest.raises(ValueError) as e:
        convert(bad, dst, progress=False)
    msg = str(e.value)
    assert name in msg and str(dtype).removeprefix("torch.") in msg, msg
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_non_floating_bin_tensor_raises(checkpoint, tmp_path):
    src, _ = checkpoint("hd64", "bin")
    bad = copy_checkpoint(src, tmp_path / "bad")
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.int64)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out", progress=False)
    assert "lm_head.weight" in str(e.value) and "int64" in str(e.value)


@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_other_floating_sources_convert(checkpoint, tmp_path, source_dtype):
    src, hf = checkpoint("hd64", dtype=source_dtype)
    dst = convert(src, tmp_path / "c", dtype="float32", progress=False)
    got = load_file(str(dst / "model.safetensors"))
    # hf holds the checkpoint's values in float32; the qkv rows are permuted, so compare the untouched ones.
    assert torch.equal(got["lm_head.weight"], hf.lm_head.weight.detach())
    assert torch.equal(got["layers.1.b_out"], hf.transformer.h[1].mlp.fc_out.bias.detach())


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "unpickler-stack"])
def test_unreadable_source_weights_raise_naming_the_file(checkpoint, tmp_path, fmt, damage):
    src, _ = checkpoint("hd64", fmt)
    bad = copy_checkpoint(src, tmp_path / "bad")
    weights = bad / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")
    data = weights.read_bytes()
    if damage == "unpickler-stack":
        data = b"\x80\x02q\x00"  # a legacy pickle storing an empty stack's top: IndexError inside torch.load
    weights.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)) if damage == "garbage" else data
    )
    with pytest.raises(ValueError) as e:
        convert(bad, tmp_path / "out", progress=False)
    assert str(weights) in str(e.value)
