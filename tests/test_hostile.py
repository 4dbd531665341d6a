"""Issue 10's reproductions against a live replica, and the quota flags end to end.

Each reproduction is the exact byte string that used to take a replica down; the test sends it
the same way (one write) and then checks the replica still answers, on that connection and on a
new one.  The quota tests start ``bin/chatserver`` with the flags, so the flag -> Limits ->
service path is covered, not only the service in memory.
"""

from __future__ import annotations

from chatnet.protocol import texts
from chatnet.server import cli
from chatnet.testing import RawClient, ServerProcess


class Conn(RawClient):
    """A raw client that reads frames as (status, indicator, message) tuples."""

    def __init__(self, port: int, preface: bytes = b"\n") -> None:
        super().__init__("127.0.0.1", port, line_mode=False, timeout=5.0)
        if preface:
            self.send_bytes(preface)

    def send(self, data: bytes) -> None:
        self.send_bytes(data)

    def frames(self, n: int) -> list[tuple[int, int, str]]:
        return [(f.status, f.indicator, f.message) for f in super().frames(n)]


def _still_serving(r: ServerProcess, name: str) -> None:
    assert r.alive(), r.log()
    c = Conn(r.port)
    c.send(f"4|{name}\n".encode())
    assert c.frames(1) == [(0, 0, f"\n- {name}\n")]
    c.close()


def test_superscript_ack_pipelined_does_not_kill_the_replica(replica):
    r = replica()
    c = Conn(r.port, preface=b"")
    c.send("0|ext|1\n1|mallory\n0|ack|²\n".encode())  # one write, as in the report
    frames = c.frames(4)
    assert frames[:2] == [(0, 0, "ext|1"), (0, 0, "Account created! Logged in as mallory.")]
    assert frames[2][2].startswith("token|")
    assert frames[3] == (1, 0, texts.INVALID_REQUEST_TEXT)
    c.send(b"4|mallory\n")  # the same connection still works
    assert c.frames(1) == [(0, 0, "\n- mallory\n")]
    _still_serving(r, "mallory")
    assert "Traceback" not in r.log()


def test_non_ascii_token_resume_is_refused_not_a_crash(replica):
    r = replica()
    alice = Conn(r.port)
    alice.send(b"0|ext|1\n1|alice\n")
    alice.frames(3)
    c = Conn(r.port, preface=b"")
    c.send("7|alice|é|0".encode())  # a seed-mode chunk, exactly as reported
    assert c.frames(1) == [(1, 0, texts.T_RESUME_TOKEN_NOT_ASCII)]
    _still_serving(r, "alice")
    assert "Traceback" not in r.log()


def test_quota_flags_reach_the_service(replica):
    r = replica("--max-accounts", "3", "--max-queued-chats", "2", "--max-list-names", "2")
    a = Conn(r.port)
    a.send(b"1|alice\n")
    b = Conn(r.port)
    b.send(b"1|bob\n6\n")
    c = Conn(r.port)
    c.send(b"1|carl\n")
    assert [f[2] for f in a.frames(1) + b.frames(1) + c.frames(1)] == [
        "Account created! Logged in as alice.", "Account created! Logged in as bob.",
        "Account created! Logged in as carl."]
    d = Conn(r.port)
    d.send(b"1|dora\n")
    assert d.frames(1) == [(1, 0, texts.T_CREATE_FULL)]
    a.send(b"3|bob|1\n3|bob|2\n3|bob|3\n")  # bob is away: his mailbox holds two
    assert a.frames(3) == [(0, 0, "Message sent to bob."), (0, 0, "Message sent to bob."),
                           (1, 0, texts.T_MAILBOX_FULL.format(recipient="bob"))]
    a.send(b"4\n")
    more = texts.T_LIST_MORE.format(pattern="*", after=2)
    assert a.frames(1) == [(0, 0, f"\n- alice\n- bob\n{more}\n")]
    a.send(b"4|*|2\n")
    assert a.frames(1) == [(0, 0, "\n- carl\n")]


def test_bad_limit_flags_are_refused(capsys):
    assert cli.main(["--peers", "127.0.0.1:1", "--max-list-names", "0"]) == 2
    assert "--max-list-names must be at least 1" in capsys.readouterr().err
    assert cli.main(["--peers", "127.0.0.1:1", "--max-list-names", "401"]) == 2
    assert "--max-list-names must be at most 400" in capsys.readouterr().err


def test_local_launcher_forwards_the_limit_flags(monkeypatch):
    from chatnet.server import launcher

    seen = {}
    monkeypatch.setattr(launcher, "run_local", lambda peers, base, secret, extra, **_: seen.setdefault("extra", extra) and 0)
    cli.main(["--local", "--max-accounts", "7", "--max-queued-chats", "8", "--max-list-names", "9"])
    extra = seen["extra"]
    for flag, value in (("--max-accounts", "7"), ("--max-queued-chats", "8"), ("--max-list-names", "9")):
        assert extra[extra.index(flag) + 1] == value
