"""Failures of the router's and the worker's paths are released, counted and survived:
a worker connection that resets, bad event messages, a long engine step, bad admin input,
addresses that only work on one host, flags that would bind an open control plane."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from kvgrid import keys
from kvgrid.engine.sampling_params import SamplingParams
from kvgrid.events import BlockStored, EventBatch
from kvgrid.router import wire
from kvgrid.router.router import Router
from kvgrid.router.workers import WorkerInfo
from kvgrid.server.auth import ControlKey
from kvgrid.server.frontend import Frontend, FrontendConfig, create_frontend_app
from kvgrid.server.links import FleetLink
from kvgrid.server.publisher import EventPublisher
from kvgrid.server.tenants import FairScheduler, TenantRegistry


def _frontend(workers=(), api_keys=None, key=None) -> Frontend:
    router = Router("round_robin", heartbeat_timeout_s=30.0)
    for info in workers:
        router.add_worker(info, time.monotonic())
    tenants = TenantRegistry(api_keys, b"secret" if api_keys else None)
    cfg = FrontendConfig(model_name="m")
    return Frontend(router, FleetLink(router, [], key), tenants, FairScheduler(8), cfg)


class _Resetter(threading.Thread):
    """A TCP server whose every connection reads the request, then resets (RST): a worker
    that crashes as the request arrives."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0

    def run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.recv(65536)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()


async def test_a_worker_connection_reset_releases_the_tenant_slots():
    srv = _Resetter()
    srv.start()
    info = WorkerInfo("w0", f"http://127.0.0.1:{srv.port}", "e0", "m", events=False)
    fe = _frontend([info], {"sk-a": {"tenant": "a", "max_concurrent": 1}})
    await fe.link.start()
    app = create_frontend_app(fe)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fe") as c:
            for i in range(4):  # one slot for the tenant: a leaked slot blocks the next one
                fe.router.add_worker(info, time.monotonic())  # the worker came back, crashes
                body = {"prompt": [1, 2, 3, 4], "max_tokens": 2, "stream": bool(i % 2)}
                r = await asyncio.wait_for(
                    c.post("/v1/completions", json=body, headers={"authorization": "Bearer sk-a"}),
                    10,
                )
                assert r.status_code in (502, 503), r.text
                assert "worker" in r.json()["error"]["message"]
                assert fe.scheduler.running == 0 and fe.scheduler.running_of("a") == 0
                assert not fe.router.workers["w0"].up  # the reset marked it down
        assert srv.accepted == 4
    finally:
        await fe.link.stop()
        srv.sock.close()


async def test_bad_event_messages_are_counted_logged_and_skipped(caplog):
    cluster = ControlKey.generate()
    pub = EventPublisher("127.0.0.1", 0, "ep1", cluster.for_worker("w1"), "w1")
    router = Router()
    link = FleetLink(router, [], cluster)
    await link.start()
    try:
        info = WorkerInfo("w1", "http://127.0.0.1:1", "ep1", "default")
        router.add_worker(info, time.monotonic())
        router.on_snapshot("w1", 0, {}, time.monotonic(), "ep1")
        link.add_url(info.url)
        link._subscribe(link.known[info.url], "w1", f"tcp://127.0.0.1:{pub.port}")
        good = EventBatch("w1", 1, 0.0, [BlockStored((b"g" * 32,), None, "G1", 64)])

        def raw_batch(*fields) -> bytes:
            import msgpack

            return msgpack.packb(list(fields), use_bin_type=True)

        bad = [
            [wire.TOPIC_KV, raw_batch("w1", "ep1", 1, 0.0, [[0, [b"x" * 32], None, "G9", 64]])],
            [wire.TOPIC_KV, raw_batch("w1", "ep1", "one", 0.0, [])],
            [wire.TOPIC_KV, raw_batch("w1", "ep1", 1, 0.0, [[0, "nope", None, "G1", 64]])],
            [wire.TOPIC_KV, b"\xc1 not msgpack"],
            [wire.TOPIC_KV, wire.encode_batch(EventBatch("w2", 1, 0.0, []), "ep1")],
            [wire.TOPIC_LOAD, wire.encode_load({"worker_id": "w1", "kv_usage": "lots"})],
            [wire.TOPIC_KV, b"a", b"third frame"],
        ]
        caplog.set_level(logging.WARNING, "kvgrid.server.links")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not router.index.num_blocks("w1"):
            for frames in bad:
                pub.sock.send_multipart(frames)
            pub.publish_events(good)
            await asyncio.sleep(0.1)
        # the stream survived every bad message and applied the good batch after them
        assert router.index.num_blocks("w1") == 1
        assert router.workers["w1"].up and not router.index.is_stale("w1")
        assert link.bad_messages["malformed"] >= len(bad), link.bad_messages
        assert any("dropped a bad message from worker w1" in r.message for r in caplog.records)
        text = __import__("prometheus_client").generate_latest(_fe_metrics(link)).decode()
        assert 'kvgrid:router_bad_messages_total{reason="malformed"}' in text
    finally:
        await link.stop()
        pub.close()


