"""One estimator per measured quantity (kvgrid/stats.py): the moving average and the
percentiles, against their definitions; the engine reports the decode step time its
scheduler sizes mixed steps by (one estimate, not two)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kvgrid.stats import Ewma, Summary, ewma, percentile, quantile


def test_ewma_takes_the_first_sample_whole_then_weighs_each_new_one():
    assert ewma(None, 3.0, 0.2) == 3.0
    assert ewma(10.0, 0.0, 0.2) == pytest.approx(8.0)
    e = Ewma(0.5)
    assert e.value is None
    e.update(4.0)
    assert e.update(2.0) == 3.0 and e.value == 3.0


def test_percentile_methods_match_their_definitions():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 60)
        xs = [rng.random() for _ in range(n)]
        s = sorted(xs)
        for p in (50, 90, 95, 99, rng.uniform(0, 100)):
            assert percentile(xs, p) == float(np.percentile(xs, p))
            assert percentile(xs, p, "nearest") == s[min(n - 1, round(p / 100 * (n - 1)))]
        for q in (0.5, 0.9, 0.95):
            assert quantile(xs, q, "rank") == s[min(n - 1, int(q * n))]
    assert quantile([float(i) for i in range(20)], 0.95, "rank") == 19.0  # p95 of 20: the max


def test_no_samples_and_unmeasured_samples():
    assert percentile([], 50) is None and quantile(np.array([]), 0.5, "rank") is None
    assert percentile([1.0, math.nan, 3.0], 50) == 2.0
    assert Summary.of([]).as_dict() == {
        "mean": None, "std": None, "p50": None, "p90": None, "p99": None, "max": None
    }  # fmt: skip
    d = Summary.of([1.0, 2.0, 3.0, 4.0]).as_dict()
    assert d["mean"] == 2.5 and d["max"] == 4.0 and d["p50"] == 2.5


def test_engine_reports_its_schedulers_decode_step_estimate(default_llm):
    from kvgrid.engine.sampling_params import SamplingParams

    default_llm.generate(["one two three"], SamplingParams(max_tokens=4, ignore_eos=True))
    engine = default_llm.engine
    est = engine.scheduler.decode_step.value
    assert est is not None and engine.stats()["decode_step_s"] == est
