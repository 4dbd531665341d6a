"""The client's durable state (issue 15), without processes: the session's Persist actions and
saved-token resume, and the SQLite store (modes, round trip, bad files)."""

import os
import sqlite3
import stat

import pytest
from test_client_ext import ext_harness, ext_logged_in, negotiate, schat, sent_text
from test_client_session import cmd, err, ok

from chatnet.client import session as s
from chatnet.client.acks import SequencedChat
from chatnet.client.history import HistoryKeeper
from chatnet.client.present import Presenter
from chatnet.client.state import StateStore, default_state_dir, state_file_name
from chatnet.protocol.codec import encode_frame

SERVERS = s.DEFAULT_SERVERS


def durable_logged_in(saved=None):
    """An extended session with durable state on, logged in as alice by a create."""
    h = ext_harness(saved={} if saved is None else saved)
    h.start()
    negotiate(h)
    h.session.submit(cmd("create|alice"), h.t)
    h.feed(ok("Account created! Logged in as alice."), ok("token|tok1"))
    h.sends()
    return h


def actions_after(h, *frames):
    h.session.data_received(b"".join(frames), h.t)
    actions = h.session.take_actions()
    h.events += h.session.take_events()
    return actions


# ---------------------------------------------------------------------- session: Persist

def test_chat_is_persisted_before_the_ack_that_covers_it():
    h = durable_logged_in()
    actions = actions_after(h, schat(1, "bob", "a"), schat(2, "bob", "b|c"))
    kinds = [type(a).__name__ for a in actions]
    assert kinds == ["Persist", "Send"], actions
    persist, ack = actions
    assert (persist.user, persist.token, persist.last_seq) == ("alice", "tok1", 2)
    assert [(c.seq, c.sender, c.text) for c in persist.chats] == [(1, "bob", "a"), (2, "bob", "b|c")]
    assert ack.data == b"0|ack|2\n"
    assert h.session.saved["alice"] == s.SavedResume("tok1", 2)


def test_repeats_are_not_persisted_again_and_nothing_is_persisted_without_a_change():
    h = durable_logged_in()
    actions_after(h, schat(1, "bob", "a"))
    assert actions_after(h, schat(1, "bob", "a")) == []             # acked already, stored already
    assert actions_after(h, encode_frame(0, 0, "x")) == []          # an unexpected answer: no change


def test_the_create_and_its_token_are_persisted_in_the_same_burst():
    h = ext_harness(saved={})
    h.start()
    negotiate(h)
    h.session.submit(cmd("create|alice"), h.t)
    h.sends()
    actions = actions_after(h, ok("Account created! Logged in as alice."), ok("token|T"))
    assert actions == [s.Persist("alice", "T", 0, ())]


def test_exit_forgets_the_token_first_and_delete_forgets_the_account():
    h = durable_logged_in()
    actions_after(h, schat(3, "bob", "x"))
    h.session.submit(cmd("exit"), h.t)
    actions = h.session.take_actions()
    assert actions[0] == s.Persist("alice", None, 3, ())             # the server clears it on exit
    assert actions[1] == s.Send(b"6\n")
    h = durable_logged_in()
    h.session.submit(cmd("delete"), h.t)
    h.sends()
    actions = actions_after(h, ok("Account deleted."))
    assert s.Persist("alice", None, 0, (), forget=True) in actions
    assert "alice" not in h.session.saved


def test_without_saved_state_the_session_emits_no_persist_as_before():
    h = ext_logged_in()
    actions = actions_after(h, schat(1, "bob", "a"))
    assert [type(a).__name__ for a in actions] == ["Send"]


# ------------------------------------------------------------ session: resume after restart

def restarted(saved):
    h = ext_harness(saved=dict(saved))
    h.start()
    negotiate(h)
    return h


