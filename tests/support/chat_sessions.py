"""Concurrent multi-turn chats against a kvgrid router, for tests that compare the router's
predicted cached tokens with what the workers report."""

from __future__ import annotations

import threading

import httpx


def multi_turn(url: str, headers: dict, sessions: int = 4, turns: int = 3) -> list[tuple]:
    """(predicted cached tokens, reported cached tokens, worker, turn) per request."""
    results, errors = [], []

    def session(i: int) -> None:
        system = f"You are assistant number {i}. " + " ".join(
            f"Rule {j}: answer briefly about topic {i * 100 + j}." for j in range(14)
        )
        msgs = [{"role": "system", "content": system}]
        with httpx.Client(timeout=120, headers=headers) as c:
            for turn in range(turns):
                # long enough that each turn crosses block boundaries, so the blocks of the
                # previous answer are part of what must be predicted
                ask = f"Question {turn} of session {i}: " + "explain the details again. " * 12
                msgs.append({"role": "user", "content": ask})
                r = c.post(
                    f"{url}/v1/chat/completions",
                    json={"messages": msgs, "max_tokens": 6, "temperature": 0},
                )
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                body = r.json()
                results.append(
                    (
                        int(r.headers["x-kvgrid-predicted-cached-tokens"]),
                        body["usage"]["prompt_tokens_details"]["cached_tokens"],
                        r.headers["x-kvgrid-worker"],
                        turn,
                    )
                )
                msgs.append(
                    {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
                )

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    return results
