"""kvgrid on Ray without a cluster: worker resources, sites as labelled node groups, the
secrets handed to actors, and `kvgrid serve` staying free of Ray when --ray is not given.
The cluster itself is tested in tests/server/test_ray.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvgrid.router.sites import SITE_LABEL, Site, parse_site
from kvgrid.server.ray.placement import (
    WorkerResources,
    check_sites,
    choose_site,
    site_capacity,
    worker_resources,
)
from kvgrid.server.ray.secrets import ClusterSecrets


def node(site: str | None, cpus: float = 0, gpus: float = 0, alive: bool = True, **labels):
    """One entry of ``ray.nodes()``, as Ray returns it."""
    res = {"CPU": cpus, "memory": 1e9, "object_store_memory": 1e8}
    if gpus:
        res["GPU"] = gpus
    lab = {"ray.io/node-id": "x", **labels}
    if site is not None:
        lab[SITE_LABEL] = site
    return {"Alive": alive, "Resources": res, "Labels": lab, "NodeManagerAddress": "10.0.0.1"}


def test_one_gpu_per_worker_on_gpus_a_cpu_share_elsewhere():
    assert worker_resources("auto", 8, 2.0) == WorkerResources(1.0, 1.0)
    assert worker_resources("cuda", 8, 2.0).num_gpus == 1.0
    assert worker_resources("auto", 0, 2.0) == WorkerResources(0.0, 2.0)
    assert worker_resources("cpu", 8, 3.0) == WorkerResources(0.0, 3.0)
    with pytest.raises(ValueError, match="no GPU"):
        worker_resources("cuda", 0, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        worker_resources("cpu", 0, 0.0)
    opts = WorkerResources(1.0, 1.0, {"h200": 1.0}, {"zone": "z1"}).actor_options(Site("east"))
    assert opts == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "resources": {"h200": 1.0},
        "label_selector": {"zone": "z1", SITE_LABEL: "east"},
    }
    assert "label_selector" not in WorkerResources().actor_options(None)


def test_site_capacity_counts_live_labelled_nodes():
    sites = [Site("east"), Site("west"), Site("empty")]
    nodes = [
        node("east", cpus=8, gpus=4),
        node("east", cpus=8, gpus=2),
        node("west", cpus=8, gpus=8, alive=False),  # dead: holds nothing
        node("west", cpus=2, gpus=8),  # 8 GPUs, but a GPU worker needs a core too
        node(None, cpus=64, gpus=8),  # no site label: in no site
    ]
    gpu = WorkerResources(1.0, 1.0)
    assert site_capacity(nodes, sites, gpu) == {"east": 6, "west": 2, "empty": 0}
    cpu = WorkerResources(0.0, 3.0)
    assert site_capacity(nodes, sites, cpu) == {"east": 4, "west": 0, "empty": 0}
    zoned = WorkerResources(1.0, 1.0, labels={"zone": "z1"})
    assert (
        site_capacity([node("east", 8, 4, zone="z1"), node("east", 8, 4)], sites, zoned)["east"]
        == 4
    )
    assert check_sites(sites, nodes) == [
        f"site 'empty': no live Ray node has the label {SITE_LABEL}=empty"
    ]


def test_new_workers_go_to_the_cheapest_site_with_room():
    sites = [Site("dear", cost_per_gpu_hour=4.0), Site("cheap", cost_per_gpu_hour=1.0)]
    cap = {"dear": 2, "cheap": 1}
    assert choose_site(sites, cap, {}).name == "cheap"
    assert choose_site(sites, cap, {"cheap": 1}).name == "dear"
    # nowhere with room: the cheapest, where the worker waits for a node (Ray's autoscaler)
    assert choose_site(sites, cap, {"cheap": 1, "dear": 2}).name == "cheap"
    # equal prices: the site with more room
    even = [Site("a", cost_per_gpu_hour=1.0), Site("b", cost_per_gpu_hour=1.0)]
    assert choose_site(even, {"a": 1, "b": 3}, {}).name == "b"


def test_parse_site():
    assert parse_site("east:20:2.5") == Site("east", 0.02, 2.5, 1.0)
    assert parse_site("west:0:1:0.25").share == 0.25
    for bad in ("east", "east:x:1", ":1:1", "east:-1:1", "a:1:1:0"):
        with pytest.raises(ValueError, match="site"):
            parse_site(bad)


def _serve_args(*flags: str):
    from kvgrid.cli import build_parser

    return build_parser().parse_args(["serve", *flags])


def test_secrets_cross_once_each_actor_its_part_and_never_show(monkeypatch, tmp_path):
    from kvgrid.server.auth import ControlKey, CredentialError
    from kvgrid.server.ray.secrets import actor_config, apply

    for var in (
        "KVGRID_CONTROL_KEY",
        "KVGRID_CONTROL_KEY_FILE",
        "KVGRID_MASTER_KEY",
        "KVGRID_SERVER_SECRET",
        "KVGRID_KV_STORE_REDIS",
        "KVGRID_REDIS_PASSWORD",
    ):
        monkeypatch.delenv(var, raising=False)  # fmt: skip
    monkeypatch.setenv("KVGRID_API_KEYS", '{"keys": {"sk-a": "a"}}')
    monkeypatch.setenv("KVGRID_ADMIN_TOKEN", "admin-token-value")
    monkeypatch.setenv("KVGRID_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("KVGRID_HOME", str(tmp_path / "home"))
    redis = "redis://u:redis-password-value@10.0.0.9:6379/0"
    args = _serve_args("--kv-store-redis", redis)
    s = ClusterSecrets.from_driver(args)
    # a cluster key is made when the operator set none: workers bind non-loopback addresses
    assert s.control_key.is_cluster
    # each worker gets its own key only: it proves, signs and encrypts as that worker alone
    w0, w1 = s.worker("w0"), s.worker("w1")
    assert w0.key == s.control_key.for_worker("w0") and w0.key.worker_id == "w0"
    assert w0.key.key != s.control_key.key and w0.key.key != w1.key.key
    with pytest.raises(CredentialError):
        w0.key.for_worker("w1")
    assert w0.key.router_token("w0") == s.control_key.router_token("w0")
    # every worker gets the driver's key ring (the one a shared tier needs), not its own
    ring = (tmp_path / "store" / "master.key").read_text().strip()
    assert w0.env["KVGRID_MASTER_KEY"] == w1.env["KVGRID_MASTER_KEY"] == ring
    # the Redis URL crosses as the worker's environment, never as a flag
    assert w0.env["KVGRID_KV_STORE_REDIS"] == redis
    config = actor_config(args)
    assert config["kv_store_redis"] is None and "func" not in config
    assert redis not in repr(config)
    # one server secret for every frontend of the deployment (the driver host's file here)
    fe = s.frontend()
    secret = (tmp_path / "home" / "server_secret").read_text().strip()
    assert fe["KVGRID_SERVER_SECRET"] == secret
    assert fe["KVGRID_API_KEYS"] and fe["KVGRID_ADMIN_TOKEN"] == "admin-token-value"
    for frontend_only in ("KVGRID_SERVER_SECRET", "KVGRID_API_KEYS", "KVGRID_ADMIN_TOKEN"):
        assert frontend_only not in w0.env
    assert not {"KVGRID_MASTER_KEY", "KVGRID_KV_STORE_REDIS"} & set(fe)
    assert not any(v.startswith("kvgrid-") for v in [*fe.values(), *w0.env.values()])
    # no secret in a repr (log lines, tracebacks, Ray's error messages)
    shown = repr(s) + repr(w0) + repr(w0.key) + repr(s.control_key)
    for value in (s.control_key.key.hex(), w0.key.key.hex(), ring, secret, redis,
                  "redis-password-value", "admin-token-value"):  # fmt: skip
        assert value not in shown
    assert "w0" in repr(w0)
    # the operator's cluster key is used as given; a worker's key is refused
    mine = ControlKey.generate()
    monkeypatch.setenv("KVGRID_CONTROL_KEY", mine.dumps())
    assert ClusterSecrets.from_driver(_serve_args("--no-kv-store")).control_key == mine
    monkeypatch.setenv("KVGRID_CONTROL_KEY", mine.for_worker("w0").dumps())
    with pytest.raises(CredentialError, match="cluster control key"):
        ClusterSecrets.from_driver(_serve_args("--no-kv-store"))
    # an actor's environment holds its part only, whatever its process inherited
    monkeypatch.setenv("KVGRID_SERVER_SECRET", "inherited")
    monkeypatch.setattr(os, "environ", os.environ.copy())  # apply's changes end with the test
    apply(w0.env)
    assert "KVGRID_CONTROL_KEY" not in os.environ and "KVGRID_SERVER_SECRET" not in os.environ
    assert os.environ["KVGRID_MASTER_KEY"] == ring


def test_the_driver_and_the_frontend_actor_start_without_torch():
    """Neither loads an engine: importing torch would only delay the deployment's start (by
    seconds on a small machine), the driver's key-ring read included."""
    probe = (
        "import sys, kvgrid.server.ray.actors, kvgrid.server.ray.fleet, "
        "kvgrid.server.ray.frontend_actor, kvgrid.server.ray.serve; "
        "from kvgrid.store.crypto import load_keyring; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_serve_without_ray_never_imports_it():
    code = (
        "import sys; from kvgrid.cli import build_parser; "
        "a = build_parser().parse_args(['serve', '--workers', '2']); "
        "import kvgrid.server.serve, kvgrid.server.autoscale, kvgrid.server.frontend; "
        "assert a.ray is None; print('ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ
    )
    assert out.stdout.strip() == "False", out.stderr


def test_ray_flag_without_ray_installed_is_a_clear_error(monkeypatch, capsys):
    from kvgrid.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--ray"]) == 2
    assert "pip install 'kvgrid[ray]'" in capsys.readouterr().err


def test_site_without_ray_is_a_clear_error(capsys):
    from kvgrid.cli import main

    assert main(["serve", "--site", "a:0:1"]) == 2
    assert "--site places workers on a Ray cluster" in capsys.readouterr().err
