"""Workload clients for multi-process tests and the chaos runner (``bench/chaos.py``).

* :class:`SimUser` — one person using *our* client library (``chatnet.client``:
  ``ClientSession`` + ``SocketDriver``, extension 1: resume, acks, request ids), driven by a
  thread of its own.  ``tests/test_failover_sessions.py`` uses it directly; the chaos runner
  drives it through :class:`ExtWorker`.
* :class:`SeedClient` — a seed-style client: raw socket, one request per ``send()`` and no
  terminator, no extension.  It finds the primary by trying the servers in order and following
  the backups' note ``This server is a backup. The primary is at HOST:PORT.``, logs in again
  with ``2|NAME`` on every new connection, and sends an unanswered request again there
  (at-least-once, like the seed's reference client).
* :class:`History` — a thread-safe, time-stamped JSON-lines record of every request
  (``invoke``), its outcome (``ok`` / ``fail`` / ``unknown``) and every chat delivery; the
  chaos checker reads it.
* :class:`ExtWorker` / :class:`SeedWorker` — a bounded, seeded client behaviour for the chaos
  runner: sessions of creates or logins, sends and lists, ended by ``exit``, with offline pauses
  between them, over a few accounts of their own; and a final :meth:`Worker.drain` that logs
  every account in once more and reads its whole mailbox.

Standard library only (plus ``chatnet`` itself).
"""

from __future__ import annotations

import itertools
import json
import queue
import random
import re
import ssl
import threading
import time

from chatnet.client import Backoff, ClientSession, SocketDriver, parse_command
from chatnet.client import session as s
from chatnet.protocol.codec import ProtocolError
from chatnet.testing import FrameTimeout, RawClient, WaitTimeout, wait_until

__all__ = ["History", "SimUser", "SeedClient", "Worker", "ExtWorker", "SeedWorker", "Registry",
           "wait_for", "REDIRECT_RE", "NO_PRIMARY_TEXT"]

REDIRECT_RE = re.compile(r"This server is a backup\. The primary is at (\S+):(\d+)\.\Z")
NO_PRIMARY_TEXT = "This server is a backup and knows no primary yet. Try again shortly."
CREATE_TAKEN = "Unable to create account: This username is already taken."
ALREADY_CONNECTED = "Unable to login: This user is already connected to the server."
LOGIN_UNKNOWN_PREFIX = "Unable to login: This username does not exist."


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    """``chatnet.testing.wait_until`` as a yes/no answer: a chaos client (and the runner) goes
    on after a timeout and records the outcome as unknown, rather than failing."""
    try:
        wait_until(predicate, timeout, interval=interval)
        return True
    except WaitTimeout:
        return False


# ------------------------------------------------------------------------------- history


class History:
    """Time-stamped JSON lines, one per event, written in the order they happened.

    Every record has ``t`` (seconds since the history began, monotonic clock) and ``type``:
    ``invoke`` (a request: ``op`` id, ``client``, ``run``, ``kind`` ext/seed, ``user``, ``f``
    create/login/send/list/logout, for sends ``to`` and ``msg``), ``ok`` / ``fail`` /
    ``unknown`` (its outcome: ``op``, ``answer``; ``server``, the replica that answered, on
    ``ok`` and ``fail``), ``deliver`` (a chat shown to ``user`` by
    client run ``run``: ``from``, ``msg``, ``seq`` for our client), and the runner's own
    ``meta``, ``nemesis``, ``phase``, ``drain``, ``status`` and ``client`` records."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._file = open(path, "w", encoding="utf-8", buffering=1) if path else None
        self._ops = itertools.count(1)
        self.records: list[dict] = []

    def write(self, type_: str, **fields) -> dict:
        with self._lock:
            record = {"t": round(time.monotonic() - self.t0, 6), "type": type_, **fields}
            self.records.append(record)
            if self._file is not None:
                self._file.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
            return record

    def invoke(self, **fields) -> int:
        op = next(self._ops)
        self.write("invoke", op=op, **fields)
        return op

    def result(self, op: int, outcome: str, **fields) -> None:
        assert outcome in ("ok", "fail", "unknown"), outcome
        self.write(outcome, op=op, **fields)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class Registry:
    """Accounts known to exist (their create or a login was acknowledged), shared by workers:
    sends only go to these, so "Recipient username cannot be found." would mean a lost account."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: list[str] = []

    def add(self, name: str) -> None:
        with self._lock:
            if name not in self._names:
                self._names.append(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)


