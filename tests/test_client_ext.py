"""ClientSession speaking extension 1 (docs/protocol.md, "Extension 1: sessions that survive
failover"), without sockets: negotiation, tokens, resume, sequence numbers, acks, request ids."""

import random

import pytest
from test_client_session import Harness, cmd, err, note, ok

from chatnet.client import commands as c
from chatnet.client import session as s
from chatnet.client.present import Presenter
from chatnet.protocol.codec import encode_frame

S1, S2, S3 = s.DEFAULT_SERVERS
INVALID = "Invalid operation. Please input your request as [operation]|[params]."


def schat(seq, sender, text):
    return encode_frame(0, 1, f"{seq}|{sender}|{text}")


def ext_harness(**kwargs):
    kwargs.setdefault("rid_prefix", "PFX")
    return Harness(extension=True, **kwargs)


def negotiate(h):
    """Connect and have the server accept extension 1; return what was sent after the answer."""
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]
    h.feed(ok("ext|1"))
    assert h.session.extended is True
    return h.sends()


def ext_logged_in(name="alice", token="tok1"):
    h = ext_harness()
    h.start()
    assert negotiate(h) == []
    h.session.submit(cmd(f"create|{name}"), h.t)
    assert h.sends() == [f"1|{name}\n".encode()]
    h.feed(ok(f"Account created! Logged in as {name}."), ok(f"token|{token}"))
    assert h.session.user == name and h.session.token == token
    return h


def lose(h, reason="reset"):
    h.session.connection_lost(h.t, reason)
    h.take()


def sent_text(h):
    return [d.decode() for d in h.sends()]


# ------------------------------------------------------------------------------ negotiation

def test_every_connection_asks_for_the_extension_first_and_holds_the_queue_until_answered():
    h = ext_harness()
    h.start()
    h.session.submit(cmd("create|alice"), h.t)
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]       # nothing else before the answer
    assert h.session.negotiating and h.session.state is s.State.IDENTIFYING
    h.session.submit(cmd("list"), h.t)
    assert h.sends() == []
    h.feed(ok("ext|1"))
    assert h.of(s.Negotiated) == [s.Negotiated(S1, True)]
    assert h.of(s.PrimaryConfirmed) == [s.PrimaryConfirmed(S1)]
    assert h.sends() == [b"1|alice\n", b"4\n"]
    assert not h.session.negotiating
    assert not any(line for e in h.events for line in Presenter().lines(e)
                   if isinstance(e, s.FrameReceived))     # the negotiation is not shown


def test_a_server_without_the_extension_leaves_the_session_seed_style():
    h = ext_harness()
    h.start()
    h.session.submit(cmd("create|alice"), h.t)
    h.connect_ok()
    h.feed(err(INVALID))
    assert h.session.extended is False
    assert h.of(s.Negotiated) == [s.Negotiated(S1, False)]
    assert h.sends() == [b"1|alice\n"]
    h.feed(ok("Account created! Logged in as alice."))
    h.session.submit(cmd("send|bob|hi"), h.t)
    assert h.sends() == [b"3|bob|hi\n"]                    # no request id
    h.feed(ok("Message sent to bob."), encode_frame(0, 1, "bob|12|not a seq"))
    chat = [e for e in h.of(s.FrameReceived) if e.kind == "chat"][-1]
    assert (chat.sender, chat.text, chat.seq) == ("bob", "12|not a seq", None)
    assert h.sends() == []                                 # no acks either
    lose(h)
    h.connect_ok()
    h.feed(err("This operation is not supported by this server."))   # any refusal: seed-style
    assert h.sends() == [b"2|alice\n"]


def test_the_negotiation_is_the_probe_a_backup_answers_with_its_note():
    h = ext_harness(probe=True)
    h.start()
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]         # no separate 4|| probe
    assert h.feed(note("This server is a backup. The primary is at 127.0.0.1:3538.")) == \
        [s.Disconnect(), s.Connect(S3)]
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]
    h.feed(ok("ext|1"))
    assert h.session.role == "primary" and h.session.idle
    assert h.sends() == []                                 # nobody to log in, nothing to probe


