"""The replica's durable store: one SQLite database in WAL mode with ``synchronous=FULL``.

This is the only module that touches SQLite.  Everything one loop iteration changed is
written by a single ``commit`` call, one transaction, one fsync (group commit): the log
entries appended, the row changes of the commands applied, the applied index and any
replication hard state (view, primary, members).  Because the applied index lives in the same
transaction as the rows it describes, it can never point past the state, and because log rows
are only deleted up to the applied index, it can never point past the log either.

Tables:
    meta(key, value)                       applied_index, view, primary, members, snapshot_*
    log(idx, view, data)                   replicated log entries (a bounded tail is kept)
    accounts(name, ord, next_seq, token, password)   the chat state machine's accounts (password:
                                           the scrypt record, chatnet/server/passwords.py)
    request_ids(account, pos, rid)         each account's recent send request ids
    mail(recipient, seq, sender, text, sender_deleted)   acknowledged, undelivered chat
    origins(pos, view, idx)                origins of a healed split brain's re-applied commands
    handover(idx, view, data)              a losing replica's entries not yet acknowledged by the
                                           winner (docs/replication.md section 10); not chat state:
                                           a snapshot leaves it alone
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3

from .state import ChatState, Mail
from .storage import Batch, Loaded, StoreError, Synchronous  # noqa: F401 (StoreError re-exported)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log(idx INTEGER PRIMARY KEY, view INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS accounts(
    name TEXT PRIMARY KEY, ord INTEGER NOT NULL, next_seq INTEGER NOT NULL, token TEXT);
CREATE TABLE IF NOT EXISTS request_ids(
    account TEXT NOT NULL, pos INTEGER NOT NULL, rid TEXT NOT NULL, PRIMARY KEY(account, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mail(
    recipient TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL, text TEXT NOT NULL,
    sender_deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(recipient, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mail_by_sender ON mail(sender);
CREATE TABLE IF NOT EXISTS origins(pos INTEGER PRIMARY KEY, view INTEGER NOT NULL, idx INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS handover(
    idx INTEGER NOT NULL, view INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(view, idx)) WITHOUT ROWID;
"""


