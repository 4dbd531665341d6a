"""The hot-path pieces of issue 12 item 3 behave as what they replaced: the reactor on epoll
(readiness within the registered interest, a hang-up reported as readable, handlers of one
iteration resolved before any runs), arrival order with many commands in flight, the frame
header table, the decoder's ``has_input``, and the bounded cache of "sent" answer frames."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnet.loop.reactor import READ, WRITE, Reactor
from chatnet.protocol.codec import CLOSED, NEED_DATA, RequestDecoder, encode_frame
from chatnet.protocol.texts import T_SENT
from chatnet.server import service as sv
from chatnet.server.ordering import ArrivalOrder
from chatnet.server.state import ChatState


class Handler:
    def __init__(self):
        self.closed = False
        self.masks: list[int] = []
        self.victim: Handler | None = None  # closed by this handler's callback, if any

    def handle_event(self, mask: int) -> None:
        self.masks.append(mask)
        if self.victim is not None:
            self.victim.closed = True


@pytest.fixture
def reactor_and_pairs():
    """A reactor and a maker of socket pairs; all closed at the end."""
    reactor, socks = Reactor(), []

    def pair():
        a, b = socket.socketpair()
        socks.extend((a, b))
        return a, b

    yield reactor, pair
    reactor.close()
    for sock in socks:
        sock.close()


def test_reactor_reports_readiness_within_interest(reactor_and_pairs):
    reactor, pair = reactor_and_pairs
    a, b = pair()
    h = Handler()
    reactor.set_interest(a, READ, h)
    reactor.run_once(max_wait=0)
    assert h.masks == []  # nothing to read yet
    b.send(b"x")
    reactor.run_once(max_wait=1)
    assert h.masks == [READ]  # writable too, but WRITE is not asked for
    reactor.set_interest(a, READ | WRITE, h)
    reactor.run_once(max_wait=1)
    assert h.masks[-1] == READ | WRITE
    reactor.set_interest(a, WRITE, h)
    reactor.run_once(max_wait=1)
    assert h.masks[-1] == WRITE
    reactor.forget(a)
    count = len(h.masks)
    reactor.run_once(max_wait=0)
    assert len(h.masks) == count  # unregistered: no more events


def test_reactor_hang_up_is_readable(reactor_and_pairs):
    reactor, pair = reactor_and_pairs
    a, b = pair()
    h = Handler()
    reactor.set_interest(a, READ, h)
    b.close()
    reactor.run_once(max_wait=1)
    assert h.masks == [READ]
    assert a.recv(10) == b""


def test_reactor_skips_a_handler_closed_earlier_in_the_iteration(reactor_and_pairs):
    reactor, pair = reactor_and_pairs
    first, second = Handler(), Handler()
    first.victim, second.victim = second, first  # whichever runs first closes the other
    for handler in (first, second):
        a, b = pair()
        reactor.set_interest(a, READ, handler)
        b.send(b"x")
    reactor.run_once(max_wait=1)
    assert len(first.masks) + len(second.masks) == 1


def test_reactor_wake_returns_at_once_and_drains():
    reactor = Reactor()
    try:
        for _ in range(3):
            reactor.wake()
        started = time.monotonic()
        reactor.run_once(max_wait=5)  # the wake-up bytes are ready: no wait
        assert time.monotonic() - started < 4
        started = time.monotonic()
        reactor.run_once(max_wait=0.2)  # one recv drained all three: it waits its timeout
        assert time.monotonic() - started >= 0.15
    finally:
        reactor.close()


def test_wake_hooks_sends_only_while_the_loop_may_sleep():
    """News that arrives while the hooks run costs no wake-up byte, yet the loop looks again
    at once; news that arrives while it sleeps in select() wakes it."""
    import threading

    reactor = Reactor()
    seen = []
    try:
        def hook():
            seen.append(len(seen))
            if len(seen) == 1:
                reactor.wake_hooks()  # as if the storage thread finished a batch right now
            return False
        reactor.before_sleep.append(hook)
        started = time.monotonic()
        reactor.run_once(max_wait=5)  # the news came during the hooks: no wait
        assert time.monotonic() - started < 4
        reactor._wake_r.setblocking(False)
        with pytest.raises(BlockingIOError):  # and no byte was sent for it
            reactor._wake_r.recv(1)
        reactor.run_once(max_wait=0)  # the hooks look again
        assert len(seen) == 2
        timer = threading.Timer(0.2, reactor.wake_hooks)  # news while the loop sleeps
        timer.start()
        started = time.monotonic()
        reactor.run_once(max_wait=5)
        timer.join()
        assert time.monotonic() - started < 4
    finally:
        reactor.close()


@given(st.lists(st.integers(1, 3), min_size=1, max_size=60), st.data())
def test_arrival_order_with_many_commands_in_flight(gaps, data):
    """A read deferred after k commands is released exactly when the log is applied up to the
    k-th command's index, whatever the batch and however the applies are spread."""
    order, index, indexes, reads = ArrivalOrder(), 0, [], []
    for gap in gaps:
        order.queued()
        index += gap
        order.bound(index)
        indexes.append(index)
        if data.draw(st.booleans()):
            reads.append(len(indexes))
            order.defer(len(indexes))
    released = []
    for applied in range(1, index + 1):
        for read in order.applied(applied):
            assert indexes[read - 1] <= applied  # never before its commands
            released.append((read, applied))
    assert [r for r, _ in released] == reads  # all of them, in order
    for read, applied in released:  # and no later than needed
        assert applied == max(indexes[read - 1], max((a for r, a in released if r < read), default=0))
    assert order.settled()


def test_short_frames_match_the_generic_header():
    for status in (0, 1, 2):
        for indicator in (0, 1):
            for size in (0, 1, 127, 128, 1000):
                message = "m" * size
                header = (chr(size) + chr(status) + str(indicator)).encode("utf-8")
                assert encode_frame(status, indicator, message) == header + message.encode()


def test_decoder_has_input():
    d = RequestDecoder()
    assert not d.has_input()
    d.receive_data(b"\n3|bob|hi\n4|")
    assert d.has_input()
    assert d.next_event().op == 3
    assert d.next_event() is NEED_DATA
    assert d.has_input()  # a partial line is buffered
    d.receive_data(b"*\n")
    assert d.next_event().op == 4
    assert not d.has_input()
    d.receive_data(b"")
    assert d.has_input()  # the end of the stream is still to report
    assert d.next_event() is CLOSED


def test_sent_frames_are_the_reference_answer_and_bounded(monkeypatch):
    monkeypatch.setattr(sv, "SENT_FRAMES_KEPT", 4)
    service = sv.ChatService(ChatState())
    for n in range(10):
        name = f"user{n}"
        assert service._sent_frame(name) == sv.frame(sv.STATUS_OK, T_SENT.format(recipient=name))
        assert service._sent_frame(name) is service._sent_frame(name)
        assert len(service._sent_frames) <= 4
