#!/usr/bin/env python3
"""Chat throughput and latency of one chatnet server on loopback, with durable commits.

``--senders`` (default 50) logged-in senders each chat to their own logged-in receiver.
Every chat text carries the CLOCK_MONOTONIC time at which its request was written, so a
receiver measures delivery latency (send -> chat frame) and a sender ack latency
(send -> "Message sent to X.").  Figures cover a fixed window (``--duration``, default 10 s)
after a warm-up; delivered chats/s is counted at the receivers.

Two modes:
* closed loop (default): each sender keeps ``--window`` requests (default 1) outstanding,
  i.e. sends the next chat as soon as the previous one is acknowledged: maximum throughput.
* open loop (``--rate R``): chats are written at a fixed total rate R spread evenly over
  the senders, whether or not earlier ones were answered (no coordinated omission): latency
  at a given load, e.g. ``--rate 2000`` for "p99 ack latency <= 10 ms at 2,000 chats/s".

The load generator runs in ``--procs`` processes (default 1), each driving its share of
sender/receiver pairs with one selectors loop.  The machine's cores are shared by the
server and the load generator; the CPU each used is printed.

    python bench/throughput.py                      # closed loop, 10 s
    python bench/throughput.py --rate 2000 --json   # open loop at 2,000 chats/s
    python bench/throughput.py --tls                # every client connection and peer link over TLS
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import Loop, login_many, now_ns  # noqa: E402

from chatnet.loop.tls import client_context  # noqa: E402

TARGET_CHATS_PER_S = 20_000
TARGET_RATE = 2_000
TARGET_P99_ACK_MS = 10.0


class Sender:
    __slots__ = ("conn", "g", "prefix", "pad", "seq", "sent_at", "acked", "errors", "n", "next_due")

    def __init__(self, conn, g, recipient: str, size: int):
        self.conn = conn
        self.g = g
        self.prefix = b"3|" + recipient.encode() + b"|"
        self.pad = b"x" * max(0, size - 22)  # "<19-digit ns>:<seq>:" + pad ~ size bytes
        self.seq = 0
        self.sent_at = deque()
        self.acked = 0
        self.errors = 0
        self.n = 0  # open loop: requests scheduled so far
        self.next_due = 0

    def send(self) -> int:
        self.seq += 1
        t = now_ns()
        self.sent_at.append(t)
        self.conn.write(b"%s%d:%d:%s\n" % (self.prefix, t, self.seq, self.pad))
        return t


class Receiver:
    __slots__ = ("conn", "last_seq", "received", "disorder")

    def __init__(self, conn):
        self.conn = conn
        self.last_seq = 0
        self.received = 0
        self.disorder = 0


def worker(wid: int, pipe, addr, pairs: list[int], opts: dict) -> None:
    common.run_worker(_worker, wid, pipe, addr, pairs, opts)


def _worker(wid, pipe, addr, pairs, opts) -> None:
    common.raise_nofile()
    loop = Loop(tls=client_context(opts["tls_ca"]) if opts.get("tls_ca") else None)
    k = len(pairs)
    names = [f"s{g}" for g in pairs] + [f"r{g}" for g in pairs]
    conns = login_many(loop, addr, names, op=1, concurrency=256, timeout=60)
    senders = [Sender(conns[i], pairs[i], f"r{pairs[i]}", opts["size"]) for i in range(k)]
    receivers = [Receiver(conns[k + i]) for i in range(k)]
    pipe.send(("ready", wid))
    msg = pipe.recv()
    if msg[0] != "go":
        return
    _, t0, m_start, m_end, drain_s = msg
    rate, window, total_senders = opts["rate"], opts["window"], opts["total_senders"]

    ack_us: list[int] = []
    deliv_us: list[int] = []
    lag_us: list[int] = []
    counts = {"acks_in_window": 0, "delivered_in_window": 0}
    stopping = [False]

    def on_ack(conn, frames, t):
        s = conn.state
        for status, indicator, payload in frames:
            if indicator:
                continue  # nobody chats to a sender
            sent = s.sent_at.popleft()
            if status != 0:
                s.errors += 1
                continue
            s.acked += 1
            if m_start <= t < m_end:
                counts["acks_in_window"] += 1
            if m_start <= sent < m_end:
                ack_us.append((t - sent) // 1000)
            if rate is None and not stopping[0]:
                s.send()

    def on_chat(conn, frames, t):
        r = conn.state
        for status, indicator, payload in frames:
            if not indicator:
                continue
            bar = payload.index(b"|")
            c1 = payload.index(b":", bar)
            c2 = payload.index(b":", c1 + 1)
            sent = int(payload[bar + 1:c1])
            seq = int(payload[c1 + 1:c2])
            if seq != r.last_seq + 1:
                r.disorder += 1
            r.last_seq = seq
            r.received += 1
            if m_start <= t < m_end:
                counts["delivered_in_window"] += 1
            if m_start <= sent < m_end:
                deliv_us.append((t - sent) // 1000)

    lost = []
    for s in senders:
        s.conn.state, s.conn.handler = s, on_ack
    for r in receivers:
        r.conn.state, r.conn.handler = r, on_chat
    for c in conns:
        c.on_close = lambda conn: lost.append(conn)

    while now_ns() < t0:
        loop.poll(max(0.0, (t0 - now_ns()) / 1e9))
    if rate is None:  # closed loop: fill each sender's window
        for s in senders:
            for _ in range(window):
                s.send()
        while (t := now_ns()) < m_end:
            loop.poll(min(0.05, (m_end - t) / 1e9))
            if lost:
                raise RuntimeError(f"{len(lost)} connections lost during the run, e.g. {lost[0].error!r}")
    else:  # open loop: sender g sends its n-th chat at t0 + (n * S + g) / rate
        period = 1e9 * total_senders / rate
        offset = 1e9 / rate
        for s in senders:
            s.next_due = t0 + int(s.g * offset)
        while (t := now_ns()) < m_end:
            nxt = m_end
            for s in senders:
                while s.next_due <= t:
                    sent = s.send()
                    lag_us.append((sent - s.next_due) // 1000)
                    s.n += 1
                    s.next_due = t0 + int(s.g * offset + s.n * period)
                if s.next_due < nxt:
                    nxt = s.next_due
            t = now_ns()
            loop.poll(max(0.0, min(0.05, (nxt - t) / 1e9)))
            if lost:
                raise RuntimeError(f"{len(lost)} connections lost during the run, e.g. {lost[0].error!r}")
    stopping[0] = True
    # Drain: every outstanding ack, and every acknowledged chat at its receiver.
    drain_deadline = now_ns() + int(drain_s * 1e9)

    def drained():
        return all(not s.sent_at for s in senders) and all(
            r.received >= s.acked for s, r in zip(senders, receivers))

    while not drained() and now_ns() < drain_deadline:
        loop.poll(0.02)
    result = {
        "wid": wid,
        "ack_us": ack_us,
        "deliv_us": deliv_us,
        "lag_us": lag_us,
        **counts,
        "sent": sum(s.seq for s in senders),
        "acked": sum(s.acked for s in senders),
        "errors": sum(s.errors for s in senders),
        "received": sum(r.received for r in receivers),
        "missing": sum(max(0, s.acked - r.received) for s, r in zip(senders, receivers)),
        "unanswered": sum(len(s.sent_at) for s in senders),
        "disorder": sum(r.disorder for r in receivers),
        "lost_connections": len(lost),
    }
    pipe.send(("result", result))
    loop.close()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_load_args(ap, senders=50, duration=10.0)
    ap.add_argument("--window", type=int, default=1, help="closed loop: requests outstanding per sender (default 1)")
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    ap.add_argument("--drain", type=float, default=5.0, help="max seconds to wait for outstanding acks/chats")
    ap.add_argument("--profile", metavar="FILE", help="run the server under cProfile, stats to FILE")
    common.add_code_args(ap)
    ap.add_argument("--replicas", type=int, default=1,
                    help="run a cluster of this many replicas on this machine and load its primary (default 1)")
    ap.add_argument("--naive", action="store_true",
                    help="run the server's --naive baseline (one fsync per command, stop-and-wait replication)")
    ap.add_argument("--tls", action="store_true",
                    help="serve TLS (a test CA and certificate made with openssl) and connect every client "
                         "with TLS; replicas link over TLS too")
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    args = ap.parse_args(argv)
    if args.senders < 1 or args.procs < 1 or args.window < 1 or args.duration <= 0:
        ap.error("--senders, --procs, --window must be >= 1 and --duration > 0")
    args.procs = min(args.procs, args.senders)
    return args


def start_workers(args, addr) -> tuple[list, list]:
    """Fork the load-generator processes (pairs dealt round-robin); wait until each has logged
    its connections in."""
    opts = {"rate": args.rate, "window": args.window, "size": args.size, "total_senders": args.senders,
            "tls_ca": args.certs["ca"] if getattr(args, "certs", None) else None}
    ctx = multiprocessing.get_context("fork")
    workers, pipes = [], []
    for w in range(args.procs):
        parent, child = ctx.Pipe()
        pairs = [g for g in range(args.senders) if g % args.procs == w]
        p = ctx.Process(target=worker, args=(w, child, addr, pairs, opts), daemon=True)
        p.start()
        workers.append(p)
        pipes.append(parent)
    return workers, pipes


def measure_window(args, target, workers, pipes) -> dict:
    """Start every worker at one instant; sample CPU at the window's edges and the primary's
    memory idle, loaded and at its peak; collect the workers' results."""
    for pipe in pipes:
        common.expect(pipe, "ready", 90, "a worker's logins")
    m = {"rss_idle": common.rss_kib(target.pid)}
    t0 = now_ns() + 200_000_000
    m_start = t0 + int(args.warmup * 1e9)
    m_end = m_start + int(args.duration * 1e9)
    for pipe in pipes:
        pipe.send(("go", t0, m_start, m_end, args.drain))
    # "server" CPU is the primary's; in a cluster the backups' CPU is counted apart.
    meter = common.CpuMeter(target.pid, [p.pid for p in workers], target.backup_pids())
    time.sleep(max(0.0, (m_start - now_ns()) / 1e9))
    m["cpu_a"] = meter.sample()
    time.sleep(max(0.0, (m_end - now_ns()) / 1e9))
    m["cpu_b"] = meter.sample()
    m["rss_loaded"] = common.rss_kib(target.pid)
    m["results"] = [common.expect(pipe, "result", args.drain + 60, "a worker's report") for pipe in pipes]
    m["rss_peak"] = common.peak_rss_kib(target.pid)
    return m


