"""A routing decision: the chosen worker, the numbers it was chosen on, where the prompt is
prefilled; what /debug shows and the decision log writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvgrid import keys as kvkeys
from kvgrid.router.candidates import Candidate
from kvgrid.router.disagg import PrefillPlan


@dataclass
class Decision:
    request_id: str
    worker_id: str
    policy: str
    prompt_tokens: int
    predicted_cached_tokens: int
    predicted_ttft_s: float
    candidates: list[Candidate] = field(default_factory=list)
    decided_at: float = 0.0
    elapsed_s: float = 0.0  # time spent deciding (wall clock)
    tenant: bytes = kvkeys.PUBLIC_TENANT  # whose request (never shown; /debug filters by it)
    prefill: PrefillPlan | None = None  # where the prompt is computed (with disaggregation)

    @property
    def remote_prefill(self) -> bool:
        return self.prefill is not None and self.prefill.remote

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "worker_id": self.worker_id,
            "policy": self.policy,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "predicted_ttft_s": round(self.predicted_ttft_s, 6),
            "decision_us": round(self.elapsed_s * 1e6, 1),
            "candidates": [c.to_dict() for c in self.candidates],
            "prefill": self.prefill.to_dict() if self.prefill is not None else None,
        }

    def log_line(self) -> str:
        parts = [
            f"{c.worker_id}:match={c.overlap.blocks}b,backlog={c.worker.backlog_tokens},"
            f"ttft={c.predicted_ttft_s * 1e3:.1f}ms,{c.freshness}"
            for c in self.candidates
        ]
        line = (
            f"route {self.request_id} -> {self.worker_id} [{self.policy}] "
            f"cached~{self.predicted_cached_tokens}/{self.prompt_tokens} | " + " ".join(parts)
        )
        p = self.prefill
        if p is not None:
            where = f"remote@{p.worker_id}" if p.remote else "local"
            remote = f"{p.remote_ttft_s * 1e3:.1f}ms" if p.remote_ttft_s is not None else "-"
            line += (
                f" | prefill {where} ({p.reason}: ttft local {p.local_ttft_s * 1e3:.1f}ms "
                f"remote {remote}, itl local {p.local_itl_s * 1e3:.1f}ms "
                f"remote {p.remote_itl_s * 1e3:.1f}ms)"
            )
        return line
