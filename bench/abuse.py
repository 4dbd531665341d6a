#!/usr/bin/env python3
"""Well-behaved chatters beside hostile clients: does abuse hurt the others (issue 10, item 8)?

50 well-behaved chatters (``--chatters``) chat in a ring, each in a closed loop (send, wait
for the ack, send again), from one load-generator process, for the whole run.  The run is cut
into rounds; each round has a **quiet** window and an **abuse** window of ``--window`` seconds,
separated by gaps that are not measured.  During an abuse window one hostile process (forked
for that window, killed by PID after it) runs, in one selectors loop:

* ``flood``: one connection writing 64 KiB of ``4\\n`` lines again and again, never reading;
* ``flood-read``: the same, reading (and discarding) every answer;
* ``slowloris``: ``--slowloris`` connections sending one byte every 2-5 s, never completing a
  request (the server's handshake timeout closes them; they come back);
* ``garbage``: ``--garbage`` connections sending random bytes, invalid UTF-8, over-long
  lines, bad numbers and stray extension ops, one after the other as answers come;
* ``storm``: connect and close as fast as possible (``--storm-concurrency`` connects in
  flight), alternately with and without a partial request, closing with FIN or RST.

Figures: the chatters' throughput (acks/s) and ack latency p50/p99 per window, medians over
the rounds, the abuse/quiet ratios; whether a failover happened (every replica's status is
polled with the cluster secret: view changes, primary changes, unanswered polls); the primary's
RSS before, during and at its peak; the CPU of the primary, the backups, the chatters, the
hostile process and every other process.  Targets: p99 with abuse <= 2x quiet, no failover,
RSS bounded.

    python bench/abuse.py                    # one replica, 4 rounds of 10 s windows
    python bench/abuse.py --replicas 3 --json
    python bench/abuse.py --kinds storm      # one kind of abuse only
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import json
import multiprocessing
import os
import random
import selectors
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import Loop, login_many, now_ns  # noqa: E402

from chatnet.server.cli import query_status  # noqa: E402

KINDS = ("flood", "flood-read", "slowloris", "garbage", "storm")
TARGET_P99_RATIO = 2.0
RSS_GROWTH_MIB = 5.0  # "RSS bounded": no more growth than this from the first abuse window to the last
RSS_CAP_MIB = 300.0  # ... and a peak under the 10,000-connection memory target
FILLER_ACCOUNTS = 250  # so that a list answer is a full page (300 accounts, as in issue 10)
LINGER_RST = struct.pack("ii", 1, 0)
SEC = 1_000_000_000


# ----------------------------------------------------------------------- well-behaved chatters


class Chatter:
    __slots__ = ("conn", "prefix", "seq", "sent_at", "errors")

    def __init__(self, conn, recipient: str):
        self.conn = conn
        self.prefix = b"3|" + recipient.encode() + b"|"
        self.seq = 0
        self.sent_at = 0
        self.errors = 0

    def send(self) -> None:
        self.seq += 1
        self.sent_at = now_ns()
        self.conn.write(b"%s%d:hello there\n" % (self.prefix, self.seq))


def chatters_worker(pipe, addr, n: int) -> None:
    common.run_worker(_chatters, 0, pipe, addr, n)


def _chatters(wid, pipe, addr, n) -> None:
    """Create the filler accounts and the chatters, then chat in a ring until the end time;
    send back every ack as (send time, ack time)."""
    common.raise_nofile()
    loop = Loop()
    fillers = login_many(loop, addr, [f"f{i}" for i in range(FILLER_ACCOUNTS)], op=1, timeout=60)
    for conn in fillers:
        conn.close()
    names = [f"c{i}" for i in range(n)]
    conns = login_many(loop, addr, names, op=1, timeout=60)
    chatters = [Chatter(conns[i], names[(i + 1) % n]) for i in range(n)]
    sent, acked = array.array("q"), array.array("q")
    stats = {"errors": 0, "lost": 0, "chats_received": 0}
    stopping = [False]

    def on_frames(conn, frames, t):
        c = conn.state
        for status, indicator, _payload in frames:
            if indicator:
                stats["chats_received"] += 1
                continue
            if status != 0:
                stats["errors"] += 1
            else:
                sent.append(c.sent_at)
                acked.append(t)
            if not stopping[0]:
                c.send()

    def on_close(conn):
        stats["lost"] += 1

    for c in chatters:
        c.conn.state, c.conn.handler, c.conn.on_close = c, on_frames, on_close
    pipe.send(("ready", wid))
    _, t_start, t_end = pipe.recv()
    while now_ns() < t_start:
        loop.poll(max(0.0, (t_start - now_ns()) / 1e9))
    for c in chatters:
        c.send()
    while (t := now_ns()) < t_end:
        loop.poll(min(0.05, (t_end - t) / 1e9))
    stopping[0] = True
    loop.run_until(lambda: len(acked) + stats["errors"] >= sum(c.seq for c in chatters), 5.0)
    stats["unanswered"] = sum(c.seq for c in chatters) - len(acked) - stats["errors"]
    pipe.send(("result", {"sent": sent.tobytes(), "acked": acked.tobytes(), **stats}))
    loop.close()


# ---------------------------------------------------------------------------- hostile clients


class Hostile:
    """A selectors loop of raw non-blocking sockets, each with a callback ``fn(sock, mask)``."""

    def __init__(self, addr, rng: random.Random):
        self.addr, self.rng = addr, rng
        self.sel = selectors.DefaultSelector()
        self.stats: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def connect(self, fn, mask=selectors.EVENT_WRITE) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.count("connect_errors")
            sock.close()
            return None
        self.count("connects")
        self.sel.register(sock, mask, fn)
        return sock

    def drop(self, sock, rst: bool = True) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)
        if rst:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.close()

    def recv_or_drop(self, sock) -> bytes | None:
        """Read what is there; None (and the socket dropped) when the server closed it."""
        try:
            data = sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self.count("closed_by_server")
            self.drop(sock)
            return None
        self.count("bytes_read", len(data))
        return data

    def send_some(self, sock, data: bytes) -> int | None:
        """Bytes the socket took now (0 when full); None (dropped) when the connection is gone."""
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return 0  # still connecting
            self.count("closed_by_server")
            self.drop(sock)
            return None
        self.count("bytes_written", n)
        return n

    def close_all(self) -> None:
        for key in list(self.sel.get_map().values()):
            self.drop(key.fileobj)
        self.sel.close()


FLOOD_CHUNK = b"4\n" * 32768  # 64 KiB of list requests


class ListFlood:
    """One connection writing 64 KiB of ``4\\n`` repeatedly, reading the answers or not."""

    def __init__(self, h: Hostile, read: bool):
        self.h, self.read, self.key = h, read, "flood_read" if read else "flood"
        self.data, self.pos = b"", 0
        self.sock = None

    def start(self) -> None:
        self.data, self.pos = b"\n" + FLOOD_CHUNK, 0  # a bare newline first: line mode
        mask = selectors.EVENT_WRITE | (selectors.EVENT_READ if self.read else 0)
        self.sock = self.h.connect(self.event, mask)

    def event(self, sock, mask) -> None:
        if mask & selectors.EVENT_READ:
            data = self.h.recv_or_drop(sock)
            if data is None:
                self.h.count(self.key + "_reconnects")
                return self.start()
            self.h.count(self.key + "_answer_bytes", len(data))
        if mask & selectors.EVENT_WRITE:
            n = self.h.send_some(sock, memoryview(self.data)[self.pos:])
            if n is None:
                self.h.count(self.key + "_reconnects")
                return self.start()
            self.pos += n
            if self.pos >= len(self.data):
                self.data, self.pos = FLOOD_CHUNK, 0
                self.h.count(self.key + "_chunks")

    def tick(self, t: float) -> None:
        if self.sock is None:
            self.start()


class Slowloris:
    """``n`` connections declaring line mode, then one byte every 2-5 s, never a newline."""

    BYTES = b"3|nobody|slowly but never finishing "

    def __init__(self, h: Hostile, n: int):
        self.h, self.n = h, n
        self.conns: dict[socket.socket, list] = {}  # sock -> [next byte time, position]

    def start(self) -> None:
        while len(self.conns) < self.n:
            sock = self.h.connect(self.event, selectors.EVENT_READ)
            if sock is None:
                return
            self.conns[sock] = [time.monotonic() + self.h.rng.uniform(0.05, 0.5), 0]  # first: b"\n"

    def event(self, sock, mask) -> None:
        data = self.h.recv_or_drop(sock)
        if data is None:
            self.conns.pop(sock, None)
            self.h.count("slowloris_closed_by_server")
        elif data:
            self.h.count("slowloris_answers")

    def tick(self, t: float) -> None:
        for sock, state in list(self.conns.items()):
            if t >= state[0]:
                byte = self.BYTES[state[1] % len(self.BYTES):][:1] if state[1] else b"\n"
                if self.h.send_some(sock, byte) is None:
                    self.conns.pop(sock, None)
                    continue
                state[0], state[1] = t + self.h.rng.uniform(2, 5), state[1] + 1
                self.h.count("slowloris_bytes")
        self.start()


def garbage_item(rng: random.Random) -> bytes:
    """One hostile request: random bytes, invalid UTF-8, an over-long line, a bad number, a stray
    extension op or random Unicode."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 600))
    if kind == 1:
        return b"3|" + rng.randbytes(8) + b"|\xc3\x28\xa0\xa1\xff\xfe\xed\xa0\x80\n"
    if kind == 2:
        return b"3|c0|" + b"y" * rng.choice([1200, 5000, 70000]) + b"\n"
    if kind == 3:
        return rng.choice(["4|*|\u00b2\n", "0|ack|\u0663\n", "7|alice|\u00e9|0\n", "4|*|99999999999999999999\n"]).encode()
    if kind == 4:
        return rng.choice([b"0|ext|1\n", b"0|ack|5\n", b"0|send|1|c0|x\n", b"0|ext|999\n", b"9|x\n"])
    if kind == 5:
        text = "".join(chr(rng.choice([rng.randint(32, 0x7FF), rng.randint(0x800, 0xD7FF)])) for _ in range(50))
        return f"{rng.randint(0, 9)}|{text}\n".encode()
    return b"|" * rng.randint(1, 300) + b"\r\n"


