"""Tests for chatnet.loop.timerwheel: exactness, ordering, rounds, cancellation, re-entrancy, big
jumps, next_deadline/len, and a hypothesis comparison against a plain heapq model."""

from __future__ import annotations

import heapq
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnet.loop.timerwheel import Timer, TimerWheel


def recorder():
    log = []
    return log, (lambda *args: log.append(args))


# --- construction -------------------------------------------------------------------------

@pytest.mark.parametrize("slots", [0, 3, 6, 100, -4, 2.0, True])
def test_slots_must_be_power_of_two(slots):
    with pytest.raises(ValueError):
        TimerWheel(0.0, slots=slots)


@pytest.mark.parametrize("tick", [0, -0.01, float("nan"), float("inf")])
def test_tick_must_be_positive(tick):
    with pytest.raises(ValueError):
        TimerWheel(0.0, tick=tick)


@pytest.mark.parametrize("slots", [1, 2, 512])
def test_power_of_two_slots_accepted(slots):
    w = TimerWheel(5.0, slots=slots)
    assert len(w) == 0 and w.next_deadline() is None and w.advance(100.0) == 0


def test_non_finite_deadline_rejected():
    w = TimerWheel(0.0)
    with pytest.raises(ValueError):
        w.call_at(float("inf"), print)
    with pytest.raises(ValueError):
        w.call_at(float("nan"), print)
    assert len(w) == 0


# --- firing order and exactness -----------------------------------------------------------

def test_fires_in_deadline_order_ties_by_scheduling_order():
    w = TimerWheel(100.0, tick=0.01, slots=8)
    log, cb = recorder()
    w.call_at(100.5, cb, "c")
    w.call_at(100.2, cb, "a")
    w.call_at(100.5, cb, "d")
    w.call_at(100.201, cb, "b")  # same tick as "a", later deadline
    w.call_later(0.5, cb, "e")   # same deadline as c and d, scheduled after them
    assert w.advance(101.0) == 5
    assert [x for (x,) in log] == ["a", "b", "c", "d", "e"]


def test_never_early_and_exact_at_deadline():
    w = TimerWheel(0.0, tick=0.01)
    log, cb = recorder()
    t = w.call_at(0.0234, cb, "x")
    assert w.advance(0.0233999) == 0 and t.active
    assert w.advance(0.0234) == 1  # due exactly at `when`, not at the next tick boundary
    assert log == [("x",)] and not t.active


def test_at_most_one_tick_late_when_advanced_finely():
    tick = 0.01
    w = TimerWheel(0.0, tick=tick, slots=16)
    fired = []
    deadlines = [0.001 + i * 0.0173 for i in range(200)]
    for d in deadlines:
        w.call_at(d, lambda d: fired.append((d, now)), d)
    now = 0.0
    while now < 4.0:
        now += tick / 3
        w.advance(now)
    assert [d for d, _ in fired] == deadlines
    for d, at in fired:
        assert d <= at <= d + tick


def test_call_later_delay_is_relative_to_latest_now_and_negative_is_zero():
    w = TimerWheel(10.0)
    w.advance(20.0)
    t = w.call_later(1.5, print)
    assert t.when == 21.5
    t2 = w.call_later(-3, print)
    assert t2.when == 20.0
    assert w.advance(20.0) == 1
    assert not t2.active


def test_call_at_in_the_past_runs_on_next_advance():
    w = TimerWheel(0.0, tick=0.01, slots=4)
    w.advance(50.0)
    log, cb = recorder()
    w.call_at(3.0, cb, "past")
    assert w.next_deadline() == 3.0
    assert w.advance(50.0) == 1 and log == [("past",)]


# --- rounds: deadlines many turns ahead --------------------------------------------------

def test_deadlines_many_turns_ahead():
    # 8 slots * 0.01 s = 0.08 s per turn; these are up to ~60 turns out, sharing slots.
    w = TimerWheel(0.0, tick=0.01, slots=8)
    fired = []
    deadlines = [0.005, 0.085, 0.165, 1.285, 4.805, 0.0051]
    for d in deadlines:
        w.call_at(d, lambda d: fired.append((d, now)), d)
    now = 0.0
    while now < 5.0:
        now += 0.01
        w.advance(now)
    assert [d for d, _ in fired] == sorted(deadlines)
    assert all(d <= at <= d + 0.01 for d, at in fired)


