#!/usr/bin/env python3
"""Chaos runner and history checker for chatnet (Jepsen-style; see docs/chaos.md).

    python3 bench/chaos.py --seed 7 --duration 60 --replicas 3 --clients 8 [--netns] [--history out.jsonl]
    python3 bench/chaos.py --seed 41 --duration 60 --netns --partitions [--quorum majority]
    python3 bench/chaos.py --seed 61 --duration 60 --tls [--netns]
    python3 bench/chaos.py --check out.jsonl

A run starts N replicas as processes (with ``--netns``, each in a network namespace of its own,
joined by veth pairs to a bridge that the runner creates and always removes; on loopback
addresses 127.0.0.x otherwise, or when namespaces cannot be made), runs a bounded workload of K
clients — our client library (extension 1) and seed-style raw-socket clients mixed: creates,
logins, logouts, sends and lists — while a nemesis driven by one ``random.Random(seed)``
kills -9, restarts, SIGSTOPs and SIGCONTs replicas at random moments, never more than N−1
down at once and each for a bounded time — with ``--partitions`` it also cuts the network
between the replicas' namespaces, one way or both, one partition at a time, each for a bounded
time.  With ``--tls`` the replicas serve TLS with a throwaway CA and refuse plaintext clients,
and every client and status query speaks TLS.  Then it heals everything, waits for a primary and
for every replica to be in its view, lets every account log in once more to drain its mailbox,
waits until all replicas have applied the same log index, and records their state digests.

Every request (``invoke``), its outcome (``ok`` / ``fail`` / ``unknown``) and every chat
delivery is recorded, time-stamped, in a JSON-lines history.  The checker reads it and reports
acknowledged-but-lost sends, duplicated deliveries for our client, delivered-but-never-sent
chats, per sender→recipient reorders, lost accounts, whether the healed replicas hold
identical state, and in majority mode whether two replicas acknowledged in overlapping time.  The last line is a one-line summary; the exit status is 1 on any violation
(the replay command is printed), 2 when the run could not be made at all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.workload import ExtWorker, History, Registry, SeedWorker, wait_for  # noqa: E402
from chatnet.testing import Cluster  # noqa: E402
from chatnet.testing.certs import make_cluster_certs, openssl_missing, san_entries, tls_server_flags  # noqa: E402
from chatnet.testing.netns import Netns, NetnsError  # noqa: E402,F401 - NetnsError: bench/netns_cluster.py

NO_RECIPIENT = "Recipient username cannot be found."
FAILURE_TIMEOUT = 1.0      # the replicas' default --failure-timeout-ms, in seconds
LOGIN_UNKNOWN_PREFIX = "Unable to login: This username does not exist."
DIGEST_REFRESH = 1.3       # more than the replicas' DIGEST_MAX_AGE (1 s): a quiet replica's digest is fresh after it

def log(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- cluster


def make_cluster(workdir: str, hosts: list[str], netns: Netns | None, args, certs: dict | None = None) -> Cluster:
    """The harness's cluster on ``hosts``: in namespaces every replica listens on 1538 of its
    own address (which the runner's namespace cannot bind to probe), with ``ip netns exec``
    before its command; the secret file is the harness's (0600 from the start).  With
    ``certs`` (``--tls``) the replicas serve TLS on the client port and peer links and refuse
    plaintext clients (``--require-tls``), and the runner's status queries go over TLS too."""
    extra = [] if args.log_retain is None else ["--log-retain", str(args.log_retain)]
    if args.quorum:
        extra += ["--quorum", args.quorum]
    if certs:
        extra += tls_server_flags(certs, require=True)
    return Cluster(workdir, hosts=hosts, extra_args=extra, log_level="INFO",
                   ports=[1538] * len(hosts) if netns else None,
                   prefixes=[netns.prefix(i) for i in range(len(hosts))] if netns else None,
                   tls_ca=certs["ca"] if certs else None)


def make_certs(workdir: str, hosts: list[str]) -> dict:
    """``--tls``: a throwaway CA and one server certificate naming every replica's address
    (loopback or namespace), in the run's directory, so it goes away with the run."""
    certs = make_cluster_certs(os.path.join(workdir, "tls"), hosts)
    log(f"TLS: CA and server certificate for {san_entries(hosts)} in {os.path.dirname(certs['ca'])}")
    return certs


# ---------------------------------------------------------------------------------- nemesis


class Nemesis:
    """Faults at random moments, all decided by one ``random.Random``: every injection draws
    the same four numbers (kind, target, duration, prefer-the-primary) whatever happens — five
    with ``partitions`` (the fifth picks the partition's shape) — so a seed gives the same
    schedule of decisions (the cluster's timing still varies a little).

    With ``partitions`` (and ``netns``, the namespaces the replicas run in) a share of the
    faults are network partitions between replicas (see :meth:`partition`): one at a time,
    each undone after a bounded time, so every one heals within the run."""

    def __init__(self, cluster: Cluster, rng: random.Random, history: History, *,
                 mean_gap: float = 1.5, max_down: int | None = None, max_kill: float = 6.0,
                 max_stop: float = 5.0, netns: Netns | None = None, partitions: bool = False,
                 max_partition: float = 6.0) -> None:
        self.cluster = cluster
        self.rng = rng
        self.history = history
        self.mean_gap = mean_gap
        n = len(cluster.replicas)
        self.max_down = n - 1 if max_down is None else min(max_down, n - 1)
        self.max_kill = max_kill
        self.max_stop = max_stop
        self.recover_at: dict[int, float] = {}
        self.faults = 0
        self.max_seen_down = 0
        self.netns = netns
        self.partitions = partitions and netns is not None
        self.max_partition = max_partition
        self.partition_until: float | None = None    # when the current partition heals

    def run(self, until: float) -> None:
        next_fault = time.monotonic() + self.rng.expovariate(1 / self.mean_gap)
        while True:
            self.check_alive()
            now = time.monotonic()
            for i, when in sorted(self.recover_at.items(), key=lambda kv: kv[1]):
                if when <= now:
                    self.recover(i)
            if self.partition_until is not None and self.partition_until <= now:
                self.heal_partition()
            if now >= until:
                return
            if now >= next_fault:
                self.inject()
                next_fault = time.monotonic() + self.rng.expovariate(1 / self.mean_gap)
            pending = [] if self.partition_until is None else [self.partition_until]
            wake = min([next_fault, until, *self.recover_at.values(), *pending])
            time.sleep(max(0.0, min(wake - time.monotonic(), 0.25)))

    def check_alive(self) -> None:
        """A replica that exited without being killed is a crash bug: record it (an error for
        the checker) and count it as killed (reaped), so it is restarted like one."""
        for i, r in enumerate(self.cluster.replicas):
            code = r.exited()
            if code is not None:
                self.history.write("error", message=f"replica {i} (pid {r.pid}) exited by itself with "
                                                    f"status {code}; log tail: {r.log_tail(15)!r}")
                r.kill()
                self.recover_at.setdefault(i, time.monotonic() + 1.0)

    def down(self) -> list[int]:
        """The replicas killed or paused (each counts against the N-1 limit)."""
        return [i for i, r in enumerate(self.cluster.replicas) if r.state != "up"]

    def inject(self) -> None:
        """One fault, if fewer than N-1 replicas are down.  The four draws happen whatever is
        decided, so the schedule of decisions depends on the seed only.  Another kind of fault
        (a partition, say) is one more branch here, with its undo in :meth:`recover`."""
        r_kind, r_target, r_duration, r_primary = (self.rng.random() for _ in range(4))
        r_shape = self.rng.random() if self.partitions else 0.0
        up = [i for i, r in enumerate(self.cluster.replicas) if r.state == "up"]
        if self.partitions and r_kind >= 0.6:
            if self.partition_until is None and up:
                target, role = self.choose_target(up, r_target, r_primary)
                self.partition(target, role, r_shape, r_duration)
            return
        if self.partitions:
            r_kind /= 0.6           # kills and stops keep their shares among themselves
        if len(self.down()) >= self.max_down or not up:
            return
        target, role = self.choose_target(up, r_target, r_primary)
        replica = self.cluster.replicas[target]
        pid = replica.pid
        if r_kind < 0.55:
            duration = 0.3 + r_duration * (self.max_kill - 0.3)
            replica.kill()
            action = "kill"
        else:
            duration = self.pause_duration(r_duration)
            replica.pause()
            action = "stop"
        self.faults += 1
        self.recover_at[target] = time.monotonic() + duration
        self.max_seen_down = max(self.max_seen_down, len(self.down()))
        self.history.write("nemesis", action=action, replica=target, pid=pid, role=role,
                           duration=round(duration, 3), down=self.down())

    def choose_target(self, up: list[int], r_target: float, r_primary: float) -> tuple[int, str]:
        """The serving primary half of the time (when it is up), else a random replica that is up."""
        if r_primary < 0.5:
            primary = self.cluster.primary(timeout=0.5)
            if primary in up:
                return primary, "primary"
        return up[min(int(r_target * len(up)), len(up) - 1)], "any"

    def pause_duration(self, r: float) -> float:
        """Short pauses (below half the failure timeout: they must go unnoticed) and long ones
        (past it: the others replace the replica, which must step down when it wakes)."""
        if r < 0.35:
            return 0.1 + r / 0.35 * 0.4
        return 1.2 + (r - 0.35) / 0.65 * (self.max_stop - 1.2)

    def recover(self, i: int) -> None:
        self.recover_at.pop(i, None)
        replica = self.cluster.replicas[i]
        if replica.state == "paused":
            replica.resume()
            self.history.write("nemesis", action="cont", replica=i, pid=replica.pid, down=self.down())
        elif replica.state == "killed":
            self.cluster.restart(i, wait=False)
            self.history.write("nemesis", action="restart", replica=i, pid=replica.pid, down=self.down())

    # Partition shapes around a target replica T (the others: O), by the fifth draw.
    SHAPES = ((0.35, "isolate"),   # T <-/-> O: T cut off both ways
              (0.55, "out"),       # T --/-> O: what T sends is dropped, it still hears O
              (0.75, "in"),        # O --/-> T: T hears nobody, O still hears T
              (1.01, "pair"))      # T <-/-> one other; the third still reaches both (a bridge)

    def partition(self, target: int, role: str, r_shape: float, r_duration: float) -> None:
        """Cut the network around ``target`` (a shape of :attr:`SHAPES`) for a bounded time:
        30 % of them shorter than the failure timeout (they must go unnoticed), the rest
        1.2 s up to ``max_partition``."""
        shape = next(name for bound, name in self.SHAPES if r_shape < bound)
        others = [j for j in range(len(self.cluster.replicas)) if j != target]
        if shape == "isolate":
            pairs = [(target, j) for j in others] + [(j, target) for j in others]
        elif shape == "out":
            pairs = [(target, j) for j in others]
        elif shape == "in":
            pairs = [(j, target) for j in others]
        else:
            j = others[min(int((r_shape - 0.75) / 0.26 * len(others)), len(others) - 1)]
            pairs = [(target, j), (j, target)]
        for src, dst in pairs:
            self.netns.cut(src, dst)
        duration = (0.2 + r_duration / 0.3 * 0.6 if r_duration < 0.3
                    else 1.2 + (r_duration - 0.3) / 0.7 * (self.max_partition - 1.2))
        self.partition_until = time.monotonic() + duration
        self.faults += 1
        self.history.write("nemesis", action="partition", shape=shape, replica=target, role=role,
                           cuts=sorted(pairs), duration=round(duration, 3), down=self.down())

    def heal_partition(self) -> None:
        """Undo the current partition (every cut)."""
        self.partition_until = None
        if self.netns is not None and self.netns.cuts:
            self.netns.heal()
            self.history.write("nemesis", action="heal", down=self.down())

    def heal(self) -> None:
        self.check_alive()
        for i in self.down():
            self.recover(i)
        self.recover_at.clear()
        self.heal_partition()


# ---------------------------------------------------------------------------------- checker
#
# The checker reads only the history, so it can be run again on a saved file (``--check``).
# ``Facts.of`` indexes the records once; each ``check_*`` function then verifies one property
# and returns its violations; ``check`` runs them all (``PROPERTIES``) and adds the counts of
# the summary line.  A new property (say, for a partition nemesis) is one more function and
# one more line in ``PROPERTIES``.


@dataclass(frozen=True)
class Violation:
    """One broken property, with what it takes to debug it: what it concerns (a chat's text
    or an account), why it is a violation, and the history records that show it."""

    prop: str
    subject: str
    why: str
    records: tuple = ()


@dataclass
class Facts:
    """A history indexed once, for every property: requests by op, outcomes by op, sends by
    their unique text, deliveries, and the runner's records.  Positions (the index in the
    history, which is written in the order things happened) order events across threads."""

    meta: dict = field(default_factory=dict)
    invokes: dict = field(default_factory=dict)       # op -> (position, invoke record)
    results: dict = field(default_factory=dict)       # op -> (position, ok/fail/unknown record)
    sends: dict = field(default_factory=dict)         # msg -> (position, first invoke record)
    resent: list = field(default_factory=list)        # (earlier, later) invokes of one message id
    deliveries: list = field(default_factory=list)    # (position, deliver record)
    by_msg: dict = field(default_factory=lambda: defaultdict(list))   # msg -> [(position, record)]
    final: dict | None = None
    faults: int = 0
    partitions: int = 0                               # of the faults, partitions
    drains_failed: list = field(default_factory=list)
    errors: list = field(default_factory=list)        # (message, record)

    @classmethod
    def of(cls, records: list[dict]) -> Facts:
        facts = cls()
        for pos, r in enumerate(records):
            facts._add(pos, r)
        return facts

    def _add(self, pos: int, r: dict) -> None:
        kind = r.get("type")
        if kind == "meta":
            self.meta = r
        elif kind == "invoke":
            self.invokes[r["op"]] = (pos, r)
            if r.get("f") == "send":
                if r["msg"] in self.sends:      # a workload bug; the first send is the one checked
                    self.resent.append((self.sends[r["msg"]][1], r))
                else:
                    self.sends[r["msg"]] = (pos, r)
                self.by_msg[r["msg"]].append((pos, r))
        elif kind in ("ok", "fail", "unknown"):
            self.results[r["op"]] = (pos, r)
            invoked = self.invokes.get(r["op"], (0, {}))[1]
            if invoked.get("f") == "send":
                self.by_msg[invoked["msg"]].append((pos, r))
        elif kind == "deliver":
            self.deliveries.append((pos, r))
            self.by_msg[r["msg"]].append((pos, r))
        elif kind == "nemesis" and r.get("action") in ("kill", "stop", "partition"):
            self.faults += 1
            self.partitions += r["action"] == "partition"
        elif kind == "final":
            self.final = r
        elif kind == "drain" and not r.get("ok"):
            self.drains_failed.append(r)
        elif kind == "client" and r.get("event") == "worker-crashed":
            self.errors.append((f"client {r.get('client')} crashed: {r.get('error')}", r))
        elif kind == "error":
            self.errors.append((r.get("message", "error"), r))

    def outcome(self, op: int) -> str:
        """``ok``, ``fail`` or ``unknown`` (no answer recorded counts as unknown)."""
        return self.results[op][1]["type"] if op in self.results else "unknown"

    def acked_sends(self) -> list[dict]:
        """Sends answered ``Message sent``, in the order they were invoked."""
        return [r for _, r in sorted(self.sends.values(), key=lambda pr: pr[0]) if self.outcome(r["op"]) == "ok"]

    def trail(self, *msgs: str, limit: int = 12) -> tuple:
        """Every record about these chats (send, outcome, deliveries), in history order."""
        found = sorted((pr for m in msgs for pr in self.by_msg.get(m, ())), key=lambda pr: pr[0])
        return tuple(r for _, r in found[:limit])


def check_lost(facts: Facts) -> list[Violation]:
    """An acknowledged send must reach its recipient (in any session, the drain included)."""
    delivered = {(d["user"], d["msg"]) for _, d in facts.deliveries}
    return [Violation("lost", s["msg"], f"{s['user']} -> {s['to']} acknowledged (op {s['op']}), never delivered",
                      facts.trail(s["msg"]))
            for s in facts.acked_sends() if (s["to"], s["msg"]) not in delivered]


@dataclass(frozen=True)
class Repeat:
    """A chat shown more than once to its recipient, classified.  Only ``dup`` is a violation;
    the other classes are what the clients' semantics allow, and are counted:
    ``seed_redelivery`` (a seed-style recipient: at-least-once), ``seed_retry`` (a seed-style
    sender's retry queued the chat twice) and ``reshown`` (a new run of our client showed a
    chat again whose ack never took effect; see docs/chaos.md)."""

    cls: str
    user: str
    msg: str
    extra: int                 # copies beyond the first
    why: str = ""
    records: tuple = ()


def classify_repeats(facts: Facts) -> list[Repeat]:
    """Every (recipient, chat) delivered more than once, with the class of each repeat."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for _, d in facts.deliveries:
        by_key[(d["user"], d["msg"])].append(d)
    repeats = []
    for (user, msg), ds in by_key.items():
        if len(ds) < 2:
            continue
        ext = [d for d in ds if d.get("kind") == "ext"]
        if not ext:
            repeats.append(Repeat("seed_redelivery", user, msg, len(ds) - 1))
            continue
        sent = facts.sends.get(msg)
        seqs = {d.get("seq") for d in ext}
        shown: dict[tuple, int] = defaultdict(int)
        for d in ext:
            shown[(d["run"], d.get("seq"))] += 1
        twice_in_run = [key for key, n in shown.items() if n > 1]
        if twice_in_run:
            repeats.append(Repeat("dup", user, msg, len(ext) - 1, f"shown twice by one client run {twice_in_run}"))
        elif len(seqs) > 1 and sent and sent[1].get("kind") == "ext":
            repeats.append(Repeat("dup", user, msg, len(seqs) - 1, f"queued {len(seqs)} times (seqs {sorted(seqs)}) "
                                                                   "although our client sent it with a request id"))
        else:
            if len(seqs) > 1:
                repeats.append(Repeat("seed_retry", user, msg, len(seqs) - 1))
            if len(ext) > len(seqs):
                repeats.append(Repeat("reshown", user, msg, len(ext) - len(seqs)))
    return repeats


def check_duplicated(facts: Facts) -> list[Violation]:
    """Our client shows each chat once per client run, and a chat it sent (with a request id)
    is queued once.  Seed-style repeats are allowed (see :func:`classify_repeats`)."""
    return [Violation("dup", r.msg, f"to {r.user}: {r.why}", facts.trail(r.msg))
            for r in classify_repeats(facts) if r.cls == "dup"]


def check_phantom(facts: Facts) -> list[Violation]:
    """Every delivered chat was sent, by that sender to that recipient, before it was
    delivered, and not refused.  A send with an unknown outcome may be delivered or not; a
    refusal after a retry does not count (the first attempt may have taken effect)."""
    found = []
    for pos, d in facts.deliveries:
        sent = facts.sends.get(d["msg"])
        why = None
        if sent is None:
            why = "never sent"
        elif sent[1]["user"] != d["from"] or sent[1]["to"] != d["user"]:
            why = f"sent by {sent[1]['user']} to {sent[1]['to']}, delivered to {d['user']} from {d['from']}"
        elif pos < sent[0]:
            why = "delivered before it was sent"
        elif facts.outcome(sent[1]["op"]) == "fail" and facts.results[sent[1]["op"]][1].get("attempts", 1) <= 1:
            why = f"refused: {facts.results[sent[1]['op']][1].get('answer')}"
        if why:
            found.append(Violation("phantom", d["msg"], why, facts.trail(d["msg"])))
    return found


def check_reordered(facts: Facts) -> list[Violation]:
    """For each sender -> recipient pair, the first deliveries of acknowledged sends come in
    send order (a later repeat of an earlier chat is not a reorder)."""
    first: dict[tuple, int] = {}
    for pos, d in facts.deliveries:
        first.setdefault((d["user"], d["msg"]), pos)
    pairs: dict[tuple, list[dict]] = defaultdict(list)
    for s in facts.acked_sends():
        pairs[(s["user"], s["to"])].append(s)
    found = []
    for (sender, to), sends in pairs.items():
        latest, latest_msg = -1, None
        for s in sends:
            p = first.get((to, s["msg"]))
            if p is None:
                continue
            if p < latest:
                found.append(Violation("reorder", s["msg"], f"{sender} -> {to}: first delivered before "
                                       f"{latest_msg!r}, which was sent before it", facts.trail(s["msg"], latest_msg)))
            else:
                latest, latest_msg = p, s["msg"]
    return found


def check_lost_accounts(facts: Facts) -> list[Violation]:
    """An account whose create or login was acknowledged is never refused as unknown later:
    neither as a send's recipient nor at login.  No account is ever deleted by the workload."""
    known_at: dict[str, int] = {}
    for op, (pos, r) in sorted(facts.results.items(), key=lambda kv: kv[1][0]):
        inv = facts.invokes.get(op, (0, {}))[1]
        if r["type"] == "ok" and inv.get("f") in ("create", "login"):
            known_at.setdefault(inv["user"], pos)
    found = []
    for op, (_, r) in facts.results.items():
        inv_pos, inv = facts.invokes.get(op, (0, {}))
        answer = r.get("answer") or ""
        if r["type"] != "fail":
            continue
        if inv.get("f") == "send" and answer == NO_RECIPIENT:
            name = inv["to"]
        elif inv.get("f") == "login" and answer.startswith(LOGIN_UNKNOWN_PREFIX):
            name = inv["user"]
        else:
            continue
        if known_at.get(name, 1 << 62) < inv_pos:
            found.append(Violation("lostacct", name, f"{inv['f']} (op {op}) refused: {answer!r}", (inv, r)))
    return found


@dataclass(frozen=True)
class FinalState:
    """The replicas' state after healing: ``status`` is ``equal``, ``unequal`` (digests differ
    at equal applied), ``unequal-applied``, ``unavailable`` (a replica did not answer) or
    ``unchecked`` (the run never got that far: no ``final`` record)."""

    status: str = "unchecked"
    detail: str = ""
    divergences: int = 0


def final_state(facts: Facts) -> FinalState:
    final = facts.final
    if final is None:
        return FinalState()
    statuses = final.get("statuses") or []
    divergences = sum((s or {}).get("divergences") or 0 for s in statuses)
    if not final.get("ok", True) or not statuses or any(s is None for s in statuses):
        return FinalState("unavailable", final.get("why", "") or "a replica did not answer", divergences)
    if len({s.get("applied") for s in statuses}) != 1:
        status = "unequal-applied"
    elif len({s.get("digest") for s in statuses}) != 1:
        status = "unequal"
    else:
        status = "equal"
    detail = ", ".join(f"r{i}: applied={s.get('applied')} digest={s.get('digest')}"
                       + (f" divergences={s['divergences']}" if s.get("divergences") else "")
                       for i, s in enumerate(statuses))
    return FinalState(status, detail, divergences)


def check_digests(facts: Facts) -> list[Violation]:
    """After healing, every replica holds the same state: the same digest at one applied index."""
    state = final_state(facts)
    if state.status in ("equal", "unchecked"):
        return []
    return [Violation("digests", state.status, f"replicas do not hold identical state after healing: {state.detail}",
                      (facts.final,))]


def check_divergences(facts: Facts) -> list[Violation]:
    """No replica replaced applied state by a forced snapshot.  Only a split brain may cause
    that, so it is allowed (and counted in the summary) when partitions were injected in the
    default mode, whose documented trade-off a split brain is; never in majority mode."""
    if facts.meta.get("partitions") and facts.meta.get("quorum", "all") != "majority":
        return []
    statuses = (facts.final or {}).get("statuses") or []
    return [Violation("divergences", f"r{i}", f"{s['divergences']} forced snapshot(s) over applied state",
                      (facts.final,))
            for i, s in enumerate(statuses) if s and s.get("divergences")]


# Writes whose acknowledgement means a primary committed them (reads are not counted).
ACKED_WRITES = ("send", "create", "login")


def ack_periods(facts: Facts) -> dict[str, list[tuple[float, float, list]]]:
    """Per replica (the ``server`` of its ``ok`` answers), its periods of acknowledging
    writes: runs of acks with no gap of a failure timeout or more between one answer and the
    next request (a new primary is only elected after such a silence of the old one).  Each
    period is (start, end, acks) where [start, end] is the part of it that is certain: the
    first ack answered by ``start`` and the last requested at ``end`` or later.  An op answered
    after more than one attempt is left out: its invocation is not when the answering replica
    got it (a login invoked just before its replica was killed, answered by it 7 s later after
    its restart, joined two periods across the time it was down: a false split)."""
    gap = float(facts.meta.get("failure_timeout") or FAILURE_TIMEOUT)
    acks: dict[str, list[tuple[float, float, dict]]] = defaultdict(list)
    for op, (_, r) in facts.results.items():
        inv = facts.invokes.get(op, (0, {}))[1]
        if r["type"] == "ok" and r.get("server") and inv.get("f") in ACKED_WRITES \
                and r.get("attempts", 1) <= 1:
            acks[r["server"]].append((inv["t"], r["t"], inv))
    periods: dict[str, list] = {}
    for server, items in acks.items():
        items.sort(key=lambda a: a[1])
        runs: list[list] = [[items[0]]]
        for a in items[1:]:
            if a[0] - runs[-1][-1][1] < gap:
                runs[-1].append(a)
            else:
                runs.append([a])
        periods[server] = [(run[0][1], max(a[0] for a in run), run) for run in runs]
    return periods


def check_split_brain(facts: Facts) -> list[Violation]:
    """Majority mode: no two replicas acknowledge writes in overlapping time — the certain
    parts of two replicas' acknowledging periods (see :func:`ack_periods`) never intersect.
    In the default mode a partition may give two acknowledging sides (the mode's documented
    trade-off), so this is checked only when the history's meta says ``quorum=majority``."""
    if facts.meta.get("quorum") != "majority":
        return []
    spans = [(start, end, server, run) for server, ps in ack_periods(facts).items()
             for start, end, run in ps if end > start]
    spans.sort(key=lambda x: x[0])
    found = []
    for k, (start, end, server, run) in enumerate(spans):
        for start2, end2, server2, run2 in spans[k + 1:]:
            if start2 >= end:
                break
            if server2 != server:
                found.append(Violation("split", f"{server} & {server2}",
                                       f"both acknowledged writes between t={start2:.3f} and "
                                       f"t={min(end, end2):.3f}", (run[-1][2], run2[0][2])))
    return found


def check_drained(facts: Facts) -> list[Violation]:
    """Every account that was ever created could log in for the final drain."""
    return [Violation("undrained", r.get("user", "?"), f"{r.get('kind', '?')} drain login failed"
                      + (f" ({r['note']})" if r.get("note") else ""), (r,))
            for r in facts.drains_failed]


def check_errors(facts: Facts) -> list[Violation]:
    """Nothing went wrong around the workload: no client crashed, no replica exited by itself
    or logged an error, the cluster healed, the runner did not fail, and the workload never
    reused a chat's unique text (which would make every other check unreliable)."""
    found = [Violation("errors", "runner", message, (r,)) for message, r in facts.errors]
    found += [Violation("errors", "workload", f"workload bug: message id {later['msg']!r} sent twice "
                        f"(ops {earlier['op']} and {later['op']})", (earlier, later))
              for earlier, later in facts.resent]
    return found


# Every property, in report order: (name in the report, check, heading for its violations).
PROPERTIES = (
    ("lost", check_lost, "LOST: {n} acknowledged send(s) never delivered"),
    ("dup", check_duplicated, "DUPLICATED (our client): {n}"),
    ("phantom", check_phantom, "PHANTOM (delivered but never sent as such): {n}"),
    ("reorder", check_reordered, "REORDERED: {n} acknowledged send(s) first delivered before an earlier one"),
    ("lostacct", check_lost_accounts, "LOST ACCOUNTS: {n} refusal(s) of an account known to exist"),
    ("undrained", check_drained, "UNDRAINED: {n} account(s) could not log in for the final drain"),
    ("errors", check_errors, "ERRORS: {n}"),
    ("divergences", check_divergences, "DIVERGENCES: {n} replica(s) had to replace applied state by a forced "
                                       "snapshot, which only a partition (not injected) may cause"),
    ("digests", check_digests, "STATE: replicas do not hold identical state after healing"),
    ("split", check_split_brain, "SPLIT BRAIN: {n} time(s) two replicas acknowledged writes in overlapping "
                                 "time (majority mode)"),
)


# In the default mode with partitions a split brain is the documented trade-off (docs/replication.md
# section 10): a side refuses an account created on the other (lostacct), and at heal chat shown
# on the losing side is re-applied on the winner under a new sequence number and shown again
# (dup), after chat sent later (reorder); a client whose numbers were the other side's starts
# again from 0 (dup).  Counted in the summary, not failures; loss, phantoms and state still are.
MERGE_ALLOWED = ("dup", "reorder", "lostacct")


def merge_allowed(meta: dict) -> bool:
    return bool(meta.get("partitions")) and meta.get("quorum") != "majority"


@dataclass
class Report:
    """Counts for the summary line, the allowed repeats, and every property's violations."""

    meta: dict = field(default_factory=dict)
    ops: int = 0
    auto: int = 0
    acked: int = 0
    unknown: int = 0
    failed: int = 0
    sends: int = 0
    acked_sends: int = 0
    delivered: int = 0
    faults: int = 0
    partitions: int = 0
    violations: dict = field(default_factory=dict)     # property -> [Violation]
    repeats: dict = field(default_factory=dict)        # allowed repeat class -> extra copies
    state: FinalState = field(default_factory=FinalState)

    def of(self, prop: str) -> list[Violation]:
        return self.violations.get(prop, [])

    @property
    def ok(self) -> bool:
        return not any(found for prop, found in self.violations.items() if not self.allowed(prop))

    def allowed(self, prop: str) -> bool:
        """Whether ``prop``'s reports are counted but allowed (see MERGE_ALLOWED)."""
        return prop in MERGE_ALLOWED and merge_allowed(self.meta)

    @property
    def seed_dup(self) -> int:
        """Extra copies seed-style semantics allow: redeliveries to a seed-style recipient and
        a seed-style sender's retries queued twice."""
        return self.repeats.get("seed_redelivery", 0) + self.repeats.get("seed_retry", 0)

    @property
    def reshown(self) -> int:
        return self.repeats.get("reshown", 0)

    def summary(self) -> str:
        m, n = self.meta, (lambda prop: len(self.of(prop)))
        divergences = f" divergences={self.state.divergences}" if self.state.divergences else ""
        if m.get("partitions"):
            divergences += f" quorum={m.get('quorum', 'all')} partitions={self.partitions} split={n('split')}"
        return (f"chaos: seed={m.get('seed', '?')} replicas={m.get('replicas', '?')} clients={m.get('clients', '?')} "
                f"ops={self.ops} acked={self.acked} unknown={self.unknown} sends={self.sends} "
                f"delivered={self.delivered} lost={n('lost')} dup={n('dup')} phantom={n('phantom')} "
                f"reorder={n('reorder')} lostacct={n('lostacct')} seed_dup={self.seed_dup} "
                f"reshown={self.reshown} digests={self.state.status}{divergences} faults={self.faults} "
                f"{'OK' if self.ok else 'FAIL'}")


def check(records: list[dict]) -> Report:
    """Read a history (see :class:`bench.workload.History`), run every property of
    ``PROPERTIES`` on it and count what the summary line shows."""
    facts = Facts.of(records)
    report = Report(meta=facts.meta, faults=facts.faults, partitions=facts.partitions, state=final_state(facts))
    # A seed-style client's automatic re-login on each new connection is part of finding the
    # primary (many of them meet a backup's note): not counted as an operation of its own.
    user_ops = [op for op, (_, r) in facts.invokes.items() if not r.get("auto")]
    outcomes = [facts.outcome(op) for op in user_ops]
    report.auto = len(facts.invokes) - len(user_ops)
    report.ops = len(user_ops)
    report.acked, report.failed, report.unknown = (outcomes.count(o) for o in ("ok", "fail", "unknown"))
    report.sends = sum(1 for _, r in facts.invokes.values() if r.get("f") == "send")
    report.acked_sends = len(facts.acked_sends())
    report.delivered = len(facts.deliveries)
    for prop, fn, _ in PROPERTIES:
        report.violations[prop] = fn(facts)
    for r in classify_repeats(facts):
        if r.cls != "dup":
            report.repeats[r.cls] = report.repeats.get(r.cls, 0) + r.extra
    return report


def read_history(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"type": "error", "message": f"{path}:{n}: not JSON (truncated history?)"})
    return records


