"""A hashed timer wheel for the single-threaded reactor (client timeouts, heartbeats, elections).

The idea follows Netty's ``HashedWheelTimer`` and Linux ``kernel/time/timer.c``: time is cut
into ticks of ``tick`` seconds, and a timer due in absolute tick ``b`` lives in slot
``b & mask`` of a power-of-two array, so scheduling is O(1) and advancing one tick looks at one
slot.  The wheel never reads the clock: the reactor passes a monotonic ``now`` to ``advance``,
which keeps it deterministic and lets tests own time.  Delays given to ``call_later`` count from
the ``now`` of the latest ``advance`` (or of the constructor).

Rounds.  Netty keeps a per-timer "remaining rounds" counter to tell this turn's timers from
later turns' in the same slot.  Here each slot is a dict keyed by the absolute tick ``b`` (the
rounds counter made explicit: rounds = ``(b - current) >> log2(slots)``), holding a dict of its
timers.  Advancing to tick ``k`` is then one ``slot.get(k)`` and never touches timers of later
turns, and ``next_deadline`` can probe the next turn tick by tick in O(slots).

Precision.  Ticks only choose the bucket.  Firing compares the exact ``when`` with ``now``:
``advance(now)`` runs a timer iff ``when <= now``, so a timer never fires early and is never
late by more than the caller's polling granularity.  Bucketing uses one monotone float formula
(``floor((when - origin) / tick)``) for deadlines and for ``now``, so ``when <= now`` implies
bucket <= current tick and no due timer can hide in a future bucket.  So rounding to ticks
costs no accuracy (not even the usual "up to one tick late"); what it trades is work: the
current tick's bucket may hold not-yet-due timers and is re-checked on the next advance, and a
coarse tick puts more timers in each bucket while a fine one means more ticks to step over.

Cancellation unlinks at once (delete from the two dicts, O(1)) rather than mark-and-skip:
heartbeats and client timeouts are cancelled far more often than they fire, and lazy deletion
would let dead timers pile up in slots, inflate ``len`` and make ``next_deadline`` lie.

Re-entrancy rule.  ``advance`` snapshots the due timers first and then runs them in
``(when, scheduling order)``; a timer scheduled by a callback never runs in the same
``advance``, even if already due (as in Netty and timer.c, where new timers land in a later
tick).  Each call therefore does bounded work and a callback rescheduling itself with delay 0
cannot hang the reactor: the new timer is due at once, ``next_deadline()`` returns a deadline
<= now, the reactor polls its sockets with timeout 0 and the timer runs on the next
``advance``.  Cancelling any timer (itself, or one due later in the snapshot) from a callback
is safe: the snapshot skips timers that are no longer active.

Big jumps.  If ``now`` moved a full turn or more, every slot is scanned once instead of each
tick visited, so work is O(slots + buckets + due timers), not O(elapsed ticks).

Exceptions from a callback propagate after the wheel is consistent: the failing timer counts
as fired, and the due timers not yet run stay scheduled (moved to the current tick) for the
next ``advance``.
"""

from __future__ import annotations

import math
from itertools import count


class Timer:
    """A handle returned by ``call_later``/``call_at``; ``when`` is the deadline asked for."""

    __slots__ = ("when", "_callback", "_args", "_seq", "_bucket", "_wheel")

    def __init__(self, wheel: TimerWheel, when: float, bucket: int, seq: int, callback, args):
        self.when = when
        self._callback = callback
        self._args = args
        self._seq = seq
        self._bucket = bucket
        self._wheel: TimerWheel | None = wheel  # None once fired or cancelled

    def cancel(self) -> None:
        """Unlink the timer in O(1); a no-op if it already fired or was cancelled."""
        wheel = self._wheel
        if wheel is not None:
            wheel._unlink(self)
            self._callback = self._args = None  # don't keep e.g. a closed connection alive

    @property
    def active(self) -> bool:
        """True while scheduled, i.e. neither fired nor cancelled."""
        return self._wheel is not None

    def __repr__(self) -> str:
        state = "active" if self._wheel is not None else "done"
        return f"<Timer when={self.when!r} {state} {self._callback!r}>"


