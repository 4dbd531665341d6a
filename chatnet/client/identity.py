"""Who the session is, and how it says so again on every new connection.

* :class:`ResumeState` is what resuming a session needs — the three fields of
  ``7|NAME|TOKEN|LAST_SEQ``: the logged-in user (learnt from the server's answers to create and
  login, forgotten after a delete), the resume token the server sent (extension 1), and the
  highest chat sequence number shown.  It is the one piece of client state that outlives a
  connection, so it is the piece to make durable for resuming after a *client* restart: every
  change goes through its attributes, and :class:`~chatnet.client.acks.AckTracker` advances
  ``last_seq`` before the acknowledgement that covers it is written.  With durable state on
  (``ClientSession(saved=...)``) the session emits a :class:`~chatnet.client.events.Persist`
  of it before that acknowledgement, and :class:`SavedResume` is what a later run reads back
  (``chatnet/client/state.py`` keeps it on disk; the session never touches the file).
* :class:`Handshake` is what a new connection does before the queue may go: negotiate
  extension 1 (``0|ext|1``), then re-identify (op 7 resume, or op 2 login), retrying a login
  refused because the server still sees our dead connection, and logging in afresh after a
  refused resume.  It classifies each answer; the session acts on the verdict.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from ..protocol import texts
from ..protocol.codec import STATUS_OK, Frame
from .commands import OP_CREATE, OP_EXT, OP_LIST, OP_LOGIN, OP_RESUME, Command
from .outbox import Pending

__all__ = [
    "ResumeState", "SavedResume", "Handshake", "Verdict", "retried_create_taken", "name_from",
    "PROBE_COMMAND", "EXT_COMMAND", "EXT_ANSWER", "ALREADY_CONNECTED_TEXT", "CREATE_TAKEN_TEXT",
    "RESUME_BAD_TOKEN_TEXT", "RESUME_UNKNOWN_TEXT", "RESUME_OTHER_HISTORY_TEXT", "TOKEN_PREFIX", "PASSWORDS_COMMAND", "PASSWORDS_ANSWER",
]

ALREADY_CONNECTED_TEXT = texts.T_LOGIN_CONNECTED
CREATE_TAKEN_TEXT = texts.T_CREATE_TAKEN
# Sent when there is nobody to log in again, to find out at once whether the server is a backup.
PROBE_COMMAND = Command(OP_LIST, ("|",), "")
# Extension 1 (docs/protocol.md, "Extension 1: sessions that survive failover").
EXT_COMMAND = Command(OP_EXT, ("ext", "1"), "")
EXT_ANSWER = texts.T_EXT
# Extension 2, passwords: asked right after extension 1 when the session uses passwords.
PASSWORDS_COMMAND = Command(OP_EXT, ("ext", texts.PASSWORD_EXTENSION), "")
PASSWORDS_ANSWER = texts.T_EXT_PASSWORDS
RESUME_BAD_TOKEN_TEXT = texts.T_RESUME_BAD_TOKEN
RESUME_UNKNOWN_TEXT = texts.T_RESUME_UNKNOWN
# The server cannot take our LAST_SEQ (it numbers another side's mailbox after a split brain):
# log in afresh and number from 0 again (chat already seen may then be shown again).
RESUME_OTHER_HISTORY_TEXT = texts.T_RESUME_OTHER_HISTORY
TOKEN_PREFIX = "token|"
_LOGGED_IN_RE = re.compile(r"(?:Account created! )?Logged in as (?P<name>.*)\.\Z", re.S)


def name_from(frame: Frame, pending: Pending) -> str:
    """The user a successful create or login answer names (else the name the request gave)."""
    match = _LOGGED_IN_RE.match(frame.message)
    return match.group("name") if match else pending.command.params[0]


def retried_create_taken(pending: Pending | None, frame: Frame) -> bool:
    """Whether ``frame`` refuses a create that was sent more than once because the name is
    taken (the session then logs in instead: see :class:`~chatnet.client.events.CreateRecovered`)."""
    return (pending is not None and not pending.auto and pending.command.op == OP_CREATE
            and pending.attempts > 1 and frame.status != STATUS_OK
            and frame.message == CREATE_TAKEN_TEXT)


@dataclass
class ResumeState:
    """The account this session speaks for and what resuming its session needs."""

    user: str | None = None
    token: str | None = None     # extension 1: the resume token of ``user``
    last_seq: int = 0            # highest chat sequence number received for ``user``
    # Extension 2: the password ``user`` logged in with, kept in memory only (never persisted,
    # shown or logged) to log in again after a failover when the session cannot be resumed.
    password: str | None = field(default=None, repr=False)

    def switch(self, user: str | None) -> bool:
        """Become ``user``; whether that is a change.  A token and sequence numbers belong to
        one account, so a change forgets them."""
        if user == self.user:
            return False
        self.user = user
        self.token = None
        self.last_seq = 0
        self.password = None
        return True

    def identify_command(self, extended: bool) -> Command | None:
        """The request that re-identifies the session on a new connection, or None (nobody to
        log in): a resume ``7|NAME|TOKEN|LAST_SEQ`` on an extended connection with a token,
        else ``2|NAME``."""
        if self.user is None:
            return None
        if extended and self.token is not None:
            return Command(OP_RESUME, (self.user, self.token, str(self.last_seq)))
        return Command(OP_LOGIN, (self.user,), secret=(self.password,) if self.password else ())


@dataclass(frozen=True)
class SavedResume:
    """An account's resume state as a previous run of the client left it: the token (None after
    a clean exit, which clears it on the server) and the highest chat sequence number stored."""

    token: str | None
    last_seq: int


class Verdict(enum.Enum):
    """What the answer to a re-identifying request means for the session."""

    DONE = "done"              # logged in or resumed: the queue may go
    DONE_FRESH = "done fresh"  # logged in by the fresh login that followed a refused resume
    FRESH_LOGIN = "fresh"      # the resume was refused: log in afresh at once
    RETRY_LATER = "later"      # "still connected" (our dead connection): retry after a backoff
    FAILED = "failed"          # refused for good: the session is logged out


class Handshake:
    """The requests a connection starts with, and which of them is still unanswered."""

    def __init__(self, retries: int) -> None:
        self.retries = retries                  # how often "still connected" is retried
        self.negotiate: Pending | None = None   # ``0|ext|1``, until answered
        self.identify: Pending | None = None    # the re-identifying request, until answered
        self.refusals = 0                       # "still connected" answers to it so far
        self.fresh = False                      # the re-login in progress follows a refused resume

    @property
    def busy(self) -> bool:
        return self.negotiate is not None or self.identify is not None

    def begin_identify(self, pending: Pending | None) -> None:
        self.identify = pending
        self.refusals = 0

    def connection_lost(self) -> None:
        self.negotiate = self.identify = None

    def judge(self, frame: Frame) -> Verdict:
        """The answer to :attr:`identify` (a login or a resume) came."""
        resume = self.identify.command.op == OP_RESUME
        if frame.status == STATUS_OK:
            self.identify = None
            fresh, self.fresh = self.fresh and not resume, False
            return Verdict.DONE_FRESH if fresh else Verdict.DONE
        if resume and frame.message != RESUME_UNKNOWN_TEXT:
            # The token is wrong or superseded (or the server cannot resume): log in afresh.
            self.fresh = True
            return Verdict.FRESH_LOGIN
        if frame.message == ALREADY_CONNECTED_TEXT and self.refusals < self.retries:
            # Most likely our own previous connection, which that server has not noticed dead.
            self.refusals += 1
            return Verdict.RETRY_LATER
        self.identify = None
        self.fresh = False
        return Verdict.FAILED
