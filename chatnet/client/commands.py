"""Parse what the user types into requests, local actions or local refusals (pure functions).

The syntax is the seed's: ``create|alice``, ``login|alice``, ``send|bob|hello there``,
``list|a*`` or ``list``, ``delete``, ``exit``; plus ``help``, and a few shortcuts that cannot be
mistaken for it because they start with ``/`` (``/msg bob hi``, ``/create alice``...).  ``history
NAME`` (also ``history|NAME`` and ``/history NAME``) is local: :class:`ShowHistory`, never sent.

Like the seed's reference client, a line is checked *before* anything is sent: an unknown
operation, a blank username, a ``send`` without a recipient or with a blank message, and a
request over 280 characters are refused locally with a message saying what is wrong.  The limit
applies to the request as it goes on the wire (``3|bob|hello``, without the newline), which is
what the server counts; :func:`request_length` gives that number to an input editor's counter.

Fields are stripped of surrounding white space, as the server does.  A message keeps any ``|``
it contains (everything after the second ``|``); a username is passed on as typed, since only
the server knows its rules.

Passwords (extension 2) are never part of a typed line: ``create|NAME``, ``login|NAME``,
``delete`` and ``passwd`` are parsed as usual, and the user interface then asks for the
password with hidden input (:func:`needs_password`) and attaches it with :func:`with_secret`.
A command's ``secret`` is left out of its ``line``, ``str()``, ``repr()`` and ``wire``: only
the outbox puts it on the wire (``0|login|NAME|PASSWORD``), so it can never be echoed,
shown or stored in history.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..protocol.codec import MAX_REQUEST_CHARS, encode_request

__all__ = [
    "OP_EXT", "OP_CREATE", "OP_LOGIN", "OP_SEND", "OP_LIST", "OP_DELETE", "OP_EXIT", "OP_RESUME",
    "OP_PASSWD", "Command", "Refusal", "Help", "ShowHistory", "parse_command", "request_length", "HELP_TEXT",
    "needs_password", "with_secret", "password_refusal",
]

OP_CREATE, OP_LOGIN, OP_SEND, OP_LIST, OP_DELETE, OP_EXIT = 1, 2, 3, 4, 5, 6
# Extension 1 (docs/protocol.md): op 0 is the extension control op (negotiation, acks, sends
# with a request id), op 7 resumes a session.  The session sends them itself; users never type them.
OP_EXT, OP_RESUME = 0, 7
# Extension 2: change the password.  A client-side code only: it goes as ``0|passwd|OLD|NEW``.
OP_PASSWD = 8

_OP_NAMES = {OP_CREATE: "create", OP_LOGIN: "login", OP_SEND: "send", OP_LIST: "list",
             OP_DELETE: "delete", OP_EXIT: "exit", OP_EXT: "ext", OP_RESUME: "resume",
             OP_PASSWD: "passwd"}
MAX_PASSWORD_CHARS = 128  # texts.MAX_PASSWORD_CHARS


@dataclass(frozen=True)
class Command:
    """A request to send: ``op`` (1..6) and its stripped parameters.

    ``wire`` is the request text without the newline (``3|bob|hello``); ``encode()`` gives the
    newline-framed bytes.  ``line`` is what the user typed (for echo and history)."""

    op: int
    params: tuple[str, ...] = ()
    line: str = ""
    secret: tuple[str, ...] = field(default=(), repr=False, compare=False)  # passwords, extension 2

    @property
    def name(self) -> str:
        return _OP_NAMES.get(self.op, str(self.op))

    @property
    def wire(self) -> str:
        return "|".join((str(self.op), *self.params))

    def encode(self) -> bytes:
        if self.op == OP_EXT:      # older codecs refuse op 0; the framing is the same
            if any("\n" in p for p in self.params):
                raise ValueError("request parameters cannot contain a newline")
            return self.wire.encode("utf-8") + b"\n"
        return encode_request(self.op, *self.params)

    def __str__(self) -> str:
        """The command in the seed's syntax (``send|bob|hello``)."""
        return "|".join((self.name, *self.params))


def needs_password(command: Command) -> bool:
    """Whether the UI asks for a password before submitting ``command`` (passwords on)."""
    return command.op in (OP_CREATE, OP_LOGIN, OP_DELETE, OP_PASSWD)


def password_refusal(password: str, required: bool = True) -> Refusal | None:
    """Why ``password`` cannot be sent (the server's rule, texts.PASSWORD_RULE), or None.  An
    empty one is refused only when ``required`` (a login or delete without one is seed-style)."""
    if not password:
        return Refusal("A password is needed. Nothing was sent.") if required else None
    if len(password) > MAX_PASSWORD_CHARS or "|" in password or any(not c.isprintable() for c in password):
        return Refusal(f"Passwords are 1 to {MAX_PASSWORD_CHARS} characters with no '|' or control "
                       "characters. Nothing was sent.")
    return None


def with_secret(command: Command, *secret: str) -> Command:
    """``command`` carrying its passwords (stripped, as the server strips fields); empty ones
    are dropped from a login or delete, which then go seed-style."""
    secret = tuple(s.strip() for s in secret)
    if command.op != OP_PASSWD and not any(secret):
        secret = ()
    return replace(command, secret=secret)


@dataclass(frozen=True)
class Refusal:
    """The line was not sent; ``message`` says why (shown to the user as an error)."""

    message: str


@dataclass(frozen=True)
class Help:
    """The user asked for help: show :data:`HELP_TEXT`."""


