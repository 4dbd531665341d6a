"""Exactly-once chat on an extended connection: drop repeats, acknowledge once per burst.

Chat frames of an extended connection are ``SEQ|SENDER|TEXT``, numbered per recipient.  A chat
whose SEQ is not above the account's ``last_seq`` (kept in the session's
:class:`~chatnet.client.identity.ResumeState`) was shown already and is dropped; the others
advance ``last_seq``.  After each received burst (one ``data_received`` call) the session sends
one cumulative ``0|ack|LAST_SEQ`` if anything new to acknowledge arrived.  Until acknowledged a
chat stays in the mailbox on every replica, so it is never lost either.
"""

from __future__ import annotations

from typing import NamedTuple

from .commands import OP_EXT, Command
from .identity import ResumeState

__all__ = ["SequencedChat", "parse_sequenced", "AckTracker"]


class SequencedChat(NamedTuple):
    seq: int
    sender: str
    text: str


def parse_sequenced(message: str) -> SequencedChat | None:
    """``SEQ|SENDER|TEXT`` split up, or None if the chat carries no number."""
    seq_text, sep, rest = message.partition("|")
    if not sep or not (seq_text.isascii() and seq_text.isdigit()):
        return None
    sender, _, text = rest.partition("|")
    return SequencedChat(int(seq_text), sender, text)


class AckTracker:
    """Which numbered chat is new, and which acknowledgement is due on this connection."""

    def __init__(self, resume: ResumeState) -> None:
        self.resume = resume
        self.duplicates_dropped = 0
        self._sent = 0          # highest seq acknowledged on the current connection (or account)
        self._due = False

    def connection_made(self) -> None:
        self._sent = 0
        self._due = False

    def connection_lost(self) -> None:
        self._due = False

    def account_changed(self) -> None:
        """Sequence numbers start again with another account."""
        self._sent = 0

    def receive(self, seq: int) -> bool:
        """A chat numbered ``seq`` arrived; whether it is new (to be shown).  A repeat above
        what this connection acknowledged is acknowledged again, so the server stops resending."""
        if seq > self._sent:
            self._due = True
        if seq <= self.resume.last_seq:
            self.duplicates_dropped += 1
            return False
        self.resume.last_seq = seq
        return True

    def take_ack(self) -> bytes | None:
        """The cumulative acknowledgement due after a burst, or None."""
        if not self._due:
            return None
        self._due = False
        self._sent = self.resume.last_seq
        return Command(OP_EXT, ("ack", str(self.resume.last_seq))).encode()