class Garbage:
    """``n`` connections sending garbage, the next item when an answer came or after 20 ms."""

    def __init__(self, h: Hostile, n: int):
        self.h, self.n = h, n
        self.due: dict[socket.socket, float] = {}

    def start(self) -> None:
        while len(self.due) < self.n:
            sock = self.h.connect(self.event, selectors.EVENT_READ)
            if sock is None:
                return
            self.due[sock] = time.monotonic() + 0.01

    def event(self, sock, mask) -> None:
        data = self.h.recv_or_drop(sock)
        if data is None:
            self.due.pop(sock, None)
            self.h.count("garbage_closed_by_server")
        elif data:
            self.due[sock] = 0.0

    def tick(self, t: float) -> None:
        for sock, due in list(self.due.items()):
            if t >= due:
                if self.h.send_some(sock, garbage_item(self.h.rng)) is None:
                    self.due.pop(sock, None)
                    continue
                self.due[sock] = t + 0.02
                self.h.count("garbage_items")
        self.start()


class Storm:
    """Connect, maybe write a partial request, close (FIN or RST); ``concurrency`` in flight."""

    def __init__(self, h: Hostile, concurrency: int):
        self.h, self.concurrency = h, concurrency
        self.in_flight = 0
        self.n = 0

    def start(self) -> None:
        while self.in_flight < self.concurrency:
            if self.h.connect(self.event) is None:
                return
            self.in_flight += 1

    def event(self, sock, mask) -> None:
        self.n += 1
        self.in_flight -= 1
        if self.n % 2 and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            self.h.send_some(sock, b"\n3|c1|a partial requ")
            self.h.count("storm_partial")
        self.h.drop(sock, rst=self.n % 4 != 3)  # one in four closes with FIN
        self.h.count("storm_closed")
        self.start()

    def tick(self, t: float) -> None:
        self.start()


