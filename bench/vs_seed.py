#!/usr/bin/env python3
"""chatnet side by side with the seed's in-memory reference server, one load generator.

Issue 12 asks whether one durable chatnet replica delivers at least as many chats per second
as the seed's reference server (``../shared/seed/reference-server.py``: a thread per client,
everything in memory, a CSV append per queued chat), measured in the same run on the same
machine.  This machine is shared and noisy, so the configurations are run in interleaved
rounds (seed, chatnet 1 replica, chatnet 3 replicas, seed, ...) and the script reports each
round's figures, the per-round ratio chatnet/seed, and the medians over the rounds, with the
CPU of each server and of every other process of the machine during each window.

The load is ``bench/throughput.py``'s load generator, unchanged: ``--senders`` (default 25)
sender/receiver pairs, each sender sending its next chat as soon as the previous one is
acknowledged (closed loop, one request per write), or ``--rate R`` chats/s in open loop.
Both servers get the same bytes: ``\\n1|name\\n`` to create and log in, then ``3|rN|text\\n``
(the seed strips the newlines; chatnet takes the first one as "line mode").

    python bench/vs_seed.py                                  # 5 rounds: seed, 1, 3; closed loop
    python bench/vs_seed.py --configs seed,1 --rounds 7      # only seed and one replica
    python bench/vs_seed.py --configs seed,1,1@HEAD~3        # chatnet of a git revision too
    python bench/vs_seed.py --rate 2000 --configs 1,3        # ack latency at 2,000 chats/s
    python bench/vs_seed.py --configs 1,3,3/majority         # 3 replicas in both quorum modes
    python bench/vs_seed.py --configs seed,floor,floor-durable,floor-thread,1

``floor``, ``floor-durable``, ``floor-thread`` and ``floor-process`` are ``bench/floor_server.py``:
one ``selectors`` loop answering this load with no chat logic at all (in memory; with an inline
``fdatasync`` per loop pass; with the sync on a storage thread; in a child process) -- the
ceiling of the project's fixed shape on this machine, against which chatnet's figures read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import throughput  # noqa: E402

from chatnet.testing import free_port, port_open, wait_until  # noqa: E402


def _find_seed_server(root: str) -> str:
    """``shared/seed/reference-server.py`` beside the checkout, or beside one of its parents (a
    git worktree such as /work/wt/NAME sits one level deeper than the main checkout)."""
    first = here = os.path.dirname(root)
    while True:
        candidate = os.path.join(here, "shared", "seed", "reference-server.py")
        if os.path.exists(candidate):
            return candidate
        if os.path.dirname(here) == here:
            return os.path.join(first, "shared", "seed", "reference-server.py")
        here = os.path.dirname(here)


SEED_SERVER = _find_seed_server(common.ROOT)


class SeedServer:
    """The seed's reference server as one primary on a free port of 127.0.0.1, run from a
    temporary directory holding a copy of the script and the ``tables/`` folder it writes its
    CSV files to; stopped by PID.

    The copy differs from the original in one line: its replica set ``PORTS`` is only its own
    port.  The original dials 1538, 2538 and 3538 at start-up, where other people's chatnet
    clusters (``chatserver --local``) may be listening; with its own port alone it runs as a
    single server, which is what it does anyway when nothing answers there."""

    label = "seed reference server (in memory, thread per client)"

    def __init__(self, script: str = SEED_SERVER) -> None:
        self.script = script
        self.dir = tempfile.mkdtemp(prefix="chatnet-vs-seed-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> tuple[str, int]:
        return (common.HOST, self.port)

    def backup_pids(self) -> list[int]:
        return []

    def log_tail(self, n: int = 20) -> str:
        return "(the seed's output goes to /dev/null: it prints a line per chat)"

    def start(self, timeout: float = 15.0) -> SeedServer:
        with open(self.script) as f:
            source = f.read()
        old = "PORTS = {1538, 2538, 3538}"
        if old not in source:
            raise RuntimeError(f"{self.script}: no line {old!r} to point at port {self.port}")
        with open(os.path.join(self.dir, "reference-server.py"), "w") as f:
            f.write(source.replace(old, f"PORTS = {{{self.port}}}", 1))
        os.mkdir(os.path.join(self.dir, "tables"))
        self.proc = subprocess.Popen(
            [sys.executable, "reference-server.py", "primary", str(self.port)], cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        return self._wait_listening(timeout)

    def _wait_listening(self, timeout: float):
        wait_until(lambda: self.proc.poll() is not None or port_open(*self.addr), timeout,
                   what=f"{self.label} to listen on port {self.port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.label} exited with status {self.proc.returncode}")
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, by PID; remove the temporary directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class FloorServer(SeedServer):
    """``bench/floor_server.py``: the least one ``selectors`` loop thread can do for this load
    (in memory, or with ``durable`` an inline ``fdatasync`` per loop pass), on a free port;
    stopped by PID like the seed."""

    MODES = {"floor": ([], "in memory"),
             "floor-durable": (["--durable"], "fdatasync per pass, inline"),
             "floor-thread": (["--durable", "--thread"], "fdatasync on a storage thread"),
             "floor-process": (["--durable", "--thread=process"], "fdatasync in a child process")}

    def __init__(self, mode: str) -> None:
        super().__init__(os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_server.py"))
        self.flags, what = self.MODES[mode]
        self.label = f"floor: one selectors loop, {what}"

    def start(self, timeout: float = 15.0) -> FloorServer:
        extra = [f if f != "--durable" else f"--durable={self.dir}" for f in self.flags]
        self.proc = subprocess.Popen(
            [sys.executable, self.script, str(self.port), *extra], cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        return self._wait_listening(timeout)


@dataclass(frozen=True)
class Config:
    """One configuration of a round: ``seed``, or chatnet with ``replicas`` (and a git ``rev``)."""

    name: str
    replicas: int = 0  # 0: the seed or a floor
    rev: str | None = None
    quorum: str | None = None  # chatnet's --quorum (None: the server's default, all)

    @staticmethod
    def parse(text: str) -> Config:
        spec, _, quorum = text.strip().partition("/")
        n, _, rev = spec.partition("@")
        if n == "seed" or n in FloorServer.MODES:
            return Config(n)
        if not n.isdigit() or int(n) < 1 or quorum not in ("", "all", "majority"):
            raise ValueError(f"bad configuration {text!r}: 'seed', 'floor', 'floor-durable', 'floor-thread', "
                             "N, N@REV, N/majority or N@REV/majority")
        return Config(text.strip(), int(n), rev or None, quorum or None)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="seed,1,3",
                    help="comma-separated, run in this order each round: 'seed', N (chatnet, N replicas), "
                         "N@REV (chatnet code of git revision REV), either with /majority (--quorum "
                         "majority; default all), or a floor (floor, floor-durable, "
                         "floor-thread, floor-process: bench/floor_server.py); default seed,1,3")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    common.add_load_args(ap, senders=25, duration=8.0)
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (default 1)")
    ap.add_argument("--seed-script", default=SEED_SERVER, help=f"the seed's server (default {SEED_SERVER})")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    args = ap.parse_args(argv)
    try:
        args.configs = [Config.parse(c) for c in args.configs.split(",") if c.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    if not args.configs or args.rounds < 1 or args.senders < 1 or args.duration <= 0:
        ap.error("need at least one configuration, --rounds >= 1, --senders >= 1, --duration > 0")
    if args.configs[0].name != "seed" and any(c.name == "seed" for c in args.configs[1:]):
        ap.error("put 'seed' first: ratios are taken against it")
    args.procs = min(args.procs, args.senders)
    return args


def load_args(args, config: Config) -> argparse.Namespace:
    """The namespace ``throughput.py``'s workers and ``summarize`` read, for one configuration."""
    return argparse.Namespace(
        rate=args.rate, window=1, size=args.size, senders=args.senders, procs=args.procs,
        warmup=args.warmup, duration=args.duration, drain=5.0, replicas=max(1, config.replicas), naive=False,
        tls=False)


