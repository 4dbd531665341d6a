"""``chatserver members``: list, add and remove replicas of a running cluster, and ``--join``.

Operator side (client): one request per TCP connection to any replica's client port, after
the preface ``CHATNET-MEMBERS`` and the HMAC challenge of :class:`.status.MembersChallenge`
(the cluster secret proves the operator; the proof covers the request).  A replica that is
not the serving primary answers ``{"error": "not the primary", "primary": ADDRESS}`` and the
client follows it.  Requests (one JSON object)::

    {"op": "list"}
    {"op": "add", "address": "HOST:PORT"}        answered once the change is committed
                                                 (the new node is pending: see join())
    {"op": "remove", "address": "HOST:PORT"}     (the primary itself: it hands over first)

Replica side: :class:`MembershipRequests` turns them into the core's config entries
(``Replica.change_config``) and answers each when its entry is applied -- committed on every
member of the view, so the change is durable and in force; docs/replication.md section 14.

Identity: a replica's data directory holds ``membership.json`` -- its node id, the cluster id
and the configuration it started from -- written the first time it starts (from ``--peers``, or
from the answer to its ``--join``), so a restart needs neither ``--join`` nor the old list.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time

from ..protocol.texts import MEMBERS_PREFACE
from ..replication.membership import Config, MembershipError, config_from_meta, config_to_meta
from .config import (
    DEFAULT_PEERS,
    DEFAULT_SECRET_FILE,
    Address,
    ConfigError,
    parse_address,
    parse_peers,
    read_secret,
)
from .status import members_proof

log = logging.getLogger(__name__)

IDENTITY_FILE = "membership.json"
REQUEST_TIMEOUT = 30.0  # seconds a change may take to commit (a catch-up is not waited for)
MAX_REDIRECTS = 5


# -- replica side -------------------------------------------------------------------------------
class MembershipRequests:
    """The host's pending membership requests: proposed as config entries, answered when applied."""

    def __init__(self, host) -> None:
        self.host = host
        self.pending: dict[int, tuple] = {}  # config entry index -> (view, reply, op, address)
        self.handed_to: int | None = None  # the member this primary handed over to (redirects)
        self._removing: int | None = None

    def request(self, req: dict, reply) -> None:
        """One authenticated request; ``reply(dict)`` is called once, now or when it commits."""
        replica, op = self.host.replica, req.get("op")
        if op not in ("list", "add", "remove"):
            return reply({"error": f"unknown request {op!r}: list, add or remove"})
        if not replica.serving:
            return reply(self._elsewhere())
        if op == "list":
            return reply(self.listing())
        try:
            address = str(parse_address(str(req.get("address", ""))))
            index = self._propose(op, address, bool(req.get("join")))
        except (MembershipError, ConfigError) as exc:
            return reply({"error": str(exc)})
        if index is None:  # handing over: the client asks the new primary
            return reply(self._elsewhere())
        if op == "add" and req.get("join"):  # --join: the new replica starts now (see join())
            # (a fresh add, or the claim of a node `members add` made: answered alike)
            cfg = replica.config
            return reply({"ok": True, "op": op, "address": address, "node": cfg.node_at(address),
                          "config": config_to_meta(cfg), "index": index, "committed": False})
        self.pending[index] = (replica.view, reply, op, address, replica.config.node_at(address)
                               if op == "add" else self._removing)

    def _propose(self, op: str, address: str, join: bool = False) -> int | None:
        replica = self.host.replica
        if op == "add":
            node = replica.config.node_at(address)
            if join and node is not None:  # added by `members add`: the started replica claims it
                return replica.change_config(claim=node)
            return replica.change_config(add=address, pending=not join)
        node = replica.config.node_at(address)
        if node is None:
            raise MembershipError(f"{address} is not a member (see `chatserver members`)")
        if node == self.host.me:
            target = replica.hand_over()
            self.handed_to = target
            return None
        self._removing = node
        return replica.change_config(remove=node)

    def _elsewhere(self) -> dict:
        replica = self.host.replica
        target = self.handed_to if replica.role != "backup" else replica.primary
        address = replica.config.address(target) if target is not None else None
        return {"error": "not the primary", "primary": address if target != self.host.me else None}

    def listing(self) -> dict:
        replica = self.host.replica
        status = replica.status()
        return {"ok": True, "config": status["config"], "config_index": status["config_index"],
                "primary": self.host.me, "view": replica.view, "members": list(replica.members),
                "learners": status["learners"], "pending": status["pending"],
                "commit_index": replica.commit_index,
                "last_index": replica.last_index,
                "change_pending": status["config_index"] > replica.commit_index}

    def committed(self, entry) -> None:
        """A config entry was applied: answer the request that proposed it, if it is ours."""
        cfg = self.host.replica.config
        log.info("membership change committed at log index %d: members %s", entry.index,
                 ",".join(f"{i}={a}" for i, a in cfg.members),
                 extra={"event": "member_change", "index": entry.index,
                        "members": [a for _, a in cfg.members]})
        pending = self.pending.pop(entry.index, None)
        if pending is None:
            return
        view, reply, op, address, node = pending
        if view != entry.view:
            reply({"error": "the primary changed before the change committed; check `members`"})
            return
        reply({"ok": True, "op": op, "address": address, "node": node,
               "config": config_to_meta(cfg), "index": entry.index})

    def lost_primacy(self) -> None:
        for _, reply, *_ in self.pending.values():
            reply({"error": "this replica stopped being the primary before the change committed; "
                            "check `members` and retry"})
        self.pending = {}


