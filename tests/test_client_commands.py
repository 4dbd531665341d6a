"""Input parsing, the line editor and the presenter: pure functions, no terminal, no sockets."""

import pytest

from chatnet.client import commands as c
from chatnet.client import session as s
from chatnet.client.editor import LineEditor, sanitize, text_width, wrap
from chatnet.client.present import DisplayLine, Presenter, format_list_answer, own_line
from chatnet.protocol.codec import Frame, parse_request


@pytest.mark.parametrize("line, op, params", [
    ("create|alice", 1, ("alice",)),
    ("  login | alice  ", 2, ("alice",)),
    ("send|bob|hello there", 3, ("bob", "hello there")),
    ("send|bob| a|b |c ", 3, ("bob", "a|b |c")),        # the message keeps its pipes
    ("list", 4, ()),
    ("list|", 4, ()),
    ("list|a*", 4, ("a*",)),
    ("delete", 5, ()),
    ("exit", 6, ()),
    ("SEND|bob|Hi", 3, ("bob", "Hi")),
    ("/msg bob hello there", 3, ("bob", "hello there")),
    ("/m bob  x|y", 3, ("bob", "x|y")),
    ("/create alice", 1, ("alice",)),
    ("/login alice", 2, ("alice",)),
    ("/list a*", 4, ("a*",)),
    ("/list", 4, ()),
    ("/delete", 5, ()),
    ("/quit", 6, ()),
    ("/exit", 6, ()),
])
def test_commands_become_requests(line, op, params):
    command = c.parse_command(line)
    assert isinstance(command, c.Command)
    assert (command.op, command.params) == (op, params)
    # What we send is what the server's own parser reads back.
    request = parse_request(command.encode().decode().rstrip("\n"))
    assert request.op == op
    assert request.args == (params or (("*",) if op == 4 else ()))


@pytest.mark.parametrize("line, fragment", [
    ("create|", "Username cannot be blank"),
    ("create", "Username cannot be blank"),
    ("login|   ", "Username cannot be blank"),
    ("send", "needs a recipient"),
    ("send|bob", "needs a recipient"),
    ("send||hello", "needs a recipient"),
    ("send|bob|   ", "blank message"),
    ("/msg", "needs a recipient"),
    ("/msg bob", "blank message"),
    ("hello", 'Unknown command "hello"'),
    ("3|bob|hi", 'Unknown command "3"'),     # the wire syntax is not the input syntax
    ("/frobnicate", 'Unknown command "/frobnicate"'),
])
def test_bad_lines_are_refused_before_sending(line, fragment):
    result = c.parse_command(line)
    assert isinstance(result, c.Refusal)
    assert fragment in result.message


def test_the_280_character_limit_applies_to_the_request_on_the_wire():
    fits = "send|bob|" + "x" * (280 - len("3|bob|"))
    assert isinstance(c.parse_command(fits), c.Command)
    assert c.request_length(fits) == 280
    over = fits + "x"
    result = c.parse_command(over)
    assert isinstance(result, c.Refusal) and "281 characters" in result.message
    assert c.request_length(over) == 281
    assert c.request_length("/msg bob " + "é" * 300) == 306


def test_blank_lines_and_help():
    assert c.parse_command("   ") is None
    assert isinstance(c.parse_command("help"), c.Help)
    assert isinstance(c.parse_command("/help"), c.Help)
    assert "send|NAME|MESSAGE" in c.HELP_TEXT


def test_request_length_of_partial_input():
    assert c.request_length("") == 0
    assert c.request_length("sen") == 3
    assert c.request_length("send|bob|hi") == len("3|bob|hi")


# ------------------------------------------------------------------------------ line editor

def typed(text, **kwargs):
    editor = LineEditor(**kwargs)
    editor.insert(text)
    return editor


def test_editor_moves_inserts_and_deletes():
    e = typed("helo wrld")
    e.home()
    e.right()
    e.right()
    e.right()
    e.insert("l")
    assert (e.text, e.cursor) == ("hello wrld", 4)
    e.end()
    e.left()
    e.left()
    e.left()
    e.insert("o")
    assert e.text == "hello world"
    e.backspace()
    e.delete()
    assert (e.text, e.cursor) == ("hello wld", 7)
    e.delete_word_back()
    assert (e.text, e.cursor) == ("hello ld", 6)
    e.kill_to_end()
    assert e.text == "hello "
    e.left()
    e.kill_to_start()
    assert (e.text, e.cursor) == (" ", 0)
    e.backspace()                       # nothing before the cursor: nothing happens
    e.end()
    e.delete()
    assert e.text == " "


def test_editor_history_keeps_the_draft():
    e = LineEditor()
    for line in ("first", "second", "second", "   "):
        e.insert(line)
        assert e.submit() == line
    assert e.history == ["first", "second"]
    e.insert("draft")
    e.history_prev()
    assert e.text == "second"
    e.history_prev()
    e.history_prev()
    assert e.text == "first"
    e.history_next()
    assert e.text == "second"
    e.history_next()
    assert (e.text, e.cursor) == ("draft", 5)
    e.history_next()
    assert e.text == "draft"


def test_editor_refuses_beyond_its_maximum():
    e = typed("abc", max_chars=5)
    assert e.insert("de")
    assert not e.insert("f")
    assert e.text == "abcde"


