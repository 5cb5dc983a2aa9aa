"""Conditional disaggregation in the router, pure: where each request's prompt is computed, why,
and what the router books on the prefill and the decode worker."""

import pytest

from kvgrid import keys
from kvgrid.events import BlockStored, EventBatch
from kvgrid.router.disagg import DisaggConfig
from kvgrid.router.router import NoWorkerError, Router, RouteRequest
from kvgrid.router.workers import WorkerInfo, WorkerLoad

SCOPE = keys.KVScope("m", "float32")
BPB = 8 << 20  # an 8B model's 64-token block


def fleet(
    mode="auto", d_load=None, p_load=None, d_endpoint="127.0.0.1:1", devices=("", ""), **cfg
) -> Router:
    r = Router("ttft", disagg=DisaggConfig(mode=mode, **cfg))
    for wid, role, endpoint, extra, device in (
        ("d0", "decode", d_endpoint, d_load or {}, devices[0]),
        ("p0", "prefill", "127.0.0.1:2", p_load or {}, devices[1]),
    ):
        info = WorkerInfo(
            wid,
            epoch="e",
            scope=SCOPE,
            max_num_batched_tokens=2048,
            bytes_per_block=BPB,
            role=role,
            transfer_endpoint=endpoint,
            device=device,
        )
        r.add_worker(info, 0.0)
        r.on_snapshot(wid, 0, {}, 0.0)
        load = dict(prefill_tokens_per_s=10_000.0, decode_step_s=0.02, role=role)
        load.update(extra)
        r.on_load(WorkerLoad(wid, "e", **load), 0.0)
    return r


def toks(n, start=0):
    return list(range(start, start + n))


BUSY = dict(num_running=32, mixed_prefill_tokens=256, transfer_bytes_per_s=5e9)


def test_long_uncached_prompt_on_a_busy_decode_worker_is_prefilled_remotely():
    r = fleet(d_load=BUSY)
    d = r.route(RouteRequest("a", toks(8192)), 1.0)
    assert d.worker_id == "d0"  # never a prefill-only worker
    p = d.prefill
    assert p.remote and p.reason == "lowers_ttft" and p.worker_id == "p0"
    assert p.start_block == 0 and p.num_blocks == 127  # the last token is computed by d0
    assert p.remote_ttft_s < 0.9 * p.local_ttft_s
    # while decoding, d0's steps carry 256 prompt tokens: 32 steps of a decode step each
    assert p.local_ttft_s == pytest.approx(8192 / 10_000 + 32 * 0.02)
    assert p.deadline_s > p.remote_ttft_s and p.stall_s == 5.0
    body = d.to_dict()["prefill"]
    assert body["reason"] == "lowers_ttft" and body["options"][0]["worker_id"] == "p0"
    assert "prefill remote@p0 (lowers_ttft" in d.log_line()
    # booked: p0 computes the prompt, d0 only its last tokens
    p0, d0 = r.workers["p0"], r.workers["d0"]
    assert p0.pending_prefill_tokens() == 127 * 64
    assert d0.pending_prefill_tokens() == 8192 - 127 * 64
    r.on_prefill_done("a", 2.0)
    assert p0.pending_prefill_tokens() == 0 and not p0.inflight
    r.on_finish("a", 3.0)
    assert not d0.inflight
    assert r.prefill_reasons == {"remote:lowers_ttft": 1}


def test_idle_decode_worker_short_prompt_and_cached_prefix_stay_local():
    r = fleet()
    d = r.route(RouteRequest("idle", toks(8192)), 1.0)
    assert not d.prefill.remote and d.prefill.reason == "local_faster"
    assert d.prefill.remote_ttft_s > d.prefill.local_ttft_s * 0.9
    assert not r.workers["p0"].inflight
    d = r.route(RouteRequest("short", toks(100, 50_000)), 1.0)
    assert not d.prefill.remote and d.prefill.reason == "short_prompt"
    # d0 holds most of the prompt: little is left to move
    prompt = toks(8192, 90_000)
    ks = keys.block_keys(prompt[:8000], SCOPE.digest)
    r.on_events(EventBatch("d0", 1, 0.0, [BlockStored(tuple(ks), None, "G1", 8000)]), 1.0)
    busy = fleet(d_load=BUSY)
    busy.on_events(EventBatch("d0", 1, 0.0, [BlockStored(tuple(ks), None, "G1", 8000)]), 1.0)
    d = busy.route(RouteRequest("cached", prompt), 1.0)
    assert not d.prefill.remote and d.prefill.reason == "cached_prefix"
    assert d.prefill.start_block == 125


