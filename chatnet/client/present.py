"""What the user sees of session events: display lines shared by the curses and plain UIs.

:class:`Presenter` turns each session event into zero or more :class:`DisplayLine` s.  It is
deliberately quiet about connection churn: during an outage it says once that the connection
was lost and once that all servers are down, and the status bar (curses) carries the retry
countdown; ``verbose=True`` reports every attempt.  Line kinds:

==========  =====================================================================
``chat``    chat from another user (``sender`` set)
``own``     what this user sent
``ok``      the server's success answers
``note``    the server's notes (status 2)
``error``   the server's error answers, and failures of the session
``refused`` lines the client refused to send (checked before sending)
``info``    connection state and other client-side remarks
``help``    the help text
``history`` a stored line (``stamp``: when it was stored), shown as history
==========  =====================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import events as ev
from .commands import OP_EXIT, OP_LIST, OP_SEND, Command
from .identity import ALREADY_CONNECTED_TEXT, retried_create_taken
from .outbox import Pending

__all__ = ["DisplayLine", "Presenter", "own_line", "format_list_answer"]


@dataclass(frozen=True)
class DisplayLine:
    kind: str
    text: str
    sender: str | None = None
    stamp: str | None = None       # history: the stored time, shown instead of the current one


def own_line(command: Command) -> DisplayLine:
    """The echo of a command the user sent."""
    if command.op == OP_SEND:
        return DisplayLine("own", f"-> {command.params[0]}: {command.params[1]}")
    return DisplayLine("own", f"> {command.line.strip() or command}")


_MORE = re.compile(r"^More accounts: request 4\|(?P<pattern>.*)\|(?P<after>\d+) for the next page\.$", re.M)


def format_list_answer(message: str, pattern: str | None) -> str:
    """``"\\n- alice\\n- bob\\n"`` -> ``"2 accounts: alice, bob"`` (usernames have no spaces).

    A page cut short by the server (docs/protocol.md §1.5) ends with how to ask for the next
    one, in the client's own syntax: ``... (more: list|a*|117)``."""
    names = [line[2:] for line in message.split("\n") if line.startswith("- ")]
    where = f" matching {pattern}" if pattern and pattern != "*" else ""
    more = _MORE.search(message)
    tail = f" (more: list|{more['pattern']}|{more['after']})" if more else ""
    if not names:
        return f"no accounts{where}{tail}"
    return f"{len(names)} account{'s' if len(names) != 1 else ''}{where}: {', '.join(names)}{tail}"


def _quote(pending: Pending) -> str:
    return f'"{pending.command}"'


