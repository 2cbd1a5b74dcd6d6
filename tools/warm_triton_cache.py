"""Fills a Triton kernel cache for an H100/H200 (sm_90) on a machine without a GPU.

On first use Triton compiles each kernel specialisation it meets (seconds
each, about 450 over the models, dtypes, batch sizes and token counts the
engine runs) and builds a small C launcher per argument pattern.
This tool makes them all ahead of time, into a directory that a GPU
machine's Triton reads as its cache (TRITON_CACHE_DIR), so a short GPU run
spends its time running kernels instead.

A cache entry is found by a hash of: Triton itself (the source of its
compiler and the libtriton binary: the same wheel), the kernel's source and
line numbers (and of every @triton.jit function it calls), the launch's
specialisation (argument types, constexpr values, integers equal to 1, and
which pointers and integers are divisible by 16), the target (cuda, sm_90,
warp 32) and ptxas's version, the compile options (num_warps, ...; also
PTXAS_OPTIONS, TRITON_DEBUG, TRITON_DEFAULT_FP_FUSION, ...) and the
cache-invalidating environment variables that are set. So the tool runs the
GPU machine's Triton and Python minor: triton 3.6.0 (the PyPI wheel) on
Python 3.12, with torch 2.11.0 (its CUDA wheel imports without a GPU). It
drives every engine step of `benchmarks/kernel_launches.py`'s `warm_plan` (the
same calls the model's `Ops` makes over the Triton kernels' table, on meta
tensors) through Triton's own JIT, with a stand-in for the CUDA driver that
reports an sm_90 device and launches nothing: the keys are Triton's,
computed by Triton.

Setup, once (outside the repository; a few GB, mostly torch's CUDA libraries):

    python3.12 -m venv /work/venv312
    /work/venv312/bin/pip install triton==3.6.0 torch==2.11.0 safetensors numpy

Fill the cache (about 15 minutes on two cores), then check it from fresh
processes at another path (every launch must hit, no entry may be added):

    /work/venv312/bin/python tools/warm_triton_cache.py warm --jobs 2
    /work/venv312/bin/python tools/warm_triton_cache.py verify

The result, `.cache/triton-sm90/` by default: kernel entries pruned to what a
cache hit reads (the cubin and its metadata), the launchers, and
`manifest.json` (versions, target, one row per entry). On the GPU machine,
before anything imports Triton:

    export TRITON_CACHE_DIR="$PWD/.cache/triton-sm90"
    python tools/warm_triton_cache.py install "$TRITON_CACHE_DIR"   # paths + a key check, one line
    ...                                                              # the GPU run
    python tools/warm_triton_cache.py report "$TRITON_CACHE_DIR"    # entries it had to add: misses

`install` rewrites the absolute paths Triton keeps in each entry's group
file (without it every entry misses) and says whether this machine's
Triton, ptxas, kernels and environment give the keys the cache was made
with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "triton-sm90"
MANIFEST = "manifest.json"
TRITON_VERSION = "3.6.0"
PYTHON_MINOR = (3, 12)
TARGET = ("cuda", 90, 32)  # GPUTarget of an H100/H200
NUM_SMS = 132  # H100 SXM, H200: the split-K plans depend on it
MAX_SHARED = 232448  # bytes of shared memory per block an sm_90 kernel may use
# Environment variables that change a key through the compile options, or make Triton skip its cache. The
# cache-invalidating ones that enter the key directly come from Triton itself (get_cache_invalidating_env_vars).
KEY_ENV = (
    "PTXAS_OPTIONS",
    "TRITON_DEBUG",
    "TRITON_OVERRIDE_ARCH",
    "TRITON_INSTRUMENTATION_MODE",
    "TRITON_PTXAS_PATH",
    "TRITON_MOCK_PTX_VERSION",
    "TRITON_LIBDEVICE_PATH",
    "TRITON_ALWAYS_COMPILE",
    "TRITON_CACHE_MANAGER",
    "TRITON_INTERPRET",
    "TRITON_DEFAULT_FP_FUSION",
)


class ToolError(Exception):
    """A problem the user can fix: printed as one `error:` line."""


# ---------------------------------------------------------------------------------------------------------
# Cache directory handling: standard library only, so `install` and `report` run on any Python.
# ---------------------------------------------------------------------------------------------------------


def relocate(cache_dir: Path) -> int:
    """Points every entry's group file at the files in `cache_dir` as it lies now; returns the entries seen.

    Triton's group file lists its entry's files by absolute path and treats
    a missing file as a miss, so a cache moved to another directory (or
    machine) misses everywhere until its group files are rewritten.
    """
    cache_dir = cache_dir.resolve()
    n = 0
    for group in cache_dir.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        children = data.get("child_paths")
        if not isinstance(children, dict):
            raise ToolError(f"{group}: not a Triton group file")
        data["child_paths"] = {name: str(group.parent / name) for name in children}
        group.write_text(json.dumps(data))
        n += 1
    return n


def read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise ToolError(f"{path} does not exist: make the cache with `warm` first")
    return json.loads(path.read_text())


def entry_dirs(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.is_dir()}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_entry(entry: Path) -> str:
    """What a cache entry holds: the kernel's name and warps, or the C module's file name."""
    for meta in entry.glob("*.json"):
        if meta.name.startswith("__grp__"):
            continue
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        return f"kernel {data.get('name', meta.stem)} num_warps={data.get('num_warps')}"
    files = sorted(p.name for p in entry.iterdir())
    return "module " + (", ".join(files) if files else "(empty)")


# ---------------------------------------------------------------------------------------------------------
# The Triton side: runs with the GPU machine's Triton (warm, verify) or on the GPU machine (install's check).
# ---------------------------------------------------------------------------------------------------------


def _import_kernel_launches() -> Any:
    """benchmarks/kernel_launches.py, importable where fastcodegen is not installed (its native extension is built
    for another Python): its pure-Python modules then load from the repository, `kernels/` as
    `fastcodegen.kernels`, without running the package's __init__."""
    import types

    try:
        import fastcodegen.kernels  # noqa: F401
    except ImportError:
        for name in [m for m in sys.modules if m == "fastcodegen" or m.startswith("fastcodegen.")]:
            del sys.modules[name]  # what the failed import left, bound to a package object it dropped
        for name, path in (("fastcodegen", ROOT / "fastcodegen"), ("fastcodegen.kernels", ROOT / "kernels")):
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_launches

    return kernel_launches


