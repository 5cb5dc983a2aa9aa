"""Conditional disaggregation: per request, prefill where it will decode, or on another worker
that streams the KV over.

The router has chosen the worker a request decodes on (its ``Candidate``: cached prefix,
queue, measured speeds). This module predicts, for every other worker that may prefill for
others, the time to first token if that worker computed the prompt and streamed its blocks
to the decode worker (``TransferModel``, with the bandwidth the decode worker measured), and
the decode worker's inter-token latency either way. Remote prefill is chosen when it lowers
the predicted time to first token (by ``min_gain``), or when prefilling locally would push
the decode worker's running requests past the ITL target while the remote prefill keeps them
within it and its first token within the TTFT target. Otherwise the prompt is computed where
it decodes: short prompts (little to move), prefixes the decode worker already holds, idle
decode workers.

A prefill worker on the decode worker's own device (two processes sharing one GPU: workers
report the device they compute on) takes its compute from the same device. Its prefill then
stretches the decode worker's steps just as a local prefill would (one prefill step between
two decode steps), and those decode steps stretch the prefill: remote prefill there protects
no ITL and wins only where it still lowers the time to first token (a shorter queue there,
its cache holding the prefix). A request that would have gone remote but for the shared
device stays local with the reason ``shared_device``. Pure and clock-free, like the router.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from kvgrid.flags import flag
from kvgrid.router.candidates import Candidate
from kvgrid.router.workers import WorkerState
from kvgrid.slo import DEFAULT_ITL_TARGET_S
from kvgrid.transfer.model import DEFAULT_LAND_BYTES_PER_S, TransferModel

Mode = Literal["auto", "always", "never"]
MODES = get_args(Mode)
# DisaggConfig's fields a server takes as flags (the ITL and TTFT targets it shares with the
# planner)
DISAGG_FLAG_FIELDS = ("mode", "stall_s", "deadline_factor")
REMOTE_REASONS = ("lowers_ttft", "protects_itl", "forced")
LOCAL_REASONS = (
    "disabled",
    "prompt_logprobs",
    "no_transfer",
    "no_prefill_worker",
    "short_prompt",
    "cached_prefix",
    "local_faster",
    "shared_device",
)


@dataclass(frozen=True)
class DisaggConfig:
    mode: Mode = field(default="auto", metadata=flag("disagg"))
    """auto: per request, when it lowers the predicted time to first token or keeps the
    decode worker's ITL within --itl-target (default); always: whenever a prefill worker
    can; never"""
    itl_target_s: float = DEFAULT_ITL_TARGET_S
    # protects_itl only where remote prefill stays within this (None: within 1.5x local)
    ttft_target_s: float | None = None
    min_blocks: int = 2  # fewer blocks to move than this: never worth a transfer
    min_gain: float = 0.1  # remote must be this fraction faster than local
    deadline_factor: float = field(default=3.0, metadata=flag("transfer-deadline-factor"))
    """a transfer's deadline: this times its predicted end, plus 2 s"""
    deadline_slack_s: float = 2.0
    stall_s: float = field(default=5.0, metadata=flag("transfer-stall-s"))
    """a transfer with no block and no sign of progress this long is given up, and the
    decode worker recomputes what is missing"""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"disaggregation mode must be one of {MODES}, got {self.mode!r}")
        if self.itl_target_s <= 0 or self.stall_s <= 0 or self.deadline_factor < 1:
            raise ValueError("itl_target_s and stall_s must be > 0, deadline_factor >= 1")


@dataclass
class PrefillOption:
    """What prefilling on one other worker would give."""

    worker_id: str
    cached_tokens: int  # of the blocks to move, already on that worker
    uncached_tokens: int  # what it computes
    compute_s: float  # its queue plus the prompt's compute there
    transfer_tail_s: float  # the transfer's part after that prefill ends
    decode_tail_s: float  # on the decode worker: its queue, landing, the last tokens
    predicted_ttft_s: float
    # the decode worker's ITL while this prefill runs (its steps share a device with it)
    itl_s: float = 0.0
    shared_device: bool = False  # computes on the decode worker's device


