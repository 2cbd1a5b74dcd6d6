"""CodeGen's real tokenizer, shipped in fastcodegen/data/codegen-tokenizer, against transformers.

The reference is transformers' CodeGen tokenizer built here from GPT-2's
vocabulary and merges taken out of the shipped tokenizer.json, plus
CodeGen's added tokens spelled out in this file: it checks everything the
shipped file configures (pre-tokenization, added-token matching, byte-level
mapping). The vocabulary itself is checked by an encoding of CodeGen's real
tokenizer worked out by hand (the design notes' example) and by the ids
GPT-2's vocabulary is known to give. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_tokenizer import FIXED_TEXTS, _random_code, _whitespace_texts

from conftest import EOS, WHITESPACE_TOKENS, NativeDetokenizer, stdlib_sources
from fastcodegen import registry
from fastcodegen.tokenizer import Tokenizer

SHIPPED = registry.codegen_tokenizer_dir()
EOS_ID = 50256
VOCAB_SIZE = 50295  # GPT-2's 50257, then 30 runs of spaces and 8 of tabs

EDGE_TEXTS = [
    "def f(x):\n    return x",
    "it's we're they've I'm you'll he'd IT'S ''s '' 'x",
    "s = 'héllo wörld, ça va? naïve café Ångström'\n",
    "# русский العربية עברית ไทย हिन्दी\n",
    "print('👨‍👩‍👧 🇫🇷 👍🏽')\n",
    "e\u0301 a\u0308 \u00a0nbsp\u00a0 \u200bzw\u200b \u2028ls\u2029ps \u3000ideo\u3000 \ufeffbom",
    "ctrl \x00\x01\x1b\x1c\x1d\x1e\x1f\x7f\x85 end",
    "1234567890 3.14159 1e-10 0x1F 1_000_000 ²³ ½ ٣ 四",
    "<|endoftext|<|endoftext|>|>",
    " " * 64 + "x" + "\t" * 20 + "y",
]


@pytest.fixture(scope="module")
def shipped() -> Tokenizer:
    return Tokenizer.from_dir(SHIPPED)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CodeGen tokenizer from the shipped vocabulary and merges, with the added tokens given here."""
    from transformers import CodeGenTokenizer

    model = json.loads((SHIPPED / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    d: Path = tmp_path_factory.mktemp("codegen-legacy")
    (d / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "added_tokens.json").write_text(json.dumps({t: EOS_ID + 1 + i for i, t in enumerate(WHITESPACE_TOKENS)}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CodeGenTokenizer"}))
    hf = CodeGenTokenizer.from_pretrained(str(d))
    assert len(hf) == VOCAB_SIZE
    return hf


def test_every_official_name_has_the_shipped_tokenizer():
    assert (SHIPPED / "tokenizer.json").is_file()
    for name in registry.MODELS:
        assert registry.bundled_tokenizer(name) == SHIPPED
        assert registry.bundled_tokenizer(f"Salesforce/{name}") == SHIPPED
    for other in ("codegen-tiny-py", "codegen-1B-mono", "gpt2", "./codegen-350M-mono", "Salesforce/codegen2-1B"):
        assert registry.bundled_tokenizer(other) is None


def test_layout(shipped):
    assert shipped.vocab_limit == VOCAB_SIZE
    assert shipped.id_to_token(EOS_ID) == EOS
    assert shipped.special_ids == {EOS_ID}
    assert shipped.encode(EOS) == [EOS_ID]
    added = {t["id"]: t for t in json.loads((SHIPPED / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]}
    assert sorted(added) == list(range(EOS_ID, VOCAB_SIZE))
    assert (added[EOS_ID]["content"], added[EOS_ID]["special"]) == (EOS, True)
    spaces = [" " * n for n in range(31, 1, -1)]
    tabs = ["\t" * n for n in range(9, 1, -1)]
    for i, run in enumerate(spaces + tabs):
        tok = added[EOS_ID + 1 + i]
        assert tok["content"] == run
        assert tok["normalized"] and not tok["special"]
        assert shipped.id_to_token(EOS_ID + 1 + i) == run
        assert shipped.encode("x" + run) == [87, EOS_ID + 1 + i]  # 87 is GPT-2's "x"


def test_known_encodings(shipped):
    # the design notes' example: "def", " f", "(", "x", "):", "\n", four spaces as one added token, "return", " x"
    assert shipped.encode("def f(x):\n    return x") == [4299, 277, 7, 87, 2599, 198, 50284, 7783, 2124]
    # GPT-2's documented ids: "Hello world" and " Hello world" (transformers' CodeGenTokenizer docstring)
    assert shipped.encode("Hello world") == [15496, 995]
    assert shipped.encode(" Hello world") == [18435, 995]
    # every byte on its own is one of the 256 base tokens, never unknown
    for b in range(128):
        ids = shipped.encode(chr(b))
        assert len(ids) == 1 and ids[0] < 256 and shipped.token_bytes(ids[0]) == bytes([b])


def _classes():
    import transformers

    return {transformers.CodeGenTokenizer, getattr(transformers, "CodeGenTokenizerFast", transformers.CodeGenTokenizer)}


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    files = [p for p in stdlib_sources() if p.stat().st_size < 60_000]
    picked = rng.sample(files, 12)
    print("files:", [p.name for p in picked])
    sources = [p.read_text(encoding="utf-8", errors="replace") for p in picked]
    return sources + FIXED_TEXTS + EDGE_TEXTS + _whitespace_texts() + _random_code(rng, 200)


def test_encode_matches_transformers(shipped, reference, fresh_seed):
    texts = _corpus(fresh_seed)
    theirs = reference(texts, verbose=False)["input_ids"]
    for text, ids in zip(texts, theirs):
        assert shipped.encode(text) == ids, repr(text[:200])
    fast = [c for c in _classes() if c is not type(reference)]
    for cls in fast:  # transformers 4 has a separate Rust-backed class; 5 has one
        other = cls.from_pretrained(reference.name_or_path)
        assert other(texts, verbose=False)["input_ids"] == theirs


def test_decode_round_trips(shipped, fresh_seed):
    for text in _corpus(fresh_seed):
        ids = shipped.encode(text)
        assert shipped.decode(ids, skip_special_tokens=False) == text, repr(text[:200])
        assert shipped.decode(ids, skip_special_tokens=True) == text.replace(EOS, ""), repr(text[:200])
        det = NativeDetokenizer(shipped, skip_special_tokens=False)
        assert "".join(det.add(i) for i in ids) + det.flush() == text, repr(text[:200])
