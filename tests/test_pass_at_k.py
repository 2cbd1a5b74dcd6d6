"""pass@k against brute force: the fraction of all k-subsets of n samples that hold a correct one."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from fastcodegen.eval.pass_at_k import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_every_k_subset(n):
    for c in range(n + 1):  # c = 0 and c = n included
        for k in range(1, n + 1):  # k = n included
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_edge_values():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 1, 5) == 1.0  # k = n: the one correct sample is always drawn
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


def test_large_n_is_stable():
    rng = random.Random(20210707)
    for _ in range(20):
        n = rng.randint(100, 400)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12), (n, c, k)


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="k must be at most n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c must be at most n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="n must be"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="c must be"):
        pass_at_k(3, -1, 1)


def test_mean_over_tasks_by_hand():
    results = {"a": (4, 1), "b": (4, 0), "c": (2, 2)}
    got = mean_pass_at_k(results, [1, 2, 3])
    # pass@1: (1/4 + 0 + 1) / 3; pass@2: (1 - C(3,2)/C(4,2) + 0 + 1) / 3 = (1/2 + 1) / 3
    assert got == {1: pytest.approx((0.25 + 0 + 1) / 3), 2: pytest.approx(0.5)}
    assert 3 not in got  # task "c" has only 2 samples: pass@3 is left out, not guessed


def test_mean_errors():
    with pytest.raises(ValueError, match="results"):
        mean_pass_at_k({}, [1])
    with pytest.raises(ValueError, match="ks"):
        mean_pass_at_k({"a": (2, 1)}, [0])
    with pytest.raises(ValueError, match="'a'"):
        mean_pass_at_k({"a": (2, 3)}, [1])