def print_report(report: Report, out=None, examples: int = 5) -> None:
    """Each property's violations (up to ``examples`` of each, with their history records),
    the final state, a detail line, the replay command on failure, and the summary line last."""
    out = out or sys.stdout

    def p(line: str = "") -> None:
        print(line, file=out)

    for prop, _, heading in PROPERTIES:
        found = report.of(prop)
        if not found:
            continue
        allowed = " (allowed: all mode with partitions, a healed split brain)" if report.allowed(prop) else ""
        p(heading.format(n=len(found)) + allowed + ":")
        for v in found[:examples]:
            p(f"  {v.subject}: {v.why}")
            for r in v.records:
                p(f"    {json.dumps(r, ensure_ascii=False)}")
        if len(found) > examples:
            p(f"  ... and {len(found) - examples} more")
    if report.state.detail and not report.of("digests"):
        p(f"state after healing: {report.state.detail}")
    rep = report.repeats
    p(f"ops: {report.ops} ({report.acked} ok, {report.failed} refused, {report.unknown} unknown; "
      f"plus {report.auto} automatic re-logins of seed-style clients); "
      f"sends: {report.sends} ({report.acked_sends} acknowledged); deliveries: {report.delivered} "
      f"(seed-style duplicates {report.seed_dup}: {rep.get('seed_redelivery', 0)} redelivered to a seed-style "
      f"recipient, {rep.get('seed_retry', 0)} a seed-style sender's retry; "
      f"re-shown after a fresh login {report.reshown})")
    if not report.ok and report.meta.get("replay"):
        p(f"replay: {report.meta['replay']}")
    p(report.summary())