def hostile_worker(pipe, addr, kinds, opts: dict, t_end: int, seed: int) -> None:
    common.run_worker(_hostile, 0, pipe, addr, kinds, opts, t_end, seed)


def _hostile(wid, pipe, addr, kinds, opts, t_end, seed) -> None:
    """Run the chosen kinds of abuse in one loop until ``t_end``; send back the counters."""
    common.raise_nofile()
    h = Hostile(addr, random.Random(seed))
    makers = {"flood": lambda: ListFlood(h, read=False), "flood-read": lambda: ListFlood(h, read=True),
              "slowloris": lambda: Slowloris(h, opts["slowloris"]), "garbage": lambda: Garbage(h, opts["garbage"]),
              "storm": lambda: Storm(h, opts["storm_concurrency"])}
    actors = [makers[k]() for k in kinds]
    for actor in actors:
        actor.start()
    next_tick = 0.0
    while now_ns() < t_end:
        for key, mask in h.sel.select(0.01):
            key.data(key.fileobj, mask)
        t = time.monotonic()
        if t >= next_tick:
            for actor in actors:
                actor.tick(t)
            next_tick = t + 0.01
    stats = dict(h.stats)
    h.close_all()
    pipe.send(("result", stats))


# --------------------------------------------------------------------------- replica watcher


