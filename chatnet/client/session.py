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
  re-identifies (op 2 login) and sends nothing else until that is answered.  With nobody to
  log in, it sends a probe instead (``4||``, a list that matches no valid name), since a
  backup only reveals itself when it receives a request.  If the server
  says the account is still connected (our own dead connection, not yet noticed), the login is
  retried with backoff a few times.
* **Nothing typed is dropped silently.**  Commands submitted while not connected (or while
  re-identifying) wait in a queue, in order, and are sent after the re-login.  Commands that
  were sent but not answered when a connection broke go back to the front of that queue and
  are sent again (at-least-once: the seed protocol has no request ids, so a command the old
  server executed just before dying may run twice — see "Extension points").  Commands still
  queued when the session is closed are reported in :class:`SessionClosed`.
* **Answers are matched in order.**  The server answers each request with exactly one frame of
  status 0 or 1 and indicator 0, in request order (a long list answer may continue in further
  frames starting with ``- ``).  A successful login is followed, after any queued chat, by one
  status-2 summary note.  Chat frames (indicator 1) can arrive at any time.

Extension points for session resume and exactly-once chat (issue 4):

* :meth:`ClientSession._identify_command` builds the request that re-identifies a session on a
  new connection (today ``2|name``); a resume extension returns ``7|name|token|last_seq`` and
  :meth:`ClientSession._on_identify_answer` handles its answer.
* Every :class:`Pending` carries ``request_id``, unique per session, and ``attempts``: a retry
  after a reconnect is the same Pending object, so a request-id extension can put the id on the
  wire and the server can acknowledge a duplicate without executing it twice.
* :meth:`ClientSession._on_frame` is the single entry point for frames, where sequence numbers
  would be recorded before a chat is handed to the UI.
"""

from __future__ import annotations

import enum
import itertools
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..codec import (
    INDICATOR_CHAT,
    MAX_FRAME_BYTES,
    NEED_DATA,
    STATUS_NOTE,
    STATUS_OK,
    Frame,
    ProtocolError,
    ResponseDecoder,
)
from .commands import OP_CREATE, OP_DELETE, OP_EXIT, OP_LIST, OP_LOGIN, Command

__all__ = [
    "Server", "DEFAULT_SERVERS", "parse_server", "parse_servers", "Backoff", "State", "Pending",
    "Connect", "Send", "Disconnect",
    "Connecting", "Connected", "PrimaryConfirmed", "ConnectFailed", "ConnectionLost", "Redirected", "RetryScheduled",
    "AllServersDown", "FrameReceived", "UserChanged", "Reidentified", "ReidentifyFailed",
    "CommandQueued", "CommandSent", "CommandRequeued", "SessionClosed", "ClientSession",
    "BACKUP_NOTE_RE", "NO_PRIMARY_NOTE", "ALREADY_CONNECTED_TEXT", "PROBE_COMMAND",
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
NO_PRIMARY_NOTE = "This server is a backup and knows no primary yet. Try again shortly."
ALREADY_CONNECTED_TEXT = "Unable to login: This user is already connected to the server."
_LOGGED_IN_RE = re.compile(r"(?:Account created! )?Logged in as (?P<name>.*)\.\Z", re.S)
_DELETED_RE = re.compile(r"Account (?P<name>.*) has been deleted\. You are now logged out\.\Z", re.S)
# Sent when there is nobody to log in again, to find out at once whether the server is a backup.
PROBE_COMMAND = Command(OP_LIST, ("|",), "")
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

    def __repr__(self) -> str:
        return f"Pending(#{self.request_id} {self.command}{' auto' if self.auto else ''}, attempts={self.attempts})"


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

    @property
    def message(self) -> str:
        return self.frame.message


@dataclass(frozen=True)
class UserChanged:
    user: str | None


@dataclass(frozen=True)
class Reidentified:
    """The session logged ``user`` in again on a new connection to ``server``."""

    user: str
    server: Server


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
        self._events.append(Connected(self.server))
        self._actions.append(Send(b"\n"))       # declare line mode before any request
        self._begin_identify(now)

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
        return (not self._queue and not self._in_flight and self._identify is None
                and self._login_note is None and self._list_open is None)

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
        """The request that re-identifies this session on a new connection, or None.

        Extension point: a session-resume extension returns op 7 with name, token and the
        last sequence number received instead of a plain login."""
        return Command(OP_LOGIN, (self.user,)) if self.user is not None else None

    def _begin_identify(self, now: float) -> None:
        command = self._identify_command()
        self._identify_refusals = 0
        if command is None:
            self.state = State.READY
            if self.probe:
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
        self._actions.append(Send(pending.command.encode()))
        if not pending.auto:
            self._events.append(CommandSent(pending))

    def _flush(self, now: float) -> None:
        while self._queue and self.state is State.READY:
            pending = self._queue.popleft()
            self._write(pending)
            if pending.command.op == OP_EXIT:
                self._in_flight.remove(pending)   # op 6 has no answer: the server closes
                self.state = State.EXITING
                self._timers.exit = now + self.exit_grace

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
            sender, _, text = frame.message.partition("|")
            self._events.append(FrameReceived(frame, "chat", None, sender, text))
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

    def _check_list_continues(self, pending: Pending, frame: Frame) -> None:
        if len(frame.message.encode("utf-8")) >= MAX_FRAME_BYTES - _LIST_CONTINUATION_SLACK:
            self._list_open = pending

    def _on_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        op = pending.command.op
        if pending is self._identify:
            self._on_identify_answer(pending, frame, now)
        elif op in (OP_CREATE, OP_LOGIN) and frame.status == STATUS_OK:
            self._set_user(self._name_from(frame, pending))
            if op == OP_LOGIN:
                self._login_note = pending
        elif op == OP_DELETE and frame.status == STATUS_OK:
            self._set_user(None)
        elif op == OP_LIST and frame.status == STATUS_OK:
            self._check_list_continues(pending, frame)

    def _on_identify_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        """The answer to :meth:`_identify_command`'s request (extension point for op 7)."""
        user = pending.command.params[0]
        if frame.status == STATUS_OK:
            self._identify = None
            self._login_note = pending
            self._events.append(Reidentified(user, self.server))
            self.state = State.READY
            self._flush(now)
            return
        if frame.message == ALREADY_CONNECTED_TEXT and self._identify_refusals < self.identify_retries:
            # Most likely our own previous connection, which that server has not noticed dead.
            self._timers.identify = now + self.backoff.delay(self._identify_refusals, self.rng)
            self._identify_refusals += 1
            return
        self._identify = None
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
        self._identify = self._login_note = self._list_open = None
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
