"""Checking requests before they reach the engine: prompts, token ids, sampling parameters.

Every check runs before anything is queued, so a bad request raises
ValueError and leaves the engine as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .sampling_params import SamplingParams, as_int, check_utf8
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Limits:
    """What a request must fit."""

    vocab_limit: int  # prompt ids below it (the tokenizer's ids)
    vocab_size: int  # stop token ids below it (the model's rows)
    max_model_len: int
    max_num_seqs: int


def validate(
    prompts, prompt_token_ids, sampling_params, tokenizer: Optional[Tokenizer], limits: Limits
) -> list[tuple[Optional[str], list[int], SamplingParams]]:
    """(text, token ids, params) per prompt, or ValueError naming what is wrong."""
    if (prompts is None) == (prompt_token_ids is None):
        raise ValueError("pass exactly one of prompts and prompt_token_ids")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a list of strings")
        if tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompt_token_ids instead of text prompts")
        for i, p in enumerate(prompts):
            check_utf8(f"prompt {i}", p)
        texts: list[Optional[str]] = list(prompts)
        id_lists = [tokenizer.encode(p) for p in prompts]
    else:
        id_lists = prompt_id_lists(prompt_token_ids)
        texts = [None] * len(id_lists)
    if not id_lists:
        raise ValueError("no prompts given")

    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        params = [sampling_params] * len(id_lists)
    else:
        params = list(sampling_params)
        if len(params) != len(id_lists) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(
                f"sampling_params must be one SamplingParams or a list of {len(id_lists)} (one per prompt)"
            )

    for i, (ids, p) in enumerate(zip(id_lists, params)):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = next((t for t in ids if not 0 <= t < limits.vocab_limit), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {limits.vocab_limit})")
        if len(ids) >= limits.max_model_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; the context holds {limits.max_model_len} (max_model_len), "
                "which leaves no room to generate. Shorten the prompt."
            )
        bad = next((t for t in p.stop_token_ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: {bad} is outside the vocabulary [0, {limits.vocab_size})")
        bad = next((t for t, _ in p.logit_bias if t >= limits.vocab_limit), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {limits.vocab_limit})")
        if tokenizer is None and (p.stop or p.stop_patterns):
            raise ValueError("stop strings and stop_patterns need a tokenizer, and this engine has none")
        if p.n > limits.max_num_seqs:
            raise ValueError(f"n={p.n} is more than max_num_seqs={limits.max_num_seqs} sequences can run at once")
    return list(zip(texts, id_lists, params))


def prompt_id_lists(prompt_token_ids: object) -> list[list[int]]:
    """prompt_token_ids as lists of ints: one prompt (a list of ids) or a list of them.

    Lists, tuples, numpy arrays and torch tensors (one or two dimensions) are
    accepted, with numpy and torch integers; a bare integer, a string, a set,
    a dict or an iterator is not (an order or a length would be guessed).
    """
    if hasattr(prompt_token_ids, "tolist") and getattr(prompt_token_ids, "ndim", 1) in (1, 2):
        prompt_token_ids = prompt_token_ids.tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise ValueError(
            "prompt_token_ids must be a list of token ids or a list of such lists "
            f"(a list, tuple, numpy array or tensor), got {type(prompt_token_ids).__name__}"
        )
    if len(prompt_token_ids) > 0 and as_int(prompt_token_ids[0]) is not None:  # one prompt, not a list of them
        prompt_token_ids = [prompt_token_ids]
    return [_token_ids(ids, i) for i, ids in enumerate(prompt_token_ids)]


def _token_ids(ids: object, i: int) -> list[int]:
    """A prompt's ids as a list of ints (numpy and torch integers accepted)."""
    if hasattr(ids, "tolist") and getattr(ids, "ndim", 1) == 1:
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt {i}: prompt_token_ids must be lists of integers, got {type(ids).__name__}")
    out = [as_int(t) for t in ids]
    if any(t is None for t in out):
        bad = next(t for t, o in zip(ids, out) if o is None)
        raise ValueError(f"prompt {i}: token ids must be integers, not {bad!r}")
    return out
