#!/usr/bin/env python3
"""Concurrent logged-in connections held by one chatnet server, and its memory (RSS).

Opens ``-n`` connections (default 10,000) from ``--procs`` load-generator processes, each a
``selectors`` loop, with at most ``--concurrency`` handshakes in flight per process.  Every
connection creates its own account (op 1, which also logs it in) and stays open; with
``--relogin`` accounts are created and exited first and the held connections log in with
op 2, as returning users would.  Then:

* every held connection sends ``2|its name`` and must get "already logged in as <its name>"
  back (all N are alive, served and still logged in as the right account);
* ``--verify`` pairs of them (default 5) chat: the ack and the live chat frame must arrive;
* the server's RSS (VmRSS from /proc) is printed before any connection, with all of them
  held, and after the checks; per-connection memory = (held - baseline) / N.  Kernel socket
  buffers are not part of the process' RSS; /proc/net/sockstat's TCP memory is shown beside.

    python bench/connections.py                 # 10,000 connections
    python bench/connections.py -n 2000 --relogin --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import LoginError, Loop, login_many  # noqa: E402

TARGET_CONNECTIONS = 10_000
TARGET_RSS_MIB = 300


def tcp_kernel_mem_kib() -> int | None:
    """Kernel memory of all TCP sockets of the machine (both ends of loopback), /proc/net/sockstat."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    parts = line.split()
                    return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        pass
    return None


def worker(wid: int, pipe, addr, count: int, opts: dict) -> None:
    common.run_worker(_worker, wid, pipe, addr, count, opts)


def _worker(wid, pipe, addr, count, opts) -> None:
    limit = common.raise_nofile()
    if limit < count + 64:
        raise RuntimeError(f"RLIMIT_NOFILE is {limit}, need {count + 64}: use more --procs")
    loop = Loop()
    names = [f"c{wid}_{i}" for i in range(count)]
    t0 = time.monotonic()

    def progress(done, total):
        print(f"  worker {wid}: {done:,}/{total:,} logged in", file=sys.stderr, flush=True)

    quiet = opts["quiet"]
    if opts["relogin"]:
        # Create every account, exit (op 6), wait until the server closed those connections.
        conns = login_many(loop, addr, names, op=1, concurrency=opts["concurrency"], timeout=opts["timeout"],
                           progress=None if quiet else progress)
        closed = [0]

        def on_close(conn):
            closed[0] += 1

        for c in conns:
            c.on_close = on_close
            c.write(b"6\n")
        if not loop.run_until(lambda: closed[0] == count, opts["timeout"]):
            raise RuntimeError(f"server closed only {closed[0]}/{count} connections after exit")
    t1 = time.monotonic()
    op = 2 if opts["relogin"] else 1
    conns = login_many(loop, addr, names, op=op, concurrency=opts["concurrency"], timeout=opts["timeout"],
                       progress=None if quiet else progress)
    t2 = time.monotonic()
    lost = []
    for c in conns:
        c.on_close = lost.append
    pipe.send(("ready", {"create_s": t1 - t0, "login_s": t2 - t1, "count": count}))

    while True:
        # Keep servicing the sockets (nothing should arrive) while waiting for orders.
        while not pipe.poll(0):
            loop.poll(0.05)
        msg = pipe.recv()
        if msg[0] == "ping":
            pipe.send(("ping", _ping_all(loop, conns, names, opts["timeout"]), len(lost)))
        elif msg[0] == "verify":
            pipe.send(("verify", _verify(loop, conns, names, msg[1], opts["timeout"]), len(lost)))
        else:
            break
    loop.close()


LOGGED_IN_AS = ("Unable to login: You are already logged in as {me}. "
                "Please exit and start a new client to log into a different account.")


def _ping_all(loop, conns, names, timeout) -> dict:
    """Every connection asks to log in again (op 2 with its own name): a cheap request that
    changes nothing and whose answer names the account the connection is logged in as."""
    ok, bad = [0], []

    def handler(conn, frames, t):
        want = LOGGED_IN_AS.format(me=names[conn.tag]).encode()
        for status, indicator, payload in frames:
            if status == 1 and indicator == 0 and payload == want:
                ok[0] += 1
            else:
                bad.append(payload[:80])

    t0 = time.monotonic()
    for c in conns:
        c.handler = handler
        c.write(b"2|%s\n" % names[c.tag].encode())
    loop.run_until(lambda: ok[0] + len(bad) >= len(conns), timeout)
    for c in conns:
        c.handler = None
    return {"ok": ok[0], "bad": len(bad), "example": bad[0].decode("utf-8", "replace") if bad else None,
            "seconds": round(time.monotonic() - t0, 3)}


