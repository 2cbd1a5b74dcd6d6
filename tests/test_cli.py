"""The `fastcodegen` command, run as a subprocess, against transformers.

`fastcodegen generate` with greedy decoding must print the prompt (unless
--no-echo) and then exactly transformers' greedy completion decoded by the
transformers tokenizer, cut before the first match of CodeGen's stop
patterns unless --no-codegen-stops. A failure prints one line on stderr and
exits with the conventional status: 2 for bad usage or input (before anything
reaches stdout), 1 when the run fails, 130 on Ctrl-C, 141 when the reader of
stdout goes away.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import EOS_ID, Shape, build_hf_model, hf_greedy, save_checkpoint
from fastcodegen.sampling_params import CODEGEN_STOP_PATTERNS

MAX_TOKENS = 12
PROMPT = "def add(a, b):\n    return"

# CodeGen's own `truncate_before_pattern` (its sampling script), written out here.
CODEGEN_REFERENCE_PATTERNS = [r"^#", re.escape("<|endoftext|>"), r"^'''", r'^"""', r"\n\n\n"]

INTERRUPTED = 130  # 128 + SIGINT
BROKEN_PIPE = 141  # 128 + SIGPIPE


def _console() -> list[str]:
    return [str(Path(sys.executable).parent / "fastcodegen")]


def _module() -> list[str]:
    return [sys.executable, "-m", "fastcodegen"]


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, as in a terminal, even when the suite runs where SIGINT is ignored
    (a background job or nohup, whose children would inherit the ignore and never see the tests' SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(
    cmd: list[str], stdin: str | bytes | None = None, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        cmd,
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=dict(os.environ) if env is None else env,
        timeout=timeout,
        preexec_fn=_default_sigint,
    )
    p.out = p.stdout.decode("utf-8")  # type: ignore[attr-defined]
    p.err = p.stderr.decode("utf-8", errors="replace")  # type: ignore[attr-defined]
    return p


def _generate(prog: list[str], ckpt: Path, prompt: str, *extra: str, stdin: str | None = None):
    return _run(
        prog
        + ["generate", str(ckpt), prompt, "--device", "cpu", "--temperature", "0", "--max-tokens", str(MAX_TOKENS)]
        + list(extra),
        stdin=stdin,
    )


def _assert_one_error_line(err: str, *names: str) -> None:
    """stderr is one line, `error: ...`, naming each of `names`."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, err)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _hf_completion_ids(hf_tok, model, prompt: str) -> list[int]:
    """transformers' greedy tokens, up to (not including) the end-of-text token where the engine stops."""
    ids = hf_tok(prompt)["input_ids"]
    out = hf_greedy(model, ids, MAX_TOKENS)
    return out[: out.index(EOS_ID)] if EOS_ID in out else out


def _hf_completion(hf_tok, model, prompt: str) -> str:
    return hf_tok.decode(_hf_completion_ids(hf_tok, model, prompt), skip_special_tokens=True)


def _first_match(text: str) -> int | None:
    starts = [m.start() for p in CODEGEN_REFERENCE_PATTERNS if (m := re.compile(p, re.MULTILINE).search(text))]
    return min(starts) if starts else None


def test_stop_patterns_are_codegens():
    assert list(CODEGEN_STOP_PATTERNS) == CODEGEN_REFERENCE_PATTERNS


# ----------------------------------------------------------------------------- constructed checkpoints

# One layer, long enough a context that a completion can run for a while.
CHAIN_SHAPE = Shape("chain", n_embd=64, n_head=4, rotary_dim=8, n_layer=1, n_positions=256)


def chain_model(transitions: dict[int, int], seed: int):
    """A transformers CodeGen whose greedy next token is `transitions[last token]`.

    The blocks add nothing to the residual stream (out_proj, fc_out and its
    bias are zero), so the last position's logits are lm_head(ln_f(wte[t])).
    Source token number k gets the embedding e_k, which ln_f (weight 1, bias 0)
    maps to sqrt(d-1) at k and -1/sqrt(d-1) elsewhere; lm_head's row for
    transitions[t] is 10 * e_k, every other row and the bias zero. So the
    logit of transitions[t] is about 10 * sqrt(63) = 79, every other one at
    most 0.
    """
    model = build_hf_model(CHAIN_SHAPE, seed)
    assert len(transitions) <= CHAIN_SHAPE.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.out_proj.weight.zero_()
            block.mlp.fc_out.weight.zero_()
            block.mlp.fc_out.bias.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        for k, (src, dst) in enumerate(transitions.items()):
            model.transformer.wte.weight[src] = 0.0
            model.transformer.wte.weight[src, k] = 1.0
            model.lm_head.weight[dst, k] = 10.0
    return model