# ------------------------------------------------------------------------------------- runner
#
# ``main`` is parse (``parse_args``) -> run (``run``: the cluster, workload and nemesis, which
# produce a history) -> measure (``check``) -> print (``print_report``) -> ``finish`` (exit
# status, keep or remove the run's directory).  ``--check FILE`` skips the run.


def replay_command(args) -> str:
    parts = ["python3", "bench/chaos.py", "--seed", str(args.seed), "--duration", f"{args.duration:g}",
             "--replicas", str(args.replicas), "--clients", str(args.clients)]
    if args.netns:
        parts.append("--netns")
    if args.partitions:
        parts.append("--partitions")
    if args.quorum:
        parts += ["--quorum", args.quorum]
    if args.tls:
        parts.append("--tls")
    for flag, value, default in (("--accounts", args.accounts, 2), ("--mean-gap", args.mean_gap, 1.5),
                                 ("--log-retain", args.log_retain, None)):
        if value != default and value is not None:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if args.history:
        parts += ["--history", args.history]
    return " ".join(shlex.quote(p) for p in parts)


def make_workers(args, addresses, history, registry, tls: ssl.SSLContext | None = None) -> list:
    """Even-numbered clients use our client library, odd-numbered ones are seed-style; with
    ``tls`` (a client context: the cluster's, which verifies against the run's CA) both kinds
    speak TLS."""
    workers = []
    for i in range(args.clients):
        rng = random.Random(f"{args.seed}-client-{i}")
        cls = ExtWorker if i % 2 == 0 else SeedWorker
        prefix = "x" if cls is ExtWorker else "s"
        accounts = [f"c{i}{prefix}{j}" for j in range(args.accounts)]
        workers.append(cls(i, addresses, history, registry, rng, accounts, tls=tls))
    return workers


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def make_network(args) -> tuple[list[str], Netns | None]:
    """The replicas' hosts: namespaces with ``--netns`` when they can be made, else loopback."""
    hosts = [f"127.0.0.{i + 1}" for i in range(args.replicas)]
    if not args.netns:
        return hosts, None
    candidate = Netns(args.replicas)
    try:
        hosts = candidate.setup()
    except NetnsError as exc:
        if args.partitions:
            log(f"--partitions needs network namespaces, which cannot be made here: {exc}")
            raise SystemExit(2) from None
        log(f"network namespaces unavailable ({exc}); falling back to loopback addresses 127.0.0.x")
        return hosts, None
    log(f"replicas in network namespaces {', '.join(candidate.names)} on bridge {candidate.bridge}")
    return hosts, candidate


