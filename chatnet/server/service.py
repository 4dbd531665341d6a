"""The chat service: client sessions on top of the replicated chat state machine.

Sans-I/O.  The host (the reactor) feeds it decoded requests per connection and tells it when
commands have committed and when chat frames have been written completely; the service
answers with *effects* — bytes to append to a connection's output, connections to close, and
commands to propose to the log — which the host carries out.  It never sees a socket, a clock
or the database, so every reference text and every ordering rule is testable in memory.

Rules the service keeps:
* A request that changes replicated state (create, login, send, delete, exit) becomes a
  command; its answer
  is decided by the command's result at apply time and released only after the command is
  durable, so an acknowledgement always means "committed".  While a connection waits for such
  an answer, the host feeds it nothing more (``waiting``), which keeps answers in order.
* Sessions (which connection is logged in as whom) are local to the serving replica; what a
  session needs to survive a failover — its resume token, the per-recipient sequence numbers,
  the recent request ids — is replicated state (extension 1, docs/protocol.md).
* Chat is removed from a mailbox only by a ``delivered`` command: for a seed-style session,
  proposed after the host reports the chat's frame fully written to the socket (at-least-once:
  never-written chat stays queued for the next login); for an extended session, proposed when
  the client acknowledges the sequence number (exactly once for a client that drops seqs it
  has seen).
* A congested recipient (its output over the high-water mark) gets no live chat; it stays in
  the mailbox and is pumped again when the host reports the output drained.
* Passwords (extension 2) are hashed and checked off the loop: the service queues a
  :class:`~.passwords.HashJob` (``take_hash_jobs``), the host runs it on its hasher and hands it
  back (``hashed``); meanwhile the connection waits.  Only the scrypt record ever enters a
  command.  A password check reads the replicated record after every command received before
  it (``_read``), and the command it leads to names the record it checked, so a password
  changed in between is never bypassed.  Failed checks are slowed down per account and per
  address (:class:`~.passwords.Throttle`): an early attempt waits (``tick``), it is never refused.
"""

from __future__ import annotations

import bisect
import fnmatch
import heapq
import hmac
import itertools
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ..protocol.codec import (
    INDICATOR_CHAT,
    INDICATOR_SERVER,
    INVALID_REQUEST_TEXT,
    STATUS_ERROR,
    STATUS_NOTE,
    STATUS_OK,
    BadRequest,
    Request,
    encode_frame,
    encode_response,
    parse_number,
)
from ..protocol.texts import (
    EXTENSION,
    MAX_USERNAME_CHARS,
    PASSWORD_EXTENSION,
    T_CREATE_BAD_NAME,
    T_CREATE_BAD_PASSWORD,
    T_CREATE_FULL,
    T_CREATE_LOGGED_IN,
    T_CREATE_TAKEN,
    T_CREATED,
    T_DELETE_NEEDS_PASSWORD,
    T_DELETE_WRONG_PASSWORD,
    T_DELETED,
    T_EMPTY_MESSAGE,
    T_EXT,
    T_EXT_PASSWORDS,
    T_LIST_MORE,
    T_LOGGED_IN,
    T_LOGIN_CONNECTED,
    T_LOGIN_LOGGED_IN,
    T_LOGIN_NEEDS_PASSWORD,
    T_LOGIN_PASSWORD_CHANGED,
    T_LOGIN_UNKNOWN,
    T_LOGIN_WRONG_PASSWORD,
    T_MAILBOX_FULL,
    T_MISSED,
    T_MUST_LOGIN,
    T_NO_MISSED,
    T_NO_RECIPIENT,
    T_PASSWD_BAD,
    T_PASSWD_RACE,
    T_PASSWD_WRONG,
    T_PASSWORD_CHANGED,
    T_POLICY_CREATE,
    T_POLICY_LOGIN,
    T_POLICY_NO_PASSWORD,
    T_RESUME_BAD_TOKEN,
    T_RESUME_LOGGED_IN,
    T_RESUME_OTHER_HISTORY,
    T_RESUME_TOKEN_NOT_ASCII,
    T_RESUME_UNKNOWN,
    T_RESUMED,
    T_SENT,
    T_TO_SELF,
    T_TOKEN,
    T_UNSUPPORTED,
)
from . import state as sm
from .config import Limits
from .ordering import ArrivalOrder
from .passwords import HashJob, Throttle, password_problem

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
# Accounts one `list` answer examines at most (besides its page-size limit), so that a pattern
# matching few names does not walk every account: about a millisecond of work per answer.
LIST_SCAN_LIMIT = 10_000
SENT_FRAMES_KEPT = 4096  # recipients whose "sent" answer frame is kept ready (ChatService._sent_frame)
READ_OPS = frozenset({4, 7})  # list, resume: answered from the state, no log entry of their own
READ = -2  # Session.waiting_for of a connection whose read waits for earlier commands
HASHING = -3  # ... whose password is being hashed or checked off the loop
THROTTLED = -4  # ... whose password check waits for its back-off (passwords.Throttle)


