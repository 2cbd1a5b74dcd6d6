"""Builds CodeGen's tokenizer from GPT-2's vocabulary and ships it in the package.

    python tools/build_codegen_tokenizer.py                    # downloads the archive, writes fastcodegen/data/codegen-tokenizer
    python tools/build_codegen_tokenizer.py --archive openai-whisper-20230124.tar.gz

CodeGen's tokenizer is GPT-2's byte-level BPE (50257 entries, `<|endoftext|>`
= 50256, special) plus 38 added tokens, normalized and not special: runs of 31
down to 2 spaces (50257..50286), then of 9 down to 2 tabs (50287..50294).
GPT-2's `vocab.json` and `merges.txt` ship inside the MIT-licensed source
archive of openai-whisper 20230124 (`whisper/assets/gpt2/`), pinned here by
version and sha256. The tool downloads that archive from the Python package
index (or reads a local copy), extracts the two files, gives them CodeGen's
added tokens, and builds the tokenizer as `fastcodegen.tokenizer` builds any
legacy GPT-2 file set.

Before writing anything it checks the result against two references built
from the same files: transformers' CodeGen tokenizer, and a plain-Python
byte-level BPE written here after GPT-2's original encoder (added tokens
split out first, longest match first). Encodings must be equal on every
`.py` file of the Python standard library and on edge cases (unicode,
whitespace runs, `<|endoftext|>`), and decoding must give the text back. It
writes `tokenizer.json`, `tokenizer_config.json`, the archive's `LICENSE` and
a `NOTICE` naming the source, then loads the written directory and checks it
again. The whole run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import tokenizers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fastcodegen.registry import codegen_tokenizer_dir  # noqa: E402
from fastcodegen.tokenizer import Tokenizer, _byte_decoder, _from_vocab_and_merges  # noqa: E402

EOS = "<|endoftext|>"
EOS_ID = 50256
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
VOCAB_SIZE = EOS_ID + 1 + len(WHITESPACE_TOKENS)  # 50295
MODEL_MAX_LENGTH = 2048
# The example of the design notes: a newline, then four spaces as one added token.
EXAMPLE = ("def f(x):\n    return x", [4299, 277, 7, 87, 2599, 198, 50284, 7783, 2124])


@dataclass(frozen=True)
class Source:
    """The pinned archive GPT-2's vocabulary is taken from."""

    project: str = "openai-whisper"
    version: str = "20230124"
    filename: str = "openai-whisper-20230124.tar.gz"
    sha256: str = "31adf9353bf0e3f891b6618896f22c65cf78cd6f845a4d5b7125aa5102187f79"
    index: str = "https://pypi.org/simple/"
    vocab: str = "openai-whisper-20230124/whisper/assets/gpt2/vocab.json"
    merges: str = "openai-whisper-20230124/whisper/assets/gpt2/merges.txt"
    license: str = "openai-whisper-20230124/LICENSE"


class BuildError(Exception):
    """A step failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[build_codegen_tokenizer] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fetching


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(src: Source) -> bytes:
    """The archive's bytes from the package index (its simple JSON API), checked against the pinned sha256."""
    url = f"{src.index}{src.project}/"
    log(f"looking up {src.filename} at {url}")
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise BuildError(f"cannot list {url}: {e}") from e
    entry = next((f for f in files if f.get("filename") == src.filename), None)
    if entry is None:
        raise BuildError(f"{url} does not list {src.filename}")
    if entry.get("hashes", {}).get("sha256") not in (None, src.sha256):
        raise BuildError(f"the index gives {src.filename} sha256 {entry['hashes']['sha256']}, expected {src.sha256}")
    log(f"downloading {entry['url']}")
    try:
        with urllib.request.urlopen(entry["url"], timeout=120) as r:
            data = r.read()
    except OSError as e:
        raise BuildError(f"cannot download {entry['url']}: {e}") from e
    return data