class Presenter:
    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._outage = False          # between a loss/failed start and the next connection
        self._told_down = False
        self._told_redirect = False
        self._last_error = ""
        self._started = False

    def lines(self, event) -> list[DisplayLine]:
        method = getattr(self, "_" + type(event).__name__, None)
        return method(event) if method else []

    # connection life cycle -----------------------------------------------------------------
    def _Connecting(self, e: ev.Connecting) -> list[DisplayLine]:
        first, self._started = not self._started, True
        if first or self.verbose:
            return [DisplayLine("info", f"connecting to {e.server}")]
        return []

    def _Connected(self, e: ev.Connected) -> list[DisplayLine]:
        if self.verbose:
            return [DisplayLine("info", f"connected to {e.server}, waiting for its answer")]
        return []

    def _PrimaryConfirmed(self, e: ev.PrimaryConfirmed) -> list[DisplayLine]:
        self._outage = self._told_down = self._told_redirect = False
        return [DisplayLine("info", f"connected to {e.server}")]

    def _ConnectFailed(self, e: ev.ConnectFailed) -> list[DisplayLine]:
        self._last_error = e.reason
        self._outage = True
        if self.verbose:
            return [DisplayLine("info", f"cannot connect to {e.server}: {e.reason}")]
        return []

    def _ConnectionLost(self, e: ev.ConnectionLost) -> list[DisplayLine]:
        self._outage = True
        return [DisplayLine("error", f"connection to {e.server} lost ({e.reason}); reconnecting")]

    def _Redirected(self, e: ev.Redirected) -> list[DisplayLine]:
        if self._told_redirect and not self.verbose:
            return []                # backups repeat themselves during an election
        self._told_redirect = True
        if e.primary is None:
            text = f"{e.server} is a backup and knows no primary yet; trying the next server"
        else:
            text = f"{e.server} is a backup; the primary is at {e.primary}"
        return [DisplayLine("info", text)]

    def _RetryScheduled(self, e: ev.RetryScheduled) -> list[DisplayLine]:
        if self.verbose and e.delay > 0:
            return [DisplayLine("info", f"reconnecting to {e.server} in {e.delay:.1f} s")]
        return []

    def _AllServersDown(self, e: ev.AllServersDown) -> list[DisplayLine]:
        if self._told_down and not self.verbose:
            return []
        self._told_down = True
        if e.reachable:
            text = "no primary server available yet; retrying"
        else:
            why = f" (last error: {self._last_error})" if self._last_error else ""
            text = f"all servers down{why}; retrying"
        return [DisplayLine("error", text)]

    # identity ------------------------------------------------------------------------------
    def _Reidentified(self, e: ev.Reidentified) -> list[DisplayLine]:
        if e.resumed:
            return [DisplayLine("info", f"resumed as {e.user} on {e.server}")]
        if e.fresh:
            return [DisplayLine("info", f"logged in again as {e.user} on {e.server} (a fresh login: "
                                        "the session could not be resumed)")]
        return [DisplayLine("info", f"logged in again as {e.user} on {e.server}")]

    def _CreateRecovered(self, e: ev.CreateRecovered) -> list[DisplayLine]:
        return [DisplayLine("info", f"the account {e.user} exists already, most likely created by this "
                                    "client just before the connection broke; logging in as it")]

    def _RestoreRefused(self, e: ev.RestoreRefused) -> list[DisplayLine]:
        return [DisplayLine("info", f"the session of {e.user} saved by an earlier run could not be resumed "
                                    f"({e.reason}); logging in afresh")]

    def _ResumeRefused(self, e: ev.ResumeRefused) -> list[DisplayLine]:
        return [DisplayLine("error", f"could not resume the session as {e.user} ({e.reason}); "
                                     "logging in afresh, queued commands will follow")]

    def _ReidentifyFailed(self, e: ev.ReidentifyFailed) -> list[DisplayLine]:
        return [DisplayLine("error", f"could not log in again as {e.user}: {e.reason}")]

    # commands ------------------------------------------------------------------------------
    def _CommandQueued(self, e: ev.CommandQueued) -> list[DisplayLine]:
        if e.connected or not self._outage or e.pending.command.op == OP_EXIT:
            return []                           # it goes out in a moment: nothing to say
        return [DisplayLine("info", f"not connected: {_quote(e.pending)} will be sent once connected")]

    def _CommandSent(self, e: ev.CommandSent) -> list[DisplayLine]:
        if e.pending.attempts > 1:
            return [DisplayLine("info", f"sending {_quote(e.pending)} again")]
        return []

    def _CommandRequeued(self, e: ev.CommandRequeued) -> list[DisplayLine]:
        return [DisplayLine("info", f"no answer yet to {_quote(e.pending)}; it will be sent again after reconnecting")]

    def _SessionClosed(self, e: ev.SessionClosed) -> list[DisplayLine]:
        lines = [DisplayLine("error", f"not sent: {_quote(p)}") for p in e.unsent]
        lines += [DisplayLine("info", f"no answer received for {_quote(p)}") for p in e.unanswered]
        return lines

    # frames --------------------------------------------------------------------------------
    def _FrameReceived(self, e: ev.FrameReceived) -> list[DisplayLine]:
        if e.kind == "chat":
            return [DisplayLine("chat", e.text or "", e.sender)]
        pending = e.answer_to
        if retried_create_taken(pending, e.frame):
            return []                               # CreateRecovered says it
        if pending is not None and pending.resume is not None and e.kind == "error":
            return []                               # RestoreRefused says it
        if pending is not None and pending.auto and e.kind != "note":
            if e.kind == "ok":
                return []                       # Reidentified says it
            if e.message == ALREADY_CONNECTED_TEXT:
                return [DisplayLine("info", f"the server still sees our old connection as {pending.command.params[0]}; "
                                            "retrying the login")]
            return []                           # ReidentifyFailed says it
        text = e.message
        if e.kind == "ok" and pending is not None and pending.command.op == OP_LIST:
            pattern = pending.command.params[0] if pending.command.params else None
            text = format_list_answer(text, pattern)
        return [DisplayLine(e.kind, text)]
