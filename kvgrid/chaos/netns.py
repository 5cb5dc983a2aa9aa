"""A network namespace joined to this one by a veth pair: a process inside it is another
host as far as the network goes, and cutting the link partitions it from the router.

Needs root (CAP_NET_ADMIN) and the `ip` tool; names carry a random suffix so that several
campaigns or tests can run on one machine.
"""

from __future__ import annotations

import secrets
import subprocess


class NetnsError(OSError):
    """A namespace could not be made (not root, or no `ip`)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class Netns:
    """``host_ip`` (this side) and ``ns_ip`` (inside ``name``) on a /30 of 10.213.x.0."""

    def __init__(self, subnet: int | None = None) -> None:
        tag = secrets.token_hex(3)
        self.name = f"kvgrid-{tag}"
        self.host_if, self.ns_if = f"kvh{tag}", f"kvn{tag}"
        x = subnet if subnet is not None else int(tag[:2], 16) % 64
        self.host_ip, self.ns_ip = f"10.213.{x}.1", f"10.213.{x}.2"
        self.up = False
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _ip("link", "set", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            self._in("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self._in("link", "set", self.ns_if, "up")
            self._in("link", "set", "lo", "up")
        except (NetnsError, FileNotFoundError) as e:
            self.close()
            raise NetnsError(f"cannot make a network namespace (needs root and ip): {e}") from e
        self.up = True

    def _in(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self) -> None:
        """Partition: the namespace's end of the link goes down. Packets in either direction
        are dropped silently (connections time out, as across a failed switch), where a
        down interface on this side would fail them at once (no route)."""
        self._in("link", "set", self.ns_if, "down")
        self.up = False

    def heal(self) -> None:
        self._in("link", "set", self.ns_if, "up")
        self.up = True

    def close(self) -> None:
        _ip("link", "del", self.host_if, check=False)
        _ip("netns", "del", self.name, check=False)
