"""Stop strings (also across token boundaries), stop token ids and stop patterns.

References: transformers' greedy tokens decoded by transformers' tokenizer,
cut by hand at the stop; and transformers' own `CodeGenTokenizer.truncate`
for the pattern semantics.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import hf_greedy
from fastcodegen import CODEGEN_STOP_PATTERNS, SamplingParams
from fastcodegen.stopping import PatternStops

PROMPT = "import os\n\ndef main(args):\n    for name in args:\n"
MAX = 40


@pytest.fixture
def setup(engine_factory, tokenizer_dir):
    engine, hf = engine_factory("hd64")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(PROMPT)["input_ids"]
    ref = hf_greedy(hf, ids, MAX)
    return engine, tok, ref


def _first_tokens_containing(tok, ref, needle):
    """The shortest prefix of `ref` whose decoded text contains `needle`."""
    for j in range(1, len(ref) + 1):
        if needle in tok.decode(ref[:j], skip_special_tokens=True):
            return ref[:j]
    raise AssertionError("needle not found")


def _token_boundaries(tok, ref):
    """Character offsets in the decoded text where one token ends and the next begins."""
    text = tok.decode(ref, skip_special_tokens=True)
    out = []
    for i in range(1, len(ref)):
        prefix = tok.decode(ref[:i], skip_special_tokens=True)
        if text.startswith(prefix) and 0 < len(prefix) < len(text):
            out.append(len(prefix))
    return text, out


def test_stop_string_spanning_tokens(setup, fresh_seed):
    engine, tok, ref = setup
    text, bounds = _token_boundaries(tok, ref)
    rng = random.Random(fresh_seed)
    # Not across a replacement character: where the bytes of an incomplete
    # UTF-8 character stand, a prefix decode shows U+FFFD at once while the
    # engine waits for the next token to tell whether the character completes.
    b = rng.choice([b for b in bounds if 2 <= b <= len(text) - 2 and "\ufffd" not in text[b - 2 : b + 2]])
    stop = text[b - 2 : b + 2]  # two characters of each token
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX, stop=[stop], ignore_eos=True))[
        0
    ].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    assert out.token_ids == _first_tokens_containing(tok, ref, stop)


def test_earliest_of_several_stop_strings_wins(setup):
    engine, tok, ref = setup
    text, bounds = _token_boundaries(tok, ref)
    clean = [b for b in bounds if 1 <= b <= len(text) - 3 and "\ufffd" not in text[b - 1 : b + 2]]
    late, early = text[clean[-1] : clean[-1] + 3], text[clean[0] - 1 : clean[0] + 1]
    first = min((text.find(s), s) for s in (late, early))
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX, stop=[late, early], ignore_eos=True))[
        0
    ].outputs[0]
    assert out.text == text[: first[0]]
    assert out.stop_reason == first[1]


def test_stop_token_id(setup):
    engine, tok, ref = setup
    stop_id = ref[len(ref) // 2]
    k = ref.index(stop_id)
    out = engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=MAX, stop_token_ids=[stop_id], ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    assert out.token_ids == ref[: k + 1]
    assert out.text == tok.decode(ref[:k], skip_special_tokens=True)


def test_stop_pattern_cuts_before_the_first_match(setup, fresh_seed):
    engine, tok, ref = setup
    text = tok.decode(ref, skip_special_tokens=True)
    rng = random.Random(fresh_seed)
    m = rng.choice([m for m in range(1, len(text) - 3) if "\ufffd" not in text[m : m + 3]])
    pattern = re.escape(text[m : m + 3])
    out = engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=MAX, stop_patterns=[pattern], ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == pattern
    assert out.text == text[: re.search(pattern, text, re.MULTILINE).start()]


def test_streamed_text_is_never_taken_back(setup):
    engine, tok, ref = setup
    text = tok.decode(ref, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    final = None
    seen = []
    for snap in engine.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=MAX, stop=stop, ignore_eos=True), stream=True
    ):
        seen.append(snap.outputs[0].text)
        final = snap.outputs[0].text
    assert final == text[: text.find(stop)]
    assert all(final.startswith(s) for s in seen)


# ---------------------------------------------------------------- pattern semantics, as CodeGen's truncate

CODE_SAMPLES = [
    "    return a + b\n\n# test\nprint(add(1, 2))\n",
    "    x = 1\n'''doc'''\n",
    '    """inner docstring"""\n    return 1\n"""\n',
    "    pass\n\n\n\ndef other():\n",
    "# leading comment\n    body\n",
    "    s = '<|endoftext|>'\n",
    "    if x:\n        y = 2\n    return y\n",
]


