"""Programmatic dependent launch is asked for only where it exists (layers/pdl.py)."""

from __future__ import annotations

import torch

from kvgrid.layers import pdl


def test_cpu_tensors_and_the_switch_turn_pdl_off(monkeypatch):
    assert pdl.launch_kwargs(torch.zeros(1)) == {"PDL": False}
    monkeypatch.setattr(pdl, "ENABLED", False)
    if torch.cuda.is_available():
        assert pdl.launch_kwargs(torch.zeros(1, device="cuda")) == {"PDL": False}
