"""Engine speed model of a simulated worker, loaded from a calibration JSON.

The GPU benchmark writes one per model and GPU; ``llama3-8b-h100.json`` next to this file is
a default derived from reference figures, not from a measured run (its ``meta.measured`` is
false and its ``meta.source`` lists the figures).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvgrid.transfer.model import TransferModel

DEFAULT_CALIBRATION = Path(__file__).with_name("llama3-8b-h100.json")


@dataclass(frozen=True)
class Calibration:
    step_fixed_s: float
    per_token_s: float
    attn_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    decode_per_kv_token_s: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_num_batched_tokens: int
    max_num_seqs: int
    tier_bytes_per_s: dict[str, float] = field(default_factory=dict)
    idle_w: float = 100.0
    busy_w: float = 700.0
    startup_s: float = 60.0
    # prefill -> decode KV transfers (disaggregation): the live path's parameters
    transfer: TransferModel = field(default_factory=TransferModel)
    meta: dict[str, Any] = field(default_factory=dict)

    def prefill_s(self, n: int, ctx: int = 0) -> float:
        """Compute time of ``n`` new prompt tokens after ``ctx`` cached ones."""
        if n <= 0:
            return 0.0
        steps = math.ceil(n / self.max_num_batched_tokens)
        return steps * self.step_fixed_s + self.per_token_s * n + self.attn_s * n * (ctx + n / 2)

    def decode_step_s(self, batch: int, kv_tokens: float) -> float:
        return (
            self.decode_fixed_s
            + self.decode_per_seq_s * batch
            + self.decode_per_kv_token_s * kv_tokens
        )

    def mixed_decode_s(self, batch: int, kv_tokens: float) -> float:
        """What ``batch`` decoding requests add to a prefill step they share (chunked
        prefill): their per-sequence and KV-reading cost, not the fixed cost of a pass."""
        return self.decode_per_seq_s * batch + self.decode_per_kv_token_s * kv_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "prefill": {
                "step_fixed_s": self.step_fixed_s,
                "per_token_s": self.per_token_s,
                "attn_s": self.attn_s,
            },
            "decode": {
                "fixed_s": self.decode_fixed_s,
                "per_seq_s": self.decode_per_seq_s,
                "per_kv_token_s": self.decode_per_kv_token_s,
            },
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "tiers": {k: {"bytes_per_s": v} for k, v in self.tier_bytes_per_s.items()},
            "power": {"idle_w": self.idle_w, "busy_w": self.busy_w},
            "startup_s": self.startup_s,
            "transfer": self.transfer.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        try:
            p, dec = d["prefill"], d["decode"]
            return cls(
                step_fixed_s=float(p["step_fixed_s"]),
                per_token_s=float(p["per_token_s"]),
                attn_s=float(p.get("attn_s", 0.0)),
                decode_fixed_s=float(dec["fixed_s"]),
                decode_per_seq_s=float(dec.get("per_seq_s", 0.0)),
                decode_per_kv_token_s=float(dec.get("per_kv_token_s", 0.0)),
                kv_bytes_per_token=int(d["kv_bytes_per_token"]),
                kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                max_num_batched_tokens=int(d.get("max_num_batched_tokens", 2048)),
                max_num_seqs=int(d.get("max_num_seqs", 256)),
                tier_bytes_per_s={
                    k: float(v["bytes_per_s"]) for k, v in d.get("tiers", {}).items()
                },
                idle_w=float(d.get("power", {}).get("idle_w", 100.0)),
                busy_w=float(d.get("power", {}).get("busy_w", 700.0)),
                startup_s=float(d.get("startup_s", 60.0)),
                transfer=TransferModel.from_dict(d.get("transfer")),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad calibration: missing or invalid field {e}") from None

    def replace(self, **kw: Any) -> Calibration:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d.update(kw)
        return Calibration(**d)


def load_calibration(path: str | Path | None = None) -> Calibration:
    p = Path(path) if path else DEFAULT_CALIBRATION
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file not found: {p}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    return Calibration.from_dict(d)
