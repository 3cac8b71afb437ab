"""Rates and means with their sample size and a 95% interval, so that no reported number stands alone.

Proportions get a Wilson score interval (sound at small n and at 0 or 1, where the normal approximation
collapses to a zero-width interval). Means and base-vs-tuned differences get a percentile bootstrap over
items; a paired difference resamples the same items on both sides, so the per-prompt pairing is kept.
Results from several training seeds get a two-level (seeds × items) bootstrap, so seed-to-seed variation
widens the interval instead of hiding behind one lucky run, and a prediction interval for one more seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959964
METHODS = ("wilson", "bootstrap", "paired bootstrap", "cluster bootstrap", "paired cluster bootstrap")


@dataclass(frozen=True)
class Estimate:
    """A point value with its interval; `value`, `lo` and `hi` are None when there is no data (n == 0).
    `clusters` is the number of training seeds behind a seeds × items estimate (then `n` counts every
    seed-item observation); None for single-run estimates, which keeps their dicts unchanged."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int
    k: int | None = None
    method: str = "wilson"
    clusters: int | None = None

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None else float(x)

        d = {"value": num(self.value), "lo": num(self.lo), "hi": num(self.hi), "n": int(self.n),
             "k": None if self.k is None else int(self.k), "method": self.method}
        if self.clusters is not None:
            d["clusters"] = int(self.clusters)
        return d


def rate(k: int, n: int, z: float = Z95) -> Estimate:
    """k successes of n as a proportion with its Wilson score interval."""
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (k, n)):
        raise ValueError(f"rate: k={k!r} and n={n!r} must be integers")
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"rate: k={k}, n={n}: need 0 <= k <= n")
    if n == 0:
        return Estimate(None, None, None, 0, 0, "wilson")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, k, "wilson")


def rate_of(flags: Iterable[bool]) -> Estimate:
    """The rate of true values among `flags`."""
    flags = [bool(f) for f in flags]
    return rate(sum(flags), len(flags))


def _as_values(values: Iterable[float], what: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}: item {int(bad[0])} is {arr[bad[0]]}; every value must be finite")
    return arr


def _bootstrap(values: np.ndarray, n_boot: int, seed: int, method: str) -> Estimate:
    n = values.size
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be at least 1")
    if n == 0:
        return Estimate(None, None, None, 0, None, method)
    value = float(values.mean())
    if n == 1:
        return Estimate(value, value, value, 1, None, method)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int32)
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    # Clamp: float rounding can put a bound a hair past the point value when every resample agrees.
    return Estimate(value, min(float(lo), value), max(float(hi), value), n, None, method)


