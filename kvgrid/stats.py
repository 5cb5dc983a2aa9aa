"""Estimators of measured quantities: the moving average every measured speed and step time
is smoothed with, and the percentiles every latency report and SLA check is read from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

PercentileMethod = Literal["linear", "nearest", "rank"]


def ewma(old: float | None, sample: float, weight: float) -> float:
    """Exponentially weighted moving average: ``weight`` is the newest sample's share; the
    first sample (``old`` None) is taken whole."""
    return sample if old is None else (1 - weight) * old + weight * sample


@dataclass
class Ewma:
    """One smoothed measurement (a step time, a bandwidth): None until first observed."""

    weight: float  # share of each new sample
    value: float | None = None

    def update(self, sample: float) -> float:
        self.value = ewma(self.value, sample, self.weight)
        return self.value


def quantile(xs: Iterable[float], q: float, method: PercentileMethod = "linear") -> float | None:
    """The ``q`` quantile (0..1) of the samples, None without any; NaN samples (not
    measured) are left out. ``linear`` interpolates (numpy's default); ``nearest`` is the
    closest sample; ``rank`` is the sample at 0-based rank floor(q * n), the smallest with
    more than a fraction q of the samples at or below it (never interpolated, and on few
    samples the larger: a p95 of 20 samples is their maximum, as an SLA check wants)."""
    a = np.asarray(xs if isinstance(xs, (Sequence, np.ndarray)) else list(xs), dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return None
    if method == "rank":
        return float(np.sort(a)[min(a.size - 1, int(q * a.size))])
    return float(np.quantile(a, q, method=method))


def percentile(xs: Iterable[float], p: float, method: PercentileMethod = "linear") -> float | None:
    """The ``p`` percentile (0..100): quantile(xs, p / 100)."""
    return quantile(xs, p / 100, method)


@dataclass(frozen=True)
class Summary:
    """mean, std, chosen percentiles and max of a set of samples (None each, without any)."""

    mean: float | None
    std: float | None
    percentiles: dict[int, float | None]
    max: float | None

    @classmethod
    def of(cls, xs: Iterable[float], ps: Iterable[int] = (50, 90, 99)) -> Summary:
        a = np.asarray(list(xs), dtype=float)
        if a.size == 0:
            return cls(None, None, {p: None for p in ps}, None)
        return cls(
            float(a.mean()), float(a.std()), {p: percentile(a, p) for p in ps}, float(a.max())
        )

    def as_dict(self) -> dict[str, float | None]:
        """{"mean", "std", "p50", ..., "max"} (vLLM's benchmark fields)."""
        return {
            "mean": self.mean,
            "std": self.std,
            **{f"p{p}": v for p, v in self.percentiles.items()},
            "max": self.max,
        }
