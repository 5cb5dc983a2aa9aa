"""Polling a live server's scaling state, for the tests that resize one under load
(`kvgrid serve`, `kvgrid serve --ray`)."""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scale_state(url: str) -> dict:
    """``GET /admin/scale``: workers (where each runs), retired ones, actions."""
    return httpx.get(f"{url}/admin/scale", timeout=5).json()


def inflight(url: str) -> dict[str, int]:
    """Requests in flight per worker that is up, as the router counts them."""
    ws = httpx.get(f"{url}/debug/router", timeout=5).json()["workers"]
    return {wid: w["inflight"] for wid, w in ws.items() if w["up"]}


def wait_for(pred, timeout: float, what: str, url: str):
    """``pred()``'s first true value within ``timeout`` (a failing poll counts as false);
    else an AssertionError with the server's scaling state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s: {scale_state(url)}")