def mean(values: Iterable[float], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """The mean of per-item values (perplexities, lengths) with a percentile bootstrap interval."""
    return _bootstrap(_as_values(values, "mean"), n_boot, seed, "bootstrap")


def paired_difference(base: Sequence[float], tuned: Sequence[float], *, n_boot: int = 2000,
                      seed: int = 0) -> Estimate:
    """Mean of tuned − base over paired items; the interval resamples items, keeping each pair together."""
    b, t = _as_values(base, "paired_difference base"), _as_values(tuned, "paired_difference tuned")
    if b.size != t.size:
        raise ValueError(f"paired_difference: base has {b.size} items and tuned {t.size}; "
                         "pair them one to one (same prompts, same order)")
    return _bootstrap(t - b, n_boot, seed, "paired bootstrap")


def difference(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `a` minus mean of `b` for two independent samples (e.g. seen vs unseen task types); each side
    is resampled on its own. `n` is the smaller side."""
    x, y = _as_values(a, "difference a"), _as_values(b, "difference b")
    if x.size == 0 or y.size == 0:
        return Estimate(None, None, None, min(x.size, y.size), None, "bootstrap difference")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be at least 1")
    value = float(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    diffs = (x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
             - y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return Estimate(value, min(float(lo), value), max(float(hi), value), int(min(x.size, y.size)), None,
                    "bootstrap difference")


# ---------------------------------------------------------------------------------------- several seeds

def _as_matrix(values: Sequence[Sequence[float]], what: str) -> np.ndarray:
    """values[s][i] as a (seeds, items) array; ragged rows are an error, not an object array."""
    try:
        rows = [list(r) for r in values]
    except TypeError:
        raise ValueError(f"{what}: expected one sequence of per-item values per seed, e.g. [[0.1, 0.4], [0.2, 0.3]]"
                         ) from None
    for s, r in enumerate(rows):
        if len(r) != len(rows[0]):
            raise ValueError(f"{what}: seed {s} has {len(r)} items and seed 0 has {len(rows[0])}; "
                             "every seed must score the same items")
    try:
        arr = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(rows[0]) if rows else 0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: expected one sequence of numbers per seed ({err})") from None
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        s, i = (int(x) for x in bad[0])
        raise ValueError(f"{what}: seed {s} item {i} is {arr[s, i]}; every value must be finite")
    return arr


def _cluster_bootstrap(x: np.ndarray, n_boot: int, seed: int, method: str) -> Estimate:
    """Grand mean of a (seeds, items) array with a percentile interval from resampling seeds and items.

    Items are shared by every seed (crossed, not nested), so each replicate draws one item index set and
    applies it to every resampled seed: a seed's per-item values stay lined up with the other seeds' (and,
    for a difference, with the other arm's). This is Owen's pigeonhole bootstrap; it is slightly
    conservative, counting the seed × item interaction twice, but with few seeds it is too narrow: a
    resample of S seeds sees at most S distinct offsets, so read a 2- or 3-seed interval as optimistic and
    show `prediction_interval` beside it. Items are drawn first with the same call as
    `_bootstrap`, so with one seed the result equals `mean` / `paired_difference` for the same `seed`.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}: must be at least 1")
    seeds, items = x.shape
    if x.size == 0:
        return Estimate(None, None, None, 0, None, method, seeds)
    value = float(x.mean())
    rng = np.random.default_rng(seed)
    item_idx = rng.integers(0, items, size=(n_boot, items), dtype=np.int32)
    seed_idx = rng.integers(0, seeds, size=(n_boot, seeds))
    # Seed draws as counts: row b of `per_item` is the mean over replicate b's resampled seeds, per item.
    counts = np.bincount((seed_idx + seeds * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * seeds)
    per_item = counts.reshape(n_boot, seeds).astype(np.float64) @ x / seeds
    means = np.take_along_axis(per_item, item_idx, axis=1).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(value, min(float(lo), value), max(float(hi), value), int(x.size), None, method, seeds)


def clustered_mean(values: Sequence[Sequence[float]], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Grand mean of values[s][i] (training seed s, item i; every seed scores the same items in the same order)
    with an interval that resamples seeds and items. `n` is seeds × items and `clusters` the seed count."""
    return _cluster_bootstrap(_as_matrix(values, "clustered_mean values"), n_boot, seed, "cluster bootstrap")


def clustered_paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
                                n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of b − a where a[s][i] and b[s][i] are arms A and B trained with the same seed s and scored on
    the same item i; the interval resamples seeds and items, keeping both pairings. With one seed this is
    `paired_difference`."""
    x = _as_matrix(a, "clustered_paired_difference a")
    y = _as_matrix(b, "clustered_paired_difference b")
    if x.shape != y.shape:
        raise ValueError(f"clustered_paired_difference: a is {x.shape[0]} seeds × {x.shape[1]} items and b "
                         f"{y.shape[0]} × {y.shape[1]}; pair them by seed and by item (same order)")
    return _cluster_bootstrap(y - x, n_boot, seed, "paired cluster bootstrap")


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` (Abramowitz & Stegun 26.7.3-4: a finite series in θ)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    odd = df % 2
    total, term = 1.0, 1.0
    for j in range(2 if odd else 1, df - 1, 2):  # odd: ratios 2/3, 4/5, ...; even: 1/2, 3/4, ...
        term *= c2 * j / (j + 1)
        total += term
    if odd:
        return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p quantile (0.5 < p < 1) of Student's t with integer `df` ≥ 1, by bisection on the exact CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile: p={p}: need 0.5 < p < 1")
    if not isinstance(df, numbers.Integral) or df < 1:
        raise ValueError(f"t_quantile: df={df!r}: need an integer >= 1")
    level = 2 * p - 1
    lo, hi = 0.0, math.pi / 2  # bisect on θ = atan(t/√df): bounded, and the CDF is monotone in it
    for _ in range(60):
        mid = (lo + hi) / 2
        if _t_two_sided(math.sqrt(df) * math.tan(mid), df) < level:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def prediction_interval(seed_values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Where one more training seed's result should fall: mean ± t(n−1) · sd · √(1 + 1/n), sd with ddof=1.
    Unlike an interval for the mean, it does not shrink to zero with more seeds."""
    x = _as_values(seed_values, "prediction_interval seed_values")
    if x.size < 2:
        raise ValueError(f"prediction_interval: seed_values has {x.size} value(s); need at least 2 seeds")
    if not 0 < level < 1:
        raise ValueError(f"prediction_interval: level={level}: need 0 < level < 1")
    m = float(x.mean())
    half = t_quantile((1 + level) / 2, x.size - 1) * float(x.std(ddof=1)) * math.sqrt(1 + 1 / x.size)
    return m - half, m + half


# --------------------------------------------------------------------------------------------- formatting

def _text(e: Estimate | dict | None, show: Callable[[Estimate], str]) -> str:
    """`show(e)` for an Estimate or its dict; "n/a" for None, "n/a (n=N)" when there is no value."""
    e = Estimate(**e) if isinstance(e, dict) and e else (e or None)
    if e is None:
        return "n/a"
    return f"n/a (n={e.n})" if e.value is None else show(e)


def fmt_rate(e: Estimate | dict | None) -> str:
    """'41.2% [35.0, 47.6] n=120'."""
    return _text(e, lambda e: f"{100 * e.value:.1f}% [{100 * e.lo:.1f}, {100 * e.hi:.1f}] n={e.n}")


def fmt_points(e: Estimate | dict | None) -> str:
    """A difference of fractions in absolute percentage points: '+12.5 pts [+3.1, +21.0] n=120'."""
    return _text(e, lambda e: f"{100 * e.value:+.1f} pts [{100 * e.lo:+.1f}, {100 * e.hi:+.1f}] n={e.n}")


def fmt_mean(e: Estimate | dict | None, digits: int = 3) -> str:
    """'3.142 [3.010, 3.270] n=50'."""
    return _text(e, lambda e: f"{e.value:.{digits}f} [{e.lo:.{digits}f}, {e.hi:.{digits}f}] n={e.n}")