def _fe_metrics(link: FleetLink):
    from kvgrid.server.metrics import FrontendMetrics

    return FrontendMetrics(link.router, "m", link).registry


def test_heartbeats_continue_through_a_long_engine_step(tiny_model_dir):
    """On a CPU one prefill step can outlast the router's heartbeat timeout; the worker is
    busy, not dead, and must keep saying so."""
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.server.engine_loop import EngineLoop

    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=64)
    inner, in_step = engine.step, threading.Event()

    def long_step():
        if not in_step.is_set():
            in_step.set()
            time.sleep(3.0)
        return inner()

    engine.step = long_step
    beats: list[float] = []
    loop = EngineLoop(engine, "w0", "ep", None, lambda r: beats.append(time.monotonic()), 0.25)
    loop.start()
    try:
        asyncio.run(
            loop.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2), b"", lambda o: None)
        )
        assert in_step.wait(10)
        t0 = time.monotonic()
        time.sleep(2.5)  # inside the long step
        during = [b for b in beats if b > t0]
        assert len(during) >= 6, during  # every 0.25 s, step or no step
    finally:
        loop.stop()
    assert loop.failed is None


async def test_admin_scale_out_of_range_is_a_400():
    from kvgrid.planner.planner import PlannerConfig
    from kvgrid.server.autoscale import Autoscaler, LiveActuator
    from kvgrid.server.serve import ProcessLauncher, Supervisor

    fe = _frontend()
    launcher = ProcessLauncher(SimpleNamespace(), fe, Supervisor([]), 1, None)
    act = LiveActuator(fe, launcher, max_workers=2)
    fe.autoscaler = Autoscaler(act, PlannerConfig(), enabled=False)
    transport = httpx.ASGITransport(app=create_frontend_app(fe))
    async with httpx.AsyncClient(transport=transport, base_url="http://fe") as c:
        for body in ({"workers": 99}, {"workers": 0}, {"workers": -1}, {"workers": True},
                     {"workers": "2"}, {"workers": 1.5}, {"workers": 1, "drain": "w0"}, [],
                     {"drain": 3}, {}):  # fmt: skip
            r = await c.post("/admin/scale", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["message"], body
        r = await c.post("/admin/scale", json={"drain": "w7"})
        assert r.status_code == 404
        r = await c.post("/admin/scale", content=b"{nope")
        assert r.status_code == 400
        assert (await c.get("/admin/scale")).status_code == 200
    assert not act.replicas  # nothing was started by any of it


def test_a_worker_advertises_addresses_other_hosts_reach(tiny_model_dir, monkeypatch):
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.server.worker import Worker, worker_identity

    args = SimpleNamespace(
        host="0.0.0.0", port=9001, worker_id=None, advertise_url=None, control_key_file=None
    )
    monkeypatch.delenv("KVGRID_CONTROL_KEY", raising=False)
    monkeypatch.delenv("KVGRID_CONTROL_KEY_FILE", raising=False)
    with pytest.raises(ValueError, match="needs a control key"):
        worker_identity(args)
    monkeypatch.setenv("KVGRID_CONTROL_KEY", ControlKey.generate().dumps())
    with pytest.raises(ValueError, match="--advertise-url"):
        worker_identity(args)
    args.advertise_url = "http://10.11.12.13:9001"
    assert worker_identity(args)[0] == "0.0.0.0:9001"
    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=64)
    w = Worker(engine, "w1", "http://10.11.12.13:9001", "m", pub_host="0.0.0.0")
    try:
        d = w.info_dict()
        assert d["events_endpoint"] == f"tcp://10.11.12.13:{w.publisher.port}"
        assert d["url"] == "http://10.11.12.13:9001"
    finally:
        w.publisher.close()
    with pytest.raises(ValueError, match="reach"):
        Worker(engine, "w1", "http://0.0.0.0:9001", "m", pub_host="0.0.0.0")
    engine.close()