@pytest.fixture(scope="module")
def chain_checkpoint(tmp_path_factory, tokenizer_dir, hf_tok):
    """chain_checkpoint(prompt, texts, loop) -> (directory, transformers model).

    The greedy completion of `prompt` is the tokens whose texts are `texts`,
    then the last one is followed by texts[loop] again, and so on.
    """
    root = tmp_path_factory.mktemp("chains")
    made: dict[tuple, tuple[Path, object]] = {}

    def token(text: str) -> int:
        ids = hf_tok(text)["input_ids"]
        assert len(ids) == 1, f"{text!r} is not one token of the test tokenizer: {ids}"
        return ids[0]

    def make(prompt: str, texts: list[str], loop: int):
        key = (prompt, tuple(texts), loop)
        if key not in made:
            chain = [token(t) for t in texts]
            start = hf_tok(prompt)["input_ids"][-1]
            assert len(set(chain)) == len(chain) and start not in chain, "a transition table is a function"
            transitions = dict(zip([start] + chain, chain + [chain[loop]]))
            model = chain_model(transitions, seed=len(made))
            path = save_checkpoint(model, root / f"chain-{len(made)}", tokenizer=tokenizer_dir)
            made[key] = (path, model)
        return made[key]

    return make


# A completion that never stops by itself: "abab...".
CYCLE = ("print(3)\nC", ["a", "b"], 0)


# ----------------------------------------------------------------------------- greedy output


@pytest.mark.parametrize("prog", [_console, _module], ids=["console-script", "python-m"])
def test_generate_prints_prompt_and_greedy_completion(checkpoint, hf_tok, prog):
    ckpt, model = checkpoint("hd64", "safetensors", 0)
    expected = _hf_completion(hf_tok, model, PROMPT)
    assert expected, "transformers generates something"
    p = _generate(prog(), ckpt, PROMPT, "--no-codegen-stops")
    assert p.returncode == 0, p.err
    assert p.out == PROMPT + expected + "\n"


def test_no_echo_prints_only_the_completion(checkpoint, hf_tok):
    ckpt, model = checkpoint("hd64", "safetensors", 0)
    prompt = "import os\n\ndef main():\n    "
    expected = _hf_completion(hf_tok, model, prompt)
    p = _generate(_console(), ckpt, prompt, "--no-codegen-stops", "--no-echo")
    assert p.returncode == 0, p.err
    assert p.out == expected + "\n"


def test_prompt_from_stdin(checkpoint, hf_tok):
    ckpt, model = checkpoint("hd64", "safetensors", 0)
    prompt = "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x = x  # é\n"
    expected = _hf_completion(hf_tok, model, prompt)
    p = _generate(_console(), ckpt, "-", "--no-codegen-stops", stdin=prompt)
    assert p.returncode == 0, p.err
    assert p.out == prompt + expected + "\n"
    p = _generate(_console(), ckpt, "-", "--no-codegen-stops", "--no-echo", stdin=prompt)
    assert p.returncode == 0, p.err
    assert p.out == expected + "\n"


# ----------------------------------------------------------------------------- stop patterns


def _classify(hf_tok, ids: list[int]) -> str | None:
    """Whether the first stop match lies in the text of the token that completes it ("within"),
    or starts in text of earlier tokens ("across"); None if nothing matches."""
    for j in range(1, len(ids) + 1):
        text = hf_tok.decode(ids[:j], skip_special_tokens=True)
        at = _first_match(text)
        if at is not None:
            before = hf_tok.decode(ids[: j - 1], skip_special_tokens=True)
            assert text.startswith(before), "the test tokens are whole characters"
            return "within" if at >= len(before) else "across"
    return None


def _check_stop_case(chain_checkpoint, hf_tok, kind: str, prompt: str, texts: list[str], loop: int):
    ckpt, model = chain_checkpoint(prompt, texts, loop)
    ids = _hf_completion_ids(hf_tok, model, prompt)
    assert _classify(hf_tok, ids) == kind, [hf_tok.decode([i]) for i in ids]
    full = hf_tok.decode(ids, skip_special_tokens=True)
    expected = full[: _first_match(full)]
    assert expected, "text comes before the match"
    p = _generate(_console(), ckpt, prompt, "--no-echo")
    assert p.returncode == 0, p.err
    assert p.out == expected + "\n"
    p = _generate(_console(), ckpt, prompt)  # echoed: the prompt is never cut
    assert p.returncode == 0, p.err
    assert p.out == prompt + expected + "\n"