def workload_phase(args, cluster: Cluster, history: History, workers: list, netns: Netns | None = None) -> Nemesis:
    """Start the cluster and the clients (appended to ``workers`` at once, so the caller can
    stop them whatever happens), then inject faults for ``--duration`` seconds.  In majority
    mode at most ⌊(N−1)/2⌋ replicas are killed or stopped at once (what the mode tolerates)."""
    cluster.start(timeout=20)
    if not wait_for(cluster.in_sync, 30, interval=0.1):
        raise RuntimeError("the cluster did not elect a primary at start")
    history.write("phase", name="workload")
    log(f"seed {args.seed}: {args.replicas} replicas up ({', '.join(f'{h}:{p}' for h, p in cluster.addresses)}), "
        f"{args.clients} clients, {args.duration:g} s of faults; history {history.path}")
    workers.extend(make_workers(args, cluster.addresses, history, Registry(), tls=cluster.tls))
    for w in workers:
        w.start()
    nemesis = Nemesis(cluster, random.Random(args.seed), history, mean_gap=args.mean_gap,
                      max_down=(args.replicas - 1) // 2 if args.quorum == "majority" else None,
                      netns=netns, partitions=args.partitions)
    nemesis.run(until=time.monotonic() + args.duration)
    return nemesis


def heal_phase(args, cluster: Cluster, history: History, workers: list, nemesis: Nemesis) -> None:
    """Stop the clients, undo every fault, wait for one primary with every replica in its
    view (a liveness check: an error if not), and let each client finish its session."""
    history.write("phase", name="heal")
    for w in workers:
        w.stop()
    nemesis.heal()
    healed = wait_for(cluster.in_sync, args.heal_timeout, interval=0.1)
    if not healed:
        history.write("error", message=f"no primary with every replica in its view {args.heal_timeout:g} s "
                                       f"after healing: {cluster.statuses()}")
    log(f"healed after {nemesis.faults} faults ({'in sync' if healed else 'NOT in sync'}); stopping clients")
    for w in workers:
        if not w.join(60):
            history.write("error", message=f"client {w.client} did not stop within 60 s")


