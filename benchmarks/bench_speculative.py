"""Speculative decoding against plain decoding, side by side: tokens per second, acceptance, same outputs.

    python benchmarks/bench_speculative.py --out benchmarks/results/DATE-speculative-tiny-cpu.json

Two workloads with the shipped codegen-tiny-py, greedy, each prompt on its own
(batch 1), every prompt run by both engines in the same process:

- editing (prompt lookup, `[ngram]`): a held-out standard-library file, then
  the same file being written again with one identifier renamed, cut a few
  lines in; the model re-emits the file, and prompt lookup proposes from the
  original.
- completion (the draft model `codegen-tiny-py-draft`): top-level function
  headers of held-out standard-library files, completed.

Then the policy's trade-off on this machine: the editing workload at growing
batch sizes, with and without prompt lookup (speculation always on:
speculative_max_rows 0), to show where verifying proposals stops paying.
Each engine's output is compared with the plain one's (greedy: they must be
the same tokens). Prints a table and writes a JSON record (device, date,
commit).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, commit, device_name

sys.path.insert(0, str(ROOT / "tools"))
from train_tiny import function_headers, read, stdlib_files  # noqa: E402  (the tiny models' held-out files)

from fastcodegen import Engine, SamplingParams  # noqa: E402

IDENT = re.compile(r"\b[a-z_][a-z0-9_]{5,}\b")


def editing_prompts(limit: int, seed: int = 0) -> list[str]:
    """Held-out files (their first 40 lines), each followed by its start re-written with one identifier renamed."""
    _, held = stdlib_files()
    rng = np.random.default_rng(seed)
    out = []
    for path in sorted(held):
        text = read(path)
        try:
            ast.parse(text)
        except SyntaxError:
            continue
        head = "".join(text.splitlines(keepends=True)[:40])
        names = sorted(set(IDENT.findall(head)))
        if len(head) < 800 or not names:
            continue
        name = names[int(rng.integers(len(names)))]
        edited = re.sub(rf"\b{name}\b", name + "_v2", head)
        start = "".join(edited.splitlines(keepends=True)[:4])
        out.append(f"# {path.name}\n{head}\n# {path.name}, with {name} renamed {name}_v2\n{start}")
        if len(out) == limit:
            break
    return out


def completion_prompts(limit: int) -> list[str]:
    _, held = stdlib_files()
    return function_headers(held, limit)


def run(engine: Engine, prompts: list[str], max_tokens: int, batch: int) -> tuple[float, list[list[int]], int]:
    """(seconds, token ids per prompt, tokens) for greedy completions of `prompts`, `batch` at a time."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    ids: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = engine.generate(prompts[i : i + batch], params, use_tqdm=False)
        ids += [o.outputs[0].token_ids for o in outs]
    return time.perf_counter() - t0, ids, sum(len(x) for x in ids)


def compare(plain: Engine, spec: Engine, prompts: list[str], max_tokens: int, batch: int) -> dict:
    s0 = spec.stats
    t_plain, ids_plain, n = run(plain, prompts, max_tokens, batch)
    t_spec, ids_spec, n_spec = run(spec, prompts, max_tokens, batch)
    s1 = spec.stats
    proposed, accepted, runs = (s1.spec_proposed - s0.spec_proposed, s1.spec_accepted - s0.spec_accepted,
                                s1.spec_runs - s0.spec_runs)  # fmt: skip
    return {
        "prompts": len(prompts),
        "batch": batch,
        "tokens": n,
        "plain_tokens_per_s": round(n / t_plain, 1),
        "speculative_tokens_per_s": round(n_spec / t_spec, 1),
        "speedup": round((n_spec / t_spec) / (n / t_plain), 3),
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
        "mean_accepted_length": round(accepted / runs, 3) if runs else None,
        "same_tokens": ids_plain == ids_spec,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=12, help="prompts per workload (default 12)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens (default 4)")
    p.add_argument("--draft", default="codegen-tiny-py-draft")
    p.add_argument("--batches", default="1,4,16", help="the policy sweep's batch sizes (default 1,4,16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(device="cpu", progress=False, max_num_seqs=64)
    plain = Engine("codegen-tiny-py", **common)
    ngram = Engine("codegen-tiny-py", speculative_model="[ngram]", num_speculative_tokens=args.k,
                   speculative_max_rows=0, **common)  # fmt: skip
    draft = Engine("codegen-tiny-py", speculative_model=args.draft, num_speculative_tokens=args.k, **common)
    editing, completion = editing_prompts(args.prompts), completion_prompts(args.prompts)
    results = {
        "editing, prompt lookup": compare(plain, ngram, editing, args.max_tokens, 1),
        "completion, draft model": compare(plain, draft, completion, args.max_tokens, 1),
        "editing, draft model": compare(plain, draft, editing, args.max_tokens, 1),
        "completion, prompt lookup": compare(plain, ngram, completion, args.max_tokens, 1),
    }
    sweep = {b: compare(plain, ngram, editing, args.max_tokens, b) for b in map(int, args.batches.split(","))}
    print(f"{'workload':28}{'plain tok/s':>12}{'spec tok/s':>12}{'speedup':>9}{'accept':>8}{'len':>6}  same")
    for name, r in list(results.items()) + [(f"editing, lookup, batch {b}", r) for b, r in sweep.items()]:
        print(f"{name:28}{r['plain_tokens_per_s']:12.1f}{r['speculative_tokens_per_s']:12.1f}{r['speedup']:8.2f}x"
              f"{r['acceptance_rate'] or 0:8.2f}{r['mean_accepted_length'] or 0:6.2f}  {r['same_tokens']}")  # fmt: skip
    record = {
        "benchmark": "bench_speculative",
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": "codegen-tiny-py",
        "draft": args.draft,
        "num_speculative_tokens": args.k,
        "max_tokens": args.max_tokens,
        "batch_1": results,
        "prompt_lookup_by_batch": {str(b): r for b, r in sweep.items()},
    }
    for e in (plain, ngram, draft):
        e.close()
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
