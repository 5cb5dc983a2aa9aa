"""Logit processors that run before sampling: logit_bias and the repetition penalties.

Each works on the rows that ask for it, with the token history read from the host: the
engine makes sure a step that samples a penalised row knows every earlier token.
"""

from __future__ import annotations

import torch

from kvgrid.engine.sequence import Sequence


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows, ids, vals = [], [], []
    for i, s in enumerate(seqs):
        for tid, v in (s.params.logit_bias or {}).items():
            rows.append(i)
            ids.append(tid)
            vals.append(v)
    if not rows:
        return
    dev = logits.device
    logits.index_put_(
        (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
        torch.tensor(vals, device=dev, dtype=logits.dtype),
        accumulate=True,
    )


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """OpenAI's presence and frequency penalties over output tokens, and the multiplicative
    repetition penalty over prompt and output tokens, for the rows that set them."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[-1]
    out_idx: list[int] = []
    seen_idx: list[int] = []
    for j, i in enumerate(rows):
        s = seqs[i]
        base = j * vocab
        out_idx += [base + t for t in s.output_token_ids if t >= 0]
        if s.params.repetition_penalty != 1.0:
            seen_idx += [base + t for t in s.token_ids if t >= 0]
    r = len(rows)
    idx = torch.tensor(rows, device=dev)
    sub = logits[idx]
    params = [seqs[i].params for i in rows]
    if seen_idx:
        seen = torch.zeros(r * vocab, dtype=torch.bool, device=dev)
        seen[torch.tensor(seen_idx, device=dev)] = True
        seen = seen.view(r, vocab)
        pen = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
        sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
    if out_idx and any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.zeros(r * vocab, dtype=sub.dtype, device=dev)
        counts.index_add_(
            0,
            torch.tensor(out_idx, device=dev),
            torch.ones(len(out_idx), dtype=sub.dtype, device=dev),
        )
        counts = counts.view(r, vocab)
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev, dtype=sub.dtype)
        pres = torch.tensor([p.presence_penalty for p in params], device=dev, dtype=sub.dtype)
        sub = sub - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).to(sub.dtype)
    logits[idx] = sub
