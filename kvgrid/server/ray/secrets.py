"""What crosses from the `kvgrid serve --ray` driver to the actors it starts, in one place.

Actors on other nodes do not inherit the driver's environment, and files named on its command
line are on its node only. So the driver reads, once, what the cluster must share (the
control-plane credential, the context store's master key) and what the frontend needs from
the operator's environment (API keys, server and admin secrets), and hands each actor exactly
its part as a constructor argument (never on a command line, never in a runtime_env, which Ray
lists to whoever can read the cluster's state). An actor applies it before it reads anything.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from kvgrid.store.crypto import ENV_VAR as MASTER_KEY_ENV

WORKER_TOKEN_ENV = "KVGRID_WORKER_TOKEN"
# read by the frontend (tenants, scopes, admin endpoints) from its environment
FRONTEND_ENV = ("KVGRID_API_KEYS", "KVGRID_SERVER_SECRET", "KVGRID_ADMIN_TOKEN")
SHARED_ENV = ("KVGRID_LOG",)


@dataclass(frozen=True, repr=False)
class ClusterSecrets:
    worker_token: str  # the control-plane credential: frontend <-> workers
    master_key: str | None = None  # the store's key ring, "ID:HEX[,ID:HEX...]"
    frontend_env: dict[str, str] = field(default_factory=dict)
    shared_env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never in a log line or a traceback
        return "ClusterSecrets(<redacted>)"

    @classmethod
    def from_driver(cls, master_key_file: str | None, kv_store: bool) -> ClusterSecrets:
        """The driver's: its environment's credential (or a fresh one: workers bind addresses
        other hosts reach, so the control plane is never open) and one master key for every
        worker (a shared tier is readable only by servers holding the key that sealed it)."""
        token = os.environ.get(WORKER_TOKEN_ENV) or secrets.token_urlsafe(32)
        key = None
        if kv_store:
            from kvgrid.store.crypto import load_keyring

            ring = load_keyring(master_key_file)
            key = ",".join(f"{i}:{k.hex()}" for i, k in sorted(ring.masters.items()))
        pick = lambda names: {k: os.environ[k] for k in names if os.environ.get(k)}
        return cls(token, key, pick(FRONTEND_ENV), pick(SHARED_ENV))

    def frontend(self) -> dict[str, str]:
        return {**self.shared_env, **self.frontend_env, WORKER_TOKEN_ENV: self.worker_token}

    def worker(self) -> dict[str, str]:
        env = {**self.shared_env, WORKER_TOKEN_ENV: self.worker_token}
        if self.master_key:
            env[MASTER_KEY_ENV] = self.master_key
        return env


def apply(env: dict[str, str]) -> None:
    """In an actor, before anything reads its configuration (one actor per process)."""
    os.environ.update(env)