# -- identity in the data directory -------------------------------------------------------------
def read_identity(data_dir: str) -> dict | None:
    """``{"node", "cluster_id", "config"}`` recorded in ``data_dir``, or None (never started)."""
    try:
        with open(os.path.join(data_dir, IDENTITY_FILE)) as f:
            raw = json.load(f)
        return {"node": int(raw["node"]), "cluster_id": str(raw["cluster_id"]),
                "config": config_from_meta(raw["config"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{os.path.join(data_dir, IDENTITY_FILE)} is unreadable: {exc}") from None


def write_identity(data_dir: str, node: int, cluster_id: str, config: Config) -> None:
    """Durably (write, fsync, rename, fsync the directory): a joined replica must never forget
    who it is, or a restart would need a new --join (and a new node id)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, IDENTITY_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"node": node, "cluster_id": cluster_id, "config": config_to_meta(config)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_addresses(config: Config) -> dict[int, Address]:
    return {node: parse_address(address) for node, address in config.members}


# -- operator side ------------------------------------------------------------------------------
def members_request(address: Address, secret: bytes, request: dict, timeout: float = REQUEST_TIMEOUT,
                    tls=None) -> dict:
    """One request to one replica; its JSON answer (raises OSError / ValueError when none)."""
    with socket.create_connection((address.host, address.port), timeout=5.0) as raw:
        sock = tls.wrap_socket(raw, server_hostname=address.host) if tls is not None else raw
        sock.settimeout(timeout)
        reader = sock.makefile("rb")
        sock.sendall(MEMBERS_PREFACE)
        nonce_hex, _, cluster = reader.readline().strip().partition(b" ")
        body = json.dumps(request, separators=(",", ":")).encode()
        proof = members_proof(secret, cluster, bytes.fromhex(nonce_hex.decode("ascii")), body)
        sock.sendall(proof.hex().encode() + b" " + body + b"\n")
        answer = json.loads(reader.readline() or b"null")
    if not isinstance(answer, dict):
        raise ValueError("no answer (wrong cluster secret?)")
    return answer


def members_call(servers: list[Address], secret: bytes, request: dict, tls=None) -> dict:
    """Ask the replicas in turn until one answers; follow "not the primary" to the primary
    (a handover may take a few failure timeouts: retried for up to REQUEST_TIMEOUT)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    queue, last, unreachable = list(servers), None, []
    while queue and time.monotonic() < deadline:
        address = queue.pop(0)
        try:
            answer = members_request(address, secret, request, tls=tls)
        except (OSError, ValueError) as exc:
            unreachable.append(f"{address} ({exc})")
            last = {"error": "no replica answered: " + ", ".join(unreachable)
                    + " (give --server HOST:PORT or --peers for a cluster off the default ports)"}
            continue
        if answer.get("error") != "not the primary":
            return answer
        last = answer
        primary = answer.get("primary")
        queue = ([parse_address(primary)] if primary else []) + [a for a in servers if str(a) != primary]
        time.sleep(0.2)
    return last or {"error": "no replica answered"}


def members_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chatserver members",
                                     description="List, add or remove the replicas of a running cluster.")
    parser.add_argument("op", nargs="?", default="list", choices=["list", "add", "remove"])
    parser.add_argument("address", nargs="?", help="HOST:PORT of the replica to add or remove")
    parser.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                        help="a replica to ask (any member; repeatable; default: every --peers entry)")
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"replicas to ask (default: {DEFAULT_PEERS})")
    parser.add_argument("--secret-file", default=DEFAULT_SECRET_FILE, help="the cluster secret")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    args = parser.parse_args(argv)
    try:
        if args.op != "list" and not args.address:
            raise ConfigError(f"members {args.op} needs HOST:PORT")
        servers = [parse_address(s) for s in args.server] or parse_peers(args.peers)
        secret = read_secret(args.secret_file)
        request = {"op": args.op} if args.op == "list" else {"op": args.op, "address": args.address}
    except ConfigError as exc:
        print(f"chatserver members: {exc}", file=sys.stderr)
        return 2
    answer = members_call(servers, secret, request)
    if args.json or "error" in answer:
        print(json.dumps(answer) if args.json else f"chatserver members: {answer['error']}",
              file=sys.stdout if args.json else sys.stderr)
        return 0 if "error" not in answer else 1
    print(format_answer(answer))
    return 0