def test_a_typed_login_with_a_saved_token_resumes_and_holds_the_queue():
    h = restarted({"alice": s.SavedResume("tok9", 5)})
    h.session.submit(cmd("login|alice"), h.t)
    h.session.submit(cmd("send|bob|after"), h.t)
    assert sent_text(h) == ["7|alice|tok9|5\n"]                     # the send waits for the answer
    h.feed(ok("Resumed as alice."), ok("token|tok9"), schat(5, "bob", "old"), schat(6, "bob", "new"))
    assert h.session.user == "alice" and h.session.resumed and h.session.last_seq == 6
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["new"]
    assert sent_text(h) == ["0|send|PFX1|bob|after\n", "0|ack|6\n"]
    lines = [line.text for e in h.events for line in Presenter().lines(e)]
    assert "Resumed as alice." in lines


def test_a_refused_saved_token_falls_back_to_a_fresh_login_and_says_so():
    h = restarted({"alice": s.SavedResume("old", 4)})
    h.session.submit(cmd("login|alice"), h.t)
    h.session.submit(cmd("send|bob|queued"), h.t)
    assert sent_text(h) == ["7|alice|old|4\n"]
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    assert sent_text(h) == ["2|alice\n", "0|send|PFX1|bob|queued\n"]
    refused = h.of(s.RestoreRefused)
    assert refused == [s.RestoreRefused("alice", s.RESUME_BAD_TOKEN_TEXT)]
    shown = [line for e in h.events for line in Presenter().lines(e)]
    assert not any(line.kind == "error" for line in shown)           # the raw refusal is not shown
    assert any("could not be resumed" in line.text and "logging in afresh" in line.text for line in shown)
    # The fresh login replays the mailbox: what the last run stored is not shown again.
    h.feed(ok("Logged in as alice."), ok("token|new"), schat(4, "bob", "seen"), schat(5, "bob", "unseen"))
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["unseen"]
    assert h.session.saved["alice"] == s.SavedResume("new", 5)


def test_a_saved_token_of_another_sides_numbers_starts_numbering_from_zero():
    """After a healed split brain the saved LAST_SEQ may number the losing side's mailbox: the
    refusal says so, the fresh login then shows every queued chat (not only those above 4)."""
    h = restarted({"alice": s.SavedResume("old.7", 4)})
    h.session.submit(cmd("login|alice"), h.t)
    assert sent_text(h) == ["7|alice|old.7|4\n"]
    actions = actions_after(h, err(s.RESUME_OTHER_HISTORY_TEXT))
    assert s.Persist("alice", None, 0) in actions
    assert actions[-1] == s.Send(b"2|alice\n")
    h.feed(ok("Logged in as alice."), ok("token|new.9"), schat(1, "bob", "one"), schat(2, "bob", "two"))
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["one", "two"]
    assert h.session.saved["alice"] == s.SavedResume("new.9", 2)


def test_a_saved_account_that_no_longer_exists_is_forgotten():
    h = restarted({"alice": s.SavedResume("t", 2)})
    h.session.submit(cmd("login|alice"), h.t)
    h.sends()
    actions = actions_after(h, err(s.RESUME_UNKNOWN_TEXT))
    assert s.Persist("alice", None, 0, (), forget=True) in actions
    assert "alice" not in h.session.saved
    assert actions[-1] == s.Send(b"2|alice\n")                     # its own error says why


def test_without_a_token_a_login_is_ordinary_but_starts_from_the_saved_sequence():
    h = restarted({"alice": s.SavedResume(None, 3)})
    h.session.submit(cmd("login|alice"), h.t)
    assert sent_text(h) == ["2|alice\n"]
    h.feed(ok("Logged in as alice."), ok("token|n"), schat(3, "bob", "seen"), schat(4, "bob", "new"))
    assert [e.text for e in h.of(s.FrameReceived) if e.kind == "chat"] == ["new"]
    assert h.of(s.RestoreRefused) == []


def test_no_resume_while_logged_in_nor_on_a_seed_style_connection():
    h = durable_logged_in(saved={"bob": s.SavedResume("tb", 1)})
    h.session.submit(cmd("login|bob"), h.t)
    assert sent_text(h) == ["2|bob\n"]                               # the server refuses it
    h = ext_harness(saved={"alice": s.SavedResume("t", 1)})
    h.start()
    h.connect_ok()
    h.feed(err("Invalid operation. Please input your request as [operation]|[params]."))
    h.session.submit(cmd("login|alice"), h.t)
    assert sent_text(h) == ["2|alice\n"]


