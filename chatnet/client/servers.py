"""Which server to try next, and how long to wait first.

:class:`ServerChooser` keeps the rules of the session's server choice (see ``session.py``): servers
are tried in list order, starting after the one that was lost; a backup's note naming the primary
makes the primary the next attempt; after a whole *round* of failed attempts (as many as there are
servers) the next one waits a :class:`Backoff` delay.  It knows nothing of connections or frames:
the session tells it how each attempt ended and asks it for the next :class:`Retry`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from ..protocol import texts
from ..protocol.codec import INDICATOR_CHAT, STATUS_NOTE, Frame

__all__ = [
    "Server", "DEFAULT_SERVERS", "parse_server", "parse_servers", "Backoff", "Retry",
    "ServerChooser", "BACKUP_NOTE_RE", "NO_PRIMARY_NOTE", "backup_note",
]


class Server(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_SERVERS = (Server("127.0.0.1", 1538), Server("127.0.0.1", 2538), Server("127.0.0.1", 3538))


def parse_server(text: str) -> Server:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) -> Server; ValueError if malformed."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Server(host, int(port))


def parse_servers(text: str) -> tuple[Server, ...]:
    """Comma-separated ``HOST:PORT`` list; ValueError if empty or malformed."""
    servers = tuple(parse_server(part) for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError("no server given")
    return servers


# The backups' notes (status 2, indicator 0), specified by the replication design.
BACKUP_NOTE_RE = re.compile(r"This server is a backup\. The primary is at (?P<server>\S+:\d+)\.\Z")
NO_PRIMARY_NOTE = texts.T_BACKUP_UNKNOWN


class BackupNote(NamedTuple):
    """A backup's note: ``primary`` is the server it named (None: it knows none, or named one
    we cannot parse)."""

    primary: Server | None


def backup_note(frame: Frame) -> BackupNote | None:
    """The backup's note ``frame`` is, or None if it is anything else."""
    if frame.status != STATUS_NOTE or frame.indicator == INDICATOR_CHAT:
        return None
    match = BACKUP_NOTE_RE.match(frame.message)
    if not match:
        return BackupNote(None) if frame.message == NO_PRIMARY_NOTE else None
    try:
        return BackupNote(parse_server(match.group("server")))
    except ValueError:
        return BackupNote(None)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter".

    The n-th wait (n = 0, 1, ...) is drawn uniformly from [d/2, d] with
    ``d = min(cap, base * factor**n)``: never above the cap, never below half of it once the
    cap is reached (so a crowd of clients spreads out without anyone hammering a dead server)."""

    base: float = 0.5
    factor: float = 2.0
    cap: float = 5.0

    def ceiling(self, n: int) -> float:
        return min(self.cap, self.base * self.factor ** min(n, 64))

    def delay(self, n: int, rng: random.Random) -> float:
        d = self.ceiling(n)
        return d / 2 + rng.random() * d / 2


class Retry(NamedTuple):
    """The next attempt: ``server`` after ``delay`` seconds.  ``round_over`` when a whole round
    failed (the delay is then a backoff); ``attempts`` and ``reachable`` count that round."""

    server: Server
    delay: float
    round_over: bool = False
    attempts: int = 0
    reachable: int = 0


class ServerChooser:
    """Server choice and backoff for one session.

    An attempt that does not end in a *good* connection counts as a failure, except a backup's
    redirect (unless that attempt itself followed a redirect: chains of them count).  A good
    connection (the session decides when: the server answered, or the link stayed up) resets
    the count."""

    def __init__(self, servers: tuple[Server, ...], backoff: Backoff, rng: random.Random) -> None:
        self.servers = servers
        self.backoff = backoff
        self.rng = rng
        self.all_down = False               # the last round reached no server at all
        self.no_primary = False             # the last round reached only backups
        self.failures = 0                   # attempts since the last good connection
        self._index = 0                     # position in servers of the current attempt
        self._redirect: Server | None = None
        self._redirected_attempt = False    # the current attempt follows a backup's note
        self._reachable = 0                 # of the failures, how many connected (but were backups)
        self._good = False                  # the current connection is good

    def first(self) -> Server:
        return self.servers[self._index]

    def take_target(self) -> tuple[Server, bool]:
        """The server of the next attempt, and whether a backup named it (which the attempt
        remembers: a redirect from it then counts as a failure)."""
        target = self._redirect or self.servers[self._index]
        redirected = self._redirect is not None
        self._redirect = None
        return target, redirected

    def attempting(self, redirected: bool) -> None:
        self._redirected_attempt = redirected

    def connected(self) -> None:
        self._good = False

    def connect_failed(self) -> None:
        self.failures += 1
        self._advance()

    def mark_good(self) -> None:
        if not self._good:
            self._good = True
            self.failures = 0
            self._reachable = 0
            self.all_down = self.no_primary = False

    def redirected(self, primary: Server | None) -> None:
        """The server was a backup; ``primary`` (if any) is where it sent us."""
        self._reachable += 1
        if primary is not None:
            self._redirect = primary
            if primary in self.servers:
                self._index = self.servers.index(primary)

    def lost(self) -> None:
        """The connection of the current attempt ended (after :meth:`redirected`, for a backup)."""
        if self._good:
            self.failures = 0
            self._reachable = 0
        elif self._redirect is None or self._redirected_attempt:
            self.failures += 1      # a first redirect is a step forward; a chain of them is not
        self._good = False
        if self._redirect is None:
            self._advance()

    def plan(self) -> Retry:
        """The next attempt: at once within a round, after a backoff between rounds."""
        target = self._redirect or self.servers[self._index]
        n = len(self.servers)
        if not (self.failures and self.failures % n == 0):
            return Retry(target, 0.0)
        delay = self.backoff.delay(self.failures // n - 1, self.rng)
        reachable, self._reachable = self._reachable, 0
        self.all_down, self.no_primary = reachable == 0, reachable > 0
        return Retry(target, delay, True, self.failures, reachable)

    def _advance(self) -> None:
        self._index = (self._index + 1) % len(self.servers)
