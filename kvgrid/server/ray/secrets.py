"""What crosses from the `kvgrid serve --ray` driver to the actors it starts, in one place.

Actors on other nodes do not inherit the driver's environment, and files named on its command
line are on its node only. So the driver reads, once, what the deployment shares: the cluster
control key (kvgrid.server.auth; the operator's, or one made for the deployment), the server
secret tenant scopes derive from (one for every router the deployment ever runs, a frontend
restarted by Ray included), the context store's master key ring (one for every worker, so
that a shared tier decrypts everywhere), the Redis URL and password, and what the frontend
reads from the operator's environment (API keys, admin token).

Each actor gets exactly its part as a constructor argument, never on a command line and never
in a runtime_env (which Ray lists to whoever can read the cluster's state): the frontend
actor the cluster key and the frontend's variables; a worker actor only its own worker key
``K_w`` (it can speak as that worker only) and the store's secrets. Neither ``repr`` shows a
secret, so none reaches a log line or a traceback.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from kvgrid import envs
from kvgrid.server.auth import ControlKey, CredentialError, load_control_key
from kvgrid.server.serve import SECRET_FLAGS
from kvgrid.server.tenants import load_server_secret

# read by the frontend (tenants, admin endpoints) from its environment
FRONTEND_ENV = (envs.KVGRID_API_KEYS.name, envs.KVGRID_ADMIN_TOKEN.name)
SHARED_ENV = (envs.KVGRID_LOG.name,)
# flags that name files on the driver's node only, or hold secrets: never sent as flags
_DRIVER_ONLY = ("control_key_file", "kv_master_key_file", *SECRET_FLAGS)
# every variable that may hold a secret: an actor's environment has only those of its part
_SECRET_ENV = tuple(name for name, var in envs.ALL.items() if var.secret)


@dataclass(frozen=True, repr=False)
class WorkerSecrets:
    """One worker actor's part: its own key and the store's secrets (as its environment)."""

    key: ControlKey  # K_w of this worker only
    env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"WorkerSecrets(worker_id={self.key.worker_id!r}, <redacted>)"


@dataclass(frozen=True, repr=False)
class ClusterSecrets:
    control_key: ControlKey  # the cluster key: the frontend's; workers get derivations
    server_secret: str | None = None  # with tenants: the secret their scopes derive from
    master_key: str | None = None  # the store's key ring, "ID:HEX[,ID:HEX...]"
    store_env: dict[str, str] = field(default_factory=dict)  # Redis URL and password
    frontend_env: dict[str, str] = field(default_factory=dict)
    shared_env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never in a log line or a traceback
        return "ClusterSecrets(<redacted>)"

    @classmethod
    def from_driver(cls, args: argparse.Namespace) -> ClusterSecrets:
        """The driver's, from `kvgrid serve`'s flags and its environment. The control key
        is the configured one, else a fresh one for this deployment (workers bind addresses
        other hosts reach, so the control plane is never open); CredentialError for a key
        that is not a cluster key."""
        key = load_control_key(getattr(args, "control_key_file", None)) or ControlKey.generate()
        if not key.is_cluster:
            raise CredentialError(
                f"kvgrid serve --ray needs the cluster control key, not worker "
                f"{key.worker_id!r}'s: it gives each worker its own"
            )
        pick = lambda names: {k: os.environ[k] for k in names if os.environ.get(k)}
        secret = None
        if getattr(args, "api_keys", None) or envs.KVGRID_API_KEYS.is_set():
            secret = load_server_secret()[0].decode()
        ring = None
        if not getattr(args, "no_kv_store", False):
            from kvgrid.store.crypto import load_keyring

            keys = load_keyring(getattr(args, "kv_master_key_file", None))
            ring = ",".join(f"{i}:{k.hex()}" for i, k in sorted(keys.masters.items()))
        store = pick([*SECRET_FLAGS.values(), envs.KVGRID_REDIS_PASSWORD.name])
        for dest, var in SECRET_FLAGS.items():
            if getattr(args, dest, None):
                store[var] = str(getattr(args, dest))
        return cls(key, secret, ring, store, pick(FRONTEND_ENV), pick(SHARED_ENV))

    def frontend(self) -> dict[str, str]:
        """The frontend actor's environment (its control key it is given as an object)."""
        env = {**self.shared_env, **self.frontend_env}
        if self.server_secret:
            env[envs.KVGRID_SERVER_SECRET.name] = self.server_secret
        return env

    def worker(self, worker_id: str) -> WorkerSecrets:
        env = {**self.shared_env, **self.store_env}
        if self.master_key:
            env[envs.KVGRID_MASTER_KEY.name] = self.master_key
        return WorkerSecrets(self.control_key.for_worker(worker_id), env)


def actor_config(args: argparse.Namespace) -> dict[str, Any]:
    """`kvgrid serve`'s flags as the actors get them: without what only the driver can read
    (files on its node) or must keep (secrets, which cross as ClusterSecrets)."""
    config = {k: v for k, v in vars(args).items() if k != "func"}
    for k in _DRIVER_ONLY:
        if k in config:
            config[k] = None
    return config


def apply(env: dict[str, str]) -> None:
    """In an actor, before anything reads its configuration (one actor per process): its
    part, and none of the secrets its process may have inherited (on the driver's node a
    Ray worker process inherits the environment that started Ray)."""
    for var in _SECRET_ENV:
        os.environ.pop(var, None)
    os.environ.update(env)