# ------------------------------------------------------------------------------ our client


class SimUser:
    """One person using our client library, driven by a thread of its own.

    With ``chatting`` set it sends ``NAME#i`` to its ``peers`` in turn, keeping at most
    ``window`` commands unanswered (queued or in flight), until ``limit`` sends.

    With a ``history``, every send (``chatting`` or :meth:`send`) and every :meth:`request` is
    recorded as an ``invoke`` and its answer as ``ok``/``fail`` (``unknown`` if none came before
    :meth:`stop`), and every chat shown as a ``deliver`` of client run ``run``.

    ``tls`` (a client ``ssl.SSLContext``) makes every connection TLS, as ``chatclient --tls-ca``
    does: the same ``SocketDriver(tls=)``, so the chaos runner's ``--tls`` drives the product's
    own handshake path."""

    def __init__(self, name, addresses, peers=(), window=3, limit=10_000, *, history: History | None = None,
                 run: str | None = None, client: str | None = None, tls: ssl.SSLContext | None = None):
        self.name = name
        self.peers = list(peers)
        self.window = window
        self.limit = limit
        self.history = history
        self.run = run or name
        self.client = client or name
        self.session = ClientSession(tuple(addresses), rng=random.Random(),
                                     backoff=Backoff(base=0.05, cap=0.5), connect_timeout=2.0)
        self.driver = SocketDriver(self.session, tls=tls)
        self.lock = threading.Lock()
        self.chatting = threading.Event()
        self.held = threading.Event()        # set: the client's network I/O is frozen
        self._stop = threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._sends: dict[int, tuple[str, str]] = {}      # id(Pending) -> (recipient, text)
        self._ops: dict = {}                               # Pending -> (op id, function)
        self.outcomes: dict[int, str] = {}                 # op id -> ok / fail / unknown
        self.answers: dict[int, str] = {}                  # op id -> the answer's text
        self.noted: set[int] = set()                       # login op ids whose summary note came
        self.sent = 0
        self.received: list[tuple[str, str, int | None]] = []   # (sender, text, seq)
        self.acked: list[tuple[str, str, float]] = []             # (recipient, text, when)
        self.errors: list[str] = []                                # error answers to our sends
        self.events: list = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"user-{name}", daemon=True)
        self.thread.start()

    # test thread side ----------------------------------------------------------------------
    def call(self, fn, timeout=10.0):
        """Run ``fn(session, now)`` in the user's thread; return its result."""
        done = queue.SimpleQueue()
        self._calls.put((fn, done))
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def submit(self, line):
        command = parse_command(line)
        return self.call(lambda session, now: session.submit(command, now))

    def send(self, recipient: str, text: str) -> int | None:
        """Submit ``send|recipient|text`` (recorded); return its op id (None: session over)."""
        def fn(session, now):
            pending = session.submit(parse_command(f"send|{recipient}|{text}"), now)
            if pending is None:
                return None
            self._sends[id(pending)] = (recipient, text)
            return self._track(pending, "send", to=recipient, msg=text)
        return self.call(fn)

    def request(self, line: str, f: str) -> int | None:
        """Submit a command line (create/login/list/exit), recorded as function ``f``."""
        command = parse_command(line)

        def fn(session, now):
            pending = session.submit(command, now)
            if pending is None:
                return None
            return self._track(pending, f, line=line)
        return self.call(fn)

    def outstanding(self) -> int:
        return self.call(lambda session, now: len(session.queued) + len(session.in_flight))

    def outcome(self, op: int | None) -> str | None:
        with self.lock:
            return self.outcomes.get(op)

    def snapshot(self, attr):
        with self.lock:
            return list(getattr(self, attr))

    def of(self, kind):
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]

    def idle(self):
        return self.call(lambda session, now: session.idle and session.state is s.State.READY)

    def wait_logged_in(self, timeout=15.0):
        wait_until(lambda: self.call(lambda session, now: session.user == self.name
                                     and session.idle and session.state is s.State.READY),
                   timeout, what=f"{self.name} logged in", interval=0.02)

    def stop(self):
        self.chatting.clear()
        self._stop.set()
        self.thread.join(timeout=10)
        self.driver.close()
        if self.history is not None:
            with self.lock:
                left = [(op, f) for op, f in self._ops.values() if op not in self.outcomes]
                for op, _ in left:
                    self.outcomes[op] = "unknown"
            for op, f in left:
                self.history.result(op, "ok" if f == "logout" else "unknown",
                                    answer="client stopped before an answer")

    # user thread side ----------------------------------------------------------------------
    def _track(self, pending, f: str, **fields) -> int | None:
        if self.history is None:
            return None
        op = self.history.invoke(client=self.client, run=self.run, kind="ext", user=self.name, f=f, **fields)
        self._ops[pending] = (op, f)
        return op

    def _run(self):
        try:
            self._record(self.driver.start())
            while not self._stop.is_set():
                while True:
                    try:
                        fn, done = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        result = fn(self.session, self.driver.clock())
                        self.driver.pump()
                        self._record(self.driver.take_events())
                        done.put((True, result))
                    except BaseException as exc:   # noqa: BLE001 - handed to the test thread
                        done.put((False, exc))
                if self.held.is_set():
                    self._stop.wait(0.01)
                    continue
                if self.chatting.is_set():
                    self._chat()
                self._record(self.driver.step(0.01))
        except BaseException as exc:   # noqa: BLE001
            self.error = exc
            raise

    def _chat(self):
        session = self.session
        while (self.sent < self.limit and len(session.queued) + len(session.in_flight) < self.window
               and session.state is not s.State.CLOSED):
            recipient = self.peers[self.sent % len(self.peers)]
            text = f"{self.name}#{self.sent}"
            pending = session.submit(parse_command(f"send|{recipient}|{text}"), self.driver.clock())
            self._sends[id(pending)] = (recipient, text)
            self._track(pending, "send", to=recipient, msg=text)
            self.sent += 1
        self.driver.pump()

    def _record(self, events):
        now = time.monotonic()
        history = self.history
        with self.lock:
            for e in events:
                self.events.append(e)
                if history is not None:
                    self._history_event(e)
                if not isinstance(e, s.FrameReceived):
                    continue
                if e.kind == "chat":
                    self.received.append((e.sender, e.text, e.seq))
                elif e.answer_to is not None and id(e.answer_to) in self._sends:
                    recipient, text = self._sends.pop(id(e.answer_to))
                    if e.kind == "ok" and e.message == f"Message sent to {recipient}.":
                        self.acked.append((recipient, text, now))
                    else:
                        self.errors.append(f"{text}: {e.message}")

    def _history_event(self, e) -> None:
        """Record ``e`` (called with ``self.lock`` held, in the user's thread)."""
        history = self.history
        if isinstance(e, s.FrameReceived):
            if e.kind == "chat":
                history.write("deliver", user=self.session.user or self.name, run=self.run, kind="ext",
                              **{"from": e.sender}, msg=e.text, seq=e.seq)
                return
            tracked = self._ops.get(e.answer_to) if e.answer_to is not None else None
            if tracked is None:
                return
            op, f = tracked
            if e.kind == "note":
                self.noted.add(op)
                return
            if op in self.outcomes:
                return                                   # a list answer's continuation
            if s.retried_create_taken(e.answer_to, e.frame):
                outcome = "ok"                            # our own first attempt created it
            else:
                outcome = "ok" if e.kind == "ok" else "fail"
            self.outcomes[op] = outcome
            self.answers[op] = e.message
            server = self.session.server
            history.result(op, outcome, answer=e.message[:200], attempts=e.answer_to.attempts,
                           server=str(server) if server is not None else None)
        elif isinstance(e, s.SessionClosed):
            for pending in e.unsent:
                tracked = self._ops.get(pending)
                if tracked and tracked[0] not in self.outcomes:
                    self.outcomes[tracked[0]] = "fail"
                    history.result(tracked[0], "fail", answer="never sent: session closed")
            for pending in e.unanswered:
                tracked = self._ops.get(pending)
                if tracked and tracked[0] not in self.outcomes:
                    self.outcomes[tracked[0]] = "unknown"
                    history.result(tracked[0], "unknown", answer="session closed before the answer")
            for pending, (op, f) in self._ops.items():
                if f == "logout" and op not in self.outcomes:
                    self.outcomes[op] = "ok"
                    history.result(op, "ok", answer="connection closed by the server")
        elif isinstance(e, (s.Reidentified, s.ResumeRefused, s.ReidentifyFailed, s.CreateRecovered)):
            fields = {k: (str(v) if isinstance(v, s.Server) else v) for k, v in vars(e).items()}
            fields.setdefault("user", self.name)
            history.write("client", run=self.run, event=type(e).__name__, **fields)


