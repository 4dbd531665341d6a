"""Arrival order across connections: a read is answered only from a state that includes every
command the replica received before it (sans I/O, used by :mod:`.service`).

Commands (create, login, send, delete, exit, delivery marks) take effect in log order, which is
the order the replica received them: the primary proposes them as they arrive, and every check
that depends on the state — does the account exist, is the name taken — is decided when the
command is applied.  Reads (``list``, a resume's token check, the answer to an empty chat) have
no log entry, so they would otherwise see the state *before* commands still in flight: a client
that creates ``bob`` on one connection and closes, then lists on another, would not see bob.

``ArrivalOrder`` numbers every command handed to the log (``queued``), learns the log index of
each as the host proposes it (``bound``, in the same order), and holds each read behind the
commands queued before it until the log has been applied up to the last of them
(``applied``).  With nothing in flight a read is answered at once.
"""

from __future__ import annotations

from collections import deque


class ArrivalOrder:
    def __init__(self) -> None:
        self._queued = 0  # commands handed to the log so far (numbered 1, 2, ...)
        self._bound = 0  # of those, how many the host proposed (got a log index)
        # Log indexes of bound commands not yet applied past, in command order: the index of
        # command number n is _indexes[n - _first].  Indexes grow with command numbers (the
        # host proposes in order), so what is applied is always a prefix: popped from the left,
        # O(1) per command, where a scan of every command in flight per applied entry was
        # quadratic in the batch size.
        self._indexes: deque[int] = deque()
        self._first = 1  # command number of _indexes[0]
        self._last_index = 0  # log index of the last command proposed
        self._applied = 0  # log index applied so far
        self._reads: deque = deque()  # (commands before it, read), in arrival order

    def queued(self) -> None:
        """A command was handed to the log (proposals are bound in this same order)."""
        self._queued += 1

    def bound(self, index: int) -> None:
        """The host proposed the next queued command at log ``index``."""
        self._bound += 1
        self._indexes.append(index)
        self._last_index = index

    def settled(self) -> bool:
        """Nothing received is still on its way into the state: a read may be answered now."""
        return not self._reads and self._queued == self._bound and self._last_index <= self._applied

    def defer(self, read: object) -> None:
        self._reads.append((self._queued, read))

    def applied(self, index: int) -> list | tuple:
        """The log is applied up to ``index``: the reads that may be answered now, in order
        (an empty tuple, not a new list, in the usual case of no read waiting: this runs once
        per applied entry)."""
        self._applied = index
        ready: list | tuple = ()
        if self._reads:
            ready = []
            while self._reads and self._covered(self._reads[0][0]):
                ready.append(self._reads.popleft()[1])
        indexes = self._indexes
        # the last bound one stays: settled() compares against it
        while indexes and indexes[0] <= index and self._first < self._bound:
            indexes.popleft()
            self._first += 1
        return ready

    def _covered(self, before: int) -> bool:
        if before == 0:
            return True
        if before > self._bound:
            return False
        if before < self._first:  # applied past already
            return True
        return self._indexes[before - self._first] <= self._applied

    def reset(self) -> list:
        """This replica stopped serving: commands in flight may never apply here.  Forget them
        and return the reads that were waiting (their connections are sent away)."""
        dropped = [read for _, read in self._reads]
        self.__init__()
        return dropped
