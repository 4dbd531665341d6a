"""bin/chatclient killed and started again (issue 15): exactly-once across client restarts,
the conversation back on screen, state file modes, bad state files.

A real server (``ServerProcess``) per test; the client runs in plain mode through pipes (or in
a pty for the window); every process is killed by PID in cleanup, and every wait is a condition
with a deadline.
"""

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest
from test_client_tui import KEY_PGUP, Term, client_env

from chatnet.client.servers import Server
from chatnet.client.state import state_file_name
from chatnet.testing import CHATCLIENT, RawClient, wait_until

TOTAL = 200


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


class PlainClient:
    """``chatclient --plain`` with stdin and stdout on pipes; stdout is read by a thread."""

    def __init__(self, server, state_dir, *args):
        self.proc = subprocess.Popen(
            [sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}", "--state-dir",
             str(state_dir), "--max-backoff", "0.5", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=client_env(), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def chats(self):
        return [int(line.rsplit(" ", 1)[1]) for line in list(self.lines) if line.startswith("<bob> chat ")]

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)

    def finish(self, timeout=30):
        """Close stdin (the client exits after the answers) and wait for it."""
        self.proc.stdin.close()
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status


@pytest.fixture
def clients():
    started = []

    def start(*args, **kwargs):
        client = PlainClient(*args, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def stored(state_dir, server):
    """(last_seq saved for alice, seqs of alice's stored chats), read from the file itself."""
    db = sqlite3.connect(os.path.join(state_dir, state_file_name((Server(server.host, server.port),))))
    try:
        row = db.execute("SELECT last_seq FROM accounts WHERE name = 'alice'").fetchone()
        seqs = [seq for (seq,) in db.execute("SELECT seq FROM history WHERE account = 'alice' AND kind = 'in' "
                                             "ORDER BY id")]
    finally:
        db.close()
    return (row[0] if row else 0), seqs


def private(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class Sender:
    """bob, sending ``chat N`` to alice on a raw connection (each answered before the next)."""

    def __init__(self, server):
        self.raw = RawClient(server.host, server.port)
        assert self.raw.request("1|bob").status == 0
        self.sent = 0

    def send(self, n):
        for _ in range(min(n, TOTAL - self.sent)):
            self.sent += 1
            frame = self.raw.request(f"3|alice|chat {self.sent}")
            while frame.indicator == 1:                           # chat for bob: not the answer
                frame = self.raw.frame()
            assert frame.message == "Message sent to alice.", frame


def one_run(rng, server, state, clients, bob, shown_before):
    """Start the client, log in, let it show a random number of chats while bob sends, then
    SIGKILL it at that moment, or right after sending a few more (in flight)."""
    client = clients(server, state)
    client.send("login|alice")
    target = min(TOTAL, shown_before + rng.randint(0, 25))
    window = rng.randint(1, 30)

    def shown():
        return shown_before + len(client.chats())

    while shown() < target:
        if bob.sent < TOTAL and bob.sent - shown() < window:
            bob.send(1)
        else:
            wait_until(lambda: shown() >= min(target, bob.sent), timeout=30, what="the client to show chat")
    bob.send(rng.randint(0, 5))                                   # in flight when it dies
    client.kill()
    return client


def test_sigkill_at_random_moments_every_chat_shown_once_in_order(server, clients, tmp_path):
    kill_loop(random.Random(int(os.environ.get("CHATNET_TEST_SEED", "15"))), server, clients, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_sigkill_loop_over_many_seeds(seed, server, clients, tmp_path):
    kill_loop(random.Random(seed), server, clients, tmp_path)


def kill_loop(rng, server, clients, tmp_path):
    """alice's client is SIGKILLed at least 8 times while bob sends her 200 chats; across the
    runs every chat is shown once, in order, or was stored just before a kill (then it is in
    the history the next login shows)."""
    state = tmp_path / "state"
    first = clients(server, state)
    first.send("create|alice")
    wait_until(lambda: "ok: Account created! Logged in as alice." in first.lines, what="alice created")
    assert first.finish() == 0
    bob = Sender(server)
    runs, shown = [], []
    while bob.sent < TOTAL or len(runs) < 8:
        client = one_run(rng, server, state, clients, bob, len(shown))
        runs.append(client.chats())
        last_seq, seqs = stored(state, server)
        # Everything shown was stored before it was shown (and acknowledged) ...
        assert all(seq <= last_seq for seq in client.chats())
        assert seqs == list(range(1, last_seq + 1))               # ... once, in order
        # ... and what was stored but not yet on screen when the kill came counts as shown: it
        # is in the history the next login shows (not as new chat).
        shown[:] = list(range(1, last_seq + 1))
        bob.send(rng.randint(0, 10))                              # while the client is dead
    last = clients(server, state)
    last.send("login|alice")
    wait_until(lambda: len(shown) + len(last.chats()) >= TOTAL, timeout=30, what="the last chats")
    assert last.finish() == 0
    runs.append(last.chats())
    printed = [seq for run in runs for seq in run]
    assert printed == sorted(set(printed)), "a chat shown twice or out of order"
    for run in runs:                                              # each run shows a contiguous stretch
        assert run == list(range(run[0], run[0] + len(run))) if run else True
    last_seq, seqs = stored(state, server)
    assert last_seq == TOTAL and seqs == list(range(1, TOTAL + 1))
    # Whatever the kills left between the runs is in the stored history, and only there.
    missing = sorted(set(range(1, TOTAL + 1)) - set(printed))
    print(f"{len(runs)} runs, {len(missing)} chats stored but not printed before a kill: {missing}")
    assert len(missing) < TOTAL // 4, missing
    assert private(state) == 0o700
    assert all(private(state / name) == 0o600 for name in os.listdir(state))


def test_after_a_kill_login_resumes_and_history_is_printed_only_when_asked(server, clients, tmp_path):
    state = tmp_path / "state"
    bob = Sender(server)
    alice = clients(server, state)
    alice.send("create|alice")
    wait_until(lambda: any("Logged in as alice" in line for line in alice.lines), what="alice created")
    bob.send(2)
    wait_until(lambda: alice.chats() == [1, 2], what="two chats")
    alice.send("send|bob|got them")
    wait_until(lambda: "ok: Message sent to bob." in alice.lines, what="the reply sent")
    names = os.listdir(state)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"sqlite3", "sqlite3-wal", "sqlite3-shm", "lock"}
    assert all(private(state / n) == 0o600 for n in names) and private(state) == 0o700
    alice.kill()
    bob.send(1)
    again = clients(server, state)
    again.send("login|alice")
    wait_until(lambda: again.chats() == [3], what="the chat sent while the client was dead")
    assert "ok: Resumed as alice." in again.lines
    assert not any(line.startswith("history:") for line in again.lines)
    again.send("history bob")
    assert again.finish() == 0
    history = [line for line in again.lines if line.startswith("history:")]
    assert history[0] == "history: history of alice with bob: 4 lines"
    assert [h.split(" ", 3)[3] for h in history[1:]] == [
        "<bob> chat 1", "<bob> chat 2", "-> bob: got them", "<bob> chat 3"]
    # A clean exit cleared the token (the server does too): the next login is an ordinary one,
    # still shows nothing twice, and --history N prints the last N stored lines first.
    bob.send(1)
    third = clients(server, state, "--history", "2")
    third.send("login|alice")
    assert third.finish() == 0
    assert "ok: Logged in as alice." in third.lines
    lines = third.lines
    first_history = next(i for i, line in enumerate(lines) if line.startswith("history:"))
    assert lines[first_history].endswith("-> bob: got them")
    assert lines[first_history + 1].endswith("<bob> chat 3")
    assert third.chats() == [4]


def test_a_refused_saved_token_falls_back_to_a_fresh_login_and_says_so(server, clients, tmp_path):
    state = tmp_path / "state"
    alice = clients(server, state)
    alice.send("create|alice")
    wait_until(lambda: any("Logged in as alice" in line for line in alice.lines), what="alice created")
    alice.kill()
    def log_in_elsewhere():                                       # supersedes the saved token
        with RawClient(server.host, server.port) as other:        # (once the server saw the kill)
            other.request("0|ext|2")                               # alice has client_env's password
            if other.request(f"0|login|alice|{client_env()['CHATNET_PASSWORD']}").status != 0:
                return False
            other.send("6")
            return True
    wait_until(log_in_elsewhere, what="a login of alice elsewhere")
    again = clients(server, state)
    again.send("login|alice")
    assert again.finish() == 0
    text = "\n".join(again.lines)
    assert "could not be resumed" in text and "logging in afresh" in text
    assert "ok: Logged in as alice." in again.lines


def test_a_second_client_for_the_same_account_does_not_take_over_the_session(server, clients, tmp_path):
    """Two clients resuming with one saved token would take the session from each other on
    every reconnect; the second one logs in normally instead (and is refused, as before)."""
    state = tmp_path / "state"
    alice = clients(server, state)
    alice.send("create|alice")
    wait_until(lambda: any("Logged in as alice" in line for line in alice.lines), what="alice created")
    second = clients(server, state)
    second.send("login|alice")
    assert second.finish() == 0
    assert any("another chatclient on this computer is logged in as alice" in line for line in second.lines)
    assert any(line.startswith("error: ") and "already connected" in line for line in second.lines), \
        second.lines
    alice.send("list")
    wait_until(lambda: any(line.startswith("ok: 1 account") for line in alice.lines), what="alice still served")
    assert not any("connection" in line and "lost" in line for line in alice.lines)


def test_a_corrupt_state_file_gives_a_clear_message_and_a_fresh_start(server, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = state / state_file_name((Server(server.host, server.port),))
    path.write_bytes(b"\x00garbage" * 500)
    result = subprocess.run(
        [sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}", "--state-dir", str(state)],
        input="create|alice\n", capture_output=True, text=True, timeout=30, env=client_env())
    assert result.returncode == 0, result.stderr
    assert "ok: Account created! Logged in as alice." in result.stdout
    assert "Traceback" not in result.stderr
    assert f"chatclient: {path} is not a readable SQLite database" in result.stderr
    assert "moved it to" in result.stderr and "started with fresh state" in result.stderr
    assert any(".bad-" in name for name in os.listdir(state))


def test_the_window_shows_the_conversation_again_after_a_restart(server, tmp_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state))
    bob = Sender(server)
    alice = Term(server, args=args)
    try:
        alice.wait(lambda: "connected" in alice.status(), "connected")
        alice.enter("create|alice", "Logged in as alice.")
        bob.send(30)
        alice.wait_text("<bob> chat 30")
        alice.enter("send|bob|thirty, thanks", "Message sent to bob.")
        os.kill(alice.child.pid, signal.SIGKILL)
        alice.wait(lambda: alice.eof, "the client to die")
    finally:
        alice.close()
    bob.send(1)                                                   # while it was dead
    alice = Term(server, args=args)
    try:
        alice.wait(lambda: "connected" in alice.status(), "connected")
        alice.enter("login|alice", "<bob> chat 31")
        text = alice.text()
        assert "history of alice, as stored on this computer" in text and "end of history" in text
        for fragment in ("<bob> chat 30", "-> bob: thirty, thanks", "<bob> chat 31"):
            assert text.count(fragment) == 1, text
        assert alice.row_with("-> bob: thirty")[0] < alice.row_with("end of history")[0] \
            < alice.row_with("<bob> chat 31")[0]
        assert "<bob> chat 1\n" not in text + "\n"                # older than a screenful
        for _ in range(3):                                        # PgUp reaches into stored history
            alice.type(KEY_PGUP)
        alice.wait(lambda: any(line.rstrip().endswith("<bob> chat 1") for line in alice.pane()),
                   "the oldest stored chat")
        alice.enter("/history nobody", "no stored conversation of alice with nobody")
        alice.enter("/history bob", "<bob> chat 31")             # the conversation, newest last
        alice.type(KEY_PGUP)
        alice.wait_text("history of alice with bob: 32 lines")
    finally:
        alice.close()