def _verify(loop, conns, names, pairs: int, timeout) -> dict:
    """``pairs`` random disjoint pairs chat once: sender gets the ack, recipient the chat."""
    rng = random.Random(1538)
    picked = rng.sample(range(len(conns)), min(len(conns) // 2 * 2, pairs * 2))
    acks, chats, problems = {}, {}, []

    def on_sender(conn, frames, t):
        for status, indicator, payload in frames:
            acks[conn.tag] = (status, payload.decode("utf-8", "replace"))

    def on_receiver(conn, frames, t):
        for status, indicator, payload in frames:
            chats[conn.tag] = (status, indicator, payload.decode("utf-8", "replace"))

    expect = []
    t0 = time.monotonic()
    for i in range(0, len(picked), 2):
        a, b = conns[picked[i]], conns[picked[i + 1]]
        a.handler, b.handler = on_sender, on_receiver
        text = f"verify {i // 2} at {time.time():.3f}"
        a.write(f"3|{names[b.tag]}|{text}\n".encode())
        expect.append((a.tag, b.tag, text))
    loop.run_until(lambda: len(acks) == len(expect) and len(chats) == len(expect), timeout)
    ok = 0
    for a, b, text in expect:
        want_ack = (0, f"Message sent to {names[b]}.")
        want_chat = (0, 1, f"{names[a]}|{text}")
        if acks.get(a) == want_ack and chats.get(b) == want_chat:
            ok += 1
        else:
            problems.append(f"{names[a]}->{names[b]}: ack {acks.get(a)!r}, chat {chats.get(b)!r}")
    for c in conns:
        c.handler = None
    return {"pairs": len(expect), "ok": ok, "problems": problems[:3], "seconds": round(time.monotonic() - t0, 3)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--connections", type=int, default=TARGET_CONNECTIONS, help="connections to hold (default 10000)")
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    ap.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per process (default 200)")
    ap.add_argument("--relogin", action="store_true", help="create+exit first, then hold connections logged in with op 2")
    ap.add_argument("--verify", type=int, default=5, help="pairs of held connections that chat (default 5)")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds to hold all connections before measuring (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit for each phase in seconds (default 300)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    common.add_code_args(ap)
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    args = ap.parse_args(argv)
    if args.connections < 2:
        ap.error("-n must be >= 2")
    args.procs = max(1, min(args.procs, args.connections))
    return args


def start_workers(args, addr) -> tuple[list, list]:
    """Fork the load-generator processes, each opening its share of the connections."""
    n, procs_n = args.connections, args.procs
    shares = [n // procs_n + (1 if w < n % procs_n else 0) for w in range(procs_n)]
    opts = {"concurrency": args.concurrency, "relogin": args.relogin, "timeout": args.timeout, "quiet": args.quiet}
    ctx = multiprocessing.get_context("fork")
    workers, pipes = [], []
    for w in range(procs_n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(w, child, addr, shares[w], opts), daemon=True)
        p.start()
        workers.append(p)
        pipes.append(parent)
    return workers, pipes


def measure_setup(args, pid: int, workers, pipes, info: dict, t0: float) -> None:
    """Wait until every connection is logged in: time taken since ``t0`` (just before the
    load generators started) and CPU used meanwhile."""
    meter = common.CpuMeter(pid, [p.pid for p in workers])
    cpu_a = meter.sample()
    ready = []
    for pipe in pipes:
        if not pipe.poll(args.timeout * 2 + 30):
            raise RuntimeError("a worker did not finish logging in")
        msg = pipe.recv()
        if msg[0] != "ready":
            raise RuntimeError(msg[1])
        ready.append(msg[1])
    info["cpu_pct"] = common.CpuMeter.percent(cpu_a, meter.sample())
    info["setup_s"] = round(time.monotonic() - t0, 2)
    info["create_s"] = round(max(r["create_s"] for r in ready), 2)
    info["login_s"] = round(max(r["login_s"] for r in ready), 2)


def measure_held(args, pid: int, pipes, info: dict) -> None:
    """With every connection held: memory, fds, the probe of each and the chat check."""
    time.sleep(args.hold)  # a fixed hold is the point: memory after the connections settle
    info["rss_held_kib"] = common.rss_kib(pid)
    info["tcp_kib"] = tcp_kernel_mem_kib()
    info["server_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    for pipe in pipes:
        pipe.send(("ping",))
    pings = [pipe.recv() for pipe in pipes]
    pipes[0].send(("verify", args.verify))
    verify = pipes[0].recv()
    if verify[0] != "verify" or any(p[0] != "ping" for p in pings):
        raise RuntimeError(f"worker error: {verify} {pings}")
    info["rss_after_kib"] = common.rss_kib(pid)
    info["rss_peak_kib"] = common.peak_rss_kib(pid)
    info["pings"] = [p[1] for p in pings]
    info["verify"] = verify[1]
    info["lost"] = max(v[2] for v in pings + [verify])
    for pipe in pipes:
        pipe.send(("stop",))


def run(args) -> dict:
    """Start the server and the load generators, hold the connections and measure; stop
    everything by PID whatever happens."""
    target = common.Target(rev=args.rev, root=args.server_root)
    workers, pipes = [], []
    info = {"label": target.label}
    try:
        with common.sigterm_as_exit():
            target.start()
            print(f"server pid {target.pid} on {target.addr[0]}:{target.addr[1]}, code {target.label}",
                  file=sys.stderr, flush=True)
            time.sleep(0.5)  # let the fresh server settle before its baseline RSS
            info["rss_base_kib"] = common.rss_kib(target.pid)
            t0 = time.monotonic()
            workers, pipes = start_workers(args, target.addr)
            measure_setup(args, target.pid, workers, pipes, info, t0)
            measure_held(args, target.pid, pipes, info)
    finally:
        common.tear_down(pipes, workers, target)
    return info


def summarize(args, info: dict) -> dict:
    """The run's figures and the target judged (10,000 connections under 300 MB RSS)."""
    n = args.connections
    ping_ok = sum(p["ok"] for p in info["pings"])
    held_mib = info["rss_held_kib"] / 1024
    tcp = info["tcp_kib"]
    summary = {
        "bench": "connections", "connections": n,
        "mode": "create+exit, then login (op 2)" if args.relogin else "create (op 1, logs in)",
        "loadgen_procs": args.procs, "setup_s": info["setup_s"],
        "logins_per_s": round(n / info["login_s"], 1) if info["login_s"] else None,
        "server_fds": info["server_fds"], "setup_cpu_pct": info["cpu_pct"],
        "rss_base_mib": round(info["rss_base_kib"] / 1024, 1),
        "rss_held_mib": round(held_mib, 1),
        "rss_after_checks_mib": round(info["rss_after_kib"] / 1024, 1),
        "rss_peak_mib": round(info["rss_peak_kib"] / 1024, 1),
        "bytes_per_connection": round((info["rss_held_kib"] - info["rss_base_kib"]) * 1024 / n),
        "kernel_tcp_mem_mib": round(tcp / 1024, 1) if tcp is not None else None,
        "alive_and_answering": ping_ok, "bad_answers": sum(p["bad"] for p in info["pings"]),
        "probe_s": max(p["seconds"] for p in info["pings"]),
        "verify": info["verify"], "lost_connections": info["lost"],
        "server_code": info["label"], "machine": common.machine_facts(),
    }
    met = (ping_ok == n and n >= TARGET_CONNECTIONS and held_mib < TARGET_RSS_MIB
           and summary["rss_peak_mib"] < TARGET_RSS_MIB)
    summary["target"] = {
        "connections": TARGET_CONNECTIONS, "rss_mib_below": TARGET_RSS_MIB,
        "status": "met" if met else ("MISSED" if n >= TARGET_CONNECTIONS else f"not tested (only {n:,} connections)"),
    }
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = run(args)
    except LoginError as exc:
        print(f"login failed: {exc}", file=sys.stderr)
        return 1
    summary = summarize(args, info)
    print_table(summary)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    v = summary["verify"]
    ok = summary["alive_and_answering"] == args.connections and v["ok"] == v["pairs"] and not summary["lost_connections"]
    return 0 if ok else 1


def print_table(s: dict) -> None:
    m = s["machine"]
    print(f"chatnet connections: {s['connections']:,} concurrent logged-in connections, {s['mode']}")
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}; "
          f"server and {s['loadgen_procs']} load-generator process(es) share these CPUs")
    print(f"server code: {s['server_code']}")
    v = s["verify"]
    rows = [
        ("connections held (server fds)", f"{s['connections']:,} ({s['server_fds']:,} fds open in the server)"),
        ("time to open and log in all", f"{s['setup_s']:.1f} s ({s['logins_per_s']:,.0f} logins/s in the login phase)"),
        ("CPU during setup, % of one core", "server {server:.0f} %, load generator {loadgen:.0f} %, "
                                            "other processes {other:.0f} %".format(**s["setup_cpu_pct"])),
        ("alive, logged in (op 2 probe each)", f"{s['alive_and_answering']:,} / {s['connections']:,} "
                                            f"(bad answers {s['bad_answers']}, dropped {s['lost_connections']}; {s['probe_s']:.2f} s)"),
        ("chat check (random pairs)", f"{v['ok']} / {v['pairs']} pairs got ack and live chat"
                                      + (f"; {v['problems']}" if v["problems"] else "")),
        ("server RSS, no connections", f"{s['rss_base_mib']:.1f} MiB"),
        ("server RSS, all held", f"{s['rss_held_mib']:.1f} MiB"),
        ("server RSS, after checks / peak", f"{s['rss_after_checks_mib']:.1f} / {s['rss_peak_mib']:.1f} MiB"),
        ("RSS per connection (incl. account)", f"{s['bytes_per_connection']:,} bytes"),
        ("kernel TCP memory, whole machine", f"{s['kernel_tcp_mem_mib']} MiB (socket buffers; not in RSS)"),
        (f"target {TARGET_CONNECTIONS:,} conns < {TARGET_RSS_MIB} MB RSS",
         f"{s['target']['status']} (measured {s['rss_held_mib']:.1f} MiB, peak {s['rss_peak_mib']:.1f} MiB)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"  {k:<{width}}  {val}")


if __name__ == "__main__":
    common.run_main(main)
