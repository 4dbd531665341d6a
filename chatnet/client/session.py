"""Sans-I/O client session: which server to talk to, who we are, and what is still to send.

The session never touches a socket or a clock.  A driver (``driver.py``, or a test) feeds it
what happened — :meth:`ClientSession.connection_made`, :meth:`~ClientSession.connect_failed`,
:meth:`~ClientSession.data_received`, :meth:`~ClientSession.connection_lost`, the user's
:meth:`~ClientSession.submit`, and :meth:`~ClientSession.tick` at :meth:`~ClientSession.next_deadline`
— always with ``now``, a number of seconds on a monotonic clock of the driver's choosing.  The
session answers with *actions* for the driver (:class:`Connect`, :class:`Send`, :class:`Disconnect`,
taken with :meth:`~ClientSession.take_actions`) and *events* for the user interface (taken with
:meth:`~ClientSession.take_events`).  Every decision is therefore testable with plain numbers and
a seeded ``random.Random``.

Rules the session keeps:

* **One connection at a time.**  A :class:`Disconnect` always precedes the next :class:`Connect`.
* **Server choice.**  Servers are tried in list order, starting after the one that was lost.  A
  backup's note ``This server is a backup. The primary is at HOST:PORT.`` makes HOST:PORT the
  next attempt; ``... knows no primary yet. Try again shortly.`` moves on to the next server.
  Either way the session closes that connection itself.
* **Backoff.**  Each attempt that does not end in a good connection counts (except a backup's
  redirect, unless the attempt itself followed a redirect: chains of them count).  After as many
  failed attempts as there are servers (a *round*), the session waits a capped exponential
  delay with jitter (:class:`Backoff`) and reports :class:`AllServersDown`; within a round the
  next server is tried at once.  A connection is *good* once the server sent something other
  than a backup note, or stayed open ``stable_after`` seconds; that resets the count.
* **Identity.**  The logged-in user is learnt from the server's success answers to create and
  login (and forgotten on a successful delete).  On every new connection the session first
  negotiates extension 1 (below), then re-identifies (op 7 resume, or op 2 login) and sends
  nothing else until that is answered.  With nobody to log in and the extension off, it sends
  a probe instead (``4||``, a list that matches no valid name), since a backup only reveals
  itself when it receives a request.  If the server says the account is still connected (our
  own dead connection, not yet noticed), the login is retried with backoff a few times.
* **Nothing typed is dropped silently.**  Commands submitted while not connected (or while
  re-identifying) wait in a queue, in order, and are sent after the re-login.  Commands that
  were sent but not answered when a connection broke go back to the front of that queue and
  are sent again: at-least-once on a seed-style connection (a command the old server executed
  just before dying may run twice); on an extended one a send carries the same request id on
  every attempt, so it is delivered once.  A retried create or login holds back the commands
  behind it until it is answered; a retried create answered "already taken" (our own first
  attempt, most likely) logs in instead (:class:`CreateRecovered`).  Commands still queued
  when the session is closed are reported in :class:`SessionClosed`.
* **Answers are matched in order.**  The server answers each request with exactly one frame of
  status 0 or 1 and indicator 0, in request order (a long list answer may continue in further
  frames starting with ``- ``).  A successful login is followed, after any queued chat, by one
  status-2 summary note.  Chat frames (indicator 1) can arrive at any time.

Extension 1 — sessions that survive failover (``docs/protocol.md``, last section):

* **Negotiation.**  On every new connection (``extension=True``, the default) the first request
  is ``0|ext|1``; it doubles as the probe that makes a backup reveal itself.  The answer
  ``ext|1`` makes the connection *extended*; any error answer (a server without the extension
  says "Invalid operation") leaves it seed-style, and everything below is skipped.  Nothing else
  is sent until the answer came (sends are encoded differently on extended connections).
* **Token.**  ``token|TOKEN`` frames (after a create, login or resume) are remembered, not
  shown.  The token is forgotten with the user (delete, a different account, a failed re-login).
* **Resume.**  On an extended connection with a token, the session re-identifies with
  ``7|NAME|TOKEN|LAST_SEQ`` instead of ``2|NAME``.  ``Resumed as NAME.`` gives
  :class:`Reidentified` with ``resumed=True`` (no summary note follows).  A refused token gives
  :class:`ResumeRefused` and an immediate fresh ``2|NAME`` login (the queue still waits for it);
  an unknown account gives :class:`ReidentifyFailed`, as a refused login does.
* **Exactly-once chat.**  Chat frames of an extended connection are ``SEQ|SENDER|TEXT``.  A chat
  whose SEQ is not above :attr:`ClientSession.last_seq` is dropped (:class:`DuplicateDropped`);
  the others become :class:`FrameReceived` with ``seq``.  After each received burst (one
  :meth:`~ClientSession.data_received` call) one cumulative ``0|ack|LAST_SEQ`` goes out.
* **Request ids.**  A send on an extended connection goes as ``0|send|RID|RECIPIENT|TEXT``.  The
  RID (``Pending.rid``: a random per-session prefix plus a counter) is chosen at the first write
  and kept for every retry, so a send the dead primary committed is acknowledged again by the
  new one but not delivered twice.  The 280-character limit applies to the op 3 equivalent, so
  every send that the seed would accept goes with a request id.
"""