def test_same_slot_later_round_not_fired_early():
    w = TimerWheel(0.0, tick=1.0, slots=4)
    log, cb = recorder()
    w.call_at(1.5, cb, "round0")
    w.call_at(5.5, cb, "round1")  # slot 1 again, one turn later
    assert w.advance(2.0) == 1 and log == [("round0",)]
    assert w.advance(5.4) == 0
    assert w.advance(5.5) == 1 and log[-1] == ("round1",)


# --- cancellation -------------------------------------------------------------------------

def test_cancel_before_advance_and_idempotent():
    w = TimerWheel(0.0)
    log, cb = recorder()
    t = w.call_later(1.0, cb, "x")
    assert t.active and len(w) == 1
    t.cancel()
    t.cancel()
    assert not t.active and len(w) == 0 and w.next_deadline() is None
    assert w.advance(2.0) == 0 and log == []


def test_cancel_after_fire_is_noop():
    w = TimerWheel(0.0)
    log, cb = recorder()
    t = w.call_later(1.0, cb, "x")
    other = w.call_later(5.0, cb, "y")
    assert w.advance(1.0) == 1
    t.cancel()
    assert len(w) == 1 and other.active


def test_cancel_later_timer_due_in_same_advance_from_callback():
    w = TimerWheel(0.0, tick=0.01, slots=8)
    log = []
    victims = []

    def killer():
        log.append("killer")
        victims[0].cancel()

    w.call_at(0.5, killer)
    victims.append(w.call_at(0.7, lambda: log.append("victim")))
    w.call_at(0.9, lambda: log.append("survivor"))
    assert w.advance(1.0) == 2
    assert log == ["killer", "survivor"] and len(w) == 0


def test_cancel_self_and_tie_from_callback():
    w = TimerWheel(0.0)
    log = []
    handles = {}

    def first():
        log.append("first")
        handles["first"].cancel()   # itself: already fired, no-op
        handles["second"].cancel()  # same deadline, later in scheduling order

    handles["first"] = w.call_at(1.0, first)
    handles["second"] = w.call_at(1.0, lambda: log.append("second"))
    assert w.advance(1.0) == 1 and log == ["first"] and len(w) == 0


def test_cancel_during_advance_of_timer_not_due():
    w = TimerWheel(0.0)
    later = w.call_at(9.0, print)
    w.call_at(1.0, later.cancel)
    assert w.advance(1.0) == 1 and not later.active and len(w) == 0
    assert w.next_deadline() is None


# --- rescheduling from callbacks ----------------------------------------------------------

def test_periodic_heartbeat():
    w = TimerWheel(0.0, tick=0.01, slots=16)
    beats = []
    interval = 0.1

    def beat():
        beats.append((now, handle[0].when))
        handle[0] = w.call_later(interval, beat)

    handle = [w.call_later(interval, beat)]
    now = 0.0
    for _ in range(100):
        now += 0.01
        w.advance(now)
    assert 9 <= len(beats) <= 10
    assert all(when <= at <= when + 0.01 + 1e-9 for at, when in beats)
    assert len(w) == 1
    # After a long stall the heartbeat fires once and re-arms relative to the new now,
    # instead of replaying every missed beat.
    now += 3600.0
    assert w.advance(now) == 1
    assert handle[0].when == pytest.approx(now + interval)
    handle[0].cancel()
    assert len(w) == 0


def test_delay_zero_self_rescheduling_does_not_hang():
    # Rule: timers scheduled by a callback never run in the same advance(); they are due
    # immediately, so next_deadline() <= now and the next advance() runs them.
    w = TimerWheel(0.0)
    runs = []

    def again():
        runs.append(1)
        w.call_later(0, again)

    w.call_later(0, again)
    for i in range(1, 6):
        assert w.advance(1.0) == 1
        assert len(runs) == i and len(w) == 1
        assert w.next_deadline() <= 1.0


