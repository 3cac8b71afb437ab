"""Rates and means with their sample size and a 95% interval, so that no reported number stands alone.

Proportions get a Wilson score interval (sound at small n and at 0 or 1, where the normal approximation
collapses to a zero-width interval). Means and base-vs-tuned differences get a percentile bootstrap over
items; a paired difference resamples the same items on both sides, so the per-prompt pairing is kept.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959964
METHODS = ("wilson", "bootstrap", "paired bootstrap")


@dataclass(frozen=True)
class Estimate:
    """A point value with its interval; `value`, `lo` and `hi` are None when there is no data (n == 0)."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int
    k: int | None = None
    method: str = "wilson"

    def to_dict(self) -> dict:
        def num(x):
            return None if x is None else float(x)

        return {"value": num(self.value), "lo": num(self.lo), "hi": num(self.hi), "n": int(self.n),
                "k": None if self.k is None else int(self.k), "method": self.method}


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
