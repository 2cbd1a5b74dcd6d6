"""fastcodegen's tokenizer against transformers' CodeGen tokenizer.

Both checkpoint layouts (tokenizer.json, and the legacy vocab.json +
merges.txt + added_tokens.json set) must encode and decode exactly as
`transformers.AutoTokenizer` does: whitespace runs (CodeGen's 38 added
tokens), tabs, CRLF, non-ASCII text, `<|endoftext|>` inside the text, whole
standard-library files; decoding of random id sequences with and without
special tokens; and the incremental detokenizer, fed one id at a time, must
reproduce the full decode without emitting U+FFFD for a character that a
later token completes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import EOS, EOS_ID, TOKENIZER_SIZE, WHITESPACE_TOKENS, NativeDetokenizer, stdlib_sources
from fastcodegen.tokenizer import Tokenizer

LAYOUTS = ["tokenizer.json", "legacy"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (written out here, as in OpenAI's encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@pytest.fixture(scope="module", params=LAYOUTS)
def tokenizers_pair(request):
    """(directory, fastcodegen Tokenizer, transformers tokenizer) for one layout."""
    from transformers import AutoTokenizer

    d = request.getfixturevalue("tokenizer_dir" if request.param == "tokenizer.json" else "legacy_tokenizer_dir")
    return d, Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))


def _hf_encode(hf, text: str) -> list[int]:
    return hf(text, verbose=False)["input_ids"]


def _byte_ids(hf) -> dict[int, int]:
    """The id of the single-byte token of each of the 256 byte values."""
    vocab = hf.get_vocab()
    out = {b: vocab[c] for b, c in BYTE_TO_CHAR.items() if c in vocab}
    assert len(out) == 256, "the fixture's BPE has every byte in its alphabet"
    return out


def _partial_utf8_ids(hf) -> list[int]:
    """Ids of plain vocabulary tokens whose bytes are not valid UTF-8 on their own (split characters)."""
    out = []
    for tok, i in hf.get_vocab().items():
        if i >= EOS_ID or not all(c in CHAR_TO_BYTE for c in tok):
            continue
        try:
            bytes(CHAR_TO_BYTE[c] for c in tok).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return sorted(out)


# ----------------------------------------------------------------------------- encoding

FIXED_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class A:\n\tdef f(self):\n\t\treturn 1\n\t\t\n",
    "if x:\n\t    y = 1  \t\n  \t  z = 2\t \n",
    "x = 1   \n\n\n   \ny = 2\r\nz = 3\r\n\r\n",
    "s = 'héllo wörld, ça va? naïve café'\n",
    "# 日本語のコメント 中文注释 한국어\nprint('😀 👍🏽 👨‍👩‍👧 🐍')\n",
    "a = 1<|endoftext|>def g():\n    pass",
    "<|endoftext|>",
    "  <|endoftext|>  \n<|endoftext|><|endoftext|>\t<|endoftext|>x",
    "\t \t \t\t  \t\t\t   \t\t\t\t    ",
    "trailing spaces      ",
    "trailing tab\t",
    "\n\n\n\n",
    "\r\n\r\n\r",
    " ",
    "",
    "<|endoftext",
    "|endoftext|>  <|endoftext|",
]


def _whitespace_texts() -> list[str]:
    out = []
    for n in range(1, 41):
        sp = " " * n
        out += [sp, "x" + sp + "y", "def f():\n" + sp + "return 1\n", "a = 1" + sp + "\n", sp + "\n" + sp]
    for n in range(1, 13):
        tb = "\t" * n
        out += [tb, "if x:\n" + tb + "pass\n", tb + " " * (n + 1) + "x", " " * n + tb + "y", tb + "\n"]
    return out


def _random_code(rng: random.Random, n: int) -> list[str]:
    pieces = [
        "def",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "return",
        "(",
        ")",
        ":",
        "=",
        "x",
        "self",
        ".",
        ",",
        "'",
        '"',
        "#",
        "é",
        "ü",
        "世界",
        "😀",
        "🐍",
        "ß",
        "€",
        "<|endoftext|>",
        "\u00a0",
        "\u200b",
        "0",
        "42",
        "import",
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 40)):
            r = rng.random()
            if r < 0.25:
                parts.append(" " * rng.randrange(1, 41))
            elif r < 0.35:
                parts.append("".join(rng.choice(" \t") for _ in range(rng.randrange(1, 12))))
            else:
                parts.append(rng.choice(pieces))
        out.append("".join(parts))
    return out


def test_encode_matches_transformers(tokenizers_pair, fresh_seed):
    _, ours, hf = tokenizers_pair
    texts = FIXED_TEXTS + _whitespace_texts() + _random_code(random.Random(fresh_seed), 300)
    for text in texts:
        assert ours.encode(text) == _hf_encode(hf, text), repr(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text, repr(text)


def test_whitespace_runs_use_the_added_tokens(tokenizers_pair):
    """A run of 2 to 31 spaces (2 to 9 tabs) not followed by a word is one added token, as in transformers."""
    _, ours, hf = tokenizers_pair
    for tok in WHITESPACE_TOKENS:
        ids = _hf_encode(hf, "x" + tok)
        assert ours.encode("x" + tok) == ids
        assert ids[-1] == hf.convert_tokens_to_ids(tok)
        assert ids[-1] > EOS_ID


def test_stdlib_files_match_transformers(tokenizers_pair, fresh_seed):
    _, ours, hf = tokenizers_pair
    rng = random.Random(fresh_seed)
    files = stdlib_sources()
    picked = rng.sample(files[12:], 15) + rng.sample(files[:12], 2)
    print("files:", [p.name for p in picked])
    for path in picked:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = ours.encode(text)
        assert ids == _hf_encode(hf, text), path.name
        assert ours.decode(ids, skip_special_tokens=False) == text, path.name
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), path.name


# ----------------------------------------------------------------------------- decoding


def _random_id_sequences(hf, rng: random.Random, count: int) -> list[list[int]]:
    """Id sequences mixing any id, EOS, whitespace tokens, and byte tokens of whole and split characters."""
    byte_ids = _byte_ids(hf)
    partial = _partial_utf8_ids(hf)
    assert partial, "the fixture's vocabulary has byte tokens that split characters"
    ws_ids = [hf.convert_tokens_to_ids(t) for t in WHITESPACE_TOKENS]
    chars = "éüß€世界😀🐍한ñ\u00a0"
    seqs = []
    for _ in range(count):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 16)):
            r = rng.random()
            if r < 0.25:
                ids.append(rng.randrange(TOKENIZER_SIZE))
            elif r < 0.35:
                ids.append(EOS_ID)
            elif r < 0.5:
                ids.append(rng.choice(ws_ids))
            elif r < 0.7:
                ids.append(rng.choice(partial))
            else:  # a character's bytes, whole or truncated, one token each
                b = rng.choice(chars).encode()
                if rng.random() < 0.3:
                    b = b[: rng.randrange(1, len(b) + 1)]
                ids += [byte_ids[x] for x in b]
        seqs.append(ids)
    return seqs


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tokenizers_pair, fresh_seed, skip):
    _, ours, hf = tokenizers_pair
    for ids in _random_id_sequences(hf, random.Random(fresh_seed), 1500):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_decode_skips_only_end_of_text(tokenizers_pair):
    _, ours, hf = tokenizers_pair
    ids = _hf_encode(hf, "a<|endoftext|>    b\t\t")
    assert EOS_ID in ids
    assert ours.decode(ids, skip_special_tokens=False) == "a<|endoftext|>    b\t\t"
    assert ours.decode(ids, skip_special_tokens=True) == "a    b\t\t" == hf.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- incremental


def _feed(ours, ids, skip) -> tuple[list[str], str]:
    det = NativeDetokenizer(ours, skip_special_tokens=skip)
    chunks = [det.add(i) for i in ids]
    tail = det.flush()
    return chunks, "".join(chunks) + tail


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_matches_full_decode(tokenizers_pair, fresh_seed, skip):
    _, ours, hf = tokenizers_pair
    for ids in _random_id_sequences(hf, random.Random(fresh_seed), 1500):
        _, text = _feed(ours, ids, skip)
        assert text == hf.decode(ids, skip_special_tokens=skip), ids


def test_incremental_holds_back_split_characters(tokenizers_pair, fresh_seed):
    """Every prefix of the output is a prefix of the final text: no premature U+FFFD."""
    _, ours, hf = tokenizers_pair
    byte_ids = _byte_ids(hf)
    texts = [
        "s = '😀'  # 世界\n",
        "naïve café — ünïcödé 🐍🐍\tß€",
        "👨‍👩‍👧 한국어 <|endoftext|> ñ",
    ] + [t for t in _random_code(random.Random(fresh_seed), 60) if any(ord(c) > 127 for c in t)]
    for text in texts:
        # The tokenizer's own ids, and every byte as its own token (splitting each character).
        as_bytes = []
        for piece in text.split(EOS):
            as_bytes += [byte_ids[b] for b in piece.encode()] + [EOS_ID]
        as_bytes.pop()
        for ids in (_hf_encode(hf, text), as_bytes):
            expected = hf.decode(ids, skip_special_tokens=False)
            assert expected == text
            chunks, out = _feed(ours, ids, skip=False)
            assert out == text
            so_far = ""
            for c in chunks:
                assert "\ufffd" not in c, (text, chunks)
                so_far += c
                assert text.startswith(so_far), (text, chunks)
            assert hf.decode(ids, skip_special_tokens=True) == _feed(ours, ids, skip=True)[1]


def test_incremental_emoji_split_into_bytes(tokenizers_pair):
    _, ours, hf = tokenizers_pair
    byte_ids = _byte_ids(hf)
    ids = [byte_ids[b] for b in "😀".encode()]  # 4 bytes, 4 tokens
    chunks, out = _feed(ours, ids, skip=True)
    assert chunks == ["", "", "", "😀"]
    assert out == hf.decode(ids) == "😀"
    # A character cut off for good: the replacement character comes out, as in transformers.
    chunks, out = _feed(ours, ids[:2], skip=True)
    assert chunks == ["", ""]
    assert out == hf.decode(ids[:2]) == "\ufffd"


# ----------------------------------------------------------------------------- metadata and errors


def test_vocab_limit_and_special_ids(tokenizers_pair):
    _, ours, hf = tokenizers_pair
    assert ours.vocab_limit == len(hf) == TOKENIZER_SIZE
    assert ours.special_ids == {EOS_ID} == set(hf.all_special_ids)
    assert ours.id_to_token(EOS_ID) == EOS == hf.convert_ids_to_tokens(EOS_ID)


def test_missing_tokenizer_files(tmp_path, legacy_tokenizer_dir):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)
    # vocab.json without merges.txt is no tokenizer either.
    shutil.copy(legacy_tokenizer_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path)


def _legacy_copy(src: Path, dst: Path, added: dict[str, int]) -> Path:
    shutil.copytree(src, dst)
    (dst / "added_tokens.json").write_text(json.dumps(added))
    return dst


def test_added_tokens_disagreeing_with_vocab(tmp_path, legacy_tokenizer_dir):
    good = json.loads((legacy_tokenizer_dir / "added_tokens.json").read_text())
    assert sorted(good.values()) == list(range(EOS_ID + 1, TOKENIZER_SIZE))
    # Ids shifted by one: a gap after <|endoftext|>.
    shifted = {t: i + 1 for t, i in good.items()}
    # One token claiming an id the BPE vocabulary already uses.
    clash = dict(good, **{WHITESPACE_TOKENS[0]: 5})
    # Two tokens claiming the same id.
    dup = dict(good, **{WHITESPACE_TOKENS[1]: good[WHITESPACE_TOKENS[0]]})
    for name, added in [("shifted", shifted), ("clash", clash), ("dup", dup)]:
        d = _legacy_copy(legacy_tokenizer_dir, tmp_path / name, added)
        with pytest.raises(ValueError):
            Tokenizer.from_dir(d)
    # The unchanged set loads.
    assert Tokenizer.from_dir(_legacy_copy(legacy_tokenizer_dir, tmp_path / "ok", good)).vocab_limit == TOKENIZER_SIZE
