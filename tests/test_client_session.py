"""ClientSession without sockets: actions out, events out, a number for the clock."""

import random

import pytest

from chatnet.client import commands as c
from chatnet.client import session as s
from chatnet.protocol.codec import encode_frame, encode_response

S1, S2, S3 = s.DEFAULT_SERVERS


def cmd(line):
    result = c.parse_command(line)
    assert isinstance(result, c.Command), result
    return result


def ok(text):
    return encode_frame(0, 0, text)


def err(text):
    return encode_frame(1, 0, text)


def note(text):
    return encode_frame(2, 0, text)


def chat(sender, text):
    return encode_frame(0, 1, f"{sender}|{text}")


class Harness:
    """A session plus the bookkeeping a driver would do; ``t`` is the clock."""

    def __init__(self, servers=s.DEFAULT_SERVERS, seed=1, **kwargs):
        kwargs.setdefault("probe", False)       # tested on its own below
        kwargs.setdefault("extension", False)   # seed-style here; extension 1: test_client_ext.py
        self.t = 0.0
        self.session = s.ClientSession(servers, rng=random.Random(seed), **kwargs)
        self.events = []
        self._sent = []           # Send data not yet looked at by sends()

    def take(self):
        """The session's new actions (their Send data is also kept for sends())."""
        actions = self.session.take_actions()
        self.events += self.session.take_events()
        self._sent += [a.data for a in actions if isinstance(a, s.Send)]
        return actions

    def sends(self):
        """Data sent since the last call."""
        self.take()
        sent, self._sent = self._sent, []
        return sent

    def of(self, kind):
        self.take()
        return [e for e in self.events if isinstance(e, kind)]

    def start(self):
        self.session.start(self.t)
        return self.take()

    def connect_ok(self):
        self.sends()
        self.session.connection_made(self.t)
        return self.sends()

    def feed(self, *frames):
        self.session.data_received(b"".join(frames), self.t)
        return self.take()

    def advance(self, dt):
        self.t += dt
        self.session.tick(self.t)
        return self.take()

    def wait_for_connect(self):
        """Advance to the next retry; return the Connect's server."""
        deadline = self.session.next_deadline()
        assert deadline is not None
        actions = self.advance(max(0.0, deadline - self.t))
        connects = [a for a in actions if isinstance(a, s.Connect)]
        assert connects, actions
        return connects[-1].server


def logged_in(name="alice", **kwargs):
    h = Harness(**kwargs)
    h.start()
    h.connect_ok()
    h.session.submit(cmd(f"create|{name}"), h.t)
    assert h.sends() == [f"1|{name}\n".encode()]
    h.feed(ok(f"Account created! Logged in as {name}."))
    assert h.session.user == name
    return h


# --------------------------------------------------------------------------------- backoff

def test_backoff_grows_exponentially_and_never_exceeds_the_cap():
    backoff = s.Backoff(base=0.5, factor=2, cap=8)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    rng = random.Random(7)
    for n in range(200):
        d = backoff.delay(n, rng)
        assert backoff.ceiling(n) / 2 <= d <= backoff.ceiling(n) <= 8


def test_backoff_jitter_comes_from_the_injected_rng():
    backoff = s.Backoff()
    assert [backoff.delay(3, random.Random(5)) for _ in range(2)] == [backoff.delay(3, random.Random(5))] * 2
    spread = {round(backoff.delay(3, random.Random(seed)), 6) for seed in range(20)}
    assert len(spread) > 10


def test_rounds_wait_with_capped_backoff_and_report_all_servers_down():
    h = Harness(backoff=s.Backoff(base=1, cap=4))
    assert h.start() == [s.Connect(S1)]
    h.session.connect_failed(h.t, "refused")
    assert h.take() == [s.Connect(S2)]            # within a round: next server at once
    h.session.connect_failed(h.t, "refused")
    assert h.take() == [s.Connect(S3)]
    delays = []
    for round_ in range(6):
        h.session.connect_failed(h.t, "refused")
        assert h.take() == []                      # a round ended: wait
        assert h.session.state is s.State.WAITING and h.session.all_down
        down = h.of(s.AllServersDown)[-1]
        assert down.reachable == 0 and down.retry_at == h.session.retry_at
        delays.append(h.session.retry_at - h.t)
        assert h.wait_for_connect() == S1
        for server in (S2, S3):
            h.session.connect_failed(h.t, "refused")
            assert h.take() == [s.Connect(server)]
    ceilings = [1, 2, 4, 4, 4, 4]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 <= delay <= ceiling