def run(args) -> tuple[dict, str]:
    """Start the server (or cluster) and the load generators, measure one window, stop
    everything by PID whatever happens; the measurements and the code label."""
    extra = ["--naive"] if args.naive else []
    cert_dir = tempfile.mkdtemp(prefix="chatnet-bench-tls-") if args.tls else None
    if cert_dir:
        args.certs = common.make_test_certs(cert_dir)
        extra += common.tls_server_args(args.certs)
    target = common.Target(args.replicas, rev=args.rev, root=args.server_root, extra_args=extra,
                           profile=args.profile if args.replicas == 1 else None)
    workers, pipes = [], []
    try:
        with common.sigterm_as_exit():
            target.start()
            print(f"server pid {target.pid} on {target.addr[0]}:{target.addr[1]}, code {target.label}",
                  file=sys.stderr, flush=True)
            workers, pipes = start_workers(args, target.addr)
            return measure_window(args, target, workers, pipes), target.label
    except Exception:
        if target.primary is not None:
            print(f"server log tail:\n{target.log_tail()}", file=sys.stderr)
        raise
    finally:
        common.tear_down(pipes, workers, target)
        if cert_dir:
            shutil.rmtree(cert_dir, ignore_errors=True)


def summarize(args, m: dict, label: str) -> dict:
    """The run's figures: rates in the window, latency percentiles, CPU, memory, integrity,
    and the targets judged."""
    results, cpu_a, cpu_b = m["results"], m["cpu_a"], m["cpu_b"]
    total = {key: sum(r[key] for r in results) for key in (
        "acks_in_window", "delivered_in_window", "sent", "acked", "errors", "received", "missing",
        "unanswered", "disorder", "lost_connections")}
    delivered = total["delivered_in_window"]
    summary = {
        "bench": "throughput", "mode": "open" if args.rate else "closed", "rate_offered": args.rate,
        "senders": args.senders, "window": args.window if not args.rate else None, "text_bytes": args.size,
        "duration_s": args.duration, "loadgen_procs": args.procs, "replicas": args.replicas, "naive": args.naive,
        "tls": args.tls,
        "delivered_per_s": round(delivered / args.duration, 1),
        "acks_per_s": round(total["acks_in_window"] / args.duration, 1),
        "ack_ms": common.summarize_us([x for r in results for x in r["ack_us"]]),
        "delivery_ms": common.summarize_us([x for r in results for x in r["deliv_us"]]),
        "send_lag_ms": common.summarize_us([x for r in results for x in r["lag_us"]]) if args.rate else None,
        "cpu_pct": common.CpuMeter.percent(cpu_a, cpu_b),
        "server_cpu_us_per_chat": round((cpu_b[1] - cpu_a[1]) * 1e6 / delivered, 1) if delivered else None,
        "server_rss_mib": round(m["rss_loaded"] / 1024, 1),
        "server_peak_rss_mib": round(m["rss_peak"] / 1024, 1),
        "server_rss_idle_mib": round(m["rss_idle"] / 1024, 1),
        "integrity": {k: total[k] for k in ("sent", "acked", "errors", "received", "missing", "unanswered",
                                             "disorder", "lost_connections")},
        "server_code": label,
        "machine": common.machine_facts(),
    }
    summary.update(judge(args, summary))
    return summary


