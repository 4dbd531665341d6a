"""``chatserver``: run one chatnet replica, a whole local cluster (``--local``), or ``status``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import ssl
import sys
import time

from ..loop.tls import TLSSettings, client_context
from ..protocol.texts import STATUS_AUTH_PREFACE, STATUS_PREFACE
from .config import (
    DEFAULT_BASE_DIR,
    DEFAULT_PEERS,
    DEFAULT_SECRET_FILE,
    Address,
    ConfigError,
    Limits,
    cluster_id,
    find_self,
    parse_address,
    parse_peers,
    read_secret,
)
from .logformat import setup_logging
from .metrics import MetricsError
from .status import status_proof
from .store import StoreError

EPILOG = """\
examples:
  chatserver --local                      start the seed's three replicas on this machine
  chatserver --port 2538                  start one replica of the default three-replica cluster
  chatserver --port 5000                  a single server (no replication) on 127.0.0.1:5000
  chatserver --local --replicas 5 --base-port 7000   five local replicas on 7000-7004
  chatserver status [--watch]             role, view and log position of every replica
  chatserver members [add|remove HOST:PORT] --server HOST:PORT
                                          list, add or remove replicas of a running cluster
  chatserver --join 127.0.0.1:1538 --port 4538   a new replica joins the running cluster
                                          (then `members remove` the one it replaces)
  chatserver --local --tls-cert c.pem --tls-key k.pem --tls-ca ca.pem --require-tls
                                          TLS for clients and between replicas (docs/operations.md)
  chatserver --local --metrics-port 9100  replicas serve Prometheus metrics on 9100, 9101, ...
  chatserver backup backup.sqlite3 --data-dir chatnet-data/1538   a consistent copy of a running replica
  chatserver backup backup.sqlite3 --peers H1:P,H2:P,H3:P --secret-file F   the same, over the network
  chatserver restore backup.sqlite3 --data-dir new-data           seed a new replica (a new cluster) from it