def test_a_good_connection_resets_the_backoff_and_the_next_server_is_tried_first():
    h = Harness(backoff=s.Backoff(base=1, cap=64))
    h.start()
    for _ in range(9):                             # three failed rounds
        h.session.connect_failed(h.t, "refused")
        h.take()
        if h.session.state is s.State.WAITING:
            h.wait_for_connect()
    assert h.session.server == S1
    h.connect_ok()
    h.feed(ok("\n- alice\n"))                      # it answered: the connection is good
    h.session.connection_lost(h.t, "reset")
    assert h.take() == [s.Connect(S2)]             # at once, next in the list
    h.session.connect_failed(h.t, "refused")
    h.session.connect_failed(h.t, "refused")
    h.session.connect_failed(h.t, "refused")
    h.take()
    assert 0.5 <= h.session.retry_at - h.t <= 1     # first round again: the smallest delay


def test_a_connection_that_stays_open_counts_as_good_without_any_frame():
    h = Harness(stable_after=2)
    h.start()
    h.connect_ok()
    h.advance(2.5)
    h.session.connection_lost(h.t, "reset")
    assert h.take() == [s.Connect(S2)]
    assert h.session._chooser.failures == 0


def test_connect_timeout_moves_on():
    h = Harness(connect_timeout=3)
    h.start()
    assert h.session.next_deadline() == 3
    assert h.advance(3) == [s.Disconnect(), s.Connect(S2)]
    assert h.of(s.ConnectFailed)[0].reason.startswith("no answer within 3")


# ------------------------------------------------------------------------------- redirects

def test_backup_note_redirects_the_next_attempt_to_the_primary():
    h = Harness()
    h.start()
    h.connect_ok()
    actions = h.feed(note("This server is a backup. The primary is at 127.0.0.1:3538."))
    assert actions == [s.Disconnect(), s.Connect(S3)]
    assert h.of(s.Redirected) == [s.Redirected(S1, S3)]
    assert h.of(s.Connecting)[-1] == s.Connecting(S3, redirected=True)
    assert not h.of(s.ConnectionLost)             # not an error worth showing


def test_redirect_to_a_server_outside_the_list():
    h = Harness(servers=[S1])
    h.start()
    h.connect_ok()
    assert h.feed(note("This server is a backup. The primary is at 10.0.0.7:4000.")) == \
        [s.Disconnect(), s.Connect(s.Server("10.0.0.7", 4000))]


def test_backup_without_primary_sends_us_to_the_next_server():
    h = Harness()
    h.start()
    h.connect_ok()
    assert h.feed(note(s.NO_PRIMARY_NOTE)) == [s.Disconnect(), s.Connect(S2)]
    assert h.of(s.Redirected) == [s.Redirected(S1, None)]


def test_backups_only_lead_to_backoff_not_a_busy_loop():
    h = Harness()
    h.start()
    for _ in range(3):
        h.connect_ok()
        h.feed(note(s.NO_PRIMARY_NOTE))
    assert h.session.state is s.State.WAITING
    assert h.of(s.AllServersDown)[-1].reachable == 3
    assert h.session.no_primary and not h.session.all_down


def test_with_nobody_to_log_in_a_probe_finds_out_the_role_at_once():
    h = Harness(probe=True)
    h.start()
    assert h.connect_ok() == [b"\n", b"4||\n"]
    assert h.session.role is None and not h.session.idle
    h.feed(ok("\n"))
    assert h.session.role == "primary" and h.session.idle
    assert h.of(s.FrameReceived)[0].answer_to.auto
    h.feed(chat("bob", "hi"))
    assert h.of(s.PrimaryConfirmed) == [s.PrimaryConfirmed(S1)]     # once per connection


def test_a_backup_answers_the_probe_with_its_note():
    h = Harness(probe=True)
    h.start()
    h.session.submit(cmd("create|alice"), h.t)
    assert h.connect_ok() == [b"\n", b"4||\n", b"1|alice\n"]    # the queue does not wait
    assert h.feed(note("This server is a backup. The primary is at 127.0.0.1:2538.")) == \
        [s.Disconnect(), s.Connect(S2)]
    assert h.connect_ok() == [b"\n", b"4||\n", b"1|alice\n"]
    h.feed(ok("\n"), ok("Account created! Logged in as alice."))
    assert h.session.user == "alice" and h.session.idle


def test_commands_sent_to_a_backup_are_sent_again_to_the_primary():
    h = logged_in()
    h.session.submit(cmd("send|bob|hi"), h.t)
    h.sends()
    h.session.connection_lost(h.t, "reset")
    h.take()
    h.connect_ok()                                  # S2, which turns out to be a backup
    h.feed(note("This server is a backup. The primary is at 127.0.0.1:3538."))
    assert h.session.server == S3
    assert h.connect_ok() == [b"\n", b"2|alice\n"]
    h.feed(ok("Logged in as alice."))
    assert h.sends() == [b"3|bob|hi\n"]


# ----------------------------------------------------------------------- queue and re-login

def test_commands_typed_before_the_connection_wait_and_go_in_order():
    h = Harness()
    h.start()
    first = h.session.submit(cmd("create|alice"), h.t)
    h.session.submit(cmd("list"), h.t)
    assert h.sends() == []
    assert [e.pending for e in h.of(s.CommandQueued)][0] is first
    assert h.connect_ok() == [b"\n", b"1|alice\n", b"4\n"]


def test_after_a_reconnect_the_session_logs_in_again_before_sending_the_queue():
    h = logged_in()
    h.feed(chat("bob", "hi"))
    h.session.connection_lost(h.t, "server closed the connection")
    assert h.take() == [s.Connect(S2)]
    h.session.submit(cmd("send|bob|are you there?"), h.t)
    h.session.submit(cmd("list"), h.t)
    assert h.sends() == []
    assert h.connect_ok() == [b"\n", b"2|alice\n"]   # nothing else until the login is answered
    h.session.submit(cmd("send|bob|one more"), h.t)
    assert h.sends() == []
    h.feed(ok("Logged in as alice."), chat("bob", "missed"))
    assert h.sends() == [b"3|bob|are you there?\n", b"4\n", b"3|bob|one more\n"]
    assert h.of(s.Reidentified) == [s.Reidentified("alice", S2)]
    h.feed(note("You have 1 missed messages above."))
    frames = h.of(s.FrameReceived)
    assert frames[-1].kind == "note" and frames[-1].answer_to.auto
    assert not h.session.idle
    h.feed(ok("Message sent to bob."), ok("\n- alice\n- bob\n"), ok("Message sent to bob."))
    assert h.session.idle
    answers = [(e.answer_to.command.wire, e.message) for e in h.of(s.FrameReceived)[-3:]]
    assert answers == [("3|bob|are you there?", "Message sent to bob."),
                       ("4", "\n- alice\n- bob\n"), ("3|bob|one more", "Message sent to bob.")]


def test_unanswered_commands_are_sent_again_after_the_reconnect():
    h = logged_in()
    first = h.session.submit(cmd("send|bob|one"), h.t)
    second = h.session.submit(cmd("send|bob|two"), h.t)
    h.sends()
    h.feed(ok("Message sent to bob."))             # "one" answered, "two" in flight
    h.session.connection_lost(h.t, "reset")
    h.take()
    assert [e.pending for e in h.of(s.CommandRequeued)] == [second]
    h.session.submit(cmd("send|bob|three"), h.t)
    h.connect_ok()
    h.feed(ok("Logged in as alice."))
    assert h.sends() == [b"3|bob|two\n", b"3|bob|three\n"]   # the retry first, in order
    assert second.attempts == 2 and first.attempts == 1
    assert second.request_id != first.request_id