def judge(args, summary: dict) -> dict:
    """The target this mode is judged against: p99 ack at 2,000/s (open) or chats/s (closed)."""
    if args.rate:
        p99 = summary["ack_ms"]["p99"]
        met = p99 is not None and p99 <= TARGET_P99_ACK_MS
        if args.rate == TARGET_RATE:
            status = "met" if met else "MISSED"
        else:
            status = ("met" if met else "missed") + f" (at {args.rate:g}/s, target is at {TARGET_RATE}/s)"
        return {"target_p99_ack": {"target_ms": TARGET_P99_ACK_MS, "at_rate": args.rate, "measured_ms": p99,
                                   "status": status}}
    met = summary["delivered_per_s"] >= TARGET_CHATS_PER_S
    return {"target_throughput": {"target_per_s": TARGET_CHATS_PER_S, "measured_per_s": summary["delivered_per_s"],
                                  "status": "met" if met else "MISSED"}}


def main(argv=None) -> int:
    args = parse_args(argv)
    measured, label = run(args)
    summary = summarize(args, measured, label)
    print_table(summary)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    i = summary["integrity"]
    bad = i["missing"] or i["errors"] or i["disorder"] or i["lost_connections"]
    return 1 if bad else 0


def fmt_lat(d) -> str:
    if not d or d["count"] == 0:
        return "no samples"
    return f"{d['p50']:.2f} / {d['p99']:.2f} / {d['p999']:.2f} ms   (max {d['max']:.1f} ms, n={d['count']:,})"


