"""The replica's durable store: one SQLite database in WAL mode with ``synchronous=FULL``.

This is the only module that touches SQLite.  The chat state lives in memory (issue 12): what
one loop iteration writes is its log entries and any replication hard state (view, primary,
members), by a single ``commit`` call, one transaction, one fsync (group commit) -- a few
pages per batch, whatever the batch applied.  The state is stored only as a snapshot: the blob
of ``ChatState.to_snapshot`` at an applied index, replaced now and then by the host's
checkpoints (``Batch.checkpoint``) or by a snapshot installed from the primary.  Start-up
loads it and replays the committed log after it (chatnet/server/storage.py says which entries
count as committed: the ``committed`` column, written with each row).

Tables:
    meta(key, value)           view, primary, members, promised; snapshot_index and
                               snapshot_view: the log's base (the index before its first row);
                               view_runs: the entry views up to it (replication core's runs);
                               degraded_from: first entry kept for a split brain's handover
    log(idx, view, data, committed)   replicated log entries (a bounded tail is kept);
                               ``committed``: the commit index known when the row was written
    state(id, idx, view, data) the one stored snapshot of the chat state, taken at ``idx``
    handover(idx, view, data)  a losing replica's entries not yet acknowledged by the winner
                               (docs/replication.md section 10); not chat state: a snapshot
                               leaves it alone

A store written by an earlier version (the state as rows in accounts/request_ids/mail/origins,
with meta ``applied_index``) is converted once, when it is opened: its rows become the stored
snapshot at its applied index, in one transaction.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3

from .state import ChatState, Mail
from .storage import Batch, Loaded, StoreError, Synchronous, committed_index, replay  # noqa: F401

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log(idx INTEGER PRIMARY KEY, view INTEGER NOT NULL, data BLOB NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS state(id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL,
    view INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS handover(
    idx INTEGER NOT NULL, view INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY(view, idx)) WITHOUT ROWID;
"""
OLD_STATE_TABLES = ("accounts", "request_ids", "mail", "origins")
LOG_ROWS_PER_INSERT = 64  # 256 bound values: far below SQLite's limit (999 before 3.32)
# Commits after which the storage thread, once no batch waits, checkpoints the WAL itself
# (Store.checkpoint_when_idle).  Below SQLite's automatic checkpoint (1,000 pages; a batch
# writes 1-5 pages), which stays as the fallback for a writer that is never idle.
IDLE_CHECKPOINT_COMMITS = 200


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


