"""``chatserver backup`` and ``chatserver restore``: a consistent copy of a replica's store,
taken on its machine (``--data-dir``) or over the network (``--server``/``--peers``), and a new
replica (a new cluster) seeded from one.

The store is the durable record of a replica (chatnet/server/store.py): the stored snapshot of
the chat state plus the log after it.  Backup copies it with SQLite's online backup API
(``sqlite3.Connection.backup``) while the replica runs: in WAL mode a reader never blocks the
replica's writer, and the copy is made in one step inside one read transaction, so it is
exactly the store as of one committed transaction -- a snapshot and the log entries written
with it and after it.  The copy is written to ``DEST.tmp`` (mode 0600), switched to a
self-contained rollback journal, fsynced and renamed to ``DEST``: a crash never leaves half a
backup under the final name.

Over the network (``chatserver backup DEST --server HOST:PORT``, or ``--peers``: the primary
they name) the replica makes that copy itself, on a thread of its own, and sends it back after
the HMAC challenge of the authenticated status query (chatnet/server/status.py) with the cluster
secret: ``CHATNET-BACKUP-AUTH``, a nonce line, the proof line, then one JSON line (``size``,
``sha256``, or ``error``) and the copy's bytes.  The client checks size and digest and stores
the file exactly as the local form does.

What a backup contains: every change the replica had made durable when the copy was taken.  An
acknowledged chat is durable on **every** member of the current view before its sender hears
"Message sent", so a backup of any current member (``chatserver status`` lists them; the
network form without ``--server`` asks the primary) contains every chat acknowledged before the
backup started -- in the snapshot, or in the log after it.  It may also hold chats still in
flight at the time.

Restore builds a store that starts a brand-new cluster: every log entry beyond the snapshot is
applied to the state (what a new primary does with its log), and the result is written as the
stored snapshot at the last index, with no log, with the view and promise set to that entry's
view (so view numbers never go back: the restored replica's log stays newer than nothing and
older than nothing it will meet) and no primary or members (the new cluster's ``--peers``
decides them).  It is staged in ``D/.restore-*`` and renamed into place; ``D`` (created 0700)
must not hold a store yet.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import ssl
import sys
import tempfile
import threading
import time

from .config import DEFAULT_BASE_DIR, DEFAULT_PEERS, Address, ConfigError, parse_address, parse_peers
from .state import ChatState, decode_command
from .status import status_proof
from .storage import Batch, replay
from .store import Store, StoreError

STORE_NAME = "chatnet.sqlite3"
RESET_META = ("primary", "members", "config", "promised_to")  # membership of the old cluster: never carried over
CHUNK = 1 << 20  # bytes read from the network at a time


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


def copy_store(source: str, dest: str) -> None:
    """SQLite's online backup of the store ``source`` into the new file ``dest`` (one read
    transaction; never blocks the replica's writer), made one self-contained file."""
    # A plain connection that only reads: read-only mode could fail to open the WAL of a
    # replica that was killed (recovery writes the -shm), and reading never blocks the writer.
    with contextlib.closing(sqlite3.connect(source, timeout=30)) as src, \
            contextlib.closing(sqlite3.connect(dest)) as dst:
        src.backup(dst)  # pages=-1: the whole database in one step, one read transaction
        dst.execute("PRAGMA journal_mode=DELETE")


def _destination(dest: str) -> str:
    """The backup file's name (a directory gets a time-stamped file), refusing to overwrite."""
    if os.path.isdir(dest):
        dest = os.path.join(dest, time.strftime("chatnet-backup-%Y%m%d-%H%M%S.sqlite3"))
    if os.path.exists(dest):
        raise BackupError(f"{dest} exists: choose another name (a backup never overwrites)")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):  # else: "No such file or directory: 'DEST.tmp'", a name never given
        raise BackupError(f"no directory {parent} to write the backup in: create it first")
    return dest