def _stub_libcuda(where: Path) -> Path:
    """A libcuda.so.1 whose every function (each one cuda.h names) fails: to link and load Triton's C modules.

    Linked against it, a module records libcuda.so.1 as a needed library, as
    it would on a GPU machine (linkers drop a library none of whose symbols
    a module uses), so that there its CUDA calls bind to the real driver.
    """
    from triton.backends.nvidia import driver as nvidia

    lib = where / "libcuda.so.1"
    if not lib.exists():
        header = Path(nvidia.include_dirs[0], "cuda.h").read_text()
        names = sorted(
            set(re.findall(r"\b(cu[A-Z]\w*)\s*\(", header)) | set(re.findall(r"#define\s+cu\w+\s+(cu\w+)", header))
        )
        src = where / "libcuda_stub.c"
        src.write_text("".join(f"int {name}(void) {{ return 999; }}\n" for name in names))  # CUDA_ERROR_UNKNOWN
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise ToolError("no C compiler (gcc or clang) to build Triton's launchers: install one or set CC")
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", str(src), "-o", str(lib)], check=True)
    return lib


class OfflineCudaDriver:
    """Triton's active driver on a machine without a GPU: an sm_90 device 0 that launches nothing.

    What `JITFunction.run` asks before its cache lookup (device, stream,
    target) is answered as an H100/H200 would; compiling then goes through
    Triton unchanged. Loading a kernel checks its shared memory and threads
    against sm_90's limits; each launch's C launcher is built (so it lands
    in the cache) but never called.
    """

    def __init__(self, build_launchers: bool):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaLauncher

        self.target = GPUTarget(*TARGET)
        self.utils = self
        self._build = build_launchers
        self._launcher = CudaLauncher

    def launcher_cls(self, src: Any, metadata: Any) -> Any:
        if self._build:
            self._launcher(src, metadata)
        return lambda *args, **kwargs: None

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_device_properties(self, device: int) -> dict:
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": NUM_SMS}

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        return "offline", "offline", 0, 0, 1024  # module, function (not None: loaded), registers, spills, threads


def _check_versions() -> None:
    import triton

    if sys.version_info[:2] != PYTHON_MINOR or triton.__version__ != TRITON_VERSION:
        raise ToolError(
            f"run this with Python {'.'.join(map(str, PYTHON_MINOR))} and triton {TRITON_VERSION} (the GPU "
            f"machine's), not Python {platform.python_version()} and triton {triton.__version__}: see the setup "
            "in this file's docstring"
        )


