"""Host-side cost of a decode step: everything but the model forward and the sampler's arithmetic.

    python benchmarks/bench_host_overhead.py [--seqs 256] [--context 2048] [--steps 100]

Runs the engine's real step loop (`Engine._step`: the native scheduler's
schedule() and update(), the step's input views, the sampler's inputs, the
token append, end-of-text / stop token / stop string / length checks,
incremental detokenizing, the output processor's events) with `--seqs` sequences decoding at
contexts just under `--context` tokens. The model runner returns a ready
logits tensor and the sampler returns ready tokens, so what is timed is the
host's work around the GPU's. The model is a one-layer CodeGen at the real
vocabulary size (its forward is never called during timing); the tokenizer is
a byte-level vocabulary of the real size with random token strings, and every
request has two stop strings, so detokenizing and stop checks do real work.

Prints the distribution of microseconds per step and its split between the
native scheduler and Python, then, as its last line, a JSON object with
"us_per_step" (the median). The target is under 100 us per step on one core.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import commit

VOCAB = 51200  # rows of the real embedding
TOKENIZER_SIZE = 50295  # ids of the real tokenizer


def _tiny_checkpoint(path: Path, context: int, seed: int) -> None:
    """config.json of a one-layer CodeGen and a byte-level tokenizer of the real size with random tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    config = {
        "model_type": "codegen",
        "architectures": ["CodeGenForCausalLM"],
        "n_layer": 1,
        "n_embd": 64,
        "n_head": 4,
        "rotary_dim": 16,
        "vocab_size": VOCAB,
        "n_positions": context,
        "n_ctx": context,
        "activation_function": "gelu_new",
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    while len(vocab) < 50256:
        token = "".join(rng.choice(alphabet, size=int(rng.integers(2, 8))))
        vocab.setdefault(token, len(vocab))
    tk = Tokenizer(models.BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tk.add_tokens([AddedToken(" " * n, normalized=True) for n in range(31, 1, -1)])
    tk.add_tokens([AddedToken("\t" * n, normalized=True) for n in range(9, 1, -1)])
    tk.save(str(path / "tokenizer.json"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=256, help="sequences decoding at once")
    p.add_argument("--context", type=int, default=2048, help="their context length (the model's limit)")
    p.add_argument("--steps", type=int, default=160, help="decode steps run (every other one timed whole)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # One core, as the target says; pinned, so the scheduler's data stays in one core's caches.
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from fastcodegen import Engine, SamplingParams
    from fastcodegen.request import Reader
    from fastcodegen.sampler import Sampled
    from fastcodegen.validation import validate

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        _tiny_checkpoint(ckpt, args.context, args.seed)
        engine = Engine(
            str(ckpt),
            load_format="dummy",
            device="cpu",
            backend="torch",
            max_num_seqs=args.seqs,
            max_num_batched_tokens=8192,
            kv_cache_tokens=args.seqs * args.context,
            enable_prefix_caching=False,
            progress=False,
        )
    assert engine.tokenizer is not None and engine.tokenizer.vocab_limit == TOKENIZER_SIZE

    rng = np.random.default_rng(args.seed)
    # Prompts are prefilled in chunks of 8192 tokens, and the first ones decode while later ones
    # prefill: leave room for those tokens and the timed ones under the context limit.
    prefill_steps = -(-args.seqs * args.context // 8192) + 1
    prompt_len = args.context - args.steps - prefill_steps - 4
    params = SamplingParams(
        max_tokens=args.context - prompt_len, temperature=0.0, stop=["\nclass ", "\ndef "], ignore_eos=True
    )
    prompts = rng.integers(0, TOKENIZER_SIZE, size=(args.seqs, prompt_len)).tolist()
    reader = Reader()
    for text, ids, sp in validate(None, prompts, params, engine.tokenizer, engine._limits):
        engine._outputs.add(text, ids, sp, reader)

    # The model and the sampler's arithmetic are replaced by ready answers.
    logits = torch.zeros(2 * args.seqs, VOCAB)
    token_pool = rng.integers(0, TOKENIZER_SIZE - 1, size=(args.steps + 1000, 2 * args.seqs)).astype(np.int32)
    calls = iter(range(10**9))
    engine._runner.execute = lambda step: logits[: step.num_samples]
    all_finite = np.ones(2 * args.seqs, dtype=bool)
    engine._runner.sampler = lambda lg, inputs: Sampled(
        token_pool[next(calls) % len(token_pool), : lg.shape[0]], {}, all_finite[: lg.shape[0]]
    )

    core = engine._scheduler._core
    while engine.stats.computed_tokens < args.seqs * prompt_len:  # prefill every prompt first (not timed)
        engine._step()
    schedule_ns, update_ns = [], []
    real_schedule, real_update = core.schedule, core.update

    class Timed:  # wraps the native calls to split the step's time
        def __getattr__(self, name):
            return getattr(core, name)

        def schedule(self):
            t = time.perf_counter_ns()
            out = real_schedule()
            schedule_ns.append(time.perf_counter_ns() - t)
            return out

        def update(self, tokens, finite):
            t = time.perf_counter_ns()
            out = real_update(tokens, finite)
            update_ns.append(time.perf_counter_ns() - t)
            return out

    gc.collect()
    gc.disable()
    step_ns = []
    for i in range(args.steps):
        timing = i % 2 == 1  # every other step also measures the split (the wrappers cost a little)
        if timing:
            engine._scheduler._core = Timed()
        t = time.perf_counter_ns()
        engine._step()
        elapsed = time.perf_counter_ns() - t
        if timing:
            engine._scheduler._core = core
        else:
            step_ns.append(elapsed)
        assert core.num_running == args.seqs, "every sequence keeps decoding through the timed steps"
    gc.enable()

    us = sorted(x / 1e3 for x in step_ns)
    median = statistics.median(us)
    sched_us = statistics.median(schedule_ns) / 1e3
    update_us = statistics.median(update_ns) / 1e3
    print(f"{args.seqs} sequences decoding at contexts between {prompt_len} and {args.context}, {len(us)} steps timed")
    print(f"us per step: median {median:.1f}, p10 {us[len(us) // 10]:.1f}, p90 {us[9 * len(us) // 10]:.1f}")
    print(
        f"  native schedule(): {sched_us:.1f} us, native update(): {update_us:.1f} us, Python: {median - sched_us - update_us:.1f} us"
    )
    print(
        json.dumps(
            {
                "benchmark": "bench_host_overhead",
                "date": datetime.date.today().isoformat(),
                "commit": commit(),
                "cpu": platform.processor() or platform.machine(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "seqs": args.seqs,
                "context": args.context,
                "steps": len(us),
                "us_per_step": round(median, 1),
                "p90_us": round(us[9 * len(us) // 10], 1),
                "native_schedule_us": round(sched_us, 1),
                "native_update_us": round(update_us, 1),
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