def _list_cursor(pattern: str) -> tuple[str, int]:
    """Split op 4's argument into (pattern, after): ``a*|17`` is the page of ``a*`` after the
    account created 17th.  Anything else is a plain pattern, as in the seed (a pattern with a
    ``|`` matches no valid name, so ``4||``, our client's probe, still lists nothing)."""
    head, sep, tail = pattern.rpartition("|")
    after = parse_number(tail.strip()) if sep and "|" not in head else None
    if after is None:
        return pattern, 0
    return head.strip() or "*", after


def username_problem(name: str) -> bool:
    """True when ``name`` breaks the username rules (see USERNAME_RULE)."""
    return (
        not name
        or len(name) > MAX_USERNAME_CHARS
        or "|" in name
        or any(c.isspace() or not c.isprintable() for c in name)
    )


class Reply(NamedTuple):
    """Append ``data`` to the connection's output.  When ``delivered`` is (name, order, seq), all
    chat of that account up to seq is in ``data``: once it is written, it counts as delivered.

    Effects are named tuples rather than frozen dataclasses: two are made per chat (the ack and
    the chat frame), and a frozen dataclass's ``__init__`` costs three times as much."""

    conn: int
    data: bytes
    delivered: tuple | None = None


class Close(NamedTuple):
    """Close the connection once its pending output is written."""

    conn: int


@dataclass
class Session:
    conn: int
    name: str | None = None
    order: int = 0  # incarnation of the logged-in account
    sent_upto: int = 0  # highest seq already put into this connection's output
    waiting_for: int | None = None  # log index whose answer this connection waits for (READ: a read)
    written: tuple | None = None  # (name, order, seq) written to a seed-style socket, not yet evidenced
    input_ended: bool = False  # the client sent EOF: it leaves once its requests are answered
    congested: bool = False
    extended: bool = False  # negotiated extension 1: tokens, sequence numbers, acks
    passwords: bool = False  # negotiated extension 2: the password verbs of op 0
    address: str | None = None  # the client's IP address (per-address back-off)


def frame(status: int, message: str) -> bytes:
    return encode_frame(status, INDICATOR_SERVER, message)


EPOCH_SEPARATOR = "."  # never in a drawn token (A-Z a-z 0-9 _ -)


def split_token(token: str) -> tuple[str, int | None]:
    """``TOKEN.EPOCH`` (what an extended session is given) -> (TOKEN, EPOCH); a token without
    an epoch (an older client's saved one) -> (token, None)."""
    base, sep, epoch = token.rpartition(EPOCH_SEPARATOR)
    if sep and epoch.isascii() and epoch.isdigit() and len(epoch) < 20:
        return base, int(epoch)
    return token, None


def chat_frame(mail: sm.Mail, extended: bool = False) -> bytes:
    """The seed's `sender|text`, or `seq|sender|text` for an extended session."""
    sender = mail.display_sender if mail.sender_deleted else mail.sender  # (one per chat: the
    body = f"{mail.seq}|{sender}|{mail.text}" if extended else f"{sender}|{mail.text}"  # usual case inline)
    return encode_frame(STATUS_OK, INDICATOR_CHAT, body)


