"""List answers that continue in further frames.

A list answer longer than one frame goes on in further status-0 frames whose message starts with
``- `` (one name per line).  Such a frame answers no new request: it belongs to the list before
it.  A frame can only be followed by a continuation if it is nearly full, so the session waits
for one (and counts the list as unanswered) only then.
"""

from __future__ import annotations

from ..protocol.codec import MAX_FRAME_BYTES, STATUS_OK, Frame
from .commands import OP_LIST
from .outbox import Pending

__all__ = ["ListContinuation"]

# A list line is "- " + a name of at most 32 characters of up to 4 bytes + "\n".
_LIST_CONTINUATION_SLACK = 2 + 32 * 4 + 1


class ListContinuation:
    """The list answer (if any) that the next frame may continue."""

    def __init__(self) -> None:
        self.open: Pending | None = None

    def continued(self, frame: Frame) -> Pending | None:
        """The list request ``frame`` continues the answer to, or None (it is something else;
        no list is open after it)."""
        opened, self.open = self.open, None
        if opened is None or frame.status != STATUS_OK or not frame.message.startswith("- "):
            return None
        self._check(opened, frame)
        return opened

    def answered(self, pending: Pending, frame: Frame) -> None:
        """``frame`` answers ``pending``: if it is a list that may go on, wait for the rest."""
        if pending.command.op == OP_LIST and frame.status == STATUS_OK:
            self._check(pending, frame)

    def _check(self, pending: Pending, frame: Frame) -> None:
        if len(frame.message.encode("utf-8")) >= MAX_FRAME_BYTES - _LIST_CONTINUATION_SLACK:
            self.open = pending
