"""Trains codegen-tiny-py: a small CodeGen on the Python standard library's own source files.

    python tools/train_tiny.py train --out fastcodegen/data/codegen-tiny-py    # about 35 minutes on 2 CPU cores
    python tools/train_tiny.py evaluate fastcodegen/data/codegen-tiny-py
    # its draft model for speculative decoding: 2 layers of 128, the same tokenizer
    python tools/train_tiny.py train --out fastcodegen/data/codegen-tiny-py-draft --layers 2 --embd 128 \
        --heads 4 --tokenizer fastcodegen/data/codegen-tiny-py --steps 2000 --precision fp32

The model is transformers' CodeGenForCausalLM (same block, the q,v,k qkv
layout, interleaved rotary on part of each head), with 4 layers, n_embd 256,
4 heads of 64 dims, rotary_dim 32 (CodeGen-350M's head geometry). Its
tokenizer is a byte-level BPE trained here, then given CodeGen's
`<|endoftext|>` and its 38 whitespace tokens (runs of 31 to 2 spaces, 9 to 2
tabs). Every machine with Python has the data: the `.py` files of the
standard library (files over 400 KB, which are data tables, are left out);
one file in twenty, chosen by a hash of its path, is held out. Training draws
windows of 256 tokens at random offsets, a quarter of them at a file's start.

`train` prints training and held-out loss as it goes and writes a standard
checkpoint directory (config.json, model.safetensors in float16,
tokenizer.json, tokenizer_config.json) that transformers'
`CodeGenForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
as they are, plus train_log.json. `evaluate` measures the checkpoint: the
held-out loss, and the fraction of greedy completions of held-out function
headers that parse with `ast` once cut at CodeGen's usual stop patterns.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import commit  # noqa: E402  (what every record of a run names: the commit, '+dirty' if changed)

WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
EOS = "<|endoftext|>"
BPE_VOCAB = 2560
MAX_FILE_BYTES = 400_000
FILE_START_FRACTION = 0.25
ARCH = dict(n_layer=4, n_embd=256, n_head=4, rotary_dim=32, n_positions=1024)


# --------------------------------------------------------------------------- data


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library's Python source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.stat().st_size <= MAX_FILE_BYTES
    )
    held = [p for p in files if _held_out(p.relative_to(root))]
    train = [p for p in files if not _held_out(p.relative_to(root))]
    return train, held


def _held_out(relative: Path) -> bool:
    return int(hashlib.sha1(relative.as_posix().encode()).hexdigest(), 16) % 20 == 0


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2, show_progress=False
    )
    tk.train_from_iterator(texts, trainer)
    # As in CodeGen: <|endoftext|> after the BPE entries, then the whitespace runs, matched before BPE.
    tk.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tk.add_tokens([AddedToken(t, special=False, normalized=True) for t in WHITESPACE_TOKENS])
    return tk


def encode(tk, texts: list[str]) -> np.ndarray:
    """All texts' ids in one array, each followed by <|endoftext|>."""
    eos = tk.token_to_id(EOS)
    out = []
    for enc in tk.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return np.array(out, dtype=np.int64)


def windows(
    ids: np.ndarray, context: int, count: int, rng: np.random.Generator, file_starts: np.ndarray | None = None
) -> torch.Tensor:
    """`count` windows of context + 1 ids at random offsets; with `file_starts`, a quarter begin at a file's start.

    A prompt sits at position 0 with nothing before it, which windows cut mid-file never show: without
    file-start windows the model cannot tell a top-level `def` from a method's and indents its body at
    random.
    """
    starts = rng.integers(0, len(ids) - context - 1, size=count)
    if file_starts is not None:
        aligned = rng.random(count) < FILE_START_FRACTION
        starts[aligned] = rng.choice(file_starts[file_starts < len(ids) - context - 1], size=int(aligned.sum()))
    return torch.from_numpy(np.stack([ids[s : s + context + 1] for s in starts]))


# --------------------------------------------------------------------------- model


def architecture(args: argparse.Namespace) -> dict:
    """ARCH with the sizes the command line overrides."""
    arch = dict(ARCH)
    for key, name in (("n_layer", "layers"), ("n_embd", "embd"), ("n_head", "heads")):
        if getattr(args, name, None) is not None:
            arch[key] = getattr(args, name)
    if arch["n_head"] % 4 or arch["n_embd"] % arch["n_head"] or arch["rotary_dim"] > arch["n_embd"] // arch["n_head"]:
        raise SystemExit(
            f"error: {arch}: CodeGen's qkv projection needs a head count divisible by 4, n_embd divisible by it, "
            "and rotary_dim at most the head size"
        )
    return arch


def build_model(vocab_size: int, eos_id: int, seed: int, arch: dict):
    from transformers import CodeGenConfig, CodeGenForCausalLM

    torch.manual_seed(seed)
    config = CodeGenConfig(
        vocab_size=vocab_size,
        n_ctx=arch["n_positions"],
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        **arch,
    )
    return CodeGenForCausalLM(config)