@dataclass(frozen=True)
class ShowHistory:
    """The user asked for the stored conversation with ``peer`` (local: nothing is sent)."""

    peer: str


HELP_TEXT = """\
Commands (the seed's syntax):
  create|NAME           create an account with a password and log in as it
  login|NAME            log in (asks for your password); chat sent while away follows
  send|NAME|MESSAGE     send a chat to NAME (queued until NAME logs in)
  list  or  list|PAT    list accounts, optionally matching a wildcard (a*, ?b*)
  delete                delete your account and log out (asks for your password)
  passwd                change your password (or give a password-less account one)
  exit                  leave (Ctrl-C and Ctrl-D leave too)
  history NAME          show your stored conversation with NAME (kept on this computer)
  help                  this text
Shortcuts: /msg NAME MESSAGE (or /m), /create NAME, /login NAME, /list [PAT],
  /delete, /passwd, /quit, /history NAME, /help.  A request may have at most 280 characters."""


def _too_long(length: int) -> Refusal:
    return Refusal(f"Request too long: {length} characters, the limit is {MAX_REQUEST_CHARS}. "
                   "Shorten the message and try again.")


def _unknown(word: str) -> Refusal:
    shown = word if len(word) <= 20 else word[:20] + "..."
    return Refusal(f'Unknown command "{shown}". Commands: create|NAME, login|NAME, '
                   "send|NAME|MESSAGE, list|PATTERN, delete, passwd, exit, help.")


def _build(op: int, args: list[str], line: str, check_length: bool = True) -> Command | Refusal:
    """Check the fields of one operation (already split, not yet stripped)."""
    args = [a.strip() for a in args]
    name = _OP_NAMES[op]
    if op in (OP_CREATE, OP_LOGIN):
        username = args[0] if args else ""
        if not username:
            return Refusal(f"Username cannot be blank. Usage: {name}|NAME")
        command = Command(op, (username,), line)
    elif op == OP_SEND:
        recipient = args[0] if args else ""
        if len(args) < 2 or not recipient:
            return Refusal("Send needs a recipient and a message. Usage: send|NAME|MESSAGE")
        if not args[1]:
            return Refusal("Cannot send a blank message. Usage: send|NAME|MESSAGE")
        command = Command(op, (recipient, args[1]), line)
    elif op == OP_LIST:
        pattern = args[0] if args else ""
        page = args[1] if len(args) > 1 and args[1].isascii() and args[1].isdigit() else ""
        # `list|a*|117` asks for the page after account number 117 (the server's continuation)
        command = Command(op, (pattern or "*", page) if page else ((pattern,) if pattern else ()), line)
    else:                                      # delete, exit, passwd: parameters are ignored
        command = Command(op, (), line)
    if check_length and len(command.wire) > MAX_REQUEST_CHARS:
        return _too_long(len(command.wire))
    return command


_SEED_WORDS = {name: op for op, name in _OP_NAMES.items() if op not in (OP_EXT, OP_RESUME)}
_SLASH_WORDS = {"create": OP_CREATE, "login": OP_LOGIN, "msg": OP_SEND, "m": OP_SEND,
                "list": OP_LIST, "delete": OP_DELETE, "quit": OP_EXIT, "exit": OP_EXIT,
                "passwd": OP_PASSWD}


def parse_command(line: str) -> Command | Refusal | Help | ShowHistory | None:
    """Turn one input line into a Command, a Refusal, Help, ShowHistory, or None for a blank
    line."""
    return _parse(line, True)


def _parse_history(rest: str) -> ShowHistory | Refusal:
    peer = rest.strip()
    if not peer or " " in peer or "|" in peer:
        return Refusal("History of whom? Usage: history NAME (or /history NAME)")
    return ShowHistory(peer)


def request_length(line: str) -> int:
    """Characters of the request ``line`` would send (what the 280 limit applies to).

    For a line that is not a valid command (yet), the length of the line itself, so that an
    input counter is never smaller than what the user sees."""
    result = _parse(line, False)
    return len(result.wire) if isinstance(result, Command) else len(line.strip())


def _parse(line: str, check_length: bool) -> Command | Refusal | Help | None:
    text = line.strip()
    if not text:
        return None
    if text.startswith("/"):
        return _parse_slash(text, line, check_length)
    word, sep, rest = text.partition("|")
    word = word.strip().lower()
    if word == "help":
        return Help()
    first, _, after = text.partition(" ")
    if word == "history" or (first.lower() == "history" and "|" not in first):
        return _parse_history(rest if word == "history" else after)
    op = _SEED_WORDS.get(word)
    if op is None:
        return _unknown(text.partition("|")[0].strip())
    if op == OP_SEND:
        recipient, sep2, message = rest.partition("|")
        args = [recipient, message] if sep2 else ([recipient] if sep else [])
    else:
        args = [rest] if sep else []
    return _build(op, args, line, check_length)


def _parse_slash(text: str, line: str, check_length: bool) -> Command | Refusal | Help:
    word, _, rest = text[1:].partition(" ")
    word = word.lower()
    if word in ("help", "h", "?"):
        return Help()
    if word == "history":
        return _parse_history(rest)
    op = _SLASH_WORDS.get(word)
    if op is None:
        return _unknown("/" + word)
    rest = rest.strip()
    if op == OP_SEND:
        recipient, _, message = rest.partition(" ")
        if not recipient:
            return Refusal("Send needs a recipient and a message. Usage: /msg NAME MESSAGE")
        return _build(op, [recipient, message], line, check_length)
    return _build(op, [rest] if rest else [], line, check_length)
