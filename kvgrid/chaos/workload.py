"""The campaign's workload: seeded multi-turn chats at temperature 0, and the check of an
answer against the fault-free reference.

Conversations share a few long system prompts (context that the store keeps and that
workers share through G4), then alternate user turns with the assistant's reference
answers, so that every request of a conversation is known in advance whatever happened to
the requests before it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

_WORDS = (
    "river", "mountain", "engine", "harbor", "lantern", "garden", "circuit", "library",
    "market", "orbit", "signal", "compass", "meadow", "archive", "bridge", "canyon", "forest",
    "glacier", "island", "jungle", "kernel", "ledger", "memory", "network", "ocean", "planet",
    "quarry", "rocket", "satellite", "tunnel", "valley", "window", "yard", "zenith",
    "battery", "cabinet", "crystal", "desert", "ember", "falcon", "gravity", "horizon",
    "ivory", "journey", "kettle", "lighthouse", "magnet", "nebula", "oracle", "pepper",
    "quartz", "radar", "saddle", "thunder", "umbrella", "velvet", "whistle",
)  # fmt: skip
_TOPICS = (
    "the history of lighthouses", "how rivers shape valleys", "building a small garden",
    "the life of honey bees", "why the sky is blue", "planning a mountain hike",
    "the basics of cooking rice", "how bridges carry weight", "stars and constellations",
    "caring for a houseplant", "the rules of chess", "how trains run on time",
)  # fmt: skip
_ASKS = (
    "Explain {t} in simple words.", "Give me three facts about {t}.",
    "What is the most surprising thing about {t}?", "Summarise {t} for a child.",
    "List two common mistakes about {t}.", "How would you teach {t} to a friend?",
)  # fmt: skip


@dataclass(frozen=True)
class Turn:
    conv: int
    turn: int
    stream: bool
    max_tokens: int

    @property
    def key(self) -> str:
        return f"{self.conv}:{self.turn}"


class Workload:
    """``conversations`` chats of ``turns`` turns each, fully determined by ``seed``."""

    def __init__(
        self,
        seed: int = 0,
        conversations: int = 48,
        turns: int = 4,
        systems: int = 3,
        max_tokens: int = 24,
        stream_share: float = 0.7,
        system_rules: int = 22,
    ) -> None:
        """``system_rules``: length of the system prompts (about 20 tokens a rule)."""
        self.seed, self.conversations, self.turns = seed, conversations, turns
        self.max_tokens = max_tokens
        rng = random.Random(seed)
        self.systems = [self._system(rng, i, system_rules) for i in range(systems)]
        self.system_of = [rng.randrange(systems) for _ in range(conversations)]
        self.users = [[self._user(rng, c, t) for t in range(turns)] for c in range(conversations)]
        self.plan = [
            [
                Turn(c, t, rng.random() < stream_share, rng.randint(max_tokens // 2, max_tokens))
                for t in range(turns)
            ]
            for c in range(conversations)
        ]

    @staticmethod
    def _system(rng: random.Random, i: int, n_rules: int) -> str:
        rules = " ".join(
            f"Rule {j + 1}: when the user mentions the {rng.choice(_WORDS)}, answer with care "
            f"about the {rng.choice(_WORDS)} and the {rng.choice(_WORDS)}."
            for j in range(n_rules)
        )
        return f"You are assistant number {i}. Keep answers short and plain. {rules}"

    @staticmethod
    def _user(rng: random.Random, c: int, t: int) -> str:
        ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
        extra = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 50)))
        return f"[chat {c}, question {t + 1}] {ask} Keep in mind: {extra}."

    @property
    def fingerprint(self) -> str:
        spec = [self.seed, self.conversations, self.turns, self.systems, self.users,
                [[(x.stream, x.max_tokens) for x in row] for row in self.plan]]  # fmt: skip
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]

    def turns_of(self, conv: int) -> list[Turn]:
        return self.plan[conv]

    def body(self, turn: Turn, answers: dict[str, dict], model: str | None = None) -> dict:
        """The chat request of ``turn``; earlier turns carry their reference answers."""
        c = turn.conv
        msgs = [{"role": "system", "content": self.systems[self.system_of[c]]}]
        for t in range(turn.turn):
            msgs.append({"role": "user", "content": self.users[c][t]})
            msgs.append({"role": "assistant", "content": answers[f"{c}:{t}"]["text"]})
        msgs.append({"role": "user", "content": self.users[c][turn.turn]})
        body = {
            "messages": msgs,
            "max_tokens": turn.max_tokens,
            "temperature": 0,
            "stream": turn.stream,
        }
        if model:
            body["model"] = model
        return body


# ---- outcomes ---------------------------------------------------------------------------

IDENTICAL, CLEAN, WRONG, HUNG = "identical", "clean_error", "wrong", "hung"
# the statuses a fault may rightly end a request with: overload, a worker lost for good,
# no worker, a deadline
CLEAN_STATUSES = (429, 502, 503, 504)


@dataclass
class Answer:
    """What the client saw of one request."""

    status: int | None = None  # HTTP status (None: no response)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # error message (body, or an error event in the stream)
    done: bool = False  # the stream ended with [DONE] (or a whole JSON body arrived)
    transport: str | None = None  # "lost" (connection broke), "closed" (by the client), "hung"
    worker: str | None = None
    seconds: float = 0.0


def judge(a: Answer, ref: dict, fault: str) -> tuple[str, str]:
    """(outcome, detail) of an answer against its reference ``{"text", "finish_reason"}``."""
    prefix_ok = ref["text"].startswith(a.text)
    if a.transport == "hung":
        return HUNG, "no answer before the deadline"
    if a.transport == "closed":
        return (CLEAN, "client closed") if prefix_ok else (WRONG, "text before close differs")
    if a.transport == "lost":
        if fault == "router_restart" and prefix_ok:
            return CLEAN, "router died mid-request"
        return WRONG, "connection lost" if prefix_ok else "connection lost, text differs"
    if a.status == 200 and a.done and a.error is None:
        if a.text == ref["text"] and a.finish_reason == ref["finish_reason"]:
            return IDENTICAL, ""
        return WRONG, "text differs" if a.text != ref["text"] else "finish reason differs"
    if a.error is not None and a.status == 200:  # an error event in a stream
        if a.done and prefix_ok:
            return CLEAN, f"stream error: {a.error[:80]}"
        return WRONG, "stream error after a wrong text" if a.done else "stream cut"
    if a.status in CLEAN_STATUSES and a.error is not None and not a.text:
        return CLEAN, f"HTTP {a.status}: {a.error[:80]}"
    return WRONG, f"HTTP {a.status}: {(a.error or '')[:80]}"
