"""Durable writes on a thread of their own, so the reactor never waits for fsync.

The host hands each loop iteration's :class:`~.storage.Batch` to :meth:`BackgroundStorage.submit`
and goes on reading, decoding and applying the next requests.  One storage thread writes what
is queued — every batch waiting when it comes round, in one SQLite transaction (group commit
across iterations) — then raises :attr:`durable` and wakes the reactor.  When nothing is
queued after that, it checkpoints the SQLite WAL now and then (``Store.checkpoint_when_idle``),
so that copy no longer delays an acknowledgement inside a later ``COMMIT``.  The host releases a
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

import gc
import logging
import os
import queue
import signal
import threading
import time

from .status import serialized, state_digest
from .storage import Batch, Loaded
from .store import Store

log = logging.getLogger(__name__)

_STOP = object()  # queued by close(): the thread ends after what was queued before it
FLUSH_POLL = 0.001  # s between looks at durable while flush() waits (shutdown only)
CHILD_RETRY_S = 1.0  # after a snapshot child failed: no new one before this many seconds


class BackgroundStorage:
    """The storage thread and its hand-off with the loop.

    The queue is a ``queue.SimpleQueue`` (C): ``submit`` is one ``put`` that wakes the thread
    only when it waits, and the thread blocks in ``get`` with the GIL released.  It replaced a
    ``threading.Condition``, whose Python ``notify``/``wait`` (a lock allocated per wait, an
    RLock taken on both sides) cost the loop more than the hand-off itself (docs/benchmarks.md,
    "Where the loop's time goes").  ``durable`` is written by the thread alone and read by the
    loop (an int, atomic under the GIL); ``wake`` should be the reactor's ``wake_hooks``,
    which skips the wake-up when the loop will look at ``durable`` anyway."""

    def __init__(self, store: Store, wake=None):
        self.store = store
        self.wake = wake or (lambda: None)  # thread-safe: makes the loop run its hooks soon
        self.durable = 0  # batches made durable so far (only the thread writes it)
        self.error: BaseException | None = None
        self._submitted = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # Batch, or _STOP
        # the host's checkpoints (host.Checkpoints) serialize the state in a forked child
        self.snapshotter = ForkSnapshots(self.wake) if hasattr(os, "fork") else None
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
        self._submitted += 1
        self._queue.put(batch)
        return self._submitted

    @property
    def pending(self) -> int:
        return self._submitted - self.durable

    def _run(self) -> None:
        while True:
            batches, stop = self._take()
            if batches:
                if not self._guarded(self.store.commit_many, batches):
                    return
                self.durable += len(batches)
                self.wake()
                # nothing waits: the WAL's checkpoint, if due, runs now, off any ack's path
                if self._queue.empty() and not self._guarded(self.store.checkpoint_when_idle):
                    return
            if stop:
                return

    def _take(self) -> tuple[list, bool]:
        """Every batch queued (waiting for the first), and whether close() asked to stop."""
        first = self._queue.get()
        items = [first]
        while not self._queue.empty():  # (one consumer: what empty() denies, get_nowait has)
            items.append(self._queue.get_nowait())
        batches = [item for item in items if item is not _STOP]
        return batches, len(batches) < len(items)

    def _guarded(self, write, *args) -> bool:
        """Run one store operation; False after a failure, which is kept for the loop thread
        (it re-raises it at the next release and the replica stops rather than acknowledge)."""
        try:
            write(*args)
        except BaseException as exc:
            self.error = exc
            self.wake()
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is durable; False on timeout or error.  Only a
        stopping replica waits (shutdown, the final checkpoint), so it polls rather than
        make the thread signal every commit to a waiter that almost never exists."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.durable < self._submitted and self.error is None and self._thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(FLUSH_POLL)
        return self.durable >= self._submitted and self.error is None

    def close(self) -> None:
        if self.snapshotter is not None:
            self.snapshotter.close()
        self.flush(timeout=30)
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        self.store.close()


class ForkSnapshots:
    """Serializes the chat state in a forked child: copy-on-write, as Redis' BGSAVE does (for
    the host's checkpoints, snapshots sent to lagging peers and the status digest alike).

    The loop pauses only for ``fork()`` (about 4 ms for a 200 MB replica here: docs/benchmarks.md)
    instead of the whole serialization (a third of a second for 10,000 accounts and 100,000
    queued chats); the child sees the state exactly as of the fork, writes its bytes into a pipe
    and exits; a reader thread collects them (and hashes them for the digest), reaps the child
    and wakes the reactor.  The child
    closes every other file descriptor at once (the listening socket, peer links, the store), so
    a replica restarted while a child still runs can bind its port again, and it exits with
    status 0 only after writing everything: a child that dies is a snapshot skipped, never a
    torn one.  One at a time (``busy``).

    Failures do not stop the replica and do not spin: a child that fails keeps the maker busy
    for ``CHILD_RETRY_S`` (otherwise the peers still waiting would have a child forked, and a
    warning logged, on every loop pass), and a ``fork()`` the system refuses (out of memory,
    the process limit) serializes on the loop instead, as before this class existed: a pause,
    but the checkpoint that bounds the log and the snapshot a lagging peer waits for are made."""

    def __init__(self, wake) -> None:
        self.wake = wake
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._done: tuple | None = None
        self._finished = False
        self._inline: tuple | None = None  # made on the loop because fork() failed
        self._retry_at: float | None = None  # busy until then, after a failed child

    @property
    def busy(self) -> bool:
        if self._retry_at is not None:
            if time.monotonic() < self._retry_at:
                return True
            self._retry_at = None
        return self._thread is not None

    def start(self, state, tag: tuple) -> None:
        """Fork a child that serializes ``state`` as it is now; ``tag`` (what the caller needs
        to know of that moment: its index, view, ...) comes back with the bytes."""
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            log.warning("cannot fork a snapshot child (%s): serializing on the loop instead", exc)
            self._inline = serialized(state, tag)
            return
        if pid == 0:
            _serialize_in_child(state, read_end, write_end)  # never returns
        os.close(write_end)
        self._pid, self._finished, self._done = pid, False, None
        self._thread = threading.Thread(target=self._collect, args=(read_end, pid, tag),
                                        name="chatnet-snapshot", daemon=True)
        self._thread.start()

    def _collect(self, read_end: int, pid: int, tag: tuple) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            self._done = (tag, data, state_digest(data))  # (hashlib lets the loop run meanwhile)
        else:
            log.warning("the snapshot child %d failed (status %d): snapshot skipped", pid, status)
        self._finished = True
        self.wake()

    def take(self) -> tuple | None:
        """The finished snapshot (tag, bytes, digest), once; None while it runs, and once
        when the child failed (then :attr:`busy` for ``CHILD_RETRY_S``)."""
        if self._inline is not None:
            done, self._inline = self._inline, None
            return done
        if self._thread is None or not self._finished:
            return None
        self._thread.join()
        self._thread = self._pid = None
        done, self._done = self._done, None
        if done is None:
            self._retry_at = time.monotonic() + CHILD_RETRY_S
        return done

    def close(self) -> None:
        """Stop a child still running (shutdown) and reap it."""
        if self._pid is not None and not self._finished:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = self._pid = self._done = None


def _serialize_in_child(state, read_end: int, write_end: int) -> None:
    """The forked child: write ``state``'s snapshot bytes to ``write_end``, then exit."""
    code = 1
    try:
        gc.disable()  # touching every object would copy every page
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                signal.signal(signum, signal.SIG_DFL)
            except ValueError:  # forked from a thread other than the main one (tests)
                break
        os.closerange(3, write_end)
        os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX"))
        os.nice(5)  # the replica's own threads come first on a busy machine
        view = memoryview(state.to_snapshot())
        while view:
            view = view[os.write(write_end, view):]
        code = 0
    finally:
        os._exit(code)