def test_codegen_stop_pattern_within_a_token(chain_checkpoint, hf_tok):
    # 'x', '\n', '"""' (one token), ...: `^"""` lies inside the token that completes it.
    _check_stop_case(chain_checkpoint, hf_tok, "within", "print(1)\nW", ["x", "\n", '"""', "y"], 3)


def test_codegen_stop_pattern_across_tokens(chain_checkpoint, hf_tok):
    # 'z', '\n', '\n', '\n', ...: `\n\n\n` starts two tokens before the one that completes it.
    _check_stop_case(chain_checkpoint, hf_tok, "across", "print(2)\nA", ["z", "\n"], 1)


# ----------------------------------------------------------------------------- signals and pipes


def _start(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("stdout", subprocess.PIPE)
    env = dict(os.environ) if env is None else env
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=_default_sigint, **kwargs
    )


def _cycle_command(ckpt: Path, *extra: str) -> list[str]:
    return _console() + [
        "generate",
        str(ckpt),
        CYCLE[0],
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "200",
        "--no-codegen-stops",
        *extra,
    ]


def _read_exactly(fd: int, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = os.read(fd, n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_ctrl_c_while_streaming(chain_checkpoint):
    ckpt, _ = chain_checkpoint(*CYCLE)
    p = _start(_cycle_command(ckpt, "--no-echo"))
    first = os.read(p.stdout.fileno(), 64)  # the completion has started
    assert first, p.stderr.read()
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=60)
    out = (first + rest).decode()
    assert p.returncode == INTERRUPTED, err.decode()
    assert err.decode() == "interrupted\n"
    assert out and ("ab" * 200).startswith(out), out


def test_ctrl_c_while_loading(checkpoint, tmp_path):
    ckpt, _ = checkpoint("hd64", "safetensors", 0)
    cache = tmp_path / "fastcodegen-cache"
    env = dict(os.environ, FASTCODEGEN_CACHE=str(cache))
    p = _start(_console() + ["generate", str(ckpt), PROMPT, "--device", "cpu", "--max-tokens", "4"], env=env)
    # Converting the checkpoint into the cache first makes the cache directory: from then on the engine is
    # loading, and nothing is printed before it is loaded.
    deadline = time.monotonic() + 120
    while p.poll() is None and not cache.is_dir() and time.monotonic() < deadline:
        time.sleep(0.001)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == INTERRUPTED, err.decode()
    assert err.decode() == "interrupted\n"
    assert out == b""
    leftovers = [f.name for f in cache.rglob("*") if "partial" in f.name]
    assert not leftovers, "an interrupted conversion leaves nothing behind"


# `python -m interrupted_load HOW fastcodegen-arguments...`: fastcodegen with an Engine() during which Ctrl-C
# is pressed, and meets code that handles it badly.
INTERRUPTED_LOAD = r"""
import os, signal, sys, time
import fastcodegen.engine
from fastcodegen.cli import main

real_init = fastcodegen.engine.Engine.__init__
how = sys.argv.pop(1)

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)

def init(self, *args, **kwargs):
    if how == "in-exec":  # code run by exec(), as dataclasses make their methods at import time
        exec("ctrl_c()", {"ctrl_c": ctrl_c})
    try:
        ctrl_c()
    except BaseException:  # a library that swallows the KeyboardInterrupt (torch, importing numpy)
        pass
    if how == "then-fails":  # and fails later for having been cut short
        raise ImportError("cannot load module more than once per process")
    real_init(self, *args, **kwargs)

fastcodegen.engine.Engine.__init__ = init
sys.exit(main())
"""


@pytest.mark.parametrize("how", ["in-exec", "swallowed", "then-fails"])
def test_ctrl_c_handled_badly_below(checkpoint, tmp_path, how):
    ckpt, _ = checkpoint("hd64", "safetensors", 0)
    (tmp_path / "interrupted_load.py").write_text(INTERRUPTED_LOAD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = _run([sys.executable, "-m", "interrupted_load", how, "generate", str(ckpt), PROMPT, "--device", "cpu"], env=env)
    assert p.returncode == INTERRUPTED, p.err
    assert p.err == "interrupted\n"
    assert p.out == ""


def test_reader_of_stdout_goes_away(chain_checkpoint):
    # As `fastcodegen generate ... | head -c 10`: the next write fails; no traceback, no
    # "Exception ignored ... BrokenPipeError" at exit, status 128 + SIGPIPE.
    ckpt, _ = chain_checkpoint(*CYCLE)
    p = _start(_cycle_command(ckpt, "--no-echo"))
    head = _read_exactly(p.stdout.fileno(), 10)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert head == b"ab" * 5
    assert p.returncode == BROKEN_PIPE, err
    assert err == ""


def test_stdout_closed_before_the_first_write(chain_checkpoint):
    ckpt, _ = chain_checkpoint(*CYCLE)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = _start(_cycle_command(ckpt, "--max-tokens", "3"), stdout=write_end)
    finally:
        os.close(write_end)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert p.returncode == BROKEN_PIPE, err
    assert err == ""


# ----------------------------------------------------------------------------- bad input


def test_invalid_utf8_on_stdin_exits_2(checkpoint):
    ckpt, _ = checkpoint("hd64", "safetensors", 0)
    p = _run(_console() + ["generate", str(ckpt), "-", "--device", "cpu"], stdin=b"def f():\n    return '\xff\xfe'\n")
    assert p.returncode == 2, p.err
    _assert_one_error_line(p.err, "standard input", "UTF-8")
    assert p.out == ""


def test_generation_failure_exits_1(tmp_path, tokenizer_dir, hf_tok):
    ids = hf_tok(CYCLE[0])["input_ids"]
    model = chain_model({ids[-1]: ids[0]}, seed=0)
    with torch.no_grad():
        model.lm_head.bias[0] = float("nan")
        assert not model(torch.tensor([ids])).logits[0, -1].isfinite().all()  # transformers' logits too
    ckpt = save_checkpoint(model, tmp_path / "non-finite", tokenizer=tokenizer_dir)
    p = _run(_console() + ["generate", str(ckpt), CYCLE[0], "--device", "cpu", "--no-echo"])
    assert p.returncode == 1, p.err
    _assert_one_error_line(p.err, "generation failed", "non-finite")
    assert p.out == ""


# Many failing invocations of `main` in one subprocess (one start of Python, not one each); with `fault`,
# Engine() raises that exception instead of loading, as a failing load would.
HARNESS = r"""
import errno, io, json, sys, traceback
import torch
import fastcodegen.engine
from fastcodegen.cli import main
from fastcodegen.hub import ModelNotFoundError
from fastcodegen.kv_cache import NotEnoughMemoryError

def run(argv, fault):
    real_init = fastcodegen.engine.Engine.__init__
    if fault is not None:
        def init(self, *args, **kwargs):
            raise eval(fault)
        fastcodegen.engine.Engine.__init__ = init
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8")
    sys.stdout, sys.stderr = stdout, err
    try:
        try:
            status = main(argv)
        except SystemExit as e:  # argparse
            status = e.code
        except Exception:  # escaped main: what Python would print
            traceback.print_exc()
            status = "uncaught"
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        fastcodegen.engine.Engine.__init__ = real_init
    stdout.flush()
    return {"status": status, "out": out.getvalue().decode(), "err": err.getvalue()}

cases = json.load(sys.stdin)
print(json.dumps({name: run(argv, fault) for name, (argv, fault) in cases.items()}))
"""


def _not_checkpoints(root: Path, ckpt: Path) -> dict[str, Path]:
    """Directories that are not checkpoints, each wrong in its own way."""
    dirs = {name: root / name for name in ("empty", "unrelated", "foreign", "corrupt", "no-weights")}
    for d in dirs.values():
        d.mkdir()
    (dirs["unrelated"] / "notes.txt").write_text("not a model\n")
    (dirs["unrelated"] / "data.csv").write_text("a,b\n1,2\n")
    (dirs["foreign"] / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (dirs["corrupt"] / "config.json").write_text('{"model_type": "codegen", "n_layer": ')
    (dirs["no-weights"] / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    return dirs


# name: (extra arguments, or a directory name / model, fault, status, names the line must hold)
def _cases(ckpt: Path, dirs: dict[str, Path]) -> dict[str, tuple]:
    gen = ["generate", str(ckpt), "x", "--device", "cpu"]
    long_prompt = "x = 1\n" * 200  # more tokens than the 128-token context
    cases = {
        "missing-dir": (["generate", "/nonexistent/dir", "x"], None, 2, ["/nonexistent/dir"]),
        "negative-temperature": (gen + ["--temperature", "-1"], None, 2, ["--temperature"]),
        "top-k": (gen + ["--top-k", "3000000000"], None, 2, ["--top-k"]),
        "max-tokens": (gen + ["--max-tokens", "99999999999"], None, 2, ["--max-tokens"]),
        "temperature": (gen + ["--temperature", "1e-45"], None, 2, ["--temperature"]),
        "prompt-too-long": (["generate", str(ckpt), long_prompt, "--device", "cpu"], None, 2, ["128"]),
        "unknown-name": (["generate", "no-such-model", "x", "--offline"], None, 2, ["no-such-model"]),
        "unknown-repo": (["generate", "no-such-org/no-such-model", "x", "--offline"], None, 2, ["no-such-model"]),
        "gpu-memory": (
            gen,
            "NotEnoughMemoryError('not enough GPU memory for the KV cache: 0.10 GiB left')",
            1,
            ["not enough GPU memory"],
        ),
        "cuda-oom": (gen, "torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate')", 1, ["out of memory"]),
        "permission": (
            gen,
            "PermissionError(errno.EACCES, 'Permission denied', '/ckpt/model.safetensors')",
            2,
            ["/ckpt/model.safetensors", "Permission denied"],
        ),
        "disk-full": (gen, "OSError(errno.ENOSPC, 'No space left on device', '/cache/w')", 1, ["/cache/w"]),
        "model-not-found": (gen, "ModelNotFoundError('model x: not here')", 2, ["model x: not here"]),
        "internal": (gen, "ZeroDivisionError('boom')", 1, ["ZeroDivisionError", "boom", "run with -v"]),
    }
    for name, d in dirs.items():
        cases[f"dir-{name}"] = (["generate", str(d), "x", "--device", "cpu"], None, 2, [str(d)])
    return cases


@pytest.fixture(scope="module")
def harness(checkpoint, tmp_path_factory):
    """{case: (result, status, names)} of every case of _cases, run in one subprocess."""
    ckpt, _ = checkpoint("hd64", "safetensors", 0)
    cases = _cases(ckpt, _not_checkpoints(tmp_path_factory.mktemp("not-checkpoints"), ckpt))
    cases["internal-verbose"] = (cases["internal"][0] + ["-v"], cases["internal"][1], 1, [])
    cases["argparse"] = (["generate", str(ckpt), "x", "--max-tokens", "ten"], None, 2, [])
    p = _run([sys.executable, "-c", HARNESS], stdin=json.dumps({k: v[:2] for k, v in cases.items()}))
    assert p.returncode == 0, p.err
    results = json.loads(p.out)
    return {name: (results[name], status, names) for name, (_, _, status, names) in cases.items()}


@pytest.mark.parametrize(
    "case",
    ["missing-dir", "negative-temperature", "top-k", "max-tokens", "temperature", "prompt-too-long"]
    + ["unknown-name", "unknown-repo"]
    + ["gpu-memory", "cuda-oom", "permission", "disk-full", "model-not-found", "internal"]
    + [f"dir-{name}" for name in ("empty", "unrelated", "foreign", "corrupt", "no-weights")],
)
def test_failure_is_one_line_before_any_output(harness, case):
    result, status, names = harness[case]
    assert result["status"] == status, result
    _assert_one_error_line(result["err"], *names)
    assert result["out"] == ""


def test_internal_error_traceback_with_verbose(harness):
    result, status, _ = harness["internal-verbose"]
    assert result["status"] == status, result
    assert "Traceback" in result["err"] and "ZeroDivisionError: boom" in result["err"], result
    assert result["err"].splitlines()[-1] == "error: internal error: ZeroDivisionError: boom"
    assert result["out"] == ""


def test_argparse_errors_exit_2(harness):
    result, status, _ = harness["argparse"]
    assert result["status"] == status, result
    assert "argument --max-tokens" in result["err"] and "Traceback" not in result["err"], result
    assert result["out"] == ""


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"]], ids=["top", "generate"])
def test_help(args):
    p = _run(_console() + args)
    assert p.returncode == 0, p.err
    assert p.out.startswith("usage: fastcodegen")
    if args[0] == "generate":
        for opt in ("--max-tokens", "--temperature", "--no-codegen-stops", "--no-echo"):
            assert opt in p.out
    else:
        assert "generate" in p.out
