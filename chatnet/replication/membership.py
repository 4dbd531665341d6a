"""Cluster configurations: which replicas (stable node id, address) make up the cluster.

A configuration is replicated state (docs/replication.md section 14).  It changes only through
a *config entry* in the log -- one change at a time, each adding or removing one replica --
and the core (:mod:`.core`) acts on the newest configuration in its log as soon as the entry is
appended (Raft's single-server rule), falling back to the one recorded with its hard state
(``Config.index`` = the entry that made it; 0 = the cluster's first configuration, from
``--peers``).  Pure data and codecs: no I/O.

Node ids are stable and never reused: the first configuration numbers the ``--peers`` list
0, 1, ...; an added replica gets ``next_id``, which only grows -- a replacement machine is a
new node, never a dead one's id with an empty disk (it could then vote for entries it lost).
An id added by ``chatserver members add`` is *pending* until a replica started at its address
claims it (its ``--join``: a second config entry clearing the flag), so the id goes to one
started replica only -- a second empty data directory asking for it is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Config", "CONFIG_MAGIC", "MembershipError", "is_config_entry", "encode_config",
           "decode_config", "config_to_meta", "config_from_meta", "config_to_bytes",
           "config_from_bytes"]

# The first bytes of a config entry's data.  A chat command starts with its version byte (0x01)
# or "[" (chatnet/server/state.py), so the two never meet: the host hands config entries to
# no state machine, only to the core.
CONFIG_MAGIC = b"\x00chatnet-config\x00"


class MembershipError(ValueError):
    """A membership change refused; the message says why (shown to the operator as it is)."""


@dataclass(frozen=True)
class Config:
    """One configuration: ``members`` = ((id, "host:port"), ...) in election-priority order;
    ``pending`` = the ids added by ``members add`` that no started replica claimed yet."""
    members: tuple[tuple[int, str], ...]
    next_id: int
    index: int = 0              # the log index of the config entry that made it (0: initial)
    pending: tuple[int, ...] = ()   # sorted; the core treats them as members like any other

    @classmethod
    def initial(cls, ids, addresses=None) -> "Config":
        """The first configuration of a cluster: ``ids`` in order, with their addresses."""
        ids = tuple(ids)
        addrs = [str(addresses[i]) if addresses is not None else str(i) for i in ids]
        return cls(tuple(zip(ids, addrs)), max(ids) + 1 if ids else 0, 0)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.members)

    def address(self, node: int) -> str | None:
        return next((a for i, a in self.members if i == node), None)

    def node_at(self, address: str) -> int | None:
        return next((i for i, a in self.members if a == address), None)

    def adding(self, address: str, pending: bool = False) -> "Config":
        """This configuration plus a new node at ``address`` (id ``next_id``); ``pending``: added
        for a replica still to be started (``members add``), which claims the id with --join."""
        added = tuple(sorted((*self.pending, self.next_id))) if pending else self.pending
        return Config(self.members + ((self.next_id, address),), self.next_id + 1, self.index, added)

    def removing(self, node: int) -> "Config":
        return Config(tuple(m for m in self.members if m[0] != node), self.next_id, self.index,
                      tuple(p for p in self.pending if p != node))

    def claiming(self, node: int) -> "Config":
        """Pending ``node`` claimed by the replica just started at its address."""
        return Config(self.members, self.next_id, self.index, tuple(p for p in self.pending if p != node))

    def at(self, index: int) -> "Config":
        return Config(self.members, self.next_id, index, self.pending)


def is_config_entry(data: bytes) -> bool:
    return data[:len(CONFIG_MAGIC)] == CONFIG_MAGIC


def _body(cfg: Config) -> dict:
    """The JSON-able fields; ``pending`` only when some id is (entries and files written before
    it existed, and every configuration without pending ids, stay byte for byte the same)."""
    body = {"members": [[i, a] for i, a in cfg.members], "next_id": cfg.next_id}
    if cfg.pending:
        body["pending"] = list(cfg.pending)
    return body


def encode_config(cfg: Config) -> bytes:
    """The data of a config entry (the index is the entry's own, so it is not stored)."""
    return CONFIG_MAGIC + json.dumps(_body(cfg), separators=(",", ":")).encode()


def decode_config(data: bytes, index: int = 0) -> Config:
    """Raises ValueError for anything that is not a well-formed configuration."""
    if not is_config_entry(data):
        raise ValueError("not a config entry")
    try:
        body = json.loads(bytes(data[len(CONFIG_MAGIC):]))
        return _checked(body, index)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"malformed config entry: {exc}") from None


def _checked(body: dict, index: int) -> Config:
    members = tuple((int(i), str(a)) for i, a in body["members"])
    next_id = int(body["next_id"])
    ids = [i for i, _ in members]
    if not members or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= next_id \
            or len({a for _, a in members}) != len(members):
        raise ValueError("ids and addresses must be distinct, non-negative, below next_id")
    pending = tuple(sorted({int(p) for p in body.get("pending", ())}))
    if not set(pending) <= set(ids):
        raise ValueError("pending ids must be members")
    return Config(members, next_id, index, pending)


def config_to_meta(cfg: Config) -> dict:
    """JSON-able form, persisted with the hard state (store meta key ``config``)."""
    return {**_body(cfg), "index": cfg.index}


def config_from_meta(meta) -> Config | None:
    if not meta:
        return None
    return _checked(meta, int(meta.get("index", 0)))


def config_to_bytes(cfg: Config) -> bytes:
    """The configuration with its index, as carried by ``InstallSnapshot.config``."""
    return json.dumps(config_to_meta(cfg), separators=(",", ":")).encode()


def config_from_bytes(data: bytes) -> Config:
    """Raises ValueError for anything malformed."""
    try:
        return _checked(json.loads(bytes(data)), int(json.loads(bytes(data)).get("index", 0)))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"malformed configuration: {exc}") from None
