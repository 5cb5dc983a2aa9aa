"""The context store: KV blocks below the GPU, in G2 (host memory), G3 (local disk) and G4
(shared filesystem or Redis/Valkey), encrypted, verified and reused."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvgrid.store.config import StoreConfig, TenantPolicy
    from kvgrid.store.connector import StoreConnector
    from kvgrid.store.store import ContextStore

__all__ = ["ContextStore", "StoreConfig", "StoreConnector", "TenantPolicy"]

# imported on first use: the store's tiers import torch, which what only reads a key file or
# a variable name of the store (a Ray driver, the CLI) never needs
_WHERE = {
    "ContextStore": "store",
    "StoreConfig": "config",
    "StoreConnector": "connector",
    "TenantPolicy": "config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"kvgrid.store.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kvgrid.store' has no attribute {name!r}")
