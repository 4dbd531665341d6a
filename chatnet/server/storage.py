"""The storage interface of a replica host: what it loads at start-up and what one loop
iteration writes.  Two implementations: the SQLite :class:`~.store.Store` (production) and the
simulator's ``SimDisk`` (:mod:`chatnet.replication.simdisk`), which can lose un-synced writes
when a simulated machine crashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .state import ChatState


@dataclass
class Loaded:
    """What a replica finds in its storage at start-up."""

    state: ChatState
    applied_index: int
    meta: dict = field(default_factory=dict)  # view, primary, members, promised, snapshot_*
    log: list = field(default_factory=list)  # (idx, view, data): the retained tail of the log
    # (idx, view, data): entries a healed split brain's losing side still owes the winner
    handover: list = field(default_factory=list)


@dataclass
class Batch:
    """Everything one loop iteration must make durable, written as one transaction."""

    # (index, view, state) replacing state and log; the host passes the snapshot's bytes, never
    # its live ChatState, so a background writer never reads state the loop is changing
    snapshot: tuple | None = None
    truncate_after: int | None = None
    entries: list = field(default_factory=list)  # (idx, view, data)
    changes: list = field(default_factory=list)  # row changes from ChatState.apply
    applied_index: int | None = None
    meta: dict = field(default_factory=dict)
    compact_upto: int | None = None
    # not None: the stored handover (idx, view, data) becomes exactly this (replication
    # core's Ready.handover), in the same transaction as the truncation that drops them
    handover: list | None = None
    sync: bool = False  # holds log entries or hard state: must be on disk before anything leaves

    def __bool__(self) -> bool:
        return bool(self.snapshot or self.truncate_after is not None or self.entries or self.changes
                    or self.applied_index is not None or self.meta or self.compact_upto is not None
                    or self.handover is not None)


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
