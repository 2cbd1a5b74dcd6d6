"""When a completion ends: end-of-text, stop tokens, stop strings, stop patterns, length.

Checked after every generated token, incrementally: a stop string is searched
only where it could newly appear (the new text and the few characters before
it), so the cost per token does not grow with the completion's length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from .sampling_params import SamplingParams


@dataclass
class Stop:
    reason: str  # "stop" or "length"
    detail: Union[str, int, None] = None  # the stop string, pattern or token id
    cut: Optional[int] = None  # where to cut the text, for a stop string or pattern


class StopRules:
    """The stop rules of one request, shared by its completions."""

    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int], max_model_len: int):
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.stop_strings = params.stop
        self.max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self.patterns = [(p, re.compile(p, re.MULTILINE)) for p in params.stop_patterns]
        self.max_model_len = max_model_len

    def on_token(self, token_id: int) -> Optional[Stop]:
        """Rules on the token itself, checked before its text is added."""
        if token_id in self.eos_token_ids:
            return Stop("stop")
        if token_id in self.stop_token_ids:
            return Stop("stop", token_id)
        return None

    def on_text(self, text: str, old_len: int) -> Optional[Stop]:
        """Rules on the completion's text, of which text[old_len:] is new."""
        if len(text) == old_len:
            return None
        best: Optional[Stop] = None
        start = max(0, old_len - self.max_stop_len + 1)
        for s in self.stop_strings:
            at = text.find(s, start)
            if at >= 0 and (best is None or at < best.cut):
                best = Stop("stop", s, at)
        for source, pattern in self.patterns:
            m = pattern.search(text)
            if m is not None and (best is None or m.start() < best.cut):
                best = Stop("stop", source, m.start())
        return best

    def on_length(self, num_output_tokens: int, num_tokens: int) -> Optional[Stop]:
        if num_output_tokens >= self.params.max_tokens or num_tokens >= self.max_model_len:
            return Stop("length")
        return None

    def stable_len(self, text: str) -> int:
        """How much of a running completion's text no later token can take back.

        A stop string not yet complete can only begin in its last
        max_stop_len - 1 characters. A pattern is held back from the start of
        the last line, and when that line is still empty, from the start of
        the run of newlines before it: where `^...` patterns and runs of
        newlines begin. That covers CodeGen's patterns and any pattern whose
        matches do not span a whole line.
        """
        end = len(text) - max(self.max_stop_len - 1, 0)
        if self.patterns:
            line = text.rfind("\n") + 1
            if line == len(text):
                while line > 0 and text[line - 1] == "\n":
                    line -= 1
            end = min(end, line)
        return max(end, 0)
