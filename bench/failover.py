"""Failover time: kill -9 of the primary → first acknowledged send on the new primary.

A 3-replica cluster (default settings: 100 ms heartbeats, 1 s failure timeout) runs on this
machine while one client sends chats in a closed loop, reconnecting as a seed-style client
would (servers in order, following a backup's redirect note).  Each trial kills the current
primary with SIGKILL, measures the time until the client's first acknowledgement from the new
primary, restarts the killed replica and waits until it is back in the view.

    python bench/failover.py                 # 20 trials
    python bench/failover.py --trials 5 --json

Targets (issue 3): median ≤ 1.5 s, worst ≤ 3 s.  A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from chatnet.codec import NEED_DATA, ResponseDecoder  # noqa: E402

REDIRECT = re.compile(r"The primary is at ([^\s]+):(\d+)\.$")
TARGET_MEDIAN_S, TARGET_WORST_S = 1.5, 3.0


class Sender(threading.Thread):
    """Sends `3|sink|n` forever; records the monotonic time of every acknowledgement."""

    def __init__(self, addresses):
        super().__init__(daemon=True)
        self.addresses = addresses
        self.acks: list[float] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def _connect(self, name: str, create: bool):
        target = None
        while not self.stop.is_set():
            for addr in ([target] if target else []) + self.addresses:
                try:
                    sock = socket.create_connection(addr, timeout=2)
                    sock.settimeout(3)
                    decoder = ResponseDecoder()
                    sock.sendall(f"\n{1 if create else 2}|{name}\n".encode())
                    frame = self._frame(sock, decoder)
                except (OSError, EOFError):
                    continue
                match = REDIRECT.search(frame.message) if frame.status == 2 else None
                if frame.status == 2:
                    target = (match.group(1), int(match.group(2))) if match else None
                    sock.close()
                    continue
                if frame.status == 1 and "taken" in frame.message:
                    sock.close()
                    create = False
                    continue
                if frame.status == 0:
                    try:
                        if frame.message.startswith("Logged in"):  # queued chat, then the note
                            while self._frame(sock, decoder).indicator == 1:
                                pass
                        return sock, decoder
                    except (OSError, EOFError):
                        pass
                sock.close()
            time.sleep(0.01)
        return None, None

    @staticmethod
    def _frame(sock, decoder):
        while (event := decoder.next_event()) is NEED_DATA:
            data = sock.recv(65536)
            if not data:
                raise EOFError
            decoder.receive_data(data)
        return event

    def run(self) -> None:
        sink, _ = self._connect("sink", True)
        if sink:
            sink.sendall(b"6\n")
            sink.close()
        sock, decoder, n = None, None, 0
        while not self.stop.is_set():
            if sock is None:
                sock, decoder = self._connect("sender", True)
                if sock is None:
                    return
            try:
                sock.sendall(f"3|sink|{n}\n".encode())
                while True:
                    frame = self._frame(sock, decoder)
                    if frame.indicator == 0:
                        break
                if frame.status == 0:
                    with self.lock:
                        self.acks.append(time.monotonic())
                    n += 1
                else:
                    raise EOFError(frame.message)
            except (OSError, EOFError):
                sock.close()
                sock = None

    def first_ack_after(self, t: float) -> float | None:
        with self.lock:
            later = [a for a in self.acks[-1000:] if a > t]
        return later[0] if later else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="also print a one-line JSON summary")
    args = ap.parse_args(argv)
    cluster = common.ClusterProcess(3)
    times: list[float] = []
    sender = None
    try:
        with common.sigterm_as_exit():
            cluster.start()
            sender = Sender([r.addr for r in cluster.replicas])
            sender.start()
            for trial in range(1, args.trials + 1):
                primary = cluster.wait_primary(60)
                start = time.monotonic()
                while sender.first_ack_after(start) is None:  # the load is flowing
                    if time.monotonic() - start > 30:
                        raise RuntimeError("no acknowledgements before the kill")
                    time.sleep(0.01)
                victim = cluster.replicas[primary]
                killed_at = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                victim.proc.wait()
                while (ack := sender.first_ack_after(killed_at)) is None:
                    if time.monotonic() - killed_at > 30:
                        raise RuntimeError("no acknowledgement within 30 s of the kill")
                    time.sleep(0.005)
                times.append(ack - killed_at)
                print(f"trial {trial:2d}: killed replica {primary} (port {victim.port}); "
                      f"first ack after {times[-1] * 1000:.0f} ms", flush=True)
                victim.start()  # same data dir: it recovers and rejoins
    finally:
        if sender is not None:
            sender.stop.set()
        cluster.stop()
    times.sort()
    median, worst = statistics.median(times), times[-1]
    summary = {
        "bench": "failover", "trials": len(times), "median_s": round(median, 3),
        "p90_s": round(times[int(0.9 * (len(times) - 1))], 3), "best_s": round(times[0], 3),
        "worst_s": round(worst, 3), "all_s": [round(t, 3) for t in times],
        "median_target": "met" if median <= TARGET_MEDIAN_S else "MISSED",
        "worst_target": "met" if worst <= TARGET_WORST_S else "MISSED",
        "machine": common.machine_facts(),
    }
    print(f"failover over {len(times)} kills: median {median:.2f} s (target ≤ {TARGET_MEDIAN_S} s: "
          f"{summary['median_target']}), p90 {summary['p90_s']:.2f} s, best {times[0]:.2f} s, "
          f"worst {worst:.2f} s (target ≤ {TARGET_WORST_S} s: {summary['worst_target']})")
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
