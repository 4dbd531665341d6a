"""Replicas on separate "machines": network namespaces joined by a bridge, and partitions.

:class:`Netns` makes N namespaces, each with a veth pair whose other end is on a bridge in the
caller's namespace, so every replica has an address of its own on one L2 segment and the caller
(tests, the chaos runner's clients) reaches all of them through the bridge.

Partitions are made *inside* the replicas' namespaces, between replica addresses only, so a
client in the caller's namespace still reaches both sides (as in Jepsen):

* :meth:`Netns.cut` — one-way: a ``blackhole`` route in the sender's namespace drops every
  packet it sends to the other replica (over TCP the cut side soon stalls both ways, because
  its acknowledgements are dropped too, but data already sent still lands);
* :meth:`Netns.cut_both`, :meth:`Netns.isolate`, :meth:`Netns.split` — symmetric cuts;
* :meth:`Netns.link_down` — the replica's veth down: it reaches nobody, clients included;
* :meth:`Netns.heal` — every cut and link undone.

Routes are used because they need nothing but ``ip``: no netfilter (``iptables``/``nft``) and
no ``sch_netem``, which many kernels and containers lack.  Everything made is recorded and
removed by :meth:`Netns.cleanup`; namespaces and links left by a process that died without
cleaning up are swept by the next :meth:`Netns.setup` with the same prefix.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

__all__ = ["Netns", "NetnsError"]


class NetnsError(Exception):
    """Namespaces (or a partition) could not be made here; the message says why."""


class Netns:
    """N network namespaces ``PREFIX-PID-rI``, each with a veth pair whose other end is on a
    bridge ``TAGPIDbr`` in the caller's namespace (addresses NET.X.I+1/24, the bridge .254).

    ``prefix`` names the namespaces and ``tag`` (two letters) the links, so that two users
    (the chaos runner, the partition tests) sweep only their own leftovers; ``net`` is the
    first two octets of the /24 picked (one not in use on this machine).  A subclass may set
    ``PREFIX`` instead of passing ``prefix``."""

    PREFIX = "chaos-"

    def __init__(self, n: int, prefix: str | None = None, tag: str = "cz", net: str = "10.213") -> None:
        self.n = n
        prefix = prefix or self.PREFIX
        self.prefix_ns = prefix
        self.tag_letters = tag
        self.net = net
        pid = os.getpid()
        self.tag = f"{tag}{pid}"
        self.bridge = f"{self.tag}br"
        self.names = [f"{prefix}{pid}-r{i}" for i in range(n)]
        self.host_ends = [f"{self.tag}h{i}" for i in range(n)]
        self.ns_ends = [f"{self.tag}n{i}" for i in range(n)]
        self.subnet: str | None = None
        self.hosts: list[str] = []
        self.made_ns: list[str] = []
        self.made_links: list[str] = []
        self.cuts: set[tuple[int, int]] = set()      # (from, to): packets from -> to dropped
        self.links_down: set[int] = set()

    @staticmethod
    def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
        if check and proc.returncode != 0:
            raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
        return proc

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be made here (no ``ip``, not root), or None."""
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if os.geteuid() != 0:
            return "creating network namespaces needs root"
        return None

    def _pick_subnet(self) -> str:
        used = self._ip("-o", "-4", "addr", "show", check=False).stdout
        start = os.getpid() % 250
        for k in range(250):
            subnet = f"{self.net}.{(start + k) % 250 + 1}"
            if f" {subnet}." not in used:
                return subnet
        raise NetnsError(f"no free {self.net}.X.0/24 subnet")

    def setup(self) -> list[str]:
        """Create everything; return the replicas' addresses.  On failure remove what was made
        and raise NetnsError saying why."""
        why = self.unavailable()
        if why:
            raise NetnsError(why)
        try:
            self.sweep_stale()
            self.subnet = self._pick_subnet()
            self._ip("link", "add", self.bridge, "type", "bridge")
            self.made_links.append(self.bridge)
            self._ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                self.hosts.append(self._add_namespace(i))
            self._check_reachable(self.hosts)
            return list(self.hosts)
        except (NetnsError, OSError, subprocess.SubprocessError) as exc:
            self.cleanup()
            raise NetnsError(str(exc)) from None

    def _add_namespace(self, i: int) -> str:
        """Namespace ``i``, its veth pair (one end on the bridge) and its address."""
        ns = self.names[i]
        self._ip("netns", "add", ns)
        self.made_ns.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("link", "add", self.host_ends[i], "type", "veth", "peer", "name", self.ns_ends[i])
        self.made_links.append(self.host_ends[i])
        self._ip("link", "set", self.ns_ends[i], "netns", ns)
        self._ip("link", "set", self.host_ends[i], "master", self.bridge)
        self._ip("link", "set", self.host_ends[i], "up")
        address = f"{self.subnet}.{i + 1}"
        self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", self.ns_ends[i])
        self._ip("-n", ns, "link", "set", self.ns_ends[i], "up")
        return address

    def _check_reachable(self, hosts: list[str]) -> None:
        """A listener in the first namespace must be reachable from the caller (bridge up,
        nothing filtering bridged traffic)."""
        probe = subprocess.Popen(
            ["ip", "netns", "exec", self.names[0], sys.executable, "-c",
             "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
             f"s.bind(({hosts[0]!r}, 1537)); s.listen(); s.settimeout(10); c,_=s.accept(); c.sendall(b'ok')"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection((hosts[0], 1537), timeout=1) as c:
                        if c.recv(2) == b"ok":
                            return
                except OSError:
                    time.sleep(0.1)
            raise NetnsError(f"{hosts[0]} is not reachable through the bridge")
        finally:
            if probe.poll() is None:
                probe.kill()
            probe.wait(timeout=5)

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program in namespace ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    # ----------------------------------------------------------------------------- partitions
    def cut(self, src: int, dst: int) -> None:
        """One-way: drop every packet replica ``src`` sends to replica ``dst``."""
        if (src, dst) not in self.cuts:
            self._ip("-n", self.names[src], "route", "add", "blackhole", f"{self.hosts[dst]}/32")
            self.cuts.add((src, dst))

    def uncut(self, src: int, dst: int) -> None:
        """Undo :meth:`cut` (a cut that is not there is ignored)."""
        if (src, dst) in self.cuts:
            self._ip("-n", self.names[src], "route", "del", "blackhole", f"{self.hosts[dst]}/32", check=False)
            self.cuts.discard((src, dst))

    def cut_both(self, a: int, b: int) -> None:
        """No packet between replicas ``a`` and ``b`` in either direction."""
        self.cut(a, b)
        self.cut(b, a)

    def split(self, *sides) -> None:
        """Symmetric partition into ``sides`` (iterables of replica indexes): every pair of
        replicas on different sides is cut both ways."""
        sides = [list(s) for s in sides]
        for k, side in enumerate(sides):
            for other in sides[k + 1:]:
                for a in side:
                    for b in other:
                        self.cut_both(a, b)

    def isolate(self, i: int) -> None:
        """Replica ``i`` reaches no other replica and none reaches it (clients still do)."""
        self.split([i], [j for j in range(self.n) if j != i])

    def link_down(self, i: int) -> None:
        """Replica ``i``'s veth down on the bridge side: it reaches nobody, clients included."""
        self._ip("link", "set", self.host_ends[i], "down")
        self.links_down.add(i)

    def link_up(self, i: int) -> None:
        self._ip("link", "set", self.host_ends[i], "up", check=False)
        self.links_down.discard(i)

    def heal(self) -> None:
        """Undo every cut and bring every link back up."""
        for src, dst in sorted(self.cuts):
            self.uncut(src, dst)
        for i in sorted(self.links_down):
            self.link_up(i)

    # -------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Remove every link and namespace made (routes go with their namespace)."""
        for link in reversed(self.made_links):
            self._ip("link", "del", link, check=False)
        for ns in reversed(self.made_ns):
            self._ip("netns", "del", ns, check=False)
        self.made_links.clear()
        self.made_ns.clear()
        self.cuts.clear()
        self.links_down.clear()

    def sweep_stale(self) -> None:
        """Remove namespaces and links with this prefix and tag left by processes that died
        without cleaning up (their PID is in the name)."""
        listing = self._ip("netns", "list", check=False).stdout
        for line in listing.splitlines():
            m = re.match(rf"({re.escape(self.prefix_ns)}(\d+)-r\d+)\b", line.strip())
            if m and not os.path.exists(f"/proc/{m.group(2)}"):
                self._ip("netns", "del", m.group(1), check=False)
        links = self._ip("-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            m = re.match(rf"\d+:\s+({re.escape(self.tag_letters)}(\d+)(?:br|h\d+))[@:]", line)
            if m and not os.path.exists(f"/proc/{m.group(2)}"):
                self._ip("link", "del", m.group(1), check=False)
