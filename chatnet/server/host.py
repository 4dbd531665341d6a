"""The replica host: the one loop body that drives the replication core and the chat service.

``bin/chatserver`` and the deterministic simulator (:mod:`chatnet.replication.sim`) both run
this class unchanged; they differ only in what sits behind its two small interfaces:

* a :class:`Storage` (the SQLite :class:`~.store.Store`, or the simulator's ``SimDisk`` that
  can lose un-synced writes when a simulated machine crashes), and
* a :class:`Network` that carries peer messages (the real ``PeerTransport``, or the simulated
  network with its delays, losses and partitions).

Clocks and sockets stay outside: the caller feeds ticks, peer messages and decoded client
requests in, and takes client effects (bytes to write, connections to close) out.

One call of :meth:`ReplicaHost.cycle` is one loop iteration (etcd raft's Ready/Advance):

1. propose the commands the service queued (or hold them while the view is reconfigured);
2. drain every ``Ready`` the core has, applying committed commands to the in-memory state and
   advancing the core — nothing leaves the process yet;
3. write all of it to storage in **one** transaction (log entries with the commit index known,
   truncation, hard state, an installed snapshot, log compaction) — group commit; it is synced
   whenever it holds anything an election or an acknowledgement relies on.  The applied chat
   state itself stays in memory: now and then a *checkpoint* (the state serialized at the
   applied index, off the loop where the storage offers it) replaces the stored snapshot and
   lets the log below it go (:class:`Checkpoints`);
4. only then send the peer messages and release the clients' answers and live chat.

Because nothing is observable before step 3 completes, advancing the core before the write is
equivalent to advancing after it: a crash in between loses the whole iteration, and nobody
was told anything about it.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

from ..protocol.codec import STATUS_NOTE
from ..protocol.texts import T_BACKUP_KNOWS, T_BACKUP_UNKNOWN
from ..replication.core import PRIMARY, DurableState, Entry, HardState, Ready, Replica
from ..replication.membership import config_from_meta, config_to_meta, is_config_entry
from ..replication.messages import Append
from .events import HostEvents
from .members import MembershipRequests
from .passwords import InlineHasher
from .service import ChatService, Close, Reply, frame
from .state import ChatState, Mail, changed_state, decode_command, encode_command
from .status import serialized
from .storage import Batch, Loaded, Storage, StoreError

log = logging.getLogger(__name__)

SERVING, HOLDING, AWAY = "serving", "holding", "away"
MAX_READY_ROUNDS = 16  # Ready rounds folded into one transaction before the loop moves on
MAX_BATCHES_IN_FLIGHT = 8  # iterations waiting for the disk before new commands wait too


class Network(Protocol):
    def send(self, peer: int, msg: object) -> None:
        """Queue ``msg`` for ``peer`` (best effort: the core retransmits what matters)."""


class _NoPeers:
    def send(self, peer: int, msg: object) -> None:  # a lone replica has nobody to talk to
        pass


@dataclass
class _Output:
    """What one loop iteration may answer once batch number ``batch`` is durable: the newest
    batch holding an entry of the state it applied (:meth:`ReplicaHost._answer_barrier`),
    not necessarily the iteration's own."""

    batch: int
    effects: list
    unblocked: list
    applied: list  # (index, data) for the on_applied observer


@dataclass
class CycleResult:
    """What one loop iteration leaves for the front end to do."""

    effects: list  # Reply / Close for client connections, in order
    unblocked: list  # connections whose answer went out: their next request may be handled
    more: bool  # work is already pending: poll without sleeping


