"""Compiles every kernel launch the engine makes, for a real GPU, on a machine without one.

    python tests/kernel_compile.py [--arch 90] [--json]

Triton's interpreter accepts code the compiler rejects (a `tl.dot` operand
under 16 wide, mismatched loop-carried types, ...). This script calls each
kernel's host wrapper at the real shapes of codegen-350M, 2B, 6B and 16B with
meta tensors (shapes, no data), records the launches instead of running
them, and compiles each one ahead of time to a cubin for the given
architecture (sm_90: H100/H200) with Triton's compiler and ptxas. It prints
one line per launch with registers, spills and shared memory (from
`cuobjdump -res-usage`) and exits non-zero if any launch fails to compile.
Run in its own process: the kernels must be real `triton.jit` functions, not
interpreted ones.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_compile.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcodegen.kernels import decode_attention, in_proj, out_proj, prefill_attention  # noqa: E402
from fastcodegen.models.torch_ops import rotary_tables  # noqa: E402
from fastcodegen.registry import MODELS  # noqa: E402
from fastcodegen.weights import InProjLayout  # noqa: E402

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


@dataclass
class Launch:
    name: str
    kernel: triton.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the call instead of running it."""

    def __init__(self, kernel: triton.JITFunction, name: str, log: list[Launch], tag: list[str]):
        self.kernel, self.name, self.log, self.tag = kernel, name, log, tag

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(f"{self.name} {self.tag[0]}", self.kernel, args, kwargs))


def _signature(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a recorded launch, specialised as Triton's JIT would.

    Like the JIT: an integer equal to 1 becomes a constant, and pointers and
    integers divisible by 16 are marked so (which lets loads vectorise).
    Meta tensors have address 0, as aligned as the allocator's.
    """
    params = list(inspect.signature(launch.kernel.fn).parameters)
    values = dict(zip(params, launch.args))
    options = {k: launch.kwargs.pop(k) for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values.update(launch.kwargs)
    constexpr = {p.name for p in launch.kernel.params if p.is_constexpr}
    sig, consts, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(params):
        v = values[name]
        if name in constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name], attrs[(i,)] = "*" + _TYPES[v.dtype], aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={v!r}")
    return sig, consts, attrs, options


def _resources(cubin: bytes) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(m[1]), "stack": int(m[2]), "local": int(m[3])} if m else {}


def record_launches(dtype: torch.dtype) -> list[Launch]:
    """Every launch the engine makes at the real shapes: decode and prefill projections, both attentions."""
    log: list[Launch] = []
    tag = [""]
    kernels = [
        (in_proj, "_in_proj_kernel"),
        (prefill_attention, "_prefill_kernel"),
        (decode_attention, "_split_kernel"),
        (decode_attention, "_combine_kernel"),
        (out_proj, "_out_proj_kernel"),
        (out_proj, "_split_k_reduce_kernel"),
    ]
    originals = [getattr(module, name) for module, name in kernels]
    for (module, name), kernel in zip(kernels, originals):
        setattr(module, name, _Recorder(kernel, name, log, tag))
    try:
        _call_wrappers(dtype, tag)
    finally:
        for (module, name), kernel in zip(kernels, originals):
            setattr(module, name, kernel)
    return log


def _call_wrappers(dtype: torch.dtype, tag: list[str]) -> None:
    meta = torch.device("meta")

    def empty(*shape, dt=dtype):
        return torch.empty(shape, device=meta, dtype=dt)

    for model in ("codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono"):
        c = MODELS[model]
        layout = InProjLayout.of(c)
        d, f, h, hd = c.n_embd, c.n_inner, c.n_head, c.head_dim
        cos, sin = rotary_tables(c.rotary_dim, c.n_positions, meta)
        cache = empty(64, 16, h, hd)
        for tokens in (1, 32, 512):
            tag[0] = f"{model} {str(dtype)[6:]} rows={tokens}"
            x, pos, slots = empty(tokens, d), empty(tokens, dt=torch.int64), empty(tokens, dt=torch.int64)
            in_proj.in_proj(x, empty(d), empty(d), empty(layout.width, d), empty(layout.width), pos, slots,
                            cos, sin, cache, cache, layout, 1e-5)  # fmt: skip
            out_proj.out_proj(empty(tokens, d), empty(tokens, f), empty(d, d + f), empty(d), empty(tokens, d))
        tag[0] = f"{model} {str(dtype)[6:]}"
        seqs, tables = 4, empty(4, 128, dt=torch.int32)
        lens, starts = empty(seqs, dt=torch.int32), empty(seqs + 1, dt=torch.int32)
        prefill_attention.paged_attention(empty(512, h, hd), cache, cache, tables, lens, starts, 128, 2048)
        for batch in (1, 64):
            splits = decode_attention.num_splits(batch, h, c.n_positions)
            decode_attention.decode_attention(
                empty(batch, h, hd), cache, cache, tables[:1].expand(batch, -1), lens[:1].expand(batch), splits
            )


def compile_all(arch: int, dtypes: list[torch.dtype]) -> list[dict]:
    results, seen = [], set()
    for dtype in dtypes:
        for launch in record_launches(dtype):
            sig, consts, attrs, options = _signature(launch)
            key = (launch.kernel.fn.__name__, str(sig), str(consts), str(attrs), str(options))
            if key in seen:
                continue
            seen.add(key)
            row = {"launch": launch.name, "options": options}
            try:
                source = ASTSource(launch.kernel, sig, constexprs=consts, attrs=attrs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                row.update(ok=True, **_resources(compiled.asm["cubin"]), shared=compiled.metadata.shared)
            except Exception as e:  # report every failure, not just the first
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            results.append(row)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    args = p.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = compile_all(args.arch, [getattr(torch, d) for d in args.dtypes])
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if r["ok"]:
                print(f"ok    {r['launch']:<60} warps={r['options'].get('num_warps', 4)} reg={r.get('registers')} "
                      f"local={r.get('local')} stack={r.get('stack')} shared={r.get('shared')}")  # fmt: skip
            else:
                print(f"FAIL  {r['launch']}: {r['error']}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