def read_archive(src: Source, archive: Optional[Path]) -> dict[str, bytes]:
    """vocab.json, merges.txt and LICENSE from the pinned archive (downloaded, or the local copy `archive`)."""
    if archive is not None:
        if not archive.is_file():
            raise BuildError(f"--archive: {archive} is not a file")
        data = archive.read_bytes()
    else:
        data = download(src)
    digest = _sha256(data)
    if digest != src.sha256:
        raise BuildError(f"{archive or src.filename}: sha256 {digest}, expected {src.sha256} ({src.filename})")
    log(f"{src.filename}: {len(data)} bytes, sha256 {digest} (as pinned)")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for key, member in (("vocab.json", src.vocab), ("merges.txt", src.merges), ("LICENSE", src.license)):
            try:
                f = tar.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise BuildError(f"{src.filename} has no file {member}")
            out[key] = f.read()
    return out


# --------------------------------------------------------------------------- building


def write_legacy_files(files: dict[str, bytes], d: Path) -> None:
    """CodeGen's legacy file set, as its checkpoints ship it: GPT-2's files plus the added and special tokens."""
    (d / "vocab.json").write_bytes(files["vocab.json"])
    (d / "merges.txt").write_bytes(files["merges.txt"])
    added = {t: EOS_ID + 1 + i for i, t in enumerate(WHITESPACE_TOKENS)}
    (d / "added_tokens.json").write_text(json.dumps(added))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


def tokenizer_config() -> dict:
    """The tokenizer_config.json of CodeGen's checkpoints (what transformers reads beside tokenizer.json)."""
    return {
        "tokenizer_class": "CodeGenTokenizer",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "add_prefix_space": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
    }


def check_layout(tk: Tokenizer, added: dict[int, tuple[str, bool, bool]]) -> None:
    """Size, `<|endoftext|>` and the 38 whitespace ids; `added` maps id -> (content, special, normalized)."""
    if tk.vocab_limit != VOCAB_SIZE:
        raise BuildError(f"the tokenizer has {tk.vocab_limit} ids, CodeGen's has {VOCAB_SIZE}")
    if tk.id_to_token(EOS_ID) != EOS or tk.special_ids != {EOS_ID}:
        raise BuildError(f"{EOS} must be id {EOS_ID} and the only special token, got special ids {tk.special_ids}")
    want = {EOS_ID: (EOS, True, False), **{EOS_ID + 1 + i: (t, False, True) for i, t in enumerate(WHITESPACE_TOKENS)}}
    if added != want:
        wrong = sorted(i for i in set(want) | set(added) if want.get(i) != added.get(i))
        raise BuildError(f"added tokens differ from CodeGen's at ids {wrong[:10]}")
    text, ids = EXAMPLE
    if tk.encode(text) != ids:
        raise BuildError(f"{text!r} encodes to {tk.encode(text)}, CodeGen's tokenizer gives {ids}")


# --------------------------------------------------------------------------- references


