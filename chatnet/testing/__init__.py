"""The one harness of chatnet's tests and benchmarks (standard library only).

* :func:`free_port`, :func:`port_open`, :func:`wait_until` (raises :class:`WaitTimeout` naming
  what it waited for) — ``chatnet.testing.waiting``;
* :class:`ServerProcess` — one ``chatserver`` process on a free port with a data dir and a log
  appended across restarts, stopped and reaped by PID; killed, paused (SIGSTOP) and resumed
  with a ``state``, optionally behind a command prefix (``ip netns exec NS``) —
  ``chatnet.testing.process``;
* :class:`Cluster` — N replicas sharing a 0600 secret file (:func:`write_secret`): start,
  kill/restart one, status with the cluster secret, ``wait_primary``, ``wait_in_sync``; fixed
  ports and per-replica prefixes for replicas in network namespaces — ``chatnet.testing.cluster``;
* :class:`Netns` — replicas on separate "machines": N network namespaces on a bridge, and
  partitions between them (one-way and symmetric cuts, links down, heal) —
  ``chatnet.testing.netns``;
* :class:`RawClient` — the seed protocol on a blocking socket, frames decoded by the codec;
  :class:`FailoverClient` — finds the primary and retries across failovers —
  ``chatnet.testing.rawclient``.

It ships in the package so ``tests/`` and ``bench/`` import it the same way after
``pip install -e .``; it is not used by the product itself.  Its users: the tests, the
benchmarks (``bench/common.py``) and the chaos runner (``bench/chaos.py``), the partition tests (``tests/test_partitions.py``).
"""

from chatnet.testing.cluster import Cluster, write_secret
from chatnet.testing.netns import Netns, NetnsError
from chatnet.testing.process import (
    CHATCLIENT,
    CHATSERVER,
    ROOT,
    ServerProcess,
    server_command,
)
from chatnet.testing.rawclient import (
    REDIRECT,
    FailoverClient,
    FrameTimeout,
    NoPrimary,
    RawClient,
    redirect_target,
)
from chatnet.testing.waiting import WaitTimeout, free_port, port_open, wait_until

__all__ = [
    "CHATCLIENT", "CHATSERVER", "ROOT", "REDIRECT", "Cluster", "FailoverClient", "FrameTimeout", "NoPrimary",
    "Netns", "NetnsError", "RawClient", "ServerProcess", "WaitTimeout", "free_port", "port_open", "redirect_target",
    "server_command", "wait_until", "write_secret",
]
