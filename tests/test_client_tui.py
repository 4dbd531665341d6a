"""bin/chatclient as a user sees it: pexpect drives it in a pty, pyte renders the screen.

Every client talks to real ``bin/chatserver`` processes started by the ``servers`` fixture on
free ports.  Waits are conditions on the rendered screen with deadlines, never bare sleeps.
"""

import os
import signal
import subprocess
import sys

import pexpect
import pyte
import pytest

from chatnet.testing import CHATCLIENT, ROOT, WaitTimeout, wait_until

KEY_LEFT, KEY_RIGHT, KEY_UP, KEY_DOWN = "\x1bOD", "\x1bOC", "\x1bOA", "\x1bOB"   # xterm, keypad mode
KEY_HOME, KEY_END, KEY_DELETE = "\x1bOH", "\x1bOF", "\x1b[3~"
KEY_PGUP, KEY_PGDN = "\x1b[5~", "\x1b[6~"


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """Every client of these tests keeps its state (chatclient's default: on) under the test's
    own directory, never in the real ~/.local/share."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def client_env():
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8", LANG="C.UTF-8")
    for name in ("LINES", "COLUMNS", "NO_COLOR", "CHATNET_SERVERS", "CHATNET_NEW_PASSWORD"):
        env.pop(name, None)
    # Passwords (extension 2): every account these tests make has this one, so the window does
    # not stop to ask (tests/test_passwords_client.py types them into the hidden prompt).
    env["CHATNET_PASSWORD"] = "test-password"
    return env


class XtermScreen(pyte.Screen):
    """pyte's screen plus xterm's SU/SD (``CSI n S`` / ``CSI n T``: scroll the region without
    moving the cursor), which ncurses uses to scroll the message pane and pyte 0.8 lacks."""

    def _region(self):
        margins = self.margins or pyte.screens.Margins(0, self.lines - 1)
        return margins.top, margins.bottom

    def scroll_up(self, count=None, *args, **kwargs):
        top, bottom = self._region()
        for _ in range(count or 1):
            for y in range(top, bottom):
                self.buffer[y] = self.buffer[y + 1]
            self.buffer.pop(bottom, None)
        self.dirty.update(range(self.lines))

    def scroll_down(self, count=None, *args, **kwargs):
        top, bottom = self._region()
        for _ in range(count or 1):
            for y in range(bottom, top, -1):
                self.buffer[y] = self.buffer[y - 1]
            self.buffer.pop(top, None)
        self.dirty.update(range(self.lines))


class XtermStream(pyte.ByteStream):
    csi = {**pyte.ByteStream.csi, "S": "scroll_up", "T": "scroll_down"}


class Term:
    """One chatclient in a pty, with the screen as pyte renders it."""

    def __init__(self, *servers, rows=24, cols=80, args=()):
        self.rows, self.cols = rows, cols
        self.screen = XtermScreen(cols, rows)
        self.stream = XtermStream(self.screen)
        addresses = ",".join("%s:%d" % (srv if isinstance(srv, tuple) else (srv.host, srv.port))
                             for srv in servers)
        self.child = pexpect.spawn(sys.executable, [CHATCLIENT, "--servers", addresses, *args],
                                   dimensions=(rows, cols), env=client_env(), cwd=ROOT)
        self.eof = False

    # reading ---------------------------------------------------------------------------
    def pump(self, timeout=0.05):
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    def wait(self, predicate, what, timeout=10.0):
        def check():
            self.pump()
            return predicate()
        try:
            return wait_until(check, timeout=timeout, interval=0, what=what)
        except WaitTimeout as exc:
            raise AssertionError(f"{exc}\n--- screen ---\n{self.text()}") from None

    def wait_text(self, fragment, timeout=10.0):
        return self.wait(lambda: fragment in self.text(), f"{fragment!r} on screen", timeout)

    def text(self):
        return "\n".join(line.rstrip() for line in self.screen.display)

    def pane(self):
        return self.screen.display[:self.rows - 2]

    def status(self):
        return self.screen.display[self.rows - 2]

    def input(self):
        return self.screen.display[self.rows - 1].rstrip()

    def row_with(self, fragment):
        for y, line in enumerate(self.screen.display):
            if fragment in line:
                return y, line.index(fragment)
        raise AssertionError(f"{fragment!r} not on screen:\n{self.text()}")

    def fg(self, fragment):
        y, x = self.row_with(fragment)
        return self.screen.buffer[y][x].fg

    # writing ---------------------------------------------------------------------------
    def type(self, text):
        self.child.send(text)

    def enter(self, line, expect=None):
        self.type(line)
        self.wait(lambda: self.input().endswith(line[-20:]), f"{line!r} echoed in the input line")
        self.type("\r")
        if expect:
            self.wait_text(expect)

    def resize(self, rows, cols):
        self.rows, self.cols = rows, cols
        self.screen.resize(rows, cols)
        self.child.setwinsize(rows, cols)

    def wait_exit(self, timeout=10.0):
        self.wait(lambda: self.eof, "the client to exit", timeout)
        self.child.close()
        return self.child.exitstatus

    def close(self):
        if self.child.isalive():
            self.child.close(force=True)


@pytest.fixture
def term():
    started = []

    def spawn(*servers, **kwargs):
        t = Term(*servers, **kwargs)
        started.append(t)
        t.wait(lambda: "connected" in t.status(), "the status bar to say connected")
        return t

    yield spawn
    for t in started:
        t.close()


def test_two_clients_create_accounts_and_chat_both_ways(server, term):
    alice, bob = term(server), term(server)
    alice.wait(lambda: f"{server.host}:{server.port} (primary)" in alice.status(), "server and role")
    alice.enter("create|alice", "Account created! Logged in as alice.")
    bob.enter("create|bob", "Account created! Logged in as bob.")
    alice.wait(lambda: "| alice |" in alice.status(), "user in status bar")
    alice.enter("send|bob|hi bob, ça va? 日本語", "Message sent to bob.")
    bob.wait_text("<alice> hi bob, ça va? 日本語")
    bob.enter("/msg alice fine, and you?", "Message sent to alice.")
    alice.wait_text("<bob> fine, and you?")
    assert "-> bob: hi bob, ça va? 日本語" in alice.text()
    bob.enter("list", "2 accounts: alice, bob")
    # Time stamps, and colours that tell the kinds of lines apart.
    y, _ = alice.row_with("<bob> fine")
    assert alice.screen.display[y][:6].strip().count(":") == 1
    assert alice.fg("<bob>") == "cyan"
    assert alice.fg("-> bob:") == "green"
    assert bob.fg("<alice>") != bob.fg("-> alice:")
    # exit and Ctrl-C both leave cleanly.
    alice.enter("exit")
    assert alice.wait_exit() == 0
    bob.type("\x03")
    assert bob.wait_exit() == 0


def test_chat_arriving_mid_typing_leaves_the_input_line_alone(server, term):
    alice, bob = term(server), term(server)
    alice.enter("create|alice", "Logged in as alice.")
    bob.enter("create|bob", "Logged in as bob.")
    half = "send|alice|I was just about to"
    bob.type(half)
    bob.wait(lambda: bob.input() == "> " + half, "the half-typed line")
    bob.type(KEY_LEFT * 3)
    bob.wait(lambda: bob.screen.cursor.x == 2 + len(half) - 3, "the cursor moved left")
    alice.enter("send|bob|interrupting!", "Message sent to bob.")
    bob.wait_text("<alice> interrupting!")
    assert bob.input() == "> " + half
    assert (bob.screen.cursor.y, bob.screen.cursor.x) == (23, 2 + len(half) - 3)
    assert "<alice> interrupting!" in "\n".join(bob.pane())
    bob.type(KEY_END + " say")
    bob.type(KEY_HOME + KEY_DELETE * 4 + "/msg" + KEY_RIGHT + "\x1bOC")
    bob.wait(lambda: bob.input() == "> /msg|alice|I was just about to say", "edited line")
    bob.type("\x01" + KEY_DELETE * 11 + "/msg alice ")        # Ctrl-A is Home too
    bob.wait(lambda: bob.input() == "> /msg alice I was just about to say", "shortcut line")
    bob.type("\r")
    alice.wait_text("<bob> I was just about to say")
    # Up brings the line back from history; Down returns to the (empty) draft.
    bob.type(KEY_UP)
    bob.wait(lambda: bob.input() == "> /msg alice I was just about to say", "history")
    bob.type(KEY_DOWN)
    bob.wait(lambda: bob.input() == ">", "draft restored")


def test_bad_commands_are_refused_with_errors(server, term):
    alice = term(server)
    alice.enter("bogus|x", 'Unknown command "bogus"')
    alice.enter("send|bob", "Send needs a recipient and a message")
    alice.enter("create|", "Username cannot be blank")
    alice.enter("send|bob|hi", "Must be logged in to perform this operation.")
    alice.enter("create|alice", "Logged in as alice.")
    alice.enter("send|nobody|hi", "Recipient username cannot be found.")
    assert alice.fg("!! Recipient") == "red"
    assert alice.fg("!! Unknown command") == "red"
    # Over the limit: the counter says so, Enter refuses and keeps the text to shorten.
    alice.type("send|alice|" + "x" * (281 - len("3|alice|")))
    alice.wait(lambda: "281/280 too long" in alice.status(), "the counter over the limit")
    alice.type("\r")
    alice.wait_text("Request too long: 281 characters")
    assert alice.input().endswith("xxx")
    alice.type("\x7f")
    alice.wait(lambda: "280/280" in alice.status() and "too long" not in alice.status(), "counter at 280")
    alice.type("\x15")                                          # Ctrl-U clears the line
    alice.wait(lambda: alice.input() == ">", "cleared input")
    alice.type("\x04")                                          # Ctrl-D leaves
    assert alice.wait_exit() == 0


def test_resize_redraws_the_whole_window(server, term):
    alice = term(server)
    alice.enter("create|alice", "Logged in as alice.")
    alice.enter("help", "create|NAME")
    alice.type("".join(f"list|no-such-{i}\r" for i in range(25)))
    alice.wait_text("no accounts matching no-such-24")
    alice.type("half typed")
    alice.resize(30, 100)
    alice.wait(lambda: "connected" in alice.screen.display[28] and alice.input() == "> half typed",
               "status bar and input line at the new bottom")
    assert "no accounts matching no-such-24" in alice.screen.display[27]
    assert alice.screen.display[28].rstrip().endswith("10/280")
    assert len(alice.screen.display[28].rstrip()) > 80                 # the bar spans 100 columns
    assert (alice.screen.cursor.y, alice.screen.cursor.x) == (29, len("> half typed"))
    # Scrollback: PgUp shows older lines and says so; PgDn returns to the newest.
    alice.type(KEY_PGUP)
    alice.wait(lambda: "scrolled up" in alice.screen.display[28], "scrolled state")
    alice.type(KEY_PGDN)
    alice.wait(lambda: "scrolled up" not in alice.screen.display[28]
               and "no-such-24" in alice.text(), "back at the bottom")
    alice.resize(24, 80)
    alice.wait(lambda: "connected" in alice.screen.display[22] and alice.input() == "> half typed",
               "back to 80x24")
    alice.child.kill(signal.SIGTERM)                          # leaves as cleanly as Ctrl-C
    assert alice.wait_exit() == 0


def test_plain_mode_through_a_pipe(server):
    other = subprocess.run(
        [sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}"],
        input="create|bob\n", capture_output=True, text=True, timeout=30, env=client_env())
    assert "ok: Account created! Logged in as bob." in other.stdout
    result = subprocess.run(
        [sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}"],
        input="create|alice\nlist\nbogus\nsend|bob|hello bob\nsend|nobody|hi\n",
        capture_output=True, text=True, timeout=30, env=client_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ok: Account created! Logged in as alice." in lines
    assert "ok: 2 accounts: bob, alice" in lines
    assert any(line.startswith('refused: Unknown command "bogus"') for line in lines)
    assert "ok: Message sent to bob." in lines
    assert "error: Recipient username cannot be found." in lines
    assert lines.index("ok: 2 accounts: bob, alice") < lines.index("ok: Message sent to bob.")
    assert "\x1b" not in result.stdout
    bob = subprocess.run(
        [sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}", "--quiet"],
        input="login|bob\n", capture_output=True, text=True, timeout=30, env=client_env())
    assert bob.stdout.splitlines() == [
        "ok: Logged in as bob.", "<alice> hello bob", "note: You have 1 missed messages above."]


def test_plain_mode_gives_up_at_eof_when_no_server_answers(tmp_path):
    from chatnet.testing import free_port
    port = free_port()
    result = subprocess.run(
        [sys.executable, CHATCLIENT, "--servers", f"127.0.0.1:{port}", "--eof-timeout", "0.5",
         "--max-backoff", "0.2"],
        input="create|alice\n", capture_output=True, text=True, timeout=30, env=client_env())
    assert result.returncode == 1
    assert "all servers down" in result.stdout
    assert 'error: not sent: "create|alice"' in result.stdout


def test_server_killed_and_restarted_clients_reconnect_and_chat_goes_on(servers, term):
    server = servers("main")
    alice = term(server, args=("--max-backoff", "1"))
    bob = term(server, args=("--max-backoff", "1"))
    alice.enter("create|alice", "Logged in as alice.")
    bob.enter("create|bob", "Logged in as bob.")
    alice.enter("send|bob|before the crash", "Message sent to bob.")
    bob.wait_text("<alice> before the crash")

    server.kill()                                                   # SIGKILL
    for t in (alice, bob):
        t.wait(lambda t=t: "reconnecting in" in t.status(), "the reconnect countdown")
        t.wait_text("connection to")
    alice.enter("send|bob|typed while the server was down", "will be sent")
    alice.wait(lambda: "1 queued" in alice.status(), "1 queued in the status bar")

    servers("main", port=server.port)                               # same port, same store
    for t, user in ((alice, "alice"), (bob, "bob")):
        # The restarted server kept the resume tokens (extension 1): the sessions resume.
        t.wait(lambda t=t, user=user: f"(primary) | {user} | connected, resumed" in t.status(),
               "connected again, session resumed", timeout=15)
        t.wait_text(f"resumed as {user} on 127.0.0.1:{server.port}")
    bob.wait_text("<alice> typed while the server was down")
    bob.enter("send|alice|after the restart", "Message sent to alice.")
    alice.wait_text("<bob> after the restart")
    assert "queued" not in alice.status()


def test_primary_killed_clients_follow_the_new_primary(tmp_path, term):
    from chatnet.testing import Cluster

    cluster = Cluster(str(tmp_path / "cluster"))
    try:
        cluster.start()
        first = cluster.wait_primary()
        cluster.wait_in_sync(range(3))

        # Each client lists a backup first: it must follow the backup's note to the primary.
        addresses = [cluster.addresses[i] for i in ((first + 1) % 3, (first + 2) % 3, first)]
        primary = "%s:%d" % cluster.addresses[first]
        alice = term(*addresses, args=("--max-backoff", "1"))
        bob = term(*addresses, args=("--max-backoff", "1"))
        for t, user in ((alice, "alice"), (bob, "bob")):
            t.wait(lambda t=t: f"{primary} (primary)" in t.status(), "the primary found")
            t.enter(f"create|{user}", f"Logged in as {user}.")
        alice.enter("send|bob|before the failover", "Message sent to bob.")
        bob.wait_text("<alice> before the failover")

        cluster.kill(first)                                         # SIGKILL the primary
        for t in (alice, bob):
            t.wait(lambda t=t: "reconnecting in" in t.status(), "the reconnect countdown")
        bob.enter("send|alice|sent during the failover", "will be sent")
        second = cluster.wait_primary(exclude=(first,))
        new = "%s:%d" % cluster.addresses[second]
        for t, user in ((alice, "alice"), (bob, "bob")):
            t.wait(lambda t=t, user=user: f"{new} (primary) | {user} | connected" in t.status(),
                   "connected to the new primary", timeout=20)
        for t, user in ((alice, "alice"), (bob, "bob")):
            t.wait_text(f"resumed as {user} on {new}")              # extension 1: op 7
            assert "logged in again" not in t.text()
        alice.wait_text("<bob> sent during the failover")
        alice.enter("send|bob|after the failover", "Message sent to bob.")
        bob.wait_text("<alice> after the failover")

        cluster.kill(second)                                        # and the next primary
        alice.enter("send|bob|during the second failover")
        third = cluster.wait_primary(exclude=(first, second))
        last = "%s:%d" % cluster.addresses[third]
        for t, user in ((alice, "alice"), (bob, "bob")):
            t.wait(lambda t=t, user=user: f"{last} (primary) | {user} | connected, resumed" in t.status(),
                   "resumed on the last replica", timeout=20)
            t.wait_text(f"resumed as {user} on {last}")
        bob.wait_text("<alice> during the second failover")
        bob.enter("send|alice|on the last replica", "Message sent to alice.")
        alice.wait_text("<bob> on the last replica")
        for t, fragment in ((alice, "<bob> sent during the failover"), (bob, "<alice> after the failover"),
                            (bob, "<alice> during the second failover")):
            assert t.text().count(fragment) == 1, t.text()           # never shown twice
    finally:
        cluster.stop_all()