class ReferenceBPE:
    """GPT-2's byte-level BPE in plain Python (OpenAI's encoder.py), with added tokens split out first.

    An added token matches wherever it occurs, the longest first at each position, as in
    transformers' tokenizers; the text between matches is split by GPT-2's pattern and
    each piece merged by rank.
    """

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab: dict[str, int], merges: list[str], added: dict[str, int]):
        import regex  # GPT-2's pattern needs Unicode classes (\p{L}); transformers depends on `regex`

        self.vocab = vocab
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        self.added = added
        self.split = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        self.pieces = regex.compile(self.PATTERN)
        self.byte_chars = {b: c for c, b in _byte_decoder().items()}  # GPT-2's byte -> printable character
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(p, len(self.ranks)), i) for i, p in enumerate(zip(parts, parts[1:])))
            if rank == len(self.ranks):
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):
                if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        ids = [self.vocab[p] for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in [*self.split.finditer(text), None]:
            for piece in self.pieces.findall(text[pos : m.start() if m else len(text)]):
                ids += self._bpe("".join(self.byte_chars[b] for b in piece.encode("utf-8")))
            if m is not None:
                ids.append(self.added[m.group()])
                pos = m.end()
        return ids


def transformers_references(legacy_dir: Path) -> list[tuple[str, Callable[[list[str]], list[list[int]]]]]:
    """transformers' CodeGen tokenizer classes (one class in transformers 5), loaded from the legacy files."""
    import transformers

    out = []
    classes = {
        transformers.CodeGenTokenizer,
        getattr(transformers, "CodeGenTokenizerFast", transformers.CodeGenTokenizer),
    }
    for cls in sorted(classes, key=lambda c: c.__name__):
        hf = cls.from_pretrained(str(legacy_dir))
        if len(hf) != VOCAB_SIZE:
            raise BuildError(
                f"transformers' {cls.__name__} has {len(hf)} ids from the same files, expected {VOCAB_SIZE}"
            )
        name = f"transformers {transformers.__version__} {cls.__name__}"
        out.append((name, lambda texts, hf=hf: hf(texts, verbose=False)["input_ids"]))
    return out


# --------------------------------------------------------------------------- corpus


def stdlib_texts() -> list[tuple[str, str]]:
    """(name, text) of every `.py` file of the standard library (installed packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if not files:
        raise BuildError(f"no .py files under {root}: the standard library's sources are the test corpus")
    return [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def edge_texts(seed: int = 0) -> list[tuple[str, str]]:
    """Unicode, whitespace runs and `<|endoftext|>` in many places; random mixes of them, reproducibly."""
    fixed = [
        EXAMPLE[0],
        "",
        " ",
        "x",
        EOS,
        EOS + EOS,
        f"a = 1{EOS}def g():\n    pass",
        f"  {EOS}  \n{EOS}\t{EOS}x",
        "<|endoftext",
        "|endoftext|>  <|endoftext|",
        "<|endoftext|<|endoftext|>|>",
        "class A:\n\tdef f(self):\n\t\treturn 1\n\t\t\n",
        "if x:\n\t    y = 1  \t\n  \t  z = 2\t \n",
        "x = 1   \n\n\n   \ny = 2\r\nz = 3\r\n\r\n",
        "it's we're they've I'm you'll he'd IT'S ''s '' 'x",
        "s = 'héllo wörld, ça va? naïve café Ångström'\n",
        "# 日本語のコメント 中文注释 한국어 русский العربية עברית ไทย हिन्दी\n",
        "print('😀 👍🏽 👨‍👩‍👧 🐍 🇫🇷')\n",
        "e\u0301 a\u0308 \u00a0nbsp\u00a0 \u200bzw\u200b \u2028ls\u2029ps \u3000ideo\u3000 \ufeffbom",
        "ctrl \x00\x01\x1b\x1c\x1d\x1e\x1f\x7f\x85 end",
        "1234567890 3.14159 1e-10 0x1F 1_000_000 ²³ ½ ٣ 四",
        "\t \t \t\t  \t\t\t   \t\t\t\t    ",
        "trailing spaces      ",
        "trailing tab\t",
        "\n\n\n\n",
        "\r\n\r\n\r",
    ]
    out = [(f"fixed[{i}]", t) for i, t in enumerate(fixed)]
    for n in range(1, 41):
        sp = " " * n
        for j, t in enumerate(
            ["x" + sp + "y", "def f():\n" + sp + "return 1\n", "a = 1" + sp + "\n", sp, sp + "\n" + sp]
        ):
            out.append((f"spaces[{n},{j}]", t))
    for n in range(1, 13):
        tb = "\t" * n
        for j, t in enumerate([tb, "if x:\n" + tb + "pass\n", tb + " " * (n + 1) + "x", " " * n + tb + "y"]):
            out.append((f"tabs[{n},{j}]", t))
    pieces = ["def", "return", "(", ")", ":", "\n", "\r\n", "x", "self", "'s", "é", "世界", "😀", EOS, "\u00a0", "42"]
    rng = random.Random(seed)
    for i in range(500):
        parts = []
        for _ in range(rng.randrange(1, 40)):
            r = rng.random()
            if r < 0.25:
                parts.append(" " * rng.randrange(1, 41))
            elif r < 0.35:
                parts.append("".join(rng.choice(" \t") for _ in range(rng.randrange(1, 12))))
            else:
                parts.append(rng.choice(pieces))
        out.append((f"random[{i}]", "".join(parts)))
    return out


# --------------------------------------------------------------------------- verifying


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(name: str, corpus: list[tuple[str, str]], ours: list[list[int]], theirs: list[list[int]]) -> None:
    bad = [(label, a, b) for (label, _), a, b in zip(corpus, ours, theirs) if a != b]
    if bad:
        label, a, b = bad[0]
        i = _first_difference(a, b)
        raise BuildError(
            f"{len(bad)} of {len(corpus)} texts encode differently from {name}; first: {label} at token {i}: "
            f"ours {a[i : i + 6]}, {name} {b[i : i + 6]}"
        )
    log(f"  equal to {name} on all {len(corpus)} texts")


def check_decode(tk: Tokenizer, corpus: list[tuple[str, str]], encoded: list[list[int]]) -> None:
    """decode(encode(x)) == x, with and without `<|endoftext|>`, and through the per-token bytes streaming uses."""
    for (label, text), ids in zip(corpus, encoded):
        if tk.decode(ids, skip_special_tokens=False) != text:
            raise BuildError(f"{label}: decode(encode(text)) differs from the text")
        if tk.decode(ids, skip_special_tokens=True) != text.replace(EOS, ""):
            raise BuildError(f"{label}: decode(encode(text), skip_special_tokens=True) keeps more than the text")
        if b"".join(tk.token_bytes(i) for i in ids).decode("utf-8", errors="replace") != text:
            raise BuildError(f"{label}: the tokens' bytes do not spell the text")
    log(f"  decode(encode(x)) == x on all {len(corpus)} texts")


def verify(tk: Tokenizer, legacy_dir: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Encodes the corpus with our tokenizer and each reference; all must agree, and decoding must round-trip."""
    corpus = stdlib_texts() + edge_texts()
    texts = [t for _, t in corpus]
    log(f"corpus: {len(corpus)} texts, {sum(map(len, texts)) / 1e6:.1f}M characters (stdlib sources and edge cases)")
    t0 = time.time()
    ours = [tk.encode(t) for t in texts]
    log(f"  encoded: {sum(map(len, ours))} tokens in {time.time() - t0:.0f} s")
    check_decode(tk, corpus, ours)
    for name, encode in transformers_references(legacy_dir):
        t0 = time.time()
        compare(name, corpus, ours, encode(texts))
        log(f"  ({time.time() - t0:.0f} s)")
    added = {EOS: EOS_ID, **{t: EOS_ID + 1 + i for i, t in enumerate(WHITESPACE_TOKENS)}}
    ref = ReferenceBPE(vocab, merges, added)
    t0 = time.time()
    compare("the plain-Python GPT-2 BPE", corpus, ours, [ref.encode(t) for t in texts])
    log(f"  ({time.time() - t0:.0f} s)")


def check_written(out: Path, vocab: dict[str, int], merges: list[str], reference: Tokenizer) -> None:
    """The written directory holds GPT-2's files unchanged and encodes as the verified tokenizer does."""
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model["vocab"] != vocab:
        raise BuildError(f"{out / 'tokenizer.json'}: its vocabulary differs from vocab.json")
    written = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if written != merges:
        raise BuildError(f"{out / 'tokenizer.json'}: its merges differ from merges.txt")
    tk = Tokenizer.from_dir(out)
    check_layout(tk, {t["id"]: (t["content"], t["special"], t["normalized"]) for t in data["added_tokens"]})
    corpus = edge_texts(seed=1) + stdlib_texts()[::10]
    for label, text in corpus:
        if tk.encode(text) != reference.encode(text):
            raise BuildError(f"{out}: the written tokenizer encodes {label} differently")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    if hf(EXAMPLE[0])["input_ids"] != EXAMPLE[1]:
        raise BuildError(f"{out}: transformers' AutoTokenizer does not load it as CodeGen's tokenizer")
    log(f"{out}: reloaded; same encodings on {len(corpus)} texts; transformers' AutoTokenizer loads it")


# --------------------------------------------------------------------------- writing


NOTICE = """\
CodeGen's tokenizer: GPT-2's byte-level BPE (vocabulary and merges by OpenAI)
plus CodeGen's 38 whitespace tokens (runs of 31 down to 2 spaces, ids
50257-50286; runs of 9 down to 2 tabs, ids 50287-50294).

GPT-2's vocab.json and merges.txt are taken unchanged from the source archive
of openai-whisper {version} on the Python Package Index:
    {filename}
    sha256 {sha256}
    {vocab}
    {merges}
It is distributed under the MIT License, {copyright}; its LICENSE
file is copied unchanged to LICENSE beside this one.

tokenizer.json was written from them by fastcodegen's
tools/build_codegen_tokenizer.py.
"""


def write(out: Path, tk: tokenizers.Tokenizer, files: dict[str, bytes], src: Source) -> None:
    """tokenizer.json, tokenizer_config.json, LICENSE and NOTICE into `out`."""
    license_text = files["LICENSE"].decode("utf-8")
    copyright_line = next((ln.strip() for ln in license_text.splitlines() if ln.strip().startswith("Copyright")), None)
    if copyright_line is None or "MIT License" not in license_text:
        raise BuildError(f"{src.license}: expected the MIT License with a copyright line")
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "LICENSE").write_text(license_text)
    notice = NOTICE.format(
        version=src.version,
        filename=src.filename,
        sha256=src.sha256,
        vocab=src.vocab,
        merges=src.merges,
        copyright=copyright_line,
    )
    (out / "NOTICE").write_text(notice)
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} bytes" for p in sorted(out.iterdir()))
    log(f"wrote {out}: {sizes}")


