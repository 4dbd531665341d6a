"""The chat service and state machine, every op, every reference text, delivery rules — driven
through the production replica host.

``Host`` below is a thin test harness around :class:`chatnet.server.host.ReplicaHost` (a
single replica over the simulator's in-memory disk): requests go through ``ReplicaHost.receive``
and every commit through ``ReplicaHost.cycle`` — propose, persist, apply, release answers — so
these tests exercise the same loop body as ``bin/chatserver``, not a copy of it.
"""

from __future__ import annotations

import itertools

import pytest

from chatnet.protocol import texts
from chatnet.protocol.codec import RequestDecoder, decode_frames
from chatnet.replication.simdisk import SimDisk
from chatnet.server import service as sv
from chatnet.server import state as sm
from chatnet.server.config import ConfigError, Limits
from chatnet.server.host import ReplicaHost
from chatnet.server.state import ChatState, Mail, decode_command
from chatnet.server.storage import Batch


class Host:
    def __init__(self, state: ChatState | None = None, limits: Limits | None = None):
        disk = SimDisk()
        if state is not None:  # start from a given state, as a store holding it would
            disk.commit(Batch(snapshot=(0, 0, state), sync=True))
        tokens = itertools.count(1)
        self.replica_host = ReplicaHost(0, (0,), disk, limits=limits or Limits(),
                                        new_token=lambda: f"token{next(tokens)}")
        self.replica_host.on_applied = lambda index, data: self.log.append(decode_command(data))
        self.service = self.replica_host.service
        self.out: dict[int, list] = {}
        self.closed: set[int] = set()
        self.marks: dict[int, list] = {}
        self.log: list[tuple] = []  # every committed command, in log order
        self.commit()  # a lone replica serves at once
        assert self.replica_host.serves_clients

    def open(self, conn: int) -> int:
        self.replica_host.open(conn)
        self.out[conn] = []
        self.marks[conn] = []
        return conn

    def close(self, conn: int) -> None:
        self.replica_host.close_connection(conn)

    def send(self, conn: int, text: str, commit: bool = True):
        decoder = RequestDecoder()
        decoder.receive_data(text.encode())
        self.record(self.replica_host.receive(conn, decoder.next_event()), deliver=True)
        if commit:
            self.commit()

    def commit(self, deliver: bool = True):
        """Run host cycles until nothing more is pending (proposals committed and answered)."""
        for _ in range(16):
            result = self.replica_host.cycle()
            self.record(result.effects, deliver)
            if not result.more and not self.service.proposals:
                return
        raise AssertionError("the host did not settle in 16 cycles")

    def record(self, effects, deliver: bool):
        for effect in effects:
            if isinstance(effect, sv.Close):
                self.closed.add(effect.conn)
            else:
                self.out[effect.conn].extend(decode_frames(effect.data))
                if effect.delivered:
                    self.marks[effect.conn].append(effect.delivered)
                    if deliver:
                        self.service.frames_written(effect.delivered)

    def drain(self, deliver: bool = True):
        """Effects the service produced outside a request or a cycle (a drained congestion)."""
        self.record(self.service.take_effects(), deliver)

    def take(self, conn: int) -> list[tuple[int, int, str]]:
        frames, self.out[conn] = self.out[conn], []
        return [(f.status, f.indicator, f.message) for f in frames]


@pytest.fixture
def host():
    return Host()


def ok(text):
    return (0, 0, text)


def err(text):
    return (1, 0, text)


def note(text):
    return (2, 0, text)


def chat(text):
    return (0, 1, text)


