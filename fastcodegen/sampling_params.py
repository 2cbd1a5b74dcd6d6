"""SamplingParams: how to draw the completions of one prompt."""

from __future__ import annotations

import math
import numbers
import operator
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

# The stop rules of CodeGen's own sampler (its `truncate_before_pattern`): a
# comment, a docstring or three newlines at the start of a line end a completion.
CODEGEN_STOP_PATTERNS: tuple[str, ...] = (r"^#", re.escape("<|endoftext|>"), r"^'''", r'^"""', r"\n\n\n")

MAX_LOGPROBS = 20

# The native scheduler keeps counts and token ids in 32-bit integers.
INT32_LIMIT = 2**31
# Below this, logits / temperature overflows float32 for ordinary logits, and the
# softmax turns into NaN: 0 is how to ask for the most likely token.
MIN_TEMPERATURE = 1e-3
# OpenAI's limits for the same parameters.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300


def as_int(x: object) -> Optional[int]:
    """x as a Python int if it is an integer (numpy and torch integers included, booleans not); else None."""
    if isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_float(x: object) -> Optional[float]:
    """x as a Python float if it is a real number (numpy scalars included, booleans not); else None."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def check_utf8(name: str, text: str) -> None:
    """Raises ValueError if `text` cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name}: {text[max(0, e.start - 10) : e.end + 10]!r} holds a lone surrogate ({text[e.start]!r} at "
            f"{e.start}), which is not valid Unicode text"
        ) from None


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
            own distribution: before penalties, logit_bias, temperature, top-k
            and top-p.
        prompt_logprobs: when set, every prompt token after the first comes
            with its log-probability given the tokens before it, and those of
            the `prompt_logprobs` most likely tokens at its position (the
            model's own distribution, like `logprobs`): the
            `RequestOutput.prompt_logprobs` list. Such a request computes its
            whole prompt (the prefix cache does not serve it), in chunks of at
            most as many positions as a step samples rows.
        ignore_eos: keep generating after the end-of-text token.
        skip_special_tokens: leave special tokens out of the text.
        presence_penalty: in [-2, 2]; subtracted from the logit of every token
            the completion has already generated (the prompt does not count).
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per
            time the completion has already generated it. With c[t] those
            counts, the logits become
            `logits[t] - presence_penalty * (c[t] > 0) - frequency_penalty * c[t]`,
            as in OpenAI's API.
        logit_bias: {token id: bias}, biases in [-100, 100], at most 300
            entries, added to the logits (+100 all but forces a token, -100
            bans it). Keys may be integers or strings of digits (JSON's object
            keys); kept as a tuple of (token id, bias) pairs sorted by id.
            Penalties and biases apply to the raw logits, before temperature,
            top-k, top-p and greedy's argmax.
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
    prompt_logprobs: Optional[int] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Union[Mapping[object, float], Sequence[tuple[int, float]], None] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731

        def integer(name: str, low: int, high: int = INT32_LIMIT, what: str = "") -> None:
            value = as_int(getattr(self, name))
            if value is None or not low <= value < high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}){what}, got {getattr(self, name)!r}")
            set_(name, value)

        integer("n", 1)
        temperature = as_float(self.temperature)
        if temperature is None or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {self.temperature!r}: "
                "smaller ones overflow the logits divided by it"
            )
        set_("temperature", temperature)
        top_p = as_float(self.top_p)
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        set_("top_p", top_p)
        integer("top_k", -1, what=": k >= 1, or 0 or -1 to disable it")
        if self.top_k == -1:
            set_("top_k", 0)
        integer("max_tokens", 1)
        set_("stop", _string_tuple("stop", self.stop))
        if any(s == "" for s in self.stop):
            raise ValueError("stop: the empty string cannot be a stop string")
        for s in self.stop:
            check_utf8("stop", s)
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Iterable):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        ids = [as_int(t) for t in self.stop_token_ids]
        if not all(t is not None and 0 <= t < INT32_LIMIT for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)!r}")
        set_("stop_token_ids", tuple(ids))
        set_("stop_patterns", _string_tuple("stop_patterns", self.stop_patterns))
        for p in self.stop_patterns:
            check_utf8("stop_patterns", p)
            try:
                compiled = re.compile(p, re.MULTILINE)
            except re.error as e:
                raise ValueError(f"stop_patterns: {p!r} is not a valid regular expression: {e}") from None
            if compiled.search("") is not None:
                raise ValueError(f"stop_patterns: {p!r} matches the empty string, so it would stop at once")
        if self.seed is not None:
            seed = as_int(self.seed)
            if seed is None or seed < 0:
                raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
            set_("seed", seed)
        if self.logprobs is not None:
            integer("logprobs", 0, MAX_LOGPROBS + 1)
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", 0, MAX_LOGPROBS + 1)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = as_float(getattr(self, name))
            if value is None or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(
                    f"{name} must be a number in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)!r}"
                )
            set_(name, value)
        set_("logit_bias", _logit_bias(self.logit_bias))

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits its tokens are drawn from."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or len(self.logit_bias) > 0


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs sorted by id, from a dict or from such pairs (its stored form)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {value!r}")
    if len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias holds {len(pairs)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
    out: dict[int, float] = {}
    for key, bias in pairs:
        token = int(key) if isinstance(key, str) and re.fullmatch("[0-9]{1,18}", key) else as_int(key)
        if token is None or not 0 <= token < INT32_LIMIT:
            raise ValueError(
                f"logit_bias: {key!r} is not a token id (a non-negative integer, or a string of its digits)"
            )
        if token in out:
            raise ValueError(f"logit_bias: token id {token} appears twice")
        b = as_float(bias)
        if b is None or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias: the bias of token {token} must be a number in "
                f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"
            )
        out[token] = b
    return tuple(sorted(out.items()))


def _string_tuple(name: str, value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")
    return tuple(value)
