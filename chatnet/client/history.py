"""The front ends' side of the stored history: what they record, and what they show of it.

The session persists the numbered chat it receives itself (a :class:`~chatnet.client.events.Persist`
before the ack, see ``state.py``), because that chat is deleted on the server once acknowledged.
Everything else that is worth keeping has no such ordering constraint, so the front ends record
it as they show it, through :class:`HistoryKeeper`: chat this user sent (once the server said
"Message sent"), a send the server refused, and chat without a sequence number (seed-style
servers).

Showing history: when the user submits ``login|NAME``, :meth:`HistoryKeeper.login_submitted`
notes where the store ends, so that on the login's :class:`~chatnet.client.events.UserChanged`
the front end shows the conversation *before* this login — the chat that arrives with the login
is stored at once (before its ack) but is shown as new, not as history.

It also claims the account for this process (:meth:`StateStore.claim`): if another running
client on this computer is logged in as NAME, the saved token is not used (both would resume
the same session and take it from each other on every reconnect); the login is an ordinary one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import events as ev
from .commands import OP_LOGIN, OP_SEND, Command
from .identity import SavedResume
from .state import HistoryRow, StateStore

__all__ = ["HistoryKeeper", "HistoryView", "row_text", "row_time", "NO_HISTORY"]

NO_HISTORY = "no history is kept in this run (--no-history, --no-state, or the state file is unusable)"


def row_text(row: HistoryRow) -> str:
    """A stored line as the pane shows chat: ``<bob> hi``, ``-> bob: hi``, or a note."""
    if row.kind == "in":
        return f"<{row.peer}> {row.text}"
    if row.kind == "out":
        return f"-> {row.peer}: {row.text}"
    return f"!! {row.text}"


def row_time(row: HistoryRow, full: bool = False) -> str:
    """``YYYY-MM-DD HH:MM`` (``full``), else ``HH:MM`` for today and ``MM-DD`` for other days."""
    stamp = time.localtime(row.at)
    if full:
        return time.strftime("%Y-%m-%d %H:%M", stamp)
    same_day = time.strftime("%Y%m%d", stamp) == time.strftime("%Y%m%d")
    return time.strftime("%H:%M" if same_day else "%m-%d", stamp)


@dataclass
class HistoryView:
    """The history shown for one login: ``rows`` (oldest first) and the id below which older
    rows may still be loaded (PgUp), None when there are none."""

    account: str
    rows: list[HistoryRow]
    before: int | None


class HistoryKeeper:
    """Records what a front end shows, and reads back what it should show of the past."""

    def __init__(self, store: StateStore | None) -> None:
        self.store = store
        self._bounds: dict[str, int] = {}      # account -> first row id not to show as history

    @property
    def enabled(self) -> bool:
        return self.store is not None and self.store.enabled and self.store.history

    def take_notices(self) -> list[str]:
        """What the store has to tell the user since the last call (a file set aside...)."""
        if self.store is None:
            return []
        notices, self.store.notices = self.store.notices, []
        return notices

    # ---------------------------------------------------------------------------- recording
    def observe(self, event, user: str | None) -> None:
        """Record what ``event`` shows that is worth keeping (``user``: the session's user)."""
        if isinstance(event, ev.UserChanged) and self.store is not None:
            self.store.release_others(event.user)
            if event.user is not None:
                self.store.claim(event.user)      # after a create too: ours while logged in
        if not self.enabled or user is None or not isinstance(event, ev.FrameReceived):
            return
        if event.kind == "chat":
            if event.seq is None:                 # numbered chat is in the Persist already
                self.store.record(user, "in", event.sender or "", event.text or "")
            return
        pending = event.answer_to
        if pending is None or pending.auto or pending.command.op != OP_SEND:
            return
        recipient, text = pending.command.params
        if event.kind == "ok":
            self.store.record(user, "out", recipient, text)
        elif event.kind == "error":
            self.store.record(user, "note", recipient, f"not sent to {recipient} ({event.message}): {text}")

    # ------------------------------------------------------------------------------ showing
    def login_submitted(self, command: Command, saved: dict | None = None) -> str | None:
        """The user asked to log in: remember where the account's history ends now, and claim
        the account; if another client holds it, drop the token from ``saved`` (the session's)
        and return what to tell the user."""
        if command.op != OP_LOGIN or self.store is None or not self.store.enabled:
            return None
        name = command.params[0]
        if self.store.history:
            self._bounds[name] = self.store.next_id()
        if self.store.claim(name) or saved is None or name not in saved or not saved[name].token:
            return None
        saved[name] = SavedResume(None, saved[name].last_seq)
        return (f"another chatclient on this computer is logged in as {name}: logging in, "
                "not resuming the session it saved")

    def on_login(self, user: str, limit: int) -> HistoryView | None:
        """``user`` logged in (a UserChanged): the last ``limit`` lines stored before the login
        was submitted, or None (no login of ours, or nothing stored)."""
        bound = self._bounds.pop(user, None)
        self._bounds.clear()
        if bound is None or not self.enabled:
            return None
        rows = self.store.recent(user, limit, before=bound)
        if not rows:
            return None
        return HistoryView(user, rows, rows[0].id)

    def older(self, view: HistoryView, limit: int) -> list[HistoryRow]:
        """Up to ``limit`` rows before those ``view`` holds (PgUp); ``view`` is updated."""
        if view.before is None or not self.enabled:
            return []
        rows = self.store.recent(view.account, limit, before=view.before)
        view.rows[:0] = rows
        view.before = rows[0].id if len(rows) == limit else None
        return rows

    def conversation(self, user: str | None, peer: str) -> tuple[list[HistoryRow], str]:
        """``history NAME``: the stored conversation of ``user`` with ``peer``, and a heading
        (or the reason there is none)."""
        if not self.enabled:
            return [], NO_HISTORY
        if user is None:
            return [], "log in first: history is kept per account"
        rows = self.store.conversation(user, peer)
        if not rows:
            return [], f"no stored conversation of {user} with {peer}"
        return rows, f"history of {user} with {peer}: {len(rows)} line{'s' if len(rows) != 1 else ''}"