def print_table(s: dict) -> None:
    m = s["machine"]
    c = s["cpu_pct"]
    if s["mode"] == "closed":
        mode = f"closed loop, window {s['window']} per sender"
    else:
        mode = f"open loop, {s['rate_offered']:,.0f} chats/s offered"
    print(f"chatnet throughput: {s['senders']} senders -> {s['senders']} receivers, {mode}, "
          f"~{s['text_bytes']}-byte texts, durable group commit" + (", TLS" if s.get("tls") else ""))
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}; "
          f"server and {s['loadgen_procs']} load-generator process(es) share these CPUs")
    print(f"server code: {s['server_code']}")
    print(f"window: {s['duration_s']:g} s measured after warm-up")
    rows = [
        ("delivered chats/s (at receivers)", f"{s['delivered_per_s']:,.0f}"),
        ("acks/s (at senders)", f"{s['acks_per_s']:,.0f}"),
        ("ack latency p50 / p99 / p99.9", fmt_lat(s["ack_ms"])),
        ("delivery latency p50 / p99 / p99.9", fmt_lat(s["delivery_ms"])),
    ]
    if s["send_lag_ms"]:
        rows.append(("client send lag p50 / p99 / p99.9", fmt_lat(s["send_lag_ms"])))
    rows += [
        ("CPU in window, % of one core", f"server {c['server']:.0f} %, load generator {c['loadgen']:.0f} %, "
                                         + (f"backups {c.get('backups', 0):.0f} %, " if s.get("replicas", 1) > 1 else "")
                                         + f"other processes {c['other']:.0f} %  (machine: {c['capacity']} %)"),
        ("server CPU per delivered chat", f"{s['server_cpu_us_per_chat']} us  (all work for one chat: request, "
                                          "commit, ack, delivery, delivery mark)"),
        ("server RSS (idle -> loaded)", f"{s['server_rss_idle_mib']:.1f} -> {s['server_rss_mib']:.1f} MiB"),
    ]
    i = s["integrity"]
    rows.append(("integrity", f"sent {i['sent']:,}, acked {i['acked']:,}, received {i['received']:,}, "
                 f"missing {i['missing']}, unanswered {i['unanswered']}, errors {i['errors']}, "
                 f"out-of-order {i['disorder']}, dropped conns {i['lost_connections']}"))
    if "target_throughput" in s:
        t = s["target_throughput"]
        rows.append((f"target >= {t['target_per_s']:,} delivered/s",
                     f"{t['status']} (measured {t['measured_per_s']:,.0f}/s)"))
    if "target_p99_ack" in s:
        t = s["target_p99_ack"]
        rows.append((f"target p99 ack <= {t['target_ms']:g} ms at {TARGET_RATE:,}/s",
                     f"{t['status']} (measured p99 {t['measured_ms']} ms)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if c["other"] > 10:
        print(f"  WARNING: other processes used {c['other']:.0f} % of a core during the window; "
              "the figures are depressed by that contention")


if __name__ == "__main__":
    common.run_main(main)