def _key_env() -> dict[str, str]:
    """The environment variables set now that change keys or bypass the cache."""
    from triton._C.libtriton import get_cache_invalidating_env_vars

    found = dict(get_cache_invalidating_env_vars())
    found.update({k: os.environ[k] for k in KEY_ENV if k in os.environ})
    return found


def _setup_triton(build_launchers: bool, work: Path) -> None:
    """Makes this process's Triton compile for an offline sm_90 device (TRITON_CACHE_DIR is already set)."""
    _check_versions()
    from triton import knobs
    from triton.runtime.driver import driver

    if knobs.runtime.interpret:
        raise ToolError("TRITON_INTERPRET is set: unset it (kernels must compile, not be interpreted)")
    env = _key_env()
    if env:
        raise ToolError(f"unset {', '.join(sorted(env))}: they change the cache keys a default GPU run computes")
    if build_launchers:
        import ctypes

        lib = _stub_libcuda(work)
        knobs.nvidia.libcuda_path = str(lib.parent)
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # found by its soname when a module is loaded here
    driver.set_active(OfflineCudaDriver(build_launchers))


def _build_driver_utils() -> None:
    """The CUDA driver's own C module (cuda_utils), which a GPU run builds before its first launch."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.build import compile_module_from_src

    compile_module_from_src(
        src=Path(nvidia.dirname, "driver.c").read_text(),
        name="cuda_utils",
        library_dirs=nvidia.library_dirs(),
        include_dirs=nvidia.include_dirs,
        libraries=nvidia.libraries,
    )


@dataclass
class Compiled:
    """One kernel compile (or cache hit) seen by Triton's compilation listener."""

    kernel: str
    key: str
    cache_hit: bool
    launch: str
    signature: dict
    constexprs: dict
    num_warps: int
    seconds: float


def _summary(src: Any, metadata: dict) -> tuple[dict, dict]:
    """(signature with '/16' on arguments specialised as divisible by 16, constexprs by name) of a compile."""
    names = src.fn.arg_names
    divisible = {k[0] for k, v in src.attrs.items() if ["tt.divisibility", 16] in v}
    sig = {
        name: ty + ("/16" if names.index(name) in divisible else "")
        for name, ty in src.signature.items()
        if ty != "constexpr"
    }
    consts = {names[k[0]]: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in src.constants.items()}
    return sig, consts


def drive(plan: list, label: list[str], seen: list[Compiled], progress: bool) -> None:
    """Runs every step of the plan through the real kernels (Triton's JIT, the active driver)."""
    from triton import knobs

    def listener(*, src: Any, metadata: dict, metadata_group: dict, times: Any, cache_hit: bool) -> None:
        sig, consts = _summary(src, metadata)
        stages = times.ir_initialization + sum(t for _, t in times.lowering_stages) + times.store_results
        seconds = stages / 1e6
        name = src.fn.__name__
        seen.append(Compiled(name, metadata["hash"], cache_hit, label[0], sig, consts, metadata["num_warps"], seconds))
        if progress:
            state = "hit " if cache_hit else f"{seconds:5.1f}s"
            print(f"[{len(seen):4d}] {state} {src.fn.__name__:<24} {label[0]}", file=sys.stderr, flush=True)

    kc = _import_kernel_launches()
    knobs.compilation.listener = listener
    try:
        for shape, steps in plan:
            state = kc.prepare(shape)
            for step in steps:
                label[0] = f"{shape.describe()} {step}"
                kc.run_step(shape, state, step)
    finally:
        knobs.compilation.listener = None


def _plan(args: argparse.Namespace) -> list:
    import torch

    kc = _import_kernel_launches()
    return kc.warm_plan(
        models=args.models, dtypes=[getattr(torch, d) for d in args.dtypes], test_shapes=not args.no_test_shapes
    )


def _shard(plan: list, shard: int, shards: int) -> list:
    """Every `shards`-th item of the plan from `shard`, the costliest (largest models) spread first."""
    order = sorted(range(len(plan)), key=lambda i: -plan[i][0].config.n_embd * len(plan[i][1]))
    return [plan[i] for i in order[shard::shards]]