def drain_phase(history: History, workers: list) -> None:
    """Every account ever created logs in once more and reads its mailbox, in parallel."""
    history.write("phase", name="drain")
    drains = [threading.Thread(target=w.drain, daemon=True) for w in workers]
    for t in drains:
        t.start()
    for t in drains:
        t.join(90)
        if t.is_alive():
            history.write("error", message="a drain did not finish within 90 s")


def converge_phase(args, cluster: Cluster, history: History) -> None:
    """Wait until every replica is in one view at one applied index, and record the statuses
    of a round of queries that showed it (those digests are the ones compared).

    A replica's status digest is the one of its latest serialization of the state (made off
    the loop); a query that finds it behind an applied index that has not moved since the
    previous query asks for a fresh one, at most once per ``DIGEST_MAX_AGE`` (chatserver.py),
    and it lands a poll or two later.  Meanwhile the status reports the older digest next to
    the *current* applied index, so one round can pair a fresh index with a stale digest.  The
    round recorded is therefore one taken more than that second after an earlier round that
    showed the same applied index everywhere, and where the status has ``digest_applied`` (the
    index the digest describes), it must equal ``applied`` too: every digest compared was
    computed at that index."""
    history.write("phase", name="converge")
    last: list = []

    def round_() -> list | None:
        if not cluster.in_sync():
            return None
        statuses = cluster.statuses(2.0)
        if any(s is None or s.get("digest_applied", s["applied"]) != s["applied"] for s in statuses):
            return None      # a replica's digest describes an older index (servers since f491a3b say so)
        return statuses if len({s["applied"] for s in statuses}) == 1 else None

    def converged() -> bool:
        first = round_()
        if first is None:
            return False
        time.sleep(DIGEST_REFRESH)
        again = round_()
        last[:] = [again or first]
        return again is not None and again[0]["applied"] == first[0]["applied"]

    same = wait_for(converged, args.heal_timeout, interval=0.2)
    statuses = last[0] if last else cluster.statuses(2.0)
    history.write("final", ok=same, statuses=statuses, why="" if same else "replicas did not reach the same applied index")