@contextlib.contextmanager
def _staged(dest: str):
    """Yield ``DEST.tmp`` (new, 0600) to fill; then fsync it and rename it to ``dest``, or
    remove it if filling failed."""
    tmp = dest + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    _private_file(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(os.path.dirname(os.path.abspath(dest)))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def backup(data_dir: str, dest: str) -> dict:
    """Copy the store of ``data_dir`` (running or not) to ``dest``; return its summary."""
    source = os.path.join(data_dir, STORE_NAME)
    if not os.path.exists(source):
        raise BackupError(f"no store at {source}: give the --data-dir of a replica")
    dest = _destination(dest)
    try:
        with _staged(dest) as tmp:
            copy_store(source, tmp)
            summary = summarize(tmp)
    except (sqlite3.Error, StoreError) as exc:
        raise BackupError(f"backup of {source} failed: {exc}") from None
    return {"path": dest, **summary}


def summarize(path: str) -> dict:
    """What the backup file ``path`` holds: accounts, queued chats (the state with every logged
    entry applied, as a restore would make it), log positions and the view."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        row = db.execute("SELECT idx, data FROM state WHERE id = 1").fetchone()
        entries = list(db.execute("SELECT idx, view, data FROM log ORDER BY idx"))
    state = ChatState.from_snapshot(bytes(row[1])) if row is not None else ChatState()
    snapshot_index = row[0] if row is not None else 0
    last = entries[-1][0] if entries else snapshot_index
    replay(state, entries, snapshot_index, last)
    return {"accounts": len(state.accounts), "queued_chats": sum(len(b) for b in state.mailboxes.values()),
            "snapshot_index": snapshot_index, "last_index": last, "view": meta.get("view", 0),
            "members": meta.get("members")}


class StoreCopy:
    """The replica's side of a network backup: a copy of its store made on a thread of its
    own (copy_store never blocks the storage thread), read into memory, its file removed;
    ``wake`` tells the reactor it is ready (:meth:`answer`)."""

    def __init__(self, store_path: str, wake) -> None:
        self.store_path, self.wake = store_path, wake
        self.done = False
        self.data: bytes | None = None
        self.error: str | None = None
        threading.Thread(target=self._run, name="chatnet-backup", daemon=True).start()

    def _run(self) -> None:
        stage = tempfile.mkdtemp(prefix=".backup-", dir=os.path.dirname(self.store_path))
        path = os.path.join(stage, STORE_NAME)
        try:
            _private_file(path)
            copy_store(self.store_path, path)
            with open(path, "rb") as f:
                self.data = f.read()
        except (OSError, sqlite3.Error) as exc:
            self.error = f"the replica could not copy its store: {exc}"
        finally:
            for name in os.listdir(stage):
                os.unlink(os.path.join(stage, name))
            os.rmdir(stage)
            self.done = True
            self.wake()

    def answer(self) -> bytes:
        """The header line and the copy (or the error line)."""
        if self.data is None:
            return json.dumps({"error": self.error}).encode() + b"\n"
        head = {"size": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()}
        return json.dumps(head).encode() + b"\n" + self.data


def fetch_backup(host: str, port: int, dest: str, secret: bytes, cluster: bytes | None = None, *,
                 tls: ssl.SSLContext | None = None, timeout: float = 600.0) -> dict:
    """Ask the replica at ``host:port`` for a copy of its store (module docstring) and write
    it to ``dest`` as :func:`backup` does; return its summary.  ``cluster``: the cluster id
    the proof is bound to (None: the one the replica names with its nonce, as ``status``)."""
    from ..protocol.texts import BACKUP_PREFACE

    dest = _destination(dest)
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            sock.settimeout(timeout)
            reader = sock.makefile("rb")
            sock.sendall(BACKUP_PREFACE)
            nonce_hex, _, named = reader.readline().strip().partition(b" ")
            nonce = bytes.fromhex(nonce_hex.decode("ascii"))
            sock.sendall(status_proof(secret, named if cluster is None else cluster, nonce).hex().encode() + b"\n")
            head = json.loads(reader.readline() or b"{}")
            if "size" not in head:
                raise BackupError(f"{host}:{port} refused: {head.get('error', 'no answer')}")
            with _staged(dest) as tmp:
                _receive(reader, tmp, head)
                summary = summarize(tmp)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise BackupError(f"backup from {host}:{port} failed: {exc}") from None
    return {"path": dest, **summary}


def _receive(reader, path: str, head: dict) -> None:
    """Read the copy's ``size`` bytes into ``path``, checking its digest."""
    digest, left = hashlib.sha256(), int(head["size"])
    with open(path, "wb") as out:
        while left:
            chunk = reader.read(min(left, CHUNK))
            if not chunk:
                raise BackupError(f"the connection closed {left} bytes before the end of the copy")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if digest.hexdigest() != head.get("sha256"):
        raise BackupError("the copy received does not match its digest")


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
    """In the staged copy: apply the log beyond the committed part, write the state as the
    stored snapshot at the last index, and reset the view and membership (module docstring)."""
    store = Store(stage)
    try:
        loaded = store.load()
        state, index, view = loaded.state, loaded.applied_index, int(loaded.meta.get("snapshot_view", 0))
        for idx, entry_view, data in loaded.log:
            if idx == index:
                view = entry_view
            elif idx > index:
                state.apply(decode_command(bytes(data)), idx)
                index, view = idx, entry_view
        view = max(view, int(loaded.meta.get("view", 0)))
        store.commit(Batch(snapshot=(index, view, state), sync=True,
                           meta={"view": view, "promised": view, "snapshot_index": index, "snapshot_view": view}))
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
        description="Write a consistent copy of a replica's store to DEST (a file, or a directory to put a "
                    "time-stamped file in): from its data directory on this machine (--data-dir), or over the "
                    "network from a running replica (--server, or the primary of --peers), authenticated "
                    "with the cluster secret.  Back up any member of the current view (see `chatserver "
                    "status`): it holds every chat acknowledged before the backup started.")
    parser.add_argument("dest", metavar="DEST")
    parser.add_argument("--data-dir", default=None,
                        help=f"the replica's data directory (default: ./{DEFAULT_BASE_DIR}/1538, "
                             "the first replica of `chatserver --local`)")
    parser.add_argument("--server", metavar="HOST:PORT", help="ask this running replica for the copy")
    parser.add_argument("--peers", default=None,
                        help=f"replicas to ask which one is the primary, whose copy it takes (without "
                             f"--server; default {DEFAULT_PEERS})")
    parser.add_argument("--secret-file", default=None, help="the cluster secret (network form)")
    parser.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, verifying the replica with these CAs")
    parser.add_argument("--tls", action="store_true", help="connect over TLS, verifying with the system's trust store")
    args = parser.parse_args(argv)
    try:
        if args.server or args.peers:
            if args.data_dir:
                raise BackupError("give either --data-dir (this machine) or --server/--peers (the network)")
            summary, source = _network_backup(args)
        else:
            source = args.data_dir or os.path.join(DEFAULT_BASE_DIR, "1538")
            summary = backup(source, args.dest)
    except (BackupError, ConfigError, OSError) as exc:
        print(f"chatserver backup: {exc}", file=sys.stderr)
        return 1
    print(f"backup of {source} written to {summary['path']}: {summary['accounts']} accounts, "
          f"{summary['queued_chats']} queued chats, state at {summary['snapshot_index']} with log to "
          f"{summary['last_index']}, view {summary['view']}")
    return 0