def test_login_refused_as_still_connected_is_retried_with_backoff():
    h = logged_in(identify_retries=2)
    h.session.connection_lost(h.t, "reset")
    h.take()
    h.session.submit(cmd("list"), h.t)
    h.connect_ok()
    h.feed(err("Unable to login: This user is already connected to the server."))
    assert h.sends() == []
    assert h.session.state is s.State.IDENTIFYING and h.session.user == "alice"
    h.advance(h.session.next_deadline() - h.t)
    assert h.sends() == [b"2|alice\n"]
    h.feed(ok("Logged in as alice."))
    assert h.sends() == [b"4\n"]


def test_login_refused_for_good_logs_out_and_still_sends_the_queue():
    h = logged_in(identify_retries=1)
    h.session.connection_lost(h.t, "reset")
    h.take()
    h.session.submit(cmd("list"), h.t)
    h.connect_ok()
    h.feed(err("Unable to login: This user is already connected to the server."))
    h.advance(h.session.next_deadline() - h.t)
    h.sends()
    h.feed(err("Unable to login: This user is already connected to the server."))
    assert h.sends() == [b"4\n"]
    assert h.session.user is None
    assert h.of(s.ReidentifyFailed)[0].user == "alice"
    assert h.of(s.UserChanged)[-1] == s.UserChanged(None)


def test_user_is_learnt_from_success_answers_only():
    h = Harness()
    h.start()
    h.connect_ok()
    h.session.submit(cmd("login|bob"), h.t)
    h.sends()
    h.feed(err("Unable to login: This username does not exist. If you would like to use this username, please create a new account."))
    assert h.session.user is None
    h.session.submit(cmd("login|alice"), h.t)
    h.sends()
    h.feed(ok("Logged in as alice."), chat("bob", "queued"), note("You have 1 missed messages above."))
    assert h.session.user == "alice"
    login_frames = [e for e in h.of(s.FrameReceived) if e.answer_to is not None]
    assert [e.kind for e in login_frames[-2:]] == ["ok", "note"]
    h.session.submit(cmd("delete"), h.t)
    h.sends()
    h.feed(ok("Account alice has been deleted. You are now logged out."))
    assert h.session.user is None
    h.session.connection_lost(h.t, "reset")
    h.take()
    assert h.connect_ok() == [b"\n"]                 # nobody to log in again


def test_chat_frames_interleave_with_answers_and_may_arrive_in_pieces():
    h = logged_in()
    h.session.submit(cmd("send|bob|x"), h.t)
    h.sends()
    data = chat("bob", "héllo|with pipe") + ok("Message sent to bob.")
    for i in range(len(data)):                        # one byte at a time
        h.feed(data[i:i + 1])
    chats = [e for e in h.of(s.FrameReceived) if e.kind == "chat"]
    assert (chats[0].sender, chats[0].text) == ("bob", "héllo|with pipe")
    assert h.of(s.FrameReceived)[-1].answer_to.command.wire == "3|bob|x"


def test_a_long_list_answer_in_several_frames_answers_one_request():
    h = logged_in()
    h.session.submit(cmd("list"), h.t)
    h.session.submit(cmd("send|bob|x"), h.t)
    h.sends()
    names = [f"user{i:05d}" for i in range(6000)]
    h.feed(encode_response(0, 0, "\n" + "".join(f"- {n}\n" for n in names)))
    assert not h.session.idle
    h.feed(ok("Message sent to bob."))
    answers = [e for e in h.of(s.FrameReceived) if e.answer_to is not None][-3:]
    assert [e.answer_to.command.wire for e in answers] == ["4", "4", "3|bob|x"]
    assert h.session.idle


def test_a_garbled_stream_drops_the_connection_and_requeues():
    h = logged_in()
    h.session.submit(cmd("list"), h.t)
    h.sends()
    actions = h.feed(b"\x00\x07\x30")                 # status 7 does not exist
    assert s.Disconnect() in actions
    assert h.of(s.ConnectionLost)[-1].reason.startswith("protocol error")
    assert len(h.session.queued) == 1


# ------------------------------------------------------------------------------------ exit