class ReplicaHost:
    """One replica's core, chat service and storage, advanced one loop iteration at a time."""

    def __init__(self, me: int, cluster, storage: Storage, *, network: Network | None = None,
                 addresses=None, failure_ticks: int = 10, rng: random.Random | None = None,
                 retain_entries: int = 10_000, naive: bool = False, limits=None,
                 new_token=None, hasher=None, clock=None, quorum: str = "all", config=None):
        self.me = me
        self.cluster = tuple(cluster)
        self.storage = storage
        self.network = network or _NoPeers()
        self._addresses = addresses  # the first configuration's addresses (None: ids only)
        loaded = storage.load()
        service_args = {"limits": limits} if limits is not None else {}
        if new_token is not None:
            service_args["new_token"] = new_token
        if clock is not None:  # the password back-off's clock (passwords.Throttle)
            service_args["clock"] = clock
        self.service = ChatService(loaded.state, **service_args)
        # Password hashing (extension 2) runs here, off the service: ThreadHasher in the real
        # server (off the loop thread), InlineHasher in tests and the simulator (deterministic).
        self.hasher = hasher or InlineHasher()
        self.applied_index = loaded.applied_index
        self.checkpoints = Checkpoints(self, loaded, retain_entries)
        self._count_chats = getattr(storage, "count_chats", None)  # metrics.TimedStorage
        # Benchmark baseline (--naive): one command per iteration (one fsync per command) and
        # one entry in flight per backup (stop-and-wait) instead of group commit + pipelining.
        self.naive = naive
        durable = durable_state(loaded)
        if durable.config is None:  # (a joined replica's first start: the configuration it joined)
            durable.config = config
        self.replica = Replica(
            me, self.cluster, durable, heartbeat_ticks=1, failure_ticks=failure_ticks,
            rng=rng or random.Random(), retain_entries=retain_entries, quorum=quorum,
            addresses=addresses, **({"max_batch": 1, "max_inflight": 1} if naive else {}),
        )
        self.admin = MembershipRequests(self)  # `chatserver members add/remove` waiting to commit
        self.mode = AWAY  # SERVING, HOLDING (primary reconfiguring its view) or AWAY
        self.reapply = Reapplier(self, loaded)  # a healed split brain's losing side, re-applied here
        self.replica.mark_handover = self.reapply.mark_refused
        # Only all mode with peers can split its brain: there, tokens carry an epoch (service.py,
        # _resume_refusal); what was applied before this start came from views up to my view.
        self._all_mode = quorum == "all"
        self.service.in_history = self.replica.holds_view
        if self._epochs:
            self.service.epoch = self.replica.view
        self._submitted = storage.durable  # number of the last batch handed to the storage
        self._outputs: deque[_Output] = deque()  # per iteration: what it answers once durable
        self._outbox: deque[tuple[int, list]] = deque()  # (batch, peer messages held until it is durable)
        self._entry_batches: deque[tuple[int, int]] = deque()  # (lowest index written, batch) in flight
        self._fence = storage.durable  # the last batch that wrote more than log entries (_ship)
        self._held: list = []  # commands waiting for the view to be re-established
        # Observer (index, data) -> None of entries applied *and durable* (called as their
        # iteration is released); the simulator's checker uses it.
        self.on_applied = None
        self._applied_now: list = []  # (index, data) applied this iteration, not yet durable
        self.events = HostEvents(self)  # operator events: logs and metrics (chatnet/server/events.py)

    # -- inputs --------------------------------------------------------------------------------
    def tick(self) -> None:
        self.replica.tick()
        self.service.tick()  # password checks whose back-off is over
        self.events.tick()

    def stalled(self) -> None:
        """The loop did not run for a long time (paused): rejoin as recovering."""
        self.replica.stalled()

    def step(self, peer: int, msg: object) -> None:
        self.replica.step(peer, msg)

    def peer_link(self, peer: int, up: bool) -> None:
        if up:
            self.replica.peer_connected(peer)
        else:
            self.replica.peer_disconnected(peer)

    def open(self, conn: int, address: str | None = None) -> None:
        self.service.connection_opened(conn, address)

    def close_connection(self, conn: int) -> None:
        self.service.connection_closed(conn)

    def receive(self, conn: int, event) -> list:
        """One decoded client request; returns the effects that need no commit (an error, a
        ``list``, a backup's redirect).  Answers of commands come out of :meth:`cycle`."""
        if not self.serves_clients:
            return self.behind_durability(self.redirect(conn))
        service = self.service
        service.receive(conn, event)
        if not service.effects:  # the usual case (a command, answered by a cycle): no new list
            return []
        return self.behind_durability(service.take_effects())

    @property
    def serves_clients(self) -> bool:
        """Whether client requests are taken here (a backup redirects them instead)."""
        return self.mode != AWAY

    @property
    def addresses(self):
        """Node id -> address by the configuration in force (None when the host was given no
        addresses, as in the simulator)."""
        if self._addresses is None:
            return None
        return dict(self.replica.config.members)

    def redirect_text(self) -> str:
        primary = self.replica.primary
        target = self.admin.handed_to if self.replica.role != "backup" else primary
        if target is not None and target != self.me and self._addresses is not None \
                and self.replica.config.address(target) is not None:
            return T_BACKUP_KNOWS.format(address=self.replica.config.address(target))
        return T_BACKUP_UNKNOWN

    def redirect(self, conn: int) -> list:
        """The effects that send a client to the primary (or away when none is known)."""
        return [Reply(conn, frame(STATUS_NOTE, self.redirect_text())), Close(conn)]

    # -- the loop iteration --------------------------------------------------------------------
    def cycle(self) -> CycleResult:
        """Propose, drain the core, persist once, send, and release answers (module docstring).

        Effects the service queued before this call (answers that need no commit, such as a
        ``list``) are included first, in order."""
        self._follow_role()
        self._hash_passwords()
        throttled = self._submitted - self.storage.durable >= MAX_BATCHES_IN_FLIGHT  # the disk is behind
        if not throttled:
            self._propose()
        batch, messages = Batch(), []
        rounds = 0
        while rounds < MAX_READY_ROUNDS:
            rounds += 1
            rd = self.replica.ready()
            if rd is None:
                rounds = 0
                break
            self._collect(rd, batch, messages)
        self._follow_role()
        self.reapply.persist(batch)
        sent = self.checkpoints.due(batch)  # (a snapshot sent to a peer leaves on the next pass)
        if batch.chats and self._count_chats is not None:
            self._count_chats(batch.chats)
        writes_more = bool(batch.meta or batch.truncate_after is not None or batch.snapshot is not None
                           or batch.handover is not None)  # a view, truncation, snapshot or handover
        late = self._ship(messages, batch, early=not writes_more and self.storage.durable >= self._fence
                          and len(self.replica.members) > 1)
        if batch:
            self._submit(batch, writes_more)
        if late:
            self._outbox.append((self._submitted, late))
        self.events.after_cycle()
        service = self.service
        applied, self._applied_now = self._applied_now, []
        self._outputs.append(_Output(self._answer_barrier(), service.take_effects(), service.take_unblocked(),
                                     applied))
        effects, unblocked = self.release()
        more = not throttled and bool(service.proposals or self._held and self.mode == SERVING) \
            or service.has_delivery_marks() and not throttled or rounds == MAX_READY_ROUNDS \
            or self.hasher.has_done() or sent
        return CycleResult(effects, unblocked, more)

    def _submit(self, batch: Batch, writes_more: bool) -> None:
        """Hand ``batch`` to the storage; note what answers and early sends must wait for."""
        batch.committed = self.applied_index
        self._submitted = self.storage.submit(batch)
        if batch.entries or batch.snapshot is not None:
            lowest = 0 if batch.snapshot is not None else batch.entries[0][0]
            self._entry_batches.append((lowest, self._submitted))
        if writes_more:
            self._fence = self._submitted

    def _ship(self, messages: list, batch: Batch, early: bool) -> list:
        """Send this iteration's ``Append``s now, and return the rest: they leave once
        ``batch`` (about to be submitted) is durable.

        A primary may ship its entries to the backups while it writes them itself (as Raft's
        leaders do, thesis section 10.2.1): an ``Append`` promises nothing, and an entry
        commits only once every member's *ack* -- sent after the member's own write -- and the
        primary's own write are in; answers wait for the latter (:meth:`_answer_barrier`).  The
        backups' write thus overlaps the primary's instead of following it.  Not while a
        batch that writes a view, a truncation, a snapshot or a handover is in flight
        (``early`` False: nobody hears of a view before it is durable here), nor while this
        replica is its view's only member (its commit index is then its own log, whose
        ``commit`` a learner would apply before it is durable), and never past a message
        still held for the same peer (the order of a link).

        They are flushed at once, before the batch goes to the storage thread: a ``send()``
        releases the GIL, and a storage thread just woken would take it for its own Python
        work there and then, holding up the loop in the middle of the send."""
        held, late, sent = {peer for _, out in self._outbox for peer, _ in out}, [], False
        send, durable_last = self.network.send, self._durable_last(batch)
        for peer, msg in messages:
            if early and peer not in held and type(msg) is Append:
                if msg.commit > durable_last:  # a commit index leaves only once durable here
                    msg = replace(msg, commit=durable_last)
                send(peer, msg)
                sent = True
            else:
                held.add(peer)
                late.append((peer, msg))
        if sent and (flush := getattr(self.network, "flush", None)) is not None:
            flush()
        return late

    def _durable_last(self, batch: Batch) -> int:
        """The end of this replica's log that is on its disk: below the first entry of the
        oldest batch still in flight, or of ``batch`` about to be submitted (batches land in
        order; truncations are fenced).

        An early ``Append`` carries at most this as its commit index.  The core counts its own
        log as written when it is handed to the storage, so its commit index may cover entries
        still in flight here; a backup told so applies them, and if this primary then crashed
        before writing them, it could come back and form a view with another replica without
        them (majority mode): an applied entry lost.  Capped, a commit index that leaves says
        what it said before early shipping: on every member's disk, this one's included."""
        durable = self.storage.durable
        for lowest, n in self._entry_batches:
            if n > durable:
                return lowest - 1
        return batch.entries[0][0] - 1 if batch.entries else self.replica.last_index

    def _answer_barrier(self) -> int:
        """The batch after whose write the applied state is durable here: the newest batch
        still in flight that wrote an entry at or below the applied index (or a snapshot).
        Answers wait for it, and no longer for a later batch of newer proposals."""
        batches, durable = self._entry_batches, self.storage.durable
        while batches and batches[0][1] <= durable:
            batches.popleft()
        applied = self.applied_index
        return max((n for lowest, n in batches if lowest <= applied), default=durable)

    def release(self) -> tuple[list, list]:
        """Send the held peer messages of every iteration whose batch is durable now, and hand
        back the client effects of every iteration whose answer barrier is, each in order
        (persist before send, answer after commit).  A failure of the storage writer stops
        the replica here, before anything else is acknowledged."""
        if self.storage.error is not None:
            raise StoreError(f"the store failed: {self.storage.error}") from self.storage.error
        durable, effects, unblocked = self.storage.durable, [], []
        outbox, outputs = self._outbox, self._outputs
        while outbox and outbox[0][0] <= durable:
            for peer, msg in outbox.popleft()[1]:
                self.network.send(peer, msg)
        while outputs and outputs[0].batch <= durable:
            out = outputs.popleft()
            for index, data in out.applied:
                self.on_applied(index, data)
            effects += out.effects
            unblocked += out.unblocked
        return effects, unblocked

    def behind_durability(self, effects: list) -> list:
        """Effects produced outside a cycle (an answer that needs no commit, chat pumped from
        a mailbox): returned at once when nothing is waiting for the disk, else queued behind
        the last iteration still in flight, so nothing that state is exposed before it is
        durable."""
        if not self._outputs:
            return effects
        self._outputs[-1].effects.extend(effects)
        return []

    def durable_unreleased(self) -> list:
        """(index, data) of entries applied in iterations whose batch reached the disk but whose
        outputs were never released: what a crash at this instant leaves on disk unseen (the
        simulator's checker counts them as applied)."""
        durable = self.storage.durable
        applied = [a for out in self._outputs if out.batch <= durable for a in out.applied]
        if durable > self._submitted:  # this iteration's batch landed, then submit() died
            applied += self._applied_now
        return applied

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every submitted batch is durable (shutdown); then release() hands out
        what they held back."""
        flush = getattr(self.storage, "flush", None)
        if flush is not None:
            flush(timeout)

    @property
    def waiting_for_disk(self) -> int:
        """Iterations whose answers or messages wait for a batch to be durable."""
        return max(len(self._outputs), len(self._outbox))

    def _hash_passwords(self) -> None:
        """Hand finished password jobs back to the service, then start the ones it queued.
        Every cycle asks, and almost never is there a job: looked at first, so that a cycle
        takes no lock and builds no list for nothing."""
        if self.hasher.has_done():
            for job in self.hasher.take_done():
                self.service.hashed(job)
        if self.service.hash_jobs:
            for job in self.service.take_hash_jobs():
                self.hasher.submit(job)

    def _propose(self) -> None:
        replica, service = self.replica, self.service
        proposals, self._held = self._held + service.take_proposals(), []
        if self.naive and len(proposals) > 1:
            proposals, self._held = proposals[:1], proposals[1:]
        if replica.serving:
            self.reapply.propose()
            view = replica.view  # (proposing changes no view)
            for cmd, conn_id in proposals:
                index = replica.propose(encode_command(cmd))
                service.bind(index, cmd, conn_id, view)
        elif self.mode == HOLDING:
            self._held = proposals  # proposed once the view is re-established
        elif proposals:
            service.abandon_proposals()  # nobody serves here: none of them will ever apply

    def _collect(self, rd: Ready, batch: Batch, messages: list) -> None:
        """Fold one Ready into this iteration's batch and advance the core past it."""
        replica, service = self.replica, self.service
        if rd.snapshot is not None:
            state = ChatState.from_snapshot(rd.snapshot.data)
            service.replace_state(state)
            self.applied_index = rd.snapshot.index
            batch.snapshot = (rd.snapshot.index, rd.snapshot.view, rd.snapshot.data)  # bytes, not the live state
            batch.entries.clear()  # the snapshot replaces the whole log
            batch.checkpoint = None  # and the whole state
            batch.truncate_after = None
            batch.compact_upto = None
            self.checkpoints.installed(rd.snapshot.index, len(rd.snapshot.data))
            batch.meta.update(snapshot_index=rd.snapshot.index, snapshot_view=rd.snapshot.view,
                              view_runs=runs_meta(rd.snapshot.index, rd.snapshot.runs))
            batch.sync = True
            self.events.snapshot_installed(rd.snapshot.index, len(rd.snapshot.data))
        if rd.truncate_after is not None:
            batch.truncate_after = rd.truncate_after if batch.truncate_after is None \
                else min(batch.truncate_after, rd.truncate_after)
            batch.entries = [e for e in batch.entries if e[0] <= rd.truncate_after]
        batch.entries.extend(rd.entries)  # an Entry is the tuple (index, view, data)
        if rd.committed and self._epochs:
            service.set_epoch(replica.view)  # committed in this view: sessions learn it first
        for entry in rd.committed:
            if entry.index <= self.applied_index:
                continue  # already in the applied state (replayed after a snapshot)
            if is_config_entry(entry.data):  # the core's, not the chat's: a no-op in order
                service.apply(entry.index, ("delivered", []), entry.view)
                self.admin.committed(entry)
            else:
                result = self.reapply.apply(entry)
                if self._count_chats is not None and isinstance(result, Mail):  # (only the metrics
                    batch.chats += 1                                              # read the count)
            self.applied_index = entry.index
            self.checkpoints.applied(len(entry.data))
            if self.on_applied is not None:
                self._applied_now.append((entry.index, entry.data))
        if rd.hard_state is not None:
            batch.meta.update(hard_state_meta(rd.hard_state))
        batch.sync |= bool(rd.hard_state or rd.entries or rd.truncate_after is not None)
        messages.extend(rd.messages)
        if rd.reapply:
            self.reapply.take(rd.reapply)
        if rd.handover is not None:  # with the truncation or snapshot that drops them
            batch.handover = [(e.index, e.view, e.data) for e in rd.handover]
            batch.sync = True
        self.checkpoints.requested(rd.snapshot_requests)  # serialized off the loop, sent later
        replica.advance(rd)
        compact = replica.suggested_compaction()
        if compact is not None:  # never below the stored snapshot: start-up replays from it
            compact = min(compact, self.applied_index, self.checkpoints.stored_index)
        if compact is not None and compact > replica.snapshot_index:
            batch.compact_upto = compact
            replica.compact(compact)
            batch.meta.update(snapshot_index=replica.snapshot_index,
                              snapshot_view=replica.entry_view(replica.snapshot_index) or 0,
                              view_runs=runs_meta(replica.snapshot_index, replica.view_runs))

    @property
    def _epochs(self) -> bool:
        """Tokens carry epochs where a split brain is possible: all mode, more than one
        replica in the configuration (which can grow at runtime)."""
        return self._all_mode and self.replica.n > 1

    def _follow_role(self) -> None:
        """Follow the core's role: serve, hold clients through a reconfiguration, or send them away.

        A primary that removes a failed member or re-adds a caught-up one runs a short view
        change of its own, and a new primary syncs its members before it serves; meanwhile
        clients wait (their commands are held, not lost) rather than being disconnected.  Any
        other loss of the primary role sends every client to the primary (or away, when none
        is known) and abandons what was pending: those commands were never acknowledged.
        """
        mode = self._mode_now()
        if mode == self.mode:
            return
        previous, self.mode = self.mode, mode
        replica = self.replica
        if mode == SERVING:
            log.info("serving clients as primary of view %d (members %s)", replica.view,
                     ",".join(str(self._name(m)) for m in replica.members),
                     extra={"event": "serving", "view": replica.view,
                            "members": [str(self._name(m)) for m in replica.members]})
        elif mode == HOLDING:
            log.info("view change in progress (from view %d); clients wait", replica.view,
                     extra={"event": "holding", "view": replica.view})
        elif previous != AWAY or self.service.sessions:
            log.warning("not serving clients (role %s, view %d)", replica.role, replica.view,
                        extra={"event": "not_serving", "role": replica.role, "view": replica.view})
            self._held = []
            self.reapply.lost_primacy()
            self.admin.lost_primacy()
            self.service.abandon_proposals()
            for conn in list(self.service.sessions):
                self.service.effects.extend(self.redirect(conn))

    def _mode_now(self) -> str:
        replica = self.replica
        if replica.serving:
            return SERVING
        if replica.role == PRIMARY or (  # established, syncing its members before serving
                replica.role == "electing" and replica.primary == self.me
                and (campaign := replica.status().get("campaign")) is not None
                and replica.leader_of(campaign) == self.me):
            return HOLDING
        return AWAY

    def _name(self, member: int) -> object:
        addresses = self.addresses
        return addresses.get(member, member) if addresses else member  # (removed since: its id)

    def status(self) -> dict:
        status = self.replica.status()
        status.update(accounts=len(self.service.state.accounts), applied=self.applied_index,
                      passwords=self.service.password_stats(), reapply=dict(self.reapply.counts))
        return status

    def close(self) -> None:
        """Stop: a last checkpoint (so the next start replays little), then close the storage."""
        self.hasher.close()
        try:
            self.checkpoints.final()
        except StoreError as exc:  # the store failed: the next start replays the log instead
            log.error("no final checkpoint: %s", exc)
        finally:
            self.storage.close()


