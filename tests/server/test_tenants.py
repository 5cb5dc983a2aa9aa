"""Tenants: API keys to tenants, server-derived scopes, fair admission between tenants."""

import asyncio
import json

import pytest

from kvgrid import keys
from kvgrid.server.tenants import FairScheduler, QueueFull, Tenant, TenantRegistry


def test_keys_file_env_and_scopes(tmp_path, monkeypatch):
    f = tmp_path / "keys.json"
    f.write_text(
        json.dumps(
            {
                "keys": {
                    "sk-a": {"tenant": "acme", "max_concurrent": 2},
                    "sk-a2": "acme",
                    "sk-b": "beta",
                    "sk-p": "pub",
                },
                "shared_prefix_tenants": ["pub"],
            }
        )
    )
    reg = TenantRegistry.from_config(f, b"secret")
    a = reg.authenticate("Bearer sk-a")
    assert a.name == "acme" and a.max_concurrent == 2
    assert reg.authenticate("Bearer sk-a2") is a  # two keys, one tenant
    b = reg.authenticate("bearer sk-b")
    # scopes come from the server secret and differ per tenant; a tenant that may share
    # prefixes keeps its own scope (only the configured prefixes are keyed publicly)
    assert a.scope == keys.tenant_scope(b"secret", "acme") != b.scope
    p = reg.authenticate("Bearer sk-p")
    assert p.scope == keys.tenant_scope(b"secret", "pub") and p.shares_prefixes
    assert not a.shares_prefixes
    assert reg.authenticate("Bearer nope") is None
    assert reg.authenticate(None) is None and reg.authenticate("sk-a") is None
    # another secret, other scopes: nothing a client sends can choose them
    assert TenantRegistry.from_config(f, b"other").authenticate("Bearer sk-a").scope != a.scope

    monkeypatch.setenv("KVGRID_API_KEYS", "k1=t1, k2=t2")
    reg = TenantRegistry.from_config(None, b"s")
    assert reg.authenticate("Bearer k2").name == "t2"
    monkeypatch.setenv("KVGRID_API_KEYS", "garbage")
    with pytest.raises(ValueError, match="KVGRID_API_KEYS"):
        TenantRegistry.from_config(None, b"s")
    toml = tmp_path / "keys.toml"
    toml.write_text('[keys]\n"sk-t" = "tom"\n')
    assert TenantRegistry.from_config(toml, b"s").authenticate("Bearer sk-t").name == "tom"


def test_no_keys_means_one_local_public_tenant(monkeypatch):
    monkeypatch.delenv("KVGRID_API_KEYS", raising=False)
    reg = TenantRegistry.from_config(None, None)
    t = reg.authenticate(None)
    assert not reg.auth_required and t.name == "local" and t.scope == keys.PUBLIC_TENANT
    # alone on the server, the local tenant may fill it: no per-tenant cap below the server's
    reg = TenantRegistry.from_config(None, None, local_max_concurrent=256)
    assert reg.authenticate(None).max_concurrent == 256
    assert TenantRegistry.from_config(None, None).authenticate(None).max_concurrent == 32


async def test_noisy_tenant_cannot_starve_quiet_one():
    sched = FairScheduler(max_concurrent=2)
    noisy, quiet = Tenant("noisy", b"n", 100, 1000), Tenant("quiet", b"q", 100, 1000)
    order: list[str] = []

    async def job(t: Tenant, i: int):
        await sched.acquire(t)
        order.append(f"{t.name}{i}")
        await asyncio.sleep(0.01)
        sched.release(t.name)

    tasks = [asyncio.create_task(job(noisy, i)) for i in range(30)]
    await asyncio.sleep(0)  # the noisy tenant's 30 requests are queued first
    tasks.append(asyncio.create_task(job(quiet, 0)))
    await asyncio.gather(*tasks)
    # the quiet request is admitted within the first slots that free up, not after 30
    assert order.index("quiet0") <= 3, order
    assert sched.running == 0 and sched.waiting() == 0


async def test_per_tenant_limit_and_queue_bound():
    sched = FairScheduler(max_concurrent=10)
    t = Tenant("t", b"t", max_concurrent=1, max_queued=1)
    other = Tenant("o", b"o", 5, 5)
    await sched.acquire(t)
    waiter = asyncio.create_task(sched.acquire(t))
    await asyncio.sleep(0)
    assert not waiter.done() and sched.waiting("t") == 1  # over its own limit: waits
    with pytest.raises(QueueFull):
        await sched.acquire(t)
    await asyncio.wait_for(sched.acquire(other), 1)  # other tenants are not blocked by t
    sched.release("t")
    await asyncio.wait_for(waiter, 1)
    assert sched.running_of("t") == 1
    # a cancelled waiter leaves no trace
    w2 = asyncio.create_task(sched.acquire(t))
    await asyncio.sleep(0)
    w2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w2
    assert sched.waiting("t") == 0


def test_a_server_without_keys_admits_up_to_its_own_cap(tiny_model_dir, monkeypatch):
    """With no API key the one local tenant is alone: a per-tenant cap below the server's
    (32, the default for keyed tenants) would cap every benchmark of a busy server."""
    from kvgrid.server.frontend import build_frontend

    monkeypatch.delenv("KVGRID_API_KEYS", raising=False)
    fe = build_frontend(str(tiny_model_dir("llama")), max_concurrent=200)
    assert fe.tenants.authenticate(None).max_concurrent == 200
