"""N replicas of chatnet as real processes, on free ports, sharing one secret file.

Status comes from the replicas themselves (``chatnet.server.cli.query_status``, authenticated
with the cluster secret so it has every field), so a wait ends on what the servers report, with
an explicit deadline, never on a sleep.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

from chatnet.loop.tls import client_context
from chatnet.server.cli import query_status
from chatnet.server.config import cluster_id, parse_peers, read_secret
from chatnet.testing.process import ServerProcess
from chatnet.testing.waiting import free_port, wait_until

__all__ = ["Cluster", "write_secret"]


def write_secret(path: str) -> str:
    """Create a fresh cluster secret at ``path``, readable by its owner only: a new file has
    mode 0600 from the moment it exists (opened with that mode, not chmod-ed afterwards), and
    an existing one, whose mode ``O_TRUNC`` keeps, is set to 0600 before the secret is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


class Cluster:
    """``n`` replicas (one per entry of ``hosts``, default 127.0.0.1) with stores under
    ``base_dir`` (a temporary directory, removed by :meth:`stop`, when none is given).

    ``ports`` fixes each replica's port (default: a free port of its host; a host that exists
    only inside a network namespace cannot be probed, so a caller that uses ``prefixes`` gives
    them); ``prefixes`` go before each replica's command (``ip netns exec NS``).  ``extra_args``
    go to every replica (TLS: ``--tls-cert``, ``--tls-key``, ``--tls-ca`` ...); ``tls_ca`` (a CA
    file) makes :meth:`status` ask over TLS, verifying each replica's certificate; ``server_kwargs`` (``root``, ``profile``, ``log_level``) to every
    :class:`ServerProcess`.  Replicas are addressed by index.
    """

    def __init__(self, base_dir: str | None = None, n: int = 3, hosts=None, extra_args=(), *, ports=None,
                 prefixes=None, tls_ca: str | None = None, **server_kwargs):
        hosts = list(hosts or ["127.0.0.1"] * n)
        self.owns_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="chatnet-cluster-")
        os.makedirs(self.base_dir, exist_ok=True)
        self.secret_file = write_secret(os.path.join(self.base_dir, "cluster.secret"))
        self.addresses = list(zip(hosts, ports or [free_port(h) for h in hosts]))
        self.peers = ",".join(f"{h}:{p}" for h, p in self.addresses)
        self.secret = read_secret(self.secret_file)  # status beyond role and primary needs it
        self.cluster_id = cluster_id(parse_peers(self.peers)).encode()
        self.tls = client_context(tls_ca) if tls_ca else None  # status over TLS
        prefixes = prefixes or [()] * len(hosts)
        self.replicas = [
            ServerProcess(os.path.join(self.base_dir, f"r{i}"), port=p, host=h, peers=self.peers,
                          args=["--secret-file", self.secret_file, *extra_args], prefix=prefixes[i],
                          **server_kwargs)
            for i, (h, p) in enumerate(self.addresses)
        ]

    def start(self, *which, timeout: float = 15.0) -> Cluster:
        """Start the replicas ``which`` (default all) together; each is listening when this
        returns."""
        which = which or range(len(self.replicas))
        for i in which:
            self.replicas[i].start(wait=False)
        for i in which:
            self.replicas[i].wait_listening(timeout)
        return self

    def restart(self, i: int, wait: bool = True) -> None:
        """Start replica ``i`` again on its own store (after :meth:`kill`); without ``wait``,
        return at once."""
        self.replicas[i].start(wait=wait)

    def kill(self, i: int) -> None:
        """SIGKILL replica ``i`` and reap it."""
        self.replicas[i].kill()

    def alive(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.alive()]

    def status(self, i: int, timeout: float = 2.0) -> dict | None:
        """Replica ``i``'s own status report, or None if it is down, paused (it could not
        answer) or does not answer."""
        r = self.replicas[i]
        if not r.alive() or r.state == "paused":
            return None
        return query_status(r.host, r.port, timeout=timeout, secret=self.secret, cluster=self.cluster_id,
                            tls=self.tls)

    def statuses(self, timeout: float = 2.0) -> list[dict | None]:
        """Every replica's :meth:`status`, by index."""
        return [self.status(i, timeout) for i in range(len(self.replicas))]

    def primary(self, timeout: float = 2.0) -> int | None:
        """Index of the replica serving clients, if exactly one does."""
        serving = [i for i, s in enumerate(self.statuses(timeout)) if s and s.get("serving")]
        return serving[0] if len(serving) == 1 else None

    def wait_primary(self, timeout: float = 15.0, exclude=()) -> int:
        """Wait until exactly one replica, not in ``exclude``, serves clients; its index."""
        def found():
            p = self.primary()
            return (p,) if p is not None and p not in exclude else None
        return wait_until(found, timeout, what="a serving primary", interval=0.02)[0]

    def in_sync(self, which=None) -> bool:
        """Whether the replicas ``which`` (default all) form exactly one view (members =
        ``which``) with one serving primary and the rest backups (a replica re-enters the view
        once it caught up)."""
        which = range(len(self.replicas)) if which is None else list(which)
        statuses = [self.status(i) for i in which]
        if any(s is None for s in statuses):
            return False
        views = {(s["view"], tuple(s["members"]), s["primary"]) for s in statuses}
        roles = sorted(s["role"] for s in statuses)
        return (len(views) == 1 and set(next(iter(views))[1]) == set(which)
                and roles == ["backup"] * (len(statuses) - 1) + ["primary"]
                and sum(1 for s in statuses if s.get("serving")) == 1)

    def wait_in_sync(self, which=None, timeout: float = 20.0) -> None:
        """Wait until :meth:`in_sync` holds for ``which`` (default: every live replica)."""
        which = self.alive() if which is None else list(which)
        wait_until(lambda: self.in_sync(which), timeout, what=f"replicas {which} in one view", interval=0.05)

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(f"[{r.port}] {r.log_tail(n)}" for r in self.replicas)

    def stop_all(self) -> None:
        """SIGKILL every replica and reap it (the stores stay for inspection)."""
        for r in self.replicas:
            r.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (then SIGKILL) every replica, reap it, and remove a temporary base dir."""
        for r in self.replicas:
            r.stop(timeout)
        if self.owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
