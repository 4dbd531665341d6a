"""The client's durable state: resume tokens, last sequence numbers and history, in SQLite.

Why it exists: the server deletes a chat once the client acknowledges it, so the client must
keep it itself — both to resume after a restart of the *client* (``7|NAME|TOKEN|LAST_SEQ``
needs the token and the last sequence number shown) and to show the conversation again.

* One SQLite file per server list, ``servers-<digest>.sqlite3`` in the state directory
  (``--state-dir``, else ``$XDG_DATA_HOME/chatnet``, else ``~/.local/share/chatnet``): the
  directory is 0700, the files 0600 (a token lets anyone resume the session).
* ``accounts``: per account, the resume token (None after a clean exit: the server clears it)
  and the highest chat sequence number stored.  ``history``: what was shown, with its time.
* :meth:`StateStore.persist` carries out the session's :class:`~chatnet.client.events.Persist`
  action in one transaction, committed with ``synchronous=FULL`` *before* the driver carries
  out the actions after it — the acknowledgement among them.  An acknowledged chat is
  therefore always on disk, and the stored ``last_seq`` never lags behind what was shown.
* A file that is not ours (another application id, another server list, an unknown schema) or
  is corrupt is moved aside as ``NAME.bad-TIME`` with its ``-wal``/``-shm``, and a fresh one is
  made; :attr:`StateStore.notices` says so.  An I/O error later disables the store (with a
  notice) rather than crash the client: chat is still shown, only not kept.
* :meth:`StateStore.claim`: one running client per account may resume with the saved token.
  Two clients resuming with the same token would take the session from each other on every
  reconnect, so a client holds an ``flock`` on ``FILE.<digest>.lock`` (0600) for the account it
  logs in as; the kernel drops it when the process dies, even by SIGKILL.

The session never touches this module (it is sans-I/O): the driver and the front ends do.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import stat
import time
from dataclasses import dataclass

from .events import Persist
from .identity import SavedResume

__all__ = ["StateStore", "HistoryRow", "default_state_dir", "state_file_name", "APPLICATION_ID"]

APPLICATION_ID = 0x43484331          # "CHC1": a chatnet client state file
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE accounts (name TEXT PRIMARY KEY, token TEXT, last_seq INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE history (id INTEGER PRIMARY KEY, account TEXT NOT NULL, at REAL NOT NULL,
                      kind TEXT NOT NULL, peer TEXT NOT NULL, text TEXT NOT NULL, seq INTEGER);
CREATE INDEX history_by_account ON history (account, id);
CREATE INDEX history_by_peer ON history (account, peer, id);
"""


class StateError(Exception):
    """The state file cannot be used (the message says why)."""


@dataclass(frozen=True)
class HistoryRow:
    """One stored line: ``kind`` is "in" (chat from ``peer``), "out" (chat to ``peer``) or
    "note" (``peer`` empty); ``at`` is the wall-clock time it was stored."""

    id: int
    at: float
    kind: str
    peer: str
    text: str
    seq: int | None = None


