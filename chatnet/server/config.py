"""Cluster configuration: peer addresses, this replica's place among them, the shared secret."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

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
    """Replicas configured with different --peers lists refuse each other (see the handshake)."""
    return hashlib.sha256(format_peers(peers).encode()).hexdigest()[:16]


def read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except FileNotFoundError:
        raise ConfigError(
            f"secret file {path} not found. Every replica needs the same secret file; create one with\n"
            f"  python3 -c 'import secrets; print(secrets.token_hex(32))' > {path}\n"
            f"and copy it to each machine (bin/chatserver --local creates it for you)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc}") from None
    if len(secret) < 16:
        raise ConfigError(f"secret file {path} holds fewer than 16 bytes; use a long random secret")
    return secret


@dataclass(frozen=True)
class Limits:
    """What one replica lets its clients use.  Each field has a ``chatserver`` flag of the same
    name and is listed with its default in docs/operations.md.  The chat service reads them on
    the replica that receives a request (before proposing), never while applying a committed
    command, so replicas started with different limits still apply the same log identically."""