def test_commands_refuse_an_open_control_plane(tmp_path, monkeypatch, capsys):
    from kvgrid.cli import main

    for var in ("KVGRID_CONTROL_KEY", "KVGRID_CONTROL_KEY_FILE", "KVGRID_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    key = tmp_path / "cluster.key"

    def refused(*argv: str) -> str:
        # a model that does not exist: a command that failed to refuse stops there at once
        # (with another message) instead of serving
        assert main([*argv, "--model", str(tmp_path / "no-model")]) == 2
        return capsys.readouterr().err

    assert "needs a control key" in refused(
        "worker", "--host", "0.0.0.0", "--advertise-url", "http://10.0.0.1:9"
    )
    assert "needs a control key" in refused("router", "--host", "0.0.0.0")
    assert main(["control-key", "new", "--out", str(key)]) == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert main(["control-key", "new", "--out", str(key)]) == 2
    assert "exists" in capsys.readouterr().err
    w1 = tmp_path / "w1.key"
    assert main(["control-key", "worker", "w1", "--cluster", str(key), "--out", str(w1)]) == 0
    cluster = ControlKey.loads(key.read_text())
    assert ControlKey.loads(w1.read_text()) == cluster.for_worker("w1")
    assert "--allow-anonymous" in refused(
        "router", "--host", "0.0.0.0", "--control-key-file", str(key)
    )
    # a worker key names its worker: it cannot serve as another, nor run a router
    assert "belongs to worker 'w1'" in refused(
        "worker", "--worker-id", "w2", "--control-key-file", str(w1)
    )
    assert "cluster control key" in refused("router", "--control-key-file", str(w1))


def test_shared_prefix_tenants_share_the_prefix_and_nothing_else(tiny_model_dir):
    """Two tenants allowed to share prefixes get each other's blocks of the configured
    prefix, never of what follows it; the router predicts exactly what the engine reuses."""
    from kvgrid.engine.llm_engine import LLMEngine

    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=128)
    reg = TenantRegistry({"sk-a": "a", "sk-b": "b", "sk-c": "c"}, b"secret", frozenset({"a", "b"}))
    a, b, c = (reg.authenticate(f"Bearer sk-{x}") for x in "abc")
    fe = _frontend()
    prefix = list(range(100, 140))  # 40 tokens: blocks 0 and 1 lie wholly inside it
    fe.shared_prefixes = [prefix]
    secret = list(range(500, 548))
    prompt = prefix + secret

    def run(rid: str, tenant, tokens) -> int:
        shared = fe.shared_prefix_tokens(tenant, tokens)
        engine.add_request(rid, tokens, SamplingParams(max_tokens=1), tenant.scope, shared)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return out.num_cached_tokens
        raise AssertionError("no output")

    assert fe.shared_prefix_tokens(a, prompt) == 40 and fe.shared_prefix_tokens(c, prompt) == 0
    assert fe.shared_prefix_tokens(a, prefix[:30] + [7] * 20) == 30  # only what it has of it
    assert run("a1", a, prompt) == 0
    assert run("a2", a, prompt) == 80  # its own blocks, prefix and secret
    assert run("b1", b, prompt) == 32  # the prefix's two whole blocks, not a's secret
    assert run("c1", c, prompt) == 0  # not a sharing tenant: nothing of anyone's
    # the router's keys are the engine's keys
    router_keys = keys.block_keys_shared(
        prompt, engine.scope.with_tenant(b.scope).digest, 16, 40,
        engine.scope.with_tenant(keys.PUBLIC_TENANT).digest,
    )  # fmt: skip
    assert engine.block_manager.match_prefix(router_keys[:5]) and len(router_keys) == 5
    engine.close()


