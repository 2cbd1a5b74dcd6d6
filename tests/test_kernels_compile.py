"""Every kernel launch the engine makes at the real 350M-16B shapes compiles for an H100 (sm_90), without a GPU.

The interpreter is lenient where the compiler is not; this runs Triton's
real compiler and ptxas (`tests/kernel_compile.py`, in its own process so
the kernels are compiled functions) and checks that each launch compiles
and keeps its registers: no spills to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

KERNELS = {
    "_in_proj_kernel",
    "_out_proj_kernel",
    "_split_k_reduce_kernel",
    "_prefill_kernel",
    "_split_kernel",
    "_combine_kernel",
}


def test_every_launch_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("kernel_compile.py")
    p = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--json"], env=env, capture_output=True, text=True, timeout=900
    )
    assert p.stdout.strip(), p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['launch']}: {r['error']}" for r in failed)
    assert p.returncode == 0
    assert {r["launch"].split()[0] for r in results} == KERNELS
    for dtype in ("float16", "bfloat16"):
        for size in ("350M", "2B", "6B", "16B"):
            assert any(f"codegen-{size}-mono {dtype}" in r["launch"] for r in results), (size, dtype)
    spilled = [r for r in results if r["local"] > 0 or r["stack"] > 64]
    assert not spilled, spilled