def test_only_the_blocks_the_decode_worker_lacks_are_moved():
    r = fleet(d_load=BUSY)
    prompt = toks(8192, 7)
    ks = keys.block_keys(prompt[:2048], SCOPE.digest)
    r.on_events(EventBatch("d0", 1, 0.0, [BlockStored(tuple(ks), None, "G1", 2048)]), 1.0)
    d = r.route(RouteRequest("half", prompt), 1.0)
    assert d.prefill.remote and d.prefill.start_block == 32 and d.prefill.num_blocks == 95


def test_itl_protection_trades_some_ttft_within_the_target():
    # d0 decodes with whole-budget mixed steps: a local prefill would make each of its
    # decode steps 0.22 s; p0 has a queue, so remote is not faster, but within 3 s
    d_load = dict(num_running=16, mixed_prefill_tokens=2048, transfer_bytes_per_s=5e9)
    r = fleet(d_load=d_load, p_load=dict(waiting_prefill_tokens=2000), ttft_target_s=3.0)
    d = r.route(RouteRequest("itl", toks(8192)), 1.0)
    p = d.prefill
    assert p.local_itl_s > 0.1 >= p.remote_itl_s
    assert p.remote_ttft_s >= 0.9 * p.local_ttft_s
    assert p.remote and p.reason == "protects_itl"
    # with a TTFT target the remote prefill would miss, the prompt stays local
    r = fleet(d_load=d_load, p_load=dict(waiting_prefill_tokens=2000), ttft_target_s=0.5)
    assert r.route(RouteRequest("itl2", toks(8192)), 1.0).prefill.reason == "local_faster"


SHARED = ("cuda:GPU-a", "cuda:GPU-a")
APART = ("cuda:GPU-a", "cuda:GPU-b")


def test_a_prefill_worker_on_the_decode_workers_device_must_still_win():
    # apart, p0 takes the busy decode worker's long prompt (it is faster there)
    for devices in (("", ""), APART, ("", "cuda:GPU-a")):
        p = fleet(d_load=BUSY, devices=devices).route(RouteRequest("x", toks(8192)), 1.0).prefill
        assert p.remote and p.reason == "lowers_ttft" and not p.options[0].shared_device
    # on one device, p0's 2048-token steps run between d0's decode steps: its ITL would go
    # from 0.046 s (256-token mixed steps) to 0.225 s, past the 0.1 s target
    r = fleet(d_load=BUSY, devices=SHARED)
    d = r.route(RouteRequest("x", toks(8192)), 1.0)
    p = d.prefill
    o = p.options[0]
    assert o.shared_device and not p.remote and p.reason == "shared_device"
    assert p.local_itl_s == pytest.approx(0.02 + 256 / 10_000)
    assert p.remote_itl_s == pytest.approx(0.02 + 2048 / 10_000)
    # d0's decode steps stretch p0's prefill too: one per p0 step
    apart = fleet(d_load=BUSY, devices=APART).route(RouteRequest("x", toks(8192)), 1.0).prefill
    assert o.compute_s == pytest.approx(apart.options[0].compute_s + 4 * 0.02)
    assert d.to_dict()["prefill"]["options"][0]["shared_device"] is True
    assert "shared_device" in d.log_line()
    assert r.prefill_reasons == {"local:shared_device": 1} and not r.workers["p0"].inflight
    # "protects_itl" never holds on a shared device: the remote prefill takes the same steps
    d_load = dict(num_running=16, mixed_prefill_tokens=2048, transfer_bytes_per_s=5e9)
    queued = dict(waiting_prefill_tokens=2000)
    for devices, remote in ((APART, True), (SHARED, False)):
        r = fleet(d_load=d_load, p_load=queued, ttft_target_s=3.0, devices=devices)
        p = r.route(RouteRequest("itl", toks(8192)), 1.0).prefill
        assert p.remote is remote and p.reason == ("protects_itl" if remote else "shared_device")
    # forced is forced
    assert (
        fleet("always", d_load=BUSY, devices=SHARED)
        .route(RouteRequest("f", toks(8192)), 1.0)
        .prefill.remote
    )


