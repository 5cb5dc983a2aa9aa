"""How long moving a prompt's KV from a prefill worker to a decode worker takes.

One model for the router's per-request decision, the planner and the fleet simulator, with
the parameters the live path measures: a decode worker's receiver times each block's
transfer (receive plus verification and landing in G2) and reports the bandwidth in its
load reports; the connection's setup (connect and handshake) is timed by the sender.

Prefill streams blocks as it names them, a step's worth at a time, so the transfer overlaps
the computation: what the first token waits for is the part that does not fit under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Until a receiver has measured its link: a loopback or datacenter TCP stream with the
# object verified on arrival moves a few GB/s; a too-high guess sends work remote that then
# waits for its KV, a too-low one keeps it local, so a middle value.
DEFAULT_TRANSFER_BYTES_PER_S = 2e9
DEFAULT_TRANSFER_SETUP_S = 0.002
# G2 -> G1 on the decode worker, until it reports its own (a pinned host-to-GPU copy)
DEFAULT_LAND_BYTES_PER_S = 20e9


@dataclass(frozen=True)
class TransferModel:
    bytes_per_s: float = DEFAULT_TRANSFER_BYTES_PER_S  # one stream, blocks verified on arrival
    setup_s: float = DEFAULT_TRANSFER_SETUP_S  # connect and handshake
    per_block_s: float = 0.0  # fixed cost per block (framing, bookkeeping)

    def block_s(self, bytes_per_block: int) -> float:
        return bytes_per_block / self.bytes_per_s + self.per_block_s

    def end_s(
        self, n_blocks: int, bytes_per_block: int, produce_s: float, blocks_per_step: int
    ) -> float:
        """When the last of ``n_blocks`` has landed, counted from the start of a prefill
        that names them over ``produce_s`` seconds, ``blocks_per_step`` at a time: bound by
        the link (all of them back to back, from when the first step has named its blocks
        and the connection is set up) or by the last step's blocks, sent once that step is
        done."""
        if n_blocks <= 0:
            return 0.0
        b = self.block_s(bytes_per_block)
        step = min(max(1, blocks_per_step), n_blocks)
        first = produce_s * step / n_blocks
        return max(max(first, self.setup_s) + n_blocks * b, produce_s + step * b)

    def tail_s(
        self, n_blocks: int, bytes_per_block: int, produce_s: float, blocks_per_step: int
    ) -> float:
        """What the transfer adds after the prefill itself has finished."""
        return max(
            0.0, self.end_s(n_blocks, bytes_per_block, produce_s, blocks_per_step) - produce_s
        )

    def handoff_s(
        self,
        n_blocks: int,
        bytes_per_block: int,
        produce_s: float,
        blocks_per_step: int,
        land_bytes_per_s: float,
    ) -> float:
        """What moving the KV adds to a prefill of ``produce_s`` seconds: the transfer's
        tail, then landing the blocks from the decode worker's G2 into its G1."""
        tail = self.tail_s(n_blocks, bytes_per_block, produce_s, blocks_per_step)
        return tail + n_blocks * bytes_per_block / land_bytes_per_s

    @classmethod
    def measured(cls, bytes_per_s: float | None, setup_s: float | None = None) -> TransferModel:
        """The model with what a worker reported (defaults where it has not measured)."""
        return cls(
            bytes_per_s
            if bytes_per_s and math.isfinite(bytes_per_s)
            else DEFAULT_TRANSFER_BYTES_PER_S,
            setup_s if setup_s is not None and setup_s >= 0 else DEFAULT_TRANSFER_SETUP_S,
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "bytes_per_s": self.bytes_per_s,
            "setup_s": self.setup_s,
            "per_block_s": self.per_block_s,
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> TransferModel:
        d = d or {}
        return cls(
            float(d.get("bytes_per_s", DEFAULT_TRANSFER_BYTES_PER_S)),
            float(d.get("setup_s", DEFAULT_TRANSFER_SETUP_S)),
            float(d.get("per_block_s", 0.0)),
        )
