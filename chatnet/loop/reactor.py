"""A single-threaded event loop on ``selectors`` with a timer wheel, in the manner of Redis' ae.c.

One iteration:  run the before-sleep hooks (group commit, then writing replies) → wait in
``select`` until a socket is ready or the nearest timer is due → dispatch socket events →
advance the timer wheel.  The poll timeout comes from the wheel, or is zero when a hook says
more work is already pending, so timers are never late by more than a tick and pending work
never waits for an unrelated event.

Handlers are objects with ``handle_event(mask)`` and a ``closed`` attribute; the loop skips a
handler that an earlier callback of the same iteration closed.  Signals (SIGINT/SIGTERM) only
set a flag and wake the selector through a socket pair, so shutdown happens between
iterations, never inside a handler.

The loop waits in ``selectors.DefaultSelector`` (epoll on Linux, kqueue on the BSDs and macOS),
so a replica runs wherever CPython does.  Calling ``select.epoll`` directly was measured
(docs/benchmarks.md, the hot path) to save a key look-up and a tuple per ready socket, but it
ties the server to Linux; what the hot path kept is the rest: interest changes only when the
mask changes, and one read to drain the waker.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import time

from .timerwheel import TimerWheel

log = logging.getLogger(__name__)

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class _Waker:
    """The read end of the signal wake-up socket pair: drained, never acted on."""

    closed = False

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def handle_event(self, mask: int) -> None:
        # One read, not a read until EAGAIN: wake-ups are a byte each and far fewer than 4096
        # per iteration; any left keep the socket readable and are drained next iteration.
        try:
            self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass


class Reactor:
    def __init__(self, clock=time.monotonic, tick: float = 0.01):
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.timers = TimerWheel(clock(), tick=tick)
        self.before_sleep: list = []  # callables returning True when more work is pending
        self.stopping = False
        self.stop_reason = ""
        self._masks: dict[int, int] = {}  # fd -> registered READ/WRITE mask
        self._signals_installed = False
        self.on_stall = None  # called with the lateness (s) when select() returned far too late
        self.stall_threshold = float("inf")
        self._last_wake = clock()
        self._polling = False  # from just before select() until it returns (wake_hooks)
        self._news = 0  # wake_hooks() calls so far
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.set_interest(self._wake_r, READ, _Waker(self._wake_r))

    # -- registration: one call site per change of interest ----------------------------------
    def set_interest(self, sock: socket.socket, mask: int, handler) -> None:
        """Make ``sock``'s registered events exactly ``mask`` (0 = unregistered)."""
        fd = sock.fileno()
        old = self._masks.get(fd, 0)
        if old == mask:
            return
        if mask == 0:
            del self._masks[fd]
            self.selector.unregister(fd)
            return
        if old == 0:
            self.selector.register(fd, mask, handler)
        else:
            self.selector.modify(fd, mask, handler)
        self._masks[fd] = mask

    def forget(self, sock: socket.socket) -> None:
        """Unregister ``sock`` before it is closed."""
        try:
            self.set_interest(sock, 0, None)
        except (KeyError, ValueError):
            pass

    # -- signals ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno())
        self._signals_installed = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop(signal.Signals(signum).name)

    def wake(self) -> None:
        """Make a select() in progress return at once.  Safe to call from any thread (the
        storage thread calls it when a batch is durable): one byte into a socket pair."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full (the loop is awake anyway) or we are closing
            pass

    def wake_hooks(self) -> None:
        """:meth:`wake`, for a thread whose news the before-sleep hooks pick up (the storage
        thread's durable batches), with the wake-up sent only when the loop is in select() or
        about to enter it.  The news is counted first; the loop compares the count after its
        hooks with the count before them and, if it moved, polls without waiting and runs the
        hooks again.  So news that arrives while the loop dispatches events, timers or runs
        its hooks costs nothing but the count; only news that arrives while it may sleep is
        sent as a byte (the flag and the count are plain attributes: under the GIL each
        thread sees the other's writes in order).  Under load that saves, per durable commit,
        a send() on the storage thread (and its GIL round trip), an epoll event and a recv()
        on the loop."""
        self._news += 1
        if self._polling:
            self.wake()

    def stop(self, reason: str = "stop requested") -> None:
        self.stopping = True
        self.stop_reason = reason
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # -- the loop -----------------------------------------------------------------------------
    def run_once(self, max_wait: float | None = None) -> None:
        news = self._news
        busy = False
        for hook in self.before_sleep:
            busy = bool(hook()) or busy
        self._polling = True  # from here on, news is sent as a wake-up (wake_hooks)
        if busy or self._news != news:  # (news the hooks may have missed: look again at once)
            timeout = 0.0
        else:
            deadline = self.timers.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            if max_wait is not None:
                timeout = max_wait if timeout is None else min(timeout, max_wait)
        before = self.clock()
        events = self._poll(timeout)
        self._polling = False
        after = self.clock()
        # A stall is time the loop did not run when it should have: select() returning far past
        # its timeout (SIGSTOP while idle), or the previous iteration's work taking that long
        # (SIGSTOP mid-iteration, swapping).  Peers stop hearing from us either way, so the
        # owner must learn of it before acting on anything that queued up meanwhile.
        late = max(after - before - (timeout if timeout is not None else after - before),
                   before - self._last_wake)
        self._last_wake = after
        if late > self.stall_threshold and self.on_stall is not None:
            self.on_stall(late)
        for handler, mask in events:
            if handler.closed:
                continue
            try:
                handler.handle_event(mask)
            except Exception:  # a bug in one handler must not take the replica down
                log.exception("handler %r failed", handler)
                close = getattr(handler, "close", None)
                if close is not None:
                    close()
        try:
            self.timers.advance(self.clock())
        except Exception:
            log.exception("timer callback failed")

    def _poll(self, timeout: float | None) -> list:
        """Wait for events; (handler, READ/WRITE mask) of each ready descriptor."""
        return [(key.data, mask) for key, mask in self.selector.select(timeout)]

    def run(self) -> None:
        self._last_wake = self.clock()  # start-up work before the loop is not a stall
        while not self.stopping:
            self.run_once()

    def close(self) -> None:
        if self._signals_installed:
            signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