@pytest.mark.parametrize("completion", CODE_SAMPLES)
def test_patterns_cut_like_codegen_truncate(completion, fresh_seed, tokenizer_dir):
    from transformers.models.codegen.tokenization_codegen import CodeGenTokenizer

    expected = CodeGenTokenizer.truncate(None, completion, list(CODEGEN_STOP_PATTERNS))
    stops = PatternStops(CODEGEN_STOP_PATTERNS)
    # Feed the text in random chunks, as tokens would arrive; stop at the first match.
    rng = random.Random(fresh_seed)
    text, hit, i = "", None, 0
    while i < len(completion) and hit is None:
        j = min(len(completion), i + rng.randint(1, 4))
        text += completion[i:j]
        hit = stops.search(text)
        i = j
    got = text[: hit[0]] if hit is not None else text
    assert got == expected


def _scheduler_with_vocab(pieces: list[bytes], stop: list[str], max_tokens: int = 50):
    """A native scheduler over a made-up vocabulary, fed tokens by hand: one sequence, one request."""
    from fastcodegen import _C

    c = _C.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len = 8, 16, 1, 64, 128
    sched = _C.Scheduler(c)
    dtypes = {"int64": np.int64, "int32": np.int32, "float32": np.float32}
    bufs = {name: np.zeros(shape, dtypes[dtype]) for name, dtype, shape, *_ in sched.step_fields()}
    sched.bind(bufs)
    sched.set_vocabulary(pieces, [])
    r = _C.RequestConfig()
    r.max_tokens, r.stop_strings, r.ignore_eos = max_tokens, stop, True
    sched.add_request([0], r)
    return sched, bufs


def _feed(sched, tokens: list[int]) -> list[tuple[int, int]]:
    """Feeds tokens one step each until the sequence finishes; (sequence, request) of each that finished."""
    finished = []
    for t in tokens:
        sched.schedule()
        finished = [(seq, req) for seq, req, _, _, finish, _ in sched.update(np.array([t], dtype=np.int32)) if finish]
        if finished:
            break
    return finished


def test_native_stop_string_split_across_tokens_is_found_once_complete():
    pieces = [b"x", b"abc S", b"T", b"O", b"P tail", b"more"]
    sched, _ = _scheduler_with_vocab(pieces, ["STOP"])
    finished = _feed(sched, [1, 2, 3, 5])
    assert finished == []  # "abc STO" + "more": no stop yet
    sched, _ = _scheduler_with_vocab(pieces, ["STOP"])
    finished = _feed(sched, [1, 2, 3, 4, 5])
    assert [s for s, _ in finished] == [0]
    info = sched.seq_info(0)
    assert info["finish"] == 1 and info["stop_string"] == 0
    assert sched.text(0) == b"abc "
    assert sched.output_tokens(0) == [1, 2, 3, 4]  # the token that completed it stays in the ids


def test_native_stop_string_inside_a_split_utf8_character():
    """A stop string of multi-byte characters, its bytes arriving in separate tokens."""
    stop = "é中"
    raw = ("a" + stop + "b").encode()
    pieces = [b"x"] + [bytes([c]) for c in raw]
    sched, _ = _scheduler_with_vocab(pieces, [stop])
    finished = _feed(sched, list(range(1, len(pieces))))
    assert finished and sched.text(0) == b"a"


def test_empty_matching_pattern_rejected():
    with pytest.raises(ValueError, match="stop_patterns"):
        SamplingParams(stop_patterns=["x*"])


def test_stops_with_sampling_still_respect_max_tokens(setup, fresh_seed):
    engine, _, _ = setup
    out = engine.generate(
        PROMPT,
        SamplingParams(temperature=1.0, seed=fresh_seed % 10000, max_tokens=5, stop=["\x00\x01"], ignore_eos=True),
    )[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize(
    "text, stable",
    [
        ("abc", 0),  # the whole text is its last line
        ("abc\ndef", 4),
        ("abc\n\n", 3),  # the newlines may grow into '\n\n\n'
        ("abc\n\nx", 5),
        ("a\nb\n", 3),
    ],
)
def test_streamed_text_holds_back_where_a_pattern_may_still_match(text, stable):
    assert PatternStops.stable_len(text) == stable
    # Whatever follows, CodeGen's truncate never cuts before the stable part.
    from transformers.models.codegen.tokenization_codegen import CodeGenTokenizer

    for tail in ("\n", "\n#", "#", "\n\n", "'''", "x\n\n\n"):
        assert len(CodeGenTokenizer.truncate(None, text + tail, list(CODEGEN_STOP_PATTERNS))) >= stable