def test_server_secret_location_is_logged_and_created_once(tmp_path, monkeypatch, caplog):
    from kvgrid.server.tenants import load_server_secret, scope_id

    monkeypatch.delenv("KVGRID_SERVER_SECRET", raising=False)
    monkeypatch.setenv("KVGRID_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, "kvgrid.server.tenants")
    got: list = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        got.append(load_server_secret())

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({s for s, _ in got}) == 1 and len(got) == 6
    path = str(tmp_path / "server_secret")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and path in warned[0].getMessage()
    assert "KVGRID_SERVER_SECRET" in warned[0].getMessage()
    monkeypatch.setenv("KVGRID_SERVER_SECRET", "shared")
    assert load_server_secret() == (b"shared", "KVGRID_SERVER_SECRET")
    assert scope_id(b"shared") == scope_id(b"shared") != scope_id(got[0][0])


def test_registration_refuses_outsiders_and_impostors():
    """/internal/workers: no token, a bad one, or one worker's token naming another."""
    cluster = ControlKey.generate()
    fe = _frontend(key=cluster)

    async def go():
        await fe.link.start()
        try:
            transport = httpx.ASGITransport(app=create_frontend_app(fe))
            async with httpx.AsyncClient(transport=transport, base_url="http://fe") as c:
                body = {"url": "http://127.0.0.1:1", "worker_id": "w1"}
                assert (await c.post("/internal/workers", json=body)).status_code == 401
                h = {"authorization": "Bearer kvw1.w1." + "0" * 64}
                assert (await c.post("/internal/workers", json=body, headers=h)).status_code == 401
                h = cluster.for_worker("w2").worker_headers("w2")
                r = await c.post("/internal/workers", json=body, headers=h)
                assert r.status_code == 403 and "w2" in r.json()["error"]["message"]
                # its own id, but nothing answers at that URL as w2: not registered
                r = await c.post("/internal/workers", json={**body, "worker_id": "w2"}, headers=h)
                assert r.status_code == 200 and r.json() == {"registered": False}
                assert not fe.router.workers
        finally:
            await fe.link.stop()

    asyncio.run(go())


async def test_a_worker_takes_tenant_scopes_from_one_server_secret_only(tiny_model_dir):
    """Two routers with different server secrets would give one tenant two scopes on a
    worker: the worker serves the first one's, refuses the other's, and routers check."""
    from kvgrid.engine.llm_engine import LLMEngine
    from kvgrid.server.links import Refused
    from kvgrid.server.tenants import scope_id
    from kvgrid.server.worker import Worker, create_worker_app

    cluster = ControlKey.generate()
    engine = LLMEngine(model=str(tiny_model_dir("llama")), block_size=16, num_kv_blocks=64)
    worker = Worker(engine, "w1", "http://127.0.0.1:9", "m", key=cluster)
    worker.loop.start()
    h = cluster.router_headers("w1")
    try:
        transport = httpx.ASGITransport(app=create_worker_app(worker))
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as c:

            def gen(rid: str, secret: bytes) -> dict:
                return {"request_id": rid, "prompt_token_ids": [5, 6, 7], "tenant": "ab" * 32,
                        "params": {"max_tokens": 1}, "scope_id": scope_id(secret)}  # fmt: skip

            r = await c.post("/generate", json=gen("r1", b"one"), headers=h)
            assert r.status_code == 200 and "finish_reason" in r.text
            r = await c.post("/generate", json=gen("r2", b"two"), headers=h)
            assert r.status_code == 409 and "KVGRID_SERVER_SECRET" in r.json()["error"]
            r = await c.post("/generate", json=gen("r3", b"one"), headers=h)
            assert r.status_code == 200
            assert (await c.post("/generate", json=gen("r4", b"one"))).status_code == 401
            info = (await c.get("/info", headers={**h, "x-kvgrid-nonce": "n"})).json()
        assert info["scope_id"] == scope_id(b"one") and cluster.check_info_proof(
            "w1", "n", info["proof"]
        )
        # a router with the other secret refuses the worker when it (re)registers
        link = FleetLink(Router(), [], cluster, scope_id(b"two"))
        with pytest.raises(Refused, match="another server secret"):
            link._check("http://127.0.0.1:9", info, "n", None)
        FleetLink(Router(), [], cluster, scope_id(b"one"))._check(
            "http://127.0.0.1:9", info, "n", None
        )
    finally:
        worker.loop.stop()
        worker.publisher.close()
        engine.close()