def test_on_a_shared_device_remote_prefill_wins_where_the_prefill_worker_holds_the_prefix():
    prompt = toks(8192, 300)
    ks = keys.block_keys(prompt[:8128], SCOPE.digest)
    stored = EventBatch("p0", 1, 0.0, [BlockStored(tuple(ks), None, "G1", 8128)])
    r = fleet(d_load=BUSY, devices=SHARED)
    r.on_events(stored, 1.0)
    d = r.route(RouteRequest("hit", prompt), 1.0)
    p = d.prefill
    # p0 computes its last block alone: 64 tokens between d0's steps keep its ITL in target
    assert p.remote and p.reason == "lowers_ttft" and p.options[0].shared_device
    assert p.options[0].uncached_tokens == 64 and p.remote_itl_s < 0.1
    # an idle decode worker: nothing of its decoding to slow down, sharing changes nothing
    idle = fleet(devices=SHARED, p_load=dict())
    assert idle.route(RouteRequest("i", toks(8192)), 1.0).prefill.reason == "local_faster"


def test_of_two_prefill_workers_the_one_on_another_device_takes_the_prompt():
    r = fleet(d_load=BUSY, devices=SHARED)
    # p1 has a queue (slower on paper than p0), but p0 shares d0's device
    info = WorkerInfo(
        "p1",
        epoch="e",
        scope=SCOPE,
        max_num_batched_tokens=2048,
        bytes_per_block=BPB,
        role="prefill",
        transfer_endpoint="127.0.0.1:3",
        device="cuda:GPU-b",
    )
    r.add_worker(info, 0.0)
    r.on_snapshot("p1", 0, {}, 0.0)
    load = dict(prefill_tokens_per_s=10_000.0, decode_step_s=0.02, role="prefill")
    r.on_load(WorkerLoad("p1", "e", waiting_prefill_tokens=1000, **load), 0.0)
    p = r.route(RouteRequest("two", toks(8192)), 1.0).prefill
    by = {o.worker_id: o for o in p.options}
    assert by["p0"].shared_device and not by["p1"].shared_device
    assert by["p0"].predicted_ttft_s < by["p1"].predicted_ttft_s  # p0 first on TTFT alone
    assert p.remote and p.worker_id == "p1" and p.reason == "lowers_ttft"


def test_workers_report_the_device_they_compute_on():
    import socket

    import torch

    from kvgrid.server.worker import device_identity

    assert device_identity(torch.device("cpu")) == f"{socket.gethostname()}/cpu"
    assert device_identity(None) == f"{socket.gethostname()}/cpu"
    info = WorkerInfo("w", device="cuda:GPU-x")
    assert WorkerInfo.from_dict(info.to_dict()).device == "cuda:GPU-x"


def test_a_slow_link_keeps_prefill_local():
    r = fleet(d_load=dict(BUSY, transfer_bytes_per_s=1e7))
    p = r.route(RouteRequest("slow", toks(8192)), 1.0).prefill
    assert not p.remote and p.options[0].transfer_tail_s > 10


def test_modes_and_fleets_without_transfers():
    assert fleet("never", d_load=BUSY).route(RouteRequest("n", toks(8192)), 1).prefill.reason == (
        "disabled"
    )
    d = fleet("always").route(RouteRequest("a", toks(200)), 1)
    assert d.prefill.remote and d.prefill.reason == "forced"
    d = fleet(d_load=BUSY, d_endpoint=None).route(RouteRequest("x", toks(8192)), 1)
    assert not d.prefill.remote and d.prefill.reason == "no_transfer"
    r = fleet(d_load=BUSY)
    r.mark_down("p0", 1.0)
    assert r.route(RouteRequest("y", toks(8192)), 1).prefill.reason == "no_prefill_worker"
    r.mark_down("d0", 1.0)
    with pytest.raises(NoWorkerError):
        r.route(RouteRequest("z", toks(10)), 1)
    # a worker that decodes but has no prefill pool beside it
    plain = Router("ttft")
    plain.add_worker(WorkerInfo("w", epoch="e", scope=SCOPE, events=False), 0.0)
    assert plain.route(RouteRequest("q", toks(10)), 0.0).prefill is None
    with pytest.raises(ValueError):
        DisaggConfig(mode="sometimes")


