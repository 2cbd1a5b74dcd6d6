"""Stop patterns: regular expressions that end a completion, like CodeGen's `truncate_before_pattern`.

End-of-text, stop token ids, stop strings and lengths are checked by the
native scheduler as tokens arrive; patterns are Python regular expressions,
checked here on the text of the requests that set them.
"""

from __future__ import annotations

import re
from typing import Optional


class PatternStops:
    """The stop patterns of one request, compiled with re.MULTILINE."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = [(p, re.compile(p, re.MULTILINE)) for p in patterns]

    def search(self, text: str) -> Optional[tuple[int, str]]:
        """(where to cut, the pattern) for the earliest match in `text`, or None."""
        best: Optional[tuple[int, str]] = None
        for source, pattern in self.patterns:
            m = pattern.search(text)
            if m is not None and (best is None or m.start() < best[0]):
                best = (m.start(), source)
        return best

    @staticmethod
    def stable_len(text: str) -> int:
        """How much of a running completion's text a pattern can no longer cut.

        A pattern is held back from the start of the last line, and when that
        line is still empty, from the start of the run of newlines before it:
        where `^...` patterns and runs of newlines begin. That covers CodeGen's
        patterns and any pattern whose matches do not span a whole line.
        """
        line = text.rfind("\n") + 1
        if line == len(text):
            while line > 0 and text[line - 1] == "\n":
                line -= 1
        return line
