"""SamplingParams: how to draw the completions of one prompt."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

# The stop rules of CodeGen's own sampler (its `truncate_before_pattern`): a
# comment, a docstring or three newlines at the start of a line end a completion.
CODEGEN_STOP_PATTERNS: tuple[str, ...] = (r"^#", re.escape("<|endoftext|>"), r"^'''", r'^"""', r"\n\n\n")

MAX_LOGPROBS = 20


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to draw completions of a prompt.

    Attributes:
        n: completions per prompt.
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_p: keep the smallest set of most likely tokens whose probability
            reaches top_p (1.0 keeps all).
        top_k: keep the k most likely tokens (0 or -1 keeps all).
        max_tokens: most tokens to generate per completion; a completion that
            reaches the model's context end stops there with finish_reason
            "length" even if max_tokens is larger.
        stop: strings that end a completion, found in the decoded text even
            when they span tokens; the stop string is not part of the text.
        stop_token_ids: token ids that end a completion (kept in token_ids,
            not in text).
        stop_patterns: regular expressions (compiled with re.MULTILINE, so
            `^` is a line start) searched in the completion's text; the text is
            cut before the first match, as CodeGen's `truncate_before_pattern`
            does. `CODEGEN_STOP_PATTERNS` holds CodeGen's own.
        seed: a seed for this request's draws: the same seed, prompt and
            parameters give the same completions.
        logprobs: when set, each generated token comes with the log-probability
            of it and of the `logprobs` most likely tokens, under the model's
            distribution before temperature, top-k and top-p.
        ignore_eos: keep generating after the end-of-text token.
        skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: Union[str, Sequence[str], None] = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop_patterns: Union[str, Sequence[str], None] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}")
        if self.top_k == -1:
            set_("top_k", 0)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        set_("stop", _string_tuple("stop", self.stop))
        if any(s == "" for s in self.stop):
            raise ValueError("stop: the empty string cannot be a stop string")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)!r}")
        set_("stop_token_ids", tuple(self.stop_token_ids))
        set_("stop_patterns", _string_tuple("stop_patterns", self.stop_patterns))
        for p in self.stop_patterns:
            try:
                compiled = re.compile(p, re.MULTILINE)
            except re.error as e:
                raise ValueError(f"stop_patterns: {p!r} is not a valid regular expression: {e}") from None
            if compiled.search("") is not None:
                raise ValueError(f"stop_patterns: {p!r} matches the empty string, so it would stop at once")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _string_tuple(name: str, value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    return tuple(value)
