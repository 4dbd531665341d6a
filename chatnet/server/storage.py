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


@dataclass
class Batch:
    """Everything one loop iteration must make durable, written as one transaction."""

    snapshot: tuple | None = None  # (index, view, ChatState) replacing state and log
    truncate_after: int | None = None
    entries: list = field(default_factory=list)  # (idx, view, data)
    changes: list = field(default_factory=list)  # row changes from ChatState.apply
    applied_index: int | None = None
    meta: dict = field(default_factory=dict)
    compact_upto: int | None = None
    sync: bool = False  # holds log entries or hard state: must be on disk before anything leaves

    def __bool__(self) -> bool:
        return bool(self.snapshot or self.truncate_after is not None or self.entries or self.changes
                    or self.applied_index is not None or self.meta or self.compact_upto is not None)


class Storage(Protocol):
    """Durable storage of one replica (see :class:`Batch`)."""

    def load(self) -> Loaded: ...

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` atomically; with ``batch.sync``, return only once it is durable."""

    def close(self) -> None: ...
