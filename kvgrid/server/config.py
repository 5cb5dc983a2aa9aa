"""FrontendConfig: how a router frontend treats requests, frozen once built. The fields a
command sets are its flags (kvgrid.flags): each docstring is the flag's help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvgrid.flags import flag
from kvgrid.models.default import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class FrontendConfig:
    model_name: str = field(default=DEFAULT_MODEL_NAME, metadata=flag(cli=False))
    tokenizer: Any = field(default=None, metadata=flag(cli=False))
    """kvgrid.models.tokenizer.Tokenizer; None: token-id prompts only"""
    max_retries: int = field(default=2, metadata=flag(cli=False))
    """other workers tried when one cannot take a request"""
    log_decisions: bool = False
    """log every routing decision with each candidate's numbers"""
    public: bool = field(default=False, metadata=flag(cli=False))
    """bound beyond loopback: operator views need the admin token"""
    scope_id: str = field(default="", metadata=flag(cli=False))
    """fingerprint of the server secret (tenants.scope_id)"""
    max_migrations: int = 3
    """times a request may move to another worker when its worker is lost (0: never; it
    then ends with an error)"""
    stall_s: float = field(default=15.0, metadata=flag("stall-timeout"))
    """seconds a worker may stay silent on a request before it is probed; one that does not
    answer is lost and its requests move"""
    probe_s: float = field(default=3.0, metadata=flag(cli=False))
    """the probe's wait for an answer (/health) before the worker is lost"""
    stall_check_s: float = field(default=0.5, metadata=flag(cli=False))
    """how often a waiting request looks at its worker"""
    worker_wait_s: float = field(default=0.0, metadata=flag("worker-wait"))
    """seconds a request that finds no worker up waits for one (starting, restarting,
    rejoining a restarted router) before a 503 (default: none)"""
    queue_timeout_s: float = field(default=600.0, metadata=flag("queue-timeout"))
    """longest wait for an admission slot before a 503"""
    tool_call_parser: str = field(default="auto", metadata=flag(cli=False))
    """format of the model's tool calls (kvgrid.server.tool_parsers.PARSERS; auto: from
    its tokenizer, hermes otherwise)"""
