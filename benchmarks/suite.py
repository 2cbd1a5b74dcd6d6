"""The benchmark suite: fastcodegen against the bandwidth limit and against transformers, in one command.

    python benchmarks/suite.py          # on a CUDA machine, offline, about 8 minutes
    python benchmarks/suite.py --cpu    # the same suite at tiny shapes on the CPU: a smoke test

With random (dummy) weights at the real shapes of codegen-350M/2B/6B/16B, in
one run: the ceilings (device-to-device copy bandwidth, fp16 matmul rate);
the GPU tests (`pytest -m gpu`), summarised; the per-kernel
microbenchmarks (bench_kernels.py); batch-1 decode latency (128-token
prompt, 256 new tokens) against the bandwidth floor (weight bytes / copy
bandwidth); throughput with continuous batching (256 requests of 128-1024
prompt and 128-512 new tokens, seeded); time to first token of a 1536-token
prompt, uncached and with its prefix cached; and the peer a user would
otherwise pick at the same shapes and dtype: transformers'
CodeGenForCausalLM.generate, eager, and with a static cache and
torch.compile where that works, with the ratio of fastcodegen to each.

Writes benchmarks/results/<date>-<device>.json (device, date, commit,
versions, one row per measurement: name, value, unit, baseline, its value,
ratio) and a Markdown table beside it, and prints the table last. `--cpu`
runs every part at tiny shapes (the numbers are not the point there: that it
runs is); parts that need CUDA say so in their rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from common import ROOT, environment, sync

from fastcodegen import Engine, SamplingParams
from fastcodegen.config import ModelConfig, read_checkpoint_config
from fastcodegen.registry import MODELS, bundled_path


@dataclass
class Row:
    section: str
    name: str
    value: Optional[float]
    unit: str
    baseline: Optional[str] = None
    baseline_value: Optional[float] = None
    ratio: Optional[float] = None  # how many times better fastcodegen is (or the stated fraction)
    note: str = ""


@dataclass
class Plan:
    """The workloads: the real ones on CUDA, tiny ones with --cpu."""

    device: torch.device
    dtype: torch.dtype
    decode_models: list[str]
    throughput_models: list[str]
    prompt_len: int
    new_tokens: int
    requests: int
    prompt_range: tuple[int, int]
    new_range: tuple[int, int]
    ttft_prompt: int
    hf_batch: int
    compile_models: list[str]


def real_plan() -> Plan:
    return Plan(
        device=torch.device("cuda"),
        dtype=torch.float16,
        decode_models=["codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono"],
        throughput_models=["codegen-350M-mono", "codegen-6B-mono"],
        prompt_len=128,
        new_tokens=256,
        requests=256,
        prompt_range=(128, 1024),
        new_range=(128, 512),
        ttft_prompt=1536,
        hf_batch=32,
        compile_models=["codegen-350M-mono", "codegen-2B-mono"],
    )


def cpu_plan() -> Plan:
    return Plan(
        device=torch.device("cpu"),
        dtype=torch.float32,
        decode_models=["codegen-tiny-py"],
        throughput_models=["codegen-tiny-py"],
        prompt_len=16,
        new_tokens=16,
        requests=12,
        prompt_range=(8, 48),
        new_range=(4, 16),
        ttft_prompt=192,
        hf_batch=4,
        compile_models=[],
    )


# --------------------------------------------------------------------------- helpers


def model_config(name: str) -> ModelConfig:
    if name in MODELS:
        return MODELS[name]
    return read_checkpoint_config(bundled_path(name))[1]


def weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """What a decode step must read: every weight once (the embedding only in the rows used: none counted)."""
    element = torch.empty((), dtype=dtype).element_size()
    return (config.num_parameters - config.vocab_size * config.n_embd) * element


def engine_for(name: str, plan: Plan, **kwargs) -> Engine:
    return Engine(name, load_format="dummy", device=plan.device, dtype=plan.dtype, progress=False, **kwargs)


def hf_model(config: ModelConfig, plan: Plan):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    hf_config = CodeGenConfig(**config.to_hf_config())
    with torch.device(plan.device):
        return CodeGenForCausalLM(hf_config).to(plan.dtype).eval()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lengths[0], lengths[1] + 1))).tolist() for _ in range(n)]


# --------------------------------------------------------------------------- sections


def ceilings(plan: Plan) -> tuple[float, float, list[Row]]:
    """Copy bandwidth (GB/s, read + write) and matmul rate (TFLOP/s) measured now."""
    dev = plan.device
    n = (1 << 30) if dev.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = min(timed(lambda: dst.copy_(src), dev) for _ in range(10))
    copy_gbps = 2 * n / secs / 1e9
    src = dst = None  # frees them (a closure holds the names)
    size = 8192 if dev.type == "cuda" else 1024
    mm_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=dev, dtype=mm_dtype)
    b = torch.randn(size, size, device=dev, dtype=mm_dtype)
    torch.matmul(a, b)
    secs = min(timed(lambda: torch.matmul(a, b), dev) for _ in range(10))
    tflops = 2 * size**3 / secs / 1e12
    free(dev)
    return (
        copy_gbps,
        tflops,
        [
            Row("ceilings", "device-to-device copy", copy_gbps, "GB/s", note=f"{n / 2**30:g} GiB, read + write"),
            Row("ceilings", f"{str(mm_dtype)[6:]} matmul", tflops, "TFLOP/s", note=f"{size}^3"),
        ],
    )


def gpu_tests(plan: Plan) -> list[Row]:
    if plan.device.type != "cuda":
        return [Row("tests", "pytest -m gpu", None, "", note="not run: no GPU")]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        t = time.time()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={report}",
                "tests",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        text = report.read_text() if report.exists() else ""
    counts = {k: int(v) for k, v in re.findall(r'(tests|failures|errors|skipped)="(\d+)"', text)[:4]}
    passed = counts.get("tests", 0) - counts.get("failures", 0) - counts.get("errors", 0) - counts.get("skipped", 0)
    note = (
        f"{passed} passed, {counts.get('failures', 0)} failed, {counts.get('errors', 0)} errors, "
        f"{counts.get('skipped', 0)} skipped in {time.time() - t:.0f} s"
    )
    return [Row("tests", "pytest -m gpu", passed, "passed", note=note)]


def kernels(plan: Plan) -> list[Row]:
    if plan.device.type != "cuda":
        return [Row("kernels", "bench_kernels.py", None, "", note="not run: needs CUDA")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--out", str(out), "--rep-ms", "25"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        record = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = []
    for r in record["rows"]:
        name = f"{r['kernel']} {r['model']} {r.get('shape', '')}".strip()
        if r.get("fastcodegen_us") is None:
            rows.append(Row("kernels", name, None, "us", note=r.get("check") or "error"))
            continue
        fraction = r.get("fraction_of_ceiling")
        rows.append(
            Row(
                "kernels",
                name,
                r["fastcodegen_us"],
                "us",
                "PyTorch path",
                r["pytorch_us"],
                r["ratio"],
                note=(
                    f"{fraction:.0%} of the {'copy' if r['bound'] == 'memory' else 'matmul'} ceiling"
                    if fraction
                    else ""
                ),
            )
        )
    return rows


def decode_latency(plan: Plan, copy_gbps: float) -> list[Row]:
    """Batch-1 decode: ms per token, against the bandwidth floor and transformers."""
    rows = []
    for name in plan.decode_models:
        config = model_config(name)
        try:
            engine = engine_for(name, plan, max_num_seqs=8)
            prompt = random_prompts(1, (plan.prompt_len, plan.prompt_len), min(engine.vocab_limit, 50000), 0)
            full = SamplingParams(temperature=0, max_tokens=plan.new_tokens, ignore_eos=True)
            first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

            def run(params):
                return engine.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)

            run(full)  # warm-up
            t_first = min(timed(lambda: run(first), plan.device) for _ in range(2))
            t_full = min(timed(lambda: run(full), plan.device) for _ in range(2))
            ours = 1e3 * (t_full - t_first) / (plan.new_tokens - 1)
            engine = None  # frees it (a closure holds the name)
            free(plan.device)
            floor = 1e3 * weight_bytes(config, plan.dtype) / (copy_gbps * 1e9)
            rows.append(
                Row("decode", f"batch-1 decode {name}", ours, "ms/token", "bandwidth floor", floor, floor / ours,
                    note=f"{floor / ours:.0%} of the floor ({weight_bytes(config, plan.dtype) / 1e9:.2f} GB of weights)")
            )  # fmt: skip
            rows.extend(_hf_decode(name, config, plan, prompt, ours))
        except Exception as e:
            rows.append(Row("decode", f"batch-1 decode {name}", None, "ms/token", note=_error(e)))
        free(plan.device)
    return rows


def _hf_decode(name: str, config: ModelConfig, plan: Plan, prompt: list[list[int]], ours: float) -> list[Row]:
    model = hf_model(config, plan)
    ids = torch.tensor(prompt, device=plan.device)
    mask = torch.ones_like(ids)

    def generate(n: int):
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    rows = []
    for label, prepare in (("transformers eager", None), ("transformers static cache + torch.compile", _compile)):
        if prepare is not None:
            if name not in plan.compile_models:
                rows.append(
                    Row("decode", f"batch-1 decode {name}", ours, "ms/token", label, None, None, "not run here")
                )
                continue
            try:
                prepare(model)
            except Exception as e:
                rows.append(Row("decode", f"batch-1 decode {name}", ours, "ms/token", label, None, None, _error(e)))
                continue
        try:
            generate(plan.new_tokens)  # warm-up (and compilation)
            t_first = timed(lambda: generate(1), plan.device)
            t_full = timed(lambda: generate(plan.new_tokens), plan.device)
            theirs = 1e3 * (t_full - t_first) / (plan.new_tokens - 1)
            rows.append(Row("decode", f"batch-1 decode {name}", ours, "ms/token", label, theirs, theirs / ours))
        except Exception as e:
            rows.append(Row("decode", f"batch-1 decode {name}", ours, "ms/token", label, None, None, _error(e)))
    model = None  # frees it (a closure holds the name)
    return rows


def _compile(model) -> None:
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def throughput(plan: Plan) -> list[Row]:
    """Continuous batching over a seeded mix of requests: generated tokens per second."""
    rows = []
    for name in plan.throughput_models:
        config = model_config(name)
        try:
            engine = engine_for(name, plan)
            vocab = min(engine.vocab_limit, 50000)
            prompts = random_prompts(plan.requests, plan.prompt_range, vocab, 1)
            rng = np.random.default_rng(2)
            news = [int(rng.integers(plan.new_range[0], plan.new_range[1] + 1)) for _ in prompts]
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in news]
            engine.generate(prompt_token_ids=prompts[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up
            secs = timed(
                lambda: engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False), plan.device
            )
            ours = sum(news) / secs
            engine = None  # frees it (a closure holds the name)
            free(plan.device)
            theirs = _hf_throughput(config, plan, prompts, news)
            rows.append(
                Row("throughput", f"{plan.requests} requests {name}", ours, "tokens/s", "transformers eager, batches of "
                    f"{plan.hf_batch}", theirs, ours / theirs,
                    note=f"prompts {plan.prompt_range[0]}-{plan.prompt_range[1]}, new {plan.new_range[0]}-{plan.new_range[1]}")
            )  # fmt: skip
        except Exception as e:
            rows.append(Row("throughput", f"{plan.requests} requests {name}", None, "tokens/s", note=_error(e)))
        free(plan.device)
    return rows


def _hf_throughput(config: ModelConfig, plan: Plan, prompts: list[list[int]], news: list[int]) -> float:
    """transformers on the same requests, batched in arrival order, left-padded; only requested tokens count."""
    model = hf_model(config, plan)
    t = 0.0
    for i in range(0, len(prompts), plan.hf_batch):
        batch, want = prompts[i : i + plan.hf_batch], news[i : i + plan.hf_batch]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=plan.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=plan.device)
        with torch.no_grad():
            t += timed(
                lambda: model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max(want),
                    min_new_tokens=max(want),
                    do_sample=False,
                    pad_token_id=0,
                ),
                plan.device,
            )
    model = None  # frees it (a closure holds the name)
    return sum(news) / t


def time_to_first_token(plan: Plan) -> list[Row]:
    """A long prompt's first token, then the same prompt again with its prefix cached."""
    name = plan.throughput_models[-1]
    try:
        engine = engine_for(name, plan)
        prompt = random_prompts(1, (plan.ttft_prompt, plan.ttft_prompt), min(engine.vocab_limit, 50000), 3)
        warm = random_prompts(1, (plan.ttft_prompt, plan.ttft_prompt), min(engine.vocab_limit, 50000), 4)
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        engine.generate(prompt_token_ids=warm, sampling_params=one, use_tqdm=False)  # warm-up on another prompt
        uncached = 1e3 * timed(
            lambda: engine.generate(prompt_token_ids=prompt, sampling_params=one, use_tqdm=False), plan.device
        )
        hits = engine.stats.prefix_hit_tokens
        cached = 1e3 * timed(
            lambda: engine.generate(prompt_token_ids=prompt, sampling_params=one, use_tqdm=False), plan.device
        )
        hit = engine.stats.prefix_hit_tokens - hits
        engine = None  # frees it (a closure holds the name)
        return [
            Row("ttft", f"time to first token, {plan.ttft_prompt}-token prompt {name}", uncached, "ms"),
            Row("ttft", f"... the same prompt, prefix cached {name}", cached, "ms", "uncached", uncached, cached / uncached,
                note=f"{hit} prompt tokens from the cache; ratio = cached / uncached"),
        ]  # fmt: skip
    except Exception as e:
        return [Row("ttft", f"time to first token {name}", None, "ms", note=_error(e))]
    finally:
        free(plan.device)