@dataclass
class PrefillPlan:
    """The decision and its numbers (``Decision.prefill``)."""

    remote: bool
    reason: str
    mode: str
    worker_id: str | None = None  # the prefill worker when remote
    start_block: int = 0  # blocks before this the decode worker already holds
    num_blocks: int = 0  # blocks the prefill worker computes and sends
    local_ttft_s: float = 0.0
    remote_ttft_s: float | None = None
    local_itl_s: float = 0.0
    remote_itl_s: float = 0.0
    deadline_s: float = 0.0  # the decode worker stops waiting for the transfer after this
    stall_s: float = 0.0
    options: list[PrefillOption] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 6)
        d["options"] = [
            {k: round(v, 6) if isinstance(v, float) else v for k, v in o.items()}
            for o in d["options"]
        ]
        return d


@dataclass(frozen=True)
class Side:
    """What the decision needs of a worker beyond its Candidate (from its load report)."""

    candidate: Candidate
    mixed_prefill_tokens: int | None = None  # prompt tokens a step that also decodes takes
    transfer_bytes_per_s: float | None = None  # measured on its receiving side
    transfer_setup_s: float | None = None  # measured on its sending side
    g2_bytes_per_s: float | None = None
    bytes_per_block: int = 0
    device: str = ""  # WorkerInfo.device ("": unknown, shared with no one)

    @classmethod
    def of(cls, w: WorkerState, c: Candidate) -> Side:
        ld = w.load
        return cls(
            c,
            ld.mixed_prefill_tokens,
            ld.transfer_bytes_per_s,
            ld.transfer_setup_s,
            ld.tier_bytes_per_s.get("G2"),
            w.info.bytes_per_block,
            w.info.device,
        )


def shares_device(a: Side, b: Side) -> bool:
    return bool(a.device) and a.device == b.device


def local_ttft_s(s: Side) -> float:
    """The decode worker computing the prompt itself. While it decodes, its steps carry at
    most ``mixed_prefill_tokens`` of prompt (the engine keeps its ITL in check that way),
    so a long prompt takes many steps, each a decode step long on top."""
    c = s.candidate
    w = c.worker
    if not (w.num_decoding and s.mixed_prefill_tokens):
        return c.predicted_ttft_s
    chunk = max(1, min(w.max_num_batched_tokens, s.mixed_prefill_tokens))
    work = w.backlog_tokens + c.prompt.uncached_tokens
    t = work / w.prefill_tokens_per_s + c.prompt.tier_load_s
    t += math.ceil(work / chunk) * w.decode_step_s
    return max(t, c.predicted_ttft_s)


def _itl_s(s: Side, prompt_tokens: int) -> float:
    """The decode worker's inter-token latency while ``prompt_tokens`` are prefilled there
    (0 when nothing decodes there: nobody's ITL is at stake)."""
    w = s.candidate.worker
    if not w.num_decoding:
        return 0.0
    chunk = min(w.max_num_batched_tokens, s.mixed_prefill_tokens or w.max_num_batched_tokens)
    return w.decode_step_s + min(prompt_tokens, chunk) / w.prefill_tokens_per_s