def cmd_worker(args: argparse.Namespace) -> int:
    """One process's share of `warm` or `verify`: results as JSON to args.result."""
    work = Path(args.work)
    _setup_triton(not args.no_launchers, work)
    if not args.no_launchers and args.shard == 0:
        _build_driver_utils()
    seen: list[Compiled] = []
    label = [""]
    drive(_shard(_plan(args), args.shard, args.shards), label, seen, progress=not args.quiet)
    Path(args.result).write_text(json.dumps([vars(c) for c in seen]))
    return 0


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--models", *args.models, "--dtypes", *args.dtypes]
    if args.no_test_shapes:
        out.append("--no-test-shapes")
    if args.no_launchers:
        out.append("--no-launchers")
    if args.quiet:
        out.append("--quiet")
    return out


def _run_workers(args: argparse.Namespace, cache: Path, work: Path) -> list[dict]:
    """Runs args.jobs worker processes over the plan with TRITON_CACHE_DIR=cache; their Compiled rows."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    procs = []
    for i in range(args.jobs):
        result = work / f"result-{i}.json"
        cmd = [sys.executable, __file__, "worker", "--shard", str(i), "--shards", str(args.jobs)]
        cmd += ["--work", str(work), "--result", str(result), *_worker_args(args)]
        procs.append((subprocess.Popen(cmd, env=env), result))
    rows: list[dict] = []
    failed = [p.args for p, _ in procs if p.wait() != 0]
    if failed:
        raise ToolError(f"{len(failed)} worker(s) failed (their output is above)")
    for _, result in procs:
        rows += json.loads(result.read_text())
    return rows


def prune(cache: Path) -> int:
    """Keeps in each kernel entry what a cache hit reads, the cubin and its metadata; returns bytes removed.

    On a hit Triton reads the group file, the metadata JSON and every file
    the group lists, and launches the cubin: the IRs (ttir, ttgir, llir,
    ptx, source) are for debugging and recompiling, not for running.
    """
    removed = 0
    for group in cache.glob("*/__grp__*.json"):
        children = json.loads(group.read_text())["child_paths"]
        keep = {name: path for name, path in children.items() if name.endswith((".json", ".cubin"))}
        for name in set(children) - set(keep):
            f = group.parent / name
            if f.exists():
                removed += f.stat().st_size
                f.unlink()
        group.write_text(json.dumps({"child_paths": keep}))
    for tmp in cache.glob("*/tmp.pid_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


def _fingerprint(kc: Any) -> dict:
    """What the keys depend on besides each launch: Triton, ptxas and the target, the kernels' sources."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    backend_hash = make_backend(GPUTarget(*TARGET)).hash()
    kernels = {}
    for module, name in kc.kernel_modules():
        fn = getattr(module, name)
        kernels[name] = {
            "file": os.path.relpath(fn.fn.__code__.co_filename, ROOT),
            "line": fn.starting_line_number,
            "cache_key": fn.cache_key,
        }
    return {
        "triton": triton.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": f"{platform.machine()} {platform.system()}",
        "target": dict(zip(("backend", "arch", "warp_size"), TARGET)),
        "num_sms": NUM_SMS,
        "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest(),
        "backend_hash_sha256": hashlib.sha256(backend_hash.encode()).hexdigest(),
        "ptxas": next((line for line in backend_hash.splitlines() if "release" in line), backend_hash[:200]),
        "env_vars": _key_env(),
        "kernels": kernels,
    }


