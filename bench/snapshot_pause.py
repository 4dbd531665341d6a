#!/usr/bin/env python3
"""How long a checkpoint of the chat state stops the replica's loop (issue 12 item 2).

Builds a state of ``--accounts`` accounts and ``--chats`` queued chats (each send with a
request id, as clients send them), then measures, ``--repeat`` times each (medians):

* inline: ``ChatState.to_snapshot()`` on the loop (what the simulator and ``--naive`` do);
* fork: ``ForkSnapshots.start()`` -- the loop's pause is the ``fork()`` alone -- and the
  time until the child's bytes are back (the checkpoint's latency, off the loop);
* start-up: ``ChatState.from_snapshot()`` of those bytes, and the replay of ``--replay``
  logged sends after it (what a restart costs on top).

    python bench/snapshot_pause.py                      # 10,000 accounts, 100,000 chats
    python bench/snapshot_pause.py --accounts 1000 --chats 10000
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chatnet.server.background import ForkSnapshots  # noqa: E402
from chatnet.server.state import ChatState, cmd_create, cmd_send, decode_command, encode_command  # noqa: E402


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
    maker.start(state, 1, 1, 0)
    paused = time.perf_counter() - started
    done.wait(600)
    result = maker.take()
    return paused, time.perf_counter() - started, len(result[2])


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
    args = ap.parse_args()
    rng = random.Random(1)
    state = build(args.accounts, args.chats, rng)
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