def run_one(args, config: Config) -> dict:
    """Start one server (or cluster), load it for one window with ``throughput.py``'s load
    generator, stop everything by PID whatever happens; the window's summary."""
    if config.replicas:
        target = common.Target(config.replicas, rev=config.rev,
                               extra_args=("--quorum", config.quorum) if config.quorum else ())
    elif config.name == "seed":
        target = SeedServer(args.seed_script)
    else:
        target = FloorServer(config.name)
    targs = load_args(args, config)
    workers, pipes = [], []
    try:
        with common.sigterm_as_exit():
            target.start()
            print(f"  {config.name}: pid {target.pid} on port {target.addr[1]}, {target.label}",
                  file=sys.stderr, flush=True)
            workers, pipes = throughput.start_workers(targs, target.addr)
            measured = throughput.measure_window(targs, target, workers, pipes)
    finally:
        common.tear_down(pipes, workers, target)
    summary = throughput.summarize(targs, measured, target.label)
    summary["config"] = config.name
    return summary


def run(args) -> list[list[dict]]:
    """Every round, every configuration in order; a round's list follows ``args.configs``."""
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        rounds.append([run_one(args, c) for c in args.configs])
        print_round(r + 1, rounds[-1])
        time.sleep(0.5)
    return rounds


def measure(args, rounds: list[list[dict]]) -> dict:
    """Per configuration: medians over the rounds of throughput, ack p50/p99, CPU; and the
    ratio of each configuration to the first one (the seed), per round and its median."""
    base = args.configs[0].name
    out = {"configs": [], "base": base}
    for i, config in enumerate(args.configs):
        runs = [rnd[i] for rnd in rounds]
        ratios = [s["delivered_per_s"] / rnd[0]["delivered_per_s"] if rnd[0]["delivered_per_s"] else None
                  for s, rnd in zip(runs, rounds)]
        out["configs"].append({
            "config": config.name,
            "label": runs[0]["server_code"],
            "delivered_per_s": [s["delivered_per_s"] for s in runs],
            "median_per_s": statistics.median(s["delivered_per_s"] for s in runs),
            "ratio_to_base": ratios,
            "median_ratio": _median(ratios),
            "ack_p50_ms": _median(s["ack_ms"]["p50"] for s in runs),
            "ack_p99_ms": _median(s["ack_ms"]["p99"] for s in runs),
            "server_cpu_pct": _median(s["cpu_pct"]["server"] for s in runs),
            "backups_cpu_pct": _median(s["cpu_pct"]["backups"] for s in runs),
            "loadgen_cpu_pct": _median(s["cpu_pct"]["loadgen"] for s in runs),
            "other_cpu_pct": _median(s["cpu_pct"]["other"] for s in runs),
            "other_cpu_max_pct": max(s["cpu_pct"]["other"] for s in runs),
            "cpu_us_per_chat": _median(s["server_cpu_us_per_chat"] for s in runs),
            "integrity_ok": all(_intact(s) for s in runs),
        })
    out["replica_ratios"] = replica_ratios(args, rounds)
    return out