class TimerWheel:
    """Timers bucketed by tick in a power-of-two ring of slots; see the module docstring."""

    def __init__(self, now: float, tick: float = 0.01, slots: int = 512):
        if type(slots) is not int or slots <= 0 or slots & (slots - 1):
            raise ValueError(f"slots must be a positive power of two, not {slots!r}")
        if not tick > 0 or not math.isfinite(tick):
            raise ValueError(f"tick must be a positive finite number, not {tick!r}")
        self._origin = float(now)
        self._tick_len = float(tick)
        self._mask = slots - 1
        # slot -> {absolute tick: {timer: None}}; the inner dicts give O(1) unlink.
        self._slots: list[dict[int, dict[Timer, None]]] = [{} for _ in range(slots)]
        self._tick = 0  # current tick; invariant: every bucket key is >= self._tick
        self._now = float(now)
        self._count = 0
        self._seq = count()
        self._running = False
        # Cached earliest deadline (valid only if _cache_ok); lowered on schedule, dropped when
        # the timer holding it leaves.  Makes next_deadline amortised O(1) per reactor loop.
        self._cache: float | None = None
        self._cache_ok = True

    def _tick_of(self, t: float) -> int:
        return math.floor((t - self._origin) / self._tick_len)

    def call_later(self, delay: float, callback, *args) -> Timer:
        """Run ``callback(*args)`` ``delay`` seconds after the latest ``now`` (negative = 0)."""
        return self.call_at(self._now + max(delay, 0.0), callback, *args)

    def call_at(self, when: float, callback, *args) -> Timer:
        """Run ``callback(*args)`` at the first ``advance(now)`` with ``now >= when``."""
        if not math.isfinite(when):
            raise ValueError(f"deadline must be finite, not {when!r}")
        # Past deadlines (and those in the current tick) go to the current tick, which the
        # next advance always scans.
        bucket = max(self._tick_of(when), self._tick)
        timer = Timer(self, when, bucket, next(self._seq), callback, args)
        self._link(timer, bucket)
        self._count += 1
        if self._cache_ok and (self._cache is None or when < self._cache):
            self._cache = when
        return timer

    def _link(self, timer: Timer, bucket: int) -> None:
        timer._bucket = bucket
        self._slots[bucket & self._mask].setdefault(bucket, {})[timer] = None

    def _detach(self, timer: Timer) -> None:
        slot = self._slots[timer._bucket & self._mask]
        timers = slot[timer._bucket]
        del timers[timer]
        if not timers:
            del slot[timer._bucket]

    def _unlink(self, timer: Timer) -> None:
        self._detach(timer)
        timer._wheel = None
        self._count -= 1
        if self._cache_ok and self._cache is not None and timer.when <= self._cache:
            self._cache_ok = False

    def advance(self, now: float) -> int:
        """Run every timer due at ``now`` (snapshot taken on entry); return how many ran."""
        if self._running:
            raise RuntimeError("TimerWheel.advance() called from a timer callback")
        first = self._tick
        last = max(self._tick_of(now), first)
        self._tick = last
        self._now = max(self._now, now)
        due: list[Timer] = []
        if last - first <= self._mask:  # less than a full turn: visit each elapsed tick
            for k in range(first, last + 1):
                timers = self._slots[k & self._mask].get(k)
                if timers:
                    due.extend(t for t in timers if t.when <= now)
        else:  # a turn or more elapsed (e.g. the process was stopped): visit each slot once
            for slot in self._slots:
                for k, timers in slot.items():
                    if k <= last:
                        due.extend(t for t in timers if t.when <= now)
        if not due:
            return 0
        due.sort(key=lambda t: (t.when, t._seq))
        ran = 0
        self._running = True
        try:
            for i, timer in enumerate(due):
                if timer._wheel is None:  # cancelled by an earlier callback
                    continue
                callback, args = timer._callback, timer._args
                self._unlink(timer)
                timer._callback = timer._args = None  # drop references held by a dead timer
                ran += 1
                try:
                    callback(*args)
                except BaseException:
                    # Keep the invariant (buckets >= current tick): due timers not yet run move
                    # to the current tick, so the next advance finds and runs them.
                    for rest in due[i + 1:]:
                        if rest._wheel is not None:
                            self._detach(rest)
                            self._link(rest, last)
                    raise
        finally:
            self._running = False
        return ran

    def next_deadline(self) -> float | None:
        """Earliest pending deadline, or None: cached, else O(slots) plus one bucket's timers."""
        if not self._cache_ok:
            self._cache = self._find_earliest()
            self._cache_ok = True
        return self._cache

    def _find_earliest(self) -> float | None:
        if not self._count:
            return None
        # Buckets are ordered by deadline, so the first non-empty bucket of the coming turn
        # holds the earliest timer.
        for k in range(self._tick, self._tick + self._mask + 1):
            timers = self._slots[k & self._mask].get(k)
            if timers:
                return min(t.when for t in timers)
        # Only timers more than a turn away: find the lowest bucket key across slots.
        k = min(min(slot) for slot in self._slots if slot)
        return min(t.when for t in self._slots[k & self._mask][k])

    def __len__(self) -> int:
        """Number of active timers."""
        return self._count
