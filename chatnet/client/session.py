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

Extension 2 — passwords (``passwords=True``, off by default; ``bin/chatclient`` turns it on):

* **Negotiation.**  Right after ``ext|1``, the session asks ``0|ext|2``; ``ext|2`` makes
  :attr:`ClientSession.password_ext` true for this connection.  Nothing else is sent meanwhile.
* **Passwords on the wire only.**  A command the UI gave a ``secret`` (create, login, delete,
  passwd) goes as ``0|create|NAME|PW`` and so on when the connection negotiated extension 2,
  seed-style otherwise.  The password a create or login succeeded with is kept in memory
  (``ResumeState.password``, never in a :class:`Persist`) to log in again after a failover when
  the session cannot be resumed; a successful ``passwd`` replaces it.

Durable state (``saved=``, off by default; ``bin/chatclient`` turns it on):

* **Persist before the ack.**  With ``saved`` (a dict of account -> :class:`SavedResume`, what a
  previous run stored), every change of the resume state and every numbered chat accepted is
  handed to the driver as a :class:`Persist` action, placed *before* the ``0|ack|N`` that covers
  it; the driver makes it durable before it carries out the next action.  The session itself
  never touches a file.  ``exit`` forgets the token (the server clears it), a delete forgets
  the account.
* **Resume after a client restart.**  The user's ``login|NAME``, typed while nobody is logged
  in, goes as ``7|NAME|TOKEN|LAST_SEQ`` when a token for NAME is saved and the connection is
  extended, and holds the queue until answered: ``Resumed as NAME.`` logs in with the saved
  sequence number (chat after it follows, once); a refusal gives :class:`RestoreRefused` and
  an immediate fresh ``2|NAME``.  Any successful login of a saved account starts from its
  saved ``last_seq``, so chat stored before is not shown again.

``ClientSession`` itself only coordinates: it owns the connection state (:class:`State`, the
current server and its role, the timers, the frame decoder) and routes every input to the piece
that keeps the rule, turning the piece's verdict into actions and events:

* :mod:`.servers` — :class:`ServerChooser` (server choice, redirects, rounds) and :class:`Backoff`;
* :mod:`.identity` — :class:`ResumeState` (user, token, last sequence number: what a resume needs)
  and :class:`Handshake` (negotiation and re-identification on each new connection);
* :mod:`.outbox` — :class:`Outbox` (queue, in-flight commands, the retry barrier, request ids);
* :mod:`.acks` — :class:`AckTracker` (dropping repeated chat, one ack per burst);
* :mod:`.listing` — :class:`ListContinuation` (list answers spread over several frames);
* :mod:`.events` — the actions and events themselves.

The names those modules export that callers find here (``s.FrameReceived``, ``s.Backoff``,
``s.RESUME_BAD_TOKEN_TEXT``, ...) are still importable from this module.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field

from ..protocol import texts
from ..protocol.codec import (
    INDICATOR_CHAT,
    NEED_DATA,
    STATUS_ERROR,
    STATUS_NOTE,
    STATUS_OK,
    Frame,
    ProtocolError,
    ResponseDecoder,
)
from .acks import AckTracker, SequencedChat, parse_sequenced
from .commands import OP_CREATE, OP_DELETE, OP_EXIT, OP_LOGIN, OP_PASSWD, OP_RESUME, Command
from .events import (
    AllServersDown,
    CommandQueued,
    CommandRequeued,
    CommandSent,
    Connect,
    Connected,
    ConnectFailed,
    Connecting,
    ConnectionLost,
    CreateRecovered,
    Disconnect,
    DuplicateDropped,
    FrameReceived,
    Negotiated,
    Persist,
    PrimaryConfirmed,
    Redirected,
    Reidentified,
    ReidentifyFailed,
    RestoreRefused,
    ResumeRefused,
    RetryScheduled,
    Send,
    SessionClosed,
    UserChanged,
)
from .identity import (
    ALREADY_CONNECTED_TEXT,
    CREATE_TAKEN_TEXT,
    EXT_ANSWER,
    EXT_COMMAND,
    PASSWORDS_ANSWER,
    PASSWORDS_COMMAND,
    PROBE_COMMAND,
    RESUME_BAD_TOKEN_TEXT,
    RESUME_OTHER_HISTORY_TEXT,
    RESUME_UNKNOWN_TEXT,
    TOKEN_PREFIX,
    Handshake,
    ResumeState,
    SavedResume,
    Verdict,
    name_from,
    retried_create_taken,
)
from .listing import ListContinuation
from .outbox import Outbox, Pending, check_rid_prefix, random_rid_prefix
from .servers import (
    BACKUP_NOTE_RE,
    DEFAULT_SERVERS,
    NO_PRIMARY_NOTE,
    Backoff,
    Server,
    ServerChooser,
    backup_note,
    parse_server,
    parse_servers,
)