# ---------------------------------------------------------------------------------- store

def modes(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / "chatnet")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == str(tmp_path / "home" / ".local" / "share" / "chatnet")


def test_store_files_are_private_and_state_round_trips(tmp_path):
    directory = tmp_path / "deep" / "state"
    store = StateStore.open(str(directory), SERVERS)
    assert store.enabled and store.notices == []
    store.persist(s.Persist("alice", "tok", 2, (SequencedChat(1, "bob", "a"), SequencedChat(2, "bob", "b"))))
    store.record("alice", "out", "bob", "reply")
    assert modes(directory) == 0o700
    files = sorted(os.listdir(directory))
    assert files and all(name.startswith(state_file_name(SERVERS)) for name in files)
    assert {name[len(state_file_name(SERVERS)):] for name in files} == {"", "-wal", "-shm"}
    for name in files:
        assert modes(directory / name) == 0o600, name
    store.close()
    # Another order of the same servers is the same cluster: the same file.
    again = StateStore.open(str(directory), tuple(reversed(SERVERS)))
    assert again.load_accounts() == {"alice": s.SavedResume("tok", 2)}
    rows = again.recent("alice", 10)
    assert [(r.kind, r.peer, r.text, r.seq) for r in rows] == [
        ("in", "bob", "a", 1), ("in", "bob", "b", 2), ("out", "bob", "reply", None)]
    assert [r.text for r in again.conversation("alice", "bob")] == ["a", "b", "reply"]
    again.persist(s.Persist("alice", None, 0, forget=True))
    assert again.load_accounts() == {}
    again.close()


def test_an_existing_loose_directory_is_narrowed(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    StateStore.open(str(directory), SERVERS).close()
    assert modes(directory) == 0o700


def test_no_history_keeps_only_the_resume_state(tmp_path):
    store = StateStore.open(str(tmp_path), SERVERS, history=False)
    store.persist(s.Persist("alice", "tok", 1, (SequencedChat(1, "bob", "secret"),)))
    store.record("alice", "out", "bob", "also secret")
    store.close()
    db = sqlite3.connect(tmp_path / state_file_name(SERVERS))
    assert db.execute("SELECT count(*) FROM history").fetchone()[0] == 0
    assert db.execute("SELECT token, last_seq FROM accounts").fetchall() == [("tok", 1)]
    db.close()
    assert not HistoryKeeper(StateStore.open(str(tmp_path), SERVERS, history=False)).enabled


@pytest.mark.parametrize("kind", ["garbage", "foreign", "other servers", "truncated"])
def test_a_bad_state_file_is_set_aside_with_a_clear_message(tmp_path, kind):
    path = tmp_path / state_file_name(SERVERS)
    if kind == "garbage":
        path.write_bytes(b"this is not a database\n" * 100)
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE photos (id INTEGER)")
        db.commit()
        db.close()
    elif kind == "other servers":
        StateStore.open(str(tmp_path), (s.Server("10.0.0.1", 1),)).close()
        os.replace(tmp_path / state_file_name((s.Server("10.0.0.1", 1),)), path)
    else:
        good = StateStore.open(str(tmp_path), SERVERS)
        good.persist(s.Persist("alice", "t", 1))
        good.close()
        path.write_bytes(path.read_bytes()[:1500])
    original = path.read_bytes()
    store = StateStore.open(str(tmp_path), SERVERS)
    assert store.enabled, store.notices
    [notice] = store.notices
    assert str(path) in notice and "moved it to" in notice and "fresh state" in notice
    assert store.load_accounts() == {}
    store.persist(s.Persist("alice", "t2", 7))
    assert store.load_accounts() == {"alice": s.SavedResume("t2", 7)}
    aside = [name for name in os.listdir(tmp_path) if ".bad-" in name and not name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == original   # kept, untouched
    store.close()


def test_an_unusable_directory_disables_the_store_without_crashing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = StateStore.open(str(blocker / "state"), SERVERS)
    assert not store.enabled
    assert "nothing is kept on disk" in store.notices[0]
    store.persist(s.Persist("alice", "t", 1))                      # a no-op, not an error
    assert store.load_accounts() == {} and store.recent("alice", 5) == []