def build(out: Path, archive: Optional[Path]) -> None:
    src = Source()
    files = read_archive(src, archive)
    try:
        vocab = json.loads(files["vocab.json"])
        merges_text = files["merges.txt"].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise BuildError(f"{src.filename}: unreadable vocab.json or merges.txt: {e}") from e
    # merges.txt: a '#version' header line, then one 'left right' pair per line
    merges = [ln for ln in merges_text.split("\n")[1:] if ln]
    log(f"GPT-2's files: {len(vocab)} vocabulary entries, {len(merges)} merges")
    if len(vocab) != EOS_ID + 1 or vocab.get(EOS) != EOS_ID:
        raise BuildError(f"vocab.json: expected {EOS_ID + 1} entries ending with {EOS}, got {len(vocab)}")
    with tempfile.TemporaryDirectory(prefix="codegen-tokenizer-") as tmp:
        legacy = Path(tmp)
        write_legacy_files(files, legacy)
        raw = _from_vocab_and_merges(legacy)
        tk = Tokenizer(raw)
        added = {i: (t.content, t.special, t.normalized) for i, t in raw.get_added_tokens_decoder().items()}
        check_layout(tk, added)
        log(f"built: {tk.vocab_limit} ids; {EOS} = {EOS_ID} (special); 38 whitespace tokens at {EOS_ID + 1}..")
        verify(tk, legacy, vocab, merges)
    write(out, raw, files, src)
    check_written(out, vocab, merges, tk)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=codegen_tokenizer_dir(), help="where to write (default: %(default)s)"
    )
    parser.add_argument(
        "--archive", type=Path, default=None, help=f"a local copy of {Source.filename} instead of downloading it"
    )
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        build(args.out, args.archive)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