class InlineSnapshots:
    """Serializes the state at once, on the loop (the simulator, tests, ``--naive``)."""

    busy = False

    def __init__(self) -> None:
        self._done: tuple | None = None

    def start(self, state: ChatState, tag: tuple) -> None:
        self._done = serialized(state, tag)

    def take(self) -> tuple | None:
        done, self._done = self._done, None
        return done

    def close(self) -> None:
        self._done = None


class Checkpoints:
    """Every serialization of the in-memory chat state: checkpoints into the storage, snapshots
    for lagging peers and the status digest (issue 12), one at a time, never on the loop where
    the storage offers otherwise.

    A checkpoint is due once at least ``every`` entries (``--log-retain``) were applied since
    the stored snapshot *and* their commands add up to at least that snapshot's size: the log
    start-up must replay is then bounded by about twice the state, and serializing costs about
    as much as the log writes did, so a big state is snapshotted less often than a small one.
    The serialization runs where the storage offers (``storage.snapshotter``: a forked child in
    the real server, so the loop pauses only for the fork), else inline.  The result goes into
    a later batch (``Batch.checkpoint``), written after the entries it covers.  A snapshot
    installed meanwhile supersedes a serialization still being made (the epoch changed).

    A maker (``storage.snapshotter``, :class:`InlineSnapshots`) is ``busy`` from ``start`` until
    its result is taken.  Peers the core wants a snapshot sent to (``Ready.snapshot_requests``) wait for the next
    serialization to finish -- or share the one already running -- and get its bytes with the
    index and view it was taken at (``Replica.send_snapshot``).  The core continues them from
    that index, so the log after it must still be there: it is, as the log is never compacted
    past the stored snapshot, which no serialization in flight precedes (one at a time, and
    only a finished one moves it), and the core keeps the log after a transfer in progress.
    Otherwise the peer would need yet another snapshot once this one lands, and could chase
    the log for ever."""

    def __init__(self, host: "ReplicaHost", loaded: Loaded, every: int) -> None:
        self.host = host
        self.every = max(1, every)
        self.stored_index = loaded.state_index  # the latest snapshot handed to the storage
        self.stored_bytes = loaded.state_bytes
        self.since_entries = loaded.applied_index - loaded.state_index  # applied after it
        self.since_bytes = 0
        self.maker = getattr(host.storage, "snapshotter", None) or InlineSnapshots()
        self.epoch = 0
        self.written = 0  # checkpoints handed to the storage (status)
        self.peers: list[int] = []  # waiting for the next serialization to be sent to them
        self.digest_wanted = False
        self.digest = ("", -1)  # (status digest, applied index) of the latest serialization

    def applied(self, size: int) -> None:
        self.since_entries += 1
        self.since_bytes += size

    def installed(self, index: int, size: int) -> None:
        """A snapshot from the primary replaced the state (and is written as the stored one)."""
        self.stored_index, self.stored_bytes = index, size
        self.since_entries = self.since_bytes = 0
        self.epoch += 1

    def requested(self, peers) -> None:
        """The core asks for a snapshot to send to each of ``peers``."""
        self.peers += [peer for peer in peers if peer not in self.peers]

    def due(self, batch: Batch) -> bool:
        """Start a serialization if one is wanted; hand a finished one to the peers waiting,
        the status digest and, if it was a due checkpoint, ``batch``.  True when something
        was sent to a peer (its first chunks leave with the next pass)."""
        self._start(batch)
        done = self.maker.take()
        if done is None:  # (running, or a child that failed: the peers wait for the next one)
            return False
        (index, view, epoch, checkpoint), data, digest = done
        if epoch != self.epoch:
            return False  # of a state an installed snapshot replaced
        self.digest = (digest, index)
        sent = self._send(index, view, data)
        if checkpoint and index > self.stored_index and batch.snapshot is None:
            batch.checkpoint = (index, view or 0, data)
            self.stored_index, self.stored_bytes = index, len(data)
            self.written += 1
            log.info("checkpoint of the chat state at index %d (%d bytes)", index, len(data),
                     extra={"event": "checkpoint", "index": index, "bytes": len(data)})
        return sent

    def _start(self, batch: Batch) -> None:
        host = self.host
        if host.replica.role != PRIMARY:
            self.peers = []  # only a primary sends snapshots (it asks again once primary)
        if self.maker.busy:
            return
        checkpoint = batch.snapshot is None and self.since_entries >= self.every \
            and self.since_bytes >= self.stored_bytes
        if not (checkpoint or self.peers or self.digest_wanted):
            return
        if checkpoint:
            self.since_entries = self.since_bytes = 0
        self.digest_wanted = False
        index = host.applied_index
        self.maker.start(host.service.state, (index, host.replica.entry_view(index), self.epoch, checkpoint))

    def _send(self, index: int, view: int, data: bytes) -> bool:
        peers, self.peers = self.peers, []
        for peer in peers:
            self.host.replica.send_snapshot(peer, index, view, data)
            self.host.events.snapshot_sent(peer, index, len(data))
        return bool(peers)

    def final(self) -> None:
        """At a clean stop: the state at the applied index becomes the stored snapshot, so the
        next start replays nothing (skipped when the storage failed)."""
        self.maker.close()
        host = self.host
        if host.storage.error is not None or host.applied_index <= self.stored_index:
            return
        host.flush()  # every entry up to the applied index is on disk before the snapshot
        view = host.replica.entry_view(host.applied_index) or 0
        host.storage.submit(Batch(checkpoint=(host.applied_index, view, host.service.state.to_snapshot()),
                                  sync=True))
        host.flush()


