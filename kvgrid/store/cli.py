"""`kvgrid store stats|ls|verify|clear`: look into a context store's disk and shared tiers.

``stats``, ``ls`` and ``verify`` only read: they create, change, delete or touch nothing
(not even last-use times). ``verify`` lists the objects it would remove; ``verify --remove``
and ``clear --yes`` are the commands that change a store."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvgrid import envs
from kvgrid.store.config import StoreConfig, default_store_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("store", help="show, verify or clear a context store (G3/G4)")
    sub = p.add_subparsers(dest="store_cmd", metavar="ACTION", required=True)
    for name, helptext in (
        ("stats", "usage and objects per tier and tenant"),
        ("ls", "list stored objects"),
        ("verify", "read back and check every object"),
        ("clear", "remove objects (all, or one tenant's)"),
    ):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--dir", help=f"G3 directory (default {default_store_dir() / 'g3'})")
        q.add_argument("--g4-dir", help="G4 shared filesystem directory")
        q.add_argument("--redis", help="G4 Redis/Valkey URL, e.g. redis://host:6379/0")
        q.add_argument("--redis-prefix", default="kvgrid:")
        q.add_argument("--tenant", action="append", default=[], metavar="SCOPE_HEX",
                       help="tenant scope (hex); repeatable. '' is the public scope")  # fmt: skip
        q.add_argument(
            "--master-key-file", help="key file (else $KVGRID_MASTER_KEY or the local key)"
        )
        if name == "ls":
            q.add_argument("--limit", type=int, default=50)
        if name == "verify":
            q.add_argument(
                "--remove", action="store_true", help="remove the bad objects it reports"
            )
        if name == "clear":
            q.add_argument("--yes", action="store_true", help="really remove")
        q.set_defaults(func=_run)


def _open(args, with_keys: bool, read_only: bool):
    from kvgrid.store.crypto import load_keyring
    from kvgrid.store.store import ContextStore

    g3 = args.dir or (None if (args.g4_dir or args.redis) else str(default_store_dir() / "g3"))
    big = 1 << 62  # the tool never writes; capacity belongs to the store's own config
    cfg = StoreConfig(
        g2_bytes=0,
        g3_dir=g3,
        g3_bytes=big,
        g4_dir=args.g4_dir,
        g4_redis=args.redis,
        g4_bytes=big,
        g4_prefix=args.redis_prefix,
        encrypt=False,
        sweep_interval_s=0,
    )
    store = ContextStore(cfg, read_only=read_only)
    if with_keys:
        default_key = default_store_dir() / "master.key"
        if args.master_key_file or envs.KVGRID_MASTER_KEY.is_set() or default_key.exists():
            store.keyring = load_keyring(args.master_key_file)
    return store


def _tenants(args) -> list[bytes]:
    try:
        return [bytes.fromhex(t) for t in args.tenant]
    except ValueError:
        raise SystemExit("--tenant takes the tenant scope in hex") from None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvgrid.store.object import MAX_HEADER, ObjectError, read_header, tenant_id

    console = Console()
    tenants = _tenants(args)
    tids = [tenant_id(t) for t in tenants] or [None]
    if args.dir and not Path(args.dir).exists():
        console.print(f"[red]no store at {args.dir}[/red]")
        return 2
    from kvgrid.store.crypto import MasterKeyError

    writes = args.store_cmd == "clear" or (args.store_cmd == "verify" and args.remove)
    try:
        store = _open(args, with_keys=args.store_cmd == "verify", read_only=not writes)
    except (MasterKeyError, OSError) as e:
        console.print(f"[red]cannot open the store: {e}[/red]")
        return 2
    try:
        if args.store_cmd == "stats":
            t = Table(title="kvgrid context store")
            for c in ("tier", "backend", "up", "tenant", "objects", "used"):
                t.add_column(c)
            for tier in store.lower:
                per: dict[bytes, list[int]] = {}
                for tid in tids:
                    for info in tier.list(tid):
                        acc = per.setdefault(info.tenant_id, [0, 0])
                        acc[0] += 1
                        acc[1] += info.size
                t.add_row(tier.name, tier.backend, str(tier.up), "(all)",
                          str(sum(v[0] for v in per.values())), _size(tier.used()))  # fmt: skip
                for tid, (n, used) in sorted(per.items()):
                    t.add_row("", "", "", tid.hex()[:12], str(n), _size(used))
            console.print(t)
        elif args.store_cmd == "ls":
            t = Table(title="stored objects")
            for c in ("tier", "tenant", "key", "size", "tokens", "created", "last use"):
                t.add_column(c, no_wrap=True, min_width=16 if c == "key" else None)
            shown = 0
            for tier in store.lower:
                for tid in tids:
                    for info in tier.list(tid):
                        if shown >= args.limit:
                            break
                        tokens = "?"
                        if hasattr(tier, "read_prefix"):
                            try:
                                head = tier.read_prefix(info.tenant_id, info.key, MAX_HEADER)
                                tokens = str(read_header(head).token_count)
                            except (ObjectError, TypeError):
                                tokens = "[red]bad header[/red]"
                        t.add_row(tier.name, info.tenant_id.hex()[:12], info.key.hex()[:16],
                                  _size(info.size), tokens, _ago(info.created),
                                  _ago(info.last_access))  # fmt: skip
                        shown += 1
            console.print(t)
        elif args.store_cmd == "verify":
            report = store.verify(tenants, remove_bad=args.remove)
            t = Table(title="verify" + ("" if store.keyring else " (no key: checksums only)"))
            for c in ("tier", "ok", "checksum only", "bad", "removed"):
                t.add_column(c)
            bad = []
            for name, r in report.items():
                t.add_row(
                    name, str(r["ok"]), str(r["checksum_only"]), str(r["bad"]), str(r["removed"])
                )
                bad += [(name, *b) for b in r["bad_objects"]]
            console.print(t)
            for tier_name, tid, key, kind in bad:
                fate = "kept: the key may be wrong" if kind == "decrypt" else "removed"
                if not args.remove:
                    fate = "kept" if kind == "decrypt" else "would remove"
                console.print(f"bad {tier_name} {tid.hex()[:12]} {key.hex()} ({kind}): {fate}")
            if bad and not args.remove:
                console.print("nothing removed; run with --remove to remove them")
            return 1 if bad else 0
        elif args.store_cmd == "clear":
            if not args.yes:
                console.print("clear removes stored objects; run again with --yes")
                return 2
            n = sum(store.clear(t) for t in tenants) if tenants else store.clear()
            console.print(f"removed {n} objects")
    finally:
        store.close()
    return 0


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return (
        f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"
    )
