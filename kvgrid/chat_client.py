"""`kvgrid chat --url`: a terminal chat with a running server, through its OpenAI API.

Each turn posts the whole conversation to ``/v1/chat/completions`` with streaming on, prints
the answer as it arrives and then the usage the server reports (the prompt tokens its prefix
cache or context store supplied). The turn-taking (``questions``) and the usage line
(``print_usage``) are the local chat's too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx


class ChatError(Exception):
    """The server refused a request or could not be reached (the message says which)."""


@dataclass(frozen=True)
class Turn:
    text: str
    usage: dict[str, Any]


class RemoteChat:
    """One conversation with an OpenAI-compatible server."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10))
        self.model = model

    def close(self) -> None:
        self.client.close()

    def resolve_model(self) -> str:
        """The model to ask: the one given, else the first the server lists."""
        if self.model is None:
            data = self._json(self._request("GET", "/models")).get("data") or []
            if not data:
                raise ChatError(f"{self.base}/models lists no model; pass --model")
            self.model = str(data[0]["id"])
        return self.model

    def ask(
        self,
        messages: list[dict[str, str]],
        sampling: dict[str, Any],
        on_text: Callable[[str], None] = lambda _: None,
    ) -> Turn:
        """Stream one answer, handing each piece of text to ``on_text`` as it arrives."""
        body = {
            "model": self.resolve_model(),
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **{k: v for k, v in sampling.items() if v is not None},
        }
        parts: list[str] = []
        usage: dict[str, Any] = {}
        try:
            with self.client.stream("POST", f"{self.base}/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise ChatError(_error_text(r))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        raise ChatError(str(msg["error"].get("message", msg["error"])))
                    usage = msg.get("usage") or usage
                    for choice in msg.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            parts.append(piece)
                            on_text(piece)
        except httpx.HTTPError as e:
            raise ChatError(f"{self.base}: {type(e).__name__}: {e}") from None
        return Turn("".join(parts), usage)

    def _request(self, method: str, path: str) -> httpx.Response:
        try:
            r = self.client.request(method, f"{self.base}{path}")
        except httpx.HTTPError as e:
            raise ChatError(f"{self.base}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise ChatError(_error_text(r))
        return r

    @staticmethod
    def _json(r: httpx.Response) -> dict[str, Any]:
        try:
            return r.json()
        except ValueError:
            raise ChatError(f"{r.request.url}: not a JSON answer") from None


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error") or {}
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except ValueError:
        msg = r.text[:300]
    return f"HTTP {r.status_code} from {r.request.url}: {msg}"


def questions(message: str | None) -> Iterator[str]:
    """The one question given; else what the user types, turn by turn, until end of input,
    an empty line, /exit or /quit."""
    if message is not None:
        yield message
        return
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            return
        if question in ("", "/exit", "/quit"):
            return
        sys.stdout.write("assistant> ")
        yield question


def print_usage(completion_tokens: int | str, cached: int, prompt_tokens: int | str) -> None:
    print(
        f"[{completion_tokens} tokens; {cached} of {prompt_tokens} prompt tokens from cache]",
        file=sys.stderr,
    )


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(
    remote: RemoteChat, message: str | None, system: str | None, sampling: dict[str, Any]
) -> int:
    """One question (``message``) or an interactive loop; prints as the local chat does.
    A turn the server refuses ends a one-question chat; an interactive one goes on."""
    history = [{"role": "system", "content": system}] if system else []
    for question in questions(message):
        history.append({"role": "user", "content": question})
        try:
            turn = remote.ask(history, sampling, _print_now)
        except ChatError:
            if message is not None:
                raise
            history.pop()
            sys.stdout.write("\n")
            print(f"error: {sys.exc_info()[1]}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": turn.text})
        u = turn.usage
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        print_usage(u.get("completion_tokens", "?"), cached, u.get("prompt_tokens", "?"))
    return 0
