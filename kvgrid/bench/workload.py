"""A workload: a seeded request stream with an explicit prefix structure.

Every workload, generated or loaded from a trace, is a list of ``Request`` records whose
prompt is described by *hash ids*: one id per block of ``block_tokens`` prompt tokens (the
last block may be partial), in the manner of the Mooncake traces. An id stands for its
block and everything before it, so equal ids mean a shared prefix. Token ids are derived
from the ids (``token_block``): a seeded generator keyed by the id gives each id the same
block of tokens every time, which preserves the prefix chains when a workload is replayed
against a real server, while the simulator works on the ids directly and never builds the
token lists.

The generators are in ``workloads``, the Mooncake trace loader in ``mooncake``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvgrid.stats import percentile

DEFAULT_VOCAB_SIZE = 32_000
# Low ids are special tokens in most vocabularies (BOS/EOS/pad/chat markers): keep clear.
MIN_TOKEN_ID = 256


@dataclass(slots=True)
class Request:
    """One request of a workload. ``hash_ids`` describe the prompt's blocks; a workload may
    instead (or also) carry literal ``prompt_token_ids`` or ``prompt_text``."""

    arrival_s: float
    max_tokens: int
    input_length: int = 0
    hash_ids: tuple[int, ...] = ()
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    session_id: str | None = None
    request_id: str = ""
    tenant: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "arrival_s": self.arrival_s,
            "input_length": self.input_length,
            "max_tokens": self.max_tokens,
            "session_id": self.session_id,
            "hash_ids": list(self.hash_ids),
        }


def token_block(hash_id: int, block_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The token ids of one hash id's block: equal ids give equal tokens, always."""
    rng = np.random.default_rng([seed, int(hash_id)])
    return rng.integers(MIN_TOKEN_ID, vocab_size, size=block_tokens, dtype=np.int64)


@dataclass
class Workload:
    name: str
    requests: list[Request]
    block_tokens: int = 512
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    def prompt_tokens(self, req: Request) -> list[int]:
        """The prompt's token ids (literal ones if the request carries them)."""
        if req.prompt_token_ids is not None:
            return req.prompt_token_ids
        bt, out = self.block_tokens, []
        left = req.input_length
        for h in req.hash_ids:
            n = min(bt, left)
            out.extend(token_block(h, bt, self.vocab_size, self.seed)[:n].tolist())
            left -= n
        return out

    def materialize(self) -> Workload:
        """Fill ``prompt_token_ids`` of every request (for replay against a server)."""
        cache: dict[int, list[int]] = {}
        bt = self.block_tokens
        for r in self.requests:
            if r.prompt_token_ids is not None or r.prompt_text is not None:
                continue
            toks: list[int] = []
            left = r.input_length
            for h in r.hash_ids:
                blk = cache.get(h)
                if blk is None:
                    blk = cache[h] = token_block(h, bt, self.vocab_size, self.seed).tolist()
                n = min(bt, left)
                toks.extend(blk[:n])
                left -= n
            r.prompt_token_ids = toks
        return self

    def theoretical_hit_rate(self, block_size: int | None = None) -> dict[str, float]:
        """Prefix hit rate with an infinite cache, requests in arrival order.

        ``block_size`` None: at hash-block granularity (the Mooncake README's numbers:
        block-weighted, and token-weighted with hit blocks capped at the input length).
        Otherwise at an engine's granularity: only full engine blocks hit, and never the
        prompt's last token (engines always compute it), which is what a server can report.
        """
        seen: set = set()
        hit_b = tot_b = 0
        hit_t = tot_t = 0
        bt = self.block_tokens
        for r in sorted(self.requests, key=lambda r: r.arrival_s):
            if block_size is None:
                n = 0
                for h in r.hash_ids:
                    if h not in seen:
                        break
                    n += 1
                hit_b += n
                tot_b += len(r.hash_ids)
                hit_t += min(n * bt, r.input_length)
                tot_t += r.input_length
                seen.update(r.hash_ids)
                continue
            # engine block j covers tokens [j*B, (j+1)*B): name it by the hash block that
            # holds its end and the offset, which determines its tokens and its whole prefix
            n_full = r.input_length // block_size
            cap = max(0, (r.input_length - 1) // block_size)
            names = []
            for j in range(n_full):
                end = (j + 1) * block_size - 1
                names.append((r.hash_ids[end // bt], end % bt))
            n = 0
            for nm in names:
                if nm not in seen:
                    break
                n += 1
            n = min(n, cap)
            hit_b += n
            tot_b += n_full
            hit_t += n * block_size
            tot_t += r.input_length
            seen.update(names)
        return {
            "block_weighted": hit_b / tot_b if tot_b else 0.0,
            "token_weighted": hit_t / tot_t if tot_t else 0.0,
        }

    def stats(self) -> dict[str, Any]:
        ins = np.array([r.input_length for r in self.requests] or [0])
        outs = np.array([r.max_tokens for r in self.requests] or [0])
        dur = self.duration_s
        return {
            "name": self.name,
            "requests": len(self.requests),
            "duration_s": dur,
            "mean_rate_rps": (len(self.requests) - 1) / dur if dur > 0 else None,
            "input_tokens_mean": float(ins.mean()),
            "input_tokens_p50": percentile(ins, 50),
            "input_tokens_max": int(ins.max()),
            "output_tokens_mean": float(outs.mean()),
            "block_tokens": self.block_tokens,
        }
