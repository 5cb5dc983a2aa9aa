"""Guided decoding: token masks from llguidance, one matcher per constrained sequence.

A request's grammar (JSON schema, regex, choice list or Lark grammar) is compiled once per
engine and cached; each sequence gets a copy of the compiled matcher and advances it with
every token it accepts. Before a step samples, the masks of its constrained rows are
computed on the host, in parallel across rows and off the engine thread (llguidance drops
the GIL), into a pinned buffer that is copied to the device with the step's other work: on
a GPU the forward pass is already queued, so the masks are built while the device runs and
while the engine thread turns the last step's tokens into outputs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kvgrid.engine.sampling_params import GuidedDecoding, RequestError
from kvgrid.stats import ewma

if TYPE_CHECKING:
    from kvgrid.engine.sequence import Sequence
    from kvgrid.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per engine
MAX_TEMPLATES = 1024  # compiled templates kept per engine, all grammars together
COPIES_PER_THREAD = 8  # templates per grammar for each mask thread (``matcher``)


def default_threads() -> int:
    """Mask threads when not configured: half the CPUs (the engine and its loaders keep
    the rest), at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# JSON without free whitespace between tokens: a model cannot stall on blank lines, and the
# separators read the way people write JSON. A schema's own "x-guidance" overrides these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# integers every JSON reader keeps exactly (IEEE doubles): what an unbounded one is held to
SAFE_INT = (-(2**53 - 1), 2**53 - 1)


def bound_integers(schema: Any) -> Any:
    """``schema`` with integers that set no bound held to JSON's safe range: a small model
    otherwise writes digits until max_tokens."""
    if isinstance(schema, list):
        return [bound_integers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bound_integers(v) for k, v in schema.items()}
    types = out.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if not {"minimum", "exclusiveMinimum"} & out.keys():
            out["minimum"] = SAFE_INT[0]
        if not {"maximum", "exclusiveMaximum"} & out.keys():
            out["maximum"] = SAFE_INT[1]
    return out


def _grammar_text(g: GuidedDecoding) -> str:
    import llguidance as llg

    if g.kind == "json_schema":
        try:
            schema = json.loads(g.spec)
        except ValueError as e:
            raise RequestError(f"JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise RequestError("a JSON schema must be an object")
        return llg.LLMatcher.grammar_from_json_schema(
            bound_integers(schema), defaults=JSON_DEFAULTS
        )
    if g.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(g.spec)
    if g.kind == "choice":
        try:
            choices = json.loads(g.spec)
        except ValueError:
            choices = None
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise RequestError("guided_choice must be a non-empty list of strings")
        return llg.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in choices)
        )
    try:  # Lark, or llama.cpp's GBNF (converted)
        return llg.grammar_from("grammar", g.spec)
    except ValueError as e:
        raise RequestError(f"cannot read this grammar: {e}") from None


class GuidedDecoder:
    """Compiles and caches grammars, builds per-step token masks for one engine."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_ids: frozenset[int],
        device: torch.device,
        max_rows: int,
        threads: int | None = None,
        copies: int | None = None,
    ) -> None:
        """``threads``: mask-building threads (None: ``default_threads``); ``copies``:
        compiled templates per grammar (None: COPIES_PER_THREAD a thread, one for one
        thread: copies of one template build their masks one at a time, ``matcher``)."""
        import llguidance as llg

        self.vocab_size = vocab_size
        self.device = device
        self.words = (vocab_size + 31) // 32
        self._llt = llg.LLTokenizer(
            tokenizer.backend_json(), n_vocab=vocab_size, eos_token=sorted(eos_ids) or None
        )
        self.use_threads(threads)
        # one step's masks at a time, built off the engine thread (start_masks)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvgrid-guided")
        self._cache: OrderedDict[GuidedDecoding, _Grammar] = OrderedDict()
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="kvgrid-grammar")
        if copies is None:
            copies = 1 if self.threads == 1 else COPIES_PER_THREAD * self.threads
        self.copies = max(1, copies)
        self._turn = 0
        self._lock = threading.Lock()  # the frontend may validate while the engine steps
        pin = device.type == "cuda"
        self._host = [
            torch.empty(max_rows, self.words, dtype=torch.int32, pin_memory=pin) for _ in range(3)
        ]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._host)
        self._next = 0
        self.mask_s: float | None = None  # EWMA of host time per masked step
        self.build_s: float | None = None  # EWMA of llguidance's own time per step's masks
        self.build_times: deque[float] = deque(maxlen=4096)  # the latest, each
        self.masked_steps = 0
        self.overlapped_steps = 0  # masks built while the last step's outputs were made
        self.errors = 0  # tokens a matcher refused (sampled outside its mask)

    def use_threads(self, threads: int | None) -> None:
        """Build masks on ``threads`` threads from now on (None: ``default_threads``)."""
        import llguidance as llg

        self.threads = threads or default_threads()
        self._executor = llg.LLExecutor(num_threads=self.threads)

    # ---- grammars ------------------------------------------------------------------------

    def matcher(self, g: GuidedDecoding) -> Any:
        """A fresh matcher for ``g``, copied from its compiled templates in turn. A grammar
        is compiled once on the caller's thread; ``copies - 1`` more templates of it are
        compiled in the background (matchers copied from one template share its lexer, and
        build their masks one at a time however many threads build them: templates of
        their own let a step's rows build in parallel)."""
        import llguidance as llg

        with self._lock:
            entry = self._cache.get(g)
            if entry is not None:
                self._cache.move_to_end(g)
                self._turn += 1
                return entry.templates[self._turn % len(entry.templates)].deep_copy()
        text = _grammar_text(g)
        template = llg.LLMatcher(self._llt, text, log_level=0)
        if template.is_error():
            why = template.get_error().split("LexerSpec")[0].strip()[:500]
            raise RequestError(f"cannot use this {g.kind.replace('_', ' ')}: {why}")
        with self._lock:
            entry = self._cache.setdefault(g, _Grammar(text, [template]))
            total = sum(len(e.templates) for e in self._cache.values())
            while len(self._cache) > CACHE_SIZE or total > MAX_TEMPLATES:
                total -= len(self._cache.popitem(last=False)[1].templates)
            if self.copies > 1 and entry.growing is None:
                entry.growing = self._compiler.submit(self._grow, g, entry)
            return template.deep_copy()

    def _grow(self, g: GuidedDecoding, entry: _Grammar) -> None:
        """Compile ``entry``'s further templates (on the compiler's thread)."""
        import llguidance as llg

        while len(entry.templates) < self.copies:
            with self._lock:
                if self._cache.get(g) is not entry:
                    return  # evicted meanwhile
            template = llg.LLMatcher(self._llt, entry.text, log_level=0)
            with self._lock:
                entry.templates.append(template)

    def settle(self) -> None:
        """Wait until the templates being compiled in the background are in place."""
        with self._lock:
            pending = [e.growing for e in self._cache.values() if e.growing is not None]
        for f in pending:
            f.result()

    def stats(self) -> dict:
        return {
            "guided_mask_s": self.mask_s,
            "guided_build_s": self.build_s,
            "guided_masked_steps": self.masked_steps,
            "guided_overlapped_steps": self.overlapped_steps,
            "guided_grammars_cached": len(self._cache),
            "guided_errors": self.errors,
        }

    # ---- per token -----------------------------------------------------------------------

    def accept(self, seq: Sequence, token: int) -> None:
        """Advance ``seq``'s matcher past ``token``."""
        m = seq.matcher
        if m.is_stopped():
            return
        if not m.consume_token(token):
            self.errors += 1
            log.warning(
                "%s: token %d is outside its grammar: %s", seq.request_id, token, m.get_error()
            )

    @staticmethod
    def done(seq: Sequence) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""
        return seq.matcher.is_stopped()

    # ---- per step ------------------------------------------------------------------------

    def masks(self, seqs: list[Sequence]) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(rows, bitmask) on the device for the constrained rows of a step's ``seqs`` (rows
        None: all of them); the bitmask holds one bit per token id, 32 to an int32, set where
        the token is allowed."""
        return self.finish_masks(self.start_masks(seqs, background=False))

    def start_masks(self, seqs: list[Sequence], background: bool = True) -> MaskJob | None:
        """Begin ``masks(seqs)`` on the decoder's thread and return at once: llguidance
        drops the GIL, so the caller's own host work (the last step's outputs) runs
        meanwhile. No matcher of ``seqs`` may be touched until ``finish_masks``."""
        todo = [
            (s.matcher, i)
            for i, s in enumerate(seqs)
            if s.matcher is not None and not s.is_finished
        ]
        if not todo:
            return None
        t0 = time.perf_counter()
        k = self._next
        self._next = (k + 1) % len(self._host)
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy that last read this buffer is done
        host = self._host[k][: len(todo)]
        # in parallel across rows (llguidance.torch's wrapper; importing that module
        # compiles a kernel kvgrid does not use)
        rows_of = [(m, j) for j, (m, _) in enumerate(todo)]
        args = (rows_of, host.data_ptr(), self.words * 4, len(todo))
        if background:
            future = self._pool.submit(self._build, args)
        else:  # nothing to overlap: no hop to the pool's thread
            self._build(args)
            future = Future()
            future.set_result(None)
        rows = [i for _, i in todo] if len(todo) < len(seqs) else None
        return MaskJob(k, host, rows, future, t0)

    def _build(self, args: tuple) -> None:
        t0 = time.perf_counter()
        self._executor.unsafe_compute_mask_ptr(*args)
        dt = time.perf_counter() - t0
        self.build_times.append(dt)
        self.build_s = ewma(self.build_s, dt, 0.1)

    def finish_masks(self, job: MaskJob | None) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Wait for ``job`` and hand its masks to the device (see ``masks``)."""
        if job is None:
            return None
        job.future.result()
        rows = None if job.rows is None else torch.tensor(job.rows, dtype=torch.int64)
        if self.device.type == "cuda":
            bitmask = job.host.to(self.device, non_blocking=True)
            if rows is not None:
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._events[job.buffer] = ev
        else:
            bitmask = job.host.clone()  # the next step fills this buffer again
        dt = time.perf_counter() - job.t0
        self.mask_s = ewma(self.mask_s, dt, 0.1)
        self.masked_steps += 1
        return rows, bitmask


@dataclass
class _Grammar:
    """A grammar's compiled templates (``GuidedDecoder.matcher``)."""

    text: str  # llguidance's grammar
    templates: list[Any]
    growing: Future | None = None  # the background compiles of further templates


@dataclass
class MaskJob:
    """Masks being built: the pinned buffer they land in and the rows they are for."""

    buffer: int
    host: torch.Tensor
    rows: list[int] | None
    future: Future
    t0: float


_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte of a bitmask, what its 8 tokens add to their logits."""
    lut = _LUTS.get((device, dtype))
    if lut is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        lut = torch.zeros(256, 8).masked_fill(bits == 0, float("-inf"))
        lut = _LUTS[(device, dtype)] = lut.to(device=device, dtype=dtype)
    return lut


def apply_token_bitmask(
    logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor
) -> None:
    """Set to -inf, in place, every logit of ``rows`` (None: every row) whose bit in
    ``bitmask`` is clear. On a GPU one kernel reads the mask once and writes only the
    refused logits (the table lookup below makes several passes over [rows, vocab] and
    costs ~0.7 ms a step at batch 64 and 128K tokens on an H200, a tenth of the step)."""
    if logits.is_cuda:
        from kvgrid.layers.token_mask_kernels import mask_logits

        mask_logits(logits, rows, bitmask)
        return
    apply_token_bitmask_reference(logits, rows, bitmask)


def apply_token_bitmask_reference(
    logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor
) -> None:
    """``apply_token_bitmask`` with torch operations: each byte of the mask looks its 8
    tokens up in a table (one gather, where unpacking the bits takes several passes)."""
    vocab = logits.shape[-1]
    idx = bitmask.view(torch.uint8).long()  # little-endian: byte j holds tokens 8j..8j+7
    add = F.embedding(idx, _lut(logits.device, logits.dtype)).flatten(1)[:, :vocab]
    if rows is None:
        logits.add_(add)
    else:
        logits.index_add_(0, rows, add)
