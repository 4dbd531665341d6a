"""The storage interface of a replica host: what it loads at start-up and what one loop
iteration writes.  Two implementations: the SQLite :class:`~.store.Store` (production) and the
simulator's ``SimDisk`` (:mod:`chatnet.replication.simdisk`), which can lose un-synced writes
when a simulated machine crashes.

The chat state lives in memory; the durable record is the replicated log plus a snapshot of
the state now and then (issue 12).  A batch writes log entries and hard state, never state
rows; a *checkpoint* (the state serialized at an applied index) replaces the stored state from
time to time and lets the log below it go.  At start-up the state is the stored snapshot with
the committed log entries after it replayed (:func:`replay`).

Which entries are committed after a restart?  Only those the replica *knew* were committed
when it wrote them: each log row carries the commit index the host knew when it wrote that row
(``Batch.committed``), in the same transaction, so it can never point past rows that exist
(a truncation only removes entries above every commit index).  Entries beyond it stay in the
log, unapplied: they may still be replaced by a new primary, and the replication core applies
them once it learns again that they are committed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .state import ChatState


@dataclass
class Loaded:
    """What a replica finds in its storage at start-up."""

    state: ChatState  # the stored snapshot with the committed log after it replayed
    applied_index: int
    meta: dict = field(default_factory=dict)  # view, primary, members, promised, snapshot_* (log base)
    log: list = field(default_factory=list)  # (idx, view, data): the retained tail of the log
    # (idx, view, data): entries a healed split brain's losing side still owes the winner
    handover: list = field(default_factory=list)
    state_index: int = 0  # the index the stored snapshot of the state was taken at
    state_bytes: int = 0  # its size (the host's snapshot policy)


@dataclass
class Batch:
    """Everything one loop iteration must make durable, written as one transaction."""

    # (index, view, state) replacing state and log (an installed snapshot); the host passes the
    # snapshot's bytes, never its live ChatState, so a background writer never reads state the
    # loop is changing
    snapshot: tuple | None = None
    # (index, view, state bytes): this replica's own snapshot of its applied state; replaces
    # the stored state only (written in order after every earlier batch, so after the entries
    # up to ``index``)
    checkpoint: tuple | None = None
    truncate_after: int | None = None
    entries: list = field(default_factory=list)  # (idx, view, data)
    committed: int = 0  # the commit index known when ``entries`` are written (module docstring)
    meta: dict = field(default_factory=dict)
    compact_upto: int | None = None  # log rows up to here go (never above the stored snapshot)
    # not None: the stored handover (idx, view, data) becomes exactly this (replication
    # core's Ready.handover), in the same transaction as the truncation that drops them
    handover: list | None = None
    sync: bool = False  # holds log entries or hard state: must be on disk before anything leaves
    chats: int = 0  # chats the commands applied in this iteration queued (metrics; not written)

    def __bool__(self) -> bool:
        return bool(self.snapshot or self.checkpoint or self.truncate_after is not None or self.entries
                    or self.meta or self.compact_upto is not None or self.handover is not None)


class StoreError(Exception):
    """The store cannot be opened or written; the replica must stop rather than guess."""


class Storage(Protocol):
    """Durable storage of one replica (see :class:`Batch`).

    ``submit`` queues a batch and returns its number; ``durable`` is how many batches are on
    disk.  A synchronous store (:class:`Synchronous`) makes each durable before ``submit``
    returns; :class:`~.background.BackgroundStorage` does it on a thread, and the simulator's
    disk can complete them later.  The host releases a batch's outputs only once ``durable``
    covers it; ``error`` is a failure of the writer, re-raised on the loop thread."""

    durable: int
    error: BaseException | None

    def load(self) -> Loaded: ...

    def submit(self, batch: Batch) -> int: ...

    def close(self) -> None: ...


class Synchronous:
    """``submit`` for a store whose ``commit(batch)`` returns once the batch is durable."""

    durable = 0
    error = None

    def submit(self, batch: Batch) -> int:
        self.commit(batch)
        self.durable += 1
        return self.durable


def replay(state: ChatState, log: list, after: int, upto: int) -> ChatState:
    """Apply the commands of ``log`` rows (idx, view, data, ...) with ``after < idx <= upto``
    to ``state`` in order (start-up: the stored snapshot plus the committed log suffix)."""
    from ..replication.membership import is_config_entry  # the core's entries: not chat
    from .state import decode_command

    for row in log:
        if after < row[0] <= upto and not is_config_entry(row[2]):
            state.apply(decode_command(bytes(row[2])), row[0])
    return state


def committed_index(state_index: int, rows: list) -> int:
    """What a replica knows is committed at start-up: its snapshot's index, or the highest
    commit index written with a log row (rows (idx, view, data, committed)), never beyond the
    last row (module docstring)."""
    last = max((row[0] for row in rows), default=state_index)
    known = max((row[3] for row in rows), default=0)
    return max(state_index, min(known, last))