def test_extension_off_behaves_like_the_seed_client():
    h = Harness(extension=False, probe=True)
    h.start()
    assert h.connect_ok() == [b"\n", b"4||\n"]
    assert h.session.extended is False


# ----------------------------------------------------------------------------------- token

def test_token_frames_are_remembered_and_answer_nothing():
    h = ext_logged_in(token="abc")
    h.session.submit(cmd("list"), h.t)
    h.sends()
    h.feed(ok("\n- alice\n"))
    answers = [e for e in h.of(s.FrameReceived) if e.answer_to is not None and not e.answer_to.auto]
    assert [(e.answer_to.command.wire, e.message) for e in answers] == [
        ("1|alice", "Account created! Logged in as alice."), ("4", "\n- alice\n")]
    assert not [e for e in h.of(s.FrameReceived) if e.message.startswith("token|")]
    assert h.session.idle


def test_a_later_login_replaces_the_token_and_delete_forgets_it():
    h = ext_logged_in(token="t1")
    h.session.submit(cmd("delete"), h.t)
    h.sends()
    h.feed(ok("Account alice has been deleted. You are now logged out."))
    assert h.session.user is None and h.session.token is None and h.session.last_seq == 0
    h.session.submit(cmd("login|bob"), h.t)
    h.sends()
    h.feed(ok("Logged in as bob."), ok("token|t2"), schat(1, "carol", "hi"),
           note("You have 1 missed messages above."))
    assert (h.session.user, h.session.token, h.session.last_seq) == ("bob", "t2", 1)
    assert h.session.idle


# ---------------------------------------------------------------------------------- resume

def test_after_a_reconnect_the_session_resumes_with_name_token_and_last_seq():
    h = ext_logged_in(token="tok")
    h.feed(schat(1, "bob", "one"), schat(2, "bob", "two"))
    h.sends()
    lose(h)
    h.session.submit(cmd("send|bob|typed while away"), h.t)
    h.session.submit(cmd("list"), h.t)
    assert negotiate(h) == [b"7|alice|tok|2\n"]            # queue still held
    assert h.session.state is s.State.IDENTIFYING
    h.feed(ok("Resumed as alice."), ok("token|tok"), schat(3, "bob", "three"))
    assert h.of(s.Reidentified) == [s.Reidentified("alice", S2, resumed=True)]
    assert h.session.resumed
    assert sent_text(h) == ["0|send|PFX1|bob|typed while away\n", "4\n", "0|ack|3\n"]
    h.feed(ok("Message sent to bob."), ok("\n- alice\n- bob\n"))
    assert h.session.idle                                  # no summary note is awaited
    lines = [line.text for e in h.events for line in Presenter().lines(e)]
    assert "resumed as alice on 127.0.0.1:2538" in lines
    assert "three" in lines


