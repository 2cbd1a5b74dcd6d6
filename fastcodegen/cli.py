"""The `fastcodegen` command.

fastcodegen generate MODEL PROMPT    stream a completion of PROMPT to the terminal
fastcodegen convert SRC DST          convert a transformers checkpoint
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from . import convert as convert_mod
from .registry import DEFAULT_MODEL


def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .hub import ModelNotFoundError
    from .sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams

    if len(args.args) > 2:
        print("error: generate takes [MODEL] PROMPT", file=sys.stderr)
        return 2
    model, prompt = args.args if len(args.args) == 2 else (DEFAULT_MODEL, args.args[0])
    prompt = sys.stdin.read() if prompt == "-" else prompt
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            stop_patterns=None if args.no_codegen_stops else list(CODEGEN_STOP_PATTERNS),
        )
        engine = Engine(
            model,
            device=args.device,
            dtype=args.dtype,
            backend=args.backend,
            load_format=args.load_format,
            revision=args.revision,
            download=not args.offline,
        )
        if not args.no_echo:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        shown = 0
        finish = None
        for out in engine.generate(prompt, params, stream=True):
            completion = out.outputs[0]
            sys.stdout.write(completion.text[shown:])
            sys.stdout.flush()
            shown = len(completion.text)
            finish = completion.finish_reason
        sys.stdout.write("\n")
        if args.verbose:
            print(f"[finish_reason={finish}]", file=sys.stderr)
    except (ValueError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcodegen", description="A fast inference engine for CodeGen models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="stream a completion of a prompt",
        usage="fastcodegen generate [MODEL] PROMPT [options]",
        description="Streams a completion of PROMPT (or of standard input, with -) from MODEL: an official name "
        f"(codegen-350M-mono ...), a Hugging Face repo id, a directory, or by default {DEFAULT_MODEL}, the small "
        "model shipped with fastcodegen.",
    )
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.2, help="0 for greedy (default 0.2, as CodeGen's sampler)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument(
        "--no-codegen-stops",
        action="store_true",
        help="do not stop at CodeGen's own stop patterns (a comment, docstring or three newlines at a line start)",
    )
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--revision", default=None)
    g.add_argument("--offline", action="store_true", help="never download")
    g.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt")
    g.add_argument("-v", "--verbose", action="store_true")
    g.set_defaults(func=_generate)

    c = sub.add_parser("convert", help="convert a transformers CodeGen checkpoint")
    convert_mod.add_arguments(c)
    c.set_defaults(func=convert_mod.run)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(message)s"
    )
    return args.func(args)
