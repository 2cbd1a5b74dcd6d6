"""What the engine keeps in Python about a request; the native scheduler keeps its sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .sampling_params import SamplingParams
from .stopping import PatternStops


def sample_seed(seed: int, index: int) -> int:
    """A generator seed per (request seed, completion index), mixed so neighbours don't collide."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


@dataclass
class RequestState:
    request_id: str  # the user's id
    core_id: int  # the native scheduler's id
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    patterns: Optional[PatternStops]
    watch: bool  # the scheduler reports its text as it grows
    served: bool = False  # added with add_request(): step() reports its news
    finished: bool = False
    aborted: bool = False
    error: Optional[str] = None  # why the request failed, if it did
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # completion index -> generator
    logprobs: dict[int, list[dict[int, float]]] = field(default_factory=dict)  # sequence -> per token
    texts: dict[int, str] = field(default_factory=dict)  # watched sequence -> its text so far
    text_bytes: dict[int, int] = field(default_factory=dict)  # watched sequence -> bytes of it seen
    pattern_stops: dict[int, str] = field(default_factory=dict)  # sequence -> the pattern that ended it

    def generator(self, index: int, device: torch.device) -> torch.Generator:
        """The seeded generator of completion `index` (seeded requests only)."""
        gen = self.generators.get(index)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(sample_seed(self.params.seed, index))
            self.generators[index] = gen
        return gen
