"""Logging for every kvgrid process, set up once by its entry point (the `kvgrid` command,
a Ray actor): one format, the level from ``--log-level``, else ``$KVGRID_LOG``, else the
command's default."""

from __future__ import annotations

import logging

from kvgrid import envs

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(flag: str | None = None, default: str = "INFO") -> str:
    """The level a process logs at; a name that is not a level is a ValueError naming it."""
    level = (flag or envs.KVGRID_LOG.raw() or default).upper()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (KVGRID_LOG or --log-level): {LEVELS}")
    return level


def setup_logging(flag: str | None = None, default: str = "INFO") -> None:
    """Configure the root logger for this process (a no-op where it already has handlers)."""
    logging.basicConfig(level=log_level(flag, default), format=FORMAT)
    # one line per HTTP request made would drown what kvgrid itself says
    logging.getLogger("httpx").setLevel(logging.WARNING)
