"""The `fastcodegen` command, run as a subprocess, against transformers.

`fastcodegen generate` with greedy decoding must print the prompt (unless
--no-echo) and then exactly transformers' greedy completion decoded by the
transformers tokenizer, cut before the first match of CodeGen's stop
patterns unless --no-codegen-stops; errors exit with code 2 and a message.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EOS_ID, hf_greedy, stdlib_sources
from fastcodegen.sampling_params import CODEGEN_STOP_PATTERNS

MAX_TOKENS = 12
PROMPT = "def add(a, b):\n    return"

# CodeGen's own `truncate_before_pattern` (its sampling script), written out here.
CODEGEN_REFERENCE_PATTERNS = [r"^#", re.escape("<|endoftext|>"), r"^'''", r'^"""', r"\n\n\n"]

# Prompts for the hd64 / seed 1 checkpoint whose greedy completion (under
# transformers) hits a stop pattern, found beforehand; the test re-derives
# from transformers which kind each is and falls back on these only if none
# of its freshly drawn prompts does.
FALLBACK_STOP_PROMPTS = [
    "            # The constructor no longer requires that the so\n",
    "        overrides this method.  If you want a visible tempor\n",
    "            raise ArgumentError(action, msg % type_func)\n",
    "        for key, value in vars(subnamespace).items():\n",
    "            raise ArgumentError(action, msg % args)\n",
]


def _console() -> list[str]:
    return [str(Path(sys.executable).parent / "fastcodegen")]


def _module() -> list[str]:
    return [sys.executable, "-m", "fastcodegen"]


def _run(cmd: list[str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    p = subprocess.run(
        cmd,
        input=stdin.encode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=timeout,
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
            if not text.startswith(before):  # a character completed by token j: unclear, skip
                return None
            return "within" if at >= len(before) else "across"
    return None


@pytest.fixture(scope="module")
def stop_cases(checkpoint, hf_tok):
    """{kind: prompt} for the hd64 / seed 1 checkpoint: fresh random stdlib lines first, then fallbacks."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"stop_cases seed={seed}")
    rng = random.Random(seed)
    _, model = checkpoint("hd64", "safetensors", 1)
    lines = [
        line[:60] + "\n"
        for f in stdlib_sources()[12:60]
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip() and not line.startswith("-") and line.isascii()
    ]
    candidates = rng.sample(lines, 50) + FALLBACK_STOP_PROMPTS
    found: dict[str, str] = {}
    for prompt in candidates:
        kind = _classify(hf_tok, _hf_completion_ids(hf_tok, model, prompt))
        if kind is not None and kind not in found:
            found[kind] = prompt
        if len(found) == 2:
            break
    print("stop cases:", found)
    return found


def _check_stop_case(checkpoint, hf_tok, stop_cases, kind):
    assert kind in stop_cases, f"no prompt found whose completion has a stop match {kind} a token"
    ckpt, model = checkpoint("hd64", "safetensors", 1)
    prompt = stop_cases[kind]
    full = _hf_completion(hf_tok, model, prompt)
    cut = _first_match(full)
    assert cut is not None
    expected = full[:cut]
    print(f"prompt={prompt!r} full={full!r} expected={expected!r}")
    p = _generate(_console(), ckpt, prompt, "--no-echo")
    assert p.returncode == 0, p.err
    assert p.out == expected + "\n"
    p = _generate(_console(), ckpt, prompt)  # echoed: the prompt is never cut
    assert p.returncode == 0, p.err
    assert p.out == prompt + expected + "\n"


def test_codegen_stop_pattern_within_a_token(checkpoint, hf_tok, stop_cases):
    _check_stop_case(checkpoint, hf_tok, stop_cases, "within")


def test_codegen_stop_pattern_across_tokens(checkpoint, hf_tok, stop_cases):
    _check_stop_case(checkpoint, hf_tok, stop_cases, "across")


# ----------------------------------------------------------------------------- errors and help


def test_missing_model_exits_2():
    p = _run(_console() + ["generate", "/nonexistent/dir", "x"])
    assert p.returncode == 2
    assert p.err.startswith("error:"), p.err
    assert "/nonexistent/dir" in p.err
    assert p.out == ""


def test_invalid_temperature_exits_2(checkpoint):
    ckpt, _ = checkpoint("hd64", "safetensors", 0)
    p = _run(_console() + ["generate", str(ckpt), "x", "--device", "cpu", "--temperature", "-1"])
    assert p.returncode == 2
    assert "error" in p.err and "temperature" in p.err, p.err
    assert p.out == ""


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