class Reapplier:
    """Commands of a healed split brain's losing side, applied again on the winning side
    (all mode; docs/replication.md section 10).

    The losing replicas hand the winner's primary the log entries it lacks (``Reapply``);
    each is proposed again as ``("reapply", view, index, command)``, its origin being its
    original (view, index).  An origin already in the log (another loser handed the same
    entry, or a handover was resent) or an entry the winner holds itself is skipped; one the
    winner cannot check (inside its compacted prefix) and delivery marks (sequence numbers
    of the other side's mailboxes) are dropped; a re-applied command that no longer applies
    (a name taken meanwhile, an unknown account, a request id already used) changes
    nothing.  Every such case is logged and counted in ``status()["reapply"]``.  Once every
    entry of a handover is resolved -- committed again, or skipped or dropped -- the loser
    is told (``reapply_done``) and may drop its copies."""

    def __init__(self, host: "ReplicaHost", loaded: Loaded) -> None:
        self.host = host
        # (Which origins were applied is part of the chat state, ChatState.origins: memory
        # here would go stale when a snapshot replaces the state.)
        self.proposed: set[tuple[int, int]] = set()  # origins proposed while serving (or queued)
        self.queue: list[tuple] = []                 # commands to propose as primary
        self.waiting: dict[int, tuple[int, set]] = {}   # loser -> (upto, origins not yet applied)
        self.counts = {"reapplied": 0, "skipped": 0, "dropped": 0, "refused": 0, "no_effect": 0}
        self.dropped_sends: list[tuple] = []
        saved = loaded.meta.get("reapply") or {}  # the report of earlier runs (persist)
        self.counts.update(saved.get("counts", {}))
        self.dropped_sends += [tuple(send) for send in saved.get("dropped_sends", ())]
        self._persisted = (dict(self.counts), len(self.dropped_sends))

    def take(self, handovers: list) -> None:
        """The primary's core received handovers: queue what must be proposed again."""
        in_log = self._origins_in_log()
        for peer, upto, entries in handovers:
            pending = set()
            for e in entries:
                origin, cmd, verdict = self._classify(e, in_log)
                if verdict == "skip":
                    self.counts["skipped"] += 1   # a duplicate, or not divergent after all
                elif verdict == "wait":
                    pending.add(origin)           # in my log, not committed yet: wait for it
                elif verdict == "refused":
                    self._report("refused", origin, cmd, "refused where it first ran (its client was told so)")
                elif verdict == "drop":
                    self._report("dropped", origin, cmd, "delivery marks are the other side's"
                                 if cmd[0] == "delivered" else "inside my compacted log, cannot be checked")
                else:
                    self.proposed.add(origin)
                    self.queue.append(("reapply", origin[0], origin[1], cmd))
                    pending.add(origin)
            old_upto, old = self.waiting.get(peer, (0, set()))
            self.waiting[peer] = (max(upto, old_upto), pending | old)
        self._acknowledge()

    def _classify(self, e, in_log: set) -> tuple:
        """(origin, command, verdict) of one handed-over entry: "skip" (my history has it),
        "wait" (proposed, not yet committed), "drop" (cannot be checked), or "propose".

        An entry the loser re-applied itself keeps its origin, and my history has it if it
        holds the wrapper at the loser's position, the origin in its state, or the original
        entry at the origin's position (the loser had received it by re-application, I in
        the ordinary way).  Inside my compacted prefix positions are checked by the entry
        views the core keeps for it (``Replica.history_view``, the latest runs); below what
        they reach a position cannot be checked: the loser's position is then dropped and
        reported; an origin there is not checked (the command was re-applied on the loser's
        side because its winner lacked it)."""
        replica, state = self.host.replica, self.host.service.state
        if is_config_entry(e.data):  # a membership change: the winner's own configuration rules
            return (e.view, e.index), ("config",), "skip"
        cmd = decode_command(e.data)
        refused = cmd[0] == "refused"
        if refused:
            cmd = cmd[1]
        origin = (e.view, e.index)
        if cmd[0] == "reapply":
            origin, cmd = (cmd[1], cmd[2]), cmd[3]
        seen = replica.history_view  # inside my compacted prefix too, as far as its runs reach
        if state.has_origin(*origin) or seen(e.index) == e.view or seen(origin[1]) == origin[0]:
            return origin, cmd, "skip"
        if refused:
            return origin, cmd, "refused"
        if origin in self.proposed or origin in in_log:
            return origin, cmd, "wait"
        if cmd[0] == "delivered" or e.index <= replica.snapshot_index and seen(e.index) is None:
            return origin, cmd, "drop"
        return origin, cmd, "propose"

    def persist(self, batch) -> None:
        """Write the report (counts, dropped sends) with the iteration that changed it, in the
        store's meta, so that it survives a restart of the replica that made it.  Copies: the
        storage thread may write the batch while the loop goes on."""
        now = (dict(self.counts), len(self.dropped_sends))
        if now != self._persisted:
            self._persisted = now
            batch.meta["reapply"] = {"counts": now[0], "dropped_sends": list(self.dropped_sends)}

    def mark_refused(self, entry):
        """An entry this replica hands over after losing a split brain (the core's hook): a
        command refused when it was applied here goes as ``("refused", command)``, so the
        winner reports it instead of applying it where it would succeed (a send told "no such
        recipient" here, whose recipient was created on the other side).  The chat state
        remembers the log indexes it refused (``ChatState.refused``, in its snapshots, so across
        a restart): my log holds, at each of them, the entry my state refused."""
        if entry.index not in self.host.service.state.refused:
            return entry
        return Entry(entry.index, entry.view, encode_command(("refused", decode_command(entry.data))))

    def _origins_in_log(self) -> set:
        """Origins of re-applied commands in my log beyond what I applied."""
        replica, found = self.host.replica, set()
        for index in range(self.host.applied_index + 1, replica.last_index + 1):
            e = replica.entry(index)
            cmd = decode_command(e.data) if e is not None and not is_config_entry(e.data) else ("",)
            if cmd[0] == "reapply":
                found.add((cmd[1], cmd[2]))
        return found

    def propose(self) -> None:
        """Serving: propose the queued commands (before the clients' new ones)."""
        replica = self.host.replica
        for cmd in self.queue:
            replica.propose(encode_command(cmd))
        self.queue = []

    def apply(self, entry) -> object:
        """Apply one committed entry (a re-applied command unwrapped); its result."""
        cmd = decode_command(entry.data)
        if cmd[0] != "reapply":
            return self.host.service.apply(entry.index, cmd, entry.view)
        origin, cmd = (cmd[1], cmd[2]), cmd[3]
        if not self.host.service.state.note_origin(*origin):  # the same on every replica
            # proposed twice (a primary changed meanwhile): applied once
            self.counts["skipped"] += 1
            result = self.host.service.apply(entry.index, ("delivered", []), entry.view)  # a no-op, in order
        else:
            result = self.host.service.apply(entry.index, cmd, entry.view)
            self.counts["reapplied"] += 1
            if not changed_state(result):  # (delivery marks are never re-applied: _classify)
                self._report("no_effect", origin, cmd, "no longer applies")
        for upto, pending in self.waiting.values():
            pending.discard(origin)
        self._acknowledge()
        return result

    def _acknowledge(self) -> None:
        for peer, (upto, pending) in list(self.waiting.items()):
            if not pending:
                del self.waiting[peer]
                self.host.replica.reapply_done(peer, upto)

    def lost_primacy(self) -> None:
        """No longer serving: the losers hand their entries to the next primary."""
        self.queue, self.waiting, self.proposed = [], {}, set()

    def _report(self, what: str, origin: tuple, cmd: tuple, why: str) -> None:
        self.counts[what] += 1
        if what == "dropped" and cmd[0] == "send" and len(self.dropped_sends) < 10_000:
            self.dropped_sends.append(tuple(cmd[1:4]))  # (sender, recipient, text), for checkers
        log.warning("split brain healed: %s command %s of view %d index %d: %s",
                    "re-applied" if what == "no_effect" else "dropped", cmd[0], origin[0], origin[1], why,
                    extra={"event": "reapply_" + what, "view": origin[0], "index": origin[1],
                           "command": cmd[0]})


