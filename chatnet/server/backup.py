"""``chatserver backup`` and ``chatserver restore``: a consistent copy of a running replica's
store, and a new replica (a new cluster) seeded from one.

Backup uses SQLite's online backup API (``sqlite3.Connection.backup``) on the replica's
``<data-dir>/chatnet.sqlite3`` while the replica runs: in WAL mode a reader never blocks the
replica's writer, and the copy is made in one step inside one read transaction, so it is
exactly the store as of one committed transaction — and the replica writes each loop iteration
in one transaction, so the applied index always goes with the state it describes.  The copy is
written to ``DEST.tmp`` (mode 0600), switched to a self-contained rollback journal, fsynced and
renamed to ``DEST``: a crash never leaves half a backup under the final name.

What a backup contains: every change the replica had made durable when the copy was taken.  An
acknowledged chat is durable on **every** member of the current view before its sender hears
"Message sent", so a backup of any current member (``chatserver status`` lists them) contains
every chat acknowledged before the backup started — in the applied tables, or in the log tail
when that replica had not applied it yet.  It may also hold chats still in flight at the time.

Restore builds a store that starts a brand-new cluster: the backup's log entries beyond its
applied index are applied to the state (what a new primary does with its log), and the result is
written as a snapshot at the last index — state, ``applied_index = snapshot_index = last index``,
no log — with the view and promise set to that entry's view (so view numbers never go back:
the restored replica's log stays newer than nothing and older than nothing it will meet) and
no primary or members (the new cluster's ``--peers`` decides them).  It is staged in
``D/.restore-*`` and renamed into place; ``D`` (created 0700) must not hold a store yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time

from .config import DEFAULT_BASE_DIR
from .state import decode_command
from .storage import Batch
from .store import Store, StoreError

STORE_NAME = "chatnet.sqlite3"
RESET_META = ("primary", "members", "config", "promised_to")  # membership of the old cluster: never carried over


class BackupError(Exception):
    """A backup or restore that cannot be made; the message says why."""


def _private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 (refusing an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(data_dir: str, dest: str) -> dict:
    """Copy the store of ``data_dir`` (running or not) to ``dest``; return its summary."""
    source = os.path.join(data_dir, STORE_NAME)
    if not os.path.exists(source):
        raise BackupError(f"no store at {source}: give the --data-dir of a replica")
    if os.path.isdir(dest):
        dest = os.path.join(dest, time.strftime("chatnet-backup-%Y%m%d-%H%M%S.sqlite3"))
    if os.path.exists(dest):
        raise BackupError(f"{dest} exists: choose another name (a backup never overwrites)")
    tmp = dest + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    _private_file(tmp)
    try:
        # A plain connection that only reads: read-only mode could fail to open the WAL of a
        # replica that was killed (recovery writes the -shm), and reading never blocks the writer.
        src = sqlite3.connect(source, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # pages=-1: the whole database in one step, one read transaction
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                summary = summarize(dst)
            finally:
                dst.close()
        finally:
            src.close()
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(os.path.dirname(os.path.abspath(dest)))
    except sqlite3.Error as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise BackupError(f"backup of {source} failed: {exc}") from None
    return {"path": dest, **summary}


def summarize(db: sqlite3.Connection) -> dict:
    """What a store holds: accounts, queued chats, log positions and the view."""
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    last = db.execute("SELECT max(idx) FROM log").fetchone()[0]
    return {
        "accounts": db.execute("SELECT count(*) FROM accounts").fetchone()[0],
        "queued_chats": db.execute("SELECT count(*) FROM mail").fetchone()[0],
        "applied_index": meta.get("applied_index", 0),
        "last_index": last if last is not None else meta.get("applied_index", 0),
        "view": meta.get("view", 0),
        "members": meta.get("members"),
    }


def restore(src: str, data_dir: str) -> dict:
    """Seed the store of a new replica in ``data_dir`` from the backup ``src``."""
    if not os.path.isfile(src):
        raise BackupError(f"no backup file {src}")
    target = os.path.join(data_dir, STORE_NAME)
    if os.path.exists(target):
        raise BackupError(f"{target} exists: restore into a new, empty data directory")
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".restore-", dir=data_dir)  # 0700
    try:
        staged = os.path.join(stage, STORE_NAME)
        _private_file(staged)
        with contextlib.closing(sqlite3.connect(src)) as s, contextlib.closing(sqlite3.connect(staged)) as d:
            s.backup(d)
        summary = _fold(stage)
        _fsync(staged)
        os.replace(staged, target)
        _fsync(data_dir)
    except (sqlite3.Error, StoreError) as exc:
        raise BackupError(f"restore of {src} failed: {exc}") from None
    finally:
        for name in os.listdir(stage):
            os.unlink(os.path.join(stage, name))
        os.rmdir(stage)
    return {"path": target, **summary}


def _fold(stage: str) -> dict:
    """In the staged copy: apply the log beyond the applied index, write the state as a
    snapshot at the last index, and reset the view and membership (module docstring)."""
    store = Store(stage)
    try:
        loaded = store.load()
        state, index, view = loaded.state, loaded.applied_index, int(loaded.meta.get("snapshot_view", 0))
        for idx, entry_view, data in loaded.log:
            if idx == index:
                view = entry_view
            elif idx > index:
                state.apply(decode_command(bytes(data)))
                index, view = idx, entry_view
        view = max(view, int(loaded.meta.get("view", 0)))
        store.commit(Batch(snapshot=(index, view, state), meta={"view": view, "promised": view}, sync=True))
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(os.path.join(stage, STORE_NAME), isolation_level=None)) as db:
        db.executemany("DELETE FROM meta WHERE key = ?", [(k,) for k in RESET_META])
        db.execute("PRAGMA journal_mode=DELETE")  # checkpointed: no -wal/-shm to carry along
    return {"accounts": len(state.accounts), "queued_chats": sum(len(b) for b in state.mailboxes.values()),
            "applied_index": index, "view": view}


def backup_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="chatserver backup",
        description="Write a consistent copy of a running replica's store to DEST (a file, or a directory "
                    "to put a time-stamped file in).  Back up any member of the current view (see "
                    "`chatserver status`): it holds every chat acknowledged before the backup started.")
    parser.add_argument("dest", metavar="DEST")
    parser.add_argument("--data-dir", default=os.path.join(DEFAULT_BASE_DIR, "1538"),
                        help=f"the replica's data directory (default: ./{DEFAULT_BASE_DIR}/1538, "
                             "the first replica of `chatserver --local`)")
    args = parser.parse_args(argv)
    try:
        summary = backup(args.data_dir, args.dest)
    except (BackupError, OSError) as exc:
        print(f"chatserver backup: {exc}", file=sys.stderr)
        return 1
    print(f"backup of {args.data_dir} written to {summary['path']}: {summary['accounts']} accounts, "
          f"{summary['queued_chats']} queued chats, log {summary['applied_index']} applied / "
          f"{summary['last_index']} last, view {summary['view']}")
    return 0


def restore_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="chatserver restore",
        description="Seed a new replica's data directory from a backup.  The restored store starts a new "
                    "cluster: start one replica on it (or restore the same backup into each replica's "
                    "directory), with any --peers list.")
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("--data-dir", required=True, help="the new replica's data directory (must hold no store)")
    args = parser.parse_args(argv)
    try:
        summary = restore(args.src, args.data_dir)
    except (BackupError, OSError) as exc:
        print(f"chatserver restore: {exc}", file=sys.stderr)
        return 1
    print(f"restored {args.src} into {summary['path']}: {summary['accounts']} accounts, "
          f"{summary['queued_chats']} queued chats, state at log index {summary['applied_index']}, view "
          f"{summary['view']}; start a replica with --data-dir {args.data_dir}")
    return 0