def test_exit_goes_out_after_the_answers_and_ends_when_the_server_closes():
    """exit waits for every answer, so chat arriving with them is acknowledged before the
    server logs the session out (else it could be neither acknowledged nor shown once)."""
    h = logged_in()
    h.session.submit(cmd("send|bob|bye"), h.t)
    h.session.submit(cmd("exit"), h.t)
    assert h.sends() == [b"3|bob|bye\n"]
    h.feed(ok("Message sent to bob."))
    assert h.sends() == [b"6\n"]
    assert h.session.state is s.State.EXITING
    assert h.session.submit(cmd("list"), h.t) is None
    h.session.connection_lost(h.t, "server closed the connection")
    assert h.session.closed and h.take() == []
    assert h.of(s.SessionClosed) == [s.SessionClosed()]


def test_exit_gives_up_waiting_for_the_server_after_the_grace_time():
    h = logged_in(exit_grace=2)
    h.session.submit(cmd("exit"), h.t)
    h.sends()
    assert h.advance(2) == [s.Disconnect()]
    assert h.session.closed


def test_exit_while_disconnected_with_nothing_queued_ends_at_once():
    h = Harness()
    h.start()
    h.session.connect_failed(h.t, "refused")
    h.take()
    h.session.submit(cmd("exit"), h.t)
    assert h.take() == [s.Disconnect()]
    assert h.session.closed


def test_exit_while_disconnected_waits_behind_queued_commands():
    h = Harness(servers=[S1])
    h.start()
    h.session.connect_failed(h.t, "refused")
    h.take()
    h.session.submit(cmd("create|alice"), h.t)
    h.session.submit(cmd("exit"), h.t)
    assert not h.session.closed
    assert h.wait_for_connect() == S1
    assert h.connect_ok() == [b"\n", b"1|alice\n"]
    h.feed(ok("Account created! Logged in as alice."))
    assert h.sends() == [b"6\n"]


def test_close_reports_what_was_never_sent_or_answered():
    h = logged_in()
    h.session.submit(cmd("send|bob|in flight"), h.t)
    h.sends()
    h.session.connection_lost(h.t, "reset")       # requeued; now waiting to reconnect
    h.take()
    h.session.submit(cmd("send|bob|typed later"), h.t)
    h.session.close(h.t)
    assert h.session.closed
    closed = h.of(s.SessionClosed)[0]
    assert [p.command.wire for p in closed.unsent] == ["3|bob|in flight", "3|bob|typed later"]


def test_close_while_connected_says_exit():
    h = logged_in()
    h.session.close(h.t)
    assert h.take() == [s.Send(b"6\n"), s.Disconnect()]


@pytest.mark.parametrize("text, server", [
    ("127.0.0.1:1538", s.Server("127.0.0.1", 1538)),
    (" localhost:80 ", s.Server("localhost", 80)),
    ("[::1]:2538", s.Server("::1", 2538)),
])
def test_parse_server(text, server):
    assert s.parse_server(text) == server


@pytest.mark.parametrize("text", ["1538", "host:", ":1538", "host:0", "host:70000", "host:x"])
def test_parse_server_refuses(text):
    with pytest.raises(ValueError):
        s.parse_server(text)


def test_parse_servers_keeps_order():
    assert s.parse_servers("a:1,b:2") == (s.Server("a", 1), s.Server("b", 2))
    with pytest.raises(ValueError):
        s.parse_servers(" , ")


# ------------------------------------------------------------- randomised simulation

class FakeCluster:
    """Servers that are down, backups (with a note) or the primary (answering like chatnet)."""

    def __init__(self, rng):
        self.rng = rng
        self.up = {S1, S2, S3}
        self.primary = S1

    def role(self, server):
        if server not in self.up:
            return "down"
        return "primary" if server == self.primary else "backup"

    def answer(self, server, line, conn):
        """Bytes a server sends back for one request line; None means it closes."""
        if self.role(server) == "backup":
            if self.primary in self.up and self.rng.random() < 0.8:
                return note(f"This server is a backup. The primary is at {self.primary}."), True
            return note(s.NO_PRIMARY_NOTE), True
        op, _, rest = line.partition("|")
        if op == "1":
            conn["user"] = rest
            return ok(f"Account created! Logged in as {rest}."), False
        if op == "2":
            conn["user"] = rest
            return ok(f"Logged in as {rest}.") + note("No new messages since you've been gone."), False
        if op == "3":
            return ok(f"Message sent to {rest.partition('|')[0]}."), False
        if op == "4":
            return ok("\n"), False
        if op == "6":
            return b"", True
        return err("Invalid operation. Please input your request as [operation]|[params]."), False


