"""Durable writes on a thread of their own, so the reactor never waits for fsync.

The host hands each loop iteration's :class:`~.storage.Batch` to :meth:`BackgroundStorage.submit`
and goes on reading, decoding and applying the next requests.  One storage thread writes what
is queued — every batch waiting when it comes round, in one SQLite transaction (group commit
across iterations) — then raises :attr:`durable` and wakes the reactor.  The host releases a
batch's peer messages, answers and live chat only once :attr:`durable` covers it
(``ReplicaHost.release``), so persist-before-send and answer-after-commit hold exactly as with
a synchronous store; only the loop no longer stands still meanwhile.  This is the shape of
Redis' background I/O threads and libuv's file operations: the event loop owns all state, the
thread owns only the file.

Nothing the thread reads is mutated by the loop afterwards: a batch holds bytes, tuples of
plain values and a snapshot as bytes, never the live chat state.  A store failure is kept and
re-raised on the loop thread at the next release: the replica stops rather than acknowledge.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from .storage import Batch, Loaded
from .store import Store

log = logging.getLogger(__name__)


class BackgroundStorage:
    def __init__(self, store: Store, wake=None):
        self.store = store
        self.wake = wake or (lambda: None)  # thread-safe: makes the reactor's select() return
        self.durable = 0  # batches made durable so far (only the thread writes it)
        self.error: BaseException | None = None
        self._submitted = 0
        self._queue: deque[Batch] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="chatnet-storage", daemon=True)
        self._thread.start()

    def load(self) -> Loaded:
        return self.store.load()

    @property
    def path(self) -> str:
        """The database file (metrics read its size)."""
        return self.store.path

    def submit(self, batch: Batch) -> int:
        """Queue ``batch``; its number, which :attr:`durable` reaches once it is on disk."""
        with self._cv:
            self._queue.append(batch)
            self._submitted += 1
            self._cv.notify()
            return self._submitted

    @property
    def pending(self) -> int:
        return self._submitted - self.durable

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                batches = list(self._queue)
                self._queue.clear()
            try:
                self.store.commit_many(batches)
            except BaseException as exc:  # kept for the loop thread, which stops the replica
                self.error = exc
                self.wake()
                return
            with self._cv:
                self.durable += len(batches)
                self._cv.notify_all()
            self.wake()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is durable (shutdown); False on timeout or error."""
        with self._cv:
            return self._cv.wait_for(lambda: self.durable == self._submitted or self.error is not None,
                                     timeout) and self.error is None

    def close(self) -> None:
        self.flush(timeout=30)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self.store.close()
