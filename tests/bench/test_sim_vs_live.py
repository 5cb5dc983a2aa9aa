"""The CPU calibration of `kvgrid bench sim-vs-live`: its fit recovers known step-time
coefficients, and the result loads as a simulator calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvgrid.bench.sim_vs_live import fit, nnls
from kvgrid.planner.calibration import load_calibration


def test_fit_recovers_step_time_model(tmp_path):
    pf, pt, pa = 0.05, 0.003, 1e-6
    df, ds, dk = 0.07, 0.01, 3e-5
    prefill = [
        (n, ctx, pf + pt * n + pa * n * (ctx + n / 2))
        for n in (32, 96, 192, 512)
        for ctx in (0, 256, 512)
    ]
    decode = [
        (b, b * (L + 7), df + ds * b + dk * b * (L + 7)) for b in (1, 4, 8) for L in (128, 448)
    ]
    sample = {
        "prefill": prefill,
        "decode": decode,
        "block_size": 64,
        "kv_capacity_tokens": 6976,
        "max_num_batched_tokens": 2048,
        "max_num_seqs": 128,
        "kv_bytes_per_token": 46080,
        "model": "m",
        "dtype": "float32",
    }
    d = fit([sample, sample], engines=2, threads=1, startup_s=15.0)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    c = load_calibration(path)
    assert c.meta["measured"] is True
    assert c.step_fixed_s == pytest.approx(pf, rel=1e-3)
    assert c.per_token_s == pytest.approx(pt, rel=1e-3)
    assert c.attn_s == pytest.approx(pa, rel=1e-3)
    assert c.decode_step_s(4, 2000) == pytest.approx(df + 4 * ds + 2000 * dk, rel=1e-6)
    # in a shared prefill step decoders add their own cost, not another pass's fixed cost
    assert c.mixed_decode_s(4, 2000) == pytest.approx(4 * ds + 2000 * dk, rel=1e-6)


def test_nnls_holds_a_coefficient_at_zero_where_the_data_pull_it_negative():
    """The fit is constrained least squares, not least squares clipped afterwards: with one
    coefficient forced to 0 the others are refitted, and they match the exact solution on
    the remaining columns."""
    rng = np.random.default_rng(0)
    a = np.column_stack([np.ones(40), rng.uniform(0, 10, 40), rng.uniform(0, 100, 40)])
    y = a @ np.array([0.5, 0.2, -0.003]) + rng.normal(0, 0.01, 40)
    assert np.linalg.lstsq(a, y, rcond=None)[0][2] < 0  # unconstrained, it goes negative
    got = nnls(a.tolist(), y.tolist())
    assert got[2] == 0.0
    exact = np.linalg.lstsq(a[:, :2], y, rcond=None)[0]
    assert got[:2] == pytest.approx(exact.tolist(), rel=1e-9)
    # and on data a non-negative model fits exactly, the coefficients themselves
    assert nnls(a.tolist(), (a @ [0.5, 0.2, 0.003]).tolist()) == pytest.approx([0.5, 0.2, 0.003])