def test_prefill_only_fleet_cannot_decode():
    r = Router("ttft", disagg=DisaggConfig())
    r.add_worker(WorkerInfo("p", epoch="e", scope=SCOPE, role="prefill", events=False), 0.0)
    with pytest.raises(NoWorkerError, match="prefill-only"):
        r.route(RouteRequest("a", toks(10)), 0.0)


def test_role_follows_the_load_report():
    r = fleet(d_load=BUSY)
    r.on_load(WorkerLoad("p0", "e", prefill_tokens_per_s=10_000.0, role="decode"), 1.0)
    d = r.route(RouteRequest("r", toks(8192)), 1.0)
    assert d.prefill.reason == "no_prefill_worker"  # p0 decodes now: a second decode worker


def test_the_simulator_hands_kv_over_with_the_live_model():
    """The fleet simulator moves KV with the router's transfer model and the calibration's
    measured parameters: a slower link shows in its first tokens by what the model says."""
    from kvgrid.bench.sim.fleet import SimConfig, simulate
    from kvgrid.bench.workloads import no_reuse
    from kvgrid.planner.calibration import load_calibration
    from kvgrid.transfer.model import TransferModel

    w = no_reuse(num_requests=40, input_tokens=4096, output_tokens=8, rate=0.5, spread=0.0)
    calib = load_calibration()
    ttft = {}
    for name, bw in (("fast", 50e9), ("slow", 0.5e9)):
        c = calib.replace(transfer=TransferModel(bw, 0.002))
        r = simulate(w, SimConfig(num_workers=2, num_prefill=1, disagg=True, calibration=c))
        r.pop("fleet")
        assert r["completed"] == 40
        ttft[name] = r["ttft_p50_s"]
    bpb = 64 * calib.kv_bytes_per_token
    n, produce = 4095 // 64, calib.prefill_s(4096)
    per_step = calib.max_num_batched_tokens // 64
    land = calib.tier_bytes_per_s["G2"]

    def handoff(bw: float) -> float:
        return TransferModel(bw, 0.002).handoff_s(n, bpb, produce, per_step, land)

    assert ttft["slow"] - ttft["fast"] == pytest.approx(handoff(0.5e9) - handoff(50e9), rel=0.05)


def test_serve_pools_and_their_worker_commands():
    import argparse

    from kvgrid.server.serve import worker_argv, worker_pools

    def ns(**kw):
        base = dict(workers=None, prefill_workers=0, decode_workers=0, allow_fault_injection=False)
        return argparse.Namespace(**{**base, **kw})

    assert worker_pools(ns()) == [("w0", "both")]
    assert worker_pools(ns(prefill_workers=1, decode_workers=2)) == [
        ("p0", "prefill"),
        ("d0", "decode"),
        ("d1", "decode"),
    ]
    assert worker_pools(ns(workers=1, prefill_workers=1)) == [("w0", "both"), ("p0", "prefill")]
    with pytest.raises(ValueError, match="must decode"):
        worker_pools(ns(prefill_workers=2))
    argv = worker_argv(ns(allow_fault_injection=True), "p0", 9000, 1, "prefill")
    assert argv[argv.index("--role") + 1] == "prefill" and "--allow-fault-injection" in argv


def test_serve_on_ray_runs_one_pool():
    """Ray's launcher starts workers of one kind: role pools are refused before Ray starts,
    and --workers alone still defaults to one."""
    from kvgrid.cli import build_parser
    from kvgrid.server.ray.serve import RayServer

    args = build_parser().parse_args(["serve", "--ray", "--prefill-workers", "1"])
    with pytest.raises(ValueError, match="one pool of workers"):
        RayServer.start(args)
    args = build_parser().parse_args(["serve", "--ray", "--workers", "0"])
    with pytest.raises(ValueError, match="at least 1"):
        RayServer.start(args)
