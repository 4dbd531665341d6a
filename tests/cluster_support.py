"""Helpers for multi-process cluster tests: a cluster of real replicas and a failover-aware client."""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
import time

from chatnet.server.cli import query_status
from support import RawClient, ServerProcess, free_port, wait_until

REDIRECT = re.compile(r"The primary is at ([^\s]+):(\d+)\.$")


class Cluster:
    def __init__(self, base_dir: str, n: int = 3, hosts=None, extra_args=()):
        hosts = hosts or ["127.0.0.1"] * n
        self.secret_file = os.path.join(base_dir, "cluster.secret")
        os.makedirs(base_dir, exist_ok=True)
        with open(self.secret_file, "w") as f:
            f.write(secrets.token_hex(32))
        self.addresses = [(h, free_port(h)) for h in hosts]
        peers = ",".join(f"{h}:{p}" for h, p in self.addresses)
        self.replicas = [
            ServerProcess(os.path.join(base_dir, f"r{i}"), port=p, host=h,
                          args=["--peers", peers, "--secret-file", self.secret_file, *extra_args])
            for i, (h, p) in enumerate(self.addresses)
        ]

    def start(self, *which) -> Cluster:
        for i in which or range(len(self.replicas)):
            self.replicas[i].start()
        return self

    def status(self, i: int) -> dict | None:
        r = self.replicas[i]
        if r.proc is None or r.proc.poll() is not None:
            return None
        return query_status(r.host, r.port, timeout=2.0)

    def primary(self) -> int | None:
        """Index of the replica serving clients, if exactly one does."""
        serving = [i for i in range(len(self.replicas)) if (s := self.status(i)) and s.get("serving")]
        return serving[0] if len(serving) == 1 else None

    def wait_primary(self, timeout: float = 15.0, exclude=()) -> int:
        def found():
            p = self.primary()
            return (p,) if p is not None and p not in exclude else None
        return wait_until(found, timeout=timeout, what="a serving primary")[0]

    def wait_in_sync(self, which, timeout: float = 20.0) -> None:
        """Wait until the replicas ``which`` form one view with one primary (a replica is only
        re-added to the view once it has caught up with the primary's log)."""
        which = list(which)

        def synced():
            statuses = [self.status(i) for i in which]
            if any(s is None for s in statuses):
                return False
            views = {(s["view"], tuple(s["members"]), s["primary"]) for s in statuses}
            roles = sorted(s["role"] for s in statuses)
            return (len(views) == 1 and set(next(iter(views))[1]) == set(which)
                    and roles == ["backup"] * (len(which) - 1) + ["primary"])
        wait_until(synced, timeout=timeout, what=f"replicas {which} in one view")

    def kill(self, i: int) -> None:
        self.replicas[i].kill()

    def stop_all(self) -> None:
        for r in self.replicas:
            r.kill()

    def addresses_str(self) -> list[tuple[str, int]]:
        return list(self.addresses)


class FailoverClient:
    """A test client that finds the primary (following redirect notes) and reconnects on failure.

    ``request`` retries a request on a new primary when the connection drops before the answer;
    an answer is returned only when it really came from a serving primary.
    """

    def __init__(self, addresses, name: str | None = None, create: bool = False, deadline: float = 30.0):
        self.addresses = list(addresses)
        self.name = name
        self.conn: RawClient | None = None
        self.deadline = deadline
        self.connected_to = None
        if name is not None:
            self._identify(create)

    def _connect(self) -> RawClient:
        """Connect to the primary: try each server in order, follow redirects, back off briefly."""
        end = time.monotonic() + self.deadline
        target = None
        while time.monotonic() < end:
            for addr in ([target] if target else []) + self.addresses:
                try:
                    c = RawClient(addr[0], addr[1], timeout=3)
                    # A backup answers the first request with a note and closes: probe with list.
                    f = c.request("4|\x00probe")
                except (OSError, EOFError, AssertionError):
                    continue
                if f.status == 2:
                    m = REDIRECT.search(f.message)
                    target = (m.group(1), int(m.group(2))) if m else None
                    c.close()
                    continue
                self.connected_to = addr
                return c
            time.sleep(0.05)
        raise AssertionError("no primary found")

    def _identify(self, create: bool) -> None:
        end = time.monotonic() + self.deadline
        while True:
            self.conn = self._connect()
            try:
                f = self.conn.request(f"{1 if create else 2}|{self.name}")
                if create and f.status == 1 and "taken" in f.message:
                    create = False  # our earlier create committed but its answer was lost
                    f = self.conn.request(f"2|{self.name}")
            except (OSError, EOFError, AssertionError):
                f = None
            if f is not None and f.status == 0:
                break
            # redirected (the primary stepped down meanwhile) or connection lost: try again
            self.conn.close()
            assert time.monotonic() < end, f"cannot identify as {self.name}: {f}"
        self.pending = []
        if not create or f.message.startswith("Logged in"):
            while True:
                g = self.conn.frame()
                if g.indicator == 0:
                    break
                self.pending.append(g)

    def request(self, text: str, retries: int = 20):
        for _ in range(retries):
            if self.conn is None:
                try:
                    if self.name is None:
                        self.conn = self._connect()
                    else:
                        self._identify(False)
                except (OSError, EOFError, AssertionError):
                    self.conn = None
                    continue
            try:
                f = self.conn.request(text)
                while f.indicator == 1:  # live chat for us: not the answer
                    f = self.conn.frame()
                if f.status == 2 and REDIRECT.search(f.message) or "knows no primary" in f.message:
                    raise EOFError("redirected")
                return f
            except (OSError, EOFError, AssertionError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        raise AssertionError(f"request {text!r} failed {retries} times")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Load:
    """Senders chatting to a sink account in a loop, recording every acknowledged text."""

    def __init__(self, addresses, sink: str, senders: int = 4, prefix: str = "s"):
        self.addresses = addresses
        self.sink = sink
        self.acked: dict[str, list[str]] = {}
        self.ack_times: list[float] = []
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(f"{prefix}{i}",), daemon=True)
                        for i in range(senders)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def _run(self, name: str) -> None:
        client = FailoverClient(self.addresses, name, create=True)
        self.acked[name] = []
        i = 0
        while not self.stop_flag.is_set():
            text = f"{name}-{i}"
            try:
                f = client.request(f"3|{self.sink}|{text}")
            except AssertionError:
                continue
            if f.status == 0 and f.message.startswith("Message sent"):
                with self.lock:
                    self.acked[name].append(text)
                    self.ack_times.append(time.monotonic())
            i += 1
        client.close()

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.acked.values())

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=40)


def drain_mailbox(addresses, name: str) -> list[str]:
    """Log in as ``name`` and return the texts of every queued chat."""
    client = FailoverClient(addresses, name)
    texts = [f.message.split("|", 1)[1] for f in client.pending]
    client.close()
    return texts


def assert_nothing_lost(load: Load, received: list[str]) -> None:
    got = set(received)
    for name, texts in load.acked.items():
        missing = [t for t in texts if t not in got]
        assert not missing, f"{name}: {len(missing)} acknowledged chats lost, e.g. {missing[:5]}"
        mine = [t for t in received if t.startswith(name + "-")]
        numbers = [int(t.rsplit("-", 1)[1]) for t in mine]
        deduped = list(dict.fromkeys(numbers))
        assert deduped == sorted(deduped), f"{name}: chats out of order"


__all__ = ["Cluster", "FailoverClient", "Load", "drain_mailbox", "assert_nothing_lost", "signal"]
