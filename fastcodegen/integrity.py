"""Whether a converted checkpoint's files are those its conversion wrote.

`fastcodegen.json` records the size and sha256 of every file a conversion
wrote (`files`). `verify_converted` checks them: sizes (and `model.safetensors`
against the byte ranges its own header gives) on every load, hashes on the
first load and whenever a file has changed since its last successful check
(`.fastcodegen-verified.json` remembers each verified file's sha256, size,
mtime, ctime and inode), and all of them on demand (`fastcodegen convert
--verify DIR`). A directory converted before checksums were recorded gets the
size checks only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .weights import CONFIG_FILE, WEIGHTS_FILE, fix_hint, read_converted_config

logger = logging.getLogger("fastcodegen")

# Which files passed a full check, and in what state (see `verify_converted`).
STAMP_FILE = ".fastcodegen-verified.json"
# safetensors refuses headers larger than this; a larger length field means damage.
_MAX_HEADER_BYTES = 100 << 20
_HASH_CHUNK_BYTES = 16 << 20


class DamagedCheckpointError(ValueError):
    """A file of a converted checkpoint is missing, truncated, or changed since the conversion wrote it."""

    def __init__(self, file: Path, problem: str, fix: str):
        super().__init__(f"{file}: {problem}; {fix}")
        self.file = file
        self.problem = problem


@dataclass(frozen=True)
class Verification:
    """What `verify_converted` checked in a converted directory (every check passed)."""

    path: Path
    sized: tuple[str, ...]  # files whose size was checked
    hashed: tuple[str, ...]  # files whose sha256 was computed now, and matched
    unchanged: tuple[str, ...]  # files that matched before and have not changed since: not hashed again
    checksums: bool  # False: converted before checksums were recorded; sizes only

    def summary(self) -> str:
        """One line for a person."""
        if not self.checksums:
            return (
                f"{self.path}: {WEIGHTS_FILE} has the size its header describes; no checksums are recorded "
                "(converted by an older fastcodegen): convert it again to record them"
            )
        n = len(self.hashed) + len(self.unchanged)
        files = f"{n} file{'s' if n != 1 else ''}"
        if self.unchanged:
            return (
                f"{self.path}: {files} intact (sizes match; {len(self.hashed)} hashed now, "
                f"{len(self.unchanged)} unchanged since their last sha256 check)"
            )
        return f"{self.path}: {files} intact (sizes and sha256 checksums match those recorded at conversion)"


def verify_converted(path: "str | Path", full: bool = False, progress: bool = False) -> Verification:
    """Checks that a converted checkpoint's files are those its conversion wrote.

    Always: `fastcodegen.json` reads, every file it records exists with its
    recorded size, and `model.safetensors` is exactly as long as the byte
    ranges in its header say (the one check possible for directories
    converted before checksums were recorded). Then each recorded file's
    sha256 is computed and compared, except, unless `full`, for files that
    matched before and whose size, mtime, ctime and inode have not changed
    since: a successful hash is remembered in `.fastcodegen-verified.json`
    (if the directory is writable; otherwise the files are hashed at every
    call, with a warning).

    Raises `DamagedCheckpointError` (a ValueError) naming the first bad file
    and how to fix it, ValueError for an unreadable `fastcodegen.json`, and
    FileNotFoundError when `path` holds no converted checkpoint.
    """
    path = Path(path).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a directory written by fastcodegen convert")
    _, meta = read_converted_config(path)
    fix = fix_hint(path, meta)
    recorded: dict[str, dict] = meta.get("files") or {}
    sized = []
    for name, rec in recorded.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise DamagedCheckpointError(file, "is missing", fix) from None
        if size != rec["size"]:
            what = "is truncated:" if size < rec["size"] else "has"
            raise DamagedCheckpointError(file, f"{what} {size} bytes, {CONFIG_FILE} records {rec['size']}", fix)
        sized.append(name)
    check_safetensors_size(path / WEIGHTS_FILE, fix)
    if not recorded:
        logger.info("%s records no checksums (converted by an older fastcodegen): sizes checked only", path)
        return Verification(path, (WEIGHTS_FILE,), (), (), checksums=False)

    stamps = {k: v for k, v in _read_stamps(path).items() if k in recorded}
    unchanged = [n for n, rec in recorded.items() if not full and stamps.get(n) == _file_state(path / n, rec["sha256"])]
    hashed = [n for n in recorded if n not in unchanged]
    if hashed:
        writer = _StampWriter(path)
        try:
            for name in hashed:
                file, sha256 = path / name, recorded[name]["sha256"]
                before = _file_state(file, sha256)
                if file_sha256(file, progress) != sha256:
                    raise DamagedCheckpointError(
                        file, f"its contents changed since the conversion (sha256 differs from {CONFIG_FILE}'s)", fix
                    )
                stamps.pop(name, None)
                if writer.can_trust(before, _file_state(file, sha256)):
                    stamps[name] = before
            writer.save(stamps)
        finally:
            writer.discard()
    return Verification(path, tuple(sized), tuple(hashed), tuple(unchanged), checksums=True)


def check_safetensors_size(file: Path, fix: str) -> None:
    """Raises DamagedCheckpointError unless `file` is as long as its safetensors header says (8 + header + data)."""
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise DamagedCheckpointError(file, f"is truncated: {size} bytes, not even a safetensors header", fix)
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise DamagedCheckpointError(
                    file, f"is truncated or damaged: its header claims {n} bytes, the file has {size}", fix
                )
            blob = fh.read(n)
    except FileNotFoundError:
        raise DamagedCheckpointError(file, "is missing", fix) from None
    try:
        header = json.loads(blob)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DamagedCheckpointError(
            file, f"its safetensors header is unreadable ({type(e).__name__}: {e})", fix
        ) from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise DamagedCheckpointError(file, f"is truncated: {size} bytes, its header describes {expected}", fix)
    if size > expected:
        raise DamagedCheckpointError(file, f"has {size} bytes, its header describes {expected}: data past the end", fix)


def file_sha256(file: Path, progress: bool = False) -> str:
    """The sha256 of a file, read in large chunks."""
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buf)
    with (
        open(file, "rb", buffering=0) as fh,
        tqdm(
            total=os.fstat(fh.fileno()).st_size,
            unit="B",
            unit_scale=True,
            desc=f"verifying {file.name}",
            disable=not progress,
        ) as bar,
    ):
        while n := fh.readinto(buf):
            h.update(view[:n])
            bar.update(n)
    return h.hexdigest()


def _file_state(file: Path, sha256: str) -> dict[str, Any]:
    # ctime and inode too: unlike mtime, no tool sets them back after changing a file.
    st = file.stat()
    return {
        "sha256": sha256,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def _read_stamps(path: Path) -> dict[str, Any]:
    # Only ever saves work: an unreadable stamp means hashing again.
    try:
        stamps = json.loads((path / STAMP_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


class _StampWriter:
    """The next stamp file, created before any hashing: its timestamp is the filesystem's clock at that moment.

    Timestamps are coarse (a clock tick, or more): a file changed in the tick
    the hashing starts in could change again unseen, its mtime and ctime the
    same. A hashed file is remembered only if its ctime is older than this
    file's and did not change while it was hashed (git's "racy clean" rule).
    """

    def __init__(self, path: Path):
        self._path = path
        self._tmp: Optional[str] = None
        self._now_ns = 0
        try:
            # Not tempfile.mkstemp, whose mode 0600 would hide the stamp from other users of a shared directory.
            self._tmp = str(path / f"{STAMP_FILE}.{secrets.token_hex(8)}")
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                self._now_ns = os.fstat(fd).st_ctime_ns
            finally:
                os.close(fd)
        except OSError as e:
            self._tmp = None
            self._warn(e)

    def can_trust(self, before: dict[str, Any], after: dict[str, Any]) -> bool:
        return self._tmp is not None and before == after and before["ctime_ns"] < self._now_ns

    def save(self, stamps: dict[str, Any]) -> None:
        if self._tmp is None:
            return
        try:
            with open(self._tmp, "w") as f:
                json.dump(stamps, f, indent=1)
            os.replace(self._tmp, self._path / STAMP_FILE)
            self._tmp = None
        except OSError as e:
            self._warn(e)

    def discard(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None

    def _warn(self, e: OSError) -> None:
        logger.warning(
            "could not record the verification of %s (%s): its files will be hashed again at the next load",
            self._path,
            e,
        )