def _error(e: Exception) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(e).__name__}: {e}".splitlines()[0][:200]


# --------------------------------------------------------------------------- output


def markdown(env: dict, rows: list[Row], minutes: float) -> str:
    lines = [
        f"# fastcodegen benchmark suite: {env['device']}",
        "",
        f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"transformers {env['transformers']}; {minutes:.1f} minutes.",
        "",
        "| section | measurement | fastcodegen | unit | compared with | its value | ratio | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r.section,
            r.name,
            _num(r.value),
            r.unit,
            r.baseline or "",
            _num(r.baseline_value),
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "kernels", "decode", "throughput", "ttft"])
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("suite.py needs a CUDA GPU (or --cpu for the smoke test at tiny shapes)", file=sys.stderr)
        return 1
    plan = cpu_plan() if args.cpu else real_plan()
    env = environment(plan.device)
    start = time.time()
    copy_gbps, _, rows = ceilings(plan)
    sections = {
        "tests": lambda: gpu_tests(plan),
        "kernels": lambda: kernels(plan),
        "decode": lambda: decode_latency(plan, copy_gbps),
        "throughput": lambda: throughput(plan),
        "ttft": lambda: time_to_first_token(plan),
    }
    for name, run in sections.items():
        if name not in args.skip:
            print(f"[suite] {name} ({(time.time() - start) / 60:.1f} min)", file=sys.stderr, flush=True)
            rows.extend(run())
    minutes = (time.time() - start) / 60
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    stem = args.out_dir / f"{env['date']}-{device}{'-cpu-smoke' if args.cpu else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **env,
        "mode": "cpu" if args.cpu else "cuda",
        "minutes": round(minutes, 2),
        "rows": [asdict(r) for r in rows],
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(env, rows, minutes)
    stem.with_suffix(".md").write_text(table)
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