@torch.no_grad()
def mean_loss(model, batch: torch.Tensor, bf16: bool = True, chunk: int = 32) -> float:
    """Mean next-token loss (nats) over the windows of `batch`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batch), chunk):
        x = batch[i : i + chunk]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    bf16 = args.precision == "bf16"
    t0 = time.time()
    train_files, held_files = stdlib_files()
    train_texts = [read(p) for p in train_files]
    held_texts = [read(p) for p in held_files]
    if args.tokenizer is not None:  # another model's tokenizer: a draft must share its target's ids
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    else:
        tk = train_tokenizer(train_texts)
    arch = architecture(args)
    train_ids, held_ids = encode(tk, train_texts), encode(tk, held_texts)
    eos = tk.token_to_id(EOS)
    size = tk.get_vocab_size(with_added_tokens=True)
    vocab = -(-size // 64) * 64  # weight rows past the tokenizer, as CodeGen has
    print(
        f"data: {len(train_files)} training files ({len(train_ids):,} tokens), {len(held_files)} held out "
        f"({len(held_ids):,} tokens); tokenizer {size} ids; {time.time() - t0:.0f} s",
        flush=True,
    )
    model = build_model(vocab, eos, args.seed, arch)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, {arch}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    held_batch = windows(held_ids, args.context, args.eval_windows, np.random.default_rng(1))
    file_starts = np.concatenate([[0], np.flatnonzero(train_ids == eos) + 1])

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log = []
    smooth = None
    t_train = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = windows(train_ids, args.context, args.batch, rng, file_starts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            held = mean_loss(model, held_batch, bf16=bf16)
            elapsed = time.time() - t_train
            tokens = (step + 1) * args.batch * args.context
            print(
                f"step {step + 1:5d}  train loss {smooth:.3f}  held-out loss {held:.3f}  "
                f"{tokens / elapsed:,.0f} tokens/s  {elapsed / 60:.1f} min",
                flush=True,
            )
            log.append(
                {"step": step + 1, "tokens": tokens, "train_loss": round(smooth, 4), "held_out_loss": round(held, 4)}
            )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CodeGenTokenizer",
                "bos_token": EOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "add_prefix_space": False,
                "model_max_length": arch["n_positions"],
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "train_log.json").write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "commit": commit(),
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "threads": args.threads,
                "minutes": round((time.time() - t0) / 60, 1),
                "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
                "architecture": arch,
                "parameters": params,
                "tokenizer_size": size,
                "training_files": len(train_files),
                "training_tokens": int(len(train_ids)),
                "held_out_files": len(held_files),
                "held_out_tokens": int(len(held_ids)),
                "log": log,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out} in {(time.time() - t0) / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------- evaluation

# CodeGen's truncation of a function's completion: its terminal patterns, and a top-level def or print after
# the header (the function has ended).
STOP_PATTERNS = (r"^#", re.escape(EOS), r"^'''", r'^"""', r"\n\n\n", r"^def", r"^print")


def function_headers(files: list[Path], limit: int, seed: int = 0) -> list[str]:
    """Top-level function headers of held-out files (the `def` line(s) through the colon), with a newline."""
    prompts = []
    for path in files:
        text = read(path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.decorator_list and node.body:
                header = "".join(lines[node.lineno - 1 : node.body[0].lineno - 1])
                if header.rstrip().endswith(":") and '"""' not in header and "'''" not in header:
                    prompts.append(header.rstrip() + "\n")
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[:limit]


def evaluate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, CodeGenForCausalLM

    from fastcodegen import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    _, held_files = stdlib_files()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    held_ids = np.array(
        [i for p in held_files for i in tok(read(p))["input_ids"] + [tok.convert_tokens_to_ids(EOS)]], dtype=np.int64
    )
    model = CodeGenForCausalLM.from_pretrained(str(ckpt)).float()
    held = mean_loss(model, windows(held_ids, args.context, args.eval_windows, np.random.default_rng(1)), bf16=False)
    print(f"held-out loss: {held:.3f} nats/token ({len(held_ids):,} held-out tokens)", flush=True)

    engine = Engine(str(ckpt), device="cpu", dtype="float32", backend="torch", progress=False)
    prompts = function_headers(held_files, args.functions)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop_patterns=STOP_PATTERNS)
    outs = engine.generate(prompts, params, use_tqdm=False)
    parsed = parsed_stopped = stopped = 0
    for prompt, out in zip(prompts, outs):
        ended = out.outputs[0].finish_reason == "stop"
        stopped += ended
        try:
            ast.parse(prompt + out.outputs[0].text)
            parsed += 1
            parsed_stopped += ended
        except SyntaxError:
            pass
    rate = parsed / len(prompts)
    print(
        f"greedy completions of {len(prompts)} held-out function headers: {rate:.1%} parse with ast; "
        f"{stopped} ended at a stop pattern ({parsed_stopped} of them parse), "
        f"{len(prompts) - stopped} at max_tokens={args.max_tokens}",
        flush=True,
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "held_out_loss": round(held, 4),
        "held_out_tokens": int(len(held_ids)),
        "functions": len(prompts),
        "parse_rate": round(rate, 4),
        "stopped_at_pattern": stopped,
        "stopped_and_parse": parsed_stopped,
        "max_tokens": args.max_tokens,
        "stop_patterns": list(STOP_PATTERNS),
    }
    if args.write:
        (ckpt / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train and write a checkpoint directory")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=4500)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--context", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--eval-windows", type=int, default=200)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, help=f"layers (default {ARCH['n_layer']})")
    t.add_argument("--embd", type=int, help=f"model width (default {ARCH['n_embd']})")
    t.add_argument("--heads", type=int, help=f"attention heads (default {ARCH['n_head']})")
    t.add_argument("--tokenizer", help="a checkpoint directory whose tokenizer.json to use instead of training one")
    t.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16 autocast (default), or fp32: ten times faster on CPUs without native bfloat16",
    )
    t.set_defaults(func=train)
    e = sub.add_parser("evaluate", help="held-out loss and the parse rate of completed function headers")
    e.add_argument("checkpoint")
    e.add_argument("--context", type=int, default=256)
    e.add_argument("--eval-windows", type=int, default=400)
    e.add_argument("--functions", type=int, default=200)
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--write", action="store_true", help="also write eval.json into the checkpoint")
    e.set_defaults(func=evaluate)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