def _fingerprint_subprocess() -> dict:
    """`_fingerprint` from a fresh process (this one's Triton may already be set up otherwise)."""
    with tempfile.TemporaryDirectory(prefix="triton-fingerprint.") as scratch:
        out = subprocess.run(
            [sys.executable, __file__, "fingerprint"],
            env=dict(os.environ, TRITON_CACHE_DIR=scratch),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Prints `_fingerprint` as JSON."""
    _check_versions()
    print(json.dumps(_fingerprint(_import_kernel_launches())))
    return 0


def _base32(key: str) -> str:
    import base64

    return base64.b32encode(bytes.fromhex(key)).decode().rstrip("=")


def cmd_warm(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    _check_versions()
    env = _key_env()
    if env:
        raise ToolError(f"unset {', '.join(sorted(env))}: they change the cache keys a default GPU run computes")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"{out.name}.", dir=out.parent) as tmp:
        cache, work = Path(tmp) / "cache", Path(tmp) / "work"
        cache.mkdir()
        work.mkdir()
        fingerprint = _fingerprint_subprocess()
        rows = _run_workers(args, cache, work)
        if _fingerprint_subprocess()["kernels"] != fingerprint["kernels"]:
            raise ToolError("the kernels' sources changed while they were being compiled: run `warm` again")
        removed = prune(cache)
        entries: dict[str, dict] = {}
        for r in sorted(rows, key=lambda r: r["cache_hit"]):  # a key's compile first, then its hits elsewhere
            entries.setdefault(
                r["key"],
                {
                    "dir": _base32(r["key"]),
                    "key": r["key"],
                    "kernel": r["kernel"],
                    "launch": r["launch"],
                    "signature": r["signature"],
                    "constexprs": r["constexprs"],
                    "num_warps": r["num_warps"],
                    "compile_s": round(r["seconds"], 2),
                },
            )
        kernel_dirs = {e["dir"] for e in entries.values()}
        missing = sorted(d for d in kernel_dirs if not (cache / d).is_dir())
        if missing:
            raise ToolError(f"{len(missing)} compiled entries are not in the cache directory, e.g. {missing[0]}")
        modules = [{"dir": d, "contents": describe_entry(cache / d)} for d in sorted(entry_dirs(cache) - kernel_dirs)]
        manifest = {
            "format": 1,
            **fingerprint,
            "made": time.strftime("%Y-%m-%d %H:%M:%S"),
            "plan": {"models": args.models, "dtypes": args.dtypes, "test_shapes": not args.no_test_shapes},
            "entries": sorted(entries.values(), key=lambda e: (e["kernel"], e["launch"])),
            "modules": modules,
        }
        (cache / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(cache), str(out))
    relocate(out)
    size = dir_bytes(out)
    compiling = sum(e["compile_s"] for e in entries.values())
    print(
        f"{len(entries)} kernels ({compiling:.0f} s of compiling) and {len(modules)} C modules in {out} "
        f"({size / 2**20:.1f} MiB; {removed / 2**20:.1f} MiB of IR pruned) in {time.time() - start:.0f} s",
        file=sys.stderr,
    )
    if args.tar:
        tar = _tar(out)
        print(f"{tar} ({tar.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _tar(cache: Path) -> Path:
    import tarfile

    tar = cache.with_name(cache.name + ".tar.gz")
    with tarfile.open(tar, "w:gz", compresslevel=9) as t:
        t.add(cache, arcname=cache.name)
    return tar


def cmd_verify(args: argparse.Namespace) -> int:
    """Copies the cache elsewhere, installs it there and runs the whole plan again: every launch must hit."""
    out = Path(args.out).resolve()
    manifest = read_manifest(out)
    _check_versions()
    with tempfile.TemporaryDirectory(prefix="triton-verify.") as tmp:
        cache, work = Path(tmp) / "moved" / out.name, Path(tmp) / "work"
        shutil.copytree(out, cache)
        work.mkdir()
        relocate(cache)
        before = entry_dirs(cache)
        args.models, args.dtypes = manifest["plan"]["models"], manifest["plan"]["dtypes"]
        args.no_test_shapes = not manifest["plan"]["test_shapes"]
        rows = _run_workers(args, cache, work)
        added = sorted(entry_dirs(cache) - before)
        misses = [r for r in rows if not r["cache_hit"]]
        hits = len(rows) - len(misses)
        print(f"{hits} kernel cache hits, {len(misses)} misses, {len(added)} entries added", file=sys.stderr)
        for r in misses[:20]:
            print(f"  miss: {r['kernel']} {r['launch']}", file=sys.stderr)
        for d in added[:20]:
            print(f"  added: {d} {describe_entry(cache / d)}", file=sys.stderr)
        unlinked = _modules_without_libcuda(cache)
        for name in unlinked:
            print(f"  {name} does not name libcuda.so.1 as needed: it would not load on a GPU machine", file=sys.stderr)
        unhit = {e["key"] for e in manifest["entries"]} - {r["key"] for r in rows if r["cache_hit"]}
        if unhit:
            print(f"  {len(unhit)} warmed entries no launch of the plan reached", file=sys.stderr)
        return 0 if not misses and not added and not unlinked and not unhit else 1


def _modules_without_libcuda(cache: Path) -> list[str]:
    """The C modules in the cache whose dynamic section lacks libcuda.so.1 (`readelf`; none if it is missing)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        print("  (readelf not found: the C modules' libcuda.so.1 link is not checked)", file=sys.stderr)
        return []
    out = []
    for so in sorted(cache.glob("*/*.so")):
        dynamic = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True).stdout
        if "[libcuda.so.1]" not in dynamic:
            out.append(f"{so.parent.name}/{so.name}")
    return out


