"""CodeGen's tokenizer through the `tokenizers` library, and incremental decoding.

CodeGen uses GPT-2's byte-level BPE (50257 entries, `<|endoftext|>` last)
plus 38 added tokens: runs of 31 down to 2 spaces and of 9 down to 2 tabs,
matched before BPE runs. A checkpoint ships either `tokenizer.json` or the
older `vocab.json` + `merges.txt` + `added_tokens.json` (+
`special_tokens_map.json`); both load here and encode and decode as
transformers' CodeGen tokenizer does.

The weights have more rows (51200) than the tokenizer has ids (50295):
`Tokenizer.vocab_limit` is the first id that must never be sampled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

# The files a checkpoint's tokenizer may consist of.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
)


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 byte values, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """Encodes text to CodeGen token ids and decodes them back."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tk = tokenizer
        self.vocab_limit = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._token_bytes = self._build_token_bytes()

    def _build_token_bytes(self) -> list[bytes]:
        # Every token, added ones included, goes through the ByteLevel decoder.
        table = _byte_decoder()
        out = []
        for i in range(self.vocab_limit):
            token = self._tk.id_to_token(i)
            if token is None:
                raise ValueError(f"tokenizer: ids are not contiguous (no token has id {i})")
            if all(c in table for c in token):
                out.append(bytes(table[c] for c in token))
            else:  # what the ByteLevel decoder does with a token outside its alphabet
                out.append(token.encode())
        return out

    @classmethod
    def from_dir(cls, path: "str | Path") -> "Tokenizer":
        """Loads `tokenizer.json`, else `vocab.json` + `merges.txt` (+ added and special tokens)."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls(_from_vocab_and_merges(path))
        raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tk.id_to_token(token_id)


def _special_contents(path: Path) -> list[str]:
    out = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if not f.is_file():
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = json.loads(f.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value not in out:
                out.append(value)
    return out


def _from_vocab_and_merges(path: Path) -> tokenizers.Tokenizer:
    """Builds the tokenizer transformers builds from the legacy GPT-2 file set."""
    vocab, merges = models.BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
    config = (
        json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    )
    tk = tokenizers.Tokenizer(
        models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = _special_contents(path)
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    added_file = path / "added_tokens.json"
    if added_file.is_file():
        added = sorted(json.loads(added_file.read_text()).items(), key=lambda kv: kv[1])
        for content, want in added:
            if content in specials:
                continue
            tk.add_tokens([AddedToken(content, special=False, normalized=True)])
            got = tk.token_to_id(content)
            if got != want:
                raise ValueError(f"{added_file}: token {content!r} should have id {want}, the vocabulary gives {got}")
    return tk