def test_new_due_timer_from_callback_runs_on_next_advance():
    w = TimerWheel(0.0)
    log = []
    w.call_at(1.0, lambda: (log.append("a"), w.call_at(0.5, lambda: log.append("b"))))
    w.call_at(2.0, lambda: log.append("c"))
    assert w.advance(3.0) == 2 and log == ["a", "c"]
    assert w.next_deadline() == 0.5
    assert w.advance(3.0) == 1 and log == ["a", "c", "b"]


def test_advance_from_callback_is_rejected():
    w = TimerWheel(0.0)
    w.call_at(1.0, lambda: w.advance(2.0))
    with pytest.raises(RuntimeError):
        w.advance(1.0)
    w.call_at(1.5, print)
    assert w.advance(2.0) == 1  # wheel still usable


# --- exceptions ---------------------------------------------------------------------------

@pytest.mark.parametrize("jump", [1.0, 3600.0])
def test_exception_propagates_and_rest_run_next_time(jump):
    w = TimerWheel(0.0, tick=0.01, slots=8)
    log = []

    def boom():
        log.append("boom")
        raise KeyError("boom")

    w.call_at(0.1, lambda: log.append("a"))
    w.call_at(0.33, boom)
    w.call_at(0.5, lambda: log.append("b"))
    w.call_at(0.77, lambda: log.append("c"))
    far = w.call_at(jump + 100, lambda: log.append("far"))
    with pytest.raises(KeyError):
        w.advance(jump)
    assert log == ["a", "boom"]
    assert len(w) == 3 and w.next_deadline() == 0.5
    assert w.advance(jump) == 2 and log == ["a", "boom", "b", "c"]
    assert far.active and w.next_deadline() == jump + 100
    assert w.advance(jump + 100) == 1 and len(w) == 0


# --- huge time jumps ----------------------------------------------------------------------

def test_huge_jump_is_bounded_work():
    w = TimerWheel(1000.0, tick=0.001, slots=512)  # 3600 s = 3.6 million ticks
    log, cb = recorder()
    for d in (0.5, 7.0, 1800.0, 3599.0):
        w.call_later(d, cb, d)
    keep = w.call_later(7200.0, cb, "later")
    start = time.perf_counter()
    assert w.advance(1000.0 + 3600.0) == 4
    elapsed = time.perf_counter() - start
    assert elapsed < 0.05, elapsed  # iterating 3.6M ticks would take seconds
    assert [d for (d,) in log] == [0.5, 7.0, 1800.0, 3599.0]
    assert keep.active and len(w) == 1
    # Wheel keeps working at fine granularity after the jump.
    t = w.call_later(0.0025, cb, "soon")
    assert w.advance(4600.002) == 0 and w.advance(4600.0025) == 1 and not t.active
    start = time.perf_counter()
    assert w.advance(1e9) == 1
    assert time.perf_counter() - start < 0.05


# --- next_deadline and len ----------------------------------------------------------------

def test_next_deadline_and_len():
    w = TimerWheel(0.0, tick=0.01, slots=8)
    assert w.next_deadline() is None and len(w) == 0
    a = w.call_at(5.0, print)          # many turns away (turn = 0.08 s)
    assert w.next_deadline() == 5.0
    b = w.call_at(0.035, print)
    c = w.call_at(0.031, print)
    assert w.next_deadline() == 0.031 and len(w) == 3
    c.cancel()
    assert w.next_deadline() == 0.035 and len(w) == 2
    b.cancel()
    assert w.next_deadline() == 5.0 and len(w) == 1
    d = w.call_at(2.0, print)
    assert w.next_deadline() == 2.0
    assert w.advance(2.0) == 1 and not d.active
    assert w.next_deadline() == 5.0
    w.call_at(5.0, print)
    a.cancel()
    assert w.next_deadline() == 5.0 and len(w) == 1
    assert w.advance(5.0) == 1
    assert w.next_deadline() is None and len(w) == 0


def test_timer_repr_and_type():
    w = TimerWheel(0.0)
    t = w.call_later(1.0, print, "x")
    assert isinstance(t, Timer) and "active" in repr(t)
    t.cancel()
    assert "done" in repr(t)


# --- property test against a heapq model --------------------------------------------------