def test_a_refused_resume_falls_back_to_a_fresh_login_and_keeps_the_queue():
    h = ext_logged_in(token="old")
    h.feed(schat(1, "bob", "one"), schat(2, "bob", "two"))
    h.sends()
    lose(h)
    h.session.submit(cmd("send|bob|queued"), h.t)
    assert negotiate(h) == [b"7|alice|old|2\n"]
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    assert h.sends() == [b"2|alice\n"]                     # at once, queue still waiting
    assert h.of(s.ResumeRefused) == [s.ResumeRefused("alice", s.RESUME_BAD_TOKEN_TEXT)]
    assert h.session.token is None and h.session.user == "alice"
    h.feed(ok("Logged in as alice."), ok("token|new"),
           schat(2, "bob", "two"), schat(3, "bob", "three"),   # 2: its ack was lost
           note("You have 2 missed messages above."))
    assert sent_text(h) == ["0|send|PFX1|bob|queued\n", "0|ack|3\n"]
    assert h.session.token == "new" and h.session.last_seq == 3
    assert h.of(s.Reidentified) == [s.Reidentified("alice", S2, resumed=False, fresh=True)]
    chats = [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"]
    assert chats == ["one", "two", "three"]                # "two" not shown twice
    assert h.of(s.DuplicateDropped) == [s.DuplicateDropped(2, "bob")]
    lines = [line for e in h.events for line in Presenter().lines(e)]
    refused = [line for line in lines if "could not resume" in line.text]
    assert refused and refused[0].kind == "error" and "fresh login" in " ".join(
        line.text for line in lines)
    h.feed(ok("Message sent to bob."))
    assert h.session.idle


def test_a_resume_refused_for_another_sides_numbers_logs_in_and_numbers_from_zero():
    """After a healed split brain the winner refuses a LAST_SEQ numbered by the losing side
    (docs/protocol.md, resume): the client logs in afresh and takes the winner's chat from
    seq 1 again, instead of dropping it as seen (it kept last_seq 5 before the fix)."""
    h = ext_logged_in(token="old.7")
    h.feed(*(schat(i, "bob", f"loser {i}") for i in range(1, 6)))
    h.sends()
    lose(h)
    assert negotiate(h) == [b"7|alice|old.7|5\n"]
    h.feed(err(s.RESUME_OTHER_HISTORY_TEXT))
    assert h.sends() == [b"2|alice\n"]
    assert h.session.last_seq == 0
    h.feed(ok("Logged in as alice."), ok("token|new.9"), schat(1, "carol", "winner 1"),
           schat(2, "carol", "winner 2"), note("You have 2 missed messages above."))
    chats = [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"]
    assert chats[-2:] == ["winner 1", "winner 2"] and not h.of(s.DuplicateDropped)
    assert h.session.last_seq == 2 and sent_text(h) == ["0|ack|2\n"]


def test_a_refused_resume_whose_fresh_login_is_refused_too_logs_out_but_sends_the_queue():
    h = ext_logged_in()
    lose(h)
    h.session.submit(cmd("list"), h.t)
    negotiate(h)
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    h.sends()
    h.feed(err("Unable to login: This username does not exist. If you would like to use this "
               "username, please create a new account."))
    assert h.session.user is None and h.of(s.ReidentifyFailed)
    assert h.sends() == [b"4\n"]


def test_resume_of_a_deleted_account_is_not_retried_as_a_login():
    h = ext_logged_in()
    lose(h)
    negotiate(h)
    h.feed(err(s.RESUME_UNKNOWN_TEXT))
    assert h.sends() == []
    assert h.of(s.ReidentifyFailed) == [s.ReidentifyFailed("alice", s.RESUME_UNKNOWN_TEXT)]
    assert h.session.user is None and h.session.token is None


def test_without_a_token_the_session_logs_in_even_on_an_extended_server():
    h = ext_harness()
    h.start()
    h.connect_ok()
    h.feed(err(INVALID))                                    # first server: no extension
    h.session.submit(cmd("create|alice"), h.t)
    h.sends()
    h.feed(ok("Account created! Logged in as alice."))
    lose(h)
    assert negotiate(h) == [b"2|alice\n"]                   # extended now, but no token known
    h.feed(ok("Logged in as alice."), ok("token|t"), note("No new messages since you've been gone."))
    assert h.session.token == "t"
    lose(h)
    assert negotiate(h) == [b"7|alice|t|0\n"]


def test_a_resume_answered_still_connected_is_retried_with_backoff_then_falls_back():
    h = ext_logged_in(token="t")
    lose(h)
    negotiate(h)
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    assert h.sends() == [b"2|alice\n"]
    h.feed(err(s.ALREADY_CONNECTED_TEXT))
    assert h.sends() == []
    h.advance(h.session.next_deadline() - h.t)
    assert h.sends() == [b"2|alice\n"]


# ------------------------------------------------------------------- sequence numbers, acks

def test_chats_are_acknowledged_once_per_burst_and_duplicates_dropped():
    h = ext_logged_in()
    h.feed(schat(1, "bob", "a"), schat(2, "bob", "b|with pipe"), schat(3, "carol", "c"))
    assert sent_text(h) == ["0|ack|3\n"]                    # one ack for the burst
    chats = [(e.seq, e.sender, e.text) for e in h.of(s.FrameReceived) if e.kind == "chat"]
    assert chats == [(1, "bob", "a"), (2, "bob", "b|with pipe"), (3, "carol", "c")]
    h.feed(schat(3, "carol", "c"))                          # already acknowledged here: no ack
    assert h.sends() == []
    h.feed(schat(2, "bob", "b|with pipe"), schat(4, "bob", "d"))
    assert sent_text(h) == ["0|ack|4\n"]
    assert h.session.duplicates_dropped == 2
    assert [e.seq for e in h.of(s.FrameReceived) if e.kind == "chat"] == [1, 2, 3, 4]


def test_chat_arriving_after_our_exit_is_left_for_the_next_login():
    """The server logs us out on exit and ignores later acks, so a chat it wrote just before
    reading our exit stays in the mailbox: showing it now would show it twice (found by the
    chaos runner, seed 5)."""
    h = ext_logged_in()
    h.session.submit(cmd("exit"), h.t)
    assert sent_text(h) == ["6\n"]
    h.feed(schat(1, "bob", "just before the exit"))
    assert [e for e in h.of(s.FrameReceived) if e.kind == "chat"] == []
    assert h.sends() == []                                  # no ack the server would ignore


def test_exit_at_eof_after_a_login_waits_for_its_chat_and_acknowledges_it_first():
    """`printf 'login|bob\\n' | chatclient`: the queued chat of the login is shown and
    acknowledged before the exit leaves, so it is delivered once, now."""
    h = ext_harness()
    h.start()
    negotiate(h)
    h.session.submit(cmd("login|bob"), h.t)
    h.session.submit(cmd("exit"), h.t)
    assert sent_text(h) == ["2|bob\n"]
    h.feed(ok("Logged in as bob."), ok("token|t"), schat(7, "alice", "hello bob"),
           note("You have 1 missed messages above."))
    assert sent_text(h) == ["0|ack|7\n", "6\n"]
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["hello bob"]


def test_a_burst_cut_in_pieces_is_acknowledged_per_piece_received():
    h = ext_logged_in()
    data = schat(1, "bob", "héllo") + schat(2, "bob", "x")
    cut = len(schat(1, "bob", "héllo")) + 2
    h.feed(data[:cut])
    assert sent_text(h) == ["0|ack|1\n"]
    h.feed(data[cut:])
    assert sent_text(h) == ["0|ack|2\n"]


def test_duplicates_after_a_fresh_login_are_acknowledged_again_on_the_new_connection():
    h = ext_logged_in()
    h.feed(schat(1, "bob", "a"), schat(2, "bob", "b"))
    h.sends()
    lose(h)
    negotiate(h)
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    h.sends()
    h.feed(ok("Logged in as alice."), ok("token|n"), schat(1, "bob", "a"), schat(2, "bob", "b"),
           note("You have 2 missed messages above."))
    assert sent_text(h) == ["0|ack|2\n"]                    # so the mailbox is finally emptied
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["a", "b"]


def test_no_ack_goes_to_a_connection_that_was_dropped_in_the_same_burst():
    h = ext_logged_in()
    actions = h.feed(schat(1, "bob", "a") + b"\x00\x07\x30")   # then a garbled frame
    assert s.Disconnect() in actions
    assert h.sends() == []
    assert h.session.last_seq == 1                          # shown, and named on resume
    negotiate(h)
    h.feed(ok("ext|1"))


def test_a_chat_without_a_number_on_an_extended_connection_is_shown_as_is():
    h = ext_logged_in()
    h.feed(encode_frame(0, 1, "bob|plain"))
    chat = [e for e in h.of(s.FrameReceived) if e.kind == "chat"][-1]
    assert (chat.sender, chat.text, chat.seq) == ("bob", "plain", None)
    assert h.sends() == []


# ------------------------------------------------------------------------------ request ids

def test_sends_carry_request_ids_and_a_retry_reuses_the_same_id():
    h = ext_logged_in(token="t")
    first = h.session.submit(cmd("send|bob|one"), h.t)
    second = h.session.submit(cmd("send|bob|two"), h.t)
    h.session.submit(cmd("list"), h.t)
    assert sent_text(h) == ["0|send|PFX1|bob|one\n", "0|send|PFX2|bob|two\n", "4\n"]
    assert (first.rid, second.rid) == ("PFX1", "PFX2")
    h.feed(ok("Message sent to bob."))                      # "two" and the list unanswered
    lose(h)
    third = h.session.submit(cmd("send|bob|three"), h.t)
    negotiate(h)
    h.feed(ok("Resumed as alice."), ok("token|t"))
    assert sent_text(h) == ["0|send|PFX2|bob|two\n", "4\n", "0|send|PFX3|bob|three\n"]
    assert second.attempts == 2 and second.rid == "PFX2" and third.rid == "PFX3"
    h.feed(ok("Message sent to bob."), ok("\n- alice\n- bob\n"), ok("Message sent to bob."))
    assert h.session.idle


def test_request_ids_are_valid_and_differ_between_sessions():
    rid_ok = __import__("re").compile(r"[A-Za-z0-9_-]{1,32}\Z")
    prefixes = {s.ClientSession().rid_prefix for _ in range(50)}
    assert len(prefixes) == 50 and all(rid_ok.match(p + "zz") for p in prefixes)
    h = ext_logged_in()
    rids = []
    for i in range(2000):
        p = h.session.submit(cmd(f"send|bob|{i}"), h.t)
        rids.append(p.rid)
    h.sends()
    assert len(set(rids)) == 2000 and all(rid_ok.match(r) for r in rids)
    with pytest.raises(ValueError):
        s.ClientSession(rid_prefix="bad prefix")


def test_a_send_at_the_limit_still_goes_with_a_request_id():
    """The server counts the limit on the op 3 equivalent (docs/protocol.md), so a chat at
    exactly 280 characters as op 3 is still sent with its request id (exactly-once)."""
    h = ext_logged_in()
    text = "x" * (c.MAX_REQUEST_CHARS - len("3|bob|"))       # exactly at the limit as op 3
    p = h.session.submit(cmd(f"send|bob|{text}"), h.t)
    assert len(p.command.wire) == c.MAX_REQUEST_CHARS
    assert sent_text(h) == [f"0|send|{p.rid}|bob|{text}\n"]


def test_a_send_queued_before_the_negotiation_goes_out_with_an_id():
    h = ext_harness()
    h.start()
    h.session.submit(cmd("create|alice"), h.t)
    h.session.submit(cmd("send|bob|early"), h.t)
    negotiate_sends = h.connect_ok()
    assert negotiate_sends == [b"\n", b"0|ext|1\n"]
    h.feed(ok("ext|1"))
    assert sent_text(h) == ["1|alice\n", "0|send|PFX1|bob|early\n"]


# ------------------------------------------------------------------ retried create, login

def test_a_retried_create_answered_taken_logs_in_and_holds_the_queue_until_then():
    h = ext_harness()
    h.start()
    negotiate(h)
    create = h.session.submit(cmd("create|alice"), h.t)
    h.session.submit(cmd("send|bob|first"), h.t)
    h.sends()
    lose(h)                                   # the create committed, its answer was lost
    assert negotiate(h) == [b"1|alice\n"]    # the send waits behind the retried create
    h.feed(err(s.CREATE_TAKEN_TEXT))
    assert h.of(s.CreateRecovered) == [s.CreateRecovered("alice")]
    assert h.session.user == "alice" and create.attempts == 2
    assert h.sends() == [b"2|alice\n"]
    h.feed(ok("Logged in as alice."), ok("token|t"), note("No new messages since you've been gone."))
    assert sent_text(h) == ["0|send|PFX1|bob|first\n"]
    assert h.session.token == "t"
    lines = [line for e in h.events for line in Presenter().lines(e)]
    assert not [line for line in lines if "already taken" in line.text]
    assert any("exists already" in line.text for line in lines)


def test_a_create_answered_taken_the_first_time_is_just_an_error():
    h = ext_harness()
    h.start()
    negotiate(h)
    h.session.submit(cmd("create|alice"), h.t)
    h.session.submit(cmd("list"), h.t)
    assert h.sends() == [b"1|alice\n", b"4\n"]            # pipelined as usual
    h.feed(err(s.CREATE_TAKEN_TEXT))
    assert h.session.user is None and not h.of(s.CreateRecovered)


def test_a_retried_login_holds_the_queue_until_answered():
    h = ext_harness()
    h.start()
    negotiate(h)
    h.session.submit(cmd("login|alice"), h.t)
    h.session.submit(cmd("send|bob|x"), h.t)
    h.sends()
    lose(h)
    assert negotiate(h) == [b"2|alice\n"]
    h.feed(ok("Logged in as alice."), ok("token|t"))
    assert sent_text(h) == ["0|send|PFX1|bob|x\n"]


# -------------------------------------------------------------------- presentation, CLI

def test_status_bar_says_resumed():
    from chatnet.client.cli import CursesUI

    h = ext_logged_in(token="t")
    lose(h)
    negotiate(h)
    h.feed(ok("Resumed as alice."), ok("token|t"))

    class FakeDriver:
        def clock(self):
            return h.t

    ui = CursesUI.__new__(CursesUI)
    ui.session, ui.driver, ui.scroll, ui.width = h.session, FakeDriver(), 0, 100
    from chatnet.client.editor import LineEditor
    ui.editor = LineEditor()
    left, _, bad = ui.status_text()
    assert "127.0.0.1:2538 (primary) | alice | connected, resumed" in left and not bad


# ------------------------------------------------------------- randomised simulation

class ExtCluster:
    """A model of the replicated state behind any primary: accounts with tokens, mailboxes with
    sequence numbers, and remembered request ids.  A connection's requests take effect only when
    "committed"; a crash (connection cut) may lose the answer of a committed request, and acks
    are applied only with some probability before a crash."""

    def __init__(self, rng):
        self.rng = rng
        self.token = None
        self.next_seq = 1
        self.mailbox = []               # [(seq, text)]
        self.rids = {}                  # rid -> text
        self.delivered_to_bob = []      # texts of alice's sends, in commit order
        self.injected = []              # chats "bob" sent to alice, in order
        self.tokens = 0
        self.created = False

    def new_token(self):
        self.tokens += 1
        self.token = f"t{self.tokens}"
        return self.token

    def inject(self, text):
        self.injected.append(text)
        self.mailbox.append((self.next_seq, text))
        self.next_seq += 1
        return self.mailbox[-1]

    def ack(self, upto):
        self.mailbox = [(q, t) for q, t in self.mailbox if q > upto]

    def answer(self, line, conn):
        """(bytes, close) for one request line of a connection."""
        op, _, rest = line.partition("|")
        fields = rest.split("|")
        if op == "0" and fields[0] == "ext":
            conn["ext"] = True
            return ok("ext|1"), False
        if op == "0" and fields[0] == "ack":
            if self.rng.random() < 0.7:            # else the ack dies with the primary
                self.ack(int(fields[1]))
            return b"", False
        if op == "0" and fields[0] == "send":
            rid, recipient, text = fields[1], fields[2], "|".join(fields[3:])
            if rid not in self.rids:
                self.rids[rid] = text
                self.delivered_to_bob.append(text)
            return ok(f"Message sent to {recipient}."), False
        if op == "3":
            self.delivered_to_bob.append(rest.partition("|")[2])
            return ok("Message sent to bob."), False
        if op == "1":
            if self.created:
                return err(s.CREATE_TAKEN_TEXT), False
            self.created = True
            conn["user"] = rest
            return ok(f"Account created! Logged in as {rest}.") + ok(f"token|{self.new_token()}"), False
        if op == "2":
            conn["user"] = rest
            data = ok(f"Logged in as {rest}.") + ok(f"token|{self.new_token()}")
            data += b"".join(schat(q, "bob", t) for q, t in self.mailbox)
            return data + note(f"You have {len(self.mailbox)} missed messages above."), False
        if op == "7":
            name, token, last = fields
            if token != self.token or self.rng.random() < 0.1:      # sometimes superseded
                self.token = None if token == self.token else self.token
                return err(s.RESUME_BAD_TOKEN_TEXT), False
            conn["user"] = name
            self.ack(int(last))
            data = ok(f"Resumed as {name}.") + ok(f"token|{token}")
            return data + b"".join(schat(q, "bob", t) for q, t in self.mailbox), False
        if op == "4":
            return ok("\n- alice\n- bob\n"), False
        return err(INVALID), False


@pytest.mark.parametrize("seed", range(40))
def test_random_failovers_deliver_every_chat_exactly_once_both_ways(seed):
    """Connections break at random points (answers lost after the commit, acks lost, tokens
    superseded); in the end every send reached bob exactly once, every chat from bob was shown
    exactly once and in order, and nothing typed was dropped."""
    rng = random.Random(seed)
    model = ExtCluster(rng)
    h = ext_harness(seed=seed, backoff=s.Backoff(base=0.05, cap=0.2))
    session = h.session
    conn = None
    submitted = []
    shown = []

    def run_actions():
        nonlocal conn
        while actions := session.take_actions():
            for action in actions:
                if isinstance(action, s.Connect):
                    assert conn is None
                    conn = {"out": bytearray(), "ext": False, "user": None}
                    session.connection_made(h.t)
                elif isinstance(action, s.Send) and conn is not None:
                    for line in action.data.decode().split("\n")[:-1]:
                        if line:
                            data, _ = model.answer(line, conn)
                            conn["out"] += data
                elif isinstance(action, s.Disconnect):
                    conn = None
        for event in session.take_events():
            h.events.append(event)
            if isinstance(event, s.FrameReceived) and event.kind == "chat":
                shown.append(event.text)

    session.start(h.t)
    run_actions()
    session.submit(cmd("create|alice"), h.t)
    run_actions()
    n = 0
    for step in range(600):
        calm = step >= 450
        r = rng.random()
        if r < 0.12 and step < 400:
            n += 1
            submitted.append(session.submit(cmd(f"send|bob|m{n}|x"), h.t))
        elif r < 0.2 and step < 400 and model.created:
            text = f"b{len(model.injected) + 1}"
            seq, _ = model.inject(text)
            if conn is not None and conn["user"] == "alice":
                conn["out"] += schat(seq, "bob", text)      # live delivery
        elif r < 0.6 and conn is not None and conn["out"]:
            cut = rng.randint(1, len(conn["out"]))
            data, conn["out"][:cut] = bytes(conn["out"][:cut]), b""
            session.data_received(data, h.t)
        elif r < 0.66 and conn is not None and not calm:
            conn = None                                      # the primary dies: output lost
            session.connection_lost(h.t, "killed")
        else:
            deadline = session.next_deadline()
            h.t = max(h.t, deadline) if deadline is not None else h.t + 0.05
            session.tick(h.t)
        run_actions()
    for _ in range(200):                                     # drain what is left
        if conn is not None and conn["out"]:
            data, conn["out"][:] = bytes(conn["out"]), b""
            session.data_received(data, h.t)
        else:
            deadline = session.next_deadline()
            h.t = max(h.t, deadline) if deadline is not None else h.t + 0.05
            session.tick(h.t)
        run_actions()
    assert session.idle and session.state is s.State.READY, session.state
    sent_texts = [p.command.params[1] for p in submitted]
    assert model.delivered_to_bob == sent_texts              # exactly once, in order
    assert shown == model.injected                           # exactly once, in order
