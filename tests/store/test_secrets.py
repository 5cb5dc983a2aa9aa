"""Secrets of the store's shared tier and of the workers `kvgrid serve` starts: one master key
per shared tier (a clear refusal otherwise), Redis credentials that never reach a log or a
command line, and store failures that are counted and logged rather than silent misses."""

from __future__ import annotations

import logging
import secrets

import pytest

from kvgrid.store.config import StoreConfig
from kvgrid.store.crypto import MasterKeyError, generate_key_file
from kvgrid.store.store import ContextStore


def _store(tmp_path, key_file, **g4) -> ContextStore:
    cfg = StoreConfig(g2_bytes=0, master_key_file=key_file, sweep_interval_s=0, **g4)
    return ContextStore(cfg)


@pytest.mark.parametrize("backend", ["fs", "redis"])
def test_a_shared_tier_refuses_a_server_with_another_master_key(tmp_path, backend, request):
    if backend == "fs":
        g4 = {"g4_dir": tmp_path / "shared"}
    else:
        url = request.getfixturevalue("redis_server")
        g4 = {"g4_redis": url, "g4_prefix": f"kvgrid-test-{secrets.token_hex(4)}:"}
    k1, k2 = generate_key_file(tmp_path / "k1"), generate_key_file(tmp_path / "k2")
    first = _store(tmp_path, k1, **g4)
    first.close()
    with pytest.raises(MasterKeyError, match="same master key") as e:
        _store(tmp_path, k2, **g4)
    assert "key id 1" in str(e.value) and "G4" in str(e.value)
    again = _store(tmp_path, k1, **g4)  # the same key is welcome back
    again.close()


def test_redis_auth_and_no_password_in_logs(redis_factory, caplog, monkeypatch):
    from kvgrid.store.redis_tier import RedisTier, redact_url

    password = "pw-" + secrets.token_hex(8)
    _, url = redis_factory("--requirepass", password)
    host = url.removeprefix("redis://")
    caplog.set_level(logging.INFO, "kvgrid.store")
    tier = RedisTier(f"redis://:{password}@{host}", 1 << 20, prefix="t:", retry_s=0.0)
    assert tier.up and tier.put(b"t" * 8, b"k" * 32, b"blob").stored
    assert tier.get(b"t" * 8, b"k" * 32) == b"blob"
    assert password not in tier.url and "***" in tier.url
    tier.close()
    for wrong in (f"redis://{host}", f"redis://:nope-{password}x@{host}"):
        t = RedisTier(wrong, 1 << 20, prefix="t:", retry_s=60.0)
        assert not t.up  # refused by AUTH: down, its reads are misses
        t.close()
    monkeypatch.setenv("KVGRID_REDIS_PASSWORD", password)
    t = RedisTier(f"redis://{host}", 1 << 20, prefix="t:")
    assert t.up and t.get(b"t" * 8, b"k" * 32) == b"blob"
    t.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "unreachable" in logged and password not in logged
    assert redact_url("rediss://u:p@h:1/0") == "rediss://u:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_serve_keeps_secrets_off_worker_command_lines(monkeypatch):
    from kvgrid.cli import build_parser
    from kvgrid.engine.args import store_config_from_args
    from kvgrid.server.auth import ControlKey
    from kvgrid.server.serve import worker_argv, worker_env

    url = "redis://:hunter2-secret@cache:6379/0"
    args = build_parser().parse_args(["serve", "--kv-store-redis", url])
    cluster = ControlKey.generate()
    argv = worker_argv(args, "w0", 8100, 1)
    env = worker_env(args, "w0", cluster)
    assert not [a for a in argv if "hunter2" in a] and "--kv-store-redis" not in argv
    assert env["KVGRID_KV_STORE_REDIS"] == url
    # the worker gets its own key, never the cluster key
    assert ControlKey.loads(env["KVGRID_CONTROL_KEY"]) == cluster.for_worker("w0")
    assert cluster.key.hex() not in " ".join([*argv, *env.values()])
    # and the worker finds the URL there
    wargs = build_parser().parse_args(["worker", *argv[argv.index("worker") + 1 :]])
    monkeypatch.setenv("KVGRID_KV_STORE_REDIS", url)
    cfg = store_config_from_args(wargs, "w0")
    assert cfg.g4_redis == url and "hunter2" not in repr(cfg)


def test_store_lookup_errors_are_counted_and_logged(tmp_path, caplog):
    # a shared directory (G4) is looked up on the filesystem (G3, its owner's alone, from
    # memory: its faults show on reads and writes)
    store = _store(tmp_path, generate_key_file(tmp_path / "k"), g4_dir=tmp_path / "g4")
    try:
        caplog.set_level(logging.ERROR, "kvgrid.store")
        objects = tmp_path / "g4" / "objects"
        objects.rename(tmp_path / "gone")
        objects.write_text("a disk that broke: the object tree is not a directory any more")
        keys = [secrets.token_bytes(32) for _ in range(3)]
        assert store.contains(keys, b"") == [None, None, None]  # a miss for the engine...
        assert store.metrics.total("errors", tier="G4", op="lookup") == 1  # ...but counted
        assert any("G4 lookup failed" in r.getMessage() for r in caplog.records)
        text = __import__("prometheus_client").generate_latest(store.metrics.registry).decode()
        assert 'kvgrid_store_errors_total{op="lookup",tier="G4"} 1.0' in text
    finally:
        store.close()
