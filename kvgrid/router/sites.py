"""Sites: groups of workers that share a network distance from the router and a price.

An "AI grid" spreads GPUs over sites (a region, a colocation, an on-premise rack). A site
has the round trip between the router and its workers, which every request sent there pays
before its first token, and a cost per GPU-hour, which the planner weighs when it adds or
drains replicas. The fleet simulator assigns its workers to sites; on a Ray cluster a site
is the set of nodes labelled ``kvgrid.io/site=<name>`` (kvgrid.server.ray.placement).
"""

from __future__ import annotations

from dataclasses import dataclass

# The Ray node label (and the worker's /info field) naming a worker's site.
SITE_LABEL = "kvgrid.io/site"


@dataclass(frozen=True)
class Site:
    name: str = "default"
    rtt_s: float = 0.0  # router <-> site round trip
    cost_per_gpu_hour: float = 2.5
    share: float = 1.0  # the simulator: fraction of the workers placed here


def parse_site(text: str) -> Site:
    """``NAME:RTT_MS:COST[:SHARE]``, e.g. ``east:0:2.5`` or ``west:40:1.2:0.5``."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise ValueError(f"a site is NAME:RTT_MS:COST[:SHARE], got {text!r}")
    try:
        nums = [float(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"a site is NAME:RTT_MS:COST[:SHARE] with numbers, got {text!r}") from None
    if any(x < 0 for x in nums) or (len(nums) == 3 and nums[2] <= 0):
        raise ValueError(f"site {parts[0]!r}: RTT and cost must be >= 0, the share > 0")
    share = nums[2] if len(nums) == 3 else 1.0
    return Site(parts[0], nums[0] / 1000, nums[1], share)
