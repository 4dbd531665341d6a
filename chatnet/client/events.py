"""What the session says: *actions* for the driver and *events* for the user interface.

Both are plain frozen dataclasses, so tests compare them with ``==`` and a UI dispatches on the
class.  Actions (:class:`Connect`, :class:`Send`, :class:`Disconnect`, and :class:`Persist` when the
session keeps durable state) are all a driver has to carry out, in order; events describe what happened, for display (``present.py``) or for bookkeeping
(``bench/workload.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.codec import Frame
from .acks import SequencedChat
from .outbox import Pending
from .servers import Server

__all__ = [
    "Connect", "Send", "Disconnect", "Persist", "RestoreRefused",
    "Connecting", "Connected", "PrimaryConfirmed", "ConnectFailed", "ConnectionLost", "Redirected",
    "RetryScheduled", "AllServersDown", "FrameReceived", "UserChanged", "Reidentified",
    "ReidentifyFailed", "Negotiated", "ResumeRefused", "DuplicateDropped", "CreateRecovered",
    "CommandQueued", "CommandSent", "CommandRequeued", "SessionClosed",
]


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


@dataclass(frozen=True)
class Persist:
    """Make ``user``'s resume state (``token``, ``last_seq``) and the numbered ``chats`` received
    for it durable *before* carrying out the actions after this one: an acknowledgement that
    covers them follows, and the server deletes what is acknowledged.  ``forget``: the account
    is gone (deleted), drop its resume state.  Only emitted with ``ClientSession(saved=...)``."""

    user: str
    token: str | None
    last_seq: int
    chats: tuple[SequencedChat, ...] = ()
    forget: bool = False


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
class RestoreRefused:
    """The user's ``login|NAME`` went as a resume with the token a previous run saved, and the
    server refused it (``reason``); the session logs in afresh at once (chat already stored is
    still not shown twice: sequence numbers)."""

    user: str
    reason: str


@dataclass(frozen=True)
class CreateRecovered:
    """A create sent again after a reconnect was answered "already taken": most likely the
    first attempt was committed just before the connection broke, so the session logs in."""

    user: str


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