def test_editor_view_scrolls_to_keep_the_cursor_visible():
    e = typed("0123456789abcdef")
    visible, col = e.view(10)
    assert col <= 9 and visible.endswith("f") and len(visible) <= 10
    assert visible[:col] + "" == visible[:col]
    e.home()
    visible, col = e.view(10)
    assert (visible, col) == ("0123456789", 0)


def test_editor_view_counts_wide_characters_as_two_cells():
    e = typed("日本語")
    visible, col = e.view(20)
    assert (visible, col) == ("日本語", 6)
    e.left()
    assert e.view(20)[1] == 4


def test_text_helpers():
    assert text_width("a日é") == 4
    assert sanitize("a\x1b[2Jb\x07\x7f") == "a^[[2Jb^G^?"
    assert sanitize("line\nnext") == "line^Jnext"
    assert sanitize("ok \u0301é") == "ok \u0301é"
    assert sanitize("\x9b") == "\ufffd"
    rows = wrap("the quick brown fox jumps over the lazy dog", 10)
    assert all(text_width(r) <= 10 for r in rows)
    assert "".join(rows).replace(" ", "") == "thequickbrownfoxjumpsoverthelazydog"
    assert wrap("日本語", 3) == ["日", "本", "語"]
    assert wrap("", 5) == [""]


# -------------------------------------------------------------------------------- presenter

def pending(line, auto=False):
    return s.Pending(c.parse_command(line), 1, auto=auto)


def frame_event(kind, message, answer_to=None):
    status = {"ok": 0, "chat": 0, "error": 1, "note": 2}[kind]
    return s.FrameReceived(Frame(status, 1 if kind == "chat" else 0, message), kind, answer_to)


def test_presenter_lines_for_answers_and_chat():
    p = Presenter()
    assert p.lines(s.FrameReceived(Frame(0, 1, "bob|hi|there"), "chat", None, "bob", "hi|there")) == \
        [DisplayLine("chat", "hi|there", "bob")]
    assert p.lines(frame_event("ok", "\n- alice\n- bob\n", pending("list|*"))) == \
        [DisplayLine("ok", "2 accounts: alice, bob")]
    assert p.lines(frame_event("error", "Recipient username cannot be found.", pending("send|x|y"))) == \
        [DisplayLine("error", "Recipient username cannot be found.")]
    assert p.lines(frame_event("note", "No new messages since you've been gone.")) == \
        [DisplayLine("note", "No new messages since you've been gone.")]


def test_presenter_hides_the_automatic_login_answer_but_not_its_note():
    p = Presenter()
    login = pending("login|alice", auto=True)
    assert p.lines(frame_event("ok", "Logged in as alice.", login)) == []
    assert p.lines(s.Reidentified("alice", s.DEFAULT_SERVERS[0])) == \
        [DisplayLine("info", "logged in again as alice on 127.0.0.1:1538")]
    assert p.lines(frame_event("note", "You have 2 missed messages above.", login))[0].kind == "note"


def test_presenter_says_an_outage_once():
    p = Presenter()
    server = s.DEFAULT_SERVERS[0]
    assert p.lines(s.Connecting(server))            # the very first attempt is shown
    assert p.lines(s.Connected(server)) == []       # said once it answers as the primary
    assert p.lines(s.PrimaryConfirmed(server)) == [DisplayLine("info", "connected to 127.0.0.1:1538")]
    assert p.lines(s.ConnectionLost(server, "reset"))[0].kind == "error"
    assert p.lines(s.Connecting(server)) == []
    assert p.lines(s.ConnectFailed(server, "Connection refused")) == []
    down = p.lines(s.AllServersDown(3, 0, 5.0))
    assert down == [DisplayLine("error", "all servers down (last error: Connection refused); retrying")]
    assert p.lines(s.AllServersDown(6, 0, 9.0)) == []
    queued = p.lines(s.CommandQueued(pending("send|bob|hi")))
    assert queued and "will be sent once connected" in queued[0].text
    backup = s.DEFAULT_SERVERS[1]
    assert p.lines(s.Redirected(backup, server))
    assert p.lines(s.Redirected(backup, server)) == []
    assert p.lines(s.PrimaryConfirmed(server)) == [DisplayLine("info", "connected to 127.0.0.1:1538")]


def test_format_list_answer_and_own_lines():
    assert format_list_answer("\n", "z*") == "no accounts matching z*"
    assert format_list_answer("\n- alice\n", None) == "1 account: alice"
    assert own_line(c.parse_command("send|bob|hi")) == DisplayLine("own", "-> bob: hi")
    assert own_line(c.parse_command("list|a*")) == DisplayLine("own", "> list|a*")


def test_list_pages_are_asked_for_and_shown_in_the_client_syntax():
    command = c.parse_command("list|a*|117")
    assert command.wire == "4|a*|117"
    more = "\n- ann\n- abe\nMore accounts: request 4|a*|117 for the next page.\n"
    assert format_list_answer(more, "a*") == "2 accounts matching a*: ann, abe (more: list|a*|117)"
    assert format_list_answer("\nMore accounts: request 4|*|9 for the next page.\n", None) == \
        "no accounts (more: list|*|9)"