from __future__ import annotations

import enum
import itertools
import random
import re
import secrets
import string
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..protocol import texts
from ..protocol.codec import (
    INDICATOR_CHAT,
    MAX_FRAME_BYTES,
    NEED_DATA,
    STATUS_NOTE,
    STATUS_OK,
    Frame,
    ProtocolError,
    ResponseDecoder,
)
from .commands import (
    OP_CREATE,
    OP_DELETE,
    OP_EXIT,
    OP_EXT,
    OP_LIST,
    OP_LOGIN,
    OP_RESUME,
    OP_SEND,
    Command,
)

__all__ = [
    "Server", "DEFAULT_SERVERS", "parse_server", "parse_servers", "Backoff", "State", "Pending",
    "Connect", "Send", "Disconnect",
    "Connecting", "Connected", "PrimaryConfirmed", "ConnectFailed", "ConnectionLost", "Redirected", "RetryScheduled",
    "AllServersDown", "FrameReceived", "UserChanged", "Reidentified", "ReidentifyFailed",
    "Negotiated", "ResumeRefused", "DuplicateDropped", "CreateRecovered", "retried_create_taken",
    "CommandQueued", "CommandSent", "CommandRequeued", "SessionClosed", "ClientSession",
    "BACKUP_NOTE_RE", "NO_PRIMARY_NOTE", "ALREADY_CONNECTED_TEXT", "PROBE_COMMAND",
    "EXT_COMMAND", "EXT_ANSWER", "RESUME_BAD_TOKEN_TEXT", "RESUME_UNKNOWN_TEXT",
]


