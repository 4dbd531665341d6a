"""The simulator's disk: a :class:`~chatnet.server.storage.Storage` in memory that forgets, at a
simulated crash, what was never synced.

It keeps what SQLite keeps (chatnet/server/store.py), in the shape the replica host expects
back at start-up: the stored snapshot of the chat state (``base`` at ``base_index``), the
retained log tail with the commit index written with each row, the meta keys (view, primary,
members, promised, snapshot_*: the log's base, view_runs: the entry views up to it), and the handover a healed split brain's losing
side still owes the winner.  The applied state is rebuilt at load time by replaying the
committed log after the snapshot (chatnet/server/storage.py), exactly as the real store does.

Un-synced batches (``Batch.sync`` false: only applying entries that are already durable) sit
in a queue; a synced batch makes every queued one durable before itself, as SQLite's WAL does.
A crash keeps a random prefix of the queue and drops the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..server.state import ChatState
from ..server.storage import Batch, Loaded, committed_index, replay


@dataclass
class _Record:
    """A batch frozen at commit time (the host keeps mutating its live state afterwards)."""

    snapshot: tuple | None  # (index, view, state bytes)
    checkpoint: tuple | None  # (index, view, state bytes)
    truncate_after: int | None
    entries: list  # (idx, view, data, committed)
    meta: dict
    compact_upto: int | None
    handover: list | None


def _frozen(snapshot: tuple | None) -> tuple | None:
    if snapshot is None:
        return None
    index, view, state = snapshot
    return index, view, bytes(state) if isinstance(state, (bytes, bytearray)) else state.to_snapshot()


@dataclass
class SimDisk:
    base: bytes = field(default_factory=lambda: ChatState().to_snapshot())
    base_index: int = 0  # the index ``base`` (the stored snapshot of the state) was taken at
    base_view: int = 0
    log: list = field(default_factory=list)  # (idx, view, data, committed), contiguous
    meta: dict = field(default_factory=dict)
    handover: list = field(default_factory=list)  # (idx, view, data), as the store's handover table
    unsynced: list = field(default_factory=list)
    snapshots: int = 0  # snapshots installed (the simulator's statistics)
    checkpoints: int = 0  # the host's own snapshots written
    fail_after_commit: bool = False  # crash injection: the next commit lands, then the "machine" dies
    # Asynchronous commits, as BackgroundStorage makes them: submitted batches wait in
    # ``in_flight`` until the simulator calls complete(); a crash loses those still waiting.
    delay_commits: bool = False
    in_flight: list = field(default_factory=list)  # (record, sync), oldest first
    durable: int = 0  # batches made durable so far (the Storage interface)
    error = None

    # -- Storage --------------------------------------------------------------------------------
    def load(self) -> Loaded:
        applied = self.applied_index
        state = replay(ChatState.from_snapshot(self.base), self.log, self.base_index, applied)
        meta = dict(self.meta)
        if not self.log:
            meta.update(snapshot_index=self.base_index, snapshot_view=self.base_view)
        return Loaded(state, applied, meta, [e[:3] for e in self.log], list(self.handover),
                      self.base_index, len(self.base))

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
        if batch.snapshot is not None:
            self.snapshots += 1
        handover = list(batch.handover) if batch.handover is not None else None
        entries = [(idx, view, data, batch.committed) for idx, view, data in batch.entries]
        return _Record(_frozen(batch.snapshot), _frozen(batch.checkpoint), batch.truncate_after, entries,
                       dict(batch.meta), batch.compact_upto, handover)

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
        """The log's base: the index before its first retained entry."""
        return self.log[0][0] - 1 if self.log else self.base_index

    @property
    def applied_index(self) -> int:
        """What a restart would apply: the stored snapshot plus the committed log after it."""
        return committed_index(self.base_index, self.log)

    def entry_data(self, index: int) -> bytes | None:
        for idx, _view, data, _committed in self.log:
            if idx == index:
                return data
        return None

    def _write(self, r: _Record) -> None:
        if r.snapshot is not None:
            self.base_index, self.base_view, self.base = r.snapshot
            self.log = []
        if r.checkpoint is not None:
            self.base_index, self.base_view, self.base = r.checkpoint
            self.checkpoints += 1
        if r.truncate_after is not None:
            self.log = [e for e in self.log if e[0] <= r.truncate_after]
        for entry in r.entries:
            if self.log and self.log[-1][0] >= entry[0]:  # INSERT OR REPLACE of a suffix
                self.log = [e for e in self.log if e[0] < entry[0]]
            self.log.append(entry)
        self.meta.update(r.meta)
        if r.compact_upto is not None:
            self.log = [e for e in self.log if e[0] > r.compact_upto]
        if r.handover is not None:
            self.handover = list(r.handover)


class SimCrash(Exception):
    """Raised inside a host cycle to model the machine dying at that instant."""
