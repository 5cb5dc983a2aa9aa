"""Service-level targets a fleet is run to: the planner sizes worker pools to them and the
router's disaggregation keeps decode workers within the ITL one. The defaults of every
config and flag that takes them."""

from __future__ import annotations

DEFAULT_TTFT_TARGET_S = 3.0  # time to first token, at DEFAULT_TTFT_PERCENTILE
DEFAULT_TTFT_PERCENTILE = 0.95
DEFAULT_ITL_TARGET_S = 0.1  # inter-token latency