def cmd_install(args: argparse.Namespace) -> int:
    """Relocates the cache to where it lies; then, if Triton imports, says whether its keys will match."""
    cache = Path(args.cache_dir).resolve()
    manifest = read_manifest(cache)
    n = relocate(cache)
    problems = []
    if os.environ.get("TRITON_CACHE_DIR") and Path(os.environ["TRITON_CACHE_DIR"]).resolve() != cache:
        problems.append(f"TRITON_CACHE_DIR is {os.environ['TRITON_CACHE_DIR']}, not this cache")
    unchecked = None
    try:
        here = _fingerprint_subprocess()
    except subprocess.CalledProcessError as e:
        unchecked = (e.stderr.strip().splitlines() or ["?"])[-1].removeprefix("error: ")
        here = None
    if here is not None:
        for field in ("triton", "triton_key_sha256", "backend_hash_sha256", "env_vars", "platform"):
            if here[field] != manifest[field]:
                problems.append(f"{field}: {here[field]!r} here, {manifest[field]!r} in the cache")
        for name, k in manifest["kernels"].items():
            if here["kernels"].get(name, {}).get("cache_key") != k["cache_key"]:
                problems.append(f"{name} ({k['file']}) changed since the cache was made")
    if problems:
        state = "WILL MISS: " + "; ".join(problems)
    elif unchecked:
        state = f"keys not checked: {unchecked}"
    else:
        state = "keys match"
    print(f"triton cache {cache}: {n} kernels, {len(manifest['modules'])} C modules; {state}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Lists what a run compiled on its machine (the misses): entries it added, and warmed ones it rewrote.

    A warmed entry is rewritten in place when its key matched but Triton
    could not read it (a group file naming paths that do not exist there):
    a miss that adds no directory. The manifest's time stamp (copies keep
    it) tells the two apart from the shipped files.
    """
    cache = Path(args.cache_dir).resolve()
    manifest = read_manifest(cache)
    made = (cache / MANIFEST).stat().st_mtime
    known = {e["dir"] for e in manifest["entries"]} | {m["dir"] for m in manifest["modules"]}
    added = sorted(entry_dirs(cache) - known)
    rewritten = sorted(
        d
        for d in known & entry_dirs(cache)
        if any(f.stat().st_mtime > made for f in (cache / d).iterdir() if not f.name.startswith("__grp__"))
    )
    print(f"{len(added)} cache entries added to {len(known)} warmed ones, {len(rewritten)} warmed ones rewritten")
    for d in added:
        print(f"  added {d} {describe_entry(cache / d)}")
    for d in rewritten:
        print(f"  rewritten {d} {describe_entry(cache / d)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{warm,verify,install,report}")

    def plan_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--models", nargs="+", default=["codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono",
                                                      "codegen-16B-mono"])  # fmt: skip
        q.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
        q.add_argument("--no-test-shapes", action="store_true", help="leave out the tests' tiny models")

    def run_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--no-launchers", action="store_true", help="do not build Triton's C launchers")
        q.add_argument("--quiet", action="store_true", help="no line per compile")

    w = sub.add_parser("warm", help="compile every launch into a fresh cache directory")
    w.add_argument("--out", default=str(DEFAULT_OUT))
    w.add_argument("--jobs", type=int, default=2, help="compiling processes")
    w.add_argument("--tar", action="store_true", help="also write OUT.tar.gz")
    plan_args(w)
    run_args(w)
    v = sub.add_parser("verify", help="check in fresh processes that every launch hits a moved copy of the cache")
    v.add_argument("--out", default=str(DEFAULT_OUT))
    v.add_argument("--jobs", type=int, default=2)
    run_args(v)  # the plan is the manifest's
    for name, text in (("install", "point the cache's entries at where it lies; check the keys"),
                       ("report", "list what a run compiled: its misses")):  # fmt: skip
        q = sub.add_parser(name, help=text)
        q.add_argument("cache_dir")
    k = sub.add_parser("worker")  # internal: one process of warm or verify
    k.add_argument("--shard", type=int, required=True)
    k.add_argument("--shards", type=int, required=True)
    k.add_argument("--work", required=True)
    k.add_argument("--result", required=True)
    plan_args(k)
    run_args(k)
    sub.add_parser("fingerprint")  # internal: what the keys depend on here, as JSON
    args = p.parse_args(argv)
    if getattr(args, "jobs", 1) < 1:
        p.error("--jobs must be at least 1")
    commands = {
        "warm": cmd_warm,
        "verify": cmd_verify,
        "install": cmd_install,
        "report": cmd_report,
        "worker": cmd_worker,
        "fingerprint": cmd_fingerprint,
    }
    try:
        return commands[args.command](args)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
