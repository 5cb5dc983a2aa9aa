"""Key chains: which workers compute the same block keys for a request, and those keys.

Workers whose scope (model, dtype, layout) and block size agree share one key chain for a
tenant, so the router hashes a prompt once per chain, not once per worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvgrid import keys as kvkeys
from kvgrid.router.workers import WorkerInfo

if TYPE_CHECKING:
    from kvgrid.router.router import RouteRequest


class KeyChains:
    def __init__(self) -> None:
        self._digests: dict[tuple[kvkeys.KVScope, bytes], bytes] = {}
        self._groups: dict[str, tuple[WorkerInfo, bytes, tuple[bytes, int]]] = {}

    def digest(self, scope: kvkeys.KVScope, tenant: bytes) -> bytes:
        """``scope``'s digest for ``tenant`` (remembered: it hashes the scope's fields)."""
        k = (scope, tenant)
        d = self._digests.get(k)
        if d is None:
            d = self._digests[k] = scope.with_tenant(tenant).digest
        return d

    def group_of(self, info: WorkerInfo, tenant: bytes) -> tuple[bytes, int]:
        """(scope digest for ``tenant``, block size): workers alike here share a key chain.

        Remembered per worker for the last tenant it was asked with: the lookup by scope
        hashes the scope's fields, and routing asks for every candidate of every decision.
        """
        memo = self._groups.get(info.worker_id)
        if memo is None or memo[0] is not info or memo[1] != tenant:
            g = (self.digest(info.scope, tenant), info.block_size)
            memo = self._groups[info.worker_id] = (info, tenant, g)
        return memo[2]

    def forget(self, worker_id: str) -> None:
        self._groups.pop(worker_id, None)

    def request_keys(
        self, req: RouteRequest, digest: bytes, bs: int, scope: kvkeys.KVScope
    ) -> list[bytes]:
        """The request's block keys in the chain of scope ``digest`` and block size ``bs``
        (``scope``: the chain's scope, whose public digest keys a shared prefix)."""
        if req.keys is not None:
            return req.keys
        if req.shared_prefix_tokens >= bs:
            public = self.digest(scope, kvkeys.PUBLIC_TENANT)
            return kvkeys.block_keys_shared(
                req.token_ids, digest, bs, req.shared_prefix_tokens, public
            )
        return kvkeys.block_keys(req.token_ids, digest, bs)
