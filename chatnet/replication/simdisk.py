"""The simulator's disk: a :class:`~chatnet.server.storage.Storage` in memory that forgets, at a
simulated crash, what was never synced.

It keeps what SQLite keeps, in the shape the replica host expects back at start-up: a base
snapshot of the chat state (at ``snapshot_index``), the retained log tail, and the meta keys
(view, primary, members, promised, applied_index, snapshot_*), and the handover a healed split
brain's losing side still owes the winner.  The applied state is not
stored row by row; it is rebuilt at load time by applying the logged commands from the base
snapshot up to ``applied_index``, which is exactly the promise the real store makes ("the
applied index and the rows it describes are written together").

Un-synced batches (``Batch.sync`` false: only applying entries that are already durable) sit
in a queue; a synced batch makes every queued one durable before itself, as SQLite's WAL does.
A crash keeps a random prefix of the queue and drops the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..server.state import ChatState, decode_command
from ..server.storage import Batch, Loaded


@dataclass
class _Record:
    """A batch frozen at commit time (the host keeps mutating its live state afterwards)."""

    snapshot: tuple | None  # (index, view, state bytes)
    truncate_after: int | None
    entries: list
    meta: dict
    compact_upto: int | None
    handover: list | None


@dataclass
class SimDisk:
    base: bytes = field(default_factory=lambda: ChatState().to_snapshot())
    log: list = field(default_factory=list)  # (idx, view, data), contiguous after snapshot_index
    meta: dict = field(default_factory=dict)
    handover: list = field(default_factory=list)  # (idx, view, data), as the store's handover table
    unsynced: list = field(default_factory=list)
    snapshots: int = 0  # snapshots installed (the simulator's statistics)
    fail_after_commit: bool = False  # crash injection: the next commit lands, then the "machine" dies
    # Asynchronous commits, as BackgroundStorage makes them: submitted batches wait in
    # ``in_flight`` until the simulator calls complete(); a crash loses those still waiting.
    delay_commits: bool = False
    in_flight: list = field(default_factory=list)  # (record, sync), oldest first
    durable: int = 0  # batches made durable so far (the Storage interface)
    error = None

    # -- Storage --------------------------------------------------------------------------------
    def load(self) -> Loaded:
        state = ChatState.from_snapshot(self.base)
        applied = self.applied_index
        for idx, _view, data in self.log:
            if self.snapshot_index < idx <= applied:
                state.apply(decode_command(data))
        return Loaded(state, applied, dict(self.meta), list(self.log), list(self.handover))

    def submit(self, batch: Batch) -> int:
        """Queue ``batch``; with ``delay_commits`` it lands only when complete() says so."""
        record = self._freeze(batch)
        if self.delay_commits:
            self.in_flight.append((record, batch.sync))
            return self.durable + len(self.in_flight)
        self.durable += 1  # first: a crash injected as it lands still leaves it on disk
        self._land(record, batch.sync)
        return self.durable

    def complete(self, n: int = 1) -> None:
        """The oldest ``n`` submitted batches reach the disk (a crash may still lose the
        un-synced ones, as after any commit)."""
        done, self.in_flight = self.in_flight[:n], self.in_flight[n:]
        for record, sync in done:
            self.durable += 1
            self._land(record, sync)

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` now (restore and test setups; the host uses submit())."""
        self._land(self._freeze(batch), batch.sync)

    def _freeze(self, batch: Batch) -> _Record:
        meta = dict(batch.meta)
        if batch.applied_index is not None:
            meta["applied_index"] = batch.applied_index
        snap = None
        if batch.snapshot is not None:
            index, view, state = batch.snapshot
            snap = (index, view, state if isinstance(state, (bytes, bytearray)) else state.to_snapshot())
            self.snapshots += 1
        handover = list(batch.handover) if batch.handover is not None else None
        return _Record(snap, batch.truncate_after, list(batch.entries), meta, batch.compact_upto, handover)

    def _land(self, record: _Record, sync: bool) -> None:
        self.unsynced.append(record)
        if sync:
            self.sync()
        if self.fail_after_commit:
            self.fail_after_commit = False
            raise SimCrash("crash injected after the store commit")

    def close(self) -> None:
        pass

    # -- simulation -----------------------------------------------------------------------------
    def sync(self) -> None:
        for record in self.unsynced:
            self._write(record)
        self.unsynced = []

    def crash(self, rng: random.Random) -> int:
        """The machine dies: a random prefix of the un-synced batches survives.  Returns how
        many were lost."""
        keep = rng.randint(0, len(self.unsynced))
        lost = len(self.unsynced) - keep + len(self.in_flight)
        self.unsynced = self.unsynced[:keep]
        self.in_flight = []
        self.sync()
        return lost

    @property
    def snapshot_index(self) -> int:
        return self.meta.get("snapshot_index", 0)

    @property
    def applied_index(self) -> int:
        return self.meta.get("applied_index", 0)

    def entry_data(self, index: int) -> bytes | None:
        for idx, _view, data in self.log:
            if idx == index:
                return data
        return None

    def _write(self, r: _Record) -> None:
        if r.snapshot is not None:
            index, view, data = r.snapshot
            self.base, self.log = data, []
            self.meta.update(snapshot_index=index, snapshot_view=view, applied_index=index)
        if r.truncate_after is not None:
            self.log = [e for e in self.log if e[0] <= r.truncate_after]
        for entry in r.entries:
            if self.log and self.log[-1][0] >= entry[0]:  # INSERT OR REPLACE of a suffix
                self.log = [e for e in self.log if e[0] < entry[0]]
            self.log.append(entry)
        base_index = self.snapshot_index
        self.meta.update(r.meta)
        if r.compact_upto is not None:
            self._compact(base_index, r.compact_upto)
        if r.handover is not None:
            self.handover = list(r.handover)

    def _compact(self, base_index: int, upto: int) -> None:
        """Move the base snapshot from ``base_index`` up to ``upto`` and drop the log up to it."""
        state = ChatState.from_snapshot(self.base)
        for idx, _view, data in self.log:
            if base_index < idx <= upto:
                state.apply(decode_command(data))
        self.base = state.to_snapshot()
        self.log = [e for e in self.log if e[0] > upto]


class SimCrash(Exception):
    """Raised inside a host cycle to model the machine dying at that instant."""
