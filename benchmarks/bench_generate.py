"""End-to-end generation speed: fastcodegen against transformers' generate, side by side.

    python benchmarks/bench_generate.py --model codegen-350M-mono --batch 1 --prompt-len 128 --new-tokens 64

Both run the same architecture at the same shapes and dtype on the same
device, with random weights (fastcodegen's seeded dummy weights,
transformers' own initialisation: timing does not depend on the values).
Greedy decoding, end-of-text ignored, so both produce exactly --new-tokens
tokens. Prints a table, then a JSON line with the numbers, the device, the
date and the commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
from common import commit, device_name, sync

from fastcodegen import Engine, SamplingParams
from fastcodegen.config import parse_device, parse_dtype


def _time(run, new_tokens: int, repeats: int, device: torch.device) -> dict:
    """Best of `repeats` for run(1) (time to first token) and run(new_tokens); decode = the difference per step."""
    run(1)  # warm-up
    ttft, total = [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run(1)
        sync(device)
        t1 = time.perf_counter()
        run(new_tokens)
        sync(device)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        total.append(t2 - t1)
    ttft_s, total_s = min(ttft), min(total)
    return {"ttft_ms": 1e3 * ttft_s, "decode_ms_per_step": 1e3 * (total_s - ttft_s) / (new_tokens - 1)}


def time_fastcodegen(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    def run(n: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)

    return _time(run, new_tokens, repeats, engine.config.device)


def time_transformers(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    from transformers import CodeGenConfig, CodeGenForCausalLM

    c, device = engine.model_config, engine.config.device
    config = CodeGenConfig(**c.to_hf_config())
    with torch.device(device):
        model = CodeGenForCausalLM(config).to(engine.config.dtype).eval()
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> None:
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    return _time(run, new_tokens, repeats, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="codegen-350M-mono", help="official name (dummy weights) or checkpoint directory")
    p.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument(
        "--compare-graphs", action="store_true", help="also time fastcodegen with CUDA graphs off (enforce_eager)"
    )
    args = p.parse_args()

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    kw = dict(device=device, dtype=dtype, load_format=args.load_format, backend=args.backend, progress=False)
    engine = Engine(args.model, **kw)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(50000, engine.vocab_limit), (args.batch, args.prompt_len), generator=g).tolist()

    ours = time_fastcodegen(engine, prompts, args.new_tokens, args.repeats)
    eager = None
    if args.compare_graphs:
        del engine
        engine = Engine(args.model, enforce_eager=True, **kw)
        eager = time_fastcodegen(engine, prompts, args.new_tokens, args.repeats)
    theirs = None if args.no_baseline else time_transformers(engine, prompts, args.new_tokens, args.repeats)

    print(
        f"{args.model} ({args.load_format}) on {device_name(device)}, {str(dtype).removeprefix('torch.')}, "
        f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens"
    )
    print(f"{'':24}{'fastcodegen':>14}{'transformers':>14}{'ratio':>8}" + (f"{'no graphs':>12}" if eager else ""))
    for key, label in (("ttft_ms", "time to first token ms"), ("decode_ms_per_step", "decode ms / step")):
        line = f"{label:24}{ours[key]:14.2f}"
        line += f"{theirs[key]:14.2f}{theirs[key] / ours[key]:8.2f}x" if theirs else f"{'':22}"
        if eager:
            line += f"{eager[key]:12.2f}"
        print(line)
    record = {
        "benchmark": "bench_generate",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "load_format": args.load_format,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": engine.config.backend,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "fastcodegen": ours,
        "fastcodegen_enforce_eager": eager,
        "transformers": theirs,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