def replica_ratios(args, rounds: list[list[dict]]) -> list[dict]:
    """For each cluster configuration (N > 1 replicas), its throughput over the one-replica
    configuration of the same code, per round (same round, so same contention) and median."""
    out = []
    for i, c in enumerate(args.configs):
        j = next((j for j, o in enumerate(args.configs) if o.replicas == 1 and o.rev == c.rev), None)
        if c.replicas > 1 and j is not None:
            per = [rnd[i]["delivered_per_s"] / rnd[j]["delivered_per_s"] if rnd[j]["delivered_per_s"] else None
                   for rnd in rounds]
            out.append({"config": c.name, "over": args.configs[j].name, "per_round": per, "median": _median(per)})
    return out


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _intact(s: dict) -> bool:
    i = s["integrity"]
    return not (i["missing"] or i["errors"] or i["disorder"] or i["lost_connections"] or i["unanswered"])


def print_round(n: int, runs: list[dict]) -> None:
    """One line per configuration of a round, with its ratio to the round's first (the seed)."""
    base = runs[0]["delivered_per_s"]
    for s in runs:
        c, a = s["cpu_pct"], s["ack_ms"]
        ratio = f"{s['delivered_per_s'] / base:.2f}x" if base else "-"
        print(f"round {n} {s['config']:>10}: {s['delivered_per_s']:>9,.0f} chats/s  {ratio:>6} of {runs[0]['config']}"
              f"  ack p50/p99 {a['p50']}/{a['p99']} ms  CPU server {c['server']:.0f}% backups {c['backups']:.0f}%"
              f" loadgen {c['loadgen']:.0f}% other {c['other']:.0f}%  {'ok' if _intact(s) else 'INTEGRITY FAILED'}",
              flush=True)


