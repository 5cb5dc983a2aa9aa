"""What a request's choices hand back: per-step outputs of its sibling sequences, per-choice
seeds, and the logprobs of its prompt tokens.

A request with ``n`` choices runs as ``n`` sibling sequences (kvgrid.engine.sequence).
Each output names the choice its delta belongs to; ``outputs`` holds every choice.
"""

from __future__ import annotations

import hashlib

import torch

from kvgrid.engine.outputs import CompletionOutput, RequestOutput
from kvgrid.engine.scheduler import ScheduledSeq
from kvgrid.engine.sequence import Sequence

PROMPT_LOGITS_CHUNK = 256  # prompt rows turned into logits at a time (vocab-wide each)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index``: the request's own for the first, derived for the others
    (each reproducible, none equal to another's)."""
    if index == 0:
        return seed
    h = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8, person=b"kvgrid-choice")
    return int.from_bytes(h.digest(), "little")


def new_completion(seq: Sequence) -> CompletionOutput:
    return CompletionOutput(
        index=seq.index,
        text="",
        token_ids=seq.output_token_ids,
        logprobs=seq.logprobs,
        cumulative_logprob=0.0 if seq.logprobs is not None else None,
    )


def make_output(seq: Sequence) -> RequestOutput:
    """This step's output for ``seq``: its delta, and every choice of its request."""
    # hold back text that may be the start of a stop string until it is decided
    hold = max((len(s) for s in seq.params.stop), default=1) - 1
    visible = len(seq.text) if seq.is_finished else max(seq.emitted_text_len, len(seq.text) - hold)
    new_text = seq.text[seq.emitted_text_len : visible]
    seq.emitted_text_len = visible
    start, end = seq.emitted_token_count, len(seq.output_token_ids)
    new_ids = seq.output_token_ids[start:end]
    new_lp = seq.logprobs[start:end] if seq.logprobs is not None else None
    seq.emitted_token_count = end
    comp = seq.completion
    comp.text = seq.text
    comp.cumulative_logprob = seq.cumulative_logprob if seq.logprobs is not None else None
    comp.finish_reason, comp.stop_reason = seq.finish_reason, seq.stop_reason
    metrics = {"arrival_time": seq.arrival_time}
    if seq.first_token_time is not None:
        metrics["first_token_time"] = seq.first_token_time
    leader = seq.group[0]
    done = all(s.is_finished for s in seq.group)
    # a running request's outputs share their live lists (copying them every step would make
    # a step cost grow with output length); the final output is a snapshot
    outputs = (
        [_snapshot(s.completion) for s in seq.group] if done else [s.completion for s in seq.group]
    )
    return RequestOutput(
        request_id=leader.request_id,
        prompt=leader.prompt,
        prompt_token_ids=leader.prompt_token_ids,
        outputs=outputs,
        finished=done,
        num_cached_tokens=leader.num_cached_tokens or 0,
        new_token_ids=new_ids,
        new_text=new_text,
        metrics=metrics,
        index=seq.index,
        new_logprobs=new_lp,
        prompt_logprobs=leader.prompt_logprobs,
    )


def _snapshot(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        index=c.index,
        text=c.text,
        token_ids=list(c.token_ids),
        cumulative_logprob=c.cumulative_logprob,
        logprobs=list(c.logprobs) if c.logprobs is not None else None,
        finish_reason=c.finish_reason,
        stop_reason=c.stop_reason,
    )


# ---- prompt logprobs ---------------------------------------------------------------------


def prompt_rows(batch: list[ScheduledSeq]) -> tuple[list[int], list[tuple[Sequence, int]]]:
    """Rows of the flattened batch whose logits score the next prompt token, and for each
    its (sequence, position of the token it scores)."""
    rows: list[int] = []
    targets: list[tuple[Sequence, int]] = []
    offset = 0
    for item in batch:
        seq = item.seq
        if seq.prompt_logprobs is not None:
            start = seq.num_computed_tokens
            for p in range(start, min(start + item.num_tokens, seq.num_prompt_tokens - 1)):
                rows.append(offset + p - start)
                targets.append((seq, p + 1))
        offset += item.num_tokens
    return rows, targets


@torch.inference_mode()
def record_prompt_logprobs(model, hidden: torch.Tensor, targets: list[tuple[Sequence, int]]):
    """Score each target prompt token from its row of ``hidden``, a chunk at a time."""
    for lo in range(0, len(targets), PROMPT_LOGITS_CHUNK):
        part = targets[lo : lo + PROMPT_LOGITS_CHUNK]
        lp = model.compute_logits(hidden[lo : lo + len(part)]).float().log_softmax(dim=-1)
        ids = torch.tensor([s.prompt_token_ids[p] for s, p in part], device=lp.device)
        chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
        k = max(s.params.prompt_logprobs for s, _ in part)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        for j, (s, p) in enumerate(part):
            n = s.params.prompt_logprobs
            entry = dict(zip(top_i[j][:n], top_v[j][:n])) if n else {}
            entry[s.prompt_token_ids[p]] = chosen[j]
            s.prompt_logprobs[p] = entry