Every replica of a cluster must be given the same --peers list (same order: it is the
election tie-break priority) and the same secret file.
"""


# Every field of Limits as a flag of the same name: (field, type, metavar, help); see
# docs/operations.md for what a client sees at each limit.
LIMIT_FLAGS = (
    ("max_queued_chats", int, "N", "refuse a send to a recipient with N chats already waiting for it"),
    ("max_accounts", int, "N", "refuse to create accounts beyond N"),
    ("max_list_names", int, "N", f"names in one list answer; more are paged, 1 to {Limits.MAX_LIST_NAMES}"),
    ("max_connections", int, "N", "client connections at once; more are told the server is full"),
    ("max_per_address", int, "N", "client connections from one IP address, 0 for no cap"),
    ("handshake_timeout", float, "SECONDS", "close a connection that sends no complete first request in time"),
    ("idle_timeout", float, "SECONDS", "close a connection that is not logged in and silent this long"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatserver",
        description="Run a chatnet chat server replica (each keeps its own durable SQLite store).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--peers", default=None,
                        help=f"every replica's HOST:PORT, comma separated, in priority order (default: {DEFAULT_PEERS}; "
                             "with --port or --host alone, naming no entry of it: just that address, one unreplicated server)")
    parser.add_argument("--host", help="this replica's address (default: the --peers entry matching --port)")
    parser.add_argument("--port", type=port_number, help="this replica's port (default: the first of --peers)")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="with --local: start N replicas (ports 1538, 2538, ... or --base-port P, P+1, ...)")
    parser.add_argument("--base-port", type=port_number, default=None, metavar="P",
                        help="with --local --replicas N: the first replica's port; the others follow it")
    parser.add_argument("--data-dir",
                        help=f"this replica's store directory (default: ./{DEFAULT_BASE_DIR}/<port>); "
                             f"with --local, the parent of every replica's directory (default: ./{DEFAULT_BASE_DIR})")
    parser.add_argument("--secret-file", default=None,
                        help=f"file holding the cluster secret shared by all replicas (default: {DEFAULT_SECRET_FILE}, "
                             "or <data-dir>/cluster.secret with --local)")
    parser.add_argument("--join", metavar="HOST:PORT", help="first start of a new replica (--host, --port): "
                        "join the running cluster through this member (claiming the node "
                        "`members add` made for this address, if any); restarts need no --join")
    parser.add_argument("--local", action="store_true",
                        help="start every replica of --peers on this machine as child processes; Ctrl-C stops all")
    parser.add_argument("--heartbeat-ms", type=int, default=100, help="heartbeat interval (default: 100)")
    parser.add_argument("--failure-timeout-ms", type=int, default=1000,
                        help="declare a silent peer failed after this long (default: 1000)")
    parser.add_argument("--quorum", default="all", choices=["all", "majority"],
                        help="all: a view is whoever is alive, N-1 crashes tolerated, a partition can split "
                             "the cluster; majority: a view needs a majority of --peers, (N-1)/2 crashes "
                             "tolerated, never two acknowledging sides (default: all; docs/replication.md)")
    parser.add_argument("--log-retain", type=int, default=10_000, metavar="ENTRIES",
                        help="log entries kept behind the applied state for catch-up; a replica further "
                             "behind is sent a snapshot (default: 10000)")
    parser.add_argument("--naive", action="store_true",
                        help="benchmark baseline only: one fsync per command and stop-and-wait replication "
                             "(no group commit, no pipelining); never use it in production")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold (default: INFO)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines, or one JSON object per line with each event's fields (default: text)")
    parser.add_argument("--metrics-port", type=port_number, default=None, metavar="P",
                        help="serve Prometheus metrics on http://HOST:P/metrics (with --local: P, P+1, ... "
                             "for the replicas in order)")
    parser.add_argument("--slow-client-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="disconnect a client that reads nothing for this long while chat piles up (default: 60)")
    parser.add_argument("--require-passwords", action="store_true",
                        help="refuse creating and logging into accounts without a password (seed-style "
                             "clients are told why); see README, Passwords")
    _add_tls_arguments(parser)
    limits = Limits()
    for name, kind, metavar, text in LIMIT_FLAGS:
        default = getattr(limits, name)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, metavar=metavar,
                            help=f"{text} (default: {default:g})")
    return parser




# -- TLS (issue 13 item 5) -------------------------------------------------------------------
def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="serve TLS on the client port with this certificate (PEM; its chain may follow); "
                             "peer links use TLS too. Plaintext clients are still served unless --require-tls")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (default: in the cert file)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="CA certificates that verify the other replicas' certificates (default: the "
                             "system's trust store)")
    parser.add_argument("--require-tls", action="store_true",
                        help="refuse plaintext clients with an error saying TLS is required (status queries "
                             "may still come in plaintext)")


def tls_from(args: argparse.Namespace) -> TLSSettings | None:
    """The replica's TLS settings from its flags, or None; ConfigError names what is wrong."""
    if args.tls_cert is None:
        if args.tls_key or args.tls_ca or args.require_tls:
            raise ConfigError("--tls-key, --tls-ca and --require-tls need --tls-cert")
        return None
    try:
        return TLSSettings(args.tls_cert, args.tls_key, args.tls_ca, require=args.require_tls)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot load the TLS certificate, key or CA ({args.tls_cert}, "
                          f"{args.tls_key or 'key in the cert file'}, {args.tls_ca or 'system CAs'}): {exc}") from None


def tls_flags(args: argparse.Namespace) -> list[str]:
    """The TLS flags again, for the children of --local (paths made absolute)."""
    flags = []
    for name in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(args, name):
            flags += ["--" + name.replace("_", "-"), os.path.abspath(getattr(args, name))]
    return flags + (["--require-tls"] if args.require_tls else [])


