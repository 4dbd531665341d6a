#!/usr/bin/env python3
"""Same-run comparisons: 1 replica vs 3 replicas, optimized vs ``--naive``, one table + JSON.

Runs ``bench/throughput.py --json`` once per configuration, one after the other, on the same
code (``--rev``) and the same machine, so the ratios are not skewed by a different day:

* ``1 replica``          the default server (group commit);
* ``3 replicas``         a 3-replica cluster on this machine, load on the primary
                         (pipelined, batched replication);
* ``1 replica, naive``   ``--naive``: one fsync per command;
* ``3 replicas, naive``  ``--naive``: one fsync per command and stop-and-wait replication.

``--rounds R`` repeats the whole sequence R times (configurations interleaved, so a burst of
someone else's load hits all of them alike); the summary takes, per configuration, the run
with the median throughput.  Targets judged: 3-replica throughput ≥ 50 % of the
single-replica figure in the same run (issue 3).

    python bench/report.py                       # 8 s windows, 1 round: about 2 minutes
    python bench/report.py --rounds 2 --rev HEAD --json
    python bench/report.py --only 1,3            # skip the naive runs

Every run prints the CPU used by other processes of the machine in its window; a run where
they took more than 10 % of a core is flagged ("contended").  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

CONFIGS = {  # key: (label, throughput.py arguments)
    "1": ("1 replica", ["--replicas", "1"]),
    "3": ("3 replicas", ["--replicas", "3"]),
    "1n": ("1 replica, naive", ["--replicas", "1", "--naive"]),
    "3n": ("3 replicas, naive", ["--replicas", "3", "--naive"]),
}
TARGET_CLUSTER_RATIO = 0.5
CONTENDED_PCT = 10.0


def run_one(key: str, args) -> dict:
    label, extra = CONFIGS[key]
    cmd = [sys.executable, os.path.join(HERE, "throughput.py"), "--json", "--duration", str(args.duration),
           "--warmup", str(args.warmup), "--senders", str(args.senders), *extra]
    if args.rate:
        cmd += ["--rate", str(args.rate)]
    if args.rev:
        cmd += ["--rev", args.rev]
    print(f"--- {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + args.warmup + 240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{label}: throughput.py exited {proc.returncode} without JSON:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    s = json.loads(lines[-1])
    s["config"], s["label"], s["exit_code"] = key, label, proc.returncode
    s["wall_s"] = round(time.monotonic() - t, 1)
    c = s["cpu_pct"]
    print(f"    {s['delivered_per_s']:,.0f} chats/s, ack p99 {s['ack_ms']['p99']} ms; CPU: server {c['server']:.0f} %, "
          f"backups {c.get('backups', 0):.0f} %, loadgen {c['loadgen']:.0f} %, other {c['other']:.0f} %"
          + ("  (CONTENDED)" if c["other"] > CONTENDED_PCT else ""), file=sys.stderr, flush=True)
    return s


def ms3(d) -> str:
    if not d or not d.get("count"):
        return "–"
    return f"{d['p50']:.2f} / {d['p99']:.2f} / {d['p999']:.2f}"


def integrity_ok(s) -> bool:
    i = s["integrity"]
    return s["exit_code"] == 0 and not (i["missing"] or i["errors"] or i["disorder"] or i["lost_connections"]
                                        or i["unanswered"])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_load_args(ap, senders=50, duration=8.0, size=False)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the sequence this many times (default 1)")
    ap.add_argument("--only", default="1,3,1n,3n", help="configurations, comma separated (default 1,3,1n,3n)")
    common.add_code_args(ap, server_root=False)
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    args = ap.parse_args(argv)
    args.keys = [k.strip() for k in args.only.split(",") if k.strip()]
    for k in args.keys:
        if k not in CONFIGS:
            ap.error(f"unknown configuration {k!r}; choose from {', '.join(CONFIGS)}")
    return args


def run_all(args) -> list[dict]:
    """Every configuration once per round, interleaved (one throughput.py run each)."""
    runs = []
    for rnd in range(args.rounds):
        for k in args.keys:
            s = run_one(k, args)
            s["round"] = rnd + 1
            runs.append(s)
    return runs


def median_runs(runs: list[dict], keys) -> dict:
    """Per configuration, the run with the median throughput (lower median for even counts)."""
    chosen = {}
    for k in keys:
        mine = sorted((r for r in runs if r["config"] == k), key=lambda r: r["delivered_per_s"])
        chosen[k] = mine[(len(mine) - 1) // 2]
        chosen[k]["all_delivered_per_s"] = [r["delivered_per_s"] for r in runs if r["config"] == k]
    return chosen


def ratios_of(chosen: dict) -> tuple[dict, dict | None]:
    """Throughput ratios between configurations, and the 3-vs-1 target judged."""
    def ratio(a, b):
        if a in chosen and b in chosen and chosen[b]["delivered_per_s"]:
            return round(chosen[a]["delivered_per_s"] / chosen[b]["delivered_per_s"], 3)
        return None

    ratios = {"3_vs_1": ratio("3", "1"), "1_opt_vs_naive": ratio("1", "1n"), "3_opt_vs_naive": ratio("3", "3n")}
    target = None
    if ratios["3_vs_1"] is not None:
        met = ratios["3_vs_1"] >= TARGET_CLUSTER_RATIO
        target = {"target_ratio": TARGET_CLUSTER_RATIO, "measured_ratio": ratios["3_vs_1"],
                  "status": "met" if met else "MISSED"}
    return ratios, target


def print_table(args, code: str, chosen: dict, machine: dict) -> None:
    mode = f"open loop at {args.rate:,.0f} chats/s" if args.rate else "closed loop, 1 request outstanding per sender"
    print(f"chatnet benchmark report: code {code}; {args.senders} senders -> {args.senders} receivers, {mode}; "
          f"{args.duration:g} s windows; {args.rounds} round(s), median run shown")
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_mib']} MiB, Python {machine['python']}, "
          f"Linux {machine['kernel']}; every replica and the load generator share these CPUs")
    head = ["configuration", "delivered/s", "ack p50/p99/p99.9 ms", "delivery p50/p99/p99.9 ms",
            "CPU srv/bak/gen/other %", "srv µs/chat", "integrity", "runs (chats/s)"]
    rows = []
    for k in args.keys:
        s = chosen[k]
        c = s["cpu_pct"]
        rows.append([s["label"], f"{s['delivered_per_s']:,.0f}", ms3(s["ack_ms"]), ms3(s["delivery_ms"]),
                     f"{c['server']:.0f}/{c.get('backups', 0):.0f}/{c['loadgen']:.0f}/{c['other']:.0f}"
                     + ("!" if c["other"] > CONTENDED_PCT else ""),
                     f"{s['server_cpu_us_per_chat']}",
                     "ok" if integrity_ok(s) else "FAILED",
                     ", ".join(f"{x:,.0f}" for x in s["all_delivered_per_s"])])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print("  (CPU: % of one core for the primary / all backups / load generator / other processes; "
          f"'!' = other processes above {CONTENDED_PCT:g} %, figures depressed by contention)")


def print_verdicts(runs: list[dict], ratios: dict, target: dict | None) -> list[str]:
    """The ratios, the target, contention and integrity; the labels of runs that failed."""
    if target is not None:
        print(f"3 replicas / 1 replica throughput: {ratios['3_vs_1']:.0%} "
              f"(target ≥ {TARGET_CLUSTER_RATIO:.0%}: {target['status']})")
    if ratios["1_opt_vs_naive"] is not None:
        print(f"group commit vs naive, 1 replica: {ratios['1_opt_vs_naive']:.1f}× the throughput")
    if ratios["3_opt_vs_naive"] is not None:
        print(f"group commit + pipelining vs naive, 3 replicas: {ratios['3_opt_vs_naive']:.1f}× the throughput")
    worst_other = max(r["cpu_pct"]["other"] for r in runs)
    if worst_other > CONTENDED_PCT:
        print(f"WARNING: other processes used up to {worst_other:.0f} % of a core in some windows; "
              "prefer a quiet machine before quoting these figures")
    bad = [r["label"] for r in runs if not integrity_ok(r)]
    if bad:
        print(f"INTEGRITY FAILED in: {', '.join(bad)}")
    return bad


def json_summary(args, code, runs, chosen, ratios, target, machine) -> dict:
    keep = ("label", "round", "delivered_per_s", "acks_per_s", "ack_ms", "delivery_ms", "send_lag_ms", "cpu_pct",
            "server_cpu_us_per_chat", "integrity", "exit_code", "server_code")
    return {
        "bench": "report", "code": code, "mode": "open" if args.rate else "closed", "rate": args.rate,
        "senders": args.senders, "duration_s": args.duration, "rounds": args.rounds,
        "median_runs": {k: {x: chosen[k][x] for x in keep + ("all_delivered_per_s",)} for k in args.keys},
        "ratios": ratios, "target_3_vs_1": target,
        "runs": [{"config": r["config"], **{x: r[x] for x in keep}} for r in runs],
        "machine": machine,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    code = common.describe_rev(args.rev) if args.rev else common.describe_tree()
    runs = run_all(args)
    chosen = median_runs(runs, args.keys)
    ratios, target = ratios_of(chosen)
    machine = common.machine_facts()
    print_table(args, code, chosen, machine)
    bad = print_verdicts(runs, ratios, target)
    if args.json:
        print(json.dumps(json_summary(args, code, runs, chosen, ratios, target, machine), separators=(",", ":")))
    return 1 if bad else 0


if __name__ == "__main__":
    common.run_main(main)