def test_create_logs_in_and_duplicate_names(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    assert host.take(a) == [ok("Account created! Logged in as alice.")]
    host.send(a, "1|other")
    assert host.take(a) == [err(sv.T_CREATE_LOGGED_IN.format(me="alice"))]
    host.send(b, "1|alice")
    assert host.take(b) == [err("Unable to create account: This username is already taken.")]


def test_two_creates_of_one_name_in_one_batch(host):
    """Decided at apply time: exactly one wins even when both were proposed together."""
    a, b = host.open(1), host.open(2)
    host.send(a, "1|zed", commit=False)
    host.send(b, "1|zed", commit=False)
    host.commit()
    assert host.take(a) == [ok("Account created! Logged in as zed.")]
    assert host.take(b) == [err(sv.T_CREATE_TAKEN)]
    assert host.service.logged_in_as(b) is None


@pytest.mark.parametrize("name", ["", "a b", "a|b", "x" * 33, "tab\there", "bell\x07", " "])
def test_bad_usernames_are_refused(host, name):
    a = host.open(1)
    host.send(a, f"1|{name}")
    assert host.take(a) == [err(sv.T_CREATE_BAD_NAME)]
    assert host.log == []


def test_username_edge_cases_accepted(host):
    a = host.open(1)
    host.send(a, "1|" + "é" * 32)
    assert host.take(a)[0][0] == 0


def test_login_texts(host):
    a, b, c = host.open(1), host.open(2), host.open(3)
    host.send(a, "1|alice")
    host.take(a)
    host.send(b, "2|nobody")
    assert host.take(b) == [err(sv.T_LOGIN_UNKNOWN)]
    host.send(b, "2|alice")
    assert host.take(b) == [err("Unable to login: This user is already connected to the server.")]
    host.send(a, "2|alice")
    assert host.take(a) == [err(sv.T_LOGIN_LOGGED_IN.format(me="alice"))]
    host.send(a, "6")
    assert a in host.closed
    host.send(c, "2|alice")
    assert host.take(c) == [ok("Logged in as alice."), note("No new messages since you've been gone.")]


def test_send_rules(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "3|bob|hi")
    assert host.take(a) == [err(sv.T_MUST_LOGIN)]
    host.send(a, "1|alice")
    host.take(a)
    host.send(a, "3|bob|hi")
    assert host.take(a) == [err("Recipient username cannot be found.")]
    host.send(a, "3|alice|hi")
    assert host.take(a) == [err("Cannot send messages to yourself.")]
    host.send(b, "1|bob")
    host.take(b)
    host.send(a, "3|bob|   ")
    assert host.take(a) == [err(sv.T_EMPTY_MESSAGE)]
    host.send(a, "3| bob |hello | there ")
    assert host.take(a) == [ok("Message sent to bob.")]
    assert host.take(b) == [chat("alice|hello | there")]


def test_queued_chat_is_delivered_oldest_first_at_login(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.send(b, "6")
    for i in range(3):
        host.send(a, f"3|bob|m{i}")
    host.take(a)
    c = host.open(3)
    host.send(c, "2|bob")
    assert host.take(c) == [
        ok("Logged in as bob."),
        chat("alice|m0"),
        chat("alice|m1"),
        chat("alice|m2"),
        note("You have 3 missed messages above."),
    ]
    # Written is not read: they stay queued until bob's next request shows he read them.
    host.commit()
    assert host.service.state.pending_count("bob") == 3
    host.send(c, "4|nobody")
    host.commit()
    assert host.service.state.pending_count("bob") == 0
    assert host.log[-1][0] == "delivered"


def test_chat_never_written_stays_queued(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.take(b)
    host.send(a, "3|bob|one", commit=False)
    host.commit(deliver=False)  # the frame went into bob's buffer but was never written
    assert host.take(b) == [chat("alice|one")]
    host.close(b)
    host.commit()
    assert host.service.state.pending_count("bob") == 1
    c = host.open(3)
    host.send(c, "2|bob")
    assert chat("alice|one") in host.take(c)


def test_congested_recipient_gets_chat_after_draining(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.take(b)
    host.service.set_congested(b, True)
    host.send(a, "3|bob|x1")
    host.send(a, "3|bob|x2")
    assert host.take(b) == []
    host.service.set_congested(b, False)
    host.drain()
    assert host.take(b) == [chat("alice|x1"), chat("alice|x2")]
    host.send(a, "3|bob|x3")
    assert host.take(b) == [chat("alice|x3")]


def test_list_in_creation_order_with_wildcards(host):
    a = host.open(1)
    for name in ["bob", "alice", "ashley", "carl"]:
        c = host.open(len(host.out) + 10)
        host.send(c, f"1|{name}")
    host.send(a, "4|a*")
    assert host.take(a) == [ok("\n- alice\n- ashley\n")]
    host.send(a, "4")
    assert host.take(a) == [ok("\n- bob\n- alice\n- ashley\n- carl\n")]
    host.send(a, "4|?o?")
    assert host.take(a) == [ok("\n- bob\n")]
    host.send(a, "4|zz*")
    assert host.take(a) == [ok("\n")]


def _list_pages(host, conn, request):
    """Follow a list answer's continuation lines; return every page's (names, more-request)."""
    pages = []
    while request is not None:
        host.send(conn, request)
        (frame,) = host.take(conn)  # a page is always one frame
        assert frame[:2] == (0, 0) and frame[2].startswith("\n")
        lines = frame[2][1:].split("\n")
        assert lines[-1] == ""
        names = [line[2:] for line in lines[:-1] if line.startswith("- ")]
        rest = [line for line in lines[:-1] if not line.startswith("- ")]
        request = None
        if rest:
            (more,) = rest
            assert more == lines[-2], "the continuation is the last line"
            prefix, suffix = "More accounts: request ", " for the next page."
            assert more.startswith(prefix) and more.endswith(suffix)
            request = more[len(prefix):-len(suffix)]
        pages.append((names, request))
    return pages


def test_long_list_is_paged_and_every_name_is_reached():
    state = ChatState()
    for i in range(3000):
        state.apply(sm.cmd_create(f"user{i:05d}-" + "x" * 20))
    host = Host(state)
    a = host.open(1)
    pages = _list_pages(host, a, "4")
    assert len(pages) == 30 and all(len(names) == 100 for names, _ in pages)
    assert pages[0][1] == "4|*|100" and pages[-1][1] is None
    assert [n for names, _ in pages for n in names] == list(state.accounts)


def test_list_page_size_continuation_and_churn():
    host = Host(limits=Limits(max_list_names=2))
    for i, name in enumerate(["ann", "bob", "amy", "abe", "al"]):
        host.send(host.open(100 + i), f"1|{name}")
    a = host.open(1)
    host.send(a, "4|b*")
    assert host.take(a) == [ok("\n- bob\n")]  # a small list keeps the seed's answer exactly
    host.send(a, "4|a*")
    assert host.take(a) == [ok("\n- ann\n- amy\n" + texts.T_LIST_MORE.format(pattern="a*", after=3) + "\n")]
    host.send(104, "5")  # "al" deleted, then a new account: the cursor is a creation number, not a position
    host.send(host.open(200), "1|ava")
    host.send(a, "4|a*|3")
    assert host.take(a) == [ok("\n- abe\n- ava\n")]
    host.send(a, "4 | a* | 4 ")
    assert host.take(a) == [ok("\n- ava\n")]
    host.send(a, "4|ann|0")  # an exact name with a cursor
    assert host.take(a) == [ok("\n- ann\n")]


@pytest.mark.parametrize("request_text", ["4||", "4|a*|²", "4|a*|٣", "4|a*|-1", "4|a|b|1", "4|a*|", "4|*|+1"])
def test_list_requests_that_are_not_continuations_list_nothing(request_text):
    """A pattern with a `|` matches no valid name, as in the seed; `4||` is our client's probe."""
    host = Host(limits=Limits(max_list_names=1))
    for name in ["ann", "amy"]:
        host.send(host.open(len(host.out) + 10), f"1|{name}")
    a = host.open(1)
    host.send(a, request_text)
    assert host.take(a) == [ok("\n")]


def test_list_work_per_answer_is_bounded(monkeypatch):
    """A pattern matching few names does not walk every account: the answer stops after
    LIST_SCAN_LIMIT accounts and says where to go on, even with no name found yet."""
    monkeypatch.setattr(sv, "LIST_SCAN_LIMIT", 10)
    state = ChatState()
    for i in range(25):
        state.apply(sm.cmd_create(f"u{i}"))
    state.apply(sm.cmd_create("zed"))
    host = Host(state)
    pages = _list_pages(host, host.open(1), "4|z*")
    assert pages == [([], "4|z*|10"), ([], "4|z*|20"), (["zed"], None)]


def test_list_patterns_are_not_cached_without_bound():
    """fnmatch.fnmatchcase caches 32,768 compiled patterns; the service must not feed it."""
    import fnmatch
    host = Host()
    host.send(host.open(2), "1|alice")
    a = host.open(1)
    fnmatch._compile_pattern.cache_clear()
    for i in range(50):
        host.send(a, f"4|*{i}*")
    assert fnmatch._compile_pattern.cache_info().currsize == 0


def test_delete_drops_own_mail_and_marks_sent_chat(host):
    a, b, c = host.open(1), host.open(2), host.open(3)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.send(c, "1|carol")
    host.send(c, "6")
    host.send(b, "6")
    host.send(a, "3|carol|from alice")
    host.send(a, "3|bob|to bob")
    host.take(a)
    host.send(a, "5")
    assert host.take(a) == [ok("Account alice has been deleted. You are now logged out.")]
    host.send(a, "5")
    assert host.take(a) == [err(sv.T_MUST_LOGIN)]
    d = host.open(4)
    host.send(d, "2|carol")
    assert host.take(d)[1] == chat("alice [deleted]|from alice")
    # A new alice does not inherit anything, and her chat is not marked deleted.
    host.send(a, "1|alice")
    host.send(a, "3|carol|new alice")
    assert host.take(d)[-1] == chat("alice|new alice")


def test_late_delivery_mark_cannot_touch_a_new_account_of_the_same_name():
    state = ChatState()
    state.apply(sm.cmd_create("bob"))
    old_order = state.accounts["bob"].order
    for i in range(3):
        state.apply(sm.cmd_send("x", "bob", f"old{i}"))
    state.apply(sm.cmd_delete("bob"))
    state.apply(sm.cmd_create("bob"))
    state.apply(sm.cmd_send("x", "bob", "new"))
    state.apply(sm.cmd_delivered("bob", old_order, 3))
    assert [m.text for m in state.mail_after("bob", 0)] == ["new"]


def test_bad_requests_get_error_frames_and_connection_stays(host):
    a = host.open(1)
    host.send(a, "9|what")
    host.send(a, "hello")
    host.send(a, "3|bob")
    frames = host.take(a)
    assert all(f[0] == 1 for f in frames) and len(frames) == 3
    host.send(a, "1|alice")
    assert host.take(a) == [ok("Account created! Logged in as alice.")]


def test_waiting_connection_and_closed_waiter(host):
    a = host.open(1)
    host.send(a, "1|alice", commit=False)
    assert host.service.waiting(a)
    host.close(a)
    host.commit()  # the account is created even though nobody hears the answer
    assert host.service.state.exists("alice")


def test_mail_after_uses_contiguous_seqs():
    state = ChatState()
    state.apply(sm.cmd_create("bob"))
    for i in range(5):
        state.apply(sm.cmd_send("a", "bob", str(i)))
    state.apply(sm.cmd_delivered("bob", 1, 2))
    assert [m.seq for m in state.mail_after("bob", 0)] == [3, 4, 5]
    assert [m.seq for m in state.mail_after("bob", 4)] == [5]
    assert state.mail_after("bob", 5) == []
    assert isinstance(state.mail_after("bob", 3)[0], Mail)


# -- extension 1: tokens, sequence numbers, acks, request ids, resume -----------------------

def ext_client(host, conn, name, create=True):
    host.open(conn)
    host.send(conn, "0|ext|1")
    assert host.take(conn) == [ok("ext|1")]
    host.send(conn, f"{1 if create else 2}|{name}")
    frames = host.take(conn)
    token = next(f[2].split("|", 1)[1] for f in frames if f[2].startswith("token|"))
    return frames, token


def test_extended_session_gets_token_and_sequenced_chat(host):
    frames, token = ext_client(host, 1, "alice")
    assert frames[0] == ok("Account created! Logged in as alice.") and frames[1] == ok(f"token|{token}")
    b = host.open(2)
    host.send(b, "1|bob")
    assert all(not f[2].startswith("token|") for f in host.take(b))  # seed clients never see it
    host.send(b, "3|alice|hi")
    host.send(b, "3|alice|again")
    assert host.take(1) == [chat("1|bob|hi"), chat("2|bob|again")]
    host.commit()
    # No socket-write confirmation for extended sessions: only the client's ack removes chat.
    assert host.service.state.pending_count("alice") == 2
    host.send(1, "0|ack|1")
    assert host.take(1) == []
    host.commit()
    assert [m.seq for m in host.service.state.mail_after("alice", 0)] == [2]


def test_resume_delivers_after_last_seq_and_replaces_the_dead_session(host):
    _, token = ext_client(host, 1, "alice")
    b = host.open(2)
    host.send(b, "1|bob")
    for i in range(4):
        host.send(b, f"3|alice|m{i}")
    host.take(1)
    # alice's client saw up to seq 2, then its primary died; it resumes on connection 3.
    host.open(3)
    host.send(3, "0|ext|1")
    host.take(3)
    host.send(3, f"7|alice|{token}|2")
    assert host.take(3) == [ok("Resumed as alice."), ok(f"token|{token}"), chat("3|bob|m2"), chat("4|bob|m3")]
    assert 1 in host.closed and host.service.logged_in_as(3) == "alice"
    host.commit()
    assert [m.seq for m in host.service.state.mail_after("alice", 0)] == [3, 4]


def test_resume_refusals(host):
    _, token = ext_client(host, 1, "alice")
    host.open(2)
    host.send(2, "7|alice|not-the-token|0")
    assert host.take(2) == [err("Unable to resume: the session token is not valid. Please log in again.")]
    host.send(2, f"7|nobody|{token}|0")
    assert host.take(2) == [err("Unable to resume: This username does not exist.")]
    host.send(1, "6")  # exit clears the token
    host.commit()
    host.send(2, f"7|alice|{token}|0")
    assert host.take(2)[0] == err(sv.T_RESUME_BAD_TOKEN)
    # a later login supersedes an earlier token too
    _, token2 = ext_client(host, 3, "alice", create=False)
    host.send(3, "6")
    host.commit()
    _, token3 = ext_client(host, 4, "alice", create=False)
    assert len({token, token2, token3}) == 3
    host.open(5)
    host.send(5, f"7|alice|{token2}|0")
    assert host.take(5)[0] == err(sv.T_RESUME_BAD_TOKEN)


def test_a_resume_with_another_sides_numbers_marks_nothing_delivered(host):
    """All mode, after a healed split brain: tokens carry the epoch (the view whose chat the
    session last got).  A LAST_SEQ of an epoch this replica's history does not hold numbers
    the other side's mailbox: the resume is refused and nothing is marked delivered (before,
    the winner's seqs 1-3, which the client never saw, were removed by LAST_SEQ 5)."""
    service = host.service
    service.in_history = lambda view: view in (4, 5)   # this side's views
    service.set_epoch(5)
    _, token = ext_client(host, 1, "alice")
    assert token == "token1.5"
    host.open(2)
    host.send(2, "1|bob")
    for i in range(3):
        host.send(2, f"3|alice|winner {i}")
    service.set_epoch(4)                               # a new view: the session hears first
    host.drain()
    assert host.take(1)[-1] == ok("token|token1.4")
    host.close(1)
    host.open(3)
    host.send(3, "0|ext|1")
    host.take(3)
    host.send(3, "7|alice|token1.7|5")                 # epoch 7: the losing side's view
    assert host.take(3) == [err(sv.T_RESUME_OTHER_HISTORY)]
    host.commit()
    assert service.state.pending_count("alice") == 3
    host.send(3, "7|alice|token1.4|1")                 # this side's numbers: resumed as ever
    assert host.take(3)[:3] == [ok("Resumed as alice."), ok("token|token1.4"), chat("2|bob|winner 1")]
    host.commit()
    assert service.state.pending_count("alice") == 2


def test_tokenless_op7_is_a_plain_login_and_cannot_take_over(host):
    a = host.open(1)
    host.send(a, "1|alice")
    b = host.open(2)
    host.send(b, "7|alice|")
    assert host.take(b) == [err(sv.T_LOGIN_CONNECTED)]
    host.send(a, "6")
    host.commit()
    host.send(b, "7|alice")
    assert host.take(b)[0] == ok("Logged in as alice.")


def test_request_ids_make_retried_sends_idempotent(host):
    ext_client(host, 1, "alice")
    b = host.open(2)
    host.send(b, "1|bob")
    host.take(b)
    host.send(1, "0|send|rid-1|bob|hello | world")
    host.send(1, "0|send|rid-1|bob|hello | world")  # the retry after a failover
    host.send(1, "0|send|rid-2|bob|second")
    assert [f[2] for f in host.take(1)] == ["Message sent to bob."] * 3
    assert host.take(b) == [chat("alice|hello | world"), chat("alice|second")]
    host.send(1, "0|send|bad id!|bob|x")
    host.send(2, "0|send|r|alice|not negotiated")
    assert host.take(1) == [err(sv.INVALID_REQUEST_TEXT)] and host.take(2) == [err(sv.INVALID_REQUEST_TEXT)]


def test_recent_request_ids_are_bounded_and_survive_snapshots():
    state = ChatState()
    state.apply(sm.cmd_create("a"))
    state.apply(sm.cmd_create("b"))
    for i in range(sm.RECENT_REQUEST_IDS + 10):
        state.apply(sm.cmd_send("a", "b", "x", f"r{i}"))
    assert len(state.accounts["a"].request_ids) == sm.RECENT_REQUEST_IDS
    copy = ChatState.from_snapshot(state.to_snapshot())
    assert copy.apply(sm.cmd_send("a", "b", "x", "r500")) == sm.DUPLICATE
    assert isinstance(copy.apply(sm.cmd_send("a", "b", "x", "r0")), Mail)  # forgotten: too old


def test_only_one_login_of_an_account_is_in_flight(host):
    """Two logins raced in one batch: the loser is refused before proposing, so the winner's
    token is never superseded by a login that was answered 'already connected'."""
    a = host.open(1)
    host.send(a, "1|alice")
    host.send(a, "6")
    host.commit()
    _, b, c = None, host.open(2), host.open(3)
    for conn in (b, c):
        host.send(conn, "0|ext|1")
        host.take(conn)
    host.send(b, "2|alice", commit=False)
    host.send(c, "2|alice", commit=False)
    host.commit()
    assert host.take(c) == [err(sv.T_LOGIN_CONNECTED)]
    frames = host.take(b)
    token = next(f[2].split("|", 1)[1] for f in frames if f[2].startswith("token|"))
    assert host.service.state.accounts["alice"].token == token


# ------------------------------------------------------------------- hostile input (issue 10)


@pytest.mark.parametrize("seq", ["²", "٣", "１", "+1", "-1", " ", "1.0", "0x1"])
def test_ack_with_a_non_ascii_or_signed_number_is_refused_not_a_crash(host, seq):
    ext_client(host, 1, "mallory")
    host.send(1, f"0|ack|{seq}")
    assert host.take(1) == [err(sv.INVALID_REQUEST_TEXT)]
    host.send(1, "4|mallory")  # the connection still works
    assert host.take(1) == [ok("\n- mallory\n")]


@pytest.mark.parametrize("seq", ["²", "٣", "+1", "1 2", ""])
def test_resume_with_a_bad_last_seq_is_invalid(host, seq):
    _, token = ext_client(host, 1, "alice")
    host.open(2)
    host.send(2, f"7|alice|{token}|{seq}")
    assert host.take(2) == [err(sv.INVALID_REQUEST_TEXT)]
    assert host.service.logged_in_as(1) == "alice"


@pytest.mark.parametrize("token", ["é", "tokén", "😀", "Ａ"])
def test_non_ascii_token_is_refused_clearly(host, token):
    """`7|alice|é|0` raised TypeError in secrets.compare_digest (str with non-ASCII)."""
    ext_client(host, 1, "alice")
    host.open(2)
    host.send(2, f"7|alice|{token}|0")
    assert host.take(2) == [err(texts.T_RESUME_TOKEN_NOT_ASCII)]
    assert host.service.logged_in_as(1) == "alice" and 1 not in host.closed


def test_resume_still_works_with_the_right_token(host):
    _, token = ext_client(host, 1, "alice")
    host.open(2)
    host.send(2, "0|ext|1")
    host.take(2)
    host.send(2, f"7|alice|{token}|0")
    assert host.take(2)[:2] == [ok("Resumed as alice."), ok(f"token|{token}")]


# ------------------------------------------------------------------------- quotas (issue 10)


def test_account_quota_refuses_creates_and_frees_on_delete():
    host = Host(limits=Limits(max_accounts=2))
    a, b, c = host.open(1), host.open(2), host.open(3)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.send(c, "1|carol")
    assert host.take(c) == [err(texts.T_CREATE_FULL)]
    assert host.log[-1] == sm.cmd_create("bob", host.log[-1][2])  # refused before proposing
    host.send(c, "1|alice")  # a taken name is still said to be taken
    assert host.take(c) == [err(sv.T_CREATE_TAKEN)]
    host.send(a, "5")
    host.send(c, "1|carol")
    assert host.take(c) == [ok("Account created! Logged in as carol.")]


def test_mailbox_quota_refuses_sends_until_chat_is_delivered():
    host = Host(limits=Limits(max_queued_chats=2))
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.send(b, "6")
    host.take(a)
    for i in range(3):
        host.send(a, f"3|bob|m{i}")
    assert host.take(a) == [ok("Message sent to bob."), ok("Message sent to bob."),
                            err("Unable to send: bob has too many undelivered messages. Please try again later.")]
    assert host.service.state.pending_count("bob") == 2
    c = host.open(3)
    host.send(c, "2|bob")
    assert [f[2] for f in host.take(c)][1:3] == ["alice|m0", "alice|m1"]
    host.send(c, "4|nobody")  # bob's next request: he read the chat written before it
    host.commit()  # the read chat is confirmed delivered
    host.take(c)
    host.send(a, "3|bob|m3")
    assert host.take(a) == [ok("Message sent to bob.")]
    assert host.take(c) == [chat("alice|m3")]


def test_a_retried_send_is_acknowledged_even_when_the_mailbox_filled_since():
    host = Host(limits=Limits(max_queued_chats=1))
    ext_client(host, 1, "alice")
    b = host.open(2)
    host.send(b, "1|bob")
    host.send(b, "6")
    host.send(1, "0|send|r1|bob|once")
    host.send(1, "0|send|r1|bob|once")  # retried after a failover: the chat is already queued
    host.send(1, "0|send|r2|bob|twice")
    assert [f[2] for f in host.take(1)] == ["Message sent to bob.", "Message sent to bob.",
                                            "Unable to send: bob has too many undelivered messages. Please try again later."]
    assert host.service.state.pending_count("bob") == 1


def test_limits_never_change_what_a_committed_command_does():
    """A replica applies the log whatever its own limits: a backup with smaller limits than the
    primary that proposed the commands reaches the same state (determinism)."""
    primary, backup = Host(), Host(limits=Limits(max_accounts=1, max_queued_chats=1))
    a, b = primary.open(1), primary.open(2)
    primary.send(a, "1|alice")
    primary.send(b, "1|bob")
    primary.send(b, "6")
    for i in range(3):
        primary.send(a, f"3|bob|m{i}")
    for index, cmd in enumerate(primary.log, 1):
        backup.service.apply(index, cmd)
    assert backup.service.state.to_snapshot() == primary.service.state.to_snapshot()
    assert backup.service.state.pending_count("bob") == 3


@pytest.mark.parametrize("kwargs", [{"max_accounts": 0}, {"max_queued_chats": -1}, {"max_list_names": 0},
                                    {"max_list_names": Limits.MAX_LIST_NAMES + 1}])
def test_limits_are_validated(kwargs):
    with pytest.raises(ConfigError):
        Limits(**kwargs)


def test_a_full_page_of_the_longest_names_fits_one_frame():
    state = ChatState()
    for i in range(Limits.MAX_LIST_NAMES + 1):
        state.apply(sm.cmd_create(f"{i:04d}" + "😀" * 28))
    host = Host(state, Limits(max_list_names=Limits.MAX_LIST_NAMES))
    a = host.open(1)
    host.send(a, "4|" + "*" * 270)
    (frame,) = host.take(a)
    assert frame[2].count("\n- ") == Limits.MAX_LIST_NAMES and frame[2].endswith(" for the next page.\n")


# ------------------------------------------------------------- arrival order (issue 11)


def test_a_login_after_a_create_on_another_connection_succeeds(host):
    """`1|bob` on one connection, closed at once; `2|bob` on another, received before the create
    committed: the login is judged after the create, as it arrived."""
    a, b = host.open(1), host.open(2)
    host.send(a, "1|bob", commit=False)
    host.close(a)
    host.send(b, "2|bob", commit=False)
    assert host.take(b) == []  # not answered from the state before the create
    host.commit()
    assert host.take(b)[0] == ok("Logged in as bob.")


def test_a_list_after_creates_on_short_lived_connections_shows_them_all(host):
    for conn, name in enumerate(["w", "x", "y", "z"], start=1):
        host.open(conn)
        host.send(conn, f"1|{name}", commit=False)
        host.close(conn)
    lister = host.open(9)
    host.send(lister, "4", commit=False)
    assert host.take(lister) == [] and host.service.waiting(lister)
    host.commit()
    assert host.take(lister) == [ok("\n- w\n- x\n- y\n- z\n")]
    assert not host.service.waiting(lister)


def test_a_read_with_nothing_in_flight_is_answered_at_once(host):
    a = host.open(1)
    host.send(a, "1|alice")
    b = host.open(2)
    host.send(b, "4", commit=False)
    assert host.take(b) == [ok("\n- alice\n")]


def test_an_empty_chat_to_an_account_being_created_is_refused_for_emptiness(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.take(a)
    host.send(b, "1|bob", commit=False)
    host.send(a, "3|bob|", commit=False)
    assert host.take(a) == []
    host.commit()
    assert host.take(a) == [err(sv.T_EMPTY_MESSAGE)]


def test_a_refused_send_does_not_spend_its_request_id(host):
    ext_client(host, 1, "alice")
    host.send(1, "0|send|r1|bob|hi")
    b = host.open(2)
    host.send(b, "1|bob")
    host.send(1, "0|send|r1|bob|hi")  # the same id, now that bob exists: sent, not "duplicate"
    assert [f[2] for f in host.take(1)][-2:] == [sv.T_NO_RECIPIENT, "Message sent to bob."]
    assert [m.text for m in host.service.state.mail_after("bob", 0)] == ["hi"]


# ------------------------------------------- at-least-once for seed-style recipients (issue 11)


def seed_user_with_chat(host, n=3):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|alice")
    host.send(b, "1|bob")
    host.take(b)
    for i in range(n):
        host.send(a, f"3|bob|m{i}")
    assert [f[2] for f in host.take(b)] == [f"alice|m{i}" for i in range(n)]  # written to bob's socket
    return a, b


def test_chat_written_to_a_connection_that_resets_is_delivered_again(host):
    _, b = seed_user_with_chat(host)
    host.commit()
    host.close(b)  # a reset, unread chat lost in its socket buffer: no evidence it was read
    host.commit()
    c = host.open(3)
    host.send(c, "2|bob")
    assert [f[2] for f in host.take(c)][1:4] == ["alice|m0", "alice|m1", "alice|m2"]


def test_a_later_request_or_a_clean_exit_is_evidence_of_reading(host):
    _, b = seed_user_with_chat(host, 2)
    host.send(b, "4|nobody")  # a later request: the chat before it was read
    host.commit()
    assert host.service.state.pending_count("bob") == 0
    a = 1
    host.send(a, "3|bob|m9")
    assert host.take(b)[-1] == chat("alice|m9")
    host.send(b, "6")  # a clean exit
    host.commit()
    assert host.service.state.pending_count("bob") == 0


def test_our_clients_still_confirm_by_ack_only(host):
    ext_client(host, 1, "alice")
    ext_client(host, 2, "bob")
    host.send(1, "3|bob|hello")
    host.send(2, "4|nobody")  # a request is no evidence for an extended session: acks are
    host.commit()
    assert host.service.state.pending_count("bob") == 1


def test_a_connection_whose_input_ended_does_not_hold_its_account_online(host):
    a, b = host.open(1), host.open(2)
    host.send(a, "1|bob", commit=False)
    host.service.input_ended(a)  # the seed client wrote its request and closed
    host.send(b, "2|bob", commit=False)
    host.commit()
    assert host.take(a) == [ok("Account created! Logged in as bob.")]  # still answered
    assert host.take(b)[0] == ok("Logged in as bob.")
