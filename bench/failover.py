"""Failover time: kill -9 of the primary → first acknowledged send on the new primary.

A 3-replica cluster (default settings: 100 ms heartbeats, 1 s failure timeout) runs on this
machine while one client sends chats in a closed loop, reconnecting as a seed-style client
would (servers in order, following a backup's redirect note).  Each trial kills the current
primary with SIGKILL, measures the time until the client's first acknowledgement from the new
primary, restarts the killed replica and waits until it is back in the view.

    python bench/failover.py                 # 20 trials
    python bench/failover.py --trials 5 --json
    python bench/failover.py --timeline docs/failover-latency.png   # latency over time, one kill

``--timeline PNG`` runs one kill with ``--senders`` (default 4) concurrent senders instead,
records every acknowledged send (time of its first attempt, ack latency measured from that
first attempt, so a chat retried after the kill counts the whole wait) and plots latency vs
time with the kill, the first ack on the new primary and the old primary's restart marked.
``--points FILE`` also writes the points as JSON (``--replot FILE --timeline PNG`` redraws).  Plotting needs matplotlib
(``pip install matplotlib``); without it the figures are still printed.

Each trial also prints the CPU that other processes of the machine used between the kill and
the first ack (the machine is shared; a busy machine slows elections and reconnects).

Targets (issue 3): median ≤ 1.5 s, worst ≤ 3 s.  A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from chatnet.server.cli import query_status  # noqa: E402
from chatnet.testing import FailoverClient, NoPrimary, WaitTimeout, wait_until  # noqa: E402

TARGET_MEDIAN_S, TARGET_WORST_S = 1.5, 3.0


class Sender(threading.Thread):
    """Sends `3|sink|n` forever; records the monotonic time of every acknowledgement, and
    (first attempt, ack) for each chat: a chat whose connection failed is sent again, under
    the same n, on the next connection (``chatnet.testing.FailoverClient`` reconnects the way a
    seed-style client would: servers in order, following a backup's redirect note)."""

    def __init__(self, addresses, name: str = "sender", sink: str = "sink"):
        super().__init__(daemon=True)
        self.addresses = addresses
        self.name_, self.sink = name, sink
        self.acks: list[float] = []
        self.ack_conns: list[float] = []  # per ack: when its connection was logged in
        self.peer = None  # (host, port) of the replica that acknowledged the last send
        self.points: list[tuple[float, float]] = []  # (first attempt, ack), monotonic seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            sink = FailoverClient(self.addresses, self.sink, create=True)
            sink.conn.send("6")
            sink.close()
            client = FailoverClient(self.addresses, self.name_, create=True)
        except NoPrimary:
            return
        n, first_try = 0, None
        while not self.stop.is_set():
            if first_try is None:
                first_try = time.monotonic()
            try:
                frame = client.request(f"3|{self.sink}|{n}")
            except NoPrimary:
                continue
            if frame.status != 0:  # an error answer: send it again on a fresh connection
                client.close()
                continue
            t = time.monotonic()
            self.peer = client.connected_to
            with self.lock:
                self.acks.append(t)
                self.ack_conns.append(client.connected_at)
                self.points.append((first_try, t))
            n += 1
            first_try = None

    def first_ack_after(self, t: float, new_conn: bool = False) -> float | None:
        """First ack after ``t``; with ``new_conn`` only on a connection logged in after ``t``
        (an ack the old primary wrote just before the kill can still be read after it)."""
        with self.lock:
            later = [a for a, c in zip(self.acks[-1000:], self.ack_conns[-1000:])
                     if a > t and (not new_conn or c > t)]
        return later[0] if later else None


class OtherCpu:
    """CPU used by processes other than the given replicas and this one, between two samples."""

    def __init__(self, pids):
        self.pids = list(pids) + [os.getpid()]

    def sample(self):
        return (time.monotonic(), common.system_busy_seconds(), sum(common.cpu_seconds(p) for p in self.pids))

    @staticmethod
    def percent(a, b) -> float:
        wall = max(b[0] - a[0], 1e-9)
        return round(max(0.0, 100 * ((b[1] - a[1]) - (b[2] - a[2])) / wall), 1)


def acking_primary(cluster, sender: Sender, timeout: float = 30.0) -> int:
    """The replica acknowledging the sender's chats right now, once it reports itself serving
    (the sender may still be on a replica that stepped down, or not yet acking)."""
    by_port = {r.port: i for i, r in enumerate(cluster.replicas)}
    start = time.monotonic()

    def serving_acker():
        peer = sender.peer
        if sender.first_ack_after(start) is None or not peer or peer[1] not in by_port:
            return None
        st = query_status(common.HOST, peer[1], timeout=0.5)
        return (by_port[peer[1]],) if st and st.get("serving") else None
    try:
        return wait_until(serving_acker, timeout, what="the sender's acks from a serving replica")[0]
    except WaitTimeout:
        raise RuntimeError(f"the sender's acks ({sender.peer}) do not come from a serving replica") from None


def kill(cluster, i: int) -> tuple[float, OtherCpu, tuple]:
    """SIGKILL replica ``i`` (reaped); the kill time and a CPU meter of the others started."""
    victim = cluster.replicas[i]
    meter = OtherCpu([r.pid for r in cluster.replicas if r is not victim and r.alive()])
    cpu_a = meter.sample()
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait()
    return killed_at, meter, cpu_a


def first_ack_after_kill(senders, killed_at: float, every: bool = False, timeout: float = 30.0) -> float:
    """The first ack on a connection made after the kill (by any sender, or once ``every``
    sender has one: then the time that became true)."""
    def acked():
        acks = [s.first_ack_after(killed_at, new_conn=True) for s in senders]
        if every:
            return time.monotonic() if all(acks) else None
        return min((a for a in acks if a), default=None)
    what = "an acknowledgement from every sender" if every else "an acknowledgement"
    try:
        return wait_until(acked, timeout, what=f"{what} after the kill", interval=0.005)
    except WaitTimeout as exc:
        raise RuntimeError(str(exc)) from None


def one_trial(cluster, sender: Sender, trial: int) -> tuple[float, float]:
    """Kill the replica acknowledging the sender; seconds to the first ack on the new
    primary and the other processes' CPU meanwhile; restart the victim."""
    cluster.wait_in_sync(timeout=60)  # every replica (the last victim too) back in the view
    primary = acking_primary(cluster, sender)
    others_serving = [i for i in cluster.alive() if i != primary and (cluster.status(i, 0.5) or {}).get("serving")]
    if others_serving:
        print(f"note: replicas {others_serving} also report serving", flush=True)
    killed_at, meter, cpu_a = kill(cluster, primary)
    ack = first_ack_after_kill([sender], killed_at)
    other = OtherCpu.percent(cpu_a, meter.sample())
    print(f"trial {trial:2d}: killed replica {primary} (port {cluster.replicas[primary].port}); "
          f"first ack after {(ack - killed_at) * 1000:.0f} ms; other processes {other:.0f} % of a core", flush=True)
    cluster.restart(primary)  # same data dir: it recovers and rejoins
    return ack - killed_at, other


def run_trials(args) -> tuple[list[float], list[float], str]:
    """``--trials`` kills under one sender; failover times, others' CPU, the code label."""
    target = common.Target(3, rev=args.rev)
    times, others, sender = [], [], None
    try:
        with common.sigterm_as_exit():
            target.start()
            sender = Sender([r.addr for r in target.cluster.replicas])
            sender.start()
            for trial in range(1, args.trials + 1):
                seconds, other = one_trial(target.cluster, sender, trial)
                times.append(seconds)
                others.append(other)
    finally:
        if sender is not None:
            sender.stop.set()
        target.stop()
    return times, others, target.label


def summarize_trials(times: list[float], others: list[float], label: str) -> dict:
    times = sorted(times)
    median, worst = statistics.median(times), times[-1]
    return {
        "bench": "failover", "trials": len(times), "median_s": round(median, 3),
        "p90_s": round(times[int(0.9 * (len(times) - 1))], 3), "best_s": round(times[0], 3),
        "worst_s": round(worst, 3), "all_s": [round(t, 3) for t in times],
        "median_target": "met" if median <= TARGET_MEDIAN_S else "MISSED",
        "worst_target": "met" if worst <= TARGET_WORST_S else "MISSED",
        "other_cpu_pct": {"median": statistics.median(others), "max": max(others)},
        "server_code": label,
        "machine": common.machine_facts(),
    }


def print_trials(s: dict) -> None:
    cpu = s["other_cpu_pct"]
    print(f"code {s['server_code']}")
    print(f"failover over {s['trials']} kills: median {s['median_s']:.2f} s (target ≤ {TARGET_MEDIAN_S} s: "
          f"{s['median_target']}), p90 {s['p90_s']:.2f} s, best {s['best_s']:.2f} s, "
          f"worst {s['worst_s']:.2f} s (target ≤ {TARGET_WORST_S} s: {s['worst_target']}); "
          f"other processes {cpu['median']:.0f} % (median) / {cpu['max']:.0f} % (max) of a core")


def run_timeline(args) -> tuple[list[Sender], dict, str]:
    """One kill of the primary under ``--senders`` concurrent senders: the senders (with every
    ack), the moments marked (kill, first ack, all acking, restart, rejoined), the code label."""
    target = common.Target(3, rev=args.rev)
    senders: list[Sender] = []
    marks = {}
    try:
        with common.sigterm_as_exit():
            cluster = target.start().cluster
            addrs = [r.addr for r in cluster.replicas]
            senders = [Sender(addrs, name=f"sender{i}", sink=f"sink{i}") for i in range(args.senders)]
            for s in senders:
                s.start()
            start = time.monotonic()
            wait_until(lambda: all(s.first_ack_after(start) for s in senders), 30,
                       what="an acknowledgement for every sender")
            marks["t0"] = time.monotonic()
            time.sleep(args.before)  # load before the kill, for the plot: a span, not a wait
            marks["kill"], meter, cpu_a = kill(cluster, cluster.wait_primary(10))
            marks["first_ack"] = first_ack_after_kill(senders, marks["kill"])
            marks["all_acking"] = first_ack_after_kill(senders, marks["kill"], every=True)
            marks["other_cpu"] = OtherCpu.percent(cpu_a, meter.sample())
            time.sleep(args.restart_after)
            marks["restart"] = time.monotonic()
            cluster.restart(next(i for i, r in enumerate(cluster.replicas) if not r.alive()))
            cluster.wait_in_sync(timeout=30)  # it recovered, caught up and rejoined
            marks["rejoined"] = time.monotonic()
            time.sleep(args.after)
            marks["end"] = time.monotonic()
    finally:
        for s in senders:
            s.stop.set()
        target.stop()
    return senders, marks, target.label


def timeline_points(senders: list[Sender], marks: dict) -> list:
    """(first attempt relative to the kill, ack latency ms, sender) of every ack in the span."""
    kill, pts = marks["kill"], []
    for i, s in enumerate(senders):
        with s.lock:
            pts += [(round(a - kill, 4), round((b - a) * 1000, 3), i) for a, b in s.points
                    if marks["t0"] <= a <= marks["end"]]
    return sorted(pts)


def summarize_timeline(args, pts: list, marks: dict, label: str) -> dict:
    kill = marks["kill"]
    before = sorted(lat for t, lat, _ in pts if t < -0.1)
    after = sorted(lat for t, lat, _ in pts if t > (marks["all_acking"] - kill) + 0.5)
    return {
        "bench": "failover-timeline", "senders": args.senders, "server_code": label,
        "kill_to_first_ack_s": round(marks["first_ack"] - kill, 3),
        "kill_to_all_senders_acking_s": round(marks["all_acking"] - kill, 3),
        "restart_s": round(marks["restart"] - kill, 3), "rejoined_s": round(marks["rejoined"] - kill, 3),
        "acks": len(pts), "max_latency_ms": max(p[1] for p in pts),
        "before_p50_p99_ms": [common.percentile(before, 50), common.percentile(before, 99)] if before else [],
        "after_p50_p99_ms": [common.percentile(after, 50), common.percentile(after, 99)] if after else [],
        "sends_over_100ms": len([p for p in pts if p[1] > 100]),
        "other_cpu_pct_kill_to_recovery": marks["other_cpu"],
        "machine": common.machine_facts(),
    }


def print_timeline(s: dict) -> None:
    print(f"code {s['server_code']}; {s['senders']} senders; {s['acks']:,} acknowledged sends")
    print(f"kill -> first ack {s['kill_to_first_ack_s']:.2f} s, every sender acking again after "
          f"{s['kill_to_all_senders_acking_s']:.2f} s; worst send waited {s['max_latency_ms']:.0f} ms; "
          f"{s['sends_over_100ms']} sends over 100 ms; ack latency p50/p99 before {s['before_p50_p99_ms']} ms, "
          f"after {s['after_p50_p99_ms']} ms; old primary restarted at +{s['restart_s']:.1f} s, "
          f"back in the view at +{s['rejoined_s']:.1f} s; "
          f"other processes {s['other_cpu_pct_kill_to_recovery']:.0f} % of a core")


def trials(args) -> int:
    summary = summarize_trials(*run_trials(args))
    print_trials(summary)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


def timeline(args) -> int:
    senders, marks, label = run_timeline(args)
    pts = timeline_points(senders, marks)
    summary = summarize_timeline(args, pts, marks, label)
    print_timeline(summary)
    if args.points:
        with open(args.points, "w") as f:
            json.dump({**summary, "points_t_s_latency_ms_sender": pts}, f, separators=(",", ":"))
        print(f"points written to {args.points} (redraw with --replot {args.points} --timeline PNG)")
    plot(args.timeline, pts, summary, args.senders)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


def plot(path: str, pts, summary, n_senders: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no PNG was drawn (the figures above stand); "
              "install it with: pip install matplotlib", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i in range(n_senders):
        xs = [t for t, lat, s in pts if s == i and lat <= 100]
        ys = [lat for _, lat, s in pts if s == i and lat <= 100]
        ax.scatter(xs, ys, s=4, color=colors[i % len(colors)], alpha=0.6, linewidths=0, label=f"sender {i + 1}")
    slow = [(t, lat) for t, lat, _ in pts if lat > 100]
    if slow:  # the sends caught by the kill: few, so drawn large
        ax.scatter([t for t, _ in slow], [lat for _, lat in slow], s=60, marker="X", color="black", zorder=5,
                   label=f"{len(slow)} sends > 100 ms")
        t_s, lat_s = max(slow, key=lambda p: p[1])
        ax.annotate(f"{len(slow)} sends in flight at the kill:\nacked after {lat_s / 1000:.2f} s on the new primary",
                    xy=(t_s, lat_s), xytext=(t_s - 0.15, lat_s * 0.55), ha="right", va="top", fontsize=9,
                    arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(p[1] for p in pts) / 4, top=max(p[1] for p in pts) * 2.5)
    ax.set_xlabel("time of the send's first attempt, s (0 = kill -9 of the primary)")
    ax.set_ylabel("ack latency, ms (log scale)")
    ax.axvline(0, color="red", lw=1.5)
    ax.text(0, 0.985, " kill -9 primary", color="red", transform=ax.get_xaxis_transform(), ha="left", va="top")
    fa = summary["kill_to_first_ack_s"]
    ax.axvline(fa, color="green", lw=1, ls="--")
    ax.text(fa, 0.80, f" first ack on new primary (+{fa:.2f} s)", color="green",
            transform=ax.get_xaxis_transform(), ha="left", va="top")
    rs = summary["restart_s"]
    ax.axvline(rs, color="gray", lw=1, ls=":")
    ax.text(rs, 0.985, f" old primary restarted (+{rs:.1f} s),\n back in view at +{summary['rejoined_s']:.1f} s",
            color="gray", transform=ax.get_xaxis_transform(), ha="left", va="top")
    ax.set_title(f"chatnet, 3 replicas on one 2-CPU machine: ack latency of every send around a primary kill\n"
                 f"({n_senders} closed-loop senders, code {summary['server_code'].split(',')[0]}; "
                 f"worst send waited {summary['max_latency_ms'] / 1000:.2f} s)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", markerscale=1.5, fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rev", help="run the server code of this git revision (default: the working tree)")
    ap.add_argument("--timeline", metavar="PNG",
                    help="instead of trials: one kill under --senders senders, latency over time plotted to PNG")
    ap.add_argument("--senders", type=int, default=4, help="--timeline: concurrent senders (default 4)")
    ap.add_argument("--before", type=float, default=3.0, help="--timeline: seconds of load before the kill")
    ap.add_argument("--restart-after", type=float, default=2.0,
                    help="--timeline: restart the killed replica this long after every sender acks again")
    ap.add_argument("--after", type=float, default=3.0, help="--timeline: seconds of load after it rejoined")
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    ap.add_argument("--points", metavar="JSON", help="--timeline: also write every point to this JSON file")
    ap.add_argument("--replot", metavar="JSON", help="redraw --timeline PNG from the JSON points a run wrote")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            data = json.load(f)
        plot(args.timeline or os.path.splitext(args.replot)[0] + ".png", data.pop("points_t_s_latency_ms_sender"),
             data, data["senders"])
        return 0
    return timeline(args) if args.timeline else trials(args)


if __name__ == "__main__":
    sys.exit(main())