def option(
    d: Side, p: Side, n_prompt: int, start: int, num: int, shared: bool | None = None
) -> PrefillOption:
    """Prefill of blocks [0, start + num) on ``p`` (it computes what it lacks and sends
    blocks start..), then the decode worker ``d`` lands them and computes the rest.
    ``shared``: whether ``p`` computes on ``d``'s device (default: as they report)."""
    dw, pw = d.candidate.worker, p.candidate.worker
    bs = d.candidate.prompt.block_size
    upto = (start + num) * bs
    p_cached = min(p.candidate.overlap.blocks, start + num - 1) * bs  # its last block is computed
    p_uncached = upto - p_cached
    produce = p_uncached / pw.prefill_tokens_per_s
    compute = pw.backlog_tokens / pw.prefill_tokens_per_s + produce
    steps = math.ceil((pw.backlog_tokens + p_uncached) / pw.max_num_batched_tokens)
    if pw.num_decoding:
        compute += steps * pw.decode_step_s
    shared = shares_device(d, p) if shared is None else shared
    itl = _itl_s(d, n_prompt - upto)
    if shared and dw.num_decoding:
        # the local prefill's model with the prefill worker's steps: the device runs one of
        # them between two of the decode worker's steps, each slowing the other
        compute += steps * dw.decode_step_s
        chunk = min(p_uncached, pw.max_num_batched_tokens)
        itl = max(itl, dw.decode_step_s + chunk / pw.prefill_tokens_per_s)
    model = TransferModel.measured(d.transfer_bytes_per_s, p.transfer_setup_s)
    per_step = max(1, pw.max_num_batched_tokens // bs)
    g2 = d.g2_bytes_per_s or DEFAULT_LAND_BYTES_PER_S
    handoff = model.handoff_s(num, d.bytes_per_block, produce, per_step, g2)
    tail = model.tail_s(num, d.bytes_per_block, produce, per_step)
    rest = n_prompt - upto
    decode = (dw.backlog_tokens + rest) / dw.prefill_tokens_per_s + (handoff - tail)
    if dw.num_decoding:
        decode += dw.decode_step_s
    return PrefillOption(
        p.candidate.worker_id,
        p_cached,
        p_uncached,
        compute,
        tail,
        decode,
        compute + tail + decode,
        itl,
        shared,
    )


def plan_prefill(
    cfg: DisaggConfig,
    d: Side,
    others: list[Side],
    n_prompt: int,
    can_receive: bool,
    whole_prompt: bool = False,
) -> PrefillPlan:
    """Where ``d``'s request is prefilled. ``others``: workers that may prefill for others
    and stream to ``d`` (not ``d`` itself); ``can_receive``: ``d`` takes transfers;
    ``whole_prompt``: ``d`` computes every prompt position anyway (prompt logprobs)."""
    c = d.candidate
    bs = c.prompt.block_size
    hit_cap = max(0, (n_prompt - 1) // bs)  # the last prompt token is computed where it decodes
    start = min(c.overlap.blocks, hit_cap)
    num = hit_cap - start
    local = local_ttft_s(d)
    plan = PrefillPlan(
        False,
        "",
        cfg.mode,
        start_block=start,
        num_blocks=num,
        local_ttft_s=local,
        local_itl_s=_itl_s(d, c.prompt.uncached_tokens),
        stall_s=cfg.stall_s,
    )
    if cfg.mode == "never":
        plan.reason = "disabled"
        return plan
    if whole_prompt:
        plan.reason = "prompt_logprobs"
        return plan
    if not can_receive:
        plan.reason = "no_transfer"
        return plan
    if not others:
        plan.reason = "no_prefill_worker"
        return plan
    if num < cfg.min_blocks:
        plan.reason = "cached_prefix" if start >= cfg.min_blocks else "short_prompt"
        return plan
    plan.options = [option(d, p, n_prompt, start, num) for p in others]
    cached = c.prompt.cached_tokens
    best = _choose(cfg, plan, plan.options, local, cached, n_prompt)
    if best is None and any(o.shared_device for o in plan.options):
        # would another device have made it remote? then the sharing is why it stays local
        apart = [option(d, p, n_prompt, start, num, shared=False) for p in others]
        if _choose(cfg, replace(plan), apart, local, cached, n_prompt) is not None:
            plan.reason = "shared_device"
    if best is None:
        return plan
    plan.worker_id = best.worker_id
    predicted = cfg.deadline_factor * (best.compute_s + best.transfer_tail_s)
    plan.deadline_s = max(predicted, cfg.stall_s) + cfg.deadline_slack_s
    return plan


def _choose(
    cfg: DisaggConfig,
    plan: PrefillPlan,
    options: list[PrefillOption],
    local: float,
    cached: int,
    n: int,
) -> PrefillOption | None:
    """The option to prefill on (``plan`` gets the reason and the remote predictions), or
    None: prefill locally (``plan.reason`` says why)."""
    # a prefill sharing the decode worker's device may stretch its steps past the target
    # where the local one would not: a faster first token does not pay for that
    kept = [o for o in options if o.itl_s <= max(cfg.itl_target_s, plan.local_itl_s)]
    pool = kept if kept and cfg.mode != "always" else options
    best = min(pool, key=lambda o: (o.predicted_ttft_s, o.worker_id))
    plan.remote_ttft_s = best.predicted_ttft_s
    plan.remote_itl_s = best.itl_s
    faster = best.predicted_ttft_s < (1 - cfg.min_gain) * local and best in kept
    itl_at_risk = plan.local_itl_s > cfg.itl_target_s >= plan.remote_itl_s
    bound = cfg.ttft_target_s if cfg.ttft_target_s is not None else 1.5 * local
    within = best.predicted_ttft_s <= bound
    if cfg.mode == "always":
        plan.remote, plan.reason = True, "forced"
    elif faster:
        plan.remote, plan.reason = True, "lowers_ttft"
    elif itl_at_risk and within:
        plan.remote, plan.reason = True, "protects_itl"
    else:
        plan.reason = "cached_prefix" if cached * 2 >= n else "local_faster"
        return None
    return best
