#!/usr/bin/env python3
"""What one durable commit of a replica's batch costs on this machine's disk (issue 12).

Each variant writes ``--iterations`` batches of ``--rows`` log rows of ``--size`` bytes (what
one loop iteration of a loaded replica writes) in one transaction each, one after another on
one thread, in a fresh temporary directory (``--dir``, default the system's temp dir: the disk
the replicas' data directories live on), after ``--warmup`` unmeasured batches.  It prints,
per variant, the commit's latency (p50 / p90 / p99 / max, wall clock around the whole
write-and-commit) and the CPU it costs (user + system time of the writing thread per commit).

Variants (``--variants`` picks some; ``--list`` names them):

* ``store``: :class:`chatnet.server.store.Store.commit` itself (what the storage thread runs);
* ``sqlite-*``: the same rows and transaction through ``sqlite3`` directly, one setting
  changed at a time from the store's (WAL, ``synchronous=FULL``, autocheckpoint 1000 pages,
  4 KiB pages, normal locking, ``executemany``): see ``VARIANTS``;
* ``raw-append``: the floor -- the same bytes appended to a plain file with one ``os.write``
  and ``os.fdatasync`` per batch; ``raw-prealloc`` overwrites a preallocated file instead
  (no file size change, so ``fdatasync`` has no metadata to flush).

Variants run interleaved, ``--rounds`` times each, in short runs, so a burst of load from
other processes spreads over all of them; the figures are medians over all commits.  The
machine is shared: read ratios between variants, not absolute numbers.

    python bench/commit_latency.py                      # every variant, 25 rows of 60 bytes
    python bench/commit_latency.py --rows 10 --variants store,sqlite-base,raw-append
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chatnet.server.storage import Batch  # noqa: E402
from chatnet.server.store import SCHEMA, Store  # noqa: E402

INSERT = "INSERT OR REPLACE INTO log(idx, view, data, committed) VALUES (?, ?, ?, ?)"

# name -> (pragmas set before the schema, extra options); base = the store's settings
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "sqlite-base": (["journal_mode=WAL", "synchronous=FULL"], {}),
    "sqlite-normal-NOT-DURABLE": (["journal_mode=WAL", "synchronous=NORMAL"], {}),
    "sqlite-rollback-full": (["journal_mode=PERSIST", "synchronous=FULL"], {}),
    "sqlite-autockpt-10000": (["journal_mode=WAL", "synchronous=FULL", "wal_autocheckpoint=10000"], {}),
    "sqlite-ckpt-idle": (["journal_mode=WAL", "synchronous=FULL", "wal_autocheckpoint=0"],
                         {"checkpoint_every": 200}),
    "sqlite-journal-limit": (["journal_mode=WAL", "synchronous=FULL", "journal_size_limit=1048576"], {}),
    "sqlite-page-1k": (["page_size=1024", "journal_mode=WAL", "synchronous=FULL"], {}),
    "sqlite-page-16k": (["page_size=16384", "journal_mode=WAL", "synchronous=FULL"], {}),
    "sqlite-exclusive": (["locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=FULL"], {}),
    "sqlite-row-by-row": (["journal_mode=WAL", "synchronous=FULL"], {"row_by_row": True}),
    "sqlite-no-stmt-cache": (["journal_mode=WAL", "synchronous=FULL"], {"cached_statements": 0}),
    "sqlite-one-statement": (["journal_mode=WAL", "synchronous=FULL"], {"one_statement": True}),
}
RAW = ("raw-append", "raw-prealloc")
ALL = ["store", *VARIANTS, *RAW]


def thread_cpu() -> float:
    """CPU seconds (user + system) of the calling thread, the writer (CLOCK_THREAD_CPUTIME_ID:
    nanosecond resolution, where getrusage's figures are rounded to scheduler ticks)."""
    return time.thread_time()


def rows_for(batch_no: int, rows: int, size: int) -> list[tuple]:
    """``rows`` log rows (idx, view, data) of ``size`` bytes, continuing the log."""
    first = batch_no * rows + 1
    return [(first + i, 1, (b"\x01" + os.urandom(size // 2).hex().encode())[:size]) for i in range(rows)]


class Writer:
    """One variant: ``write(entries)`` commits one batch durably (or as its name says)."""

    def __init__(self, name: str, directory: str, rows: int, size: int, total: int):
        self.name, self.rows, self.size = name, rows, size
        self.commits = 0
        self.checkpoint_every = 0
        if name == "store":
            self.store = Store(directory)
            self.write = self._store_write
        elif name in RAW:
            self._open_raw(directory, total)
            self.write = self._raw_write
        else:
            self._open_sqlite(directory, *VARIANTS[name])
            self.write = self._sqlite_write

    def _open_sqlite(self, directory: str, pragmas: list[str], options: dict) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "v.sqlite3"), isolation_level=None,
                                  cached_statements=options.get("cached_statements", 128))
        for pragma in pragmas:
            self.db.execute("PRAGMA " + pragma)
        self.db.executescript(SCHEMA)
        self.row_by_row = options.get("row_by_row", False)
        self.one_statement = options.get("one_statement", False)
        self.checkpoint_every = options.get("checkpoint_every", 0)

    def _open_raw(self, directory: str, total: int) -> None:
        self.fd = os.open(os.path.join(directory, "v.log"), os.O_WRONLY | os.O_CREAT, 0o600)
        if self.name == "raw-prealloc":
            length = total * self.rows * (self.size + 16) + (1 << 20)
            os.posix_fallocate(self.fd, 0, length)
            os.write(self.fd, b"\0" * length)  # written once: later overwrites change no extents
            os.fsync(self.fd)
            os.lseek(self.fd, 0, os.SEEK_SET)

    def _store_write(self, entries: list[tuple]) -> None:
        self.store.commit(Batch(entries=entries, committed=entries[0][0] - 1, sync=True))

    def _sqlite_write(self, entries: list[tuple]) -> None:
        committed = entries[0][0] - 1
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        if self.one_statement:  # every row in one multi-row INSERT: one step, one GIL handoff
            values = ", ".join(["(?, ?, ?, ?)"] * len(entries))
            db.execute(INSERT.split(" VALUES ")[0] + " VALUES " + values,
                       [v for idx, view, data in entries for v in (idx, view, data, committed)])
        elif self.row_by_row:
            for idx, view, data in entries:
                db.execute(INSERT, (idx, view, data, committed))
        else:
            db.executemany(INSERT, [(idx, view, data, committed) for idx, view, data in entries])
        db.execute("COMMIT")

    def _raw_write(self, entries: list[tuple]) -> None:
        record = b"".join(idx.to_bytes(8, "little") + len(data).to_bytes(4, "little") + data
                          for idx, _, data in entries)
        os.write(self.fd, record)
        os.fdatasync(self.fd)

    def idle(self) -> float:
        """What the variant does between batches when idle (an explicit checkpoint); seconds."""
        self.commits += 1
        if not self.checkpoint_every or self.commits % self.checkpoint_every:
            return 0.0
        start = time.perf_counter()
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return time.perf_counter() - start

    def close(self) -> None:
        if self.name == "store":
            self.store.close()
        elif self.name in RAW:
            os.close(self.fd)
        else:
            self.db.close()


def run(writer: Writer, first: int, count: int, out: dict) -> None:
    """Commit batches first..first+count-1, appending latencies and CPU to ``out``."""
    for batch_no in range(first, first + count):
        entries = rows_for(batch_no, writer.rows, writer.size)  # made outside the timed part
        cpu, start = thread_cpu(), time.perf_counter()
        writer.write(entries)
        out["lat"].append(time.perf_counter() - start)
        out["cpu"].append(thread_cpu() - cpu)
        spent = writer.idle()
        if spent:
            out["idle"].append(spent)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, out: dict) -> dict:
    lat, cpu = out["lat"], out["cpu"]
    result = {"variant": name, "commits": len(lat),
              "p50_ms": pct(lat, 0.5) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3,
              "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3,
              "cpu_us_median": statistics.median(cpu) * 1e6, "cpu_us_mean": statistics.fmean(cpu) * 1e6}
    if out["idle"]:
        result["idle_checkpoint_ms_median"] = statistics.median(out["idle"]) * 1e3
    return result


def contend(stop: threading.Event) -> None:
    """The reactor's share of the GIL: Python work in ~50 µs slices, each followed by a system
    call that lets the GIL go (select), as the loop thread's sends and receives do."""
    while not stop.is_set():
        total = 0
        for i in range(400):
            total += i * i
        select.select([], [], [], 0)


def measure(args, names: list[str]) -> list[dict]:
    per_round = max(1, args.iterations // args.rounds)
    stop = threading.Event()
    if args.gil:
        threading.Thread(target=contend, args=(stop,), daemon=True).start()
    results = {name: {"lat": [], "cpu": [], "idle": []} for name in names}
    with tempfile.TemporaryDirectory(prefix="commit-latency-", dir=args.dir) as base:
        writers = {}
        for name in names:
            os.mkdir(os.path.join(base, name))
            writers[name] = Writer(name, os.path.join(base, name), args.rows, args.size,
                                   args.warmup + per_round * args.rounds)
            run(writers[name], 0, args.warmup, {"lat": [], "cpu": [], "idle": []})
        for r in range(args.rounds):
            for name in names:
                run(writers[name], args.warmup + r * per_round, per_round, results[name])
        for writer in writers.values():
            writer.close()
    stop.set()
    return [summary(name, results[name]) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=25, help="log rows per batch (default 25)")
    parser.add_argument("--size", type=int, default=60, help="bytes per row (default 60)")
    parser.add_argument("--iterations", type=int, default=2000, help="measured commits per variant")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured commits first")
    parser.add_argument("--variants", default=",".join(ALL), help="comma-separated (default: all)")
    parser.add_argument("--dir", default=None, help="where the files go (default: the temp dir)")
    parser.add_argument("--list", action="store_true", help="name the variants and exit")
    parser.add_argument("--gil", action="store_true",
                        help="a second thread runs Python meanwhile, as the replica's loop does")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()
    if args.list:
        print("\n".join(ALL))
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list names them")
    results = measure(args, names)
    print(f"{args.rows} rows x {args.size} B per commit, {args.iterations} commits per variant, "
          f"{args.rounds} interleaved rounds{', a GIL-holding thread alongside' if args.gil else ''}")
    print(f"{'variant':28} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'CPU µs':>7}")
    for r in results:
        extra = f"  (idle checkpoint {r['idle_checkpoint_ms_median']:.2f} ms)" if "idle_checkpoint_ms_median" in r else ""
        print(f"{r['variant']:28} {r['p50_ms']:7.3f} {r['p90_ms']:7.3f} {r['p99_ms']:7.3f} "
              f"{r['max_ms']:7.2f} {r['cpu_us_median']:7.0f}{extra}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
