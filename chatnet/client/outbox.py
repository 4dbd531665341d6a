"""The outgoing side of a session: commands queued, in flight, and retried, with their request ids.

:class:`Outbox` keeps two queues of :class:`Pending` commands: ``queue`` (not written to the current
connection yet) and ``in_flight`` (written, answer still due; the server answers in request order,
so the oldest is the one the next answer belongs to).  When a connection breaks, what was in flight
goes back to the front of the queue and is written again on the next one.  It decides *what* may be
written next; the session decides *when* (only while it is ready) and sends the bytes.

Extension 1's request ids live here too: a send on an extended connection goes out as
``0|send|RID|RECIPIENT|TEXT``, and its RID is fixed at the first write and kept for every retry,
so a send the dead primary committed is not delivered twice.
"""

from __future__ import annotations

import itertools
import re
import secrets
import string
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .commands import OP_CREATE, OP_DELETE, OP_EXIT, OP_EXT, OP_LOGIN, OP_PASSWD, OP_RESUME, OP_SEND, Command

if TYPE_CHECKING:
    from .identity import SavedResume

__all__ = ["Pending", "Outbox", "random_rid_prefix", "check_rid_prefix"]

_RID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}\Z")
_RID_ALPHABET = string.ascii_letters + string.digits
_BASE36 = string.digits + string.ascii_lowercase


@dataclass(eq=False)
class Pending:
    """A command on its way: queued, in flight, or retried.  Identity is the object itself."""

    command: Command
    request_id: int
    auto: bool = False        # sent by the session itself (re-identification), not the user
    attempts: int = 0         # how many times it has been written to a connection
    rid: str | None = None    # extension 1: the wire request id of a send, fixed at its first write
    resume: SavedResume | None = None   # a user's login written as op 7 with a saved token
    fresh: bool = False       # a login that must not be written as a resume (one was refused)

    def __repr__(self) -> str:
        rid = f" rid={self.rid}" if self.rid else ""
        return (f"Pending(#{self.request_id} {self.command}{' auto' if self.auto else ''}, "
                f"attempts={self.attempts}{rid})")


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


def check_rid_prefix(prefix: str) -> str:
    """``prefix`` if the server would accept request ids made from it, else ValueError."""
    if not _RID_RE.match(prefix):
        raise ValueError(f"bad request id prefix {prefix!r}")
    return prefix


class Outbox:
    """Queued and in-flight commands of one session (across its connections)."""

    def __init__(self, rid_prefix: str) -> None:
        self.rid_prefix = rid_prefix
        self.queue: deque[Pending] = deque()
        self.in_flight: deque[Pending] = deque()
        self.barrier: Pending | None = None     # a retried create/login the queue waits for
        self._ids = itertools.count(1)
        self._rids = itertools.count(1)

    def new(self, command: Command, auto: bool = False) -> Pending:
        return Pending(command, next(self._ids), auto=auto)

    def write(self, pending: Pending, extended: bool, passwords: bool = False) -> bytes:
        """Count an attempt of ``pending`` on the current connection; its bytes.  An exit is
        never in flight: op 6 has no answer (the server closes)."""
        pending.attempts += 1
        if pending.command.op != OP_EXIT:
            self.in_flight.append(pending)
        return self.wire(pending, extended, passwords)

    def wire(self, pending: Pending, extended: bool, passwords: bool = False) -> bytes:
        """The bytes of ``pending``: a send with its request id on an extended connection (the
        same id on every attempt), a command with a password in extension 2's form on a
        connection that negotiated it (seed-style otherwise), else the command itself."""
        command = pending.command
        if command.op == OP_LOGIN and pending.resume is not None and extended:
            saved = pending.resume
            return Command(OP_RESUME, (command.params[0], saved.token, str(saved.last_seq))).encode()
        if command.op == OP_PASSWD or (command.secret and passwords):
            return password_wire(command)
        if command.op == OP_SEND and extended:
            if pending.rid is None:
                pending.rid = self.rid_prefix + _base36(next(self._rids))
            # The server counts the 280 characters on the op 3 equivalent (docs/protocol.md), so
            # the envelope never makes a send too long.
            return Command(OP_EXT, ("send", pending.rid, *command.params)).encode()
        return command.encode()

    def next_ready(self, answers_complete: bool) -> Pending | None:
        """Take the next queued command that may be written now, or None: nothing queued, a
        retried create/login is still unanswered, or an exit waits for answers.

        ``exit`` waits for every answer (and a login's queued chat and note), so the chat they
        bring is acknowledged before the server logs us out: chat that arrived after our exit
        could be neither acknowledged nor shown once."""
        if not self.queue or self.barrier is not None:
            return None
        if self.queue[0].command.op == OP_EXIT and not answers_complete:
            return None
        return self.queue.popleft()

    def written(self, pending: Pending) -> None:
        """``pending`` (from :meth:`next_ready`) was written.  Who we are after a retried
        create/login depends on its answer (a create the dead primary committed is answered
        "taken"), so the queue waits for it; so it does for a login written as a resume, which
        may be refused and followed by a fresh login."""
        if pending.command.op in (OP_CREATE, OP_LOGIN) and (pending.attempts > 1 or pending.resume):
            self.barrier = pending

    def answered(self) -> Pending | None:
        """The command the next answer belongs to (None: an answer nobody asked for)."""
        return self.in_flight.popleft() if self.in_flight else None

    def release(self, pending: Pending) -> bool:
        """``pending`` was answered; whether it was the barrier (the queue may move again)."""
        if pending is not self.barrier:
            return False
        self.barrier = None
        return True

    def requeue(self) -> list[Pending]:
        """The connection broke: the user's unanswered commands go back to the front of the
        queue, in order (the session's own requests are not retried: it makes new ones)."""
        again = [p for p in self.in_flight if not p.auto]
        self.queue.extendleft(reversed(again))
        self.in_flight.clear()
        self.barrier = None
        return again

    def drain(self) -> tuple[tuple[Pending, ...], tuple[Pending, ...]]:
        """Empty both queues: (never sent, sent but unanswered), for the session's end."""
        unsent = tuple(p for p in self.queue if p.command.op != OP_EXIT)
        unanswered = tuple(p for p in self.in_flight if not p.auto)
        self.queue.clear()
        self.in_flight.clear()
        return unsent, unanswered


_PASSWORD_VERBS = {OP_CREATE: "create", OP_LOGIN: "login", OP_DELETE: "delete", OP_PASSWD: "passwd"}


def password_wire(command: Command) -> bytes:
    """Extension 2: ``0|create|NAME|PW``, ``0|login|NAME|PW``, ``0|delete|PW``,
    ``0|passwd|OLD|NEW`` (passwords stripped, without ``|``: the UI checked them)."""
    params = command.params[:1] if command.op in (OP_CREATE, OP_LOGIN) else ()
    secret = command.secret if command.op == OP_PASSWD else command.secret[:1]
    secret = (*secret, "", "")[:2] if command.op == OP_PASSWD else secret
    return Command(OP_EXT, (_PASSWORD_VERBS[command.op], *params, *secret)).encode()
