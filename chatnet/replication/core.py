"""The replication core: a pure primary-backup state machine (Viewstamped-Replication flavour).

No sockets, no clock, no SQLite, no threads; randomness only through the injected
``random.Random`` (used for nothing but the incarnation number of the failure detector).
Everything that affects replication state lives in :class:`Replica`; the host (reactor +
store, or the simulator in :mod:`chatnet.replication.sim`) feeds it inputs and performs
the effects it asks for.  docs/replication.md argues the protocol; this header is the API.

API
---
::

    Replica(me, cluster, durable, *, heartbeat_ticks=1, failure_ticks=10, rng=None,
            max_batch=256, max_inflight=4096, retain_entries=10_000,
            snapshot_chunk=SNAPSHOT_CHUNK, snapshot_window=SNAPSHOT_WINDOW)
    # inputs
    r.tick() -> None                       # every heartbeat_interval / heartbeat_ticks
    r.stalled() -> None                    # host's loop stalled (see docs): act as restarted
    r.step(sender: int, msg) -> None       # an authenticated peer message
    r.peer_connected(peer) / r.peer_disconnected(peer) -> None   # transport hints only
    r.propose(data: bytes) -> int | None   # serving primary: index of the new entry
    r.send_snapshot(peer, index, view, data) -> None   # answer to Ready.snapshot_requests
                                           # (sent in chunks; Ready.snapshot only when whole)
    r.compact(upto_index) -> None          # forget entries <= upto (already applied)
    r.suggested_compaction() -> int | None # retention policy: where to compact, if anywhere
    # outputs
    r.ready() -> Ready | None
    r.advance(ready) -> None
    # read-only
    r.role, r.view, r.promised, r.primary, r.members, r.last_index, r.commit_index,
    r.applied_index, r.serving, r.status() -> dict, r.entry_view(index)

Host contract (etcd-raft style; see docs/replication.md "Host contract")::

    while (rd := r.ready()) is not None:
        with store.transaction():              # ONE durable (fsynced) transaction:
            if rd.hard_state: store.save_hard_state(rd.hard_state)
            if rd.snapshot:   store.install_snapshot(rd.snapshot)   # replace state, drop log
            if rd.truncate_after is not None: store.delete_log_after(rd.truncate_after)
            store.append_log(rd.entries)
            if rd.handover is not None: store.replace_handover(rd.handover)   # split brain
        for peer, msg in rd.messages: send(peer, msg)               # only after the commit
        for e in rd.committed:                 # apply in order; the applied index is
            with store.transaction():          # persisted with the state changes
                store.apply(e); store.set_applied_index(e.index)
            answer_client_if_pending(e)        # match on (index, view) of the proposal
        for peer in rd.snapshot_requests:      # (or later, from a copy serialized off the loop)
            r.send_snapshot(peer, store.applied_index, r.entry_view(..), store.dump())
        r.advance(rd)

No other call may come between ``ready()`` and ``advance()``.

Protocol summary
----------------
A *view* is (number, primary, members); the primary of view ``v`` is always
``cluster[v % N]``, so two candidates never compete for the same view number.
Each replica persists ``HardState(view, primary, members, promised)``: the last view it
established (synced into) and the highest view number it promised.  A write commits when it
is durable on **every** member of the primary's view (min of match indexes).  A view change
is run by one candidate that asks every member of its view it does not suspect; each must
promise (persist ``promised``) -- after which it refuses the older view, which is the fence
that stops an old primary -- and the candidate must be at least as up to date as each voter
by (established view, last entry view, last index).  Members that later suspect nothing
stay; suspected ones are left out.  The new primary serves only after every member's log
matches its own up to its last index at view start.  A replica that (re)starts, or was
stalled, is *recovering*: it serves, campaigns and proposes nothing until either a primary
of a view it belongs to has synced it, or it has heard from every member of the newest
established view anybody it reaches knows of, and it is itself a member of that view with
that view established, or -- brand-new (never promised, no entry) -- it reaches a majority of
brand-new replicas while every other replica stays silent for a failure timeout.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field
from typing import Sequence

from .membership import (
    Config,
    MembershipError,
    config_from_bytes,
    config_to_bytes,
    decode_config,
    encode_config,
    is_config_entry,
)
from .messages import (
    Append,
    AppendResp,
    Entry,
    Heartbeat,
    InstallSnapshot,
    Reapply,
    ReapplyAck,
    SnapshotAck,
    TakeOver,
    ViewChange,
    Vote,
)

__all__ = ["Replica", "Ready", "DurableState", "HardState", "Snapshot", "Entry", "Config",
           "MembershipError",
           "QUORUM_ALL", "QUORUM_MAJORITY", "QUORUMS",
           "PRIMARY", "BACKUP", "ELECTING", "RECOVERING", "STATUS_CODES",
           "SNAPSHOT_CHUNK", "SNAPSHOT_WINDOW", "VIEW_RUNS"]

# A snapshot is sent in chunks of at most SNAPSHOT_CHUNK bytes, with at most SNAPSHOT_WINDOW
# chunks beyond what the receiver acknowledged in flight (4 MiB per lagging peer): a state of
# any size fits the frame limit, and a link never has to buffer a whole state.  Small enough
# that a chunk crosses even a slow link well within half a failure timeout (the transfer
# counts as stuck after that long without progress).  Read at construction, so a test can
# shrink them for every replica it makes.
SNAPSHOT_CHUNK = 256 * 1024
SNAPSHOT_WINDOW = 16

# The entry views of the compacted prefix are kept as the latest VIEW_RUNS runs of (first
# index, view) -- views only grow along a log, so a run per view the history held -- so that a
# healed split brain's handed-over entries can be checked there too (docs/replication.md
# section 10, "The bound").  Below the oldest run a compacted entry's view is unknown.
VIEW_RUNS = 64

PRIMARY, BACKUP, ELECTING, RECOVERING = "primary", "backup", "electing", "recovering"
# Quorum modes (docs/replication.md section 10): "all" forms a view of whoever is alive (N-1
# crashes tolerated, a partition can split the cluster); "majority" forms a view only with a
# majority of the cluster as members ((N-1)/2 crashes tolerated, never two acknowledging sides).
QUORUM_ALL, QUORUM_MAJORITY = "all", "majority"
QUORUMS = (QUORUM_ALL, QUORUM_MAJORITY)
STATUS_CODES = {PRIMARY: 0, BACKUP: 1, ELECTING: 2, RECOVERING: 3}
# View numbers (docs/replication.md section 14): a cluster that never changed members numbers
# its views as it always did (the candidate of view v is the first configuration's v % N); from
# VIEWS_BY_ID on -- every view after the first membership change -- the candidate of view v is
# node v % MAX_NODES, so node ids stay below MAX_NODES.
VIEWS_BY_ID = 1 << 20
MAX_NODES = 1 << 10
_CODE_STATUS = {v: k for k, v in STATUS_CODES.items()}


# All mode, in a view without every configured replica: the log is kept from the split point
# (HardState.degraded_from) for at most this many times ``retain_entries`` (10,000 by default:
# a million entries, some 100-200 MB of log in memory and on disk), then compacted as usual.
DEGRADED_RETAIN_FACTOR = 100


@dataclass(frozen=True)
class HardState:
    """What must be persisted (with the log changes of the same Ready) before any message
    of that Ready is sent."""
    view: int                      # last established view
    primary: int | None            # its primary (None before the first view)
    members: tuple[int, ...]       # its members
    promised: int                  # highest view number promised (>= view)
    # to whom: a replica grants each view number to one candidate only, ever -- so a view has
    # one primary even while replicas disagree about the configuration (section 14)
    promised_to: int | None = None
    # the newest *committed* configuration (the log holds any newer one)
    config: Config | None = None
    # all mode: first entry I may have to hand over after a split brain -- set on entering a
    # view without the whole configuration, cleared in a full view with nothing left to hand
    # over; no compaction reaches it (docs/replication.md section 10, "Compaction")
    degraded_from: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """Applied state up to ``index`` (entry ``index`` had view ``view``); data opaque."""
    index: int
    view: int
    data: bytes
    runs: tuple = ()   # entry views up to ``index``: ((first index, view), ...), the latest runs


def extend_runs(runs, entries) -> tuple:
    """``runs`` ((first index, view), ...) followed by the (index, view) pairs of the
    contiguous ``entries`` after them, merged by view, the latest VIEW_RUNS runs kept."""
    out = list(runs)
    for index, view in entries:
        if not out or out[-1][1] != view:
            out.append((index, view))
    return tuple(out[-VIEW_RUNS:])


def run_view(runs, index: int, upto: int) -> int | None:
    """View of the entry at ``index`` by ``runs``, which cover up to ``upto`` (None: unknown)."""
    if not runs or index < runs[0][0] or index > upto:
        return None
    return runs[bisect.bisect_right(runs, index, key=lambda r: r[0]) - 1][1]


def checked_runs(runs, upto: int, view: int) -> tuple:
    """``runs`` if they can describe a history whose entry ``upto`` has ``view`` (first indexes
    and views strictly growing, at most VIEW_RUNS, the last run holding ``upto``), else only
    what is known for sure: that entry.  Bad input (a peer's, a store's) never crashes."""
    try:
        runs = tuple((int(f), int(v)) for f, v in runs)
    except (TypeError, ValueError):
        runs = ()
    ok = (0 < len(runs) <= VIEW_RUNS and runs[0][0] >= 1 and runs[0][1] >= 0
          and runs[-1][0] <= upto and runs[-1][1] == view
          and all(a[0] < b[0] and a[1] < b[1] for a, b in zip(runs, runs[1:])))
    if ok:
        return runs
    return ((upto, view),) if upto > 0 else ()


@dataclass
class DurableState:
    """What the host loaded from its store at start-up."""
    view: int = 0
    primary: int | None = None
    members: tuple[int, ...] = ()
    snapshot_index: int = 0
    snapshot_view: int = 0
    log: list[Entry] = field(default_factory=list)
    applied_index: int = 0
    promised: int | None = None    # None = same as view (older stores)
    # entries a healed split brain's losing side still owes the winner (Ready.handover)
    handover: list[Entry] = field(default_factory=list)
    promised_to: int | None = None   # None: older stores (the view's rule names the candidate)
    config: Config | None = None     # None: the cluster's first configuration (--peers)
    view_runs: tuple = ()            # entry views up to snapshot_index (Snapshot.runs); () unknown
    degraded_from: int | None = None  # HardState.degraded_from; None: unset (also older stores)

    @classmethod
    def fresh(cls) -> "DurableState":
        """A store that has never been written (first ever start)."""
        return cls()


@dataclass
class Ready:
    hard_state: HardState | None
    snapshot: Snapshot | None
    truncate_after: int | None
    entries: list[Entry]
    messages: list[tuple[int, object]]
    committed: list[Entry]
    snapshot_requests: list[int]
    # internal bookkeeping for advance()
    _last_index: int = 0
    _applied_to: int = 0
    # Entries a healed split brain's losing replicas handed over (primary only): the host
    # proposes them again and calls ``reapply_done(peer, upto)`` once they are resolved.
    reapply: list = field(default_factory=list)   # [(peer, upto, entries)]
    # Not None: the entries this losing replica still owes a winning primary are now exactly
    # these (empty: none).  Persisted in the same transaction as the truncation or snapshot
    # that drops them from the log, so a crash before the winner's ReapplyAck loses nothing.
    handover: tuple | None = None

    def __bool__(self) -> bool:  # a Ready is never empty
        return True


@dataclass
class _SnapOut:
    """Primary side of one snapshot transfer to one peer."""
    snap_id: int
    index: int
    view: int                  # view of the entry at ``index``
    data: memoryview
    force: bool
    config: bytes = b""        # the configuration in force at ``index``
    runs: tuple = ()           # entry views up to ``index``, flat (InstallSnapshot.runs)
    sent: int = 0              # bytes sent so far (from ``acked`` again after a rewind)
    acked: int = 0             # bytes the receiver holds in order, as it last told us
    started: bool = False      # a chunk has been sent since the last (re)wind
    quiet_since: int = 0       # tick of the last progress or rewind


@dataclass
class _SnapIn:
    """Receiving side: the chunks of one transfer so far, in order."""
    sender: int
    view: int
    snap_id: int
    index: int
    snap_view: int
    total: int
    buf: bytearray

    def same_transfer(self, p: int, m: InstallSnapshot) -> bool:
        return (p, m.view, m.snap_id, m.index, m.snap_view, m.total) == (
            self.sender, self.view, self.snap_id, self.index, self.snap_view, self.total)


@dataclass
class _Handover:
    """Losing side of a healed split brain: entries that may hold acknowledged writes the
    winner lacks, handed to its primary before they are dropped here."""
    primary: int
    view: int
    after: int
    upto: int
    entries: tuple
    sent: int = -(10 ** 9)     # tick of the last (re)transmission
    acked: bool = False


@dataclass
class _Campaign:
    view: int
    required: set[int]
    granted: dict[int, tuple[int, int, int]]
    failover: bool
    started: int


def _fresh_info(info: Heartbeat) -> bool:
    """A peer that, by its heartbeat, has never promised a view nor held an entry."""
    return info.view == 0 and info.promised == 0 and info.last_index == 0


def _key(est: int, last_view: int, last_index: int) -> tuple[int, int, int]:
    return (est, last_view, last_index)


class Replica:
    """One replica's protocol state.  See the module docstring for the API and contract."""

    def __init__(self, me: int, cluster: Sequence[int], durable: DurableState, *,
                 heartbeat_ticks: int = 1, failure_ticks: int = 10,
                 rng: random.Random | None = None, max_batch: int = 256,
                 max_inflight: int = 4096, retain_entries: int = 10_000,
                 snapshot_chunk: int | None = None, snapshot_window: int | None = None,
                 quorum: str = QUORUM_ALL, addresses=None) -> None:
        cluster = tuple(cluster)
        if quorum not in QUORUMS:
            raise ValueError(f"quorum must be one of {', '.join(QUORUMS)}")
        self.quorum = quorum
        if me not in cluster or len(set(cluster)) != len(cluster) or not cluster:
            raise ValueError("me must be one of the distinct ids in cluster")
        if heartbeat_ticks < 1 or failure_ticks < 2:
            raise ValueError("heartbeat_ticks >= 1 and failure_ticks >= 2 required")
        self.me = me
        # The configuration: the newest config entry in my log, else the newest committed one
        # (persisted with the hard state), else the first one (``cluster``, from --peers).
        self._base_cfg = durable.config or Config.initial(cluster, addresses)
        self._use_config(self._base_cfg)
        self.heartbeat_ticks = heartbeat_ticks
        self.failure_ticks = failure_ticks
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.retain_entries = retain_entries
        self.snapshot_chunk = snapshot_chunk or SNAPSHOT_CHUNK
        self.snapshot_window = snapshot_window or SNAPSHOT_WINDOW
        if self.snapshot_chunk < 1 or self.snapshot_window < 1:
            raise ValueError("snapshot_chunk >= 1 and snapshot_window >= 1 required")
        self._rng = rng if rng is not None else random.Random()

        # --- durable state (mirrors the host's store once advance() returned)
        self._view = durable.view
        self._primary = durable.primary
        self._members = tuple(durable.members) or cluster
        self._promised = max(durable.view, durable.promised if durable.promised is not None
                             else durable.view)
        self._promised_to = durable.promised_to
        self._degraded_from = durable.degraded_from
        self._load_log(durable)
        self._applied = durable.applied_index       # applied and advanced
        self._apply_cursor = durable.applied_index  # handed to the host
        self._commit = durable.applied_index
        self._stable_last = self.last_index          # durable prefix of the log
        self._unstable_from = self.last_index + 1
        self._pending_trunc: int | None = None
        self._pending_snapshot: Snapshot | None = None
        self._hs_dirty = False
        self._msgs: list[tuple[int, object]] = []
        self._snap_requests: list[int] = []

        self._init_volatile()
        if durable.handover:   # still owed from before the restart: resent to my next primary
            entries = tuple(durable.handover)
            self._handover = _Handover(-1, -1, 0, max(e.index for e in entries), entries)
        self._new_incarnation()
        if self._alone():
            self._become_sole_primary()

    def _load_log(self, durable: DurableState) -> None:
        """The durable log after the snapshot point (checked), and the configuration in it."""
        self._snap_index = durable.snapshot_index
        self._snap_view = durable.snapshot_view
        self._runs = checked_runs(durable.view_runs, self._snap_index, self._snap_view)
        self._log: list[Entry] = list(durable.log)
        for i, e in enumerate(self._log):
            if e.index != self._snap_index + 1 + i:
                raise ValueError("durable log is not contiguous after the snapshot")
        if durable.applied_index < self._snap_index or durable.applied_index > self.last_index:
            raise ValueError("applied_index outside [snapshot_index, last log index]")
        self._refresh_config()

    def _init_volatile(self) -> None:
        """State that is not persisted: a (re)start begins with all of it empty."""
        # --- failure detector
        self._ticks = 0
        self._inc = 0
        self._answered: dict[int, int] = {}
        self._echo: dict[int, tuple[int, int]] = {}
        self._fresh: set[int] = set()
        self._info: dict[int, Heartbeat] = {}
        self._heard: dict[int, int] = {}      # tick its last heartbeat arrived
        self._contacts: dict[int, int] = {}   # non-members heard from -> tick (section 14)

        # --- roles
        self._status = RECOVERING
        self._serving = False
        self._following: int | None = None
        self._campaign: _Campaign | None = None
        self._elect_wait = 0
        self._max_seen = self._promised
        self._diverged = False
        self._forced_by: tuple | None = None  # (primary, view) of the last forced snapshot I installed
        self.divergences = 0          # committed entries found divergent (split brain healed)
        self._start = 0
        self._next: dict[int, int] = {}
        self._match: dict[int, int] = {}
        self._progress: dict[int, bool] = {}
        self._sent_commit: dict[int, int] = {}
        self._snap_pending: dict[int, int] = {}
        self._snap_out: dict[int, _SnapOut] = {}    # snapshot transfers I am sending
        self._snap_ids = itertools.count(1)         # distinguishes my transfers in a view
        self._snap_in: _SnapIn | None = None        # the one I am receiving
        self._snap_done: tuple[int, int, int] | None = None   # (sender, view, id) last received
        self._learners: set[int] = set()
        self._learner_acked: set[int] = set()
        self._ready_since: int | None = None
        self._backoff = 0
        # --- healing a split brain (all mode; docs/replication.md section 10)
        self._lost_to: tuple[int, ...] | None = None   # the winning side's members, if I lost
        self._handover: _Handover | None = None
        self._handover_dirty = False  # its entries changed since the last Ready (persist them)
        # Host hook: an entry as it is handed over (the host marks commands refused where
        # they first ran, so the winner does not re-apply them).  Identity by default.
        self.mark_handover = lambda entry: entry
        self._reapply_in: list = []
        self.split_losses = 0         # times this replica found its side lost a split brain
        self.handed_over = 0          # entries handed to a winning primary (first sending)
        self._probing: dict[int, int] = {}
        self._force_snap: set[int] = set()

    # ------------------------------------------------------------------ read-only API
    @property
    def role(self) -> str:
        return self._status

    @property
    def view(self) -> int:
        return self._view

    @property
    def promised(self) -> int:
        return self._promised

    @property
    def primary(self) -> int | None:
        return self._primary

    @property
    def members(self) -> tuple[int, ...]:
        return self._members

    @property
    def last_index(self) -> int:
        return self._log[-1].index if self._log else self._snap_index

    @property
    def last_view(self) -> int:
        return self._log[-1].view if self._log else self._snap_view

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def snapshot_index(self) -> int:
        return self._snap_index

    @property
    def serving(self) -> bool:
        return self._serving

    def entry_view(self, index: int) -> int | None:
        """View of the entry at ``index`` (None if compacted away or absent)."""
        if index == self._snap_index:
            return self._snap_view
        if index < self._snap_index or index > self.last_index:
            return None
        return self._log[index - self._snap_index - 1].view

    @property
    def view_runs(self) -> tuple:
        """Entry views of my compacted prefix, up to the snapshot index: ((first, view), ...)."""
        return self._runs

    def history_view(self, index: int) -> int | None:
        """View of my history's entry at ``index``, also inside the compacted prefix as far as
        the kept runs reach (None: unknown or absent).  Only for checking handed-over entries:
        the protocol itself treats a compacted entry as unknown (``entry_view``)."""
        if index >= self._snap_index:
            return self.entry_view(index)
        return run_view(self._runs, index, self._snap_index)

    def _runs_upto(self, index: int) -> tuple:
        """My runs extended through my log up to ``index`` (at or after the snapshot point)."""
        return extend_runs(self._runs, ((e.index, e.view) for e in
                                        self._log[:max(0, index - self._snap_index)]))

    def holds_view(self, view: int) -> bool:
        """Whether my history holds an entry of ``view`` (at the snapshot point or after it:
        views never decrease along a log, so a bisection finds it), or ``view`` is my current
        view.  Entry views identify a primary's single run, so a view of the other side of a
        healed split brain is never held here."""
        if view == self._view or view == self._snap_view:
            return True
        k = bisect.bisect_left(self._log, view, key=lambda e: e.view)
        return k < len(self._log) and self._log[k].view == view

    def entry(self, index: int) -> Entry | None:
        if index <= self._snap_index or index > self.last_index:
            return None
        return self._log[index - self._snap_index - 1]

    def suspected(self, peer: int) -> bool:
        return self._ticks - self._answered.get(peer, self._ticks) > self.failure_ticks

    def status(self) -> dict:
        return {
            "id": self.me, "role": self._status, "serving": self._serving,
            "view": self._view, "promised": self._promised, "primary": self._primary,
            "members": list(self._members), "last_index": self.last_index,
            "last_view": self.last_view, "commit_index": self._commit,
            "applied_index": self._applied, "snapshot_index": self._snap_index,
            "reachable": sorted(p for p in self.peers
                                if p in self._fresh and not self.suspected(p)),
            "suspected": sorted(p for p in self.peers if self.suspected(p)),
            "following": self._following,
            "campaign": None if self._campaign is None else self._campaign.view,
            "learners": sorted(self._learners),
            "divergences": self.divergences,
            "quorum": self.quorum,
            "split_losses": self.split_losses,
            "handed_over": self.handed_over,
            "handover_pending": 0 if self._handover is None or self._handover.acked
            else len(self._handover.entries),
            "config": [[i, a] for i, a in self._cfg.members],
            "config_index": self._cfg.index,
            "pending": list(self._cfg.pending),
            "removed": self.me not in self._rank,
        }

    # ------------------------------------------------------------------ helpers
    def _my_key(self) -> tuple[int, int, int]:
        return _key(self._view, self.last_view, self.last_index)

    def _send(self, peer: int, msg: object) -> None:
        self._msgs.append((peer, msg))

    def _set_hard(self, *, view: int | None = None, primary: int | None | str = "keep",
                  members: tuple[int, ...] | None = None, promised: int | None = None,
                  to: int | None = None) -> None:
        """Change the hard state; a promise of a higher view is a promise *to* ``to``."""
        if view is not None and view != self._view:
            self._view = view
            self._hs_dirty = True
        if primary != "keep" and primary != self._primary:
            self._primary = primary  # type: ignore[assignment]
            self._hs_dirty = True
        if members is not None and members != self._members:
            self._members = members
            self._hs_dirty = True
            self._track_degraded()
        if promised is not None and promised > self._promised:
            self._promised, self._promised_to = promised, to
            self._hs_dirty = True
        if self._promised < self._view:
            self._promised, self._promised_to = self._view, self._primary
            self._hs_dirty = True
        self._max_seen = max(self._max_seen, self._promised)

    def _track_degraded(self) -> None:
        """All mode: keep my log from the point I left the full view until it is full again.
        In a view without the whole configuration (a crash or a partition: I cannot tell
        which) every entry above what I knew committed may have to be handed over at a heal,
        and a handover holds only what my log still holds; in a full view with no handover
        pending every member holds every committed entry, so compaction loses nothing."""
        if self.quorum != QUORUM_ALL:
            return
        full = set(self.cluster) <= set(self._members)
        if not full and self._degraded_from is None:
            self._degraded_from = self._commit + 1
            self._hs_dirty = True
        elif full and self._degraded_from is not None and self.me in self._members \
                and (self._handover is None or self._handover.acked):
            self._degraded_from = None
            self._hs_dirty = True

    def _new_incarnation(self) -> None:
        self._inc = self._rng.getrandbits(62) | 1
        self._answered = {p: self._ticks for p in self.peers}
        self._echo = {}
        self._fresh = set()
        self._info = {}
        self._heard = {}

    def _sorted(self, ids) -> tuple[int, ...]:
        return tuple(sorted(set(ids), key=self._rk))

    def _rk(self, p: int) -> int:
        """``p``'s election priority (its place in the configuration; after every member if it
        is not one, e.g. a member of an old view that was removed since)."""
        return self._rank.get(p, len(self._rank) + p)

    def _alone(self) -> bool:
        """The configuration is just me: an unreplicated server, primary from the start."""
        return self.cluster == (self.me,)

    def leader_of(self, view: int) -> int:
        """The replica that may campaign for ``view``: below VIEWS_BY_ID, the one at place
        ``view % N`` of the first configuration (only replicas that never saw a membership
        change pick such numbers, and they all hold that configuration); from VIEWS_BY_ID on,
        node ``view % MAX_NODES`` -- a function of the number alone, so two candidates never
        compete for one number whatever configurations they hold (section 14)."""
        if view >= VIEWS_BY_ID:
            return view % MAX_NODES
        return self.cluster[view % self.n]

    def _promised_to_is(self, p: int, view: int) -> bool:
        """Did I promise ``view`` (my promised view) to ``p``?  Stores from before membership
        changes did not record to whom: then it was the view's candidate by the fixed rule."""
        if self._promised_to is not None:
            return self._promised_to == p
        return self.n > 0 and self.leader_of(view) == p

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> Config:
        """The configuration I act on: the newest config entry in my log, else the committed
        one (docs/replication.md section 14)."""
        return self._cfg

    def _use_config(self, cfg: Config) -> None:
        self._cfg = cfg
        self.cluster = cfg.ids
        self.n = len(self.cluster)
        self._rank = {p: i for i, p in enumerate(self.cluster)}
        self.peers = tuple(p for p in self.cluster if p != self.me)
        answered = getattr(self, "_answered", None)
        if answered is not None:   # a new peer starts unsuspected, as every peer at start-up
            for p in self.peers:
                answered.setdefault(p, self._ticks)
            self._learners &= set(self.peers)

    def _refresh_config(self) -> None:
        """Act on the newest configuration in my log (after a truncation or a snapshot, it
        may be an older one again: the one in force is always that of my log)."""
        cfg = self._base_cfg
        for e in reversed(self._log):
            if e.index <= cfg.index:
                break
            found = self._config_of(e)
            if found is not None:
                cfg = found
                break
        if cfg != self._cfg:
            self._use_config(cfg)

    @staticmethod
    def _config_of(e: Entry) -> Config | None:
        """The configuration a log entry sets, if it is a (well-formed) config entry."""
        if not is_config_entry(e.data):
            return None
        try:
            return decode_config(e.data, e.index)
        except ValueError:
            return None     # every replica ignores the same malformed entry alike

    def _config_at(self, index: int) -> Config:
        """The configuration in force at log position ``index`` (for a snapshot there)."""
        for e in reversed(self._log):
            if e.index <= index and e.index > self._base_cfg.index:
                found = self._config_of(e)
                if found is not None:
                    return found
        return self._base_cfg

    def _joining_past(self, snap_cfg: Config) -> bool:
        """Am I a joiner whose add lies after this snapshot's point?  Then its configuration
        does not name me yet, and I keep the one I joined with (the entries after the point
        bring the add): taking it, I would count myself removed and refuse every vote --
        which, in majority mode, the new configuration's majority may need (sweep seed 318)."""
        return self._view == 0 and snap_cfg.index < self._base_cfg.index \
            and self.me not in snap_cfg.ids and self.me in self._base_cfg.ids

    def _append(self, e: Entry) -> None:
        self._log.append(e)
        if e.index > self._cfg.index and is_config_entry(e.data):
            cfg = self._config_of(e)
            if cfg is not None:
                self._use_config(cfg)      # in force once appended (Raft's rule)

    def _next_view_number(self) -> int:
        """The lowest view number above every one seen that I may campaign for (leader_of)."""
        base = max(self._promised, self._max_seen) + 1
        if self._cfg.index == 0 and base < VIEWS_BY_ID:
            w = base + ((self._rk(self.me) - base) % self.n)
            if w < VIEWS_BY_ID:
                return w
        base = max(base, VIEWS_BY_ID)
        return base + ((self.me - base) % MAX_NODES)

    def _truncate(self, after: int) -> None:
        """Drop entries with index > after (never committed ones unless diverged)."""
        if after >= self.last_index:
            return
        del self._log[after - self._snap_index:]
        if self._cfg.index > after:
            self._refresh_config()     # a config entry went: the one before it is in force
        self._stable_last = min(self._stable_last, after)
        self._unstable_from = min(self._unstable_from, after + 1)
        self._pending_trunc = after if self._pending_trunc is None else min(self._pending_trunc, after)

    # ------------------------------------------------------------------ role changes
    def _reset_primary_state(self) -> None:
        self._next, self._match, self._progress = {}, {}, {}
        self._sent_commit, self._snap_pending = {}, {}
        self._snap_out = {}
        self._probing: dict[int, int] = {}
        self._force_snap: set[int] = set()
        self._snap_probe: dict[int, int] = {}    # peer -> my snapshot point last probed there
        self._learners = set()
        self._learner_acked: set[int] = set()    # learners that acknowledged an Append
        self._ready_since: int | None = None    # tick the first learner was in sync
        self._transfer: tuple[int, int] | None = None   # handing over: (to whom, since tick)

    def _become_sole_primary(self) -> None:
        self._status = PRIMARY
        self._following = None
        # A divergence found while another side's primary synced me (a split brain) is over
        # once I lead a view of my own: my log is that view's history, and when a primary
        # syncs me again its conflicts must be found afresh -- and handed over (_may_drop) --
        # rather than answered by a snapshot request that replaces them unseen.
        self._diverged = False
        self._campaign = None
        view = self._view
        if self._primary != self.me or self._members != (self.me,):
            view = self._next_view_number() if self._primary is not None else self._view
            self._set_hard(view=view, primary=self.me, members=(self.me,), promised=view,
                           to=self.me)
            self._hs_dirty = True
        self._start = self.last_index
        self._reset_primary_state()
        self._update_serving()

    def _become_recovering(self) -> None:
        self._status = RECOVERING
        self._serving = False
        self._campaign = None
        self._following = None
        self._reset_primary_state()

    def _become_electing(self, backoff: int = 0) -> None:
        if self._alone():
            return
        if self.me not in self._rank:   # removed: never campaigns, never votes (section 14)
            self._become_recovering()
            return
        self._status = ELECTING
        self._serving = False
        self._campaign = None
        self._following = None
        self._reset_primary_state()
        self._elect_wait = self.failure_ticks
        self._backoff = backoff

    def _become_backup(self, primary: int) -> None:
        if self._status != BACKUP:
            self._reset_primary_state()
        self._status = BACKUP
        self._serving = False
        self._campaign = None
        self._following = primary
        self._lost_to = None      # synced into the winner's view (a handover may still be due)

    def _observe_view(self, promised: int) -> None:
        """Somebody promised ``promised``: a serving primary of an older view steps down."""
        if promised > self._max_seen:
            self._max_seen = promised
        if promised > self._promised and self._status == PRIMARY and not self._alone():
            self._become_electing()
        if (self._campaign is not None and promised > self._campaign.view):
            self._become_electing()

    # ------------------------------------------------------------------ inputs
    def tick(self) -> None:
        self._ticks += 1
        if self._alone():
            return
        if self._snap_in is not None and self._snap_in.view < self._promised:
            self._snap_in = None     # its later chunks would be refused: free the memory
        self._retry_handover()
        if self._ticks % self.heartbeat_ticks == 0:
            for p in self.peers:
                self._send_heartbeat(p)
            for p in self._members:   # (a member being removed is probed until it is out)
                if p != self.me and p not in self._rank:
                    self._send_heartbeat(p)
            for p, heard in list(self._contacts.items()):
                if self._ticks - heard > self.failure_ticks or p in self._rank or p in self._members:
                    del self._contacts[p]
                else:
                    self._send_heartbeat(p)
        st = self._status
        if st == PRIMARY:
            self._tick_primary()
        elif st == BACKUP:
            if self._primary is None or self.suspected(self._primary):
                self._become_electing()
        elif st == ELECTING:
            self._tick_electing()
        else:
            self._tick_recovering()

    def stalled(self) -> None:
        """The host's loop stalled longer than it may (SIGSTOP, swap): from now on behave as
        a restarted replica.  Nobody is declared failed because of the stall itself."""
        self._new_incarnation()
        self._snap_in = None         # as after a restart, which would have lost it
        if self._alone():
            return
        self._become_recovering()

    def peer_connected(self, peer: int) -> None:
        if peer in self.peers:
            self._send_heartbeat(peer)

    def peer_disconnected(self, peer: int) -> None:
        """Only a hint: failure detection rests on unanswered probes."""

    def propose(self, data: bytes) -> int | None:
        if not self._serving:
            return None
        e = Entry(self.last_index + 1, self._view, bytes(data))
        self._append(e)
        return e.index

    def change_config(self, *, add: str | None = None, remove: int | None = None,
                      claim: int | None = None, pending: bool = False) -> int:
        """Serving primary: propose adding a replica at address ``add`` (it gets the next
        node id; ``pending``: for a replica still to be started), removing node ``remove``, or
        the replica just started claiming pending node ``claim``; returns the config entry's
        index (committed when ``commit_index`` reaches it).  Raises MembershipError saying why not.

        One change at a time: the next is refused until the last config entry committed, so
        any two configurations in force at once differ by one replica and their majorities
        intersect (Raft's single-server rule; docs/replication.md section 14).  A claim changes
        no majority, but goes one at a time too: the second claim of an id is then refused."""
        cfg = self._cfg
        if not self._serving:
            raise MembershipError("not the serving primary")
        if cfg.index > self._commit:
            raise MembershipError(f"a membership change is in progress (log entry {cfg.index} "
                                  f"is not committed yet); try again when it is")
        if add is not None:
            if cfg.next_id >= MAX_NODES:
                raise MembershipError(f"node ids are exhausted (at most {MAX_NODES} ever)")
            if cfg.node_at(add) is not None:
                raise MembershipError(f"{add} is already a member (node {cfg.node_at(add)})")
            new = cfg.adding(add, pending)
        elif claim is not None:
            new = self._claim(cfg, claim)
        else:
            new = self._removal(cfg, remove)
        index = self.propose(encode_config(new))
        assert index is not None
        return index

    def hand_over(self) -> int:
        """Serving primary: stop proposing and hand the primary role to the most up-to-date
        other member of the view (returned): once it holds my whole log it is told to campaign
        (``TakeOver``), and wins.  Used before the primary itself is removed; after two
        failure timeouts without success I serve again."""
        if not self._serving:
            raise MembershipError("not the serving primary")
        others = [p for p in self._members if p in self.peers and not self.suspected(p)]
        if not others:
            raise MembershipError("no other member in the view to hand over to "
                                  "(the last member cannot be removed)")
        target = max(others, key=lambda p: (self._match.get(p, 0), -self._rk(p)))
        self._transfer = (target, self._ticks)
        self._serving = False
        self._check_transfer()
        return target

    def _check_transfer(self) -> None:
        """Handing over: tell the successor to campaign once it holds all my log; give up
        (serve again) after two failure timeouts."""
        t = self._transfer
        if t is None:
            return
        target, since = t
        if self._ticks - since > 2 * self.failure_ticks or target not in self._members:
            self._transfer = None
            self._update_serving()
        elif self._match.get(target, 0) >= self.last_index and self._stable_last >= self.last_index:
            self._send(target, TakeOver(self._view))

    def _claim(self, cfg: Config, node: int) -> Config:
        """Pending ``node`` handed to the replica started at its address -- once: a node that
        is claimed, or that I already hear from (in my view or catching up: a claim lost with
        an old primary), runs somewhere, and a second data directory must not become it."""
        address = cfg.address(node)
        if address is None:
            raise MembershipError(f"node {node} is not a member")
        if node not in cfg.pending or node in self._members or node in self._learners:
            raise MembershipError(f"{address} is node {node}, already started: remove it with "
                                  f"`members remove {address}` first, then join again")
        return cfg.claiming(node)

    def _removal(self, cfg: Config, node: int | None) -> Config:
        if node is None or node not in self._rank:
            raise MembershipError(f"node {node} is not a member")
        if node == self.me:
            raise MembershipError("the primary cannot remove itself: it hands over first")
        new = cfg.removing(node)
        stay = [p for p in self._members if p in new.ids]
        if self.quorum == QUORUM_MAJORITY and not 2 * len(stay) > len(new.ids):
            raise MembershipError(
                f"removing node {node} would leave the view ({len(stay)} of {len(new.ids)}) "
                f"without a majority of the remaining replicas")
        return new

    def step(self, sender: int, msg: object) -> None:
        if sender == self.me:
            return
        if sender not in self._rank and sender not in self._members \
                and not isinstance(msg, (Append, InstallSnapshot)):
            # Not in my configuration (nor in my view, which a member being removed stays in
            # until its removal commits): a replica added while I was away (its primary's Append
            # or snapshot brings me the entry that adds it), or one removed since.  Its
            # heartbeats are answered and tell me at most that I left the view; it elects
            # nobody and is elected by nobody here (section 14).
            if isinstance(msg, Heartbeat):
                self._on_contact(sender, msg)
            return
        if isinstance(msg, Heartbeat):
            self._on_heartbeat(sender, msg)
        elif isinstance(msg, Append):
            self._on_append(sender, msg)
        elif isinstance(msg, AppendResp):
            self._on_append_resp(sender, msg)
        elif isinstance(msg, ViewChange):
            self._on_view_change(sender, msg)
        elif isinstance(msg, Vote):
            self._on_vote(sender, msg)
        elif isinstance(msg, InstallSnapshot):
            self._on_snapshot(sender, msg)
        elif isinstance(msg, SnapshotAck):
            self._on_snapshot_ack(sender, msg)
        elif isinstance(msg, Reapply):
            self._on_reapply(sender, msg)
        elif isinstance(msg, ReapplyAck):
            self._on_reapply_ack(sender, msg)
        elif isinstance(msg, TakeOver):
            if self._status == BACKUP and sender == self._primary and msg.view == self._view:
                self._start_campaign(failover=False)
        # anything else is ignored

    # ------------------------------------------------------------------ heartbeats
    def _send_heartbeat(self, p: int) -> None:
        ei, es = self._echo.get(p, (0, 0))
        self._send(p, Heartbeat(
            inc=self._inc, seq=self._ticks, echo_inc=ei, echo_seq=es,
            promised=self._promised, view=self._view, primary=self._primary,
            members=self._members, status=STATUS_CODES[self._status], serving=self._serving,
            last_view=self.last_view, last_index=self.last_index, commit=self._commit))

    def _probe_answered(self, p: int, m: Heartbeat) -> None:
        """The failure detector's part of a heartbeat: echo it, note what it answered, and
        keep what it says about its state (for recovery and status)."""
        self._echo[p] = (m.inc, m.seq)
        if m.echo_inc == self._inc and m.echo_seq <= self._ticks:
            if m.echo_seq > self._answered.get(p, -1):
                self._answered[p] = m.echo_seq
            self._fresh.add(p)
        self._info[p] = m
        self._heard[p] = self._ticks

    def _on_heartbeat(self, p: int, m: Heartbeat) -> None:
        self._probe_answered(p, m)
        split = self._split_side(m) if self._status in (PRIMARY, BACKUP, ELECTING) else 0
        if split > 0 and self._status in (PRIMARY, BACKUP):
            # A smaller side of a split brain: its promises fence none of my members (only
            # they can stop my commits), so they do not depose me however high they are.
            self._max_seen = max(self._max_seen, m.promised)
        else:
            self._observe_view(m.promised)
        if split < 0:
            self._lose_split(m)
        status = _CODE_STATUS.get(m.status)
        if m.view > self._view and status in (PRIMARY, BACKUP) and self.me not in m.members \
                and self._status != RECOVERING and not self._alone() and split <= 0:
            # a newer view was established without me: I was removed.
            self._become_recovering()
        if self._status == RECOVERING and p == self._following and status != PRIMARY:
            self._following = None     # it no longer leads: stop waiting for it
        if self._status == BACKUP and p == self._primary and p in self._fresh \
                and self._primary_gone(m, status):
            self._become_electing()
        if self._status == ELECTING and p == self._following and m.promised >= self._promised \
                and status not in (PRIMARY, ELECTING):
            # The candidate I voted for restarted, stalled or follows another view since (the
            # promise check skips heartbeats it sent before asking me): stop waiting for it.
            self._following = None
        if self._status == PRIMARY and p not in self._members and p in self._fresh \
                and p in self._rank and status == RECOVERING and m.promised <= self._promised:
            if p not in self._learners:
                self._learners.add(p)
                self._learner_acked.discard(p)
                self._next[p] = min(m.last_index, self.last_index) + 1
                self._match[p] = 0
                self._progress[p] = False
                self._sent_commit[p] = -1

    def _on_contact(self, p: int, m: Heartbeat) -> None:
        """A heartbeat of a replica outside my configuration: answer its probes (so that a
        primary of a newer configuration finds me alive and syncs me), and leave a view it
        shows was established without me -- nothing else it says counts here.  (What it says
        of its view still counts for recovery: a member removed by an uncommitted entry is
        still a member of the newest view, which a recovering replica must hear in full.)"""
        self._probe_answered(p, m)
        self._contacts[p] = self._ticks
        if m.view > self._view and _CODE_STATUS.get(m.status) == PRIMARY \
                and self.me not in m.members and self._status in (BACKUP, ELECTING) \
                and m.promised >= self._promised:
            self._become_recovering()

    def _split_side(self, m: Heartbeat) -> int:
        """Which side wins if ``m`` shows an active view disjoint from my established one.

        Two established views with no member in common are the two sides of a split brain
        (consecutive views always share their candidate; majorities always intersect, so
        this happens in all mode only).  The side with more members wins, a tie goes to the
        side holding the replica first in ``--peers``: +1 mine wins, -1 theirs, 0 no split
        brain.  Comparing view numbers instead would let a lone replica -- whose campaigns
        need nobody's vote, so its numbers race ahead -- override the larger side."""
        status = _CODE_STATUS.get(m.status)
        theirs = set(m.members)
        if status not in (PRIMARY, BACKUP) or not theirs or self._primary is None \
                or theirs & set(self._members) or not theirs <= set(self._rank):
            return 0
        mine = (len(self._members), -min(self._rk(q) for q in self._members))
        other = (len(theirs), -min(self._rk(q) for q in theirs))
        return 1 if mine > other else -1

    def _lose_split(self, m: Heartbeat) -> None:
        """My side lost a healed split brain: stop serving, never campaign while the winner
        is reachable, and let its primary sync me -- handing it first whatever my side may
        have acknowledged that it lacks (``_may_drop``)."""
        self.split_losses += 1
        self._lost_to = tuple(m.members)
        self._become_recovering()

    def _primary_gone(self, m: Heartbeat, status: str | None) -> bool:
        """Does my primary's heartbeat show that it no longer leads my view?

        Not when the heartbeat was sent before it established my view (``m.view`` older than
        mine: delivery reorders), and not while it runs a view change from my view (adding a
        rejoined replica, or removing a failed one): its ``ViewChange`` reaches me, or its new
        view tells me I was removed.  Going electing then would let me -- preferred by
        ``--peers`` order on an equal log -- campaign against a live primary, and every
        re-add would cost a second view change and the primary role.  It does, if it
        restarted or stalled (recovering) or follows another primary."""
        if status == PRIMARY or m.view < self._view:
            return False
        return not (status == ELECTING and m.view == self._view)

    # ------------------------------------------------------------------ primary
    def _tick_primary(self) -> None:
        if self.me not in self._rank:
            self._become_recovering()    # removed (the host hands over before that: section 14)
            return
        # A member removed from the configuration leaves the view once the removal is
        # committed -- it then holds the entry, so it knows it is out and never campaigns.
        bad = [p for p in self._members if p != self.me and (self.suspected(p) or (
            p not in self._rank and self._commit >= self._cfg.index))]
        if bad:
            self._start_campaign(failover=False)
            return
        for p in list(self._learners):
            if self.suspected(p) or p in self._members:
                self._learners.discard(p)
                self._learner_acked.discard(p)
            if self.suspected(p):
                self._snap_out.pop(p, None)
        self._retry_snapshots()
        self._check_transfer()
        if self._ticks % self.heartbeat_ticks == 0:
            for p in self._followers():
                if not self._progress.get(p) and self._match.get(p, 0) < self.last_index:
                    self._next[p] = self._match.get(p, 0) + 1
                    self._probing[p] = self._next[p]
                self._progress[p] = False
                self._send_append(p, force=True)
        self._readd_learners()

    def _readd_learners(self) -> None:
        """Re-add learners in sync by one view change (the service pauses only for that).

        "In sync" = it has acknowledged a position within one batch of my log: under steady
        load a learner is never exactly level, and the rest is shipped before the new view
        serves.  Replicas that restart together become learners together but catch up at
        different speeds, and every view change pauses the service; so the first learner in
        sync waits, up to half a failure timeout, for the others to be in sync too, and
        they are all added by one view change."""
        if not self._serving:
            return
        floor = max(0, min(self._commit, self.last_index - self.max_batch))
        ready = {p for p in self._learners
                 if p in self._learner_acked and self._match.get(p, 0) >= floor}
        if not ready:
            self._ready_since = None
            return
        if self._ready_since is None:
            self._ready_since = self._ticks
        if ready >= self._rejoining() or self._ticks - self._ready_since >= self.failure_ticks // 2:
            self._start_campaign(failover=False, add=ready)

    def _rejoining(self) -> set[int]:
        """Learners, and non-members heard recovering in the last two heartbeats (a replica
        that restarted is heard before it has answered a probe, i.e. before it can be a
        learner)."""
        recent = 2 * self.heartbeat_ticks
        return self._learners | {
            p for p, i in self._info.items()
            if p not in self._members and _CODE_STATUS.get(i.status) == RECOVERING
            and self._ticks - self._heard.get(p, -recent - 1) <= recent}

    def _followers(self) -> list[int]:
        return [p for p in self._members if p != self.me] + sorted(self._learners)

    def _send_append(self, p: int, force: bool = False) -> None:
        nxt = self._next.get(p, self.last_index + 1)
        if p in self._snap_pending:
            if self._ticks - self._snap_pending[p] <= self.failure_ticks:
                return
            del self._snap_pending[p]     # no progress for a failure timeout: start afresh
            self._snap_out.pop(p, None)
        prev = nxt - 1
        if prev < self._snap_index:
            if not self._probe_snap_point(p):
                if p not in self._snap_requests:
                    self._snap_requests.append(p)
                self._snap_pending[p] = self._ticks
                return
            nxt, prev = self._snap_index + 1, self._snap_index
        last = self.last_index
        if nxt > last and not force and self._sent_commit.get(p, -1) >= self._commit:
            return
        sent_any = False
        while True:
            if sent_any and (p in self._probing
                             or nxt - self._match.get(p, 0) > self.max_inflight):
                break
            hi = min(last, nxt + self.max_batch - 1)
            ents = tuple(self._log[nxt - self._snap_index - 1:hi - self._snap_index]) if hi >= nxt else ()
            self._send(p, Append(view=self._view, prev_index=nxt - 1,
                                 prev_view=self.entry_view(nxt - 1) or 0,
                                 commit=self._commit, start=self._start,
                                 members=self._members, entries=ents,
                                 echo_inc=self._echo.get(p, (0, 0))[0]))
            sent_any = True
            nxt = hi + 1
            if nxt > last:
                break
        self._next[p] = nxt
        self._sent_commit[p] = self._commit

    def _probe_snap_point(self, p: int) -> bool:
        """``p`` needs entries inside my compacted prefix: before sending it a snapshot, check
        once (per snapshot point) whether it holds my entry at the snapshot point (True: send
        the entries after it).  If it does, log matching proves everything below the point
        the same history, and my entries after it are compared with its own one by one --
        so committed entries of a healed split brain's other side that it holds past the
        point are found and handed over (``_may_drop``) instead of being silently replaced
        by the snapshot, which cannot tell them from entries it already covers."""
        info = self._info.get(p)
        if self._snap_probe.get(p) == self._snap_index or self._snap_index == 0 \
                or (info is not None and info.last_index < self._snap_index):
            return False
        self._snap_probe[p] = self._snap_index
        self._next[p] = self._snap_index + 1
        self._probing[p] = self._snap_index + 1
        return True

    def _flush_appends(self) -> None:
        if self._status != PRIMARY or self._campaign is not None:
            return
        for p in self._followers():
            if p in self._probing:
                continue
            nxt = self._next.get(p, self.last_index + 1)
            if nxt <= self.last_index or self._sent_commit.get(p, -1) < self._commit:
                self._send_append(p)

    def _on_append_resp(self, p: int, m: AppendResp) -> None:
        self._observe_view(m.view)
        if self._status != PRIMARY or m.view != self._view:
            return
        if p not in self._members and p not in self._learners:
            return
        if m.ok:
            self._probing.pop(p, None)
            if p in self._learners:
                self._learner_acked.add(p)
            if m.match > self._match.get(p, 0):
                self._match[p] = min(m.match, self.last_index)
                self._progress[p] = True
            if self._next.get(p, 0) <= self._match[p]:
                self._next[p] = self._match[p] + 1
            out = self._snap_out.get(p)
            if out is None or self._match[p] >= out.index:
                # synced (by the snapshot, or already past it); an older ack that does not
                # cover a transfer in progress leaves that transfer running
                self._snap_out.pop(p, None)
                self._snap_pending.pop(p, None)
            self._maybe_commit()
        elif m.need_snapshot or m.hint > self.last_index:
            # (a hint past my log: the replica holds committed entries I do not have, which
            # only a healed split brain produces; only a snapshot can reconcile it)
            self._force_snap.add(p)
            self._next[p] = self._snap_index  # forces the snapshot path
            self._snap_pending.pop(p, None)
            if p not in self._snap_requests:
                self._snap_requests.append(p)
            self._snap_pending[p] = self._ticks
        else:
            # mismatch: probe backwards with one batch at a time until an ok arrives;
            # rejects of batches sent before the probe started are ignored.
            heard = self._info.get(p)
            if p in self._learners and m.hint < self._match.get(p, 0) \
                    and heard is not None and heard.last_index < self._match[p]:
                # A learner whose log is shorter than the match I recorded for it (its reject
                # and its heartbeat both say so; seed 545): its acks never counted towards
                # commit, so verify it afresh rather than floor every probe at that match.
                self._match[p] = 0
                self._probing.pop(p, None)
            nxt = self._next.get(p, 1)
            at = max(min(nxt, m.hint + 1), self._match.get(p, 0) + 1, 1)
            if m.hint >= min(nxt, self._probing.get(p, nxt)):
                # Only "I cannot check before my snapshot point" answers at or past the point
                # I probe (a mismatch hints below it): the follower installed a snapshot while
                # my next index was rewound behind it.  Go there, never wait.
                at = m.hint + 1
            elif p in self._probing and at >= self._probing[p]:
                return
            self._probing[p] = at
            self._next[p] = at
            self._send_append(p, force=True)

    def _maybe_commit(self) -> None:
        if self._status != PRIMARY or self._campaign is not None:
            return
        c = self._stable_last
        for p in self._members:
            if p != self.me:
                c = min(c, self._match.get(p, 0))
        if c > self._commit and self.entry_view(c) is not None:
            self._commit = c
        self._update_serving()

    def _update_serving(self) -> None:
        if self._status != PRIMARY or self._campaign is not None or self._transfer is not None:
            self._serving = False
            return
        ok = self._stable_last >= self._start and all(
            self._match.get(p, 0) >= self._start for p in self._members if p != self.me)
        self._serving = ok
        if ok and self._alone() and self._stable_last > self._commit:
            self._commit = self._stable_last

    def send_snapshot(self, peer: int, index: int, view: int | None, data: bytes) -> None:
        """Host's answer to ``Ready.snapshot_requests``: its applied state at ``index``.

        The state goes out in chunks of ``snapshot_chunk`` bytes, at most ``snapshot_window``
        of them beyond what the peer acknowledged (:class:`SnapshotAck`), so it can be of any
        size and is never queued whole on one link; a new call for the same peer replaces
        the transfer in progress.  The host may serialize off its loop and call later (outside
        ``ready()``/``advance()``): a state at or after my snapshot point still serves, since
        the peer continues from ``index + 1`` in my log; an older one would not (dropped).
        Entries after a transfer in progress are kept (:meth:`suggested_compaction`)."""
        if self._status != PRIMARY or index > self._commit or index < self._snap_index:
            return
        if view is None:
            view = self.entry_view(index)
            if view is None:
                return
        self._snap_out[peer] = _SnapOut(next(self._snap_ids), index, view,
                                        memoryview(bytes(data)), peer in self._force_snap,
                                        config_to_bytes(self._config_at(index)),
                                        sum(self._runs_upto(index), ()), quiet_since=self._ticks)
        self._force_snap.discard(peer)
        self._next[peer] = index + 1
        self._snap_pending[peer] = self._ticks
        self._pump_snapshot(peer)

    def _pump_snapshot(self, p: int) -> None:
        """Send the next chunks of the transfer to ``p`` while the window allows (always at
        least one after a (re)wind, so that an empty state is sent too)."""
        out = self._snap_out.get(p)
        if out is None:
            return
        total = len(out.data)
        window = self.snapshot_window * self.snapshot_chunk
        while not out.started or (out.sent < total and out.sent - out.acked < window):
            hi = min(total, out.sent + self.snapshot_chunk)
            self._send(p, InstallSnapshot(
                view=self._view, index=out.index, snap_view=out.view, commit=self._commit,
                start=self._start, members=self._members, snap_id=out.snap_id,
                offset=out.sent, total=total, data=bytes(out.data[out.sent:hi]),
                echo_inc=self._echo.get(p, (0, 0))[0], force=out.force, config=out.config,
                runs=out.runs))
            out.sent, out.started = hi, True

    def _on_snapshot_ack(self, p: int, m: SnapshotAck) -> None:
        out = self._snap_out.get(p)
        if (self._status != PRIMARY or m.view != self._view or out is None
                or m.snap_id != out.snap_id or m.received > len(out.data)):
            return
        if m.received > out.acked:
            out.acked = m.received
            out.quiet_since = self._ticks
            self._snap_pending[p] = self._ticks    # progress: the transfer is not stuck
        elif m.received < out.acked:
            # The receiver lost its partial copy (it stalled), or acks were reordered: send
            # again from what it holds; duplicates are ignored, so either way is safe.
            out.acked = out.sent = m.received
            out.started = False
        self._pump_snapshot(p)

    def _retry_snapshots(self) -> None:
        """Chunks get lost when a link drops (and in the simulator): a transfer without
        progress for half a failure timeout is resent from what the receiver holds."""
        for p, out in self._snap_out.items():
            if self._ticks - out.quiet_since >= max(1, self.failure_ticks // 2):
                out.sent, out.started, out.quiet_since = out.acked, False, self._ticks
                self._pump_snapshot(p)

    # ------------------------------------------------------------------ follower side
    def _accept_primary_msg(self, p: int, view: int) -> bool:
        """Common admission check for Append / InstallSnapshot.

        Messages of a view older than my promise are refused (and the sender told so).
        Otherwise I follow ``p``: as a backup if it is my established view, as an electing
        replica still eligible if it is the view I voted for, and as a recovering replica
        (not eligible for anything until synced) in every other case."""
        if view < self._promised:
            self._send(p, AppendResp(view=self._promised, ok=False, match=0, hint=0,
                                     need_snapshot=False))
            return False
        if self._alone() or (view == self._promised and not self._promised_to_is(p, view)):
            return False   # (a view has one primary: the one I promised it to, if I did)
        if self._status == PRIMARY and view == self._view:
            return False  # impossible unless misconfigured
        voted = (view == self._promised and self._status == ELECTING and self._campaign is None)
        if view > self._promised:
            self._set_hard(promised=view, to=p)
        if self._status == BACKUP and view == self._view:
            pass
        elif self._status == ELECTING and voted:
            pass
        elif self._status != RECOVERING:
            self._become_recovering()
        self._following = p
        return True

    def _after_sync(self, p: int, m_view: int, members: tuple[int, ...], start: int,
                    match: int, echo_inc: int) -> None:
        if self._status == RECOVERING and echo_inc != self._inc:
            # The primary sent this before it heard of my current incarnation: it may have
            # moved on to a view without me since (the message was delayed while I was down
            # or paused).  Only a sync the primary made after hearing me now counts.
            return
        if self.me in members and match >= start and self.entry_view(match) is not None:
            if self._view != m_view or self._primary != p or self._members != members:
                self._set_hard(view=m_view, primary=p, members=tuple(members))
            self._become_backup(p)

    def _on_append(self, p: int, m: Append) -> None:
        if not self._accept_primary_msg(p, m.view):
            return
        if self._diverged:
            self._send(p, AppendResp(m.view, False, 0, self._commit, True))
            return
        prev = m.prev_index
        if prev > self.last_index:
            self._send(p, AppendResp(m.view, False, 0, self.last_index, False))
            return
        if prev < self._snap_index:
            # I cannot check (prev_index, prev_view) inside my compacted prefix: ask for the
            # entries after my snapshot point, whose view I can check.
            self._send(p, AppendResp(m.view, False, 0, self._snap_index, False))
            return
        if prev >= self._snap_index and self.entry_view(prev) != m.prev_view:
            self._prev_mismatch(p, m.view, prev)
            return
        for e in m.entries:
            if e.index <= self._snap_index:
                if e.index == self._snap_index and e.view != self._snap_view:
                    # my compacted prefix is another history
                    if self._may_drop(p, m.view, self._snap_index):
                        self._diverge(p, m.view)
                    return
                continue
            if e.index <= self.last_index:
                if self.entry_view(e.index) == e.view:
                    continue
                if not self._may_drop(p, m.view, e.index - 1):
                    return
                if e.index <= self._commit:
                    self._diverge(p, m.view)
                    return
                self._truncate(e.index - 1)
            if e.index != self.last_index + 1:  # malformed batch
                return
            self._append(e)
        match = prev + len(m.entries)
        if match > self.last_index or self._leftovers(p, m, match):
            return
        newc = min(m.commit, match)
        if newc > self._commit:
            self._commit = newc
        self._after_sync(p, m.view, m.members, m.start, match, m.echo_inc)
        self._send(p, AppendResp(m.view, True, match, 0, False))

    def _leftovers(self, p: int, m: Append, match: int) -> bool:
        """Entries of mine past both ``match`` and the view's start that are of another view
        than the primary's are not in its log (all its entries after the start are of its
        view).  Only a healed split brain leaves committed ones: hand over everything after
        ``match`` and ask for a snapshot (True).  Uncommitted ones are dropped as any uncommitted conflict is."""
        floor = max(m.start, match)
        stale = next((e.index for e in self._log[max(0, floor - self._snap_index):]
                      if e.view != m.view), None)
        if stale is None:
            return False
        # (my entries between match and the start are unchecked: hand them over too; the
        # primary skips those its log holds)
        self._may_drop(p, m.view, match)
        if stale <= self._commit:
            self._diverge(p, m.view)
            return True
        self._truncate(stale - 1)
        return False

    def _prev_mismatch(self, p: int, view: int, prev: int) -> None:
        """My entry at ``prev`` is of another view than the primary's: tell it where to retry,
        from before the conflicting view's entries.  Below my commit index only a healed split
        brain gets here; then the search goes on through committed entries too, down to my
        snapshot point, so that the point where the histories part -- and with it exactly
        which of my entries the winner lacks -- is known."""
        cv = self.entry_view(prev)
        floor = self._snap_index if prev <= self._commit else max(self._commit, self._snap_index)
        hint = prev - 1
        while hint > floor and self.entry_view(hint) == cv:
            hint -= 1
        if prev > self._snap_index:
            self._send(p, AppendResp(view, False, 0, hint, False))
        elif self._may_drop(p, view, self._snap_index):   # nothing left to compare
            self._diverge(p, view)

    def _may_drop(self, p: int, view: int, after: int) -> bool:
        """My entries after ``after`` are about to be dropped for the primary ``p``'s history.

        If they may hold acknowledged writes of a split brain's losing side -- committed
        ones, or any at all once my side lost (a backup's commit index lags its primary's
        acknowledgements) -- they are handed to ``p`` first (``Reapply``), which proposes
        them again.  I keep a copy and resend it every half timeout (to whichever primary I
        follow) until it acknowledges them committed.  Not waiting for that before syncing
        keeps the merge from deadlocking: the primary may need me synced before it can
        serve and commit anything.  Always True; the name says what the caller asks."""
        if not (after < self._commit or (self._lost_to is not None and after < self.last_index)
                or self._led_alone_after(after)):
            return True
        new = self._log[max(0, after - self._snap_index):]
        h = self._handover
        if h is None:
            h = self._handover = _Handover(p, view, after, self.last_index, ())
        have = {(e.index, e.view) for e in h.entries}
        fresh = tuple(self.mark_handover(e) for e in new if (e.index, e.view) not in have)
        if fresh or (h.primary, h.view) != (p, view):
            self.handed_over += len(fresh)
            h.entries += fresh
            self._handover_dirty = self._handover_dirty or bool(fresh) or h.acked
            h.primary, h.view, h.acked, h.sent = p, view, False, -(10 ** 9)
            h.upto = max(h.upto, self.last_index)
        if not h.acked and self._ticks - h.sent >= max(1, self.failure_ticks // 2):
            self._send_handover()
        return True

    def _led_alone_after(self, after: int) -> bool:
        """All mode: my last established view was mine alone and my log holds its entries after
        ``after``.  Only a split brain makes another primary sync such a replica (the others
        wait for the last survivor, section 7 (b)); a lone primary killed during the split
        restarts recovering, never compares the sides, and its commit index may lag what it
        acknowledged (chaos seed 45: 30 chats acknowledged in a lone view, killed, restarted,
        replaced by the winner's snapshot unseen).  So its entries are handed over anyway."""
        return (self.quorum == QUORUM_ALL and self._primary == self.me and self._members == (self.me,)
                and self.n > 1 and self.last_view == self._view and self.last_index > after)

    def _send_handover(self) -> None:
        h = self._handover
        if h is None or h.acked:
            return
        h.sent = self._ticks
        self._send(h.primary, Reapply(h.view, h.upto, h.entries))

    def _retry_handover(self) -> None:
        """Resend an unacknowledged handover every half timeout, to the primary I follow now
        (in the view I promised: a new primary of the winning side takes it over)."""
        h = self._handover
        if h is None or self._ticks - h.sent < max(1, self.failure_ticks // 2):
            return
        if h.acked:
            self._handover = None
            return
        if self._serving:
            # I lead the winning side myself now: my own host proposes them again.
            h.primary, h.view, h.sent = self.me, self._view, self._ticks
            self._reapply_in.append((self.me, h.upto, h.entries))
        elif self._following is not None and self._following != self.me:
            h.primary, h.view = self._following, self._promised
            self._send_handover()

    def _on_reapply(self, p: int, m: Reapply) -> None:
        if self._status == PRIMARY and m.view == self._view and p != self.me:
            self._reapply_in.append((p, m.upto, tuple(m.entries)))

    def _on_reapply_ack(self, p: int, m: ReapplyAck) -> None:
        h = self._handover
        if h is not None and h.primary == p and h.view == m.view and m.upto >= h.upto \
                and not h.acked:
            h.acked = True
            self._handover_dirty = True   # the stored copy may go

    def reapply_done(self, peer: int, upto: int) -> None:
        """Host: every entry ``peer`` handed over up to ``upto`` is committed again (or was
        found present, or reported as not applicable): the loser may drop its copies."""
        if peer == self.me:
            self._on_reapply_ack(peer, ReapplyAck(self._view, upto))
        elif self._status == PRIMARY:
            self._send(peer, ReapplyAck(self._view, upto))

    def _diverge(self, p: int, view: int) -> None:
        """A committed entry conflicts with the primary's log: only possible after a network
        partition let two sides form views.  Ask for a snapshot (discarding our side)."""
        self._diverged = True
        self.divergences += 1
        self._send(p, AppendResp(view, False, 0, self._commit, True))

    def _assemble(self, p: int, m: InstallSnapshot) -> bytes | None:
        """Add one chunk; the whole state once its last chunk arrived in order, else None.

        Only one transfer is assembled at a time: a chunk of a newer one (newer view, or a
        later transfer of the same primary) discards the partial copy; a chunk of an older
        one is ignored.  Every chunk that does not complete the state is answered with how
        much is held in order, which paces the sender and tells it where to resume."""
        if m.offset + len(m.data) > m.total or (p, m.view, m.snap_id) == self._snap_done:
            return None                      # malformed, or a duplicate of a finished one
        part = self._snap_in
        if part is not None and not part.same_transfer(p, m):
            if (m.view, m.snap_id) < (part.view, part.snap_id):
                return None                  # a stale chunk of an older transfer
            part = self._snap_in = None
        if part is None:
            if m.offset != 0:
                self._send(p, SnapshotAck(m.view, m.snap_id, 0))   # start again, please
                return None
            if len(m.data) == m.total:
                self._snap_done = (p, m.view, m.snap_id)
                return m.data                # the whole state in one chunk
            part = self._snap_in = _SnapIn(p, m.view, m.snap_id, m.index, m.snap_view,
                                           m.total, bytearray())
        if m.offset == len(part.buf):
            part.buf += m.data
            if len(part.buf) == m.total:
                self._snap_in = None
                self._snap_done = (p, m.view, m.snap_id)
                return bytes(part.buf)
        # (a chunk past a gap, or a duplicate: say where we are)
        self._send(p, SnapshotAck(m.view, m.snap_id, len(part.buf)))
        return None

    def _on_snapshot(self, p: int, m: InstallSnapshot) -> None:
        if not self._accept_primary_msg(p, m.view):
            return
        data = self._assemble(p, m)
        if data is None:
            return
        try:
            snap_cfg = config_from_bytes(m.config) if m.config else None
        except ValueError:
            return     # (an authenticated peer does not send this; ignore rather than crash)
        mine = self.entry_view(m.index)     # None: inside my compacted prefix, or past my log
        split = mine is not None and mine != m.snap_view and m.index <= self._commit
        if (split or (self._lost_to is not None or self._led_alone_after(self._snap_index))
                and mine != m.snap_view) and not self._diverged:
            self._may_drop(p, m.view, self._snap_index)
        if split:
            self._diverged = True          # my committed history is another one (split brain)
            self.divergences += 1
        # Once I installed a forced snapshot of a primary in its view, my log is its history:
        # a later forced transfer of it (requested before the first one landed, delivered
        # out of order) is stale where my entry at its index is the same or inside my own
        # snapshot, and must not take back entries I acknowledged since (seeds 520, 545: the
        # log went below the primary's record of my match, which floored every probe).
        force = m.force and not (self._forced_by == (p, m.view) and (
            mine == m.snap_view or mine is None and m.index <= self._snap_index))
        if mine is not None and mine == m.snap_view and not (self._diverged or force):
            # Same history through m.index (log matching): keep my log -- it may hold entries
            # after m.index that I have acknowledged -- and just learn that m.index committed.
            if m.index > self._commit:
                self._commit = m.index
            match = m.index
        elif (mine is None and m.index <= self._snap_index
              and not (self._diverged or force)):
            # A stale snapshot below my own: ask for entries from my checkable snapshot point.
            self._send(p, AppendResp(m.view, False, 0, self._snap_index, False))
            return
        else:
            # I am behind the snapshot, or my entry there is another (uncommitted, or after a
            # split brain committed) history: replace everything.
            if self._diverged or force:
                self._diverged = False
                self._forced_by = (p, m.view)
            self._log = []
            if snap_cfg is not None and not self._joining_past(snap_cfg):
                self._base_cfg = snap_cfg     # the configuration at the snapshot point
                self._hs_dirty = True         # (persisted with the snapshot)
            self._refresh_config()
            self._snap_index, self._snap_view = m.index, m.snap_view
            self._runs = checked_runs(zip(m.runs[::2], m.runs[1::2]), m.index, m.snap_view)
            self._pending_snapshot = Snapshot(m.index, m.snap_view, data, self._runs)
            self._pending_trunc = None
            self._commit = m.index
            self._apply_cursor = m.index
            self._stable_last = min(self._stable_last, m.index)
            self._unstable_from = m.index + 1
            match = m.index
        self._after_sync(p, m.view, m.members, m.start, match, m.echo_inc)
        self._send(p, AppendResp(m.view, True, match, 0, False))

    # ------------------------------------------------------------------ elections
    def _start_campaign(self, failover: bool, add: set[int] = frozenset()) -> None:
        required = {p for p in self._members if p != self.me and not self.suspected(p)}
        required |= {p for p in add if not self.suspected(p)}
        required &= set(self.peers)      # members of my configuration only
        if self.quorum == QUORUM_MAJORITY and not self._is_majority(required):
            # The view must hold a majority of the cluster: ask the reachable non-members too
            # (they are synced before the view serves).  Cut off from a majority, do not even
            # promise a new view number -- it would only disrupt the majority's view later.
            required |= {p for p in self.peers if p in self._fresh and not self.suspected(p)}
            if not self._is_majority(required):
                if self._status == PRIMARY:
                    self._become_electing()   # stop acknowledging: no majority to fence others
                return
        w = self._next_view_number()
        self._set_hard(promised=w, to=self.me)
        self._serving = False
        self._campaign = _Campaign(w, required, {}, failover, self._ticks)
        self._status = ELECTING
        self._following = None
        self._reset_primary_state()
        for p in required:
            self._send(p, ViewChange(w, self._view, self.last_view, self.last_index, failover))
        self._maybe_establish()

    def _tick_electing(self) -> None:
        c = self._campaign
        if c is not None:
            c.required = {p for p in c.required if not self.suspected(p)}
            if self._maybe_establish():
                return
            if self.quorum == QUORUM_MAJORITY and not self._is_majority(c.required):
                self._become_electing(backoff=self._rk(self.me) + 1)   # no majority left
                return
            if self._ticks - c.started > 3 * self.failure_ticks:
                self._become_electing(backoff=self._rk(self.me) + 1)
                return
            if self._ticks % self.heartbeat_ticks == 0:
                for p in c.required - set(c.granted):
                    self._send(p, ViewChange(c.view, self._view, self.last_view,
                                             self.last_index, c.failover))
            return
        if self._following is not None:
            if not self.suspected(self._following):
                self._elect_wait = self.failure_ticks
                return      # syncing into the view I voted for
            self._following = None
        self._backoff -= 1
        if self._backoff > 0:
            return
        # no campaign: should I run?  The best live member by (est view, last view, last
        # index), ties by cluster order, runs at once; the others give it time.
        live = [p for p in self._members if p != self.me and p in self._rank
                and not self.suspected(p)]
        best = self.me
        bkey = (self._my_key(), -self._rk(self.me))
        for p in live:
            info = self._info.get(p)
            if info is None or p not in self._fresh:
                continue
            if _CODE_STATUS.get(info.status) == RECOVERING and info.view < self._view:
                continue
            k = (_key(info.view, info.last_view, info.last_index), -self._rank[p])
            if k > bkey:
                best, bkey = p, k
        self._elect_wait -= 1
        if best == self.me or self._elect_wait <= 0:
            self._start_campaign(failover=True)

    def _is_majority(self, others) -> bool:
        """Would a view of me and ``others`` hold a majority of the cluster?"""
        return 2 * (1 + len((set(others) & set(self.cluster)) - {self.me})) > self.n

    def _maybe_establish(self) -> bool:
        c = self._campaign
        if c is None or not c.required.issubset(c.granted):
            return False
        if self.quorum == QUORUM_MAJORITY and not self._is_majority(c.required):
            return False      # a voter was dropped (suspected): no majority, no view
        members = self._sorted([self.me] + [p for p in c.required])
        self._campaign = None
        self._set_hard(view=c.view, primary=self.me, members=members, promised=c.view)
        self._status = PRIMARY
        self._following = None
        self._diverged = False   # my log is my view's history now (see _become_sole_primary)
        self._start = self.last_index
        self._reset_primary_state()
        for p in members:
            if p == self.me:
                continue
            _, lv, li = c.granted[p]
            self._next[p] = min(li, self.last_index) + 1
            self._match[p] = 0
            self._progress[p] = False
            self._sent_commit[p] = -1
            self._send_append(p, force=True)
        self._update_serving()
        return True

    def _on_view_change(self, p: int, m: ViewChange) -> None:
        self._max_seen = max(self._max_seen, m.view)
        if self._alone() or p not in self._rank or self.me not in self._rank:
            return    # only members of my configuration elect, and are elected
        my = self._my_key()
        theirs = _key(m.est_view, m.last_view, m.last_index)

        def refuse() -> None:
            if self._following == p and self._status == ELECTING:
                # I voted for it once (a hand-over's campaign, which my preference does not
                # refuse); now that I refuse it, waiting for it would wait forever
                self._following = None
            self._send(p, Vote(m.view, False, self._promised, *my))

        if m.view < self._promised or (m.view == self._promised
                                       and not self._promised_to_is(p, m.view)):
            return refuse()
        if self._campaign is not None and m.view > self._campaign.view and theirs < my:
            return refuse()
        if theirs < my:
            return refuse()
        eligible = self._status != RECOVERING
        if (theirs == my and m.failover and eligible and self._rank[self.me] < self._rank[p]
                and self._primary != p):
            return refuse()  # I am preferred with an equal log: I will run
        if self._status == RECOVERING and self._following not in (None, p):
            return refuse()
        # grant: the promise is persisted before the vote leaves (Ready ordering)
        self._set_hard(promised=m.view, to=p)
        if self._status in (PRIMARY, BACKUP, ELECTING):
            self._become_electing()
            # Wait for the candidate I voted for rather than run against it (it is at least
            # as up to date as I am): _tick_electing waits while it is alive and reachable.
            self._following = p
        self._send(p, Vote(m.view, True, self._promised, *my))

    def _on_vote(self, p: int, m: Vote) -> None:
        self._observe_view(m.promised)
        c = self._campaign
        if c is None or m.view != c.view:
            return
        if m.granted:
            c.granted[p] = (m.est_view, m.last_view, m.last_index)
            self._maybe_establish()
        elif p in c.required:
            # refused: give way (the refuser is more up to date or preferred)
            self._become_electing(backoff=self.failure_ticks // 2 + self._rk(self.me))

    # ------------------------------------------------------------------ recovery
    def _tick_recovering(self) -> None:
        if self._following is not None:
            if self.suspected(self._following):
                self._following = None
            else:
                return
        if self._lost_to is not None:
            heard = [q for q in self._lost_to if q != self.me
                     and self._ticks - self._heard.get(q, -self.failure_ticks - 1) <= self.failure_ticks]
            if any(not self._waits_for_me(q) for q in heard):
                return   # the winner of the split brain is heard from: it syncs me
            # The winner is gone again (partitioned), or every replica of it I hear restarted
            # and waits for my view, newer than theirs (section 7 (b)), while I waited for
            # them (seed 17): decide afresh -- what they committed is handed over to me.
            self._lost_to = None
        # newest established view anybody reachable knows of
        best_view, best_members = self._view, self._members
        infos = {p: self._info[p] for p in self._fresh if p in self._info and not self.suspected(p)}
        for p, i in infos.items():
            if i.view > best_view:
                best_view, best_members = i.view, tuple(i.members)
        active = [p for p, i in infos.items() if i.view >= best_view and (
            _CODE_STATUS.get(i.status) == PRIMARY
            or (_CODE_STATUS.get(i.status) == BACKUP and i.primary != self.me))]
        if active or any(self._split_side(i) < 0 for i in infos.values()):
            return  # the view goes on (or a larger side's does): its primary will sync me
        if self._brand_new() and best_view == 0 and all(_fresh_info(i) for i in infos.values()) \
                and 2 * (1 + len(infos)) > self.n \
                and all(self.suspected(q) for q in self.peers if q not in infos):
            # A brand-new cluster: nobody reachable ever promised a view or held an entry, we
            # are a majority, and the others have stayed silent for a failure timeout.  The
            # first view needs a majority, so no view can exist among the silent ones, and none
            # can ever be formed by a fresh minority: there is nothing to be stale of.
            self._become_electing()
            return
        # A member whose removal is committed need not be heard (it held the removal before
        # the commit, so it never campaigned since, and every committed entry is on the
        # others) -- but then the view is older than my committed configuration, whose members
        # (the candidates of any newer view) must all be heard instead (sweep seed 18).
        base = self._base_cfg.ids
        need = [q for q in best_members if q in base]
        if len(need) < len(best_members):
            need += base
        if not all(q == self.me or q in infos for q in need):
            return  # cannot tell whether I am stale: wait
        if best_view == self._view and self.me in self._members:
            self._become_electing()

    def _waits_for_me(self, q: int) -> bool:
        """``q`` is recovering with an established view older than mine: by section 7 (b) it
        waits for my view's members, so it will not sync me."""
        i = self._info.get(q)
        return i is not None and _CODE_STATUS.get(i.status) == RECOVERING and i.view < self._view

    def _brand_new(self) -> bool:
        """Never promised a view, never held an entry: the state of a first start."""
        return self._view == 0 and self._promised == 0 and self.last_index == 0

    # ------------------------------------------------------------------ output
    def ready(self) -> Ready | None:
        self._flush_appends()
        committed: list[Entry] = []
        if self._commit > self._apply_cursor:
            lo = self._apply_cursor - self._snap_index
            committed = self._log[lo:self._commit - self._snap_index]
        entries = self._log[self._unstable_from - self._snap_index - 1:] \
            if self._unstable_from <= self.last_index else []
        if not (self._hs_dirty or self._pending_snapshot or self._pending_trunc is not None
                or entries or self._msgs or committed or self._snap_requests or self._reapply_in
                or self._handover_dirty):
            return None
        self._track_degraded()   # (a handover acknowledged, or the configuration changed)
        for e in committed:
            if e.index > self._base_cfg.index and (cfg := self._config_of(e)) is not None:
                self._base_cfg = cfg     # committed: persisted with the entries applied
                self._hs_dirty = True
        h = self._handover
        rd = Ready(
            hard_state=HardState(self._view, self._primary, self._members, self._promised,
                                 self._promised_to, self._base_cfg, self._degraded_from)
            if self._hs_dirty else None,
            snapshot=self._pending_snapshot,
            truncate_after=self._pending_trunc,
            entries=entries,  # slices of the log: new lists already
            messages=self._msgs,
            committed=committed,
            snapshot_requests=self._snap_requests,
            _last_index=self.last_index,
            _applied_to=self._commit if committed else self._apply_cursor,
            reapply=self._reapply_in,
            handover=(() if h is None or h.acked else h.entries) if self._handover_dirty else None,
        )
        self._reapply_in = []
        self._handover_dirty = False
        self._hs_dirty = False
        self._pending_snapshot = None
        self._pending_trunc = None
        self._msgs = []
        self._snap_requests = []
        self._unstable_from = self.last_index + 1
        self._apply_cursor = rd._applied_to
        return rd

    def advance(self, rd: Ready) -> None:
        self._stable_last = max(self._stable_last, min(rd._last_index, self.last_index))
        if rd.snapshot is not None:
            self._applied = rd.snapshot.index      # the host's state was replaced
        self._applied = max(self._applied, rd._applied_to)
        if self._status == PRIMARY:
            self._maybe_commit()

    # ------------------------------------------------------------------ compaction
    def compact(self, upto: int) -> None:
        """Forget entries <= ``upto`` (clamped to the applied index).  The host deletes the
        same rows from its store once the applied state covering them is durable."""
        upto = min(upto, self._applied, self._commit)
        if upto <= self._snap_index:
            return
        v = self.entry_view(upto)
        self._runs = self._runs_upto(upto)
        del self._log[:upto - self._snap_index]
        self._snap_index, self._snap_view = upto, v or 0

    def suggested_compaction(self) -> int | None:
        if len(self._log) <= 2 * self.retain_entries:
            return None
        upto = self._applied - self.retain_entries
        if self._degraded_from is not None:   # what a split brain's heal may need: kept ...
            # ... up to DEGRADED_RETAIN_FACTOR x the retention: a replica down for days must not
            # grow the survivors' log (held in memory too) without end.  Past that bound a heal
            # can lose (reported nowhere) what the losing side compacted: docs/replication.md §6
            upto = min(upto, max(self._degraded_from - 1, self._applied - DEGRADED_RETAIN_FACTOR * self.retain_entries))
        for out in self._snap_out.values():  # its receiver continues after its index, from my log
            upto = min(upto, out.index)
        return upto if upto > self._snap_index else None
