"""Every ``KVGRID_*`` environment variable kvgrid reads: name, type, default and meaning,
declared once. Code reads a variable through its declaration (``envs.KVGRID_LOG.get()``),
at the moment it needs it, so that a variable set at run time (a test, a parent process
preparing a child's environment) is seen. An empty value counts as unset.

``python -m kvgrid.envs`` prints the table the README carries (a test keeps them equal)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _on_unless_zero(raw: str) -> bool:
    return raw != "0"


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    parse: Callable[[str], T]
    default: T
    doc: str
    type_name: str
    secret: bool = False  # never logged, never passed on a command line

    def raw(self) -> str | None:
        """The value as set, None when unset or empty."""
        return os.environ.get(self.name) or None

    def is_set(self) -> bool:
        return self.raw() is not None

    def get(self) -> T:
        raw = self.raw()
        return self.default if raw is None else self.parse(raw)


ALL: dict[str, EnvVar] = {}


def _declare(
    name: str,
    parse: Callable[[str], T],
    default: T,
    doc: str,
    type_name: str,
    secret: bool = False,
) -> EnvVar[T]:
    var = EnvVar(name, parse, default, doc, type_name, secret)
    ALL[name] = var
    return var


# Where things are kept
KVGRID_HOME: EnvVar[Path | None] = _declare(
    "KVGRID_HOME",
    _path,
    None,
    "kvgrid's cache root: converted models, the store dir, the server secret "
    "(default `$XDG_CACHE_HOME/kvgrid` or `~/.cache/kvgrid`)",
    "path",
)
KVGRID_STORE_DIR: EnvVar[Path | None] = _declare(
    "KVGRID_STORE_DIR",
    _path,
    None,
    "the context store's local folder: G3 under `g3/`, the local master key "
    "(default `$KVGRID_HOME/store`)",
    "path",
)
KVGRID_TRACES: EnvVar[Path | None] = _declare(
    "KVGRID_TRACES",
    _path,
    None,
    "folder of the Mooncake traces that workload specs name (default: the conversation and "
    "synthetic traces shipped in `kvgrid/bench/data/mooncake/`)",
    "path",
)
# Secrets
KVGRID_MASTER_KEY: EnvVar[str | None] = _declare(
    "KVGRID_MASTER_KEY",
    str,
    None,
    "master key of stored KV, `ID:HEX[,ID:HEX...]` (else `--kv-master-key-file`, else a "
    "local key made once)",
    "secret",
    secret=True,
)
KVGRID_KV_STORE_REDIS: EnvVar[str | None] = _declare(
    "KVGRID_KV_STORE_REDIS",
    str,
    None,
    "G4 on Redis/Valkey: `redis://[user:password@]host:port/db` or `rediss://` "
    "(what `--kv-store-redis` takes, kept off the command line)",
    "secret",
    secret=True,
)
KVGRID_REDIS_PASSWORD: EnvVar[str | None] = _declare(
    "KVGRID_REDIS_PASSWORD",
    str,
    None,
    "Redis password where the G4 URL carries none",
    "secret",
    secret=True,
)
KVGRID_CONTROL_KEY: EnvVar[str | None] = _declare(
    "KVGRID_CONTROL_KEY",
    str,
    None,
    "the control key itself (cluster key on routers, a worker's own key on workers)",
    "secret",
    secret=True,
)
KVGRID_CONTROL_KEY_FILE: EnvVar[Path | None] = _declare(
    "KVGRID_CONTROL_KEY_FILE",
    _path,
    None,
    "file holding the control key, mode 0600 (what `--control-key-file` takes)",
    "path",
    secret=True,
)
KVGRID_SERVER_SECRET: EnvVar[str | None] = _declare(
    "KVGRID_SERVER_SECRET",
    str,
    None,
    "the secret tenant scopes derive from, the same on every router "
    "(default: one made once in `$KVGRID_HOME/server_secret`)",
    "secret",
    secret=True,
)
KVGRID_ADMIN_TOKEN: EnvVar[str | None] = _declare(
    "KVGRID_ADMIN_TOKEN",
    str,
    None,
    "bearer token of the operator's endpoints (`/admin/*`, `/debug/router`, `/metrics`)",
    "secret",
    secret=True,
)
KVGRID_API_KEYS: EnvVar[str | None] = _declare(
    "KVGRID_API_KEYS",
    str,
    None,
    "API keys -> tenants, as JSON or `key=tenant,key=tenant` (what `--api-keys` reads from a file)",
    "secret",
    secret=True,
)
KVGRID_API_KEY: EnvVar[str | None] = _declare(
    "KVGRID_API_KEY",
    str,
    None,
    "the API key the clients send (`kvgrid chat --url`, `kvgrid bench replay`; what "
    "`--api-key` takes)",
    "secret",
    secret=True,
)
# Logging
KVGRID_LOG: EnvVar[str] = _declare(
    "KVGRID_LOG",
    str,
    "INFO",
    "log level of every kvgrid process (`--log-level` wins); unset, the commands other than "
    "serve, worker and router log at WARNING",
    "level",
)
KVGRID_CHAOS_LOG: EnvVar[str] = _declare(
    "KVGRID_CHAOS_LOG",
    str,
    "WARNING",
    "log level of the processes `kvgrid chaos` starts",
    "level",
)
# Kernels (process-wide switches for A/B runs)
KVGRID_GEMV: EnvVar[bool] = _declare(
    "KVGRID_GEMV",
    _on_unless_zero,
    True,
    "`0`: few-token projections through cuBLAS, not the Triton GEMV (all engines)",
    "bool",
)
KVGRID_GEMV_CONFIGS: EnvVar[Path | None] = _declare(
    "KVGRID_GEMV_CONFIGS",
    _path,
    None,
    "JSON of pinned GEMV launch configs (what `kvgrid bench gpu gemv` saves)",
    "path",
)
KVGRID_PDL: EnvVar[bool] = _declare(
    "KVGRID_PDL",
    _on_unless_zero,
    True,
    "`0`: no programmatic dependent launch between decode kernels",
    "bool",
)


# GPU benchmarks (kvgrid.bench.gpu)
KVGRID_BENCH_SHAPE: EnvVar[str | None] = _declare(
    "KVGRID_BENCH_SHAPE",
    str,
    None,
    "model shape the GPU benchmarks run by default (else an 8B shape on a GPU, SmolLM2-135M "
    "on a CPU)",
    "str",
)
KVGRID_BENCH_DIR: EnvVar[Path | None] = _declare(
    "KVGRID_BENCH_DIR",
    _path,
    None,
    "store directories of `kvgrid bench gpu store` (default `/tmp/kvgrid-store-bench`)",
    "path",
)


def _default_text(var: EnvVar) -> str:
    if var.default is None:
        return "unset"
    if isinstance(var.default, bool):
        return "1" if var.default else "0"
    return f"`{var.default}`"


def markdown_table() -> str:
    """The README's table of environment variables."""
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.type_name} | {_default_text(v)} | {v.doc} |" for v in ALL.values()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