def format_answer(answer: dict) -> str:
    if answer.get("op") in ("add", "remove"):
        verb = "added as node" if answer["op"] == "add" else "removed; was node"
        members = ", ".join(f"{i}={a}" for i, a in answer["config"]["members"])
        started = "" if answer.get("node") not in answer["config"].get("pending", ()) else \
            f" (added, not started: start the replica at {answer['address']} with --join)"
        return f"{answer['address']} {verb} {answer.get('node', '')} (log index {answer['index']}); " \
               f"members now: {members}{started}"
    rows = [f"{'node':>4} {'address':<22} {'role':<9} caught up"]
    view, learners = set(answer["members"]), set(answer["learners"])
    for node, address in answer["config"]:
        role = "primary" if node == answer["primary"] else "backup" if node in view else \
            "learner" if node in learners else "added" if node in answer.get("pending", ()) else "away"
        caught = "yes" if node in view else "catching up" if node in learners else \
            "no (added, not started: start it with --join)" if role == "added" else "no"
        rows.append(f"{node:>4} {address:<22} {role:<9} {caught}")
    if answer.get("change_pending"):
        rows.append(f"(a change is being committed: log entry {answer['config_index']})")
    return "\n".join(rows)


def join(join_address: Address, me: Address, secret: bytes, data_dir: str) -> dict:
    """``--join``: ask the cluster (any member) to add ``me``; record the answer in ``data_dir``.
    Returns the identity (as read_identity).  If ``chatserver members add`` made ``me`` a
    member already, the join claims that node (pending until then): an id goes to one started
    replica only, so a second empty data directory joining at the same address is refused.

    The primary answers as soon as the add is in its log, not once it is committed: the new
    replica must be running by then (as etcd's ``member add`` is followed by starting the
    member), or a primary that restarts before the commit could find no majority of the new
    configuration without it (adding a second replica to a single one, say).  Should the add
    be lost with that primary, the new replica is a member of no configuration the cluster
    has: it stays recovering and ``chatserver members`` does not list it (wipe its data
    directory and join again)."""
    answer = members_call([join_address], secret, {"op": "add", "address": str(me), "join": True})
    if "error" in answer:
        raise ConfigError(f"--join {join_address}: {answer['error']}")
    cfg = config_from_meta(answer["config"])
    write_identity(data_dir, int(answer["node"]), str(answer["cluster_id"]), cfg)
    return read_identity(data_dir)