def status_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """``chatserver status --tls-ca FILE`` / ``--tls``: ask over TLS, verifying the replicas."""
    if args.tls_ca or args.tls:
        try:
            return client_context(args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load --tls-ca {args.tls_ca}: {exc}") from None
    return None
# -- end TLS


def choose_peers(args: argparse.Namespace) -> list[Address]:
    """The cluster this command runs in.

    ``--peers`` given: that list.  ``--local --replicas N``: N local replicas (the seed's ports
    1538, 2538, ... or ``--base-port P``, P+1, ...).  Otherwise the seed's three replicas —
    unless ``--port``/``--host`` name an address outside them: then one unreplicated server at
    that address (``chatserver --port 5000`` is what anyone tries first)."""
    if args.replicas is not None or args.base_port is not None:
        if not args.local or args.peers is not None:
            raise ConfigError("--replicas and --base-port go with --local and without --peers")
        return local_peers(3 if args.replicas is None else args.replicas, args.base_port)
    if args.peers is not None:
        return parse_peers(args.peers)
    seed = parse_peers(DEFAULT_PEERS)
    if args.local or (args.port is None and args.host is None):
        return seed
    host = args.host or seed[0].host
    if any(a.host == host and (args.port is None or a.port == args.port) for a in seed):
        return seed  # an entry of the seed's cluster, as documented for --host/--port
    if args.port is None:
        raise ConfigError(f"--host {host} alone names no replica of {DEFAULT_PEERS}; give --port too")
    return [Address(host, args.port)]


def local_peers(n: int, base_port: int | None) -> list[Address]:
    if not 1 <= n <= 64:
        raise ConfigError("--replicas must be between 1 and 64")
    ports = [base_port + i for i in range(n)] if base_port is not None else [1538 + 1000 * i for i in range(n)]
    if ports[0] < 1 or ports[-1] > 65535:
        raise ConfigError(f"--base-port {base_port} with --replicas {n} leaves the port range")
    return [Address("127.0.0.1", port) for port in ports]


def port_number(text: str) -> int:
    """argparse type of every port flag: an integer in 1..65535 (else argparse's usage error
    names the flag, instead of a traceback from bind() after the data directory was made)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return port


def replica_identity(args: argparse.Namespace, peers: list[Address]):
    """(node id, addresses, cluster id, data dir, secret, configuration) of the replica to run.

    What its data directory recorded wins (chatnet/server/members.py: a joined replica, or one
    whose cluster changed members since --peers was written); else ``--join`` asks the running
    cluster to add it; else its place in ``--peers``, recorded for the next start."""
    from ..replication.membership import Config
    from .members import join, read_identity, write_identity

    if args.join is not None:
        if args.port is None:
            raise ConfigError("--join needs --port (and --host unless it is 127.0.0.1): this replica's address")
        address = Address(args.host or "127.0.0.1", args.port)
        data_dir = args.data_dir or os.path.join(DEFAULT_BASE_DIR, str(args.port))
        secret = read_secret(args.secret_file or DEFAULT_SECRET_FILE)
        identity = read_identity(data_dir)
        _check_recorded_address(identity, data_dir, address)
        identity = identity or join(parse_address(args.join), address, secret, data_dir)
        return _recorded(identity, data_dir, secret)
    me = find_self(peers, args.host, args.port if args.port is not None else (peers[0].port if args.host is None else None))
    data_dir = args.data_dir or os.path.join(DEFAULT_BASE_DIR, str(peers[me].port))
    identity = read_identity(data_dir)
    if len(peers) == 1 and identity is None:
        return me, peers, None, data_dir, None, None
    secret = read_secret(args.secret_file or DEFAULT_SECRET_FILE)
    if identity is None:
        write_identity(data_dir, me, cluster_id(peers), Config.initial(range(len(peers)), peers))
        return me, peers, cluster_id(peers).encode(), data_dir, secret, None
    _check_recorded_address(identity, data_dir, peers[me])
    return _recorded(identity, data_dir, secret)


def _check_recorded_address(identity: dict | None, data_dir: str, address: Address) -> None:
    """A data directory belongs to one node at one address: started at another address (a
    --port or --peers naming another replica, or another cluster's directory), it must not
    silently become that node on its recorded address."""
    from .members import config_addresses

    if identity is None:
        return
    recorded = config_addresses(identity["config"]).get(identity["node"])
    if recorded is not None and recorded != address:
        raise ConfigError(f"{data_dir} holds node {identity['node']} at {recorded} (cluster "
                          f"{identity['cluster_id'][:12]}), not {address}: give this replica its own "
                          f"--data-dir, or start that node with --port {recorded.port}")


def _recorded(identity: dict, data_dir: str, secret: bytes):
    from .members import config_addresses

    return (identity["node"], config_addresses(identity["config"]), identity["cluster_id"].encode(),
            data_dir, secret, identity["config"])


def limits_from(args: argparse.Namespace) -> Limits:
    """The Limits of the parsed flags (ConfigError names the bad flag)."""
    return Limits(**{name: getattr(args, name) for name, *_ in LIMIT_FLAGS},
                  require_passwords=getattr(args, "require_passwords", False))


def status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chatserver status", description="Show every replica's state.")
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"replicas to ask (default: {DEFAULT_PEERS})")
    parser.add_argument("--json", action="store_true", help="one JSON object per replica")
    parser.add_argument("--secret-file", default=None,
                        help=f"the cluster secret, for everything beyond role and primary "
                             f"(default: {DEFAULT_SECRET_FILE} if it exists)")
    parser.add_argument("--tls-ca", metavar="FILE", help="ask over TLS, verifying the replicas with these CAs")
    parser.add_argument("--tls", action="store_true", help="ask over TLS, verifying with the system's trust store")
    args = parser.parse_args(argv)
    try:
        peers = parse_peers(args.peers)
        secret = read_status_secret(args.secret_file)
        tls = status_tls(args)
    except ConfigError as exc:
        print(f"chatserver status: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print("chatserver status: no cluster secret (--secret-file): showing role and primary only",
              file=sys.stderr)
    if args.watch:
        return watch_status(peers, secret, args.json, tls)
    return 0 if status_table(peers, secret, args.json, tls) else 1


def watch_status(peers, secret: bytes | None, as_json: bool, tls: ssl.SSLContext | None = None) -> int:
    """``status --watch``: the table again every second (the screen cleared first on a
    terminal), until Ctrl-C."""
    clear = sys.stdout.isatty() and not as_json
    try:
        while True:
            started = time.monotonic()
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(time.strftime("%H:%M:%S"))
            status_table(peers, secret, as_json, tls)
            sys.stdout.flush()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `status --watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def status_table(peers, secret: bytes | None, as_json: bool, tls: ssl.SSLContext | None = None) -> int:
    """Print one line per replica; how many answered (a refused proof is no answer: with a
    wrong secret everywhere, ``status`` exits 1)."""
    answered = 0
    if not as_json:
        print(f"{'replica':<22} {'role':<11} {'view':>5} {'primary':<22} {'last':>7} {'commit':>7}  members")
    for addr in peers:
        status = query_status(addr.host, addr.port, secret=secret, tls=tls)  # the cluster id it names
        if as_json:
            print(json.dumps({"address": str(addr), **(status or {"answered": False})}))
        else:
            print(status_row(addr, status, peers))
        answered += status is not None and "error" not in status
    if not as_json:
        print("(* = serving clients)")
    return answered


def status_row(addr, status: dict | None, peers) -> str:
    """One line of the ``chatserver status`` table (public answers leave the numbers blank)."""
    if status is None:
        return f"{str(addr):<22} {'no answer':<11}"
    if "error" in status:
        return f"{str(addr):<22} {'refused':<11} {status['error']}"
    one_host = len({p.host for p in peers}) == 1  # ports alone say it; else whole addresses
    # node id -> address: the replica's own configuration (ids are no longer --peers positions
    # once members changed), else the --peers list
    names = {node: parse_address(a) for node, a in status.get("config") or ()} or dict(enumerate(peers))
    members = ",".join((str(names[m].port) if one_host else str(names[m])) if m in names else str(m)
                       for m in status.get("members", []))
    role = "removed" if status.get("removed") else status["role"] + ("*" if status.get("serving") else "")
    return (f"{str(addr):<22} {role:<11} {status.get('view', ''):>5} {status.get('primary_address') or '-':<22} "
            f"{status.get('last_index', ''):>7} {status.get('commit_index', ''):>7}  {members}")


def query_status(host: str, port: int, timeout: float = 1.0, *, secret: bytes | None = None,
                 cluster: bytes | None = None, tls: ssl.SSLContext | None = None) -> dict | None:
    """One replica's status as a dict, or None when it does not answer.

    Without ``secret``: the public fields only (address, role, serving, primary_address).  With
    the cluster secret and the cluster id (``cluster``; None: the one the replica names, since a
    cluster that changed members is no longer named by any --peers list): everything, after the HMAC
    challenge of chatnet/server/status.py; a refused proof gives ``{"error": ...}``.  With
    ``tls`` (a client context): over TLS, the replica's certificate verified for ``host``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
            sock.settimeout(timeout)
            reader = sock.makefile("rb")
            if secret is None:
                sock.sendall(STATUS_PREFACE)
            else:
                sock.sendall(STATUS_AUTH_PREFACE)
                nonce_hex, _, named = reader.readline().strip().partition(b" ")
                nonce = bytes.fromhex(nonce_hex.decode("ascii"))
                cluster = named if cluster is None else cluster
                sock.sendall(status_proof(secret, cluster, nonce).hex().encode() + b"\n")
            return json.loads(reader.readline())
    except (OSError, ValueError):
        return None


def read_status_secret(path: str | None) -> bytes | None:
    """The secret for ``chatserver status``: from ``path``, else the default file if it is
    there; None (public fields only) when there is none."""
    if path is None and not os.path.exists(DEFAULT_SECRET_FILE):
        return None
    return read_secret(path or DEFAULT_SECRET_FILE)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["members"]:
        from .members import members_main

        return members_main(argv[1:])
    if argv[:1] in (["backup"], ["restore"]):
        from .backup import backup_main, restore_main

        return (backup_main if argv[0] == "backup" else restore_main)(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        peers = choose_peers(args)
        limits = limits_from(args)
        tls = tls_from(args)
        if args.local:
            from .launcher import run_local

            base = args.data_dir or DEFAULT_BASE_DIR
            secret_file = args.secret_file or os.path.join(base, "cluster.secret")
            extra = ["--heartbeat-ms", str(args.heartbeat_ms), "--failure-timeout-ms", str(args.failure_timeout_ms),
                     "--log-retain", str(args.log_retain), *(["--naive"] if args.naive else []),
                     "--log-level", args.log_level, "--slow-client-timeout", str(args.slow_client_timeout),
                     "--log-format", args.log_format, "--quorum", args.quorum]
            for name, *_ in LIMIT_FLAGS:  # every limit flag reaches every child replica
                extra += ["--" + name.replace("_", "-"), str(getattr(limits, name))]
            extra += ["--require-passwords"] if limits.require_passwords else []
            extra += tls_flags(args)
            return run_local(peers, base, secret_file, extra, metrics_port=args.metrics_port)
        me, peers, cluster, data_dir, secret, config = replica_identity(args, peers)
        if args.heartbeat_ms <= 0 or args.failure_timeout_ms < 2 * args.heartbeat_ms:
            raise ConfigError("--failure-timeout-ms must be at least twice --heartbeat-ms, both positive")
        if args.log_retain < 1:
            raise ConfigError("--log-retain must be at least 1")
    except ConfigError as exc:
        print(f"chatserver: {exc}", file=sys.stderr)
        return 2
    port = peers[me].port
    setup_logging(args.log_level, args.log_format, str(peers[me]), port)
    from .chatserver import ChatServer

    try:
        server = ChatServer(
            peers, me, data_dir, secret=secret, slow_client_timeout=args.slow_client_timeout,
            heartbeat=args.heartbeat_ms / 1000, failure_timeout=args.failure_timeout_ms / 1000,
            log_retain=args.log_retain, naive=args.naive, limits=limits, metrics_port=args.metrics_port,
            quorum=args.quorum, tls=tls, cluster=cluster, config=config,
        )
        server.start()
    except (StoreError, MetricsError) as exc:
        logging.getLogger("chatnet").error("%s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("chatnet").error("cannot listen on %s: %s", peers[me], exc)
        return 1
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
