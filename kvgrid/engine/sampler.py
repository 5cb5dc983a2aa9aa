"""Sampler: logits to tokens for a batch, each row under its own SamplingParams.

Runs on whatever device the logits are on. Random rows use the exponential-race form of
categorical sampling (argmax of p / E, E ~ Exp(1)), which needs no cumulative sums and lets a
seeded request draw its noise from its own generator: the same seed gives the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvgrid.engine.guided import apply_token_bitmask
from kvgrid.engine.logits_processors import apply_logit_bias, apply_penalties
from kvgrid.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token's logprob, {token: logprob} of the top-n) when asked for
    logprobs: list[tuple[float, dict[int, float]] | None]


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    mask = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    # keep the smallest set whose mass reaches top_p (the first token always stays)
    mass_before = probs.cumsum(dim=-1) - probs
    mask |= mass_before > top_p.unsqueeze(1)
    mask |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


_force_chunked_argmax = False  # tests: the chunked path on CPU tensors


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for [B, vocab], the first index among equal maxima as there.

    A CUDA reduction gives each row one thread block: for a few rows of a 128K vocabulary
    that is one SM for 27 us of a 4.4 ms batch-1 step (H200). A few rows are instead cut
    into chunks whose maxima are reduced in parallel, then the first best chunk is taken.
    """
    b, vocab = logits.shape
    chunks = next((c for c in (256, 128, 64, 32, 16) if vocab % c == 0), 1)
    if b > 8 or chunks == 1 or not (logits.is_cuda or _force_chunked_argmax):
        return logits.argmax(dim=-1)
    width = vocab // chunks
    vals, idx = logits.view(b, chunks, width).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return (best * width + idx.gather(1, best)).squeeze(1)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_ids: frozenset[int],
    masks: tuple[torch.Tensor | None, torch.Tensor] | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` ([B, vocab], float32) for `seqs`."""
    tokens, logprobs_all = sample_on_device(logits, seqs, eos_ids, masks)
    return sampler_output(tokens.tolist(), logprobs_all, seqs)


@torch.inference_mode()  # the logits come out of the forward's inference mode
def sample_on_device(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_ids: frozenset[int],
    masks: tuple[torch.Tensor | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens as a device tensor [B] (int64), without waiting for them, and the
    log-softmax of every row when some row asks for logprobs (else None).

    Before sampling: logit_bias, the penalties, min_tokens' ban on stop tokens, then the
    grammar ``masks`` (rows, bitmask; kvgrid.engine.guided). Logprobs are those of the
    distribution after these, before temperature and top-k/top-p/min-p.
    """
    device = logits.device
    apply_logit_bias(logits, seqs)
    apply_penalties(logits, seqs)
    # suppress stop tokens until min_tokens are out
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = list(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids))
            if banned:
                logits[i, banned] = float("-inf")
    if masks is not None:
        apply_token_bitmask(logits, *masks)

    need_logprobs = any(s.params.logprobs is not None for s in seqs)
    logprobs_all = logits.log_softmax(dim=-1) if need_logprobs else None

    # which rows sample at random is known on the host: no device round trip (each one
    # stalls the GPU) when every row is greedy
    random_rows = [i for i, s in enumerate(seqs) if s.params.temperature != 0]
    tokens = argmax_rows(logits)
    if random_rows:
        rows = torch.tensor(random_rows, device=device)
        params = [seqs[i].params for i in random_rows]
        temps = torch.tensor([p.temperature for p in params], device=device)
        sub = logits[rows] / temps.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0 for p in params):
            sub = _apply_top_k_top_p(
                sub,
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device, dtype=sub.dtype),
                torch.tensor([p.min_p for p in params], device=device, dtype=sub.dtype),
            )
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for j, i in enumerate(random_rows):
            g = seqs[i].generator
            if g is not None:
                noise[j] = torch.empty_like(probs[j]).exponential_(generator=g)
        tokens[rows] = argmax_rows(probs / noise)

    return tokens, logprobs_all


def sampler_output(
    token_list: list[int], logprobs_all: torch.Tensor | None, seqs: list[Sequence]
) -> SamplerOutput:
    """Logprobs for the chosen tokens, once they are known on the host."""
    b = len(seqs)
    lp_out: list[tuple[float, dict[int, float]] | None] = [None] * b
    if logprobs_all is not None:
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                continue
            row = logprobs_all[i]
            top: dict[int, float] = {}
            if n > 0:
                vals, ids = row.topk(n)
                top = dict(zip(ids.tolist(), vals.tolist()))
            chosen = float(row[token_list[i]])
            top[token_list[i]] = chosen
            lp_out[i] = (chosen, top)
    return SamplerOutput(token_list, lp_out)