# ------------------------------------------------------------------------ seed-style client


class _Lost(Exception):
    """The connection broke, timed out, or the server sent a backup note and closed
    (``note``: the request was then not executed there)."""

    def __init__(self, why: str, note: bool = False) -> None:
        super().__init__(why)
        self.note = note


class SeedClient:
    """A seed-style client: raw socket, one request per write with no terminator, no extension.

    :meth:`call` executes one request: it (re)connects when needed — servers in order, following
    a backup's redirect note, backing off after a full round — logs in again with ``2|NAME`` on a
    new connection, and sends the request again after a connection lost before the answer
    (at-least-once).  Chat frames that arrive meanwhile are recorded as deliveries.  ``tls``
    (a client ``ssl.SSLContext``) wraps each connection in TLS, verifying the replica's
    certificate for the address dialled: a seed-protocol client behind a TLS layer."""

    def __init__(self, name: str, addresses, history: History, run: str, client: str, *,
                 answer_timeout: float = 20.0, op_timeout: float = 45.0, tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.addresses = [tuple(a) for a in addresses]
        self.history = history
        self.run = run
        self.client = client
        self.answer_timeout = answer_timeout
        self.op_timeout = op_timeout
        self.tls = tls
        self.conn: RawClient | None = None
        self.user: str | None = None          # who this client logs in as on a new connection
        self._index = 0
        self._redirect: tuple[str, int] | None = None
        self._failures = 0
        self.received: list[tuple[str, str]] = []
        self.last_answer: str | None = None   # the text of the last answer to call()

    # -------------------------------------------------------------------------- public
    def call(self, text: str, f: str, **fields):
        """Execute request ``text`` (recorded as function ``f``); return its answer frame, or
        None when no answer came in ``op_timeout`` seconds (outcome unknown)."""
        op = self.history.invoke(client=self.client, run=self.run, kind="seed", user=self.name, f=f, **fields)
        self.last_answer = None
        deadline = time.monotonic() + self.op_timeout
        attempts = 0
        needs_login = f not in ("create", "login")
        while time.monotonic() < deadline:
            if self.conn is None and not self._open(deadline, needs_login):
                break
            attempts += 1
            try:
                self._write(text)
                frame = self._answer(min(self.answer_timeout, max(0.1, deadline - time.monotonic())))
            except _Lost:
                self._drop()
                continue
            self.last_answer = frame.message
            outcome = "ok" if frame.status == 0 else "fail"
            if f == "create" and frame.message == CREATE_TAKEN and attempts > 1:
                outcome = "ok"                                   # our first attempt created it
            server = f"{self.conn.host}:{self.conn.port}" if self.conn is not None else None
            self.history.result(op, outcome, answer=frame.message[:200], attempts=attempts, server=server)
            return frame
        self.history.result(op, "unknown", answer="no answer in time", attempts=attempts)
        return None

    def login(self, name: str, create: bool) -> bool:
        """Create (op 1) or log in (op 2) as ``name`` on a connection of its own; True on
        success (a retried create answered "taken" then logs in)."""
        self.name = name
        self.user = None
        frame = self.call(f"{1 if create else 2}|{name}", "create" if create else "login")
        if frame is None:
            return False
        if frame.status == 0:
            self.user = name
            if not create:
                self._read_summary()
            return True
        if create and frame.message == CREATE_TAKEN:
            # Our first attempt (answer lost) created it: log in instead.
            self._drop()
            return self.login(name, create=False)
        if frame.message == ALREADY_CONNECTED:
            # Our own earlier connection, not yet seen closed by that server: try again shortly.
            self._drop()
            time.sleep(0.3)
            return False
        return False

    def poll(self, seconds: float) -> None:
        """Wait ``seconds`` reading chat frames that arrive (a think time)."""
        end = time.monotonic() + seconds
        while self.conn is not None:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            try:
                frame = self._frame(remaining)
            except _Lost:
                self._drop()
                return
            if frame is None:
                return
            # A non-chat frame while idle: a stepping-down primary's note (then it closes).
            if frame.status == 2:
                self._drop()
                return
        time.sleep(max(0.0, end - time.monotonic()))

    def exit(self) -> None:
        """Send op 6 and read until the server closes (chat written before that is kept)."""
        op = self.history.invoke(client=self.client, run=self.run, kind="seed", user=self.name, f="logout")
        if self.conn is None:
            self.user = None
            self.history.result(op, "ok", answer="no connection")
            return
        try:
            self._write("6")
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                self._frame(end - time.monotonic())
        except _Lost:
            pass
        self._drop()
        self.user = None
        self.history.result(op, "ok", answer="connection closed")

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------------------ internals
    def _open(self, deadline: float, relogin: bool) -> bool:
        """Connect to the primary (and log in again as ``user`` if ``relogin``)."""
        while time.monotonic() < deadline:
            target = self._redirect or self.addresses[self._index]
            self._redirect = None
            try:
                self.conn = RawClient(*target, line_mode=False, timeout=self.answer_timeout, connect_timeout=2.0,
                                      tls=self.tls)
            except OSError:
                self._failed()
                continue
            if not relogin or self.user is None:
                return True             # the request itself will reveal a backup
            if self._relogin(deadline):
                self._failures = 0
                return True
        return False

    def _failed(self) -> None:
        self._drop()
        self._index = (self._index + 1) % len(self.addresses)
        self._failures += 1
        if self._failures % len(self.addresses) == 0:
            time.sleep(min(0.5, 0.05 * 2 ** min(self._failures // len(self.addresses), 4)))

    def _relogin(self, deadline: float) -> bool:
        """``2|NAME`` on the fresh connection; chat queued meanwhile follows the answer."""
        op = self.history.invoke(client=self.client, run=self.run, kind="seed", user=self.user, f="login",
                                 auto=True)
        try:
            self._write(f"2|{self.user}")
            frame = self._answer(min(self.answer_timeout, max(0.1, deadline - time.monotonic())))
        except _Lost as lost:
            if lost.note:      # a backup (or a replica knowing no primary) did not execute it
                self.history.result(op, "fail", answer=str(lost)[:200])
                self._drop()
            else:
                self.history.result(op, "unknown", answer=f"connection lost: {lost}"[:200])
                self._failed()
            return False
        if frame.status == 0:
            self.history.result(op, "ok", answer=frame.message[:200])
            self._read_summary()
            return self.conn is not None
        # "Already connected" (our own dead connection, not noticed yet by that server), or
        # the account is unknown (the checker reports that if its create was acknowledged).
        self.history.result(op, "fail", answer=frame.message[:200])
        self._drop()
        time.sleep(0.2)
        return False

    def _read_summary(self) -> None:
        """After a login: chat frames, then one status-2 note (missed messages)."""
        try:
            while True:
                frame = self._frame(self.answer_timeout)
                if frame is None:
                    return
                if frame.status == 2:
                    if REDIRECT_RE.search(frame.message) or frame.message == NO_PRIMARY_TEXT:
                        self._drop()      # the primary stepped down meanwhile
                    return
        except _Lost:
            self._drop()

    def _write(self, text: str) -> None:
        try:
            self.conn.send(text)
        except OSError as exc:
            raise _Lost(str(exc)) from None

    def _answer(self, timeout: float):
        """The next status-0/1 server frame (chat frames meanwhile are recorded); a backup
        note, a close or a timeout raises _Lost."""
        end = time.monotonic() + timeout
        while True:
            frame = self._frame(max(0.0, end - time.monotonic()))
            if frame is None:
                raise _Lost("timed out waiting for the answer")
            if frame.status == 2:
                match = REDIRECT_RE.search(frame.message)
                if match:
                    self._redirect = (match.group(1), int(match.group(2)))
                    if self._redirect in self.addresses:
                        self._index = self.addresses.index(self._redirect)
                elif frame.message == NO_PRIMARY_TEXT:
                    self._index = (self._index + 1) % len(self.addresses)
                    self._failures += 1
                    if self._failures % len(self.addresses) == 0:
                        time.sleep(0.2)
                raise _Lost(frame.message, note=True)
            return frame

    def _frame(self, timeout: float):
        """The next frame that is not a chat (chats are recorded), or None after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            if self.conn is None:
                raise _Lost("no connection")
            try:
                frame = self.conn.frame(max(0.0, end - time.monotonic()))
            except FrameTimeout:
                return None
            except (OSError, EOFError) as exc:
                raise _Lost(str(exc) or "server closed the connection") from None
            except ProtocolError as exc:
                raise _Lost(f"protocol error: {exc}") from None
            if frame.indicator != 1:
                return frame
            self._record_chat(frame)

    def _record_chat(self, frame) -> None:
        sender, _, text = frame.message.partition("|")
        self.received.append((sender, text))
        self.history.write("deliver", user=self.name, run=self.run, kind="seed",
                           **{"from": sender}, msg=text, seq=None)

    def _drop(self) -> None:
        """Close the connection, first reading whatever chat already reached us."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            frames, _ = conn.read_available()
        except ProtocolError:
            frames = []
        for frame in frames:
            if frame.indicator == 1:
                self._record_chat(frame)
        conn.close()


# --------------------------------------------------------------------------------- workers


class Worker:
    """One chaos-workload client: a thread that owns ``accounts`` and runs sessions on them.

    A session: create (first time) or log in, then ``randint(*ops_per_session)`` operations —
    sends to accounts known to exist (``registry``) and lists — with a think time between them,
    then ``exit``; then offline for a while.  Everything random comes from ``rng``.  After
    :meth:`stop`, the current session ends (outstanding answers awaited, then exit);
    :meth:`drain` then logs every account in once more and reads its mailbox.  ``tls`` (a client
    ``ssl.SSLContext``) is passed to every client it makes."""

    kind = "?"

    def __init__(self, index: int, addresses, history: History, registry: Registry, rng: random.Random,
                 accounts: list[str], *, think=(0.02, 0.12), ops_per_session=(5, 40), offline=(0.2, 2.0),
                 list_share: float = 0.1, tls: ssl.SSLContext | None = None) -> None:
        self.index = index
        self.client = f"c{index}"
        self.addresses = list(addresses)
        self.history = history
        self.registry = registry
        self.rng = rng
        self.accounts = list(accounts)
        self.created: set[str] = set()        # accounts whose create was acknowledged
        self.attempted: set[str] = set()      # accounts whose create was invoked
        self.counter: dict[str, int] = {a: 0 for a in accounts}
        self.think = think
        self.ops_per_session = ops_per_session
        self.offline = offline
        self.list_share = list_share
        self.tls = tls
        self._runs = itertools.count(1)
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.sessions = 0
        self.thread = threading.Thread(target=self._main, name=f"worker-{self.client}", daemon=True)

    def start(self) -> Worker:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def new_run(self) -> str:
        return f"{self.client}.{next(self._runs)}"

    def next_text(self, name: str) -> str:
        n = self.counter[name]
        self.counter[name] = n + 1
        return f"{name}#{n}"

    def pick_recipient(self, name: str) -> str | None:
        others = [n for n in self.registry.names() if n != name]
        return self.rng.choice(others) if others else None

    def pick_pattern(self) -> str:
        return self.rng.choice(["*", "c*", f"{self.client}*", "x*"])

    def _main(self) -> None:
        try:
            while not self.stopping.is_set():
                name = self.rng.choice(self.accounts)
                self.sessions += 1
                self.session(name)
                self._sleep(self.rng.uniform(*self.offline))
        except BaseException as exc:   # noqa: BLE001 - reported by the runner
            self.error = exc
            self.history.write("client", client=self.client, event="worker-crashed", error=repr(exc))

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def session(self, name: str) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        raise NotImplementedError

    def operate(self, name: str, do_list, do_send, pause) -> None:
        """A session's operations, the same for both kinds of client so that a seed draws the
        same decisions from ``rng`` whichever client runs them: ``randint(*ops_per_session)``
        times (until :meth:`stop`), ``do_list(pattern)`` or ``do_send(recipient, text)``, then
        ``pause(think_time)``."""
        for _ in range(self.rng.randint(*self.ops_per_session)):
            if self.stopping.is_set():
                break
            if self.rng.random() < self.list_share:
                do_list(self.pick_pattern())
            else:
                recipient = self.pick_recipient(name)
                if recipient is not None:
                    do_send(recipient, self.next_text(name))
            pause(self.rng.uniform(*self.think))

    def first_time(self, name: str) -> bool:
        """Whether this session creates ``name`` (no create of it was tried yet: it is recorded
        as tried now) rather than logging in."""
        create = name not in self.created and name not in self.attempted
        if create:
            self.attempted.add(name)
        return create

    def identified(self, name: str, create: bool, ok: bool, answer: str | None) -> bool:
        """Book-keep a create's or login's outcome: an account created or logged in to is one
        others may send to; a refused login returns whether the account was never created
        after all (:meth:`_never_created`)."""
        if not ok:
            return not create and self._never_created(name, answer)
        if create:
            self._mark_created(name)
        else:
            self.registry.add(name)
        return False

    def _mark_created(self, name: str) -> None:
        self.created.add(name)
        self.registry.add(name)

    def _never_created(self, name: str, answer: str | None) -> bool:
        """A login refused as unknown for an account whose create was never acknowledged: the
        create (its answer lost) did not happen after all, so the next session creates it."""
        if name not in self.created and (answer or "").startswith(LOGIN_UNKNOWN_PREFIX):
            self.attempted.discard(name)
            return True
        return False


class ExtWorker(Worker):
    """A workload client using our client library (one :class:`SimUser` per session)."""

    kind = "ext"

    def __init__(self, *args, window: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window = window

    def _user(self, name: str) -> SimUser:
        return SimUser(name, self.addresses, window=self.window, history=self.history, run=self.new_run(),
                       client=self.client, tls=self.tls)

    def _identify(self, user: SimUser, name: str, create: bool, timeout: float = 30.0) -> int | None:
        """Create or log in; the op id if that succeeded, else None (``last_never_created``
        tells whether a login was refused because the account was never created)."""
        self.last_never_created = False
        op = user.request(f"{'create' if create else 'login'}|{name}", "create" if create else "login")
        if not wait_for(lambda: user.outcome(op) is not None, timeout):
            return None
        ok = user.outcome(op) == "ok"
        self.last_never_created = self.identified(name, create, ok, user.answers.get(op))
        return op if ok else None

    def session(self, name: str) -> None:
        create = self.first_time(name)
        user = self._user(name)

        def pause(seconds: float) -> None:
            wait_for(lambda: user.outstanding() < self.window, 30.0)  # at most `window` unanswered
            self._sleep(seconds)

        try:
            if self._identify(user, name, create) is None:
                return
            self.operate(name, lambda pattern: user.request(f"list|{pattern}", "list"), user.send, pause)
            wait_for(user.idle, 30.0, interval=0.05)
            self._exit(user)
        finally:
            user.stop()

    @staticmethod
    def _exit(user: SimUser) -> None:
        """``exit`` (which logs the account out), and wait until the server closed."""
        user.request("exit", "logout")
        wait_for(lambda: user.session.closed, 10.0, interval=0.05)

    def drain(self) -> None:
        """Log every account in once more; wait for the missed-messages note (every queued
        chat comes before it), let the acks go out, and exit."""
        for name in sorted(self.attempted | self.created):
            user = self._user(name)
            try:
                op = self._identify(user, name, create=False)
                if op is None and self.last_never_created:
                    self.history.write("drain", user=name, kind="ext", ok=True, note="never created")
                    continue
                ok = op is not None and wait_for(lambda: op in user.noted, 20.0, interval=0.05)
                ok = ok and wait_for(user.idle, 20.0, interval=0.05)
                self.history.write("drain", user=name, kind="ext", ok=bool(ok))
                self._exit(user)
            finally:
                user.stop()


class SeedWorker(Worker):
    """A workload client speaking the seed protocol on a raw socket (:class:`SeedClient`)."""

    kind = "seed"

    def session(self, name: str) -> None:
        create = self.first_time(name)
        client = SeedClient(name, self.addresses, self.history, self.new_run(), self.client, tls=self.tls)
        try:
            ok = client.login(name, create)
            self.identified(name, create, ok, client.last_answer)
            if not ok:
                return
            self.operate(name, lambda pattern: client.call(f"4|{pattern}", "list"),
                         lambda to, text: client.call(f"3|{to}|{text}", "send", to=to, msg=text), client.poll)
            client.exit()
        finally:
            client.close()

    def drain(self) -> None:
        for name in sorted(self.attempted | self.created):
            client = SeedClient(name, self.addresses, self.history, self.new_run(), self.client, tls=self.tls)
            try:
                ok, note = False, ""
                for _ in range(5):
                    if client.login(name, create=False):
                        ok = True
                        break
                    if self._never_created(name, client.last_answer):
                        ok, note = True, "never created"
                        break
                self.history.write("drain", user=name, kind="seed", ok=ok, **({"note": note} if note else {}))
                client.exit()
            finally:
                client.close()
