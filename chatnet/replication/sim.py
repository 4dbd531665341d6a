"""Deterministic cluster simulator for the replication core (VOPR / FoundationDB style).

One process, one seeded ``random.Random`` driving everything: a simulated network (per-link
delay, reordering, loss, duplication, partitions), a simulated clock (integer time units,
``TICK`` units per replica tick, each replica with its own phase), simulated durable storage
that keeps exactly what the host persisted, and the real :class:`~.core.Replica` objects.
Each simulated host follows the Ready contract exactly: persist -> send -> apply -> advance.

A nemesis crashes, restarts and pauses replicas (a pause longer than half the failure
timeout makes the host call ``stalled()`` on waking, as the real reactor does), cuts links
for less than the failure timeout, crashes hosts between persisting and sending, and issues
client writes to whoever serves.  After every step the checker verifies:

* agreement: every replica's applied sequence is a prefix of one history (index -> data);
* I1: every acknowledged write is in the log or state of every serving primary, at its
  index, and (checked at the end, after healing) in the applied state of every replica;
* I2: at most one serving primary per view, and no primary's commit index advances in a
  view older than a view in which some primary already advanced it;
* I3: a replica that starts serving holds every write acknowledged so far (so a replica that
  missed writes never serves before catching up); a recovering replica never serves;
* liveness (``heal=True``): once faults stop, one primary serves every replica and all
  applied states are equal and contain every acknowledged write.

Run one seed::

    python -m chatnet.replication.sim --seed 123 --steps 600 [--n 3] [--partitions]

A failing check raises :class:`InvariantViolation` whose message ends with that command.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from dataclasses import dataclass, field

from .core import PRIMARY, DurableState, Entry, HardState, Ready, Replica
from .messages import decode_message, encode_message

TICK = 10   # time units per replica tick


class InvariantViolation(AssertionError):
    pass


def encode_state(state: list[bytes]) -> bytes:
    return b"".join(len(d).to_bytes(4, "big") + d for d in state)


def decode_state(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


@dataclass
class SimDisk:
    """What survives a crash: exactly what the host persisted."""
    hard: HardState | None = None
    snapshot_index: int = 0
    snapshot_view: int = 0
    log: list[Entry] = field(default_factory=list)
    state: list[bytes] = field(default_factory=list)   # applied chat state (entry data, in order)

    @property
    def applied_index(self) -> int:
        return len(self.state)

    def load(self) -> DurableState:
        h = self.hard
        return DurableState(
            view=h.view if h else 0, primary=h.primary if h else None,
            members=h.members if h else (), promised=h.promised if h else 0,
            snapshot_index=self.snapshot_index, snapshot_view=self.snapshot_view,
            log=list(self.log), applied_index=self.applied_index)

    def persist(self, rd: Ready) -> None:
        """One transaction: hard state, snapshot, truncation, appends."""
        if rd.hard_state is not None:
            self.hard = rd.hard_state
        if rd.snapshot is not None:
            self.state = decode_state(rd.snapshot.data)
            assert len(self.state) == rd.snapshot.index
            self.snapshot_index, self.snapshot_view = rd.snapshot.index, rd.snapshot.view
            self.log = []
        if rd.truncate_after is not None:
            keep = rd.truncate_after - self.snapshot_index
            del self.log[max(keep, 0):]
        for e in rd.entries:
            expect = self.snapshot_index + len(self.log) + 1
            assert e.index == expect, (e.index, expect)
            self.log.append(e)

    def compact(self, upto: int) -> None:
        upto = min(upto, self.applied_index)
        if upto <= self.snapshot_index:
            return
        k = upto - self.snapshot_index
        self.snapshot_view = self.log[k - 1].view
        del self.log[:k]
        self.snapshot_index = upto

    def entry_data(self, index: int) -> bytes | None:
        if 1 <= index <= len(self.state):
            return self.state[index - 1]
        k = index - self.snapshot_index - 1
        if 0 <= k < len(self.log):
            return self.log[k].data
        return None


class Node:
    def __init__(self, nid: int) -> None:
        self.id = nid
        self.disk = SimDisk()
        self.replica: Replica | None = None
        self.paused_until = -1
        self.paused_from = -1
        self.inbox: list[tuple[int, object]] = []     # held while paused
        self.was_serving = False
        self.last_commit = 0
        self.phase = 0

    @property
    def up(self) -> bool:
        return self.replica is not None


class Simulation:
    def __init__(self, seed: int, n: int = 3, *, steps: int = 600, partitions: bool = False,
                 failure_ticks: int = 10, retain: int = 40, max_down: int | None = None,
                 heal: bool = True, intensity: float = 1.0, trace: bool = False) -> None:
        self.seed, self.n, self.steps = seed, n, steps
        self.rng = random.Random(seed)
        self.partitions = partitions
        # Partitions longer than the failure timeout let both sides form views (documented
        # split brain): then only per-view uniqueness and convergence after healing hold.
        self.strict = not partitions
        self.failure_ticks = failure_ticks
        self.retain = retain
        self.max_down = n - 1 if max_down is None else max_down
        self.heal = heal
        self.intensity = intensity
        self.trace = trace
        self.cluster = tuple(range(1, n + 1))
        self.nodes = {i: Node(i) for i in self.cluster}
        for nd in self.nodes.values():
            nd.phase = self.rng.randrange(TICK)
        self.now = 0
        self.net: list[tuple[int, int, int, int, bytes]] = []
        self._seq = 0
        self.blocked: dict[tuple[int, int], int] = {}   # link -> blocked until
        self.max_delay = TICK * 3 // 2
        self.p_drop = 0.02
        self.p_dup = 0.01
        self.history: dict[int, bytes] = {}     # index -> data, the one applied history
        self.acked: dict[int, bytes] = {}       # acknowledged writes
        self.pending: dict[tuple[int, int, int], bytes] = {}   # (node, index, view) -> data
        self.write_no = 0
        self.max_commit_view = -1
        self.log_lines: list[str] = []
        self.stats = {"crashes": 0, "restarts": 0, "pauses": 0, "stalls": 0, "writes": 0,
                      "acked": 0, "snapshots": 0, "partitions": 0, "failovers": 0}
        for i in self.cluster:
            self.start(i)

    # ------------------------------------------------------------------ plumbing
    def replay(self) -> str:
        extra = f" --n {self.n}" if self.n != 3 else ""
        extra += " --partitions" if self.partitions else ""
        return f"python -m chatnet.replication.sim --seed {self.seed} --steps {self.steps}{extra}"

    def fail(self, what: str) -> None:
        raise InvariantViolation(f"t={self.now}: {what}\nreplay: {self.replay()}")

    def note(self, s: str) -> None:
        if self.trace:
            print(f"[t={self.now}] {s}")

    def start(self, i: int) -> None:
        nd = self.nodes[i]
        nd.replica = Replica(i, self.cluster, nd.disk.load(), failure_ticks=self.failure_ticks,
                             rng=random.Random(self.rng.getrandbits(64)), max_batch=16,
                             retain_entries=self.retain)
        nd.was_serving = False
        nd.last_commit = nd.replica.commit_index
        nd.paused_until = -1
        nd.inbox = []
        self.process(i)

    def crash(self, i: int) -> None:
        nd = self.nodes[i]
        nd.replica = None
        nd.paused_until = -1
        nd.inbox = []
        nd.was_serving = False
        self.pending = {k: v for k, v in self.pending.items() if k[0] != i}
        self.stats["crashes"] += 1
        self.note(f"crash {i}")

    def send(self, src: int, dst: int, msg: object) -> None:
        if self.rng.random() < self.p_drop:
            return
        if self.blocked.get((src, dst), -1) > self.now:
            return
        payload = encode_message(msg)
        copies = 2 if self.rng.random() < self.p_dup else 1
        for _ in range(copies):
            self._seq += 1
            t = self.now + self.rng.randint(1, self.max_delay)
            heapq.heappush(self.net, (t, self._seq, src, dst, payload))

    def process(self, i: int, crash_at: str | None = None) -> None:
        """The host loop: persist -> send -> apply -> advance, until nothing is ready."""
        nd = self.nodes[i]
        r = nd.replica
        assert r is not None
        while (rd := r.ready()) is not None:
            nd.disk.persist(rd)
            if crash_at == "after_persist":
                self.crash(i)
                return
            for peer, msg in rd.messages:
                self.send(i, peer, msg)
            if crash_at == "after_send":
                self.crash(i)
                return
            if rd.snapshot is not None:
                self.stats["snapshots"] += 1
                self.check_state_prefix(i)
            for e in rd.committed:
                if e.index != nd.disk.applied_index + 1:
                    self.fail(f"node {i} applies {e.index} after {nd.disk.applied_index}")
                nd.disk.state.append(e.data)
                self.on_apply(i, e)
            for peer in rd.snapshot_requests:
                idx = nd.disk.applied_index
                r.send_snapshot(peer, idx, r.entry_view(idx), encode_state(nd.disk.state))
            r.advance(rd)
            c = r.suggested_compaction()
            if c is not None:
                r.compact(c)
                nd.disk.compact(r.snapshot_index)
        self.after_process(i)

    # ------------------------------------------------------------------ checks
    def on_apply(self, i: int, e: Entry) -> None:
        h = self.history.get(e.index)
        if h is None or not self.strict:
            self.history[e.index] = e.data
        elif h != e.data:
            self.fail(f"agreement: node {i} applied {e.data!r} at {e.index}, history has {h!r}")
        key = (i, e.index, e.view)
        d = self.pending.pop(key, None)
        if d is not None and d == e.data:
            self.acked[e.index] = e.data
            self.stats["acked"] += 1
            self.note(f"ack {e.index} {e.data!r} by {i}")
            if not self.strict:
                return
            for nd in self.nodes.values():
                if nd.up and nd.paused_until < 0 and nd.replica.serving \
                        and not self.holds(nd.id, e.index, e.data):
                    self.fail(f"I1: serving primary {nd.id} lacks acked write {e.index}")

    def check_state_prefix(self, i: int) -> None:
        if not self.strict:
            return
        for idx, d in enumerate(self.nodes[i].disk.state, 1):
            h = self.history.get(idx)
            if h is not None and h != d:
                self.fail(f"agreement: snapshot at node {i} has {d!r} at {idx}, history {h!r}")

    def holds(self, i: int, index: int, data: bytes) -> bool:
        nd = self.nodes[i]
        r = nd.replica
        if r is not None:
            e = r.entry(index)
            if e is not None:
                return e.data == data
        return nd.disk.entry_data(index) == data

    def after_process(self, i: int) -> None:
        nd = self.nodes[i]
        r = nd.replica
        if r is None:
            return
        if r.serving:
            if r.role != PRIMARY:
                self.fail(f"I3: node {i} serves in role {r.role}")
            if not nd.was_serving:
                self.note(f"node {i} serves view {r.view} members {r.members}")
                for idx, d in (self.acked.items() if self.strict else ()):
                    if not self.holds(i, idx, d):
                        self.fail(f"I3/I1: node {i} starts serving view {r.view} without "
                                  f"acked write {idx}")
                for other in self.nodes.values():
                    if other.id != i and other.up and other.replica.serving \
                            and other.replica.view == r.view:
                        self.fail(f"I2: nodes {i} and {other.id} both serve view {r.view}")
        nd.was_serving = r.serving
        if r.role == PRIMARY and r.commit_index > nd.last_commit:
            if r.view < self.max_commit_view and self.strict:
                self.fail(f"I2: primary {i} commits in view {r.view} after view "
                          f"{self.max_commit_view} committed")
            self.max_commit_view = max(self.max_commit_view, r.view)
        nd.last_commit = r.commit_index

    # ------------------------------------------------------------------ time
    def deliver_due(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, src, dst, payload = heapq.heappop(self.net)
            nd = self.nodes[dst]
            if not nd.up:
                continue
            msg = decode_message(payload)
            if nd.paused_until > self.now:
                nd.inbox.append((src, msg))
                continue
            nd.replica.step(src, msg)
            self.process(dst)

    def unit(self) -> None:
        """Advance the clock by one time unit."""
        self.now += 1
        for nd in self.nodes.values():
            if nd.up and 0 <= nd.paused_until <= self.now:
                self.resume(nd)
        self.deliver_due()
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for nd in order:
            if nd.up and nd.paused_until < 0 and (self.now + nd.phase) % TICK == 0:
                nd.replica.tick()
                self.process(nd.id)

    def resume(self, nd: Node) -> None:
        gap_ticks = (self.now - nd.paused_from) // TICK
        nd.paused_until = -1
        if gap_ticks >= self.failure_ticks // 2:
            nd.replica.stalled()       # the host noticed its own stall
            self.stats["stalls"] += 1
            self.note(f"node {nd.id} wakes after {gap_ticks} ticks: stalled()")
        self.process(nd.id)
        inbox, nd.inbox = nd.inbox, []
        for src, msg in inbox:
            if nd.up:
                nd.replica.step(src, msg)
                self.process(nd.id)

    # ------------------------------------------------------------------ nemesis
    def nemesis(self) -> None:
        rng = self.rng
        k = self.intensity / TICK
        down = [nd for nd in self.nodes.values() if not nd.up]
        live = [nd for nd in self.nodes.values() if nd.up]
        if rng.random() < 0.012 * k and live and len(down) < self.max_down:
            nd = rng.choice(live)
            if rng.random() < 0.3:
                self.crash_mid_loop(nd.id)
            else:
                self.crash(nd.id)
        elif rng.random() < 0.03 * k and down:
            nd = rng.choice(down)
            self.stats["restarts"] += 1
            self.note(f"restart {nd.id}")
            self.start(nd.id)
        elif rng.random() < 0.006 * k and live:
            nd = rng.choice(live)
            if nd.paused_until < 0:
                ticks = rng.choice([1, 2, 3, self.failure_ticks // 2 - 1, self.failure_ticks,
                                    2 * self.failure_ticks, 3 * self.failure_ticks])
                nd.paused_from = self.now
                nd.paused_until = self.now + ticks * TICK + rng.randrange(TICK)
                self.stats["pauses"] += 1
                self.note(f"pause {nd.id} for ~{ticks} ticks")
        elif rng.random() < 0.004 * k:
            a, b = rng.sample(self.cluster, 2) if self.n > 1 else (1, 1)
            if a != b:
                if self.partitions:
                    length = rng.randint(1, 4 * self.failure_ticks) * TICK
                else:
                    length = rng.randint(1, self.failure_ticks // 3) * TICK
                self.blocked[(a, b)] = self.now + length
                if rng.random() < 0.7:
                    self.blocked[(b, a)] = self.now + length
                self.stats["partitions"] += 1
                self.note(f"cut {a}<->{b} for {length // TICK} ticks")
        if rng.random() < 0.25 * k * TICK / 2:
            self.client_write()

    def crash_mid_loop(self, i: int) -> None:
        """Crash a host in the middle of its loop: after a write was persisted but before
        the messages of that Ready left, or before the entries were applied."""
        nd = self.nodes[i]
        r = nd.replica
        if r.serving and self.rng.random() < 0.7:
            self.client_write(i)
        self.process(i, crash_at=self.rng.choice(["after_persist", "after_send"]))
        if nd.up:
            self.crash(i)

    def client_write(self, target: int | None = None, k: int | None = None) -> None:
        cands = [nd for nd in self.nodes.values()
                 if nd.up and nd.paused_until < 0 and nd.replica.serving
                 and (target is None or nd.id == target)]
        if not cands:
            return
        nd = self.rng.choice(cands)
        for _ in range(self.rng.randint(1, 4) if k is None else k):
            self.write_no += 1
            data = b"w%d" % self.write_no
            idx = nd.replica.propose(data)
            if idx is not None:
                self.pending[(nd.id, idx, nd.replica.view)] = data
                self.stats["writes"] += 1
        if target is None:
            self.process(nd.id)

    # ------------------------------------------------------------------ scripted control
    # (for transcript-style scenario tests: no nemesis, the test decides every fault)
    def run_ticks(self, k: int) -> None:
        for _ in range(k * TICK):
            self.unit()

    def serving(self) -> list[int]:
        return [nd.id for nd in self.nodes.values()
                if nd.up and nd.paused_until < 0 and nd.replica.serving]

    def wait_serving(self, max_ticks: int = 100, exclude: tuple[int, ...] = ()) -> int | None:
        """Run until some replica (not in ``exclude``) serves; its id, or None."""
        for _ in range(max_ticks * TICK):
            s = [i for i in self.serving() if i not in exclude]
            if s:
                return s[0]
            self.unit()
        return None

    def write(self, count: int = 1, ticks: int = 5) -> int:
        """Propose ``count`` writes at the serving primary, run ``ticks``; acks gained."""
        before = len(self.acked)
        self.client_write(k=count)
        self.run_ticks(ticks)
        return len(self.acked) - before

    def pause(self, i: int, ticks: int) -> None:
        nd = self.nodes[i]
        nd.paused_from = self.now
        nd.paused_until = self.now + ticks * TICK

    def restart(self, i: int) -> None:
        self.stats["restarts"] += 1
        self.start(i)

    def role(self, i: int) -> str | None:
        nd = self.nodes[i]
        return nd.replica.role if nd.up else None

    # ------------------------------------------------------------------ runs
    def run(self) -> "Simulation":
        for _ in range(self.steps * TICK):
            self.unit()
            self.nemesis()
        if self.heal:
            self.heal_and_check()
        return self

    def heal_and_check(self, max_ticks: int = 400) -> None:
        self.blocked.clear()
        self.p_drop = 0.0
        self.p_dup = 0.0
        for nd in self.nodes.values():
            if nd.up and nd.paused_until >= 0:
                nd.paused_until = self.now
        for nd in self.nodes.values():
            if not nd.up:
                self.start(nd.id)
        self.pending.clear()
        acked_before = len(self.acked)
        for t in range(max_ticks * TICK):
            self.unit()
            if t % TICK:
                continue
            if len(self.acked) == acked_before:
                self.client_write()    # a write after healing must be acknowledged too
            elif self.converged():
                return
        states = {i: (nd.replica.status()) for i, nd in self.nodes.items()}
        self.fail(f"liveness: no convergence {max_ticks} ticks after healing: {states}")

    def converged(self) -> bool:
        prim = [nd for nd in self.nodes.values() if nd.replica.serving]
        if len(prim) != 1:
            return False
        p = prim[0].replica
        if set(p.members) != set(self.cluster):
            return False
        top = p.commit_index
        for nd in self.nodes.values():
            r = nd.replica
            if r.commit_index != top or nd.disk.applied_index != top or r.last_index != p.last_index:
                return False
        if not self.strict:
            states = {tuple(nd.disk.state) for nd in self.nodes.values()}
            if len(states) != 1:
                self.fail("convergence: applied states differ after healing")
            return True
        for idx, d in self.acked.items():
            for nd in self.nodes.values():
                if nd.disk.entry_data(idx) != d:
                    self.fail(f"I1: after healing node {nd.id} lacks acked write {idx}")
        return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600, help="simulated ticks of faults")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--partitions", action="store_true",
                    help="allow partitions longer than the failure timeout (split brain)")
    ap.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed")
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args(argv)
    bad = 0
    for s in range(a.seed, a.seed + a.seeds):
        sim = Simulation(s, a.n, steps=a.steps, partitions=a.partitions, trace=a.trace)
        try:
            sim.run()
            print(f"seed {s}: ok {sim.stats} final commit "
                  f"{max(nd.replica.commit_index for nd in sim.nodes.values())}")
        except InvariantViolation as exc:
            bad += 1
            print(f"seed {s}: FAILED {exc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
