"""The server under load, against the same engine run offline on the same workload.

    python benchmarks/bench_serving.py                      # codegen-tiny-py on the CPU, starts its own server
    python benchmarks/bench_serving.py --model codegen-350M-mono --load-format dummy --device cuda --clients 64

Starts `fastcodegen serve` as a subprocess on a free port (or uses `--url`),
sends `--requests` streamed completions from `--clients` concurrent clients
(arrivals a Poisson process of `--rate` requests per second; all at once by
default), each a random prompt of token ids with greedy decoding and
`--max-tokens` new tokens, and measures request throughput, output tokens per
second, time to first token and inter-token latency (p50, p90, p99). Then,
with the server stopped, the same requests go through `Engine.generate` in
this process (same model, settings and seed), so the server's overhead is a
ratio measured in the same run. Prints a table and, as its last line, a JSON
object (`--out FILE` writes it too).

Needs the server extra (`pip install "fastcodegen[server]"`) and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from common import environment


@dataclass
class Result:
    """One streamed request as the client saw it."""

    start: float
    first: Optional[float] = None  # arrival of the first chunk with text
    gaps: list[float] = field(default_factory=list)  # between chunks with text
    end: float = 0.0
    tokens: int = 0  # completion tokens (the usage the server reports)
    error: Optional[str] = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    a = np.asarray(xs) * 1e3
    return {f"p{q}": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)}


def _cpu_seconds(pid: int) -> Optional[float]:
    """A process's user + system CPU time (Linux /proc; None elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`fastcodegen serve` on a free port; returns the process and its base URL once /health answers."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "fastcodegen", "serve", args.model, "--port", str(port)] + _engine_flags(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.start_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _engine_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype, "--load-format", args.load_format]
    flags += ["--max-num-seqs", str(args.max_num_seqs)]
    return flags


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, result: Result) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("text") for c in chunk.get("choices", [])):
                    if result.first is None:
                        result.first = now
                    else:
                        result.gaps.append(now - last)
                    last = now
    except Exception as e:  # noqa: BLE001  (a failed request is a result, counted below)
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.end = time.perf_counter()


async def load(url: str, model: str, prompts: list[list[int]], args: argparse.Namespace) -> tuple[list[Result], float]:
    """Sends every prompt with at most `clients` in flight, arrivals a Poisson process; the results and the wall time."""
    import httpx

    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, len(prompts)) if args.rate > 0 else np.zeros(len(prompts))
    slots = asyncio.Semaphore(args.clients)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    results = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def run(prompt: list[int], delay: float) -> None:
            await asyncio.sleep(delay)
            async with slots:
                result = Result(start=time.perf_counter())
                results.append(result)
                await _one(client, url, model, prompt, args.max_tokens, result)

        t0 = time.perf_counter()
        await asyncio.gather(*(run(p, float(d)) for p, d in zip(prompts, np.cumsum(gaps))))
        return results, time.perf_counter() - t0


def offline(prompts: list[list[int]], args: argparse.Namespace) -> tuple[float, int]:
    """The same requests through Engine.generate: (seconds, completion tokens)."""
    from fastcodegen import Engine, SamplingParams

    with Engine(
        args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
        max_num_seqs=args.max_num_seqs, progress=False,
    ) as engine:  # fmt: skip
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        engine.generate(prompt_token_ids=prompts[:2], sampling_params=params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="codegen-tiny-py")
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--clients", type=int, default=64, help="concurrent streams")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--no-offline", action="store_true", help="skip the Engine.generate comparison")
    p.add_argument("--out", default=None, help="also write the JSON record here")
    args = p.parse_args(argv)

    from fastcodegen import registry
    from fastcodegen.loading import load_tokenizer

    tokenizer = load_tokenizer(None, registry.bundled_path(args.model), args.model)
    vocab = tokenizer.vocab_limit if tokenizer is not None else 50257
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, vocab, size=(args.requests, args.prompt_len)).tolist()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    server_cpu = _cpu_seconds(proc.pid) if proc is not None else None
    client_cpu = time.process_time()
    try:
        results, wall = asyncio.run(load(url, args.model, prompts, args))
        client_cpu = time.process_time() - client_cpu
        if server_cpu is not None:
            server_cpu = _cpu_seconds(proc.pid) - server_cpu
    finally:
        if proc is not None:
            stop_server(proc)
    failed = [r for r in results if r.error is not None]
    tokens = sum(r.tokens for r in results if r.error is None)
    record = {
        "benchmark": "bench_serving",
        **environment(torch.device(args.device)),
        "model": args.model,
        "load_format": args.load_format,
        "clients": args.clients,
        "requests": args.requests,
        "rate": args.rate or "all at once",
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "wall_s": round(wall, 3),
        # CPU the load generator and the server used during the load (the two share the machine's cores)
        "client_cpu_s": round(client_cpu, 2),
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        "requests_per_s": round(len(results) / wall, 3),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": _percentiles([r.first - r.start for r in results if r.first is not None]),
        "itl_ms": _percentiles([g for r in results for g in r.gaps]),
    }
    if not args.no_offline:
        seconds, offline_tokens = offline(prompts, args)
        record["offline_output_tokens_per_s"] = round(offline_tokens / seconds, 1)
        record["offline_completion_tokens"] = offline_tokens
        record["server_completion_tokens"] = tokens
        record["server_over_offline"] = round(record["output_tokens_per_s"] / record["offline_output_tokens_per_s"], 3)
    print(f"{args.requests} requests, {args.clients} concurrent streams, {args.model} on {args.device}")
    for key in ("requests_per_s", "output_tokens_per_s", "offline_output_tokens_per_s", "server_over_offline"):
        if key in record:
            print(f"  {key}: {record[key]}")
    print(f"  ttft_ms: {record['ttft_ms']}  itl_ms: {record['itl_ms']}  failed: {len(failed)}")
    print(f"  CPU seconds during the load: client {record['client_cpu_s']}, server {record['server_cpu_s']}")
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