def print_summary(args, m: dict) -> None:
    mode = f"open loop {args.rate:,.0f} chats/s" if args.rate else "closed loop, 1 request in flight per sender"
    print(f"\nvs seed: {args.senders} sender/receiver pairs, {mode}, {args.duration:g} s windows, "
          f"{args.rounds} interleaved rounds; medians over the rounds (CPU in % of one core; "
          f"machine {os.cpu_count() * 100} %)")
    head = (f"{'config':>10} {'chats/s':>9} {'ratio':>6} {'ratios per round':<34} {'ack p50':>8} {'ack p99':>8}"
            f" {'server':>7} {'backups':>7} {'loadgen':>7} {'other':>11} {'us/chat':>8}  integrity")
    print(head)
    for c in m["configs"]:
        per = ", ".join("-" if r is None else f"{r:.2f}" for r in c["ratio_to_base"])
        ratio = "-" if c["median_ratio"] is None else f"{c['median_ratio']:.2f}x"
        print(f"{c['config']:>10} {c['median_per_s']:>9,.0f} {ratio:>6} {per:<34} {_ms(c['ack_p50_ms']):>8}"
              f" {_ms(c['ack_p99_ms']):>8} {c['server_cpu_pct']:>6.0f}% {c['backups_cpu_pct']:>6.0f}%"
              f" {c['loadgen_cpu_pct']:>6.0f}% {c['other_cpu_pct']:>4.0f}% (<={c['other_cpu_max_pct']:.0f}%)"
              f" {c['cpu_us_per_chat'] or 0:>8.0f}  {'ok' if c['integrity_ok'] else 'FAILED'}")
    for c in m["configs"]:
        print(f"  {c['config']}: {c['label']}")
    for r in m["replica_ratios"]:
        per = ", ".join("-" if x is None else f"{x:.0%}" for x in r["per_round"])
        print(f"  {r['config']} / {r['over']}: median {r['median']:.0%} (per round: {per})")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}ms"


def main(argv=None) -> int:
    args = parse_args(argv)
    rounds = run(args)
    m = measure(args, rounds)
    print_summary(args, m)
    if args.json:
        print(json.dumps({"summary": m, "rounds": [[{k: s[k] for k in (
            "config", "delivered_per_s", "ack_ms", "cpu_pct", "server_cpu_us_per_chat", "integrity", "server_code")}
            for s in rnd] for rnd in rounds], "machine": common.machine_facts()}, separators=(",", ":")))
    return 0 if all(c["integrity_ok"] for c in m["configs"]) else 1


if __name__ == "__main__":
    common.run_main(main)
