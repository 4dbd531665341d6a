"""Cluster configuration: peer addresses, this replica's place among them, the shared secret."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import ClassVar

DEFAULT_PEERS = "127.0.0.1:1538,127.0.0.1:2538,127.0.0.1:3538"  # the seed's three servers
DEFAULT_BASE_DIR = "chatnet-data"
DEFAULT_SECRET_FILE = os.path.join(DEFAULT_BASE_DIR, "cluster.secret")


class ConfigError(Exception):
    """A configuration the replica cannot run with; the message says what to change."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:1538")
    return Address(host, int(port))


def parse_peers(text: str) -> list[Address]:
    peers = [parse_address(part) for part in text.split(",") if part.strip()]
    if not peers:
        raise ConfigError("--peers is empty: give at least one HOST:PORT")
    if len(set(peers)) != len(peers):
        raise ConfigError(f"--peers lists an address twice: {text}")
    return peers


def format_peers(peers: list[Address]) -> str:
    return ",".join(str(p) for p in peers)


def find_self(peers: list[Address], host: str | None, port: int | None) -> int:
    """This replica's index in ``peers`` (its node id and election priority)."""
    matches = [
        i for i, p in enumerate(peers)
        if (port is None or p.port == port) and (host is None or p.host == host)
    ]
    if len(matches) == 1:
        return matches[0]
    wanted = f"{host or '*'}:{port or '*'}"
    if not matches:
        raise ConfigError(f"this replica ({wanted}) is not in --peers {format_peers(peers)}")
    raise ConfigError(f"{wanted} matches several --peers entries; give both --host and --port")


def cluster_id(peers: list[Address]) -> str:
    """A digest of the ordered --peers list (16 hex digits).

    Node ids are positions in that list, so replicas started with different lists -- other
    addresses, or the same ones in another order -- would mean different nodes by the same
    id.  The peer handshake sends this id and binds it into both HMAC proofs, so such replicas
    refuse each other and log both ids (see chatnet/replication/handshake.py).  It is computed
    from the list as written: ``localhost:1538`` and ``127.0.0.1:1538`` differ."""
    return hashlib.sha256(format_peers(peers).encode()).hexdigest()[:16]


def read_secret(path: str) -> bytes:
    """The cluster secret in ``path``, refused unless only its owner can access the file.

    Whoever reads it can join the cluster as a replica (and read or rewrite all chat), so a
    file that group or others may read or write is an error, not a warning.  The mode is
    checked on the opened file, so it is the file actually read."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"secret file {path} not found. Every replica needs the same secret file; create one with\n"
            f"  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > {path})\n"
            f"and copy it to each machine, keeping it private (chmod 600 {path}); "
            f"bin/chatserver --local creates it for you"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc}") from None
    if mode & 0o077:
        raise ConfigError(
            f"secret file {path} is accessible by group or others (mode {mode & 0o777:04o}); "
            f"anyone who can read it can join the cluster. Make it private with\n"
            f"  chmod 600 {path}"
        )
    if len(secret) < 16:
        raise ConfigError(f"secret file {path} holds fewer than 16 bytes; use a long random secret")
    return secret


@dataclass(frozen=True)
class Limits:
    """What one replica lets its clients use.  Each field has a ``chatserver`` flag of the same
    name and is listed with its default in docs/operations.md.  The chat service reads them on
    the replica that receives a request (before proposing), never while applying a committed
    command, so replicas started with different limits still apply the same log identically.

    A limit is checked against the applied state, so requests proposed but not yet applied are
    not counted: it can be overshot by at most one per client connection with such a request
    in flight (a connection waits for its answer before its next request is handled)."""

    # Chats queued (sent, not yet delivered/acknowledged) for one recipient; a send beyond it is
    # refused with T_MAILBOX_FULL.  Bounds what one sender can pile onto someone who is away.
    max_queued_chats: int = 10_000
    # Accounts on the whole service; a create beyond it is refused with T_CREATE_FULL.
    max_accounts: int = 100_000
    # Names in one `list` answer; more matches end the answer with a continuation line
    # (T_LIST_MORE).  At most MAX_LIST_NAMES so a page always fits in one response frame.
    max_list_names: int = 100
    # A list line is "- " + a name of at most 32 characters of up to 4 bytes + "\n" (131 bytes):
    # 400 of them, plus the continuation line, stay under one frame's 55,295 bytes.
    MAX_LIST_NAMES: ClassVar[int] = 400
    # Connection limits, applied by the socket front end (chatserver.py) before any request.
    # Client connections at once; a connection beyond it is told the server is full and closed
    # (peers are never refused: a preface is recognised first, in a reserve of PEER_RESERVE).
    max_connections: int = 20_000
    # Client connections from one IP address at once (0: no per-address cap).
    max_per_address: int = 1_000
    # Seconds a new connection has to send its first complete request (or a peer its preface).
    handshake_timeout: float = 10.0
    # Seconds a connection that is not logged in may stay silent before it is closed.
    idle_timeout: float = 300.0
    PEER_RESERVE: ClassVar[int] = 64
    # --require-passwords: creating or logging into an account without a password is refused
    # (seed-style clients are told why); docs/protocol.md, extension 2.
    require_passwords: bool = False

    def __post_init__(self) -> None:
        for name in ("max_queued_chats", "max_accounts", "max_list_names", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_per_address", "handshake_timeout", "idle_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_list_names > self.MAX_LIST_NAMES:
            raise ConfigError(f"--max-list-names must be at most {self.MAX_LIST_NAMES} (one response frame)")