def _network_backup(args: argparse.Namespace) -> tuple[dict, str]:
    """``backup --server``/``--peers``: the copy from the named replica, or the primary."""
    from .cli import read_status_secret, status_tls

    secret = read_status_secret(args.secret_file)
    if secret is None:
        raise BackupError("a network backup needs the cluster secret (--secret-file)")
    tls = status_tls(args)
    server = _source(args, tls)
    summary = fetch_backup(server.host, server.port, args.dest, secret, tls=tls)
    return summary, f"{server.host}:{server.port}"


SAFE_ROLES = ("primary", "backup")  # members of a view: every acknowledged chat is on their disk


def _source(args: argparse.Namespace, tls) -> Address:
    """The replica to copy: ``--server``, else the one of ``--peers`` that serves (else the
    primary they name).  A replica that says it is ``recovering`` or ``electing`` — restarted
    and not caught up, removed from the cluster, cut off — is refused: its store may lack
    acknowledged chats (a removed replica's can be any age), and a backup that looks fine but
    is stale is found out only at restore."""
    from .cli import query_status

    if args.server:
        server = parse_address(args.server)
    else:
        server = _serving_replica(parse_peers(args.peers or DEFAULT_PEERS), tls)
        if server is None:
            raise BackupError(f"no replica of {args.peers or DEFAULT_PEERS} knows a primary: give --server")
    role = (query_status(server.host, server.port, tls=tls) or {}).get("role")
    if role is not None and role not in SAFE_ROLES:
        raise BackupError(f"{server.host}:{server.port} is {role}, not a member of the current view: its store "
                          "may lack acknowledged chats; back up the primary (--peers) or a backup that "
                          "`chatserver status` lists (or, cluster down, --data-dir on its machine)")
    return server


def _serving_replica(peers: list[Address], tls) -> Address | None:
    """The replica of ``peers`` that says it serves, else the primary the first to name one
    names (a stale replica may name an old primary: one that serves is asked first)."""
    from .cli import query_status

    named = None
    for peer in peers:
        status = query_status(peer.host, peer.port, tls=tls) or {}
        if status.get("serving"):
            return peer
        if named is None and status.get("primary_address"):
            named = parse_address(status["primary_address"])
    return named


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
