"""What Python keeps about a request: its parameters, its completions' text and logprobs, and who reads it.

The native scheduler keeps the sequences (tokens, blocks, the bytes of the
text as it decodes them); Python keeps what the user sees.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from .sampling_params import SamplingParams
from .stopping import PatternStops


def sample_seed(seed: int, index: int, place: int) -> int:
    """The noise seed of a completion's token: per (request seed, completion index, place in the completion).

    Mixed (splitmix64's finaliser) so that neighbouring seeds, indices and places do not collide.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + place * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


class Reader:
    """Who reads a group of requests' outputs (a `generate` call, or `step()` for `add_request`).

    Every step's news goes to the reader that owns the request, whichever
    caller ran the step.
    """

    def __init__(self) -> None:
        self.unread: set[int] = set()  # scheduler ids of its requests with outputs not yet read


@dataclass
class Completion:
    """One of a request's n completions, as the user will see it."""

    index: int
    seq: int = -1  # the native sequence, once it got a token
    text: str = ""  # the text received from the scheduler (report_tokens requests: as it grows)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    # token id -> how many times this completion generated it; kept only for requests with penalties
    counts: Counter = field(default_factory=Counter)
    finish_reason: Optional[str] = None
    stop_reason: Union[str, int, None] = None


@dataclass
class RequestState:
    request_id: str  # the user's id
    core_id: int  # the native scheduler's id
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    owner: Reader
    patterns: Optional[PatternStops] = None
    finished: bool = False
    error: Optional[str] = None  # why the request failed, if it did
    completions: dict[int, Completion] = field(default_factory=dict)  # by completion index
    # params.prompt_logprobs set: per prompt token, its logprobs given the ones before (None: the first token)
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    _bias: Optional[tuple[np.ndarray, np.ndarray]] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    def score_prompt(self, position: int, logprobs: dict[int, float]) -> None:
        """Records the logprobs computed at prompt position `position`: those of token position + 1."""
        self.prompt_logprobs[position + 1] = logprobs

    def completion(self, index: int) -> Completion:
        c = self.completions.get(index)
        if c is None:
            c = self.completions[index] = Completion(index)
        return c

    def logit_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """params.logit_bias as arrays, built once: token ids (int64) and biases (float64)."""
        if self._bias is None:
            pairs = self.params.logit_bias
            self._bias = (
                np.array([t for t, _ in pairs], dtype=np.int64),
                np.array([b for _, b in pairs], dtype=np.float64),
            )
        return self._bias