@pytest.mark.parametrize("seed", range(40))
def test_random_faults_never_lose_a_command(seed):
    """Connections break at random moments, servers go down and come back, the primary moves:
    every command the user submitted is answered at least once in the end, timers never go
    stale, and a Connect is never issued while a connection is open."""
    rng = random.Random(seed)
    cluster = FakeCluster(rng)
    h = Harness(seed=seed, probe=rng.random() < 0.5, backoff=s.Backoff(base=0.1, cap=1))
    session = h.session
    conn = None                      # {"server", "user", "out": bytearray, "closing"}
    submitted, answered = [], set()

    def run_actions():
        nonlocal conn
        while actions := session.take_actions():
            execute(actions)
        for event in session.take_events():
            h.events.append(event)
            if isinstance(event, s.FrameReceived) and event.answer_to is not None:
                answered.add(event.answer_to.request_id)

    def execute(actions):
        nonlocal conn
        for action in actions:
            if isinstance(action, s.Connect):
                assert conn is None, "Connect while a connection is open"
                if cluster.role(action.server) == "down":
                    session.connect_failed(h.t, "refused")
                else:
                    conn = {"server": action.server, "user": None, "out": bytearray(), "closing": False}
                    session.connection_made(h.t)
            elif isinstance(action, s.Send):
                if conn is None or conn["closing"]:
                    continue
                for line in action.data.decode().split("\n")[:-1]:
                    if not line or conn["closing"]:
                        continue
                    data, close = cluster.answer(conn["server"], line, conn)
                    conn["out"] += data
                    conn["closing"] = conn["closing"] or close
            elif isinstance(action, s.Disconnect):
                conn = None

    session.start(h.t)
    run_actions()
    words = ["create|u%d" % seed, "send|bob|hi", "list", "send|bob|there", "list|a*"]
    for step in range(400):
        r = rng.random()
        calm = step >= 300                     # the end: no more faults, everything recovers
        if calm:
            cluster.up = {S1, S2, S3}
        if r < 0.15 and step < 250:
            p = session.submit(cmd(rng.choice(words)), h.t)
            if p is not None:
                submitted.append(p)
        elif r < 0.55 and conn is not None and conn["out"]:
            cut = rng.randint(1, len(conn["out"]))
            data, conn["out"][:cut] = bytes(conn["out"][:cut]), b""
            session.data_received(data, h.t)
        elif r < 0.6 and conn is not None and conn["closing"] and not conn["out"]:
            conn = None
            session.connection_lost(h.t, "closed")
        elif r < 0.63 and conn is not None and not calm:
            conn = None
            session.connection_lost(h.t, "reset")
        elif r < 0.66 and not calm:
            cluster.primary = rng.choice([S1, S2, S3])
        elif r < 0.69 and not calm:
            victim = rng.choice([S1, S2, S3])
            cluster.up.symmetric_difference_update({victim})
            if conn is not None and conn["server"] == victim and victim not in cluster.up:
                conn = None
                session.connection_lost(h.t, "killed")
        else:
            deadline = session.next_deadline()
            h.t = max(h.t, deadline) if deadline is not None and rng.random() < 0.5 else h.t + 0.05
            session.tick(h.t)
            deadline = session.next_deadline()
            assert deadline is None or deadline > h.t, "a stale timer"
        run_actions()
    for _ in range(300):          # calm: deliver what is left (a retried create holds the queue)
        if session.idle:
            break
        if conn is not None and conn["out"]:
            data, conn["out"][:] = bytes(conn["out"]), b""
            session.data_received(data, h.t)
        elif conn is not None and conn["closing"]:
            conn = None
            session.connection_lost(h.t, "closed")
        else:
            deadline = session.next_deadline()
            h.t = max(h.t, deadline) if deadline is not None else h.t + 0.05
            session.tick(h.t)
        run_actions()
    assert session.idle and session.state is s.State.READY, session.state
    assert {p.request_id for p in submitted} <= answered