__all__ = [
    "Server", "DEFAULT_SERVERS", "parse_server", "parse_servers", "Backoff", "State", "Pending",
    "Connect", "Send", "Disconnect", "Persist", "RestoreRefused", "SavedResume",
    "Connecting", "Connected", "PrimaryConfirmed", "ConnectFailed", "ConnectionLost", "Redirected", "RetryScheduled",
    "AllServersDown", "FrameReceived", "UserChanged", "Reidentified", "ReidentifyFailed",
    "Negotiated", "ResumeRefused", "DuplicateDropped", "CreateRecovered", "retried_create_taken",
    "CommandQueued", "CommandSent", "CommandRequeued", "SessionClosed", "ClientSession",
    "BACKUP_NOTE_RE", "NO_PRIMARY_NOTE", "ALREADY_CONNECTED_TEXT", "CREATE_TAKEN_TEXT",
    "PROBE_COMMAND", "EXT_COMMAND", "EXT_ANSWER", "RESUME_BAD_TOKEN_TEXT", "RESUME_UNKNOWN_TEXT",
    "RESUME_OTHER_HISTORY_TEXT",
    "random_rid_prefix",
]


class State(enum.Enum):
    IDLE = "idle"                # not started yet
    CONNECTING = "connecting"    # a Connect is under way
    IDENTIFYING = "identifying"  # connected, re-identifying the user before sending the queue
    READY = "ready"              # connected; commands go out as they are submitted
    WAITING = "waiting"          # backing off before the next attempt (see retry_at)
    EXITING = "exiting"          # exit sent; waiting for the server to close
    CLOSED = "closed"            # done; nothing more will happen


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
    saved: dict[str, SavedResume] | None = None   # durable state on: what earlier runs stored
    passwords: bool = False                # negotiate extension 2 (passwords) after extension 1

    def __post_init__(self) -> None:
        self.servers = tuple(Server(*s) for s in self.servers)
        if not self.servers:
            raise ValueError("a session needs at least one server")
        if self.rid_prefix is None:
            self.rid_prefix = random_rid_prefix()
        check_rid_prefix(self.rid_prefix)
        self.state = State.IDLE
        self.server: Server | None = None   # the server of the current/last attempt
        self.role: str | None = None        # "primary" once it served us, "backup" if it said so
        self.retry_at: float | None = None
        self.extended: bool | None = None   # the connection speaks extension 1 (None: not known yet)
        self.password_ext = False           # the connection speaks extension 2 (passwords)
        self.resumed = False                # the current connection resumed the session (op 7)
        self.resume = ResumeState()         # who we are; outlives connections
        self._chooser = ServerChooser(self.servers, self.backoff, self.rng)
        self._outbox = Outbox(self.rid_prefix)
        self._handshake = Handshake(self.identify_retries)
        self._acks = AckTracker(self.resume)
        self._listing = ListContinuation()
        self._login_note: Pending | None = None   # a login whose summary note is still due
        self._timers = _Timers()
        self._unsaved: list[SequencedChat] = []    # durable state: chats for the next Persist
        self._dirty = False                         # durable state: the resume state changed
        self._decoder: ResponseDecoder | None = None
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
            self._connect(now, self._chooser.first())

    def connection_made(self, now: float) -> None:
        if self.state is not State.CONNECTING:
            return
        self._timers.connect = None
        self._timers.stable = now + self.stable_after
        self._decoder = ResponseDecoder()
        self._chooser.connected()
        self.extended = None
        self.password_ext = False
        self.resumed = False
        self._acks.connection_made()
        self._events.append(Connected(self.server))
        self._actions.append(Send(b"\n"))       # declare line mode before any request
        if self.extension:
            # The first request asks for extension 1; like the probe, it makes a backup say so.
            self.state = State.IDENTIFYING
            self._handshake.negotiate = self._outbox.new(EXT_COMMAND, auto=True)
            self._write(self._handshake.negotiate)
        else:
            self.extended = False
            self._begin_identify(now, self.probe)

    def connect_failed(self, now: float, reason: str) -> None:
        if self.state is not State.CONNECTING:
            return
        self._timers.connect = None
        self._events.append(ConnectFailed(self.server, reason))
        self._chooser.connect_failed()
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
        self._save()                       # durable before the ack that covers it
        self._send_ack()
        if self.state is State.READY:
            self._flush(now)  # an exit waiting for these answers goes out after their ack

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
            self._connect(now, *self._chooser.take_target())
        if self._due("identify", now) and self.state is State.IDENTIFYING:
            self._write(self._handshake.identify)
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
    def user(self) -> str | None:
        return self.resume.user

    @property
    def token(self) -> str | None:
        """Extension 1: the resume token of :attr:`user` (None: none yet, or forgotten)."""
        return self.resume.token

    @property
    def last_seq(self) -> int:
        """Extension 1: the highest chat sequence number received for :attr:`user`."""
        return self.resume.last_seq

    @property
    def duplicates_dropped(self) -> int:
        return self._acks.duplicates_dropped

    @property
    def all_down(self) -> bool:
        """The last round of attempts reached no server at all."""
        return self._chooser.all_down

    @property
    def no_primary(self) -> bool:
        """The last round of attempts reached only backups."""
        return self._chooser.no_primary

    @property
    def queued(self) -> tuple[Pending, ...]:
        return tuple(self._outbox.queue)

    @property
    def in_flight(self) -> tuple[Pending, ...]:
        return tuple(self._outbox.in_flight)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing unanswered: every answer the user waits for has come."""
        return not self._outbox.queue and self._answers_complete()

    @property
    def negotiating(self) -> bool:
        """Connected, waiting for the answer to ``0|ext|1``."""
        return self._handshake.negotiate is not None

    def submit(self, command: Command, now: float) -> Pending | None:
        """Send ``command`` now if connected, else queue it.  ``exit`` goes out after whatever
        is queued before it; if nothing is queued and no connection is up, it ends the session
        at once.  Returns None (and does nothing) once the session is exiting or closed."""
        if self.state in (State.EXITING, State.CLOSED):
            return None
        pending = self._outbox.new(command)
        if command.op == OP_EXIT and not self._outbox.queue \
                and self.state not in (State.READY, State.IDENTIFYING):
            self.close(now)              # nothing to wait for: do not connect just to leave
            return pending
        self._outbox.queue.append(pending)
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
            self._exiting()
            self._actions.append(Send(Command(OP_EXIT).encode()))
        if self.state in (State.CONNECTING, State.IDENTIFYING, State.READY, State.EXITING):
            self._actions.append(Disconnect())
        self._finish()

    def retry_now(self, now: float) -> None:
        """Skip the rest of a backoff wait (e.g. the user asked to reconnect)."""
        if self.state is State.WAITING:
            self._timers.retry = now
            self.tick(now)

    # ------------------------------------------------------------- connections and writes
    def _connect(self, now: float, server: Server, redirected: bool = False) -> None:
        self.state = State.CONNECTING
        self.server = server
        self._chooser.attempting(redirected)
        self.role = None
        self.retry_at = None
        self._timers.retry = None
        self._timers.connect = now + self.connect_timeout
        self._events.append(Connecting(server, redirected))
        self._actions.append(Connect(server))

    def _begin_identify(self, now: float, probe: bool = False) -> None:
        """Re-identify on this connection, or (nobody to log in) start sending the queue."""
        command = self.resume.identify_command(bool(self.extended))
        if command is not None:
            self.state = State.IDENTIFYING
            self._identify_with(command)
            return
        self._handshake.begin_identify(None)
        self.state = State.READY
        if probe:
            # A backup says so only when it gets a request: ask something harmless now,
            # rather than sit on a backup until the user types.  No username can contain
            # "|", so this lists nothing.
            self._write(self._outbox.new(PROBE_COMMAND, auto=True))
        self._flush(now)

    def _identify_with(self, command: Command) -> None:
        pending = self._outbox.new(command, auto=True)
        self._handshake.begin_identify(pending)
        self._write(pending)

    def _write(self, pending: Pending) -> None:
        if pending.command.op == OP_LOGIN and not pending.auto:
            pending.resume = self._restorable(pending)
        self._actions.append(Send(self._outbox.write(pending, bool(self.extended), self.password_ext)))
        if not pending.auto:
            self._events.append(CommandSent(pending))

    def _flush(self, now: float) -> None:
        """Write what the queue may send now (see :meth:`Outbox.next_ready`)."""
        while self.state is State.READY:
            pending = self._outbox.next_ready(self._answers_complete())
            if pending is None:
                return
            if pending.command.op == OP_EXIT:
                self._exiting()
            self._write(pending)
            if pending.command.op == OP_EXIT:
                self.state = State.EXITING
                self._timers.exit = now + self.exit_grace
            else:
                self._outbox.written(pending)

    def _send_ack(self) -> None:
        """One cumulative acknowledgement per received burst (extension 1)."""
        if self._decoder is None or not self.extended:
            return
        ack = self._acks.take_ack()
        if ack is not None:
            self._actions.append(Send(ack))

    def _answers_complete(self) -> bool:
        return (not self._outbox.in_flight and not self._handshake.busy
                and self._login_note is None and self._listing.open is None)

    def _mark_good(self) -> None:
        self._timers.stable = None
        self._chooser.mark_good()

    # ----------------------------------------------------------------------------- frames
    def _on_frame(self, frame: Frame, now: float) -> None:
        """Every frame of the current connection comes through here, in order."""
        note = backup_note(frame)
        if note is not None:
            self._on_backup_note(note.primary, now)
            return
        if frame.status == STATUS_ERROR and frame.message == texts.T_TLS_REQUIRED:
            # A plaintext client at a --require-tls server: show why, and let this count as a
            # failed connection (backed off), not a good one to reconnect to at once.
            self._events.append(FrameReceived(frame, "error", None))
            return
        self._mark_good()
        if self.role != "primary":
            self.role = "primary"
            self._events.append(PrimaryConfirmed(self.server))
        if frame.indicator == INDICATOR_CHAT:
            self._on_chat(frame)
        elif self.extended and frame.status == STATUS_OK and frame.message.startswith(TOKEN_PREFIX):
            self._set_token(frame.message[len(TOKEN_PREFIX):])        # not an answer: never shown
        elif frame.status == STATUS_NOTE:
            answer_to, self._login_note = self._login_note, None
            self._events.append(FrameReceived(frame, "note", answer_to))
        else:
            self._on_server_frame(frame, now)

    def _on_server_frame(self, frame: Frame, now: float) -> None:
        """A status-0/1 server frame: a list's continuation, or the answer to the oldest request."""
        kind = "ok" if frame.status == STATUS_OK else "error"
        opened = self._listing.continued(frame)
        if opened is not None:
            self._events.append(FrameReceived(frame, kind, opened))
            return
        pending = self._outbox.answered()
        self._events.append(FrameReceived(frame, kind, pending))
        if pending is not None:
            self._on_answer(pending, frame, now)

    def _on_chat(self, frame: Frame) -> None:
        """A chat: numbered on an extended connection (shown once, in order, acknowledged after
        the burst), else ``SENDER|TEXT``."""
        chat = parse_sequenced(frame.message) if self.extended else None
        if chat is None:
            sender, _, text = frame.message.partition("|")       # not numbered: show as is
            self._events.append(FrameReceived(frame, "chat", None, sender, text))
            return
        if self.state is State.EXITING:
            # Our exit is on its way: the server has logged us out and will ignore an ack, so
            # this chat stays in the mailbox and comes at the next login.  Showing it now too
            # would show it twice.
            return
        if self._acks.receive(chat.seq):
            if self.saved is not None:
                self._unsaved.append(chat)
                self._dirty = True
            self._events.append(FrameReceived(frame, "chat", None, chat.sender, chat.text, chat.seq))
        else:
            self._events.append(DuplicateDropped(chat.seq, chat.sender))

    def _on_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        released = self._outbox.release(pending)
        if retried_create_taken(pending, frame):
            # Most likely our own create, committed just before the connection broke: log in.
            name = pending.command.params[0]
            self._events.append(CreateRecovered(name))
            self._set_user(name)
            self.resume.password = pending.command.secret[0] if pending.command.secret else None
            self.state = State.IDENTIFYING
            self._identify_with(Command(OP_LOGIN, (name,), secret=pending.command.secret))
            return
        if pending is self._handshake.negotiate:
            self._on_negotiated(frame, now)
        elif pending is self._handshake.identify:
            self._on_identify_answer(pending, frame, now)
        elif pending.resume is not None and pending.command.op == OP_LOGIN:
            self._on_restore_answer(pending, frame)
        elif frame.status == STATUS_OK:
            self._on_user_answer(pending, frame)
        if released:
            self._flush(now)

    def _on_negotiated(self, frame: Frame, now: float) -> None:
        asked, self._handshake.negotiate = self._handshake.negotiate, None
        if asked.command == PASSWORDS_COMMAND:
            self.password_ext = frame.status == STATUS_OK and frame.message == PASSWORDS_ANSWER
        else:
            self.extended = frame.status == STATUS_OK and frame.message == EXT_ANSWER
            self._events.append(Negotiated(self.server, self.extended))
            if self.extended and self.passwords:  # extension 2 next, before anything else
                self._handshake.negotiate = self._outbox.new(PASSWORDS_COMMAND, auto=True)
                self._write(self._handshake.negotiate)
                return
        self._begin_identify(now)      # no probe needed: this server has just answered

    def _on_identify_answer(self, pending: Pending, frame: Frame, now: float) -> None:
        """The answer to the re-identifying request (a login or a resume)."""
        user = pending.command.params[0]
        verdict = self._handshake.judge(frame)
        if verdict in (Verdict.DONE, Verdict.DONE_FRESH):
            self.resumed = pending.command.op == OP_RESUME
            if not self.resumed:
                self._login_note = pending        # a resume has no summary note
            self._events.append(Reidentified(user, self.server, resumed=self.resumed,
                                             fresh=verdict is Verdict.DONE_FRESH))
        elif verdict is Verdict.FRESH_LOGIN:
            # The queue keeps waiting; chat seen before is still dropped by sequence number --
            # unless our numbers are another side's (a healed split brain): then from 0 again.
            self.resume.token = None
            if frame.message == RESUME_OTHER_HISTORY_TEXT:
                self._forget_seq()
            self._events.append(ResumeRefused(user, frame.message))
            self._identify_with(self.resume.identify_command(False))  # 2|NAME, or with the password
            return
        elif verdict is Verdict.RETRY_LATER:
            self._timers.identify = now + self.backoff.delay(self._handshake.refusals - 1, self.rng)
            return
        else:
            self._events.append(ReidentifyFailed(user, frame.message))
            self._set_user(None)
        self.state = State.READY
        self._flush(now)

    def _on_user_answer(self, pending: Pending, frame: Frame) -> None:
        """A success answer to one of the user's commands (or the probe): who we are now."""
        op = pending.command.op
        if op in (OP_CREATE, OP_LOGIN):
            self._set_user(name_from(frame, pending))
            self.resume.password = pending.command.secret[0] if pending.command.secret else None
            if op == OP_LOGIN:
                self._login_note = pending
                self._restore_seq()
        elif op == OP_DELETE:
            self._forget()
        elif op == OP_PASSWD:
            self.resume.password = pending.command.secret[1] if len(pending.command.secret) > 1 else None
        else:
            self._listing.answered(pending, frame)

    def _set_user(self, user: str | None) -> None:
        self._save()                    # what belongs to the previous account goes first
        if self.resume.switch(user):
            self._acks.account_changed()
            self._dirty = user is not None
            self._events.append(UserChanged(user))

    # ---------------------------------------------------------------------- durable state
    def _restorable(self, pending: Pending) -> SavedResume | None:
        """The saved state to resume with instead of logging in, or None: only for the user's
        login while nobody is logged in, on an extended connection, with a saved token."""
        if self.saved is None or pending.fresh or not self.extended or self.resume.user is not None:
            return None
        saved = self.saved.get(pending.command.params[0])
        return saved if saved is not None and saved.token else None

    def _on_restore_answer(self, pending: Pending, frame: Frame) -> None:
        """The answer to a login written as a resume: logged in where the last run left off, or
        refused (log in afresh at once, ahead of the queue)."""
        name = pending.command.params[0]
        if frame.status == STATUS_OK:
            self._set_user(name)
            self.resume.password = pending.command.secret[0] if pending.command.secret else None
            self.resume.token = pending.resume.token
            self._restore_seq()
            self.resumed = True
            return
        self._events.append(RestoreRefused(name, frame.message))
        saved = self.saved.get(name)
        if frame.message == RESUME_UNKNOWN_TEXT:
            self.saved.pop(name, None)
            self._actions.append(Persist(name, None, 0, forget=True))
        elif frame.message == RESUME_OTHER_HISTORY_TEXT:
            self.saved[name] = SavedResume(None, 0)
            self._actions.append(Persist(name, None, 0))
        elif saved is not None:
            self.saved[name] = SavedResume(None, saved.last_seq)
        again = self._outbox.new(pending.command)
        again.fresh = True
        self._outbox.queue.appendleft(again)

    def _forget_seq(self) -> None:
        """Our sequence numbers mean nothing on this server (they number another side's
        mailbox): take every chat it sends, from 0 again, and save that."""
        self.resume.last_seq = 0
        self._acks.account_changed()
        if self.saved is not None and self.resume.user is not None:
            self.saved[self.resume.user] = SavedResume(None, 0)
        self._dirty = True

    def _restore_seq(self) -> None:
        """A saved account logged in: chat up to its saved sequence number was shown before."""
        saved = self.saved.get(self.resume.user) if self.saved is not None else None
        if saved is not None and saved.last_seq > self.resume.last_seq:
            self.resume.last_seq = saved.last_seq

    def _set_token(self, token: str | None) -> None:
        if token != self.resume.token:
            self.resume.token = token
            self._dirty = True

    def _exiting(self) -> None:
        """The exit is about to go: the server clears the token, so the saved one goes too."""
        self._set_token(None)
        self._save()

    def _forget(self) -> None:
        """Our account was deleted: its saved resume state goes."""
        user = self.resume.user
        self._set_user(None)
        if self.saved is not None and user is not None:
            self.saved.pop(user, None)
            self._actions.append(Persist(user, None, 0, forget=True))

    def _save(self) -> None:
        """Hand what changed to the driver as one Persist (durable state on), before any action
        that follows, an acknowledgement in particular."""
        if self.saved is None or not self._dirty:
            return
        user, self._dirty = self.resume.user, False
        chats, self._unsaved = tuple(self._unsaved), []
        if user is None:
            return
        self.saved[user] = SavedResume(self.resume.token, self.resume.last_seq)
        self._actions.append(Persist(user, self.resume.token, self.resume.last_seq, chats))

    # --------------------------------------------------------------------- losing the link
    def _on_backup_note(self, primary: Server | None, now: float) -> None:
        self.role = "backup"
        self._events.append(Redirected(self.server, primary))
        self._actions.append(Disconnect())
        self._chooser.redirected(primary)
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
        for pending in self._outbox.requeue():
            self._events.append(CommandRequeued(pending))
        self._handshake.connection_lost()
        self._acks.connection_lost()
        self._login_note = None
        self._listing.open = None
        self.resumed = False
        self._chooser.lost()
        self._schedule(now)

    def _schedule(self, now: float) -> None:
        """Plan the next attempt: at once within a round, after a backoff between rounds."""
        retry = self._chooser.plan()
        at = now + retry.delay
        if retry.round_over:
            self._events.append(AllServersDown(retry.attempts, retry.reachable, at))
        self.state = State.WAITING
        self.retry_at = at
        self._timers.retry = at
        self._events.append(RetryScheduled(retry.server, at, retry.delay))
        if retry.delay == 0:
            self.tick(now)

    def _finish(self) -> None:
        unsent, unanswered = self._outbox.drain()
        self._decoder = None
        self._timers = _Timers()
        self.retry_at = None
        self.state = State.CLOSED
        self._events.append(SessionClosed(unsent, unanswered))