@functools.lru_cache(maxsize=LOG_ROWS_PER_INSERT)
def _log_insert(rows: int) -> str:
    """The multi-row INSERT of ``rows`` log rows (one text per size: sqlite3 caches it prepared)."""
    return ("INSERT OR REPLACE INTO log(idx, view, data, committed) VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * rows))


def _log_params(entries: list, committed: int) -> list:
    """The bound values of ``entries``' log rows, flat, in _log_insert's order."""
    return [v for idx, view, data in entries for v in (idx, view, data, committed)]


def _log_only(batches: list[Batch]) -> list | None:
    """The bound values of every log row of ``batches`` if they hold nothing but log rows, at
    most LOG_ROWS_PER_INSERT of them; otherwise None.  Compared against a batch made of only
    those fields, so a field added to Batch later counts as "something else"."""
    params: list = []
    for b in batches:
        if b != Batch(entries=b.entries, committed=b.committed, sync=b.sync, chats=b.chats) or not b.entries:
            return None
        params += _log_params(b.entries, b.committed)
    return params if len(params) <= 4 * LOG_ROWS_PER_INSERT else None


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
            self._sync = True
            self._commits = 0  # since the last checkpoint of the WAL (checkpoint_when_idle)
            self._upgrade()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> Loaded:
        """The stored snapshot with the committed log after it replayed (module docstring)."""
        db = self._db
        row = db.execute("SELECT idx, view, data FROM state WHERE id = 1").fetchone()
        state_index, state_view, blob = row if row is not None else (0, 0, b"")
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        rows = list(db.execute("SELECT idx, view, data, committed FROM log ORDER BY idx"))
        base = rows[0][0] - 1 if rows else state_index
        if base > state_index or (row is None and meta.get("snapshot_index", 0) > 0):
            raise StoreError(f"{self.path}: the log starts after {base} but the stored state is at "
                             f"{state_index}: the entries between are lost; restore a backup, or "
                             "empty the data directory to rejoin by catch-up")
        applied = committed_index(state_index, rows)
        try:
            state = replay(ChatState.from_snapshot(bytes(blob)) if blob else ChatState(),
                           rows, state_index, applied)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path}: the stored state or log is unreadable ({exc}); restore a "
                             "backup, or empty the data directory to rejoin by catch-up") from None
        if not rows:  # the log's base is the snapshot itself
            meta.update(snapshot_index=state_index, snapshot_view=state_view)
        handover = list(db.execute("SELECT idx, view, data FROM handover ORDER BY idx, view"))
        return Loaded(state, applied, meta, [r[:3] for r in rows], handover, state_index, len(blob))

    def _upgrade(self) -> None:
        """Convert a store of an earlier version (state rows, meta ``applied_index``) into a
        stored snapshot at its applied index, in one transaction; a no-op on a current store."""
        if "committed" not in {row[1] for row in self._db.execute("PRAGMA table_info(log)")}:
            self._db.execute("ALTER TABLE log ADD COLUMN committed INTEGER NOT NULL DEFAULT 0")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "accounts" not in tables:
            return
        with self._transaction("upgrade"):
            meta = {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}
            index = int(meta.get("applied_index", 0))
            row = self._db.execute("SELECT view FROM log WHERE idx = ?", (index,)).fetchone()
            view = row[0] if row is not None else int(meta.get("snapshot_view", 0))
            blob = self._old_state(tables).to_snapshot()
            self._db.execute("INSERT OR REPLACE INTO state(id, idx, view, data) VALUES (1, ?, ?, ?)",
                             (index, view, blob))
            self._db.execute("DELETE FROM meta WHERE key = 'applied_index'")
            for table in OLD_STATE_TABLES:
                self._db.execute(f"DROP TABLE IF EXISTS {table}")
        log.info("converted the store %s to log + snapshot (state at index %d)", self.path, index)

    def _old_state(self, tables: set) -> ChatState:
        """The chat state an earlier version kept as rows."""
        db, state = self._db, ChatState()
        columns = {row[1] for row in db.execute("PRAGMA table_info(accounts)")}
        password = "password" if "password" in columns else "NULL"
        for name, order, next_seq, token, pw in db.execute(
                f"SELECT name, ord, next_seq, token, {password} FROM accounts ORDER BY ord"):
            state.load_account(name, order, next_seq, token, pw)
        for account, pos, rid in db.execute("SELECT account, pos, rid FROM request_ids ORDER BY account, pos"):
            state.load_request_id(account, pos, rid)
        for recipient, seq, sender, text, deleted in db.execute(
                "SELECT recipient, seq, sender, text, sender_deleted FROM mail ORDER BY recipient, seq"):
            state.load_mail(recipient, Mail(seq, sender, text, bool(deleted)))
        if "origins" in tables:
            for pos, view, index in db.execute("SELECT pos, view, idx FROM origins ORDER BY pos"):
                state.load_origin(pos, view, index)
        return state

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
        params = _log_only(batches)
        if params is not None:  # the common case: one statement is the whole transaction
            self._autocommit_log(params)
        else:
            with self._transaction("write"):
                for batch in batches:
                    self._write(batch)
        self._commits += 1

    def _autocommit_log(self, params: list) -> None:
        """Batches of log rows only, up to LOG_ROWS_PER_INSERT: one ``INSERT`` outside any
        ``BEGIN`` is its own transaction, committed (WAL fsync at synchronous=FULL) before the
        call returns and rolled back whole if it fails -- the same atomicity and durability as
        ``BEGIN … COMMIT`` with one SQLite call instead of three, each a GIL hand-off."""
        try:
            self._db.execute(_log_insert(len(params) // 4), params)
        except sqlite3.Error as exc:
            raise StoreError(f"write in {self.path} failed: {exc}") from exc

    def checkpoint_when_idle(self) -> bool:
        """Checkpoint the WAL if enough commits went into it since the last one; True if done.

        The storage thread calls this when no batch is waiting, right after it has released
        the last batch: the copy of the WAL's pages into the database file (and its fsync) then
        runs while the loop answers and the clients send again, instead of inside a later
        ``COMMIT`` that SQLite's automatic checkpoint would delay by it (about 1 ms here,
        docs/benchmarks.md "The durable commit").  Durability is unchanged: every commit is
        acknowledged only after its own WAL fsync (synchronous=FULL), exactly as before; a
        checkpoint only copies pages already durable in the WAL, fsyncs the WAL before and the
        database file after copying (SQLite does this in both synchronous modes), and the WAL
        is reused from its start only after a checkpoint that completed.  So when it runs
        decides nothing about what a crash can lose.  PASSIVE: it never waits for a reader
        (a running backup); what the reader still needs is copied next time.
        """
        if self._commits < IDLE_CHECKPOINT_COMMITS:
            return False
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"checkpoint of {self.path} failed: {exc}") from exc
        self._commits = 0
        return True

    def _write(self, batch: Batch) -> None:
        db = self._db
        if batch.snapshot is not None:  # installed: replaces the state and the whole log
            self._put_state(*batch.snapshot)
            db.execute("DELETE FROM log")
        if batch.checkpoint is not None:
            self._put_state(*batch.checkpoint)
        if batch.truncate_after is not None:
            db.execute("DELETE FROM log WHERE idx > ?", (batch.truncate_after,))
        if batch.entries:
            self._insert_log(batch.entries, batch.committed)
        if batch.meta:
            db.executemany(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in batch.meta.items()]
            )
        if batch.compact_upto is not None:
            db.execute("DELETE FROM log WHERE idx <= ?", (batch.compact_upto,))
        if batch.handover is not None:
            db.execute("DELETE FROM handover")
            db.executemany("INSERT OR REPLACE INTO handover(idx, view, data) VALUES (?, ?, ?)", batch.handover)

    def _insert_log(self, entries: list, committed: int) -> None:
        """The log rows, up to LOG_ROWS_PER_INSERT per multi-row ``INSERT``: one SQLite step for
        a batch instead of ``executemany``'s one per row, each of which lets the GIL go and takes
        it back from the loop thread (rows apply in order, so a later one replaces an earlier
        one with the same index, exactly as before)."""
        for start in range(0, len(entries), LOG_ROWS_PER_INSERT):
            chunk = entries[start:start + LOG_ROWS_PER_INSERT]
            self._db.execute(_log_insert(len(chunk)), _log_params(chunk, committed))

    def _put_state(self, index: int, view: int, state: ChatState | bytes) -> None:
        """Store the chat state as of ``index`` (inside the caller's transaction)."""
        blob = bytes(state) if isinstance(state, (bytes, bytearray)) else state.to_snapshot()
        self._db.execute("INSERT OR REPLACE INTO state(id, idx, view, data) VALUES (1, ?, ?, ?)",
                         (index, view, blob))

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
