#!/usr/bin/env python3
"""How long a checkpoint of the chat state stops the replica's loop (issue 12 item 2).

Builds a state of ``--accounts`` accounts and ``--chats`` queued chats (each send with a
request id, as clients send them), then measures, ``--repeat`` times each (medians):

* inline: ``ChatState.to_snapshot()`` on the loop (what the simulator and ``--naive`` do);
* fork: ``ForkSnapshots.start()`` -- the loop's pause is the ``fork()`` alone -- and the
  time until the child's bytes are back (the checkpoint's latency, off the loop);
* start-up: ``ChatState.from_snapshot()`` of those bytes, and the replay of ``--replay``
  logged sends after it (what a restart costs on top).

``--catchup`` measures instead what a client of a real 3-replica cluster sees while a replica
catches up by snapshot: three replicas start on a store seeded with that state (``chatserver
restore``), one backup is killed and loses its store, two probes ask the primary one request
at a time and record every round trip -- ``chat``, a logged-in client's send to an unknown
recipient (through the log: a view change holds it), and ``status``, a public status query
every 40 ms (answered by the loop at once: its round trip is the loop's own delay) -- and the
backup starts again with an empty store, so the primary must send it a snapshot of the
whole state.  Printed: each probe's longest and 99th-percentile round trip before the backup
restarts and from then until it is back in the view, and how long that took.  ``--rev`` runs the server code of
a git revision (the "before" of a change) instead of the working tree.

    python bench/snapshot_pause.py                      # 10,000 accounts, 100,000 chats
    python bench/snapshot_pause.py --accounts 1000 --chats 10000
    python bench/snapshot_pause.py --catchup [--rev main~3]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the checkout first on sys.path)

from chatnet.server.background import ForkSnapshots  # noqa: E402
from chatnet.server.backup import STORE_NAME, restore  # noqa: E402
from chatnet.server.cli import query_status  # noqa: E402
from chatnet.server.state import ChatState, cmd_create, cmd_send, decode_command, encode_command  # noqa: E402
from chatnet.server.storage import Batch  # noqa: E402
from chatnet.server.store import Store  # noqa: E402
from chatnet.testing import Cluster, RawClient  # noqa: E402


def build(accounts: int, chats: int, rng: random.Random) -> ChatState:
    state = ChatState()
    for i in range(accounts):
        state.apply(cmd_create(f"user{i}", f"token-{i:032d}"))
    for j in range(chats):
        state.apply(cmd_send(f"user{rng.randrange(accounts)}", f"user{rng.randrange(accounts)}",
                             f"chat number {j} of the snapshot benchmark", f"rid-{j}"))
    return state


def fork_once(state: ChatState) -> tuple[float, float, int]:
    """(loop pause, time until the bytes are back, their size) of one forked checkpoint."""
    done = threading.Event()
    maker = ForkSnapshots(done.set)
    started = time.perf_counter()
    maker.start(state, (1, 1, 0, False))
    paused = time.perf_counter() - started
    done.wait(600)
    _, data, _ = maker.take()
    return paused, time.perf_counter() - started, len(data)


def seed_store(state: ChatState, chats: int, into: str) -> int:
    """A backup-like store holding ``state`` as its snapshot; returns the log index given it."""
    index = len(state.accounts) + chats
    store = Store(into)
    try:
        store.commit(Batch(snapshot=(index, 1, state), sync=True,
                           meta={"view": 1, "promised": 1, "snapshot_index": index, "snapshot_view": 1}))
    finally:
        store.close()
    return index


class Probe:
    """Requests to the primary one at a time, ``every`` seconds at most; every round trip,
    stamped.  ``chat``: a logged-in client's send to an unknown recipient (through the log, so
    a view change holds it too); else a public status query (answered by the loop at once, so
    its round trip is the loop's own delay; at most 50 a second are answered)."""

    def __init__(self, addr, chat: bool, every: float = 0.0) -> None:
        self.addr, self.every, self.chat = addr, every, chat
        self.client = RawClient(*addr, timeout=30) if chat else None
        if self.client is not None:
            self.client.request("1|snapshot-probe")
        self.samples: list[tuple[float, float]] = []  # (asked at, answered at), s
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ask(self) -> bool:
        """One request; False for a status query closed unanswered (over the replica's public
        status rate, which the harness's own status queries share)."""
        if self.chat:
            self.client.request("3|nobody-by-this-name|ping")
            return True
        return query_status(*self.addr, timeout=30) is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            answered = self._ask()
            now = time.monotonic()
            if answered:
                self.samples.append((started, now))
            else:
                self.refused += 1
            self._stop.wait(max(0.0, self.every - (now - started)))

    def window(self, since: float, until: float) -> dict:
        """Round trips of the requests under way at some time in [since, until)."""
        trips = sorted(answered - asked for asked, answered in self.samples if asked < until and answered >= since)
        if not trips:
            return {"n": 0, "max_ms": float("nan"), "p99_ms": float("nan")}
        return {"n": len(trips), "max_ms": trips[-1] * 1000,
                "p99_ms": trips[min(len(trips) - 1, int(len(trips) * 0.99))] * 1000}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.client is not None:
            self.client.close()
            self.client = None


def catchup(args, state: ChatState) -> dict:
    """The --catchup measurement (module docstring); also run by tests/test_snapshot_send.py."""
    work = tempfile.mkdtemp(prefix="chatnet-snapshot-pause-")
    code = common.export_rev(args.rev, work) if args.rev else None
    label = common.describe_rev(args.rev) if args.rev else common.describe_tree()
    cluster = Cluster(os.path.join(work, "cluster"), n=3, root=code, log_level="WARNING")
    probes: dict[str, Probe] = {}
    try:
        seed_store(state, args.chats, os.path.join(work, "seed"))
        for replica in cluster.replicas:
            restore(os.path.join(work, "seed", STORE_NAME), replica.data_dir)
        cluster.start(timeout=60)
        primary = cluster.wait_primary(timeout=60)
        cluster.wait_in_sync(timeout=60)
        lagging = (primary + 1) % 3
        cluster.kill(lagging)  # its store goes: it comes back with nothing
        for name in os.listdir(cluster.replicas[lagging].data_dir):
            if name.startswith(STORE_NAME):
                os.unlink(os.path.join(cluster.replicas[lagging].data_dir, name))
        addr = cluster.replicas[primary].addr
        probes = {"chat": Probe(addr, chat=True), "status": Probe(addr, chat=False, every=0.04)}
        time.sleep(args.baseline)
        started = time.monotonic()
        cluster.start(lagging, timeout=60)
        cluster.wait_in_sync(timeout=300)
        ended = time.monotonic()
        time.sleep(0.5)  # (a request under way at the end is counted once answered)
        result = {"seconds": ended - started}
        print(f"code: {label}; catch-up by snapshot of {args.accounts} accounts, {args.chats} chats: "
              f"{ended - started:.1f} s until the emptied backup was back in the view")
        for kind, probe in probes.items():
            probe.stop()
            result[kind] = {"before": probe.window(0, started), "during": probe.window(started, ended)}
            for name, w in (("before it restarted", result[kind]["before"]),
                            ("while it caught up", result[kind]["during"])):
                print(f"{kind:6} round trip {name}: max {w['max_ms']:7.1f} ms, p99 {w['p99_ms']:6.1f} ms "
                      f"({w['n']} requests)")
        return result
    finally:
        for probe in probes.values():
            probe.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def median_ms(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        f()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--chats", type=int, default=100_000)
    ap.add_argument("--replay", type=int, default=10_000, help="logged sends replayed at start-up")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--catchup", action="store_true", help="a replica's catch-up by snapshot, seen by a client")
    ap.add_argument("--baseline", type=float, default=3.0, help="--catchup: seconds probed before it starts")
    common.add_code_args(ap, server_root=False)
    args = ap.parse_args()
    rng = random.Random(1)
    state = build(args.accounts, args.chats, rng)
    if args.catchup:
        catchup(args, state)
        return 0
    blob = state.to_snapshot()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"state: {args.accounts} accounts, {args.chats} queued chats, snapshot {len(blob) / 1e6:.1f} MB, "
          f"process {rss:.0f} MB")
    print(f"inline to_snapshot (loop pause):        {median_ms(state.to_snapshot, args.repeat):8.1f} ms")
    forks = [fork_once(state) for _ in range(args.repeat)]
    print(f"fork checkpoint, loop pause (fork()):   {statistics.median(f[0] for f in forks) * 1000:8.1f} ms "
          f"(max {max(f[0] for f in forks) * 1000:.1f})")
    print(f"fork checkpoint, bytes back after:      {statistics.median(f[1] for f in forks) * 1000:8.1f} ms")
    print(f"start-up: from_snapshot:                {median_ms(lambda: ChatState.from_snapshot(blob), args.repeat):8.1f} ms")
    log = [encode_command(cmd_send(f"user{rng.randrange(args.accounts)}", f"user{rng.randrange(args.accounts)}",
                                   f"replayed {j}", f"replay-{j}")) for j in range(args.replay)]

    def replay():
        copy = ChatState.from_snapshot(blob)
        started = time.perf_counter()
        for data in log:
            copy.apply(decode_command(data))
        return time.perf_counter() - started

    print(f"start-up: replay of {args.replay} logged sends:  "
          f"{statistics.median(replay() for _ in range(args.repeat)) * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