@dataclass
class RunResult:
    """What ``run`` leaves for measuring and for ``finish``."""

    records: list
    workdir: str
    history_path: str
    started: float
    interrupted: bool = False


def tear_down(workers: list, cluster: Cluster | None, netns: Netns | None, history: History) -> None:
    """Stop the clients, kill every replica by PID (recording what their logs say went wrong)
    and remove the namespaces: whatever happened before."""
    for w in workers:
        w.stop()
    if cluster is not None:
        cluster.stop_all()
        for i, r in enumerate(cluster.replicas):
            for line in r.log_problems():
                history.write("error", message=f"replica {i} logged: {line}")
    if netns is not None:
        netns.cleanup()
    history.close()


def run(args) -> RunResult:
    """One chaos run: cluster, workload under faults, heal, drain, converge.  Whatever fails
    or interrupts it is written to the history as an error, and everything is torn down."""
    result = RunResult([], tempfile.mkdtemp(prefix=f"chatnet-chaos-{args.seed}-"), "", time.monotonic())
    result.history_path = args.history or os.path.join(result.workdir, "history.jsonl")
    history = History(result.history_path)
    hosts, netns = make_network(args)
    cluster, workers, previous = None, [], None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        certs = make_certs(result.workdir, hosts) if args.tls else None
        cluster = make_cluster(result.workdir, hosts, netns, args, certs)
        history.write("meta", seed=args.seed, replicas=args.replicas, clients=args.clients, duration=args.duration,
                      netns=netns is not None, addresses=[f"{h}:{p}" for h, p in cluster.addresses],
                      quorum=args.quorum or "all", partitions=args.partitions, tls=args.tls, failure_timeout=FAILURE_TIMEOUT,
                      replay=replay_command(args), workdir=result.workdir)
        nemesis = workload_phase(args, cluster, history, workers, netns)
        heal_phase(args, cluster, history, workers, nemesis)
        drain_phase(history, workers)
        converge_phase(args, cluster, history)
    except KeyboardInterrupt:
        result.interrupted = True
        history.write("error", message="interrupted")
    except Exception as exc:   # noqa: BLE001 - reported, cleaned up
        history.write("error", message=f"runner failed: {exc!r}")
        log(f"runner failed: {exc!r}")
    finally:
        tear_down(workers, cluster, netns, history)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    result.records = history.records
    return result


