"""The client side of extension 2 without sockets: the session negotiates ``0|ext|2``, writes
the password verbs, keeps the password in memory only (never in a Persist, an event or a
display line) and uses it to log in again when a resume is refused; parsing and asking."""

from test_client_session import Harness, cmd, err, ok

from chatnet.client import commands as c
from chatnet.client import passwords as p
from chatnet.client import session as s
from chatnet.client.present import Presenter

PW = "Tulip-7781-secret"


def logged_in(saved=None):
    h = Harness(extension=True, passwords=True, rid_prefix="PFX", saved=saved)
    h.start()
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]
    h.feed(ok("ext|1"))
    assert h.sends() == [b"0|ext|2\n"]
    h.feed(ok("ext|2"))
    assert h.session.password_ext
    h.session.submit(c.with_secret(cmd("create|alice"), PW), h.t)
    assert h.sends() == [f"0|create|alice|{PW}\n".encode()]
    h.feed(ok("Account created! Logged in as alice."), ok("token|tok1"))
    return h


def test_password_verbs_on_the_wire_and_nowhere_else():
    h = logged_in(saved={})
    h.session.submit(c.with_secret(c.parse_command("passwd"), PW, PW + "2"), h.t)
    assert h.sends() == [f"0|passwd|{PW}|{PW}2\n".encode()]
    h.feed(ok("Password changed."))
    assert h.session.resume.password == PW + "2"
    h.session.submit(c.with_secret(cmd("delete"), PW + "2"), h.t)
    assert h.sends() == [f"0|delete|{PW}2\n".encode()]
    shown = repr(h.events) + repr(h.session.resume) + repr(h.session.in_flight)
    shown += "".join(line.text for e in h.events for line in Presenter().lines(e))
    assert PW not in shown


def test_a_refused_resume_logs_in_again_with_the_password_kept_in_memory():
    h = logged_in()
    h.session.connection_lost(h.t, "reset")
    h.take()
    h.advance(10)
    assert h.connect_ok() == [b"\n", b"0|ext|1\n"]
    h.feed(ok("ext|1"))
    assert h.sends() == [b"0|ext|2\n"]
    h.feed(ok("ext|2"))
    assert h.sends() == [b"7|alice|tok1|0\n"]
    h.feed(err(s.RESUME_BAD_TOKEN_TEXT))
    assert h.sends() == [f"0|login|alice|{PW}\n".encode()]


def test_without_extension_2_the_seed_requests_go():
    h = Harness(extension=True, passwords=True, rid_prefix="PFX")
    h.start()
    h.connect_ok()
    h.feed(ok("ext|1"))
    assert h.sends() == [b"0|ext|2\n"]
    h.feed(err("Invalid operation. Please input your request as [operation]|[params]."))
    assert not h.session.password_ext
    h.session.submit(c.with_secret(cmd("login|bob"), PW), h.t)
    assert h.sends() == [b"2|bob\n"]


def test_questions_and_answers():
    create = cmd("create|alice")
    asked = p.questions(create, None)
    assert [q.required for q in asked] == [True, True]
    assert isinstance(p.finish(create, asked, ["a", "b"]), c.Refusal)  # they differ
    assert isinstance(p.finish(create, asked, ["", ""]), c.Refusal)  # required
    assert isinstance(p.finish(create, asked, ["a|b", "a|b"]), c.Refusal)  # the server's rule
    done = p.finish(create, asked, [" pw ", "pw"])
    assert done.secret == ("pw",) and "pw" not in str(done) + repr(done) + done.wire
    login = cmd("login|bob")
    assert p.finish(login, p.questions(login, None), [""]).secret == ()  # seed-style login
    assert p.from_environment(login, {}) is None
    assert p.from_environment(login, {"CHATNET_PASSWORD": "x"}) == ["x"]
    assert p.from_environment(c.parse_command("passwd"), {"CHATNET_PASSWORD": "x"}) is None
    assert c.parse_command("/passwd").op == c.OP_PASSWD