def default_state_dir() -> str:
    """``$XDG_DATA_HOME/chatnet``, or ``~/.local/share/chatnet`` (the XDG base directory spec)."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    if not os.path.isabs(base):          # the spec says to ignore a relative value
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "chatnet")


def servers_key(servers) -> str:
    """The server list as stored: ``host:port`` entries sorted, so the same cluster listed in
    another order shares its state."""
    return ",".join(sorted(str(s) for s in servers))


def state_file_name(servers) -> str:
    digest = hashlib.sha256(servers_key(servers).encode("utf-8")).hexdigest()[:16]
    return f"servers-{digest}.sqlite3"


class StateStore:
    """The state file of one server list.  ``history=False`` (``--no-history``) keeps only the
    resume state.  Open with :meth:`open`, which never raises for a bad file."""

    def __init__(self, path: str, servers, history: bool = True) -> None:
        self.path = path
        self.servers = servers_key(servers)
        self.history = history
        self.notices: list[str] = []     # what the user should be told (a file moved aside...)
        self.db: sqlite3.Connection | None = None
        self._locks: dict[str, int] = {}     # account -> descriptor of its held lock file

    @classmethod
    def open(cls, directory: str, servers, history: bool = True) -> StateStore:
        """The store in ``directory`` (created 0700), with its file (created 0600).  A corrupt
        or foreign file is moved aside and replaced; if even that fails the store is disabled
        (:attr:`enabled` False) and :attr:`notices` says why."""
        store = cls(os.path.join(directory, state_file_name(servers)), servers, history)
        try:
            _make_private_dir(directory)
            store._connect()
        except StateError as exc:
            store._set_aside(str(exc))
        except (OSError, sqlite3.Error) as exc:
            store._disable(f"cannot use the state directory {directory}: {exc}")
        return store

    @property
    def enabled(self) -> bool:
        return self.db is not None

    # ------------------------------------------------------------------------ opening
    def _connect(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        _make_private_file(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        try:
            self._check(db)
        except BaseException:
            db.close()
            raise
        self.db = db

    def _check(self, db: sqlite3.Connection) -> None:
        """Make ``db`` ours (a new, empty file) or prove it is; StateError if it is not.  A
        foreign file is looked at, never changed."""
        try:
            if db.execute("PRAGMA application_id").fetchone()[0] == 0:
                self._create(db)
            if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise StateError(f"{self.path} is not a chatnet client state file")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise StateError(f"{self.path} has an unknown layout (version {version})")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StateError(f"{self.path} is damaged")
            row = db.execute("SELECT value FROM meta WHERE key = 'servers'").fetchone()
            if row is None or row[0] != self.servers:
                raise StateError(f"{self.path} belongs to other servers ({row[0] if row else 'none'})")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path} is not a readable SQLite database ({exc})") from None

    def _create(self, db: sqlite3.Connection) -> None:
        """Lay out an empty file (another client may be doing the same: checked again inside
        the write transaction).  A non-empty file without our id is left alone."""
        with _transaction(db):
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                return
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("INSERT INTO meta VALUES ('servers', ?)", (self.servers,))

    def _set_aside(self, reason: str) -> None:
        """Move the bad file (and its WAL) aside and start afresh."""
        aside = f"{self.path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self._connect()
        except (OSError, sqlite3.Error, StateError) as exc:
            self._disable(f"{reason}; could not start a fresh one either ({exc})")
            return
        self.notices.append(f"{reason}: moved it to {aside} and started with fresh state "
                            "(saved sessions and history are in the old file)")

    def _disable(self, why: str) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        self.db = None
        self.notices.append(f"{why}; nothing is kept on disk in this run")

    # ------------------------------------------------------------------------ claims
    def claim(self, account: str) -> bool:
        """Hold ``account``'s lock (until :meth:`release_others` or exit); False when another
        running client holds it.  True when the store is disabled (nothing to share)."""
        if self.db is None or account in self._locks:
            return True
        digest = hashlib.sha256(account.encode("utf-8")).hexdigest()[:16]
        try:
            fd = os.open(f"{self.path}.{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return True                      # cannot tell: as without the lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._locks[account] = fd
        return True

    def release_others(self, account: str | None) -> None:
        """Let go of every account lock but ``account``'s."""
        for name in [name for name in self._locks if name != account]:
            os.close(self._locks.pop(name))

    def close(self) -> None:
        self.release_others(None)
        if self.db is not None:
            self.db.close()
            self.db = None

    # ------------------------------------------------------------------ resume state
    def load_accounts(self) -> dict[str, SavedResume]:
        """Every account's saved resume state (the session's ``saved``); {} if disabled."""
        rows = self._query("SELECT name, token, last_seq FROM accounts", ())
        return {name: SavedResume(token, last_seq) for name, token, last_seq in rows}

    def persist(self, action: Persist) -> None:
        """Carry out a :class:`Persist` in one transaction, durable (``synchronous=FULL``) when
        this returns: the driver sends the acknowledgement after it.  Never raises: a failure
        disables the store (with a notice)."""
        if self.db is None:
            return
        now = time.time()
        try:
            with _transaction(self.db):
                if action.forget:
                    self.db.execute("DELETE FROM accounts WHERE name = ?", (action.user,))
                else:
                    self.db.execute(
                        "INSERT INTO accounts VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                        "token = excluded.token, last_seq = excluded.last_seq, updated = excluded.updated",
                        (action.user, action.token, action.last_seq, now))
                if self.history:
                    self.db.executemany(
                        "INSERT INTO history (account, at, kind, peer, text, seq) VALUES (?, ?, 'in', ?, ?, ?)",
                        [(action.user, now, c.sender, c.text, c.seq) for c in action.chats])
        except sqlite3.Error as exc:
            self._disable(f"could not save the client state in {self.path} ({exc})")

    # ----------------------------------------------------------------------- history
    def record(self, account: str, kind: str, peer: str, text: str) -> None:
        """Keep a line that has no ordering constraint (a chat sent, a note, a chat without a
        sequence number).  Nothing with ``--no-history``."""
        if self.db is None or not self.history:
            return
        try:
            with _transaction(self.db):
                self.db.execute("INSERT INTO history (account, at, kind, peer, text) VALUES (?, ?, ?, ?, ?)",
                                (account, time.time(), kind, peer, text))
        except sqlite3.Error as exc:
            self._disable(f"could not save history in {self.path} ({exc})")

    def recent(self, account: str, limit: int, before: int | None = None) -> list[HistoryRow]:
        """The last ``limit`` lines of ``account``'s history (before row id ``before``), oldest
        first."""
        if not self.history:
            return []
        rows = self._query("SELECT id, at, kind, peer, text, seq FROM history WHERE account = ? AND id < ? "
                           "ORDER BY id DESC LIMIT ?", (account, before or 2**62, max(0, limit)))
        return [HistoryRow(*row) for row in reversed(rows)]

    def next_id(self) -> int:
        """The id the next history row will have at least (rows below it exist now)."""
        rows = self._query("SELECT coalesce(max(id), 0) FROM history", ())
        return (rows[0][0] if rows else 0) + 1

    def conversation(self, account: str, peer: str, limit: int = 10000) -> list[HistoryRow]:
        """``account``'s last ``limit`` lines with ``peer`` (chat both ways), oldest first."""
        if not self.history:
            return []
        rows = self._query("SELECT id, at, kind, peer, text, seq FROM history WHERE account = ? AND peer = ? "
                           "ORDER BY id DESC LIMIT ?", (account, peer, limit))
        return [HistoryRow(*row) for row in reversed(rows)]

    def _query(self, sql: str, params) -> list[tuple]:
        if self.db is None:
            return []
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._disable(f"could not read the client state in {self.path} ({exc})")
            return []


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass


def _make_private_dir(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700; an existing one is narrowed to 0700, since
    it holds resume tokens."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)


def _make_private_file(path: str) -> None:
    """Narrow ``path`` and its SQLite companions to 0600 (SQLite gives ``-wal`` and ``-shm``
    the mode of the database file)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            if stat.S_IMODE(os.stat(path + suffix).st_mode) != 0o600:
                os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass
