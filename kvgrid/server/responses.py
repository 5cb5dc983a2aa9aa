"""Building OpenAI response bodies: one ChoiceState per choice gathers the worker's deltas
and writes the choice (whole, or as streamed chunks) with its logprobs and tool calls."""

from __future__ import annotations

import math
from typing import Any

from kvgrid.server.tool_parsers import ToolCall, ToolCallStream

FLOOR = -9999.0  # OpenAI's logprob for a token that cannot be drawn (JSON has no -inf)


def _lp(v: float) -> float:
    return v if math.isfinite(v) else FLOOR


def _top(entry: dict[str, float], n: int) -> list[tuple[int, float]]:
    items = sorted(((int(k), v) for k, v in entry.items()), key=lambda kv: -kv[1])
    return items[:n]


def chat_logprobs(tok: Any, ids: list[int], entries: list[dict], n: int) -> list[dict]:
    def one(tid: int, lp: float) -> dict:
        b = tok.token_bytes(tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": _lp(lp), "bytes": list(b)}

    return [
        {**one(tid, e[str(tid)]), "top_logprobs": [one(t, v) for t, v in _top(e, n)]}
        for tid, e in zip(ids, entries)
    ]


def completion_logprobs(
    tok: Any, ids: list[int], entries: list[dict | None], n: int, offset: int
) -> dict[str, list]:
    out: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for tid, e in zip(ids, entries):
        text = tok.token_text(tid)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:  # the prompt's first token: nothing scores it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(e[str(tid)]))
        out["top_logprobs"].append({tok.token_text(t): _lp(v) for t, v in _top(e, n)})
    return out


def _join(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    return b if a is None else {k: a[k] + b[k] for k in b}


class ChoiceState:
    """One choice of a response as its deltas arrive."""

    def __init__(
        self,
        index: int,
        chat: bool,
        tok: Any = None,
        top_logprobs: int | None = None,  # None: no logprobs
        tools: ToolCallStream | None = None,
        echo: tuple[str, list[int], list | None] | None = None,  # prompt text, ids, logprobs
        drop_output: bool = False,  # echo with max_tokens 0: the token drawn is not shown
    ) -> None:
        self.index, self.chat, self.tok, self.top = index, chat, tok, top_logprobs
        self.tools, self.echo, self.drop = tools, echo, drop_output
        self.parts: list[str] = []
        self.ids: list[int] = []
        self.entries: list[dict] = []
        self.finish_reason: str | None = None
        self.calls: list[ToolCall] = []
        self.started = False

    def add(self, msg: dict) -> None:
        if not self.drop:
            self.parts.append(msg.get("text", ""))
            self.ids.extend(msg.get("ids", ()))
            self.entries.extend(msg.get("logprobs", ()))
        if "finish_reason" in msg:
            self.finish_reason = "length" if self.drop else msg["finish_reason"]

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _finish(self) -> str | None:
        return "tool_calls" if self.calls else self.finish_reason

    def _logprobs(self, ids: list[int], entries: list[dict], offset: int = 0) -> Any:
        if self.top is None:
            return None
        if self.chat:
            return {"content": chat_logprobs(self.tok, ids, entries, self.top)}
        return completion_logprobs(self.tok, ids, entries, self.top, offset)

    def _echo_logprobs(self) -> dict | None:
        if self.top is None or self.echo is None:
            return None
        _, ids, entries = self.echo
        return completion_logprobs(self.tok, ids, entries or [None] * len(ids), self.top, 0)

    # ---- the whole response ----------------------------------------------------------------

    def choice(self) -> dict[str, Any]:
        text = self.text
        if not self.chat:
            prefix = self.echo[0] if self.echo is not None else ""
            lp = self._logprobs(self.ids, self.entries, len(prefix))
            if lp is not None and self.echo is not None:
                lp = _join(self._echo_logprobs(), lp)
            return {
                "index": self.index,
                "text": prefix + text,
                "logprobs": lp,
                "finish_reason": self.finish_reason,
            }
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tools is not None:
            content, self.calls = self.tools.parser.extract(text)
            if self.calls:
                message["content"] = content
                message["tool_calls"] = [c.to_dict() for c in self.calls]
        return {
            "index": self.index,
            "message": message,
            "logprobs": self._logprobs(self.ids, self.entries),
            "finish_reason": self._finish(),
        }

    # ---- streamed chunks -------------------------------------------------------------------

    def opening(self) -> dict[str, Any] | None:
        """The first chunk of this choice: the role (chat), or the echoed prompt."""
        self.started = True
        if self.chat:
            return self._chunk({"role": "assistant", "content": ""})
        if self.echo is not None:
            return {
                "index": self.index,
                "text": self.echo[0],
                "logprobs": self._echo_logprobs(),
                "finish_reason": None,
            }
        return None

    def chunks(self, msg: dict) -> list[dict[str, Any]]:
        """Chunk choices for one delta of this choice (after ``add(msg)``)."""
        out = []
        text = "" if self.drop else msg.get("text", "")
        ids = [] if self.drop else list(msg.get("ids", ()))
        entries = [] if self.drop else list(msg.get("logprobs", ()))
        done = "finish_reason" in msg
        if self.chat:
            if self.tools is not None:
                text = self.tools.feed(text)
                if done:
                    rest, self.calls = self.tools.finish()
                    text += rest
            # a model without a tokenizer (random weights of a shape) has no text: its
            # chunks carry the token ids, so a client sees each token and the stream's timing
            textless = self.tok is None and ids
            if text or (entries and self.top is not None) or textless:
                out.append(self._chunk({"content": text}, self._logprobs(ids, entries)))
                if textless:
                    out[-1]["token_ids"] = ids
            if self.calls:
                deltas = [{"index": i, **c.to_dict()} for i, c in enumerate(self.calls)]
                out.append(self._chunk({"tool_calls": deltas}))
            if done:
                out.append(self._chunk({}, finish=self._finish()))
            return out
        if text or done or entries or (self.tok is None and ids):
            offset = len(self.echo[0] if self.echo else "") + len(self.text) - len(text)
            out.append(
                {
                    "index": self.index,
                    "text": text,
                    "logprobs": self._logprobs(ids, entries, offset) if entries else None,
                    "finish_reason": self.finish_reason if done else None,
                }
            )
            if self.tok is None and ids:
                out[-1]["token_ids"] = ids
        return out

    def _chunk(self, delta: dict, logprobs: Any = None, finish: str | None = None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