class Watcher(threading.Thread):
    """Polls every replica's status (with the cluster secret) and memory every ``interval`` s."""

    def __init__(self, target, interval: float = 0.25):
        super().__init__(name="watcher", daemon=True)
        self.target, self.interval = target, interval
        self.samples: list[tuple] = []  # (t_ns, replica index, status or None, poll ms, rss KiB)
        self.stop_event = threading.Event()

    def replicas(self):
        t = self.target
        return t.cluster.replicas if t.cluster is not None else [t.server]

    def run(self) -> None:
        cluster = self.target.cluster
        secret = cluster.secret if cluster is not None else None
        cid = cluster.cluster_id if cluster is not None else b""
        while not self.stop_event.is_set():
            for i, r in enumerate(self.replicas()):
                t0 = now_ns()
                s = query_status(r.host, r.port, timeout=1.0, secret=secret, cluster=cid) if r.alive() else None
                self.samples.append((t0, i, s, (now_ns() - t0) / 1e6, common.rss_kib(r.pid) if r.alive() else 0))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# ------------------------------------------------------------------------------ the schedule


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=1, help="1 (default) or a cluster of N on this machine")
    ap.add_argument("--rounds", type=int, default=4, help="quiet/abuse rounds (default 4)")
    ap.add_argument("--window", type=float, default=10.0, help="measured seconds per quiet or abuse window (default 10)")
    ap.add_argument("--gap", type=float, default=2.0, help="unmeasured seconds between windows (default 2)")
    ap.add_argument("--lead", type=float, default=1.0,
                    help="seconds the hostile clients run before an abuse window is measured (default 1)")
    ap.add_argument("--chatters", type=int, default=50, help="well-behaved chatters (default 50)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"abuse kinds, comma separated (default: all: {','.join(KINDS)})")
    ap.add_argument("--slowloris", type=int, default=300, help="slowloris connections (default 300)")
    ap.add_argument("--garbage", type=int, default=8, help="garbage connections (default 8)")
    ap.add_argument("--storm-concurrency", type=int, default=16, help="storm connects in flight (default 16)")
    ap.add_argument("--seed", type=int, default=10, help="seed of the hostile byte streams (default 10)")
    common.add_code_args(ap)
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    args = ap.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in KINDS]
    if bad or not args.kinds:
        ap.error(f"unknown abuse kind(s) {bad}; choose from {', '.join(KINDS)}")
    if args.rounds < 1 or args.window <= 0 or args.chatters < 2 or args.replicas < 1:
        ap.error("--rounds >= 1, --window > 0, --chatters >= 2, --replicas >= 1")
    return args