class Server(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_SERVERS = (Server("127.0.0.1", 1538), Server("127.0.0.1", 2538), Server("127.0.0.1", 3538))


def parse_server(text: str) -> Server:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> Server; ValueError if malformed."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Server(host, int(port))


def parse_servers(text: str) -> tuple[Server, ...]:
    """Comma-separated ``HOST:PORT`` list; ValueError if empty or malformed."""
    servers = tuple(parse_server(part) for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError("no server given")
    return servers


# The backups' notes (status 2, indicator 0), specified by the replication design.
BACKUP_NOTE_RE = re.compile(r"This server is a backup\. The primary is at (?P<server>\S+:\d+)\.\Z")
NO_PRIMARY_NOTE = texts.T_BACKUP_UNKNOWN
ALREADY_CONNECTED_TEXT = texts.T_LOGIN_CONNECTED
CREATE_TAKEN_TEXT = texts.T_CREATE_TAKEN
_LOGGED_IN_RE = re.compile(r"(?:Account created! )?Logged in as (?P<name>.*)\.\Z", re.S)
_DELETED_RE = re.compile(r"Account (?P<name>.*) has been deleted\. You are now logged out\.\Z", re.S)
# Sent when there is nobody to log in again, to find out at once whether the server is a backup.
PROBE_COMMAND = Command(OP_LIST, ("|",), "")
# Extension 1 (docs/protocol.md, "Extension 1: sessions that survive failover").
EXT_COMMAND = Command(OP_EXT, ("ext", "1"), "")
EXT_ANSWER = texts.T_EXT
RESUME_BAD_TOKEN_TEXT = texts.T_RESUME_BAD_TOKEN
RESUME_UNKNOWN_TEXT = texts.T_RESUME_UNKNOWN
_TOKEN_PREFIX = "token|"
_RID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}\Z")
_RID_ALPHABET = string.ascii_letters + string.digits
_BASE36 = string.digits + string.ascii_lowercase


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = _BASE36[r] + digits
        if not n:
            return digits


def random_rid_prefix(length: int = 8) -> str:
    """A request-id prefix that another session of the same account will not pick (62**8)."""
    return "".join(secrets.choice(_RID_ALPHABET) for _ in range(length))


# A list line is "- " + a name of at most 32 characters of up to 4 bytes + "\n".
_LIST_CONTINUATION_SLACK = 2 + 32 * 4 + 1


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter".

    The n-th wait (n = 0, 1, ...) is drawn uniformly from [d/2, d] with
    ``d = min(cap, base * factor**n)``: never above the cap, never below half of it once the
    cap is reached (so a crowd of clients spreads out without anyone hammering a dead server)."""

    base: float = 0.5
    factor: float = 2.0
    cap: float = 5.0

    def ceiling(self, n: int) -> float:
        return min(self.cap, self.base * self.factor ** min(n, 64))

    def delay(self, n: int, rng: random.Random) -> float:
        d = self.ceiling(n)
        return d / 2 + rng.random() * d / 2


class State(enum.Enum):
    IDLE = "idle"                # not started yet
    CONNECTING = "connecting"    # a Connect is under way
    IDENTIFYING = "identifying"  # connected, re-identifying the user before sending the queue
    READY = "ready"              # connected; commands go out as they are submitted
    WAITING = "waiting"          # backing off before the next attempt (see retry_at)
    EXITING = "exiting"          # exit sent; waiting for the server to close
    CLOSED = "closed"            # done; nothing more will happen


@dataclass(eq=False)
class Pending:
    """A command on its way: queued, in flight, or retried.  Identity is the object itself."""

    command: Command
    request_id: int
    auto: bool = False        # sent by the session itself (re-identification), not the user
    attempts: int = 0         # how many times it has been written to a connection
    rid: str | None = None    # extension 1: the wire request id of a send, fixed at its first write

    def __repr__(self) -> str:
        rid = f" rid={self.rid}" if self.rid else ""
        return (f"Pending(#{self.request_id} {self.command}{' auto' if self.auto else ''}, "
                f"attempts={self.attempts}{rid})")


# ------------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Connect:
    """Open a TCP connection to ``server``; report connection_made or connect_failed."""

    server: Server


@dataclass(frozen=True)
class Send:
    """Write ``data`` on the current connection."""

    data: bytes


@dataclass(frozen=True)
class Disconnect:
    """Close the current connection (after a best-effort flush of pending output).  The
    driver reports nothing back for a connection the session closed itself."""


# ------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Connecting:
    server: Server
    redirected: bool = False   # the server is the primary a backup named


@dataclass(frozen=True)
class Connected:
    server: Server


@dataclass(frozen=True)
class PrimaryConfirmed:
    """``server`` answered a request, so it serves clients: it is the primary (or alone)."""

    server: Server


@dataclass(frozen=True)
class ConnectFailed:
    server: Server
    reason: str


@dataclass(frozen=True)
class ConnectionLost:
    server: Server
    reason: str


@dataclass(frozen=True)
class Redirected:
    """``server`` is a backup; ``primary`` is where it sent us (None: it knows no primary)."""

    server: Server
    primary: Server | None


@dataclass(frozen=True)
class RetryScheduled:
    """The next attempt goes to ``server`` at time ``at`` (``delay`` seconds from now)."""

    server: Server
    at: float
    delay: float


@dataclass(frozen=True)
class AllServersDown:
    """A whole round of attempts failed.  ``reachable`` servers answered, but only as backups
    without a usable primary; 0 means none could be reached at all."""

    attempts: int
    reachable: int
    retry_at: float


@dataclass(frozen=True)
class FrameReceived:
    """A frame from the server.  ``kind`` is "chat", "ok", "error" or "note".  ``answer_to``
    is the Pending this frame answers (for a login's summary note: the login), else None;
    ``answer_to.auto`` tells answers to the session's own re-login apart.  For chat frames
    ``sender`` and ``text`` are split out of ``frame.message``."""

    frame: Frame
    kind: str
    answer_to: Pending | None = None
    sender: str | None = None
    text: str | None = None
    seq: int | None = None     # extension 1: the chat's per-recipient sequence number

    @property
    def message(self) -> str:
        return self.frame.message


@dataclass(frozen=True)
class UserChanged:
    user: str | None


@dataclass(frozen=True)
class Reidentified:
    """The session logged ``user`` in again on a new connection to ``server``: ``resumed``
    (extension 1, op 7: same session, nothing missed or repeated) or by a plain login;
    ``fresh`` when that login followed a refused resume."""

    user: str
    server: Server
    resumed: bool = False
    fresh: bool = False


@dataclass(frozen=True)
class Negotiated:
    """The server answered ``0|ext|1``: ``extended`` tells whether it speaks extension 1."""

    server: Server
    extended: bool


@dataclass(frozen=True)
class ResumeRefused:
    """The server refused to resume ``user``'s session (``reason``: its answer); the session
    logs in afresh at once.  Chat already shown is still not shown twice (sequence numbers)."""

    user: str
    reason: str


@dataclass(frozen=True)
class CreateRecovered:
    """A create sent again after a reconnect was answered "already taken": most likely the
    first attempt was committed just before the connection broke, so the session logs in."""

    user: str


def retried_create_taken(pending: Pending | None, frame: Frame) -> bool:
    """Whether ``frame`` refuses a create that was sent more than once because the name is
    taken (the session then logs in instead: see :class:`CreateRecovered`)."""
    return (pending is not None and not pending.auto and pending.command.op == OP_CREATE
            and pending.attempts > 1 and frame.status != STATUS_OK
            and frame.message == CREATE_TAKEN_TEXT)


@dataclass(frozen=True)
class DuplicateDropped:
    """A chat with an already-seen sequence number arrived again and was not shown."""

    seq: int
    sender: str


@dataclass(frozen=True)
class ReidentifyFailed:
    """The automatic re-login was refused for good; the session is now logged out."""

    user: str
    reason: str


@dataclass(frozen=True)
class CommandQueued:
    """The command waits before it is sent: for a connection (``connected`` False), or for the
    re-login on a fresh connection to be answered (``connected`` True: a matter of moments)."""

    pending: Pending
    connected: bool = False


@dataclass(frozen=True)
class CommandSent:
    pending: Pending


@dataclass(frozen=True)
class CommandRequeued:
    """The command was in flight when the connection broke; it will be sent again."""

    pending: Pending


@dataclass(frozen=True)
class SessionClosed:
    """The session is over.  ``unsent`` commands never reached a server; ``unanswered`` ones
    were sent but their answers never came."""

    unsent: tuple[Pending, ...] = ()
    unanswered: tuple[Pending, ...] = ()


# ------------------------------------------------------------------------------------ session


@dataclass
class _Timers:
    retry: float | None = None       # WAITING: when to make the next attempt
    connect: float | None = None     # CONNECTING: give up on the attempt
    stable: float | None = None      # connected: when the connection counts as good
    identify: float | None = None    # IDENTIFYING: when to retry a refused re-login
    exit: float | None = None        # EXITING: stop waiting for the server to close


@dataclass
class ClientSession:
    """The client's connection logic; see the module docstring for the rules it keeps."""

    servers: tuple[Server, ...] = DEFAULT_SERVERS
    rng: random.Random = field(default_factory=random.Random)
    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 5.0
    stable_after: float = 2.0
    exit_grace: float = 2.0
    identify_retries: int = 5
    probe: bool = True
    extension: bool = True                 # negotiate extension 1 on every connection
    rid_prefix: str | None = None          # default: random_rid_prefix()

    def __post_init__(self) -> None:
        self.servers = tuple(Server(*s) for s in self.servers)
        if not self.servers:
            raise ValueError("a session needs at least one server")
        self.state = State.IDLE
        self.server: Server | None = None   # the server of the current/last attempt
        self.role: str | None = None        # "primary" once it served us, "backup" if it said so
        self.user: str | None = None
        self.retry_at: float | None = None
        self.all_down = False               # the last round reached no server at all
        self.no_primary = False             # the last round reached only backups
        self._index = 0                     # position in servers of the current attempt
        self._redirect: Server | None = None
        self._redirected_attempt = False    # the current attempt follows a backup's note
        self._failures = 0                  # attempts since the last good connection
        self._reachable = 0                 # of those, how many connected (but were backups)
        self._good = False
        self._timers = _Timers()
        self._queue: deque[Pending] = deque()
        self._in_flight: deque[Pending] = deque()
        self._identify: Pending | None = None
        self._identify_refusals = 0
        self._login_note: Pending | None = None   # a login whose summary note is still due
        # Extension 1.
        self.extended: bool | None = None   # the current connection speaks it (None: not known yet)
        self.resumed = False                # the current connection resumed the session (op 7)
        self.token: str | None = None       # the resume token of ``user``
        self.last_seq = 0                   # highest chat sequence number received for ``user``
        self.duplicates_dropped = 0
        self._negotiate: Pending | None = None
        self._barrier: Pending | None = None      # a retried create/login the queue waits for
        self._fresh_login = False           # the re-login in progress follows a refused resume
        self._ack_sent = 0                  # highest seq acknowledged on the current connection
        self._ack_due = False
        if self.rid_prefix is None:
            self.rid_prefix = random_rid_prefix()
        elif not _RID_RE.match(self.rid_prefix):
            raise ValueError(f"bad request id prefix {self.rid_prefix!r}")
        self._rids = itertools.count(1)
        self._list_open: Pending | None = None    # a list answer that may continue
        self._decoder: ResponseDecoder | None = None
        self._ids = itertools.count(1)
        self._actions: deque = deque()
        self._events: deque = deque()

    # ------------------------------------------------------------------- driver interface
    def take_actions(self) -> list:
        """Actions for the driver, oldest first (Connect / Send / Disconnect)."""
        actions = list(self._actions)
        self._actions.clear()
        return actions

    def take_events(self) -> list:
        """Events for the user interface, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (None: only on input)."""
        times = [t for t in vars(self._timers).values() if t is not None]
        return min(times) if times else None

    def start(self, now: float) -> None:
        """Make the first connection attempt."""
        if self.state is State.IDLE:
            self._connect(now, self.servers[self._index])

    def connection_made(self, now: float) -> None:
        if self.state is not State.CONNECTING:
            return
        self._timers.connect = None
        self._timers.stable = now + self.stable_after
        self._decoder = ResponseDecoder()
        self._good = False
        self.extended = None
        self.resumed = False
        self._ack_sent = 0
        self._ack_due = False
        self._events.append(Connected(self.server))
        self._actions.append(Send(b"\n"))       # declare line mode before any request
        if self.extension:
            # The first request asks for extension 1; like the probe, it makes a backup say so.
            self.state = State.IDENTIFYING
            self._negotiate = Pending(EXT_COMMAND, next(self._ids), auto=True)
            self._write(self._negotiate)
        else:
            self.extended = False
            self._begin_identify(now, self.probe)

    def connect_failed(self, now: float, reason: str) -> None:
        if self.state is not State.CONNECTING:
            return
        self._timers.connect = None
        self._events.append(ConnectFailed(self.server, reason))
        self._failures += 1
        self._advance()
        self._schedule(now)

    def data_received(self, data: bytes, now: float) -> None:
        if self._decoder is None or not data:
            return
        decoder = self._decoder
        try:
            decoder.receive_data(data)
            while self._decoder is decoder:         # stop if a frame made us drop the link
                frame = decoder.next_event()
                if frame is NEED_DATA:
                    break
                self._on_frame(frame, now)
        except ProtocolError as exc:
            self._actions.append(Disconnect())
            self._lost(now, f"protocol error: {exc}")
        self._send_ack()
        if self.state is State.READY:
            self._flush(now)  # an exit waiting for these answers goes out after their ack

    def _send_ack(self) -> None:
        """One cumulative acknowledgement per received burst (extension 1)."""
        if not self._ack_due or self._decoder is None or not self.extended:
            return
        self._ack_due = False
        self._ack_sent = self.last_seq
        self._actions.append(Send(Command(OP_EXT, ("ack", str(self.last_seq))).encode()))

    def connection_lost(self, now: float, reason: str = "connection closed") -> None:
        """The connection broke or the server closed it (not reported after a Disconnect)."""
        if self.state is State.CONNECTING:
            self.connect_failed(now, reason)
        elif self.state is State.EXITING:
            self._finish()
        elif self.state in (State.IDENTIFYING, State.READY):
            self._lost(now, reason)

    def tick(self, now: float) -> None:
        """Fire the timers that are due."""
        if self._due("stable", now):
            self._mark_good()
        if self._due("connect", now) and self.state is State.CONNECTING:
            self._actions.append(Disconnect())
            self.connect_failed(now, f"no answer within {self.connect_timeout:g} s")
        if self._due("retry", now) and self.state is State.WAITING:
            target = self._redirect or self.servers[self._index]
            redirected = self._redirect is not None
            self._redirect = None
            self._connect(now, target, redirected)
        if self._due("identify", now) and self.state is State.IDENTIFYING:
            self._write(self._identify)
        if self._due("exit", now) and self.state is State.EXITING:
            self._actions.append(Disconnect())
            self._finish()

    def _due(self, name: str, now: float) -> bool:
        """Whether timer ``name`` has expired; an expired timer is cleared either way, so a
        stale one can never keep the driver's loop spinning."""
        deadline = getattr(self._timers, name)
        if deadline is None or now < deadline:
            return False
        setattr(self._timers, name, None)
        return True

    # --------------------------------------------------------------------- user interface
    @property
    def connected(self) -> bool:
        return self.state in (State.IDENTIFYING, State.READY, State.EXITING)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def queued(self) -> tuple[Pending, ...]:
        return tuple(self._queue)

    @property
    def in_flight(self) -> tuple[Pending, ...]:
        return tuple(self._in_flight)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing unanswered: every answer the user waits for has come."""
        return not self._queue and self._answers_complete()

    def _answers_complete(self) -> bool:
        return (not self._in_flight and self._identify is None and self._negotiate is None
                and self._login_note is None and self._list_open is None)

    @property
    def negotiating(self) -> bool:
        """Connected, waiting for the answer to ``0|ext|1``."""
        return self._negotiate is not None

    def submit(self, command: Command, now: float) -> Pending | None:
        """Send ``command`` now if connected, else queue it.  ``exit`` goes out after whatever
        is queued before it; if nothing is queued and no connection is up, it ends the session
        at once.  Returns None (and does nothing) once the session is exiting or closed."""
        if self.state in (State.EXITING, State.CLOSED):
            return None
        pending = Pending(command, next(self._ids))
        if command.op == OP_EXIT and not self._queue \
                and self.state not in (State.READY, State.IDENTIFYING):
            self.close(now)              # nothing to wait for: do not connect just to leave
            return pending
        self._queue.append(pending)
        if self.state is State.READY:
            self._flush(now)
        else:
            self._events.append(CommandQueued(pending, self.connected))
        return pending

    def close(self, now: float) -> None:
        """End the session now (Ctrl-C): say exit to a connected server, drop the rest."""
        if self.state is State.CLOSED:
            return
        if self.state in (State.IDENTIFYING, State.READY):
            self._actions.append(Send(Command(OP_EXIT).encode()))
        if self.state in (State.CONNECTING, State.IDENTIFYING, State.READY, State.EXITING):
            self._actions.append(Disconnect())
        self._finish()

    def retry_now(self, now: float) -> None:
        """Skip the rest of a backoff wait (e.g. the user asked to reconnect)."""
        if self.state is State.WAITING:
            self._timers.retry = now
            self.tick(now)

    # ------------------------------------------------------------------------- internals
    def _connect(self, now: float, server: Server, redirected: bool = False) -> None:
        self.state = State.CONNECTING
        self.server = server
        self._redirected_attempt = redirected
        self.role = None
        self.retry_at = None
        self._timers.retry = None
        self._timers.connect = now + self.connect_timeout
        self._events.append(Connecting(server, redirected))
        self._actions.append(Connect(server))

    def _identify_command(self) -> Command | None:
        """The request that re-identifies this session on a new connection, or None: a resume
        ``7|NAME|TOKEN|LAST_SEQ`` on an extended connection with a token, else ``2|NAME``."""
        if self.user is None:
            return None
        if self.extended and self.token is not None:
            return Command(OP_RESUME, (self.user, self.token, str(self.last_seq)))
        return Command(OP_LOGIN, (self.user,))

    def _begin_identify(self, now: float, probe: bool = False) -> None:
        command = self._identify_command()
        self._identify_refusals = 0
        if command is None:
            self.state = State.READY
            if probe:
                # A backup says so only when it gets a request: ask something harmless now,
                # rather than sit on a backup until the user types.  No username can contain
                # "|", so this lists nothing.
                self._write(Pending(PROBE_COMMAND, next(self._ids), auto=True))
            self._flush(now)
            return
        self.state = State.IDENTIFYING
        self._identify = Pending(command, next(self._ids), auto=True)
        self._write(self._identify)

    def _write(self, pending: Pending) -> None:
        pending.attempts += 1
        self._in_flight.append(pending)
        self._actions.append(Send(self._wire(pending)))
        if not pending.auto:
            self._events.append(CommandSent(pending))

    def _wire(self, pending: Pending) -> bytes:
        """The bytes of ``pending`` on the current connection: a send with its request id on
        an extended connection (the same id on every attempt), else the command itself."""
        command = pending.command
        if command.op == OP_SEND and self.extended:
            if pending.rid is None:
                pending.rid = self.rid_prefix + _base36(next(self._rids))
            # The server counts the 280 characters on the op 3 equivalent (docs/protocol.md), so
            # the envelope never makes a send too long.
            return Command(OP_EXT, ("send", pending.rid, *command.params)).encode()
        return command.encode()

    def _flush(self, now: float) -> None:
        while self._queue and self.state is State.READY and self._barrier is None:
            if self._queue[0].command.op == OP_EXIT and not self._answers_complete():
                # ``exit`` waits for every answer (and a login's queued chat and note), so the
                # chat they bring is acknowledged before the server logs us out: chat that
                # arrived after our exit could be neither acknowledged nor shown once.
                break
            pending = self._queue.popleft()
            self._write(pending)
            if pending.command.op == OP_EXIT:
                self._in_flight.remove(pending)   # op 6 has no answer: the server closes
                self.state = State.EXITING
                self._timers.exit = now + self.exit_grace
            elif pending.command.op in (OP_CREATE, OP_LOGIN) and pending.attempts > 1:
                # A retried create/login: who we are afterwards depends on its answer (a create
                # the dead primary committed is answered "taken"), so the rest waits for it.
                self._barrier = pending

    def _mark_good(self) -> None:
        self._timers.stable = None
        if not self._good:
            self._good = True
            self._failures = 0
            self._reachable = 0
            self.all_down = self.no_primary = False

    def _on_frame(self, frame: Frame, now: float) -> None:
        """Every frame of the current connection comes through here, in order."""
        if frame.status == STATUS_NOTE and frame.indicator != INDICATOR_CHAT:
            match = BACKUP_NOTE_RE.match(frame.message)
            if match or frame.message == NO_PRIMARY_NOTE:
                self._on_backup_note(match, now)
                return
        self._mark_good()
        if self.role != "primary":
            self.role = "primary"
            self._events.append(PrimaryConfirmed(self.server))
        if frame.indicator == INDICATOR_CHAT:
            if self.extended:
                self._on_sequenced_chat(frame)
                return
            sender, _, text = frame.message.partition("|")
            self._events.append(FrameReceived(frame, "chat", None, sender, text))
            return
        if self.extended and frame.status == STATUS_OK and frame.message.startswith(_TOKEN_PREFIX):
            self.token = frame.message[len(_TOKEN_PREFIX):]      # not an answer: never shown
            return
        if frame.status == STATUS_NOTE:
            answer_to, self._login_note = self._login_note, None
            self._events.append(FrameReceived(frame, "note", answer_to))
            return
        kind = "ok" if frame.status == STATUS_OK else "error"
        opened = self._list_open
        if opened is not None:
            self._list_open = None
            if frame.status == STATUS_OK and frame.message.startswith("- "):
                self._events.append(FrameReceived(frame, kind, opened))
                self._check_list_continues(opened, frame)
                return
        pending = self._in_flight.popleft() if self._in_flight else None
        self._events.append(FrameReceived(frame, kind, pending))
        if pending is not None:
            self._on_answer(pending, frame, now)

    def _on_sequenced_chat(self, frame: Frame) -> None:
        """``SEQ|SENDER|TEXT``: show it once, in order; acknowledge it after the burst."""
        seq_text, sep, rest = frame.message.partition("|")
        if not sep or not (seq_text.isascii() and seq_text.isdigit()):
            sender, _, text = frame.message.partition("|")       # not numbered: show as is
            self._events.append(FrameReceived(frame, "chat", None, sender, text))
            return
        seq = int(seq_text)
        sender, _, text = rest.partition("|")
        if self.state is State.EXITING:
            # Our exit is on its way: the server has logged us out and will ignore an ack, so
            # this chat stays in the mailbox and comes at the next login.  Showing it now too
            # would show it twice.
            return
        if seq > self._ack_sent:
            self._ack_due = True
        if seq <= self.last_seq:
            self.duplicates_dropped += 1
            self._events.append(DuplicateDropped(seq, sender))
            return
        self.last_seq = seq
        self._events.append(FrameReceived(frame, "chat", None, sender, text, seq))

    def _check_list_continues(self, pending: Pending, frame: Frame) -> None:
        if len(frame.message.encode("utf-8")) >= MAX_FRAME_BYTES - _LIST_CONTINUATION_SLACK:
            self._list_open = pending

    def _on_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        op = pending.command.op
        barrier = pending is self._barrier
        if barrier:
            self._barrier = None
        if retried_create_taken(pending, frame):
            # Most likely our own create, committed just before the connection broke: log in.
            name = pending.command.params[0]
            self._events.append(CreateRecovered(name))
            self._set_user(name)
            self.state = State.IDENTIFYING
            self._identify_refusals = 0
            self._identify = Pending(Command(OP_LOGIN, (name,)), next(self._ids), auto=True)
            self._write(self._identify)
            return
        if pending is self._negotiate:
            self._negotiate = None
            self.extended = frame.status == STATUS_OK and frame.message == EXT_ANSWER
            self._events.append(Negotiated(self.server, self.extended))
            self._begin_identify(now)      # no probe needed: this server has just answered
        elif pending is self._identify:
            self._on_identify_answer(pending, frame, now)
        elif op in (OP_CREATE, OP_LOGIN) and frame.status == STATUS_OK:
            self._set_user(self._name_from(frame, pending))
            if op == OP_LOGIN:
                self._login_note = pending
        elif op == OP_DELETE and frame.status == STATUS_OK:
            self._set_user(None)
        elif op == OP_LIST and frame.status == STATUS_OK:
            self._check_list_continues(pending, frame)
        if barrier:
            self._flush(now)

    def _on_identify_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        """The answer to :meth:`_identify_command`'s request (a login or a resume)."""
        user = pending.command.params[0]
        resume = pending.command.op == OP_RESUME
        if frame.status == STATUS_OK:
            self._identify = None
            self.resumed = resume
            if not resume:
                self._login_note = pending        # a resume has no summary note
            self._events.append(Reidentified(user, self.server, resumed=resume,
                                             fresh=self._fresh_login and not resume))
            self._fresh_login = False
            self.state = State.READY
            self._flush(now)
            return
        if resume and frame.message != RESUME_UNKNOWN_TEXT:
            # The token is wrong or superseded (or the server cannot resume): log in afresh.
            # The queue keeps waiting; chat seen before is still dropped by sequence number.
            self.token = None
            self._fresh_login = True
            self._events.append(ResumeRefused(user, frame.message))
            self._identify = Pending(Command(OP_LOGIN, (user,)), next(self._ids), auto=True)
            self._write(self._identify)
            return
        if frame.message == ALREADY_CONNECTED_TEXT and self._identify_refusals < self.identify_retries:
            # Most likely our own previous connection, which that server has not noticed dead.
            self._timers.identify = now + self.backoff.delay(self._identify_refusals, self.rng)
            self._identify_refusals += 1
            return
        self._identify = None
        self._fresh_login = False
        self._events.append(ReidentifyFailed(user, frame.message))
        self._set_user(None)
        self.state = State.READY
        self._flush(now)

    @staticmethod
    def _name_from(frame: Frame, pending: Pending) -> str:
        match = _LOGGED_IN_RE.match(frame.message)
        return match.group("name") if match else pending.command.params[0]

    def _set_user(self, user: str | None) -> None:
        if user != self.user:
            self.user = user
            self.token = None               # a token and sequence numbers belong to one account
            self.last_seq = self._ack_sent = 0
            self._events.append(UserChanged(user))

    def _on_backup_note(self, match: re.Match | None, now: float) -> None:
        primary = None
        if match:
            try:
                primary = parse_server(match.group("server"))
            except ValueError:
                primary = None
        self.role = "backup"
        self._events.append(Redirected(self.server, primary))
        self._actions.append(Disconnect())
        self._reachable += 1
        if primary is not None:
            self._redirect = primary
            if primary in self.servers:
                self._index = self.servers.index(primary)
        self._lost(now, "server is a backup", report=False)

    def _lost(self, now: float, reason: str, report: bool = True) -> None:
        """The current connection is gone: requeue what was unanswered, plan the next try."""
        if self.state is State.EXITING:
            self._finish()
            return
        if report:
            self._events.append(ConnectionLost(self.server, reason))
        self._decoder = None
        self._timers.stable = self._timers.identify = None
        for pending in reversed(self._in_flight):
            if not pending.auto:
                self._queue.appendleft(pending)
        for pending in self._in_flight:
            if not pending.auto:
                self._events.append(CommandRequeued(pending))
        self._in_flight.clear()
        self._identify = self._login_note = self._list_open = self._negotiate = self._barrier = None
        self._ack_due = False
        self.resumed = False
        if self._good:
            self._failures = 0
            self._reachable = 0
        elif self._redirect is None or self._redirected_attempt:
            self._failures += 1     # a first redirect is a step forward; a chain of them is not
        self._good = False
        if self._redirect is None:
            self._advance()
        self._schedule(now)

    def _advance(self) -> None:
        self._index = (self._index + 1) % len(self.servers)

    def _schedule(self, now: float) -> None:
        """Plan the next attempt: at once within a round, after a backoff between rounds."""
        target = self._redirect or self.servers[self._index]
        n = len(self.servers)
        delay = 0.0
        if self._failures and self._failures % n == 0:
            delay = self.backoff.delay(self._failures // n - 1, self.rng)
            self.all_down, self.no_primary = self._reachable == 0, self._reachable > 0
            self._events.append(AllServersDown(self._failures, self._reachable, now + delay))
            self._reachable = 0
        self.state = State.WAITING
        self.retry_at = now + delay
        self._timers.retry = now + delay
        self._events.append(RetryScheduled(target, now + delay, delay))
        if delay == 0:
            self.tick(now)

    def _finish(self) -> None:
        unsent = tuple(p for p in self._queue if p.command.op != OP_EXIT)
        unanswered = tuple(p for p in self._in_flight if not p.auto)
        self._queue.clear()
        self._in_flight.clear()
        self._decoder = None
        self._timers = _Timers()
        self.retry_at = None
        self.state = State.CLOSED
        self._events.append(SessionClosed(unsent, unanswered))