def hard_state_meta(hs: HardState) -> dict:
    meta = {"view": hs.view, "primary": hs.primary, "members": list(hs.members), "promised": hs.promised,
            "promised_to": hs.promised_to}
    if hs.config is not None:
        meta["config"] = config_to_meta(hs.config)
    meta["degraded_from"] = hs.degraded_from
    return meta


def runs_meta(upto: int, runs) -> dict:
    """The store's meta ``view_runs``: the core's runs of entry views up to the snapshot index
    ``upto``, written in the same transaction as the snapshot or compaction that made them."""
    return {"upto": upto, "runs": [list(run) for run in runs]}


def durable_state(loaded: Loaded) -> DurableState:
    """The replication core's view of what the storage holds."""
    meta = loaded.meta
    log_entries = [Entry(idx, view, bytes(data)) for idx, view, data in loaded.log]
    snapshot_index = meta.get("snapshot_index", 0)
    if log_entries:
        snapshot_index = log_entries[0].index - 1
    else:
        snapshot_index = max(snapshot_index, loaded.applied_index)
    return DurableState(
        view=meta.get("view", 0),
        primary=meta.get("primary"),
        members=tuple(meta.get("members", ())),
        snapshot_index=snapshot_index,
        snapshot_view=meta.get("snapshot_view", 0),
        log=log_entries,
        applied_index=loaded.applied_index,
        promised=meta.get("promised"),
        handover=[Entry(idx, view, bytes(data)) for idx, view, data in loaded.handover],
        promised_to=meta.get("promised_to"),
        config=config_from_meta(meta.get("config")),
        view_runs=_stored_runs(meta.get("view_runs"), snapshot_index),
        degraded_from=meta.get("degraded_from"),
    )


def _stored_runs(stored, snapshot_index: int) -> tuple:
    """The stored runs if they describe this snapshot point (the core checks the rest), else
    none (a store that predates them, or whose log base moved without them: unknown)."""
    if isinstance(stored, dict) and stored.get("upto") == snapshot_index:
        runs = stored.get("runs")
        return tuple(runs) if isinstance(runs, list) else ()
    return ()
