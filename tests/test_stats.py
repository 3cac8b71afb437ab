"""jaxtune.stats: Wilson intervals against published values, bootstrap means and paired differences
(determinism, known shifts, degenerate sizes), and the exact report strings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune import stats


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 1, 0.2065, 1.0),
])
def test_wilson_matches_published_values(k, n, lo, hi):
    e = stats.rate(k, n)
    assert (round(e.lo, 4), round(e.hi, 4)) == (lo, hi)
    assert e.value == k / n and e.n == n and e.k == k and e.method == "wilson"


def test_wilson_narrows_with_n_and_stays_in_unit_interval():
    small, big = stats.rate(3, 10), stats.rate(300, 1000)
    assert big.hi - big.lo < small.hi - small.lo
    assert 0 <= small.lo <= small.value <= small.hi <= 1


def test_rate_of_empty_is_none():
    e = stats.rate(0, 0)
    assert (e.value, e.lo, e.hi, e.n) == (None, None, None, 0)
    assert stats.rate_of([]) == e
    assert stats.rate_of([True, False, True, True]) == stats.rate(3, 4)


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (1, -1), (2.5, 10), (True, 3), ("3", 10)])
def test_rate_rejects_invalid_counts(k, n):
    with pytest.raises(ValueError, match="rate"):
        stats.rate(k, n)


def test_wilson_coverage_is_near_nominal():
    rng = np.random.default_rng(1)
    p, n = 0.3, 40
    draws = rng.binomial(n, p, size=200)
    covered = sum(stats.rate(int(k), n).lo <= p <= stats.rate(int(k), n).hi for k in draws)
    assert 0.90 <= covered / 200 <= 0.99


def test_mean_degenerate_sizes():
    assert stats.mean([]).value is None and stats.mean([]).n == 0
    one = stats.mean([4.5])
    assert (one.value, one.lo, one.hi, one.n, one.method) == (4.5, 4.5, 4.5, 1, "bootstrap")


def test_mean_interval_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=300)
    a, b = stats.mean(values, seed=3), stats.mean(values, seed=3)
    assert a == b
    assert a.lo < a.value < a.hi and a.value == pytest.approx(values.mean())
    assert a.hi - a.lo < 1.0  # about 4 standard errors of 2/sqrt(300)
    assert stats.mean(values, seed=4) != a


def test_mean_rejects_non_finite():
    with pytest.raises(ValueError, match="item 1 is nan"):
        stats.mean([1.0, float("nan")])


def test_paired_difference_identical_sides_is_exactly_zero():
    base = [0, 1, 1, 0, 1, 0.5]
    e = stats.paired_difference(base, list(base))
    assert (e.value, e.lo, e.hi, e.n, e.method) == (0.0, 0.0, 0.0, 6, "paired bootstrap")


def test_paired_difference_recovers_a_known_shift():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=400).astype(float)
    tuned = base.copy()
    flip = rng.choice(np.flatnonzero(base == 0), size=80, replace=False)  # +80/400 = +0.2
    tuned[flip] = 1.0
    e = stats.paired_difference(base, tuned)
    assert e.value == pytest.approx(0.2)
    assert e.lo < 0.2 < e.hi and e.lo > 0  # the shift is detected, not just contained
    assert stats.paired_difference(tuned, base).value == pytest.approx(-0.2)


def test_paired_difference_keeps_pairs_together():
    # Large per-prompt spread but a constant +1 shift: pairing gives a zero-width interval,
    # resampling the two sides independently would not.
    base = np.arange(100, dtype=float) * 10
    e = stats.paired_difference(base, base + 1)
    assert (e.value, e.lo, e.hi) == pytest.approx((1.0, 1.0, 1.0))


def test_paired_difference_seeds():
    rng = np.random.default_rng(5)
    base, tuned = rng.random(50), rng.random(50)
    assert stats.paired_difference(base, tuned, seed=7) == stats.paired_difference(base, tuned, seed=7)
    assert stats.paired_difference(base, tuned, seed=7) != stats.paired_difference(base, tuned, seed=8)


def test_paired_difference_rejects_unpaired():
    with pytest.raises(ValueError, match="base has 3 items and tuned 2"):
        stats.paired_difference([1, 2, 3], [1, 2])


def test_paired_difference_is_fast_for_thousands_of_prompts():
    import time

    rng = np.random.default_rng(0)
    base, tuned = rng.random(3000), rng.random(3000)
    start = time.perf_counter()
    stats.paired_difference(base, tuned)
    assert time.perf_counter() - start < 5.0


def test_to_dict_is_json_safe():
    d = stats.rate(np.int64(3), np.int64(4)).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {"value": 0.75, "lo": pytest.approx(0.3006, abs=1e-4), "hi": pytest.approx(0.9544, abs=1e-4),
                 "n": 4, "k": 3, "method": "wilson"}
    assert stats.rate(0, 0).to_dict() == {"value": None, "lo": None, "hi": None, "n": 0, "k": 0,
                                          "method": "wilson"}
    assert stats.mean([]).to_dict()["k"] is None


def test_formatting_strings():
    assert stats.fmt_rate(stats.Estimate(0.412, 0.35, 0.476, 120)) == "41.2% [35.0, 47.6] n=120"
    assert stats.fmt_rate(stats.rate(0, 0)) == "n/a (n=0)"
    assert stats.fmt_rate(stats.rate(5, 10)) == "50.0% [23.7, 76.3] n=10"
    diff = stats.Estimate(0.125, 0.031, 0.21, 120, method="paired bootstrap")
    assert stats.fmt_points(diff) == "+12.5 pts [+3.1, +21.0] n=120"
    assert stats.fmt_points(stats.Estimate(-0.05, -0.1, 0.02, 40)) == "-5.0 pts [-10.0, +2.0] n=40"
    assert stats.fmt_points(stats.paired_difference([], [])) == "n/a (n=0)"
    assert stats.fmt_mean(stats.Estimate(3.14159, 3.0, 3.3, 50)) == "3.142 [3.000, 3.300] n=50"
    assert stats.fmt_mean(stats.Estimate(3.14159, 3.0, 3.3, 50), digits=1) == "3.1 [3.0, 3.3] n=50"
    assert stats.fmt_mean(stats.mean([])) == "n/a (n=0)"
    # Estimate dicts (what report.json holds) and None format the same way.
    assert stats.fmt_rate(stats.rate(5, 10).to_dict()) == "50.0% [23.7, 76.3] n=10"
    assert stats.fmt_points(None) == stats.fmt_rate(None) == stats.fmt_mean(None) == "n/a"
    assert stats.fmt_mean(stats.mean([1.0, 3.0], n_boot=50).to_dict(), 1).startswith("2.0 [")


def test_independent_difference():
    a, b = [1.0] * 30 + [0.0] * 10, [1.0] * 10 + [0.0] * 30
    d = stats.difference(a, b, n_boot=500, seed=1)
    assert d.value == pytest.approx(0.5) and d.lo < 0.5 < d.hi and d.lo > 0.2 and d.n == 40
    assert d == stats.difference(a, b, n_boot=500, seed=1)
    assert stats.difference([1.0, 1.0], [1.0, 1.0]).value == 0.0
    assert stats.difference([], [1.0]).value is None
