"""The context store: KV blocks below the GPU, in G2 (host memory), G3 (local disk) and G4
(shared filesystem or Redis/Valkey), encrypted, verified and reused."""

from kvgrid.store.config import StoreConfig, TenantPolicy
from kvgrid.store.connector import StoreConnector
from kvgrid.store.store import ContextStore

__all__ = ["ContextStore", "StoreConfig", "StoreConnector", "TenantPolicy"]
