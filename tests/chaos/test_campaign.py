"""The fault-injection campaign, short: `kvgrid serve` with two workers (a tiny random model,
so that they start and restart fast), G2, G3 on a real filesystem and G4 on a real Redis,
under worker deaths and stalls, garbled KV events, damaged objects, a full disk and clients
that leave. Every answer must be identical to the fault-free reference or a clean error,
nothing may hang, and every slot, lease, pin and G1 block must be free afterwards.

The full campaign (2,000 requests, every fault kind, the default model) is `kvgrid chaos`;
docs/benchmarks.md has its result."""

from __future__ import annotations

import asyncio

import pytest

from kvgrid.chaos.campaign import Campaign, CampaignConfig
from kvgrid.chaos.system import SystemConfig

FAULTS = ("none", "worker_kill_stream", "worker_stop_die", "events_drop", "objects_torn",
          "disk_full", "client_disconnect")  # fmt: skip


@pytest.mark.slow
def test_short_campaign_every_answer_identical_or_a_clean_error(tiny_model_dir, tmp_path):
    from kvgrid.chaos import disk
    from kvgrid.chaos.redis_server import redis_binary

    if redis_binary() is None:
        pytest.skip("SKIPPED LOUDLY: redis-server is not installed")
    try:
        disk.unmount(disk.mount_tmpfs(tmp_path / "probe", 1 << 20))
    except disk.MountError as e:
        pytest.skip(f"SKIPPED LOUDLY: {e}")
    system = SystemConfig(
        workers=2,
        netns_worker=False,
        model=str(tiny_model_dir("llama")),
        g1_gb=0.0015,  # ~48 blocks of this model: blocks leave G1 all the time
        g2_mib=1,
        g3_mib=2,
        g4_mib=4,
        max_model_len=512,
        stall_timeout_s=2.0,
        heartbeat_timeout_s=10.0,
    )
    cfg = CampaignConfig(
        requests=len(FAULTS) * 6,
        seed=7,
        faults=FAULTS,
        g4=("redis",),
        system=system,
        concurrency=4,
        conversations=8,
        turns=2,
        max_tokens=96,  # long enough for a stream of this fast model to be caught mid-way
        system_rules=5,
        deadline_s=60.0,
        idle_timeout_s=30.0,
        wait_all_workers=False,
        workdir=str(tmp_path / "chaos"),
    )
    result = asyncio.run(Campaign(cfg).run())
    rows = {r["fault"]: r for r in result["rows"]}
    assert set(rows) == set(FAULTS)
    total = result["total"]
    assert total["requests"] == len(FAULTS) * 6
    assert total["wrong"] == 0 and total["hung"] == 0, result["segments"]
    assert not result["leaks"], result["leaks"]
    assert rows["none"]["identical"] == rows["none"]["requests"]
    m = result["migration"]
    assert m["requests_hit_by_worker_loss"] >= 1
    assert m["completed_by_migration"] == m["requests_hit_by_worker_loss"]
