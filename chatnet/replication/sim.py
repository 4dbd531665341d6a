"""Deterministic cluster simulator (VOPR / FoundationDB style) over the production replica host.

One process, one seeded ``random.Random`` driving everything: a simulated network (per-link
delay, reordering, loss, duplication, cuts and partitions), a simulated clock (integer time
units, ``TICK`` units per replica tick, each replica with its own phase), a simulated disk per
replica (:class:`~.simdisk.SimDisk`, which loses un-synced writes at a crash), and — unchanged
from ``bin/chatserver`` — :class:`chatnet.server.host.ReplicaHost` with its replication core and
chat service.  Simulated clients speak the wire protocol's requests to whichever replica they
reach: they create or log in to an account and send chat to an account ``sink`` that stays
logged in (so chat is delivered and the delivery marks go through the log too).

A nemesis crashes (also in the middle of a host cycle: after the store commit, or part-way
through sending), restarts and pauses replicas (a pause longer than half the failure timeout
makes the host call ``stalled()`` on waking, as the real reactor does), cuts links for less
than the failure timeout, and with the ``partition`` fault cuts them for longer.  After every
step the checker verifies:

* agreement: every replica's applied sequence is a prefix of one history (index -> data), and
  a replica that installs a snapshot holds exactly the state of replaying that history;
* I1: every acknowledged chat (a client read "Message sent to sink.") is in the log or state of
  every serving primary, at its index, and (at the end, after healing) on every replica;
* I2: at most one serving primary per view, and no primary's commit index advances in a view
  older than a view in which some primary already advanced it;
* I3: a replica that starts serving holds every chat acknowledged so far; a recovering replica
  never serves;
* liveness (``heal=True``): once faults stop, one primary serves every replica, all applied
  states are byte-for-byte equal and contain every acknowledged chat.

With the ``partition`` fault, a partition longer than the failure timeout lets both sides form
views (the documented split brain of the default mode): then only per-view uniqueness and
convergence after healing are checked.

The "scripted control" methods (``crash``, ``restart``, ``pause``, ``partition``,
``heal_network``, ``run_ticks``, ``wait_serving``, ``write``, and ``chat`` for a named client's
send with its acknowledged index) let scenario tests and the transcripts of
:mod:`.transcript` decide every fault themselves, with no nemesis.

Every parameter is part of the replay command that a failure prints, and a run is a pure
function of them: ``Simulation(...).run().trace`` is identical for identical parameters.

    python -m chatnet.replication.sim --seed 123 --steps 600 [--n 3] [--intensity 1.0]
        [--faults crash,pause,cut,drop,dup,partition] [--trace]
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import logging
import random
import sys
from dataclasses import dataclass

from ..protocol.codec import STATUS_NOTE, decode_frames, parse_request
from ..protocol.texts import T_LOGIN_UNKNOWN, T_SENT
from ..server.host import ReplicaHost
from ..server.service import Close, Reply
from ..server.state import ChatState, decode_command
from ..server.status import serialized
from .core import PRIMARY
from .membership import Config, MembershipError, is_config_entry
from .messages import Append, InstallSnapshot, decode_message, encode_message
from .simdisk import SimCrash, SimDisk

TICK = 10   # time units per replica tick
SINK = "sink"
CLIENTS = 12  # sending accounts
DEFAULT_FAULTS = ("crash", "pause", "cut", "drop", "dup")
# slowdisk: batches become durable a few time units after the host submits them, as with the
# server's storage thread (BackgroundStorage); a crash loses those still in flight.
# members: membership changes (docs/replication.md section 14) -- a replica is added (it starts,
# as with --join, once its add is appended), a member removed (and shut down for good once the
# removal is committed), or the primary removed (it hands over first), one change at a time.
ALL_FAULTS = DEFAULT_FAULTS + ("partition", "slowdisk", "members")


class InvariantViolation(AssertionError):
    pass


class SimNetwork:
    """One replica's side of the simulated network (the host's ``Network``)."""

    def __init__(self, sim: Simulation, node: int) -> None:
        self.sim, self.node = sim, node
        self.crash_after: int | None = None  # crash injection: die after this many more sends

    def send(self, peer: int, msg: object) -> None:
        if self.crash_after is not None:
            if self.crash_after == 0:
                self.crash_after = None
                raise SimCrash("crash injected part-way through sending")
            self.crash_after -= 1
        self.sim.send(self.node, peer, msg)


class SimSnapshots:
    """The simulator's stand-in for the forked serializations of the real server
    (``ForkSnapshots``): the state is serialized at ``start`` (as the fork freezes it), and the
    bytes are handed back only after a number of host cycles drawn from its own seeded rng, so
    checkpoints, peer snapshots and the compaction held behind them run late, as they do
    in the server, and deterministically."""

    MAX_CYCLES = 12

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._done: tuple | None = None
        self._left = 0

    @property
    def busy(self) -> bool:
        return self._done is not None

    def start(self, state: ChatState, tag: tuple) -> None:
        self._done, self._left = serialized(state, tag), self.rng.randint(0, self.MAX_CYCLES)

    def take(self) -> tuple | None:
        if self._done is None:
            return None
        if self._left > 0:  # (one host cycle calls take once)
            self._left -= 1
            return None
        done, self._done = self._done, None
        return done

    def close(self) -> None:
        self._done = None


class Node:
    def __init__(self, nid: int) -> None:
        self.id = nid
        self.disk = SimDisk()
        self.host: ReplicaHost | None = None
        self.net: SimNetwork | None = None
        self.paused_until = -1
        self.paused_from = -1
        self.inbox: list[tuple[int, object]] = []     # held while paused
        self.served_view: int | None = None  # the view it was last seen serving, None if not
        self.last_commit = 0
        self.phase = 0
        self.sends: dict[tuple, tuple[int, bytes]] = {}  # (sender, recipient, text) -> (index, entry)
        self.snapshots_seen = 0
        self.hist: dict[int, bytes] = {}  # its applied history (kept across crashes, like its disk)
        self.snap_from: tuple | None = None  # (sender, view, snap_id) of the last snapshot it completed
        self.seen: tuple[str, int] | None = None  # (role, view) last noted in the trace
        self.config: Config | None = None  # the configuration it joined (None: the first one)
        self.starts = 0

    @property
    def up(self) -> bool:
        return self.host is not None

    @property
    def replica(self):
        return self.host.replica if self.host is not None else None


class SimClient:
    """A seed-style client: one connection, one request at a time, like a person typing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.node: int | None = None
        self.conn = 0
        self.logged_in = False
        self.outstanding: str | None = None  # request text awaiting its answer
        self.next_request: str | None = None
        self.want = 0  # chats still to send
        # Scripted (named) clients only: the chat requests to send, whether to log in once
        # (create the account) even with nothing to send, and the answer to the last send.
        self.named = False
        self.outbox: list[str] = []
        self.needs_login = False
        self.answer: str | None = None
        self.acked: tuple[int, int] | None = None  # (index, node) of the last acknowledged send