def _private_files(path: str) -> None:
    """Create the database file 0600 if missing, and take group and other access away from it
    and its -wal and -shm files if they have any (stores made before modes were enforced).
    SQLite gives the -wal and -shm files it creates the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(name).st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, mode & 0o700)


class Store(Synchronous):
    def __init__(self, data_dir: str):
        # The store holds every account's resume token and all undelivered chat: only the
        # user running the replica may read it.  Its directory is created 0700 (an existing
        # one is left as the operator made it) and the database files are 0600.
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(data_dir, "chatnet.sqlite3")
        try:
            _private_files(self.path)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.path}: {exc}") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(accounts)")}
            if "password" not in columns:  # a store made before passwords (extension 2)
                self._db.execute("ALTER TABLE accounts ADD COLUMN password TEXT")
            self._sync = True
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> Loaded:
        db = self._db
        state = ChatState()
        for name, order, next_seq, token, password in db.execute(
                "SELECT name, ord, next_seq, token, password FROM accounts ORDER BY ord"):
            state.load_account(name, order, next_seq, token, password)
        for account, pos, rid in db.execute("SELECT account, pos, rid FROM request_ids ORDER BY account, pos"):
            state.load_request_id(account, pos, rid)
        for recipient, seq, sender, text, deleted in db.execute(
            "SELECT recipient, seq, sender, text, sender_deleted FROM mail ORDER BY recipient, seq"
        ):
            state.load_mail(recipient, Mail(seq, sender, text, bool(deleted)))
        for pos, view, index in db.execute("SELECT pos, view, idx FROM origins ORDER BY pos"):
            state.load_origin(pos, view, index)
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        applied = int(meta.get("applied_index", 0))
        entries = list(db.execute("SELECT idx, view, data FROM log ORDER BY idx"))
        handover = list(db.execute("SELECT idx, view, data FROM handover ORDER BY idx, view"))
        return Loaded(state, applied, meta, entries, handover)

    def log_entries(self, after: int, limit: int = 10_000) -> list[tuple[int, int, bytes]]:
        return list(
            self._db.execute("SELECT idx, view, data FROM log WHERE idx > ? ORDER BY idx LIMIT ?", (after, limit))
        )

    def digest(self) -> str:
        """A digest of the chat state (accounts and mail), equal on replicas that agree."""
        import hashlib

        h = hashlib.sha256()
        for row in self._db.execute("SELECT name, ord, next_seq FROM accounts ORDER BY name"):
            h.update(repr(row).encode())
        for row in self._db.execute("SELECT recipient, seq, sender, text, sender_deleted FROM mail ORDER BY recipient, seq"):
            h.update(repr(row).encode())
        return h.hexdigest()

    # -- writing -----------------------------------------------------------------------------
    def commit(self, batch: Batch) -> None:
        """Write one loop iteration's work (:class:`~.storage.Batch`) in one transaction."""
        self.commit_many([batch])

    def commit_many(self, batches: list[Batch]) -> None:
        """Write ``batches`` in order, in one transaction (group commit across iterations).

        When any of them is ``sync`` (log entries, truncation, hard state or an installed
        snapshot inside) it returns only once the transaction is on disk (synchronous=FULL).
        Otherwise — only applying entries that are already durable in the log — the commit
        skips the fsync: a crash can lose it, but atomically (applied index and rows together),
        and the entries are applied again from the log at restart.  WAL order keeps it before
        any later synced transaction.
        """
        sync = any(batch.sync for batch in batches)
        if sync != self._sync:
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
            self._sync = sync
        with self._transaction("write"):
            for batch in batches:
                self._write(batch)

    def _write(self, batch: Batch) -> None:
        db = self._db
        if batch.snapshot is not None:
            self._replace_state(*batch.snapshot)
        if batch.truncate_after is not None:
            db.execute("DELETE FROM log WHERE idx > ?", (batch.truncate_after,))
        if batch.entries:
            db.executemany("INSERT OR REPLACE INTO log(idx, view, data) VALUES (?, ?, ?)", batch.entries)
        self._apply_changes(batch.changes)
        meta = dict(batch.meta)
        if batch.applied_index is not None:
            meta["applied_index"] = batch.applied_index
        if meta:
            db.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
            )
        if batch.compact_upto is not None:
            db.execute("DELETE FROM log WHERE idx <= ?", (batch.compact_upto,))
        if batch.handover is not None:
            db.execute("DELETE FROM handover")
            db.executemany("INSERT OR REPLACE INTO handover(idx, view, data) VALUES (?, ?, ?)", batch.handover)

    # Row changes that commute with each other between two barriers: within a run they are
    # written table by table with executemany (inserts before deletes: a delivered mark never
    # covers chat inserted after it, and chat is only ever inserted above every delivered seq).
    _RUN_SQL = (
        ("mail+", "INSERT INTO mail(recipient, seq, sender, text, sender_deleted) VALUES (?, ?, ?, ?, 0)"),
        ("rid+", "INSERT INTO request_ids(account, pos, rid) VALUES (?, ?, ?)"),
        ("origin+", "INSERT INTO origins(pos, view, idx) VALUES (?, ?, ?)"),
        ("next_seq", "UPDATE accounts SET next_seq = ? WHERE name = ?"),
        ("token", "UPDATE accounts SET token = ? WHERE name = ?"),
        ("password", "UPDATE accounts SET password = ? WHERE name = ?"),
        ("mail-", "DELETE FROM mail WHERE recipient = ? AND seq <= ?"),
        ("rid-", "DELETE FROM request_ids WHERE account = ? AND pos <= ?"),
        ("origin-", "DELETE FROM origins WHERE pos <= ?"),
    )
    _LAST_WINS = {"next_seq", "token", "password"}  # per account, only the last value of a run matters

    def _apply_changes(self, changes) -> None:
        db = self._db
        run: dict[str, list] = {}
        for change in changes:
            kind = change[0]
            if kind in ("mail+", "rid+", "mail-", "rid-", "origin+", "origin-"):
                run.setdefault(kind, []).append(change[1:])
            elif kind in self._LAST_WINS:  # (an account's password follows its account+ barrier)
                run.setdefault(kind, {})[change[1]] = change[2]
            else:  # a barrier: account created or deleted, a sender's chat marked deleted
                self._flush_run(run)
                if kind == "account+":
                    db.execute("INSERT INTO accounts(name, ord, next_seq, token) VALUES (?, ?, 1, ?)", change[1:])
                elif kind == "account-":
                    db.execute("DELETE FROM accounts WHERE name = ?", change[1:])
                    db.execute("DELETE FROM mail WHERE recipient = ?", change[1:])
                    db.execute("DELETE FROM request_ids WHERE account = ?", change[1:])
                elif kind == "sender-deleted":
                    db.execute("UPDATE mail SET sender_deleted = 1 WHERE sender = ?", change[1:])
                else:
                    raise ValueError(f"unknown change {kind!r}")
        self._flush_run(run)

    def _flush_run(self, run: dict) -> None:
        for kind, sql in self._RUN_SQL:
            rows = run.get(kind)
            if rows:
                if kind in self._LAST_WINS:
                    rows = [(value, name) for name, value in rows.items()]
                self._db.executemany(sql, rows)
        run.clear()

    def _replace_state(self, index: int, view: int, state: ChatState | bytes) -> None:
        """Replace the whole chat state and the log with a snapshot taken at ``index``
        (inside the caller's transaction)."""
        if isinstance(state, (bytes, bytearray)):
            state = ChatState.from_snapshot(state)
        db = self._db
        for table in ("accounts", "mail", "request_ids", "origins", "log"):
            db.execute(f"DELETE FROM {table}")
        db.executemany(
            "INSERT INTO accounts(name, ord, next_seq, token, password) VALUES (?, ?, ?, ?, ?)",
            [(a.name, a.order, a.next_seq, a.token, a.password) for a in state.accounts.values()],
        )
        db.executemany(
            "INSERT INTO request_ids(account, pos, rid) VALUES (?, ?, ?)",
            [(a.name, pos, rid) for a in state.accounts.values() for rid, pos in a.request_ids.items()],
        )
        db.executemany(
            "INSERT INTO mail(recipient, seq, sender, text, sender_deleted) VALUES (?, ?, ?, ?, ?)",
            [(name, m.seq, m.sender, m.text, int(m.sender_deleted))
             for name, box in state.mailboxes.items() for m in box],
        )
        db.executemany("INSERT INTO origins(pos, view, idx) VALUES (?, ?, ?)",
                       [(pos, view, idx) for (view, idx), pos in state.origins.items()])
        db.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in
             {"snapshot_index": index, "snapshot_view": view, "applied_index": index}.items()],
        )

    @contextlib.contextmanager
    def _transaction(self, what: str):
        """BEGIN IMMEDIATE … COMMIT; on any SQLite error roll back and raise StoreError."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            yield
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"{what} in {self.path} failed: {exc}") from exc

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass
