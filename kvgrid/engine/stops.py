"""When a sequence stops: a stop token or EOS, a stop string in its text, its length limit,
or a complete grammar. ``finish_reason`` and ``stop_reason`` follow the OpenAI API."""

from __future__ import annotations

from kvgrid.engine.sequence import Sequence, SequenceStatus


def check_stops(
    seq: Sequence,
    token: int,
    eos_ids: frozenset[int],
    max_model_len: int,
    grammar_done: bool | None,
) -> None:
    """Finish ``seq`` if ``token``, just appended (its text too), ends it. ``grammar_done``:
    whether its grammar is complete (None without one)."""
    p = seq.params
    n_out = len(seq.output_token_ids)
    if n_out >= p.min_tokens:
        if token in p.stop_token_ids:
            return finish(seq, "stop", token)
        if token in eos_ids and not p.ignore_eos:
            return finish(seq, "stop", token)
        if p.stop and _cut_at_stop_string(seq):
            return None
    if n_out >= seq.max_tokens or seq.num_known_tokens >= max_model_len:
        finish(seq, "length", None)
    elif grammar_done:
        finish(seq, "stop", None)  # the grammar is complete
    return None


def _cut_at_stop_string(seq: Sequence) -> bool:
    # only text not yet emitted (and a stop string's length before it) can hold a new match
    longest = max(len(s) for s in seq.params.stop)
    window_start = max(0, seq.emitted_text_len - longest)
    for stop in seq.params.stop:
        at = seq.text.find(stop, window_start)
        if at >= 0:
            end = at + len(stop) if seq.params.include_stop_str_in_output else at
            seq.text = seq.text[:end]
            finish(seq, "stop", stop)
            return True
    return False


def finish(seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
    if seq.detokenizer is not None and not isinstance(stop_reason, str):
        # release text held back for an unfinished character (a stop string already cut it)
        seq.text += seq.detokenizer.flush()
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason, seq.stop_reason = reason, stop_reason
    seq.drop_pending()