def finish(args, result: RunResult, report: Report) -> int:
    """Remove the run's directory if it passed (unless ``--keep``); the exit status."""
    log(f"wall clock {time.monotonic() - result.started:.1f} s")
    if report.ok and not args.keep and not result.interrupted:
        shutil.rmtree(result.workdir, ignore_errors=True)
    else:
        log(f"kept the replicas' data and logs in {result.workdir}; history in {result.history_path}")
    if result.interrupted:
        return 130
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="seed of the nemesis and the workload (default 1)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of workload under faults (default 60)")
    p.add_argument("--replicas", type=int, default=3, help="number of replicas N (default 3)")
    p.add_argument("--clients", type=int, default=8,
                   help="workload clients K, our client and seed-style alternating (default 8)")
    p.add_argument("--accounts", type=int, default=2, help="accounts per client (default 2)")
    p.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between faults (default 1.5)")
    p.add_argument("--log-retain", type=int, default=None, metavar="ENTRIES",
                   help="replicas' --log-retain (small values make restarted replicas catch up by snapshot)")
    p.add_argument("--heal-timeout", type=float, default=30.0,
                   help="seconds to wait for a primary / for convergence after healing (default 30)")
    p.add_argument("--netns", action="store_true",
                   help="run each replica in a network namespace of its own (root; falls back to 127.0.0.x)")
    p.add_argument("--partitions", action="store_true",
                   help="the nemesis also cuts the network between replicas (one-way and symmetric; needs --netns)")
    p.add_argument("--quorum", choices=("all", "majority"), default=None,
                   help="passed to the replicas (default: not passed, the server's default, all)")
    p.add_argument("--tls", action="store_true",
                   help="replicas serve TLS (client port and peer links, --require-tls) with a throwaway CA; "
                        "every client and status query speaks TLS (needs openssl)")
    p.add_argument("--history", metavar="FILE", help="write the history here (default: in the run's temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the replicas' data and logs even when the run passes")
    p.add_argument("--check", metavar="FILE", help="only check an existing history file")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; bad arguments exit with status 2 (argparse's own rule)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.check and (args.replicas < 1 or args.clients < 1 or args.duration <= 0):
        parser.error("--replicas, --clients and --duration must be positive")
    if args.partitions and not args.netns:
        parser.error("--partitions needs --netns (partitions are cut between the replicas' namespaces)")
    if args.tls and not args.check and (why := openssl_missing()):
        parser.error(f"--tls needs certificates, which cannot be made: {why}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check:
        records = read_history(args.check)
        report = check(records)
        print_report(report)
        return 0 if report.ok else 1
    result = run(args)
    report = check(result.records)
    print_report(report)
    return finish(args, result, report)


if __name__ == "__main__":
    sys.exit(main())