@dataclass
class ChatOutcome:
    """What became of one scripted send: acknowledged at ``index`` by ``node`` (``entry`` is
    its log entry), or not (then ``answer`` is the server's text, or why no answer came)."""

    acked: bool
    index: int | None
    node: int | None
    answer: str | None
    entry: bytes | None = None


class Simulation:
    def __init__(self, seed: int, n: int = 3, *, steps: int = 600, faults=DEFAULT_FAULTS,
                 partitions: bool = False, failure_ticks: int = 10, retain: int | None = None,
                 max_down: int | None = None, heal: bool = True, intensity: float = 1.0,
                 trace: bool = False, quorum: str = "all") -> None:
        self.seed, self.n, self.steps = seed, n, steps
        self.quorum = quorum
        self.retain_set = retain is not None
        self.faults = tuple(f for f in ALL_FAULTS if f in set(faults) | ({"partition"} if partitions else set()))
        unknown = set(faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {','.join(ALL_FAULTS)}")
        self.rng = random.Random(seed)
        self.partitions = "partition" in self.faults
        # Majority mode allows no split brain, so every check holds with partitions too; all
        # mode's split brain is checked for convergence and for no acknowledged chat lost.
        self.strict = not self.partitions or quorum == "majority"
        self.failure_ticks = failure_ticks
        # Small, so that snapshot catch-up happens often.  A healed split brain re-applies only
        # what both sides still hold in their logs (docs/replication.md section 10), so with
        # partitions in all mode the logs keep a whole run.
        self.retain = retain if retain is not None else (
            2000 if self.partitions and quorum == "all" else 40)
        self.max_down = n - 1 if max_down is None else max_down
        self.heal = heal
        self.intensity = intensity
        self.print_trace = trace
        self.cluster = tuple(range(1, n + 1))  # the nodes that exist now (membership changes)
        self.nodes = {i: Node(i) for i in self.cluster}
        self.retired: set[int] = set()  # removed by a committed change and shut down
        for nd in self.nodes.values():
            nd.disk.delay_commits = "slowdisk" in self.faults
        for nd in self.nodes.values():
            nd.phase = self.rng.randrange(TICK)
        self.now = 0
        self.net: list[tuple[int, int, int, int, bytes]] = []
        self._seq = 0
        self.blocked: dict[tuple[int, int], int] = {}   # link -> blocked until
        self.max_delay = TICK * 3 // 2
        self.p_drop = 0.02 if "drop" in self.faults else 0.0
        self.p_dup = 0.01 if "dup" in self.faults else 0.0
        self.history: dict[int, bytes] = {}     # index -> data, the one applied history
        # (sender, view, snap_id) -> (index, the sender's applied history up to index) of every
        # snapshot transfer sent: what a replica that installs it has applied
        self.snap_hist: dict[tuple, tuple[int, dict[int, bytes]]] = {}
        self.acked: dict[int, bytes] = {}       # acknowledged chats: index -> entry
        self.acked_chats: dict[tuple, tuple[int, int]] = {}   # (sender, recipient, text) -> (index, node)
        self.scheduled: list[tuple[int, int, list]] = []       # flapping cuts: (from, until, links)
        self.write_no = 0
        self._conn_ids = 0
        self.max_commit_view = -1
        self.trace: list[str] = []
        self.stats = {"crashes": 0, "restarts": 0, "pauses": 0, "stalls": 0, "writes": 0,
                      "acked": 0, "snapshots": 0, "partitions": 0, "failovers": 0, "lost_unsynced": 0,
                      "member_changes": 0, "joined": 0, "retired": 0}
        self.clients = [SimClient(SINK)] + [SimClient(f"u{k}") for k in range(1, CLIENTS + 1)]
        for i in self.cluster:
            self.start(i)

    # ------------------------------------------------------------------ plumbing
    def replay(self) -> str:
        return (f"python -m chatnet.replication.sim --seed {self.seed} --steps {self.steps} "
                f"--n {self.n} --intensity {self.intensity} --faults {','.join(self.faults)}"
                + (f" --quorum {self.quorum}" if self.quorum != "all" else "")
                + (f" --retain {self.retain}" if self.retain_set else "")
                + (f" --max-down {self.max_down}" if self.max_down != self.n - 1 else ""))

    def fail(self, what: str) -> None:
        raise InvariantViolation(f"t={self.now}: {what}\nreplay: {self.replay()}")

    def note(self, s: str) -> None:
        line = f"[t={self.now}] {s}"
        self.trace.append(line)
        if self.print_trace:
            print(line)

    def start(self, i: int) -> None:
        nd = self.nodes[i]
        nd.net = SimNetwork(self, i)
        token_rng = random.Random(self.rng.getrandbits(64))
        nd.starts += 1  # (its own rng: the delays it draws change no other draw of the run)
        nd.disk.snapshotter = SimSnapshots(random.Random(f"snapshots {self.seed} {i} {nd.starts}"))
        first = nd.config.ids if nd.config is not None else tuple(range(1, self.n + 1))
        nd.host = ReplicaHost(i, first, nd.disk, network=nd.net, config=nd.config,
                              failure_ticks=self.failure_ticks,
                              rng=random.Random(self.rng.getrandbits(64)), retain_entries=self.retain,
                              new_token=lambda: "%016x" % token_rng.getrandbits(64), quorum=self.quorum)
        nd.host.on_applied = lambda index, data, i=i: self.on_apply(i, index, data)
        nd.seen = (nd.replica.role, nd.replica.view)
        nd.served_view = None
        nd.last_commit = nd.replica.commit_index
        nd.paused_until = -1
        nd.inbox = []
        nd.sends = {}
        self.process(i)

    def crash(self, i: int) -> None:
        nd = self.nodes[i]
        nd.host = nd.net = None
        nd.paused_until = -1
        nd.inbox = []
        nd.served_view = None
        nd.seen = None
        nd.disk.fail_after_commit = False
        lost = nd.disk.crash(self.rng)
        self.stats["lost_unsynced"] += lost
        for c in self.clients:
            if c.node == i:
                self._disconnect(c)
        self.stats["crashes"] += 1
        self.note(f"crash {i} (lost {lost} un-synced batches)")

    def send(self, src: int, dst: int, msg: object) -> None:
        if isinstance(msg, InstallSnapshot) and msg.offset == 0:
            self._note_snapshot_sent(src, msg)
        if type(msg) is Append:
            self._check_commit_durable(src, msg)
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

    def _check_commit_durable(self, src: int, msg: Append) -> None:
        """A commit index that leaves a primary is durable in its own log: a backup that
        learns it applies those entries, and a primary that crashed before writing them could
        come back and form a view without them (an entry applied somewhere, then lost)."""
        disk = self.nodes[src].disk
        durable_last = disk.log[-1][0] if disk.log else disk.base_index
        if msg.commit > durable_last:
            self.fail(f"node {src} sent commit {msg.commit} to a backup with its own log durable "
                      f"only to {durable_last}")

    def process(self, i: int, crash_at: str | None = None) -> None:
        """Run host cycles until the host has nothing more to do, as the reactor does before
        it sleeps.  ``crash_at`` kills the machine inside the next cycle: ``after_persist``
        (the commit landed, nothing was sent or answered) or ``mid_send`` (some messages left)."""
        nd = self.nodes[i]
        if crash_at == "after_persist":
            nd.disk.fail_after_commit = True
        elif crash_at == "mid_send":
            nd.net.crash_after = self.rng.randint(0, 2)
        try:
            if crash_at == "after_persist" and nd.disk.in_flight:
                nd.disk.complete(len(nd.disk.in_flight))  # what is in flight lands, then death
            for _ in range(8):
                result = nd.host.cycle()
                self._observe_snapshots(i)
                self.after_process(i)
                self._deliver_effects(i, result.effects)
                if not result.more:
                    break
        except SimCrash as exc:
            self.note(f"node {i}: {exc}")
            for index, data in nd.host.durable_unreleased():  # on disk, though nobody saw it
                self.on_apply(i, index, data)
            self.crash(i)
            return
        if crash_at is not None:  # the cycle had nothing to commit or send: die anyway
            self.crash(i)

    # ------------------------------------------------------------------ clients
    def _deliver_effects(self, i: int, effects: list) -> None:
        """What the front end would write to each client's socket, read by the client at once."""
        by_conn = {c.conn: c for c in self.clients if c.node == i}
        nd = self.nodes[i]
        for effect in effects:
            client = by_conn.get(effect.conn)
            if client is None or not nd.up:
                continue
            if isinstance(effect, Reply):
                if effect.delivered is not None:
                    nd.host.service.frames_written(effect.delivered)
                for fr in decode_frames(effect.data):
                    self._client_reads(client, fr)
            elif isinstance(effect, Close):
                self._disconnect(client)

    def _client_reads(self, c: SimClient, fr) -> None:
        if fr.indicator == 1 or c.outstanding is None:
            return  # chat (for the sink) or a note after an answer
        request, c.outstanding = c.outstanding, None
        if fr.status == STATUS_NOTE:  # a backup's redirect: the Close follows
            if c.named and request.startswith("3|"):
                c.outbox.insert(0, request)  # never taken: a scripted send goes again
            return
        text = fr.message
        if request.startswith(("1|", "2|")):
            if fr.status == 0:
                c.logged_in = True
                c.needs_login = False
            elif text == T_LOGIN_UNKNOWN:
                c.next_request = f"1|{c.name}"
            else:  # taken (created meanwhile), or still connected elsewhere: log in again
                c.next_request = f"2|{c.name}"
        elif request.startswith("3|"):
            _, recipient, chat = request.split("|", 2)
            c.answer = text
            if text == T_SENT.format(recipient=recipient):
                c.acked = self._acked(c.node, (c.name, recipient, chat))

    def _acked(self, i: int, chat: tuple[str, str, str]) -> tuple[int, int]:
        got = self.nodes[i].sends.get(chat)
        if got is None:
            self.fail(f"node {i} acknowledged {chat!r} that it never applied")
        index, data = got
        self.acked[index] = data
        self.acked_chats[chat] = (index, i)
        self.stats["acked"] += 1
        sender, recipient, text = chat
        self.note(f"ack {index} {text if recipient == SINK else f'{sender}->{recipient}: {text}'} by {i}")
        if self.strict:
            self._check_acked_on_primaries(index, data, self.nodes[i].replica.view)
        return index, i

    def _check_acked_on_primaries(self, index: int, data: bytes, view: int) -> None:
        """I1.  With partitions (majority mode), a primary cut off from the majority still
        says it serves until it suspects the others, though it can commit nothing: only the
        primaries of the acknowledging view and newer ones must hold the write."""
        for nd in self.nodes.values():
            if nd.up and nd.paused_until < 0 and nd.replica.serving and not self.holds(nd.id, index, data) \
                    and not (self.partitions and nd.replica.view < view):
                self.fail(f"I1: serving primary {nd.id} lacks acked write {index}")

    def _connect(self, c: SimClient, target: int | None) -> None:
        ups = [nd.id for nd in self.nodes.values() if nd.up and nd.paused_until < 0]
        serving = [i for i in ups if self.nodes[i].host.serves_clients]
        if target is not None:
            pool = [target] if target in ups else []
        else:
            pool = serving if serving and self.rng.random() < 0.9 else ups
        if not pool:
            return
        c.node = self.rng.choice(pool)
        self._conn_ids += 1
        c.conn = self._conn_ids
        c.logged_in = False
        c.next_request = f"2|{c.name}"
        self.nodes[c.node].host.open(c.conn)

    def _disconnect(self, c: SimClient) -> None:
        nd = self.nodes.get(c.node) if c.node is not None else None
        if nd is not None and nd.up:
            nd.host.close_connection(c.conn)
        if c.named and c.outstanding is not None and c.outstanding.startswith("3|"):
            c.answer = f"no answer: the connection to {c.node} was lost"
        c.node, c.outstanding, c.next_request, c.logged_in = None, None, None, False

    def _request(self, c: SimClient, text: str) -> None:
        c.outstanding = text
        effects = self.nodes[c.node].host.receive(c.conn, parse_request(text))
        self._deliver_effects(c.node, effects)

    def pump_clients(self, target: int | None = None) -> set[int]:
        """Let every client with something to do send its next request; the touched nodes."""
        touched = set()
        for c in self.clients:
            if c.node is None:
                if c.want or c.outbox or c.needs_login or c.name == SINK:
                    self._connect(c, target)
                if c.node is None:
                    continue
            nd = self.nodes[c.node]
            if c.outstanding is not None or nd.paused_until >= 0:
                continue
            if c.next_request is not None:
                text, c.next_request = c.next_request, None
            elif c.logged_in and c.outbox:
                text = c.outbox.pop(0)
            elif c.logged_in and c.want:
                c.want -= 1
                self.write_no += 1
                self.stats["writes"] += 1
                text = f"3|{SINK}|w{self.write_no}"
            else:
                continue
            touched.add(c.node)
            self._request(c, text)
        return touched

    def client_write(self, target: int | None = None, k: int | None = None) -> None:
        """Ask ``k`` (random 1-4) chats of random clients; they go out as clients get to them."""
        senders = self.clients[1:CLIENTS + 1]  # not the scripted named clients
        for _ in range(self.rng.randint(1, 4) if k is None else k):
            self.rng.choice(senders).want += 1
        self._pump_and_process(target)

    def _pump_and_process(self, target: int | None = None) -> None:
        for i in sorted(self.pump_clients(target)):
            if self.nodes[i].up and self.nodes[i].paused_until < 0:
                self.process(i)

    # ------------------------------------------------------------------ checks
    def on_apply(self, i: int, index: int, data: bytes) -> None:
        h = self.history.get(index)
        if h is None or not self.strict:
            self.history[index] = data
        elif h != data:
            self.fail(f"agreement: node {i} applied {data!r} at {index}, history has {h!r}")
        self.nodes[i].hist[index] = data
        if is_config_entry(data):
            return
        cmd = decode_command(data)
        if cmd[0] == "reapply":   # a healed split brain's command, applied again at a new index
            cmd = cmd[3]
        if cmd[0] == "send":
            self.nodes[i].sends[tuple(cmd[1:4])] = (index, data)

    def _observe_snapshots(self, i: int) -> None:
        nd = self.nodes[i]
        if nd.disk.snapshots == nd.snapshots_seen:
            return
        self.stats["snapshots"] += nd.disk.snapshots - nd.snapshots_seen
        nd.snapshots_seen = nd.disk.snapshots
        if nd.up:
            self.note(f"node {i} installs a snapshot at index {nd.host.applied_index}")
            self._copy_history(i)
        if self.strict and nd.up:
            expected = self.reference_state(nd.host.applied_index)
            if expected is not None and expected != nd.host.service.state.to_snapshot():
                self.fail(f"agreement: node {i} installed a snapshot at {nd.host.applied_index} "
                          f"that differs from replaying the history")

    def _note_snapshot_sent(self, src: int, msg: InstallSnapshot) -> None:
        """The first chunk of a transfer leaves ``src``: its applied history up to the snapshot's
        index is what the receiver will have applied (every entry up to it was reported applied
        before the iteration that sends the chunk was released).  Kept per transfer, because the
        sender may crash or install another snapshot before the receiver completes this one."""
        self.snap_hist[(src, msg.view, msg.snap_id)] = (
            msg.index, {k: v for k, v in self.nodes[src].hist.items() if k <= msg.index})

    def _copy_history(self, i: int) -> None:
        """Node ``i`` installed a snapshot: its applied history up to there is its sender's.
        Entries it applied after the snapshot (in the same iteration, already reported) stay."""
        nd = self.nodes[i]
        sent = self.snap_hist.get(nd.snap_from) if nd.snap_from is not None else None
        if sent is not None:
            index, hist = sent
            nd.hist = dict(hist) | {k: v for k, v in nd.hist.items() if k > index}
            return
        src = nd.replica.status()["following"] or nd.replica.primary
        upto = nd.host.applied_index
        if src is not None and self.nodes[src].up:
            nd.hist = {k: v for k, v in self.nodes[src].hist.items() if k <= upto}

    def reference_state(self, upto: int) -> bytes | None:
        """The chat state of replaying the one history up to ``upto`` (None if unknown)."""
        state = ChatState()
        for index in range(1, upto + 1):
            data = self.history.get(index)
            if data is None:
                return None
            if not is_config_entry(data):
                state.apply(decode_command(data), index)
        return state.to_snapshot()

    def holds(self, i: int, index: int, data: bytes) -> bool:
        nd = self.nodes[i]
        if nd.up:
            e = nd.replica.entry(index)
            if e is not None:
                return e.data == data
            return index <= nd.host.applied_index and self.history.get(index) == data
        if nd.disk.entry_data(index) is not None:
            return nd.disk.entry_data(index) == data
        return index <= nd.disk.applied_index and self.history.get(index) == data

    def after_process(self, i: int) -> None:
        nd = self.nodes[i]
        r = nd.replica
        if r is None:
            return
        if (r.role, r.view) != nd.seen:
            self.note(f"node {i}: {nd.seen[0]} (view {nd.seen[1]}) -> {r.role} (view {r.view})")
            nd.seen = (r.role, r.view)
        if r.serving:
            if r.role != PRIMARY:
                self.fail(f"I3: node {i} serves in role {r.role}")
            if nd.served_view != r.view:  # starts serving (a view change may take one cycle)
                self.note(f"node {i} serves view {r.view} members {r.members}")
                for idx, d in (self.acked.items() if self.strict else ()):
                    if not self.holds(i, idx, d):
                        self.fail(f"I3/I1: node {i} starts serving view {r.view} without "
                                  f"acked write {idx}")
                for other in self.nodes.values():
                    if other.id != i and other.up and other.replica.serving \
                            and other.replica.view == r.view:
                        self.fail(f"I2: nodes {i} and {other.id} both serve view {r.view}")
        nd.served_view = r.view if r.serving else None
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
            nd = self.nodes.get(dst)
            if nd is None or not nd.up:   # (retired, or added but not started yet)
                continue
            msg = decode_message(payload)
            if nd.paused_until > self.now:
                nd.inbox.append((src, msg))
                continue
            self.step(dst, src, msg)
            self.process(dst)

    def step(self, i: int, src: int, msg: object) -> None:
        """Hand ``msg`` to node ``i``, noting which snapshot transfer it may complete."""
        if isinstance(msg, InstallSnapshot) and msg.offset + len(msg.data) >= msg.total:
            self.nodes[i].snap_from = (src, msg.view, msg.snap_id)
        self.nodes[i].host.step(src, msg)

    def unit(self) -> None:
        """Advance the clock by one time unit."""
        self.now += 1
        if self.scheduled:
            self._apply_scheduled_cuts()
        for nd in self.nodes.values():
            if nd.up and 0 <= nd.paused_until <= self.now:
                self.resume(nd)
        self.deliver_due()
        self.complete_disks()
        order = list(self.nodes.values())
        self.rng.shuffle(order)
        for nd in order:
            if nd.up and nd.paused_until < 0 and (self.now + nd.phase) % TICK == 0:
                nd.host.tick()
                self.process(nd.id)
        for i in sorted(self.pump_clients()):
            if self.nodes[i].up:
                self.process(i)

    def complete_disks(self) -> None:
        """With the ``slowdisk`` fault, submitted batches reach the disk at random later times;
        the host then releases what they held back (messages, answers)."""
        for nd in self.nodes.values():
            if nd.up and nd.paused_until < 0 and nd.disk.in_flight and self.rng.random() < 0.5:
                nd.disk.complete(self.rng.randint(1, len(nd.disk.in_flight)))
                self.process(nd.id)

    def resume(self, nd: Node) -> None:
        gap_ticks = (self.now - nd.paused_from) // TICK
        nd.paused_until = -1
        if gap_ticks >= self.failure_ticks // 2:
            nd.host.stalled()       # the host noticed its own stall
            self.stats["stalls"] += 1
            self.note(f"node {nd.id} wakes after {gap_ticks} ticks: stalled()")
        self.process(nd.id)
        inbox, nd.inbox = nd.inbox, []
        for src, msg in inbox:
            if nd.up:
                self.step(nd.id, src, msg)
                self.process(nd.id)

    # ------------------------------------------------------------------ nemesis
    def nemesis(self) -> None:
        rng = self.rng
        k = self.intensity / TICK
        down = [nd for nd in self.nodes.values() if not nd.up]
        live = [nd for nd in self.nodes.values() if nd.up]
        if "crash" in self.faults and rng.random() < 0.012 * k and live and len(down) < self.max_down:
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
        elif "pause" in self.faults and rng.random() < 0.006 * k and live:
            nd = rng.choice(live)
            if nd.paused_until < 0:
                ticks = rng.choice([1, 2, 3, self.failure_ticks // 2 - 1, self.failure_ticks,
                                    2 * self.failure_ticks, 3 * self.failure_ticks])
                self.pause(nd.id, ticks, jitter=rng.randrange(TICK))
                self.stats["pauses"] += 1
        elif ("cut" in self.faults or self.partitions) and rng.random() < 0.004 * k and len(self.cluster) > 1:
            self.random_cut()
        if rng.random() < 0.25 * k * TICK / 2:
            self.client_write()
        if "members" in self.faults:
            self.membership_nemesis()

    def random_cut(self) -> None:
        rng = self.rng
        if self.partitions and rng.random() < 0.5:
            self.random_partition()
            return
        a, b = rng.sample(self.cluster, 2)
        if self.partitions:
            length = rng.randint(1, 4 * self.failure_ticks) * TICK
        else:
            length = rng.randint(1, self.failure_ticks // 3) * TICK
        self.blocked[(a, b)] = self.now + length
        if rng.random() < 0.7:
            self.blocked[(b, a)] = self.now + length
        self.stats["partitions"] += 1
        self.note(f"cut {a}<->{b} for {length // TICK} ticks")

    def random_partition(self) -> None:
        """A partition of the whole cluster: a random side against the rest, symmetric,
        one-way (the side's messages to the rest are lost, the rest's arrive), or flapping
        (cut and healed several times, each time within about a failure timeout)."""
        rng = self.rng
        side = set(rng.sample(self.cluster, rng.randint(1, len(self.cluster) - 1)))
        out = [(a, b) for a in side for b in self.cluster if b not in side]
        kind = rng.choice(["symmetric", "one-way", "flapping"])
        links = out if kind == "one-way" else out + [(b, a) for a, b in out]
        if kind == "flapping":
            t = self.now
            for _ in range(rng.randint(2, 5)):
                cut = rng.randint(self.failure_ticks // 2, 2 * self.failure_ticks) * TICK
                self.scheduled.append((t, t + cut, links))
                t += cut + rng.randint(1, self.failure_ticks) * TICK
            length = t - self.now
        else:
            length = rng.randint(1, 4 * self.failure_ticks) * TICK
            for link in links:
                self.blocked[link] = max(self.blocked.get(link, -1), self.now + length)
        self.stats["partitions"] += 1
        self.note(f"{kind} partition {' '.join(map(str, sorted(side)))} | rest for {length // TICK} ticks")

    def _apply_scheduled_cuts(self) -> None:
        due = [c for c in self.scheduled if c[0] <= self.now]
        if due:
            self.scheduled = [c for c in self.scheduled if c[0] > self.now]
            for _, until, links in due:
                for link in links:
                    self.blocked[link] = max(self.blocked.get(link, -1), until)

    def crash_mid_loop(self, i: int) -> None:
        """Crash a host inside a cycle: after its store commit, or part-way through sending."""
        nd = self.nodes[i]
        if nd.replica.serving and self.rng.random() < 0.7:
            self.client_write(i)
        if nd.up:
            self.process(i, crash_at=self.rng.choice(["after_persist", "mid_send"]))
        if nd.up:
            self.crash(i)

    # ------------------------------------------------------------------ membership
    def membership_nemesis(self) -> None:
        """The ``members`` fault: now and then the serving primary is asked for a change, as
        ``chatserver members`` asks it (the nemesis' crashes and pauses hit every step of it)."""
        self.sync_membership()
        rng, k = self.rng, self.intensity / TICK
        if rng.random() >= 0.03 * k:
            return
        prim = next((self.nodes[i] for i in self.serving()), None)
        if prim is None:
            return
        r = prim.replica
        size = len(r.config.ids)
        op = rng.choice(["add"] * (size < 5) + ["remove", "remove-primary"] * (size > 2) or ["add"])
        self.stats["member_changes"] += 1
        try:
            if op == "add":
                self.note(f"members add n{r.config.next_id} (log index {r.change_config(add=f'n{r.config.next_id}')})")
                self._start_joiners(r.config)
            elif op == "remove":
                node = rng.choice([p for p in r.config.ids if p != prim.id])
                self.note(f"members remove {node} (log index {r.change_config(remove=node)})")
            else:
                self.note(f"members remove {prim.id}: the primary hands over to {r.hand_over()}")
                self.pending_removal = prim.id
        except MembershipError as exc:
            self.note(f"members {op} refused: {exc}")
        self.process(prim.id)

    pending_removal: int | None = None
    membership_used = False  # a scripted change was made: follow the configuration at heal

    def add_member(self, ticks: int = 100) -> str:
        """Scripted ``members add``: the serving primary adds a node, which starts once the add
        is appended (as --join does); run until it is a member of the serving primary's view
        (or ``ticks``)."""
        self.membership_used = True
        who = self.wait_serving(ticks)
        if who is None:
            return "refused: nobody serves"
        r = self.nodes[who].replica
        node = r.config.next_id
        try:
            index = r.change_config(add=f"n{node}")
        except MembershipError as exc:
            return f"refused: {exc}"
        self._start_joiners(r.config)
        self.process(who)
        self._run_membership(ticks, lambda p: node in p.members)
        where = next((self.nodes[i].replica for i in self.serving()), None)
        state = "a member of the view" if where is not None and node in where.members else "not in the view yet"
        return f"node {node} added at log index {index}; {state} ({self._now_ticks()})"

    def remove_member(self, node: int, ticks: int = 100) -> str:
        """Scripted ``members remove``: the primary hands over first if it is ``node``; run
        until the removal is committed (the node is then shut down for good) or ``ticks``."""
        self.membership_used = True
        who = self.wait_serving(ticks)
        if who is None:
            return "refused: nobody serves"
        try:
            if who == node:
                self.note(f"members remove {node}: the primary hands over to "
                          f"{self.nodes[who].replica.hand_over()}")
                self.process(who)
                who = self.wait_serving(ticks, exclude=(node,))
                if who is None:
                    return f"the hand-over from {node} did not finish within {ticks} ticks"
            index = self.nodes[who].replica.change_config(remove=node)
        except MembershipError as exc:
            return f"refused: {exc}"
        self.process(who)
        self._run_membership(ticks, lambda p: node not in p.config.ids and p.config.index <= p.commit_index)
        done = node in self.retired
        return f"node {node} {'removed' if done else 'not removed yet'} at log index {index}; " \
               f"members {','.join(map(str, self.cluster))} ({self._now_ticks()})"

    def _start_joiners(self, config) -> None:
        """Start the replicas ``config`` names that do not exist yet: a fresh disk and the
        configuration, as ``--join`` records it (which starts as soon as its add is appended)."""
        for node in config.ids:
            if node not in self.nodes and node not in self.retired:
                nd = self.nodes[node] = Node(node)
                nd.phase, nd.config = self.rng.randrange(TICK), config
                nd.disk.delay_commits = "slowdisk" in self.faults
                self.stats["joined"] += 1
                self.note(f"node {node} joins")
                self.start(node)
        self.cluster = tuple(self.nodes)

    def _run_membership(self, ticks: int, done) -> None:
        for t in range(ticks * TICK):
            if t % TICK == 0:
                self.sync_membership()
                p = next((self.nodes[i].replica for i in self.serving()), None)
                if p is not None and done(p):
                    self.sync_membership()
                    return
            self.unit()

    def _now_ticks(self) -> str:
        return f"t={self.now}"

    def sync_membership(self) -> None:
        """Follow the committed configuration of a serving primary: start the replicas it
        added (a fresh disk, the configuration as --join records it), shut down for good the
        ones it removed; and remove a primary that handed over, once another one serves."""
        prim = next((self.nodes[i] for i in self.serving()), None)
        if prim is None or prim.replica.config.index > prim.replica.commit_index:
            return
        r = prim.replica
        if self.pending_removal is not None and self.pending_removal != prim.id:
            node, self.pending_removal = self.pending_removal, None
            if node in r.config.ids:
                try:
                    self.note(f"members remove {node} (log index {r.change_config(remove=node)})")
                except MembershipError as exc:
                    self.note(f"members remove {node} refused: {exc}")
                self.process(prim.id)
                return
        self._start_joiners(r.config)
        for node in [i for i in self.nodes if i not in r.config.ids]:
            if self.nodes[node].up:
                self.crash(node)
            del self.nodes[node]
            self.retired.add(node)
            self.stats["retired"] += 1
            self.note(f"node {node} retired (removed at log index {r.config.index})")
        self.cluster = tuple(self.nodes)

    # ------------------------------------------------------------------ scripted control
    # (for scenario tests and transcripts: no nemesis, the caller decides every fault)
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

    def write(self, count: int = 1, ticks: int = 40) -> int:
        """Ask ``count`` chats and run until they are all answered or ``ticks`` pass; the
        number acknowledged."""
        before = len(self.acked)
        self.client_write(k=count)
        for _ in range(ticks * TICK):
            if len(self.acked) - before >= count:
                break
            self.unit()
        return len(self.acked) - before

    def pause(self, i: int, ticks: int, jitter: int = 0) -> None:
        nd = self.nodes[i]
        nd.paused_from = self.now
        nd.paused_until = self.now + ticks * TICK + jitter
        self.note(f"pause {i} for ~{ticks} ticks")

    def partition(self, *sides: tuple[int, ...], until: int = 10**12) -> None:
        """Cut every link between different sides (both directions) until healed."""
        for a_side in sides:
            for b_side in sides:
                if a_side is not b_side:
                    for a in a_side:
                        for b in b_side:
                            self.blocked[(a, b)] = until
        self.note("partition " + " | ".join(" ".join(map(str, s)) for s in sides))

    def restart(self, i: int) -> None:
        self.stats["restarts"] += 1
        self.note(f"restart {i}")
        self.start(i)

    def role(self, i: int) -> str | None:
        nd = self.nodes[i]
        return nd.replica.role if nd.up else None

    def heal_network(self) -> None:
        """Restore every link cut by :meth:`partition` or a nemesis cut (faults stay as set)."""
        self.blocked.clear()
        self.scheduled = []
        self.note("heal: every link restored")

    def named_client(self, name: str) -> SimClient:
        """The scripted client ``name`` (made on first use).  Named clients are kept apart from
        the nemesis' anonymous senders, so scripting them draws nothing from the shared rng
        until they act."""
        c = next((c for c in self.clients if c.named and c.name == name), None)
        if c is None:
            c = SimClient(name)
            c.named = True
            self.clients.append(c)
        return c

    def chat(self, sender: str, recipient: str, text: str, ticks: int = 40,
             via: int | None = None) -> ChatOutcome:
        """Send one chat as the named client ``sender``, the way a person would: log in (creating
        the account if needed) on the serving primary (``via``: on that replica, e.g. one side
        of a split brain), send, and wait up to ``ticks`` for the answer.  The recipient's
        account is created first when that replica does not know it.  A redirected send goes
        again; a send whose connection died is not retried (it may or may not have committed:
        that is exactly what a client cannot tell)."""
        deadline = self.now + ticks * TICK
        where = via if via is not None else next(iter(self.serving()), None)
        if where is not None and self.nodes[where].up \
                and not self.nodes[where].host.service.state.exists(recipient):
            login = self.named_client(recipient)
            login.needs_login = True
            self._run_until(lambda: not login.needs_login, deadline, login, via)
        c = self.named_client(sender)
        c.answer, c.acked = None, None
        c.outbox.append(f"3|{recipient}|{text}")
        self._run_until(lambda: c.answer is not None, deadline, c, via)
        if c.answer is None:
            c.outbox.clear()
            c.answer = f"no answer within {ticks} ticks"
        if c.acked is None:
            return ChatOutcome(False, None, None, c.answer)
        index, node = c.acked
        return ChatOutcome(True, index, node, c.answer, self.acked[index])

    def _run_until(self, done, deadline: int, c: SimClient, via: int | None) -> None:
        """Move the named client ``c`` to the serving primary (or to ``via``) if it is
        elsewhere, let it act, and run time units until ``done()`` or ``deadline``."""
        while not done() and self.now < deadline:
            serving = self.serving()
            target = via if via is not None else next(iter(serving), None)
            if target in serving and c.node != target and c.outstanding is None:
                self._disconnect(c)
                self._connect(c, target)
            self._pump_and_process()
            if not done():
                self.unit()

    # ------------------------------------------------------------------ runs
    def run(self) -> Simulation:
        for _ in range(self.steps * TICK):
            self.unit()
            self.nemesis()
        if self.heal:
            self.heal_and_check()
        self.note(f"end digest {self.digest()}")
        return self

    def digest(self) -> str:
        """A digest of every replica's applied state, for comparing two runs."""
        h = hashlib.sha256()
        for nd in self.nodes.values():
            if nd.up:
                h.update(nd.host.service.state.to_snapshot())
        return h.hexdigest()[:16]

    def heal_and_check(self, max_ticks: int = 400) -> None:
        self.blocked.clear()
        self.scheduled = []
        self.p_drop = 0.0
        self.p_dup = 0.0
        for nd in self.nodes.values():
            if nd.up and nd.paused_until >= 0:
                nd.paused_until = self.now
        for nd in self.nodes.values():
            if not nd.up:
                self.note(f"restart {nd.id} (healing)")
                self.start(nd.id)
        acked_before = len(self.acked)
        for t in range(max_ticks * TICK):
            self.unit()
            if t % TICK:
                continue
            if "members" in self.faults or self.membership_used:
                self.sync_membership()
            if len(self.acked) == acked_before:
                if not any(c.want for c in self.clients):
                    self.client_write(k=1)    # a chat after healing must be acknowledged too
            elif self.converged():
                return
        states = {i: nd.replica.status() for i, nd in self.nodes.items()}
        self.fail(f"liveness: no convergence {max_ticks} ticks after healing: {states}")

    def converged(self) -> bool:
        if not all(nd.up for nd in self.nodes.values()):
            return False
        prim = [nd for nd in self.nodes.values() if nd.replica.serving]
        if len(prim) != 1:
            return False
        p = prim[0].replica
        # (in all mode a healed split brain's losing side may have committed a membership
        # change the winner never saw, and shut a replica down for it: the winner's
        # configuration then still names that replica -- docs/replication.md section 14)
        if set(p.members) != set(self.cluster) or set(p.config.ids) - self.retired != set(self.cluster) \
                or p.config.index > p.commit_index:
            return False
        top = p.commit_index
        for nd in self.nodes.values():
            r = nd.replica
            if r.commit_index != top or nd.host.applied_index != top or r.last_index != p.last_index \
                    or nd.host.waiting_for_disk:
                return False
        states = {nd.host.service.state.to_snapshot() for nd in self.nodes.values()}
        if len(states) != 1:
            self.fail("convergence: applied states differ after healing")
        if not self.strict:
            if any(nd.replica.status()["handover_pending"] for nd in self.nodes.values()):
                return False   # a healed split brain's losing side is still being re-applied
            self.check_chats_kept(prim[0])
            return True
        if self.reference_state(top) not in states:
            self.fail("convergence: the common state is not the replay of the history")
        for idx, d in self.acked.items():
            for nd in self.nodes.values():
                if not self.holds(nd.id, idx, d):
                    self.fail(f"I1: after healing node {nd.id} lacks acked write {idx}")
        return True


    def check_chats_kept(self, nd: Node) -> None:
        """All mode after a split brain healed: every acknowledged chat is in the merged
        history (perhaps re-applied at another index), and none twice."""
        seen: dict[tuple, int] = {}
        origins: set[tuple] = set()
        for index in range(1, nd.host.applied_index + 1):
            data = nd.hist.get(index)
            if data is None or is_config_entry(data):
                continue
            cmd = decode_command(data)
            if cmd[0] == "reapply":
                if cmd[1:3] in origins:
                    continue   # the state machine applies one origin once (ChatState.origins)
                origins.add(cmd[1:3])
                cmd = cmd[3]
            if cmd[0] == "send":
                key = tuple(cmd[1:4])
                if key in seen and key in self.acked_chats:
                    self.fail(f"after healing {key!r} is applied twice (indexes {seen[key]}, {index})")
                seen[key] = index
        if len(nd.hist) < nd.host.applied_index:
            self.fail(f"checker: node {nd.id}'s applied history has gaps")
        reported = {c for x in self.nodes.values() if x.up for c in x.host.reapply.dropped_sends}
        for chat, (index, node) in self.acked_chats.items():
            if chat in seen:
                continue
            if chat not in reported:
                self.fail(f"after healing, chat {chat!r} acknowledged by {node} at index {index} is lost")
            # the documented bound (docs/replication.md section 10): the winner could not
            # check it against its compacted history, and logged and counted the drop
            self.stats["lost_reported"] = self.stats.get("lost_reported", 0) + 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600, help="simulated ticks of faults")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--intensity", type=float, default=1.0, help="fault rate multiplier")
    ap.add_argument("--faults", default=",".join(DEFAULT_FAULTS),
                    help=f"comma-separated fault kinds from {','.join(ALL_FAULTS)}")
    ap.add_argument("--partitions", action="store_true",
                    help="same as adding 'partition' to --faults (split brain allowed)")
    ap.add_argument("--retain", type=int, default=None,
                    help="log entries retained behind the applied state (default 40; 2000 with "
                         "partitions in all mode)")
    ap.add_argument("--quorum", default="all", choices=["all", "majority"],
                    help="the replicas' quorum mode (majority: no split brain, checked strictly)")
    ap.add_argument("--max-down", type=int, default=None, help="most replicas down at once (N-1)")
    ap.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed")
    ap.add_argument("--trace", action="store_true", help="print every event")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.trace else logging.ERROR)
    faults = [f for f in a.faults.split(",") if f]
    bad = 0
    for s in range(a.seed, a.seed + a.seeds):
        sim = Simulation(s, a.n, steps=a.steps, faults=faults, partitions=a.partitions,
                         intensity=a.intensity, max_down=a.max_down, trace=a.trace, quorum=a.quorum,
                         retain=a.retain)
        try:
            sim.run()
            print(f"seed {s}: ok {sim.stats} final commit "
                  f"{max(nd.replica.commit_index for nd in sim.nodes.values())} digest {sim.digest()}")
        except InvariantViolation as exc:
            bad += 1
            print(f"seed {s}: FAILED {exc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