def schedule(args, t0: int) -> list[dict]:
    """Windows in time order: quiet, then abuse (its hostile process starts ``lead`` earlier
    and stops just after it), ``gap`` seconds apart, ``rounds`` times."""
    windows, t = [], t0
    w, gap, lead = int(args.window * SEC), int(args.gap * SEC), int(args.lead * SEC)
    for r in range(args.rounds):
        windows.append({"kind": "quiet", "round": r, "start": t, "end": t + w})
        t += w + gap
        windows.append({"kind": "abuse", "round": r, "hostile_start": t, "start": t + lead, "end": t + lead + w})
        t += lead + w + gap
    return windows


# ------------------------------------------------------------------------------------ running


def cpu_sample(target, chatters_pid: int, hostile_pid: int | None) -> tuple:
    cs = common.cpu_seconds
    return (time.monotonic(), cs(target.pid), sum(cs(p) for p in target.backup_pids()), cs(chatters_pid),
            cs(hostile_pid) if hostile_pid else 0.0, common.system_busy_seconds())


def cpu_percent(a: tuple, b: tuple) -> dict:
    wall = max(b[0] - a[0], 1e-9)
    parts = {name: 100 * (b[i] - a[i]) / wall for i, name in enumerate(
        ("primary", "backups", "chatters", "hostile"), start=1)}
    parts["other"] = max(0.0, 100 * (b[5] - a[5]) / wall - sum(parts.values()))
    return {k: round(v, 1) for k, v in parts.items()}


def sleep_until(t_ns: int) -> None:
    time.sleep(max(0.0, (t_ns - now_ns()) / 1e9))


def start_process(fn, *args):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=fn, args=(child, *args), daemon=True)
    proc.start()
    return proc, parent