@dataclass
class ChatService:
    state: sm.ChatState
    new_token: object = field(default=lambda: secrets.token_urlsafe(18))  # drawn by the primary, carried in commands
    sessions: dict[int, Session] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    online: dict[str, int] = field(default_factory=dict)  # account name -> conn
    effects: list = field(default_factory=list)
    proposals: list = field(default_factory=list)  # (command, conn or None), in order
    _waiters: dict[int, tuple[int, int]] = field(default_factory=dict)  # log index -> (conn, view)
    _unblocked: list = field(default_factory=list)  # conns answered since take_unblocked()
    _logging_in: set = field(default_factory=set)  # accounts with a login proposed, not yet applied
    _delivered: dict[tuple, int] = field(default_factory=dict)  # (name, order) -> highest written seq
    _list_cache: list = field(default_factory=list)  # accounts in creation order, see _accounts_in_order
    _list_cache_key: tuple | None = None
    _sent_frames: dict = field(default_factory=dict)  # recipient -> its "sent" answer frame, see _sent_frame
    _order: ArrivalOrder = field(default_factory=ArrivalOrder)  # reads wait for earlier commands
    clock: object = field(default=time.monotonic)  # only for the password back-off
    throttle: Throttle = field(default_factory=Throttle)
    hash_jobs: list = field(default_factory=list)  # HashJobs for the host's hasher
    _hash_epoch: int = 0  # bumped when this replica stops serving: older jobs are void
    _throttled: list = field(default_factory=list)  # heap of (when, n, conn, check) waiting for back-off
    _throttle_ids: object = field(default_factory=itertools.count)
    _creating: dict = field(default_factory=dict)  # name -> requests waiting for its hashing create
    # The view whose commits the chat now being applied came from (set by the host): tokens
    # carry it, so a resume elsewhere can tell whose numbering its LAST_SEQ is (see _resume).
    epoch: int | None = None
    in_history: object = field(default=lambda view: True)  # view -> whether my log holds entries of it

    # -- connection life cycle -------------------------------------------------------------
    def connection_opened(self, conn: int, address: str | None = None) -> None:
        self.sessions[conn] = Session(conn, address=address)

    def connection_closed(self, conn: int) -> None:
        session = self.sessions.pop(conn, None)
        if session and session.name is not None and self.online.get(session.name) == conn:
            del self.online[session.name]

    def input_ended(self, conn: int) -> None:
        """The client closed its side: no request can follow, so a create or login still in
        flight answers but does not put the account online — another connection may log in
        as it at once (the seed client's connect, write one request, close)."""
        session = self.sessions.get(conn)
        if session is not None:
            session.input_ended = True

    def waiting(self, conn: int) -> bool:
        session = self.sessions.get(conn)
        return session is not None and session.waiting_for is not None

    def logged_in_as(self, conn: int) -> str | None:
        session = self.sessions.get(conn)
        return session.name if session else None

    # -- requests ---------------------------------------------------------------------------
    def receive(self, conn: int, event) -> None:
        """Handle one decoded request (or decoding error) of a connection."""
        session = self.sessions[conn]
        if session.written is not None:
            self._evidence(session)  # a later request: the chat written before it was read
        if isinstance(event, BadRequest):
            self._reply(conn, STATUS_ERROR, event.text)
            return
        assert isinstance(event, Request)
        handler = self._handlers.get(event.op)
        if handler is None:
            self._reply(conn, STATUS_ERROR, T_UNSUPPORTED)
        elif event.op in READ_OPS:
            self._read(session, handler, event.args)
        else:
            handler(self, session, *event.args)

    def _read(self, session: Session, handler, args: tuple) -> None:
        """Answer a request without a log entry from a state that includes every command
        received before it (chatnet/server/ordering.py): at once when nothing is in flight,
        else once the log is applied that far; the connection waits meanwhile."""
        if self._order.settled():
            handler(self, session, *args)
        else:
            session.waiting_for = READ
            self._order.defer((session.conn, handler, args))

    def _answer_read(self, read: tuple) -> None:
        conn, handler, args = read
        session = self.sessions.get(conn)
        if session is None or session.waiting_for != READ:
            return  # closed, or sent away, meanwhile
        session.waiting_for = None
        self._unblocked.append(conn)
        handler(self, session, *args)

    def _create(self, session: Session, name: str) -> None:
        refusal = self._create_refusal(session, name, T_POLICY_CREATE if self.limits.require_passwords else None)
        if refusal is not None:
            self._reply(session.conn, STATUS_ERROR, refusal)
        elif not self._behind_create(session, ChatService._create, (name,), name):
            self._propose(sm.cmd_create(name, self.new_token()), session)

    def _create_refusal(self, session: Session, name: str, policy: str | None = None) -> str | None:
        """The reference checks of a create (the name's being taken is decided at apply)."""
        if session.name is not None:
            return T_CREATE_LOGGED_IN.format(me=session.name)
        if username_problem(name):
            return T_CREATE_BAD_NAME
        if policy is not None:
            return policy
        if len(self.state.accounts) >= self.limits.max_accounts and not self.state.exists(name):
            return T_CREATE_FULL
        return None

    def _login(self, session: Session, name: str) -> None:
        refusal = self._login_refusal(session, name)
        if refusal is None and self.limits.require_passwords:
            refusal = T_POLICY_LOGIN  # a seed-style login can only reach a password-less account
        if refusal is not None:
            self._reply(session.conn, STATUS_ERROR, refusal)
        elif not self._behind_create(session, ChatService._login, (name,), name):
            self._propose_login(session, name, sm.cmd_login(name, self.new_token()))

    def _login_refusal(self, session: Session, name: str) -> str | None:
        if session.name is not None:
            return T_LOGIN_LOGGED_IN.format(me=session.name)
        if username_problem(name):  # whether it exists is decided when the login applies
            return T_LOGIN_UNKNOWN
        if name in self.online or name in self._logging_in:
            return T_LOGIN_CONNECTED
        return None

    def _propose_login(self, session: Session, name: str, cmd: tuple) -> None:
        # A login is replicated: its new token supersedes every earlier session's.  Only one
        # login of an account may be in flight, or a loser's token would replace the winner's.
        if name in self.online or name in self._logging_in:
            self._reply(session.conn, STATUS_ERROR, T_LOGIN_CONNECTED)
            return
        self._logging_in.add(name)
        self._propose(cmd, session)

    def _logged_in(self, session: Session, name: str) -> None:
        """The login committed: answer, then the queued chat, then the note."""
        if name in self.online:  # another connection logged in meanwhile
            self._reply(session.conn, STATUS_ERROR, T_LOGIN_CONNECTED)
            return
        self._log_in(session, name)
        self._reply(session.conn, STATUS_OK, T_LOGGED_IN.format(name=name))
        self._send_token(session)
        queued = self.state.mail_after(name, 0)
        if queued:
            self._send_chats(session, queued)
            self._reply(session.conn, STATUS_NOTE, T_MISSED.format(n=len(queued)))
        else:
            self._reply(session.conn, STATUS_NOTE, T_NO_MISSED)

    def _send(self, session: Session, recipient: str, text: str, request_id: str | None = None) -> None:
        if session.name is None:
            self._reply(session.conn, STATUS_ERROR, T_MUST_LOGIN)
        elif recipient == session.name:
            self._reply(session.conn, STATUS_ERROR, T_TO_SELF)
        elif not text:  # the seed says "no such recipient" first: a read of the state
            self._read(session, ChatService._refuse_empty_send, (recipient,))
        elif self._mailbox_full(recipient) and not self._retried(session.name, request_id):
            self._reply(session.conn, STATUS_ERROR, T_MAILBOX_FULL.format(recipient=recipient))
        else:
            self._propose(sm.cmd_send(session.name, recipient, text, request_id), session)

    def _refuse_empty_send(self, session: Session, recipient: str) -> None:
        text = T_EMPTY_MESSAGE if self.state.exists(recipient) else T_NO_RECIPIENT
        self._reply(session.conn, STATUS_ERROR, text)

    def _mailbox_full(self, recipient: str) -> bool:
        """Checked here, on the replica that received the send, never in ``apply``: replicas
        with different limits must still apply the same log identically."""
        return self.state.pending_count(recipient) >= self.limits.max_queued_chats

    def _retried(self, sender: str, request_id: str | None) -> bool:
        """A send whose request id already committed is answered "sent" again, even when the
        mailbox has filled since: the chat is in it, and refusing would contradict that."""
        account = self.state.accounts.get(sender)
        return request_id is not None and account is not None and request_id in account.request_ids

    def _list(self, session: Session, pattern: str) -> None:
        """The seed's answer, ``\n- alice\n- bob\n``, bounded in size and work.

        At most ``limits.max_list_names`` names, and at most LIST_SCAN_LIMIT accounts examined
        per answer, so a request costs about the same on a server of any size.  An answer cut
        short ends with T_LIST_MORE naming the request for the rest: ``4|PATTERN|AFTER``, AFTER
        being the creation number of the last account examined (stable while accounts come
        and go, unlike a position)."""
        pattern, after = _list_cursor(pattern)
        names, resume_after = self._list_page(pattern, after)
        text = "\n" + "".join(f"- {name}\n" for name in names)
        if resume_after is not None:
            text += T_LIST_MORE.format(pattern=pattern, after=resume_after) + "\n"
        self.effects.append(Reply(session.conn, encode_response(STATUS_OK, INDICATOR_SERVER, text)))

    def _list_page(self, pattern: str, after: int) -> tuple[list[str], int | None]:
        """Names matching ``pattern`` created after ``after``, and where the next page starts
        (None when there is nothing left)."""
        if not any(c in pattern for c in "*?["):  # an exact name: a lookup, not a scan
            account = self.state.accounts.get(pattern)
            return ([pattern] if account is not None and account.order > after else []), None
        # Compiled here, not by fnmatch.fnmatchcase, whose cache keeps up to 32,768 compiled
        # patterns: a client sending distinct patterns would grow the server's memory.
        match = re.compile(fnmatch.translate(pattern)).match
        accounts = self._accounts_in_order()
        start = bisect.bisect_right(accounts, after, key=lambda account: account.order)
        names: list[str] = []
        last = after
        for account in itertools.islice(accounts, start, start + LIST_SCAN_LIMIT):
            if match(account.name):
                if len(names) == self.limits.max_list_names:
                    return names, last
                names.append(account.name)
            last = account.order
        if start + LIST_SCAN_LIMIT < len(accounts):
            return names, accounts[start + LIST_SCAN_LIMIT - 1].order
        return names, None

    def _accounts_in_order(self) -> list:
        """The accounts as a list in creation order (orders increase along it), rebuilt only
        when accounts were created or deleted since the last list, so a page is found by
        bisection instead of a walk over every earlier account."""
        accounts = self.state.accounts
        newest = next(reversed(accounts.values())).order if accounts else 0
        key = (self.state, len(accounts), newest)
        cached = self._list_cache_key
        if cached is None or cached[0] is not key[0] or cached[1:] != key[1:]:
            self._list_cache = list(accounts.values())
            self._list_cache_key = key
        return self._list_cache

    def _delete(self, session: Session) -> None:
        if session.name is None:
            self._reply(session.conn, STATUS_ERROR, T_MUST_LOGIN)
        elif getattr(self.state.accounts.get(session.name), "password", None) is not None:
            self._reply(session.conn, STATUS_ERROR, T_DELETE_NEEDS_PASSWORD)
        else:
            self._propose(sm.cmd_delete(session.name), session)

    def _exit(self, session: Session) -> None:
        # The account goes offline at once; the host stops feeding this connection after Close.
        # Exiting ends the session for good: its resume token is cleared (replicated).
        self._evidence(session)  # a clean exit: everything written to it was read
        if session.name is not None:
            self._enqueue(sm.cmd_logout(session.name), None)
        self._log_out(session)
        self.effects.append(Close(session.conn))

    # -- extension 1 ------------------------------------------------------------------------
    def _extension(self, session: Session, verb: str = "", *args: str) -> None:
        if verb == "ext" and args == (EXTENSION,):
            session.extended = True
            self._reply(session.conn, STATUS_OK, T_EXT)
        elif verb == "ext" and args == (PASSWORD_EXTENSION,):
            session.passwords = True
            self._reply(session.conn, STATUS_OK, T_EXT_PASSWORDS)
        elif verb in _PASSWORD_VERBS and session.passwords:
            _PASSWORD_VERBS[verb](self, session, *args)
        elif verb == "ack" and session.extended and len(args) == 1 and parse_number(args[0]) is not None:
            if session.name is not None:
                seq = min(parse_number(args[0]), session.sent_upto)
                self._mark_delivered(session.name, session.order, seq)
        elif verb == "send" and session.extended and len(args) == 3 and REQUEST_ID.fullmatch(args[0]):
            self._send(session, args[1], args[2], args[0])
        else:
            self._reply(session.conn, STATUS_ERROR, INVALID_REQUEST_TEXT)

    def _resume(self, session: Session, name: str = "", token: str = "", last_seq: str = "0", *rest: str) -> None:
        if not token and not rest and last_seq == "0":
            self._login(session, name)  # the seed revision's tokenless `7|name|` is a login
            return
        seen = parse_number(last_seq)
        if rest or seen is None:
            self._reply(session.conn, STATUS_ERROR, INVALID_REQUEST_TEXT)
            return
        token, epoch = split_token(token)
        refusal = self._resume_refusal(session, name, token, epoch)
        if refusal is not None:
            self._reply(session.conn, STATUS_ERROR, refusal)
            return
        old = self.online.get(name)
        if old is not None:  # the dead session this one replaces
            self._log_out(self.sessions[old])
            self.effects.append(Close(old))
        self._log_in(session, name)
        seen = min(seen, self.state.last_seq(name))
        session.sent_upto = seen
        self._mark_delivered(name, session.order, seen)
        self._reply(session.conn, STATUS_OK, T_RESUMED.format(name=name))
        self._send_token(session)
        self._send_chats(session, self.state.mail_after(name, seen))

    def _resume_refusal(self, session: Session, name: str, token: str, epoch: int | None) -> str | None:
        """Why a resume is refused, or None.  A token whose epoch (the view whose chat the
        session last received) is not in this replica's history is refused before its token is
        checked: after a healed split brain its LAST_SEQ numbers the other side's mailbox, and
        taking it would mark chat delivered that the client never saw; the client logs in
        afresh and takes every queued chat (its token may even be the other side's, not yet
        re-applied here)."""
        account = self.state.accounts.get(name)
        if session.name is not None:
            return T_RESUME_LOGGED_IN.format(me=session.name)
        if account is None:
            return T_RESUME_UNKNOWN
        if not token.isascii():  # compare_digest cannot compare it; no token we draw has it
            return T_RESUME_TOKEN_NOT_ASCII
        if epoch is not None and not self.in_history(epoch):
            return T_RESUME_OTHER_HISTORY
        if account.token is None or not hmac.compare_digest(account.token.encode(), token.encode("ascii")):
            return T_RESUME_BAD_TOKEN
        if self.limits.require_passwords and account.password is None:
            return T_POLICY_NO_PASSWORD
        return None

    def set_epoch(self, view: int) -> None:
        """The host applies chat committed in ``view`` from now on: every extended session
        gets its token again with the new epoch before any such chat (so a session's token
        always names the view of the latest chat it may have received)."""
        if view == self.epoch:
            return
        self.epoch = view
        for conn in self.online.values():
            session = self.sessions[conn]
            if session.extended:
                self._send_token(session)

    def _send_token(self, session: Session) -> None:
        if session.extended:
            token = self.state.accounts[session.name].token
            if self.epoch is not None and token is not None:
                token = f"{token}{EPOCH_SEPARATOR}{self.epoch}"
            self._reply(session.conn, STATUS_OK, T_TOKEN.format(token=token))

    _handlers = {0: _extension, 1: _create, 2: _login, 3: _send, 4: _list, 5: _delete, 6: _exit, 7: _resume}

    # -- extension 2: passwords -------------------------------------------------------------
    def _create_password(self, session: Session, name: str = "", password: str = "", *rest: str) -> None:
        """``0|create|NAME|PASSWORD``: op 1, with the scrypt record made off the loop first."""
        refusal = INVALID_REQUEST_TEXT if rest else self._create_refusal(session, name)
        if refusal is None and password_problem(password):
            refusal = T_CREATE_BAD_PASSWORD
        if refusal is not None:
            self._reply(session.conn, STATUS_ERROR, refusal)
        elif not self._behind_create(session, ChatService._create_password, (name, password), name):
            self._creating[name] = []  # same-name creates and logins wait for this one
            self._hash(session, HashJob(password), "create", name)

    def _login_password(self, session: Session, name: str = "", password: str = "", *rest: str) -> None:
        """``0|login|NAME|PASSWORD``: op 2 for an account with (or without) a password."""
        refusal = INVALID_REQUEST_TEXT if rest else self._login_refusal(session, name)
        if refusal is not None:
            self._reply(session.conn, STATUS_ERROR, refusal)
        elif not self._behind_create(session, ChatService._login_password, (name, password), name):
            self._check(session, name, password, "login")

    def _delete_password(self, session: Session, password: str = "", *rest: str) -> None:
        """``0|delete|PASSWORD``: op 5, once the password is checked again."""
        if rest:
            self._reply(session.conn, STATUS_ERROR, INVALID_REQUEST_TEXT)
        elif session.name is None:
            self._reply(session.conn, STATUS_ERROR, T_MUST_LOGIN)
        else:
            self._check(session, session.name, password, "delete")

    def _passwd(self, session: Session, old: str = "", new: str = "", *rest: str) -> None:
        """``0|passwd|OLD|NEW``: check OLD (not for an account without a password), hash NEW."""
        if rest:
            self._reply(session.conn, STATUS_ERROR, INVALID_REQUEST_TEXT)
        elif session.name is None:
            self._reply(session.conn, STATUS_ERROR, T_MUST_LOGIN)
        elif password_problem(new):
            self._reply(session.conn, STATUS_ERROR, T_PASSWD_BAD)
        else:
            self._check(session, session.name, old, "passwd", new)

    def _behind_create(self, session: Session, handler, args: tuple, name: str) -> bool:
        """A create of ``name`` is being hashed: this create or login of the same name waits
        until it is proposed, then goes after it (arrival order for the name)."""
        if name not in self._creating:
            return False
        session.waiting_for = HASHING
        self._creating[name].append((session.conn, handler, args))
        return True

    def _hash(self, session: Session, job: HashJob, kind: str, *context) -> None:
        """Queue ``job`` for the host's hasher; the connection waits for ``hashed``."""
        job.context = (self._hash_epoch, kind, session.conn, *context)
        session.waiting_for = HASHING
        self.hash_jobs.append(job)

    def take_hash_jobs(self) -> list:
        jobs, self.hash_jobs = self.hash_jobs, []
        return jobs

    def hashed(self, job: HashJob) -> None:
        """The host's hasher finished ``job``: go on with the request that queued it."""
        epoch, kind, conn, *context = job.context
        if epoch != self._hash_epoch:
            return  # queued before this replica stopped serving: nobody waits for it here
        session = self.sessions.get(conn)
        if session is not None and session.waiting_for == HASHING:
            session.waiting_for = None
            self._unblocked.append(conn)
        elif kind == "create":
            session = None  # the client left; its create still takes effect (arrival order)
        else:
            return
        getattr(self, f"_{kind}_hashed")(session, job.result, *context)

    def _create_hashed(self, session: Session | None, record: str | None, name: str) -> None:
        if record is not None:
            self._propose(sm.cmd_create(name, self.new_token(), record), session)
        elif session is not None:  # the hasher failed (a bug): refuse rather than store no password
            self._reply(session.conn, STATUS_ERROR, T_CREATE_BAD_PASSWORD)
        for conn, handler, args in self._creating.pop(name, []):
            waiting = self.sessions.get(conn)
            if waiting is not None and waiting.waiting_for == HASHING:
                waiting.waiting_for = None
                self._unblocked.append(conn)
                handler(self, waiting, *args)

    def _check(self, session: Session, name: str, password: str, purpose: str, extra: str = "") -> None:
        """Check ``password`` for ``name``, after the account's and the address's back-off."""
        now = self.clock()
        when = self.throttle.when(name, session.address, now)
        args = (name, password, purpose, extra)
        if when > now:
            session.waiting_for = THROTTLED
            heapq.heappush(self._throttled, (when, next(self._throttle_ids), session.conn, args))
        else:
            self._read(session, ChatService._check_stored, args)

    def tick(self) -> None:
        """Release the password checks whose back-off is over (the host calls this every tick)."""
        if not (self._throttled or self.throttle.accounts or self.throttle.addresses):
            return
        now = self.clock()
        while self._throttled and self._throttled[0][0] <= now:
            _, _, conn, args = heapq.heappop(self._throttled)
            session = self.sessions.get(conn)
            if session is not None and session.waiting_for == THROTTLED:
                session.waiting_for = None
                self._unblocked.append(conn)
                self._read(session, ChatService._check_stored, args)
        self.throttle.prune(now)

    def _check_stored(self, session: Session, name: str, password: str, purpose: str, extra: str) -> None:
        """A read: the record as applied after every command received before the request."""
        account = self.state.accounts.get(name)
        if account is None:
            self._reply(session.conn, STATUS_ERROR, T_LOGIN_UNKNOWN if purpose == "login" else T_MUST_LOGIN)
        elif account.password is None:
            self._passed(session, purpose, name, None, extra)
        elif password_problem(password):  # cannot be right: a failure, without scrypt
            self._verify_hashed(session, False, purpose, name, account.password_salt, extra)
        else:
            job = HashJob(password, account.password)
            self._hash(session, job, "verify", purpose, name, account.password_salt, extra)

    def _verify_hashed(self, session: Session, right: bool, purpose: str, name: str, salt: str, extra: str) -> None:
        if right:
            self.throttle.succeeded(name, session.address)
            self._passed(session, purpose, name, salt, extra)
        else:
            wait = self.throttle.failed(name, session.address, self.clock())
            self._reply(session.conn, STATUS_ERROR, _WRONG_PASSWORD[purpose].format(seconds=wait))

    def _passed(self, session: Session, purpose: str, name: str, checked: str | None, extra: str) -> None:
        """The password is right (or the account has none): the request goes on."""
        if purpose == "login":
            if checked is None and self.limits.require_passwords:
                self._reply(session.conn, STATUS_ERROR, T_POLICY_NO_PASSWORD)
            else:
                self._propose_login(session, name, sm.cmd_login(name, self.new_token(), checked, verified=True))
        elif purpose == "delete":
            self._propose(sm.cmd_delete(name), session)
        else:
            self._hash(session, HashJob(extra), "passwd", name, checked)

    def _passwd_hashed(self, session: Session, record: str | None, name: str, checked: str | None) -> None:
        if record is None:  # the hasher failed (a bug)
            self._reply(session.conn, STATUS_ERROR, T_PASSWD_BAD)
        else:
            self._propose(sm.cmd_password(name, record, checked), session)

    def password_stats(self) -> dict:
        """Counters for the replica's status (never a name or a password)."""
        return {**self.throttle.stats(), "waiting_for_backoff": len(self._throttled)}

    # -- commands ---------------------------------------------------------------------------
    def _propose(self, cmd: tuple, session: Session | None) -> None:
        self._enqueue(cmd, session.conn if session else None)
        if session is not None:
            session.waiting_for = -1  # set to the real index by bind()

    def _enqueue(self, cmd: tuple, conn: int | None) -> None:
        self.proposals.append((cmd, conn))
        self._order.queued()

    def has_delivery_marks(self) -> bool:
        return bool(self._delivered)

    def take_proposals(self) -> list:
        """Commands to append to the log, in order, with the connection waiting for each."""
        proposals, self.proposals = self.proposals, []
        if self._delivered:
            proposals.append((sm.cmd_delivered_many((name, order, seq) for (name, order), seq in self._delivered.items()), None))
            self._order.queued()
            self._delivered.clear()
        return proposals

    def bind(self, index: int, cmd: tuple, conn: int | None, view: int = 0) -> None:
        """The host appended ``cmd`` at log ``index`` in ``view``; its answer goes to ``conn``.
        Commands are bound in the order take_proposals returned them."""
        self._order.bound(index)
        if conn is not None:
            self._waiters[index] = (conn, view)
            session = self.sessions.get(conn)
            if session is not None:
                session.waiting_for = index

    def take_unblocked(self) -> list:
        unblocked, self._unblocked = self._unblocked, []
        return unblocked

    def replace_state(self, state: sm.ChatState) -> None:
        """A snapshot replaced the state (a backup catching up): nobody is logged in here."""
        self.state = state
        self.abandon_proposals()

    def abandon_proposals(self) -> None:
        """This replica stopped serving: nobody will get an answer for uncommitted commands."""
        for session in self.sessions.values():
            session.waiting_for = None
        self._waiters.clear()
        self.proposals.clear()
        self._logging_in.clear()
        self._order.reset()
        self._hash_epoch += 1  # jobs still out come back void
        self.hash_jobs.clear()
        self._throttled.clear()
        self._creating.clear()

    def apply(self, index: int, cmd: tuple, view: int = 0) -> object:
        """Apply a committed command; queue its answer and live chat; return its result.

        The waiter of ``index`` is answered only if the committed entry is the one it proposed
        (same view): an entry of another primary at that index is not its command."""
        result = self.state.apply(cmd, index)  # (remembers a refusal: ChatState.note_refused)
        if cmd[0] == "login":
            self._logging_in.discard(cmd[1])
        waiter = self._waiters.pop(index, None)
        session = None
        if waiter is not None:
            session = self.sessions.get(waiter[0])
            if session is not None and session.waiting_for == index:
                session.waiting_for = None
                self._unblocked.append(session.conn)
                if waiter[1] != view:
                    session = None  # not our command: no answer (the client retries elsewhere)
            else:
                session = None
        kind = cmd[0]
        if kind == "send" and isinstance(result, sm.Mail):
            self._deliver_live(cmd[2], result)
        if session is not None:
            self._answer(session, cmd, result)
        for read in self._order.applied(index):  # reads that waited for this command
            self._answer_read(read)
        return result

    def _sent_frame(self, recipient: str) -> bytes:
        """The answer to a chat sent to ``recipient``: the same bytes for every chat to it, so
        made once per recipient (format, encode, frame) rather than once per chat; at most
        SENT_FRAMES_KEPT are kept (then the cache starts afresh)."""
        data = self._sent_frames.get(recipient)
        if data is None:
            if len(self._sent_frames) >= SENT_FRAMES_KEPT:
                self._sent_frames.clear()
            data = self._sent_frames[recipient] = frame(STATUS_OK, T_SENT.format(recipient=recipient))
        return data

    def _answer(self, session: Session, cmd: tuple, result) -> None:
        kind = cmd[0]
        if kind == "send":  # the common case first
            if isinstance(result, sm.Mail) or result == sm.DUPLICATE:
                self.effects.append(Reply(session.conn, self._sent_frame(cmd[2])))
            else:
                self._reply(session.conn, STATUS_ERROR, T_NO_RECIPIENT)
        elif kind == "create":
            if result == sm.OK:
                self._log_in(session, cmd[1])
                self._reply(session.conn, STATUS_OK, T_CREATED.format(name=cmd[1]))
                self._send_token(session)
            else:
                self._reply(session.conn, STATUS_ERROR, T_CREATE_TAKEN)
        elif kind == "login":
            if result == sm.OK:
                self._logged_in(session, cmd[1])
            else:
                self._reply(session.conn, STATUS_ERROR, _LOGIN_REFUSALS[result])
        elif kind == "password":
            self._reply(session.conn, *((STATUS_OK, T_PASSWORD_CHANGED) if result == sm.OK
                                        else (STATUS_ERROR, T_PASSWD_RACE)))
        elif kind == "delete":
            self._log_out(session)
            self._reply(session.conn, STATUS_OK, T_DELETED.format(name=cmd[1]))

    # -- delivery ---------------------------------------------------------------------------
    def _deliver_live(self, recipient: str, mail: sm.Mail) -> None:
        conn = self.online.get(recipient)
        if conn is None:
            return
        session = self.sessions[conn]
        if session.congested:
            return
        if session.sent_upto == mail.seq - 1:  # the usual case: all before it went out already
            self._send_chats(session, [mail])
        else:
            self._send_chats(session, self.state.mail_after(recipient, session.sent_upto))

    def set_congested(self, conn: int, congested: bool) -> None:
        """The host reports the connection's output over the high-water mark (or drained again)."""
        session = self.sessions.get(conn)
        if session is None or session.congested == congested:
            return
        session.congested = congested
        if not congested and session.name is not None:
            pending = self.state.mail_after(session.name, session.sent_upto)
            if pending:
                self._send_chats(session, pending)

    def frames_written(self, delivered: tuple) -> None:
        """The host wrote all bytes of a Reply whose ``delivered`` was (name, order, seq).

        Written is not read: a client that resets its connection loses what sat unread in its
        socket buffer.  So a seed-style session's chat counts as delivered only on evidence that
        the client read it — a later request on the same connection, or a clean exit
        (``_evidence``); a connection that ends otherwise leaves it queued for the next login
        (at-least-once, docs/protocol.md)."""
        name, order, seq = delivered
        conn = self.online.get(name)
        session = self.sessions.get(conn) if conn is not None else None
        if session is None or session.order != order or session.extended:
            return
        if session.written is None or seq > session.written[2]:
            session.written = delivered

    def _evidence(self, session: Session) -> None:
        """The client sent a request (or exited cleanly) after its chat was written: it read it."""
        if session.written is not None:
            self._mark_delivered(*session.written)
            session.written = None

    def _mark_delivered(self, name: str, order: int, seq: int) -> None:
        key = (name, order)
        if seq > self._delivered.get(key, 0):
            self._delivered[key] = seq

    def _send_chats(self, session: Session, mails: list) -> None:
        """Put chat on the session's connection.  A seed-style session counts it delivered once
        written to the socket; an extended one only when the client acknowledges it."""
        if not mails:
            return
        if len(mails) == 1:
            data = chat_frame(mails[0], session.extended)
        else:
            data = b"".join(chat_frame(mail, session.extended) for mail in mails)
        session.sent_upto = mails[-1].seq
        mark = None if session.extended else (session.name, session.order, session.sent_upto)
        self.effects.append(Reply(session.conn, data, mark))

    # -- helpers ----------------------------------------------------------------------------
    def _log_in(self, session: Session, name: str) -> None:
        session.name = name
        session.order = self.state.accounts[name].order
        session.sent_upto = 0  # everything still in the mailbox is owed to this session
        if not session.input_ended:
            self.online[name] = session.conn

    def _log_out(self, session: Session) -> None:
        if session.name is not None and self.online.get(session.name) == session.conn:
            del self.online[session.name]
        session.name = None
        session.sent_upto = 0

    def _reply(self, conn: int, status: int, message: str) -> None:
        self.effects.append(Reply(conn, frame(status, message)))

    def take_effects(self) -> list:
        effects, self.effects = self.effects, []
        return effects


_PASSWORD_VERBS = {"create": ChatService._create_password, "login": ChatService._login_password,
                   "delete": ChatService._delete_password, "passwd": ChatService._passwd}
_LOGIN_REFUSALS = {sm.NO_SUCH_ACCOUNT: T_LOGIN_UNKNOWN, sm.PASSWORD_REQUIRED: T_LOGIN_NEEDS_PASSWORD,
                   sm.PASSWORD_CHANGED: T_LOGIN_PASSWORD_CHANGED}
_WRONG_PASSWORD = {"login": T_LOGIN_WRONG_PASSWORD, "delete": T_DELETE_WRONG_PASSWORD, "passwd": T_PASSWD_WRONG}
