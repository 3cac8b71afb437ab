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


# ------------------------------------------------------------------------------------------- several seeds

def _seeded(rng, seeds, items, seed_sd, item_sd=1.0, noise_sd=0.5):
    """values[s][i] = seed offset + item difficulty + noise: a crossed seeds × items design."""
    return (rng.normal(0, seed_sd, size=(seeds, 1)) + rng.normal(0, item_sd, size=(1, items))
            + rng.normal(0, noise_sd, size=(seeds, items)))


def test_clustered_paired_difference_recovers_a_constant_shift():
    rng = np.random.default_rng(0)
    a = _seeded(rng, 4, 200, seed_sd=1.0)
    e = stats.clustered_paired_difference(a, a + 0.3, n_boot=500)
    assert (e.value, e.lo, e.hi) == pytest.approx((0.3, 0.3, 0.3))
    assert (e.n, e.clusters, e.k, e.method) == (800, 4, None, "paired cluster bootstrap")
    b = a + 0.3 + rng.normal(0, 0.2, size=a.shape)
    e = stats.clustered_paired_difference(a, b, n_boot=500)
    assert e.lo < 0.3 < e.hi and e.hi - e.lo < 0.1


def test_clustered_mean_counts_seed_to_seed_variation():
    rng = np.random.default_rng(1)
    agree, disagree = _seeded(rng, 5, 100, seed_sd=0.0), _seeded(rng, 5, 100, seed_sd=2.0)
    narrow, wide = stats.clustered_mean(agree, n_boot=500), stats.clustered_mean(disagree, n_boot=500)
    assert narrow.lo < narrow.value < narrow.hi and wide.lo < wide.value < wide.hi
    assert wide.hi - wide.lo > 3 * (narrow.hi - narrow.lo)
    # Pooling every seed's items into one item-only bootstrap hides the seed offsets behind n = 500.
    naive = stats.mean(disagree.ravel(), n_boot=500)
    assert naive.value == pytest.approx(wide.value)
    assert naive.hi - naive.lo < (wide.hi - wide.lo) / 3
    assert (wide.n, wide.clusters, wide.method) == (500, 5, "cluster bootstrap")


def test_clustered_with_one_seed_is_the_single_run_bootstrap():
    rng = np.random.default_rng(2)
    base, tuned = rng.random(60), rng.random(60)
    one = stats.clustered_paired_difference([base], [tuned], n_boot=300, seed=4)
    ref = stats.paired_difference(base, tuned, n_boot=300, seed=4)
    assert one.value == pytest.approx(ref.value)
    assert (one.lo, one.hi) == pytest.approx((ref.lo, ref.hi), abs=1e-12)
    assert (one.n, one.clusters) == (60, 1)
    m = stats.clustered_mean([base], n_boot=300, seed=4)
    assert (m.value, m.lo, m.hi) == pytest.approx(tuple(getattr(stats.mean(base, n_boot=300, seed=4), f)
                                                       for f in ("value", "lo", "hi")), abs=1e-12)


def test_clustered_is_deterministic_in_seed_and_handles_degenerate_sizes():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 40)), rng.random((3, 40))
    first = stats.clustered_paired_difference(a, b, n_boot=200, seed=7)
    assert first == stats.clustered_paired_difference(a.tolist(), b.tolist(), n_boot=200, seed=7)
    assert first != stats.clustered_paired_difference(a, b, n_boot=200, seed=8)
    empty = stats.clustered_mean([])
    assert (empty.value, empty.n, empty.clusters) == (None, 0, 0)
    assert stats.clustered_mean([[], []]).value is None and stats.clustered_mean([[], []]).clusters == 2
    assert stats.clustered_mean([[2.5]]) == stats.Estimate(2.5, 2.5, 2.5, 1, None, "cluster bootstrap", 1)
    assert set(stats.METHODS) >= {first.method, empty.method}


def test_clustered_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"a is 2 seeds × 3 items and b 3 × 3"):
        stats.clustered_paired_difference([[1, 2, 3]] * 2, [[1, 2, 3]] * 3)
    with pytest.raises(ValueError, match=r"a is 1 seeds × 3 items and b 1 × 2"):
        stats.clustered_paired_difference([[1, 2, 3]], [[1, 2]])
    with pytest.raises(ValueError, match="clustered_mean values: seed 1 has 2 items and seed 0 has 3"):
        stats.clustered_mean([[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="seed 1 item 0 is inf"):
        stats.clustered_mean([[1, 2], [float("inf"), 2]])
    with pytest.raises(ValueError, match="one sequence of per-item values per seed"):
        stats.clustered_mean([1.0, 2.0])
    with pytest.raises(ValueError, match="n_boot=0"):
        stats.clustered_mean([[1.0]], n_boot=0)


def test_clustered_to_dict_adds_clusters_and_round_trips():
    e = stats.clustered_mean([[1.0, 2.0], [3.0, 4.0]], n_boot=50)
    d = e.to_dict()
    assert json.loads(json.dumps(d)) == d and d["clusters"] == 2 and d["n"] == 4
    assert stats.Estimate(**d) == e and stats.fmt_mean(d, 1).endswith("n=4")
    assert "clusters" not in stats.mean([1.0, 2.0], n_boot=50).to_dict()


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantile_matches_tables(df, t):
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_other_levels_and_limits():
    assert stats.t_quantile(0.995, 10) == pytest.approx(3.1693, abs=1e-4)
    assert stats.t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)  # tends to the normal
    for p, df in [(0.5, 3), (1.0, 3), (0.975, 0), (0.975, 2.5)]:
        with pytest.raises(ValueError, match="t_quantile"):
            stats.t_quantile(p, df)


def test_prediction_interval_formula_and_errors():
    lo, hi = stats.prediction_interval([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 * np.sqrt(1 + 1 / 3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half), abs=1e-3)
    assert stats.prediction_interval([5.0, 5.0]) == (5.0, 5.0)
    with pytest.raises(ValueError, match="seed_values has 1 value"):
        stats.prediction_interval([1.0])
    with pytest.raises(ValueError, match="level=1.5"):
        stats.prediction_interval([1.0, 2.0], level=1.5)


def test_prediction_interval_covers_the_next_seed():
    rng = np.random.default_rng(0)
    draws = rng.normal(0.4, 0.05, size=(2000, 6))
    hits = 0
    for row in draws:
        lo, hi = stats.prediction_interval(row[:5])
        hits += lo <= row[5] <= hi
    assert abs(hits / 2000 - 0.95) <= 0.025