class HeapModel:
    """Reference semantics: a heap of (when, seq); advance snapshots what is due on entry."""

    def __init__(self, now):
        self.now = now
        self.heap = []
        self.live = {}
        self.seq = 0

    def schedule(self, key, when, callback):
        self.live[key] = when
        heapq.heappush(self.heap, (when, self.seq, key, callback))
        self.seq += 1

    def call_later(self, key, delay, callback):
        self.schedule(key, self.now + max(delay, 0.0), callback)

    def cancel(self, key):
        self.live.pop(key, None)

    def advance(self, now):
        self.now = max(self.now, now)
        due = []
        while self.heap and self.heap[0][0] <= now:
            due.append(heapq.heappop(self.heap))
        ran = 0
        for when, _, key, callback in due:
            if key in self.live:
                del self.live[key]
                ran += 1
                callback(key)
        return ran

    def next_deadline(self):
        return min(self.live.values(), default=None)

    def __len__(self):
        return len(self.live)


class WheelAdapter:
    def __init__(self, now, tick, slots):
        self.wheel = TimerWheel(now, tick=tick, slots=slots)
        self.handles = {}

    def schedule(self, key, when, callback):
        self.handles[key] = self.wheel.call_at(when, callback, key)

    def call_later(self, key, delay, callback):
        self.handles[key] = self.wheel.call_later(delay, callback, key)

    def cancel(self, key):
        self.handles[key].cancel()

    def advance(self, now):
        return self.wheel.advance(now)

    def next_deadline(self):
        return self.wheel.next_deadline()

    def __len__(self):
        return len(self.wheel)


def run_script(impl, start, ops):
    """Drive ``impl`` with ``ops``; callbacks react (cancel/reschedule) the same way in both."""
    fired, trace, reactions = [], [], {}
    counter = [0]
    now = [start]

    def new_key(reaction):
        key = counter[0]
        counter[0] += 1
        reactions[key] = reaction
        return key

    def on_fire(key):
        fired.append((key, now[0]))
        cancel_ref, child_delay, depth = reactions[key]
        if cancel_ref is not None:
            impl.cancel(cancel_ref % counter[0])
        if child_delay is not None and depth > 0:
            impl.call_later(new_key((cancel_ref, child_delay, depth - 1)), child_delay, on_fire)

    for op in ops:
        kind = op[0]
        if kind == "later":
            impl.call_later(new_key(op[2]), op[1], on_fire)
        elif kind == "at":
            impl.schedule(new_key(op[2]), now[0] + op[1], on_fire)
        elif kind == "cancel":
            if counter[0]:
                impl.cancel(op[1] % counter[0])
        else:
            now[0] += op[1]
            ran = impl.advance(now[0])
            trace.append((ran, len(impl), impl.next_deadline()))
    return fired, trace


# Multiples of 1/400 s collide often (ties) and straddle 0.01 s ticks.
delays = st.integers(-4, 2000).map(lambda i: i / 400)
reactions = st.tuples(
    st.none() | st.integers(0, 1000),
    st.none() | st.integers(0, 40).map(lambda i: i / 400),
    st.integers(0, 2),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("later"), delays, reactions),
        st.tuples(st.just("at"), delays, reactions),
        st.tuples(st.just("cancel"), st.integers(0, 1000)),
        st.tuples(st.just("advance"), st.integers(0, 400).map(lambda i: i / 400)),
        st.tuples(st.just("advance"), st.integers(0, 5000).map(lambda i: i / 100)),  # jumps
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    start=st.sampled_from([0.0, 12.345, 1e6 + 0.1]),
    tick=st.sampled_from([0.01, 0.0025, 0.1, 1.0]),
    slots=st.sampled_from([1, 2, 8, 64]),
    ops=operations,
)
def test_matches_heap_model(start, tick, slots, ops):
    ops = ops + [("advance", 1000.0)]  # flush: everything scheduled so far is due
    expected = run_script(HeapModel(start), start, ops)
    wheel = WheelAdapter(start, tick, slots)
    actual = run_script(wheel, start, ops)
    assert actual == expected
    for key, at in actual[0]:
        assert wheel.handles[key].when <= at  # never early
