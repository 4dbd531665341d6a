#!/usr/bin/env python3
"""CPU of the per-chat Python path, without sockets or a disk: comparable across revisions.

The closed-loop benchmarks (``throughput.py``, ``vs_seed.py``) measure everything a chat costs,
system calls and fsync included, on a machine shared with other jobs, so a change of a few
microseconds of Python per chat drowns in their noise.  This script runs only the Python the
replica executes per chat — request decoding (``RequestDecoder``), the host cycle
(``ReplicaHost``: propose, the replication core, apply), the chat service (answer, live chat
frame, delivery bookkeeping) — in one process, over the simulator's in-memory disk, and
reports the process CPU time per chat (``time.process_time``), the median of ``--repeat`` runs.
Each revision runs in its own child process on the code ``git archive`` exports.

Load: ``--pairs`` senders each send one ~32-byte chat to their own receiver per round (as the
load generator's line-mode clients do: ``3|NAME|TEXT\\n``), then one host cycle; every chat
frame is then reported written, as the front end would.

    python bench/hotpath.py                       # the working tree
    python bench/hotpath.py --revs 227a17a,HEAD   # two revisions, alternated

The child (``--child PAIRS ROUNDS``) imports only ``chatnet``, from ``PYTHONPATH``: the parent
sets it to the exported tree (``bench/common.py`` is not imported there, since it would put the
working tree's ``chatnet`` first on the path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(pairs: int, rounds: int) -> float:
    """Process CPU seconds per chat of ``rounds`` rounds (run inside the exported tree)."""
    import itertools
    import time

    from chatnet.protocol.codec import CLOSED, NEED_DATA, RequestDecoder
    from chatnet.replication.simdisk import SimDisk
    from chatnet.server.host import ReplicaHost

    tokens = itertools.count(1)
    host = ReplicaHost(0, (0,), SimDisk(), new_token=lambda: f"t{next(tokens)}")
    host.cycle()
    decoders = {}

    def feed(conn: int, data: bytes) -> None:
        decoder = decoders[conn]
        decoder.receive_data(data)
        while (event := decoder.next_event()) is not NEED_DATA and event is not CLOSED:
            host.receive(conn, event)

    for conn in range(2 * pairs):
        host.open(conn)
        decoders[conn] = RequestDecoder()
        feed(conn, f"\n1|u{conn}\n".encode())
        host.cycle()
    host.cycle()
    started = time.process_time()
    for r in range(rounds):
        for conn in range(pairs):
            feed(conn, f"3|u{conn + pairs}|chat {r:08d} of the hot path\n".encode())
        for effect in host.cycle().effects:
            if getattr(effect, "delivered", None) is not None:
                host.service.frames_written(effect.delivered)
    return (time.process_time() - started) / (rounds * pairs)


def run_rev(rev: str | None, pairs: int, rounds: int) -> float:
    """One measurement in a child process running ``rev``'s chatnet (None: the working tree)."""
    import common

    with tempfile.TemporaryDirectory(prefix="chatnet-hotpath-") as tmp:
        root = common.export_rev(rev, tmp) if rev is not None else common.ROOT
        out = subprocess.run([sys.executable, os.path.join(HERE, "hotpath.py"), "--child", str(pairs), str(rounds)],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    return float(out.stdout.split()[-1])


def main() -> int:
    sys.path.insert(0, HERE)
    import common

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revs", default="", help="comma-separated git revisions (default: the working tree)")
    ap.add_argument("--pairs", type=int, default=25, help="sender/receiver pairs (default 25)")
    ap.add_argument("--rounds", type=int, default=1500, help="rounds per run (default 1500)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per revision, alternated (default 5)")
    args = ap.parse_args()
    revs = [r.strip() for r in args.revs.split(",") if r.strip()] or [None]
    runs: dict = {rev: [] for rev in revs}
    for _ in range(args.repeat):
        for rev in revs:
            runs[rev].append(run_rev(rev, args.pairs, args.rounds) * 1e6)
    for rev in revs:
        name = common.describe_rev(rev) if rev else common.describe_tree()
        values = ", ".join(f"{v:.2f}" for v in runs[rev])
        print(f"{name}: {statistics.median(runs[rev]):.2f} us of Python per chat (median; runs {values})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(measure(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit(main())