def measure_windows(args, target, windows, chatters) -> list[dict]:
    """Go through the windows: fork the hostile process of each abuse window, sample CPU at its
    edges and the primary's memory after it; return one record per window."""
    opts = {"slowloris": args.slowloris, "garbage": args.garbage, "storm_concurrency": args.storm_concurrency}
    records = []
    for w in windows:
        hostile = pipe = None
        try:
            if w["kind"] == "abuse":
                sleep_until(w["hostile_start"])
                hostile, pipe = start_process(hostile_worker, target.addr, args.kinds, opts,
                                              w["end"] + SEC // 4, args.seed + w["round"])
            sleep_until(w["start"])
            a = cpu_sample(target, chatters.pid, hostile.pid if hostile else None)
            sleep_until(w["end"])
            b = cpu_sample(target, chatters.pid, hostile.pid if hostile else None)
            rec = {**w, "cpu_pct": cpu_percent(a, b), "rss_after_kib": common.rss_kib(target.pid)}
            if pipe is not None:
                rec["hostile"] = common.expect(pipe, "result", 15, "the hostile process")
            records.append(rec)
        finally:
            if hostile is not None:
                pipe.close()
                common.stop_workers([hostile])
    return records


def read_logs(target) -> dict:
    """Stalls, tracebacks and warnings in every replica's log (read before the dirs go)."""
    replicas = target.cluster.replicas if target.cluster is not None else [target.server]
    out = {"stalls": 0, "tracebacks": 0, "warnings": 0, "examples": []}
    for r in replicas:
        for line in r.log().splitlines():
            out["stalls"] += "stalled" in line
            out["tracebacks"] += line.startswith("Traceback")
            if "WARNING" in line or "ERROR" in line:
                out["warnings"] += 1
                if len(out["examples"]) < 5:
                    out["examples"].append(f"[{r.port}] {line[:200]}")
    return out


def run(args) -> dict:
    """Start the target, the chatters, the watcher; measure every window; read the logs and the
    memory peaks; stop every process by PID whatever happens."""
    target = common.Target(args.replicas, rev=args.rev, root=args.server_root)
    chatters = pipe = watcher = None
    try:
        with common.sigterm_as_exit():
            target.start()
            print(f"primary pid {target.pid} on {target.addr[0]}:{target.addr[1]}, code {target.label}; "
                  f"backups {target.backup_pids()}", file=sys.stderr, flush=True)
            chatters, pipe = start_process(chatters_worker, target.addr, args.chatters)
            common.expect(pipe, "ready", 120, "the chatters' logins")
            m = {"label": target.label, "rss_before_kib": common.rss_kib(target.pid),
                 "backup_rss_before_kib": [common.rss_kib(p) for p in target.backup_pids()]}
            watcher = Watcher(target)
            watcher.start()
            t0 = now_ns() + SEC
            windows = schedule(args, t0 + SEC)  # one second of warm-up
            pipe.send(("go", t0, windows[-1]["end"] + SEC // 2))
            m["windows"] = measure_windows(args, target, windows, chatters)
            m["chatters"] = common.expect(pipe, "result", 30, "the chatters' results")
            watcher.stop()
            m["watch"], m["replica_pids"] = watcher.samples, [r.pid for r in watcher.replicas()]
            m["peak_rss_kib"] = [common.peak_rss_kib(p) for p in m["replica_pids"]]
            m["rss_end_kib"] = [common.rss_kib(p) for p in m["replica_pids"]]
            m["primary_pid"], m["logs"] = target.pid, read_logs(target)
            return m
    except Exception:
        if target.primary is not None:
            print(f"server log tail:\n{target.log_tail()}", file=sys.stderr)
        raise
    finally:
        if watcher is not None:
            watcher.stop()
        common.tear_down([pipe] if pipe else [], [chatters] if chatters else [], target)


# ---------------------------------------------------------------------------------- figures


def window_figures(w: dict, sent, acked) -> dict:
    """The chatters' figures in one window: acks/s (acks that arrived in it) and the ack
    latency of the chats sent in it."""
    start, end = w["start"], w["end"]
    lat_us = sorted((a - s) // 1000 for s, a in zip(sent, acked) if start <= s < end)
    acks = sum(1 for a in acked if start <= a < end)
    lat = common.summarize_us(lat_us)
    return {"kind": w["kind"], "round": w["round"], "acks_per_s": round(acks * SEC / (end - start), 1),
            "p50_ms": lat["p50"], "p99_ms": lat["p99"], "max_ms": lat["max"], "samples": lat["count"],
            "cpu_pct": w["cpu_pct"], "rss_after_mib": round(w["rss_after_kib"] / 1024, 1),
            "hostile": w.get("hostile"), "_lat_us": lat_us}


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def by_kind(rows: list[dict], kind: str) -> dict:
    rows = [r for r in rows if r["kind"] == kind]
    pooled = common.summarize_us(sorted(x for r in rows for x in r["_lat_us"]))
    cpu = {k: median(r["cpu_pct"][k] for r in rows) for k in rows[0]["cpu_pct"]}
    return {"acks_per_s": median(r["acks_per_s"] for r in rows), "p50_ms": median(r["p50_ms"] for r in rows),
            "p99_ms": median(r["p99_ms"] for r in rows), "pooled_p99_ms": pooled["p99"],
            "max_ms": max((r["max_ms"] or 0) for r in rows), "cpu_pct": cpu,
            "rss_max_mib": max(r["rss_after_mib"] for r in rows)}


def failover_figures(m: dict, windows: list[dict]) -> dict:
    """From the watcher's polls: views and primaries seen, role changes, unanswered polls and
    the slowest poll, overall and during abuse windows."""
    abuse = [(w["start"], w["end"]) for w in windows if w["kind"] == "abuse"]
    in_abuse = lambda t: any(a <= t < b for a, b in abuse)  # noqa: E731
    views, primaries, roles, last_role = set(), set(), 0, {}
    unanswered = {"all": 0, "abuse": 0}
    slowest = {"all": 0.0, "abuse": 0.0}
    for t, i, s, ms, _rss in m["watch"]:
        scope = ("all", "abuse") if in_abuse(t) else ("all",)
        for k in scope:
            slowest[k] = max(slowest[k], ms)
            unanswered[k] += s is None or "error" in s
        if not s or "error" in s:
            continue
        if s.get("view") is not None:
            views.add(s["view"])
        primaries.add(s.get("primary", s.get("primary_address")))
        roles += last_role.get(i, s.get("role")) != s.get("role")
        last_role[i] = s.get("role")
    return {"polls": len(m["watch"]), "views_seen": sorted(views), "view_changes": max(0, len(views) - 1),
            "primaries_seen": len(primaries), "role_changes": roles, "unanswered_polls": unanswered,
            "slowest_poll_ms": {k: round(v, 1) for k, v in slowest.items()}}


def rss_figures(m: dict, windows: list[dict]) -> dict:
    primary = m["replica_pids"].index(m["primary_pid"]) if m["primary_pid"] in m["replica_pids"] else 0
    per_kind = {}
    for kind in ("quiet", "abuse"):
        spans = [(w["start"], w["end"]) for w in windows if w["kind"] == kind]
        per_kind[kind] = max((rss for t, i, _s, _ms, rss in m["watch"]
                              if i == primary and any(a <= t < b for a, b in spans)), default=0)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {"primary_before_mib": mib(m["rss_before_kib"]), "primary_max_quiet_mib": mib(per_kind["quiet"]),
            "primary_max_abuse_mib": mib(per_kind["abuse"]),
            # VmHWM can lag VmRSS a little (the kernel syncs its RSS counters lazily): take both
            "peak_mib": [mib(max(k, *(rss for _t, i, _s, _ms, rss in m["watch"] if i == n), 0))
                         for n, k in enumerate(m["peak_rss_kib"])],
            "end_mib": [mib(k) for k in m["rss_end_kib"]]}


def rss_judgement(rows: list[dict], rss: dict) -> str:
    """Bounded: the primary's RSS after the last abuse window is within RSS_GROWTH_MIB of the
    one after the first (no growth round over round) and its peak under RSS_CAP_MIB."""
    after = [r["rss_after_mib"] for r in rows if r["kind"] == "abuse"]
    growth = after[-1] - after[0]
    ok = growth <= RSS_GROWTH_MIB and max(rss["peak_mib"]) <= RSS_CAP_MIB
    return f"{'met' if ok else 'MISSED'} (after each abuse window: {after} MiB; peak {max(rss['peak_mib'])} MiB)"


def summarize(args, m: dict) -> dict:
    c = m["chatters"]
    sent, acked = array.array("q"), array.array("q")
    sent.frombytes(c["sent"])
    acked.frombytes(c["acked"])
    rows = [window_figures(w, sent, acked) for w in m["windows"]]
    quiet, abuse = by_kind(rows, "quiet"), by_kind(rows, "abuse")
    ratios = [(a["p99_ms"] / q["p99_ms"], a["acks_per_s"] / q["acks_per_s"])
              for q, a in zip(rows[0::2], rows[1::2]) if q["p99_ms"] and q["acks_per_s"]]
    p99_ratio = abuse["p99_ms"] / quiet["p99_ms"] if quiet["p99_ms"] and abuse["p99_ms"] else None
    hostile: dict[str, int] = {}
    for r in rows:
        for k, v in (r["hostile"] or {}).items():
            hostile[k] = hostile.get(k, 0) + v
    fo = failover_figures(m, m["windows"])
    summary = {
        "bench": "abuse", "replicas": args.replicas, "chatters": args.chatters, "rounds": args.rounds,
        "window_s": args.window, "kinds": args.kinds, "server_code": m["label"], "machine": common.machine_facts(),
        "options": {"slowloris": args.slowloris, "garbage": args.garbage, "storm_concurrency": args.storm_concurrency,
                    "seed": args.seed},
        "quiet": quiet, "abuse": abuse, "p99_ratio": round(p99_ratio, 2) if p99_ratio else None,
        "p99_ratio_per_round": [round(r[0], 2) for r in ratios],
        "throughput_ratio": round(abuse["acks_per_s"] / quiet["acks_per_s"], 3) if quiet["acks_per_s"] else None,
        "throughput_ratio_per_round": [round(r[1], 3) for r in ratios],
        "windows": [{k: v for k, v in r.items() if k != "_lat_us"} for r in rows],
        "hostile_totals": hostile, "failover": fo, "rss": rss_figures(m, m["windows"]), "logs": m["logs"],
        "chatters_integrity": {k: c[k] for k in ("errors", "lost", "unanswered", "chats_received")},
    }
    summary["targets"] = {
        "p99_at_most_2x_quiet": "met" if p99_ratio and p99_ratio <= TARGET_P99_RATIO else "MISSED",
        "no_failover": "met" if fo["view_changes"] == 0 and fo["primaries_seen"] <= 1 and fo["role_changes"] == 0
        and not m["logs"]["stalls"] else "MISSED",
        "rss_bounded": rss_judgement(rows, summary["rss"]),
    }
    return summary


# ---------------------------------------------------------------------------------- printing


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_windows(s: dict) -> None:
    print("  window        acks/s   p50 ms   p99 ms   max ms   CPU % primary/backups/chatters/hostile/other   RSS MiB")
    for r in s["windows"]:
        c = r["cpu_pct"]
        print(f"  {r['kind']:<5} round {r['round']}  {r['acks_per_s']:>7,.0f}  {fmt_ms(r['p50_ms']):>7}  "
              f"{fmt_ms(r['p99_ms']):>7}  {fmt_ms(r['max_ms']):>7}   "
              f"{c['primary']:>4.0f} / {c['backups']:>3.0f} / {c['chatters']:>3.0f} / {c['hostile']:>3.0f} / "
              f"{c['other']:>3.0f}{'':<18}{r['rss_after_mib']:>6.1f}")


def print_table(s: dict) -> None:
    m, q, a, fo, rss = s["machine"], s["quiet"], s["abuse"], s["failover"], s["rss"]
    print(f"chatnet abuse: {s['chatters']} closed-loop chatters, {s['replicas']} replica(s), {s['rounds']} rounds of "
          f"{s['window_s']:g} s quiet + {s['window_s']:g} s abuse ({', '.join(s['kinds'])})")
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}; server code "
          f"{s['server_code']}")
    print_windows(s)
    rows = [
        ("chatters' acks/s, median: quiet -> abuse", f"{q['acks_per_s']:,.0f} -> {a['acks_per_s']:,.0f}  "
         f"(x{s['throughput_ratio']}; per round {s['throughput_ratio_per_round']})"),
        ("ack p50, median: quiet -> abuse", f"{fmt_ms(q['p50_ms'])} -> {fmt_ms(a['p50_ms'])} ms"),
        ("ack p99, median: quiet -> abuse", f"{fmt_ms(q['p99_ms'])} -> {fmt_ms(a['p99_ms'])} ms  "
         f"(x{s['p99_ratio']}; per round {s['p99_ratio_per_round']}; pooled {fmt_ms(q['pooled_p99_ms'])} -> "
         f"{fmt_ms(a['pooled_p99_ms'])} ms)"),
        ("ack max: quiet / abuse", f"{fmt_ms(q['max_ms'])} / {fmt_ms(a['max_ms'])} ms"),
        ("CPU %, median: quiet / abuse", "  ".join(f"{k} {q['cpu_pct'][k]:.0f}/{a['cpu_pct'][k]:.0f}"
                                                  for k in q["cpu_pct"])),
        ("failover watch", f"{fo['polls']} status polls; views seen {fo['views_seen']}, {fo['view_changes']} view "
         f"change(s), {fo['primaries_seen']} primary(ies), {fo['role_changes']} role change(s); unanswered "
         f"{fo['unanswered_polls']}; slowest poll {fo['slowest_poll_ms']} ms"),
        ("replica logs", f"{s['logs']['stalls']} stall(s), {s['logs']['tracebacks']} traceback(s), "
         f"{s['logs']['warnings']} warning line(s)"),
        ("primary RSS", f"before {rss['primary_before_mib']} MiB, max quiet {rss['primary_max_quiet_mib']}, max abuse "
         f"{rss['primary_max_abuse_mib']}; peak (VmHWM) per replica {rss['peak_mib']}; end {rss['end_mib']}"),
        ("chatters", ", ".join(f"{k} {v}" for k, v in s["chatters_integrity"].items())),
        ("hostile totals", ", ".join(f"{k} {v:,}" for k, v in sorted(s["hostile_totals"].items()))),
    ]
    rows += [(f"target {k}", v) for k, v in s["targets"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for line in s["logs"]["examples"]:
        print(f"  log: {line}")


def main(argv=None) -> int:
    args = parse_args(argv)
    measured = run(args)
    summary = summarize(args, measured)
    print_table(summary)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    common.run_main(main)
