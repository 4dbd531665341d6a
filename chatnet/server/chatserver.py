"""A chatnet replica's socket front end: the reactor wired to the codec, the peer transport
and the :class:`~.host.ReplicaHost` (which owns the replication core, the chat service and the
store, and is shared unchanged with the simulator).

This is the only place where the pure parts meet sockets.  Per loop iteration:

1. socket events: a new connection is classified once by its first bytes (client, peer, status
   query); client requests are decoded and handed to the host's service.  A connection waiting
   for the answer of a state-changing request gets no further request handled (answers stay
   in order); after ``MAX_PIPELINED`` decoded requests it is not read either, so TCP pushes
   back on a client that pipelines without bound.  Peer messages go to the host.
2. before sleeping (``_before_sleep``): one :meth:`ReplicaHost.cycle` — propose, persist in one
   transaction, send, and only then hand back the answers and live chat to write.
3. writes go straight to the sockets; EVENT_WRITE is registered only for bytes a send() could
   not take.

Isolation: an exception while handling one connection's bytes closes that connection with a
logged reason; it never stops the replica.  A failure of the host itself (the store cannot
write) stops the replica loudly, before anything is acknowledged.

Flow control: a connection whose output exceeds the high-water mark stops receiving live chat
(it stays queued in the store) and is not read until it drains below the low-water mark; one
that stays congested for ``slow_client_timeout`` seconds is disconnected — its account goes
offline and its undelivered chat waits for its next login.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import os
import resource
import socket

from ..loop.connection import HIGH_WATER, LOW_WATER, BufferedSocket, ConnectionLost
from ..loop.reactor import READ, WRITE, Reactor
from ..loop.tls import TLSSettings, looks_like_tls
from ..protocol.codec import CLOSED, NEED_DATA, STATUS_ERROR, RequestDecoder
from ..protocol.texts import (
    BACKUP_PREFACE,
    MEMBERS_PREFACE,
    PREFACES,
    STATUS_AUTH_PREFACE,
    STATUS_PREFACE,
    T_ADDRESS_FULL,
    T_HANDSHAKE_TIMEOUT,
    T_IDLE_TIMEOUT,
    T_SERVER_FULL,
    T_TLS_REQUIRED,
)
from ..replication.transport import PeerTransport
from .background import BackgroundStorage
from .backup import StoreCopy
from .config import Address, Limits, cluster_id
from .host import ReplicaHost
from .members import REQUEST_TIMEOUT, config_addresses
from .metrics import PUBLISH_INTERVAL, MetricsServer, ReplicaMetrics, TimedStorage
from .passwords import ThreadHasher
from .service import Close, Reply, frame
from .status import MembersChallenge, StatusChallenge, json_line, public_status
from .store import Store, StoreError

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
MAX_PIPELINED = 16  # requests of one connection handled per loop pass (then it waits its turn)
MAX_INPUT_BYTES = 64 * 1024  # undecoded input kept per connection; beyond it, TCP holds the rest
CLIENT_SNDBUF = 128 * 1024
ACCEPT_BACKOFF = 0.1  # seconds to stop accepting after EMFILE and friends
ACCEPT_LOG_INTERVAL = 5.0  # accept errors are logged at most once per interval, with a count
SWEEP_INTERVAL = 1.0  # seconds between checks of handshake and idle timeouts
STATUS_PER_SECOND = 50  # public status answers per second; more queries are closed unanswered
MAX_STATUS_QUERIES = 16  # authenticated status queries in progress at once
STATUS_TIMEOUT = 5.0  # seconds an authenticated status query has to send its proof
BACKUP_TIMEOUT = 600.0  # seconds a network backup may take, proof, copy and transfer
DIGEST_MAX_AGE = 1.0  # seconds between two status queries' requests for a fresh state digest
# -- TLS (--tls-cert, --require-tls): the answer to a plaintext client when TLS is required


class ClientConnection:
    """A client socket, its request decoder and its output buffer."""

    def __init__(self, server: ChatServer, conn_id: int, sock: socket.socket, addr):
        self.server = server
        self.id = conn_id
        self.addr = addr
        self.io = BufferedSocket(sock)
        self.decoder = RequestDecoder()
        self.closed = False
        self.closing = False  # close once the output is written
        self.eof = False
        self.congested = False
        self.slow_timer = None
        self.sniff: bytes | None = b""  # first bytes, until we know client from peer
        self.opened = self.last_active = server.reactor.clock()
        self.identified = False  # a first complete request arrived
        self.admitted = False  # counted as a client (its first bytes were not a peer's preface)
        self.tls_checked = False  # TLS: its first byte was looked at (ClientHello or plaintext)
        self.mask = 0  # the reactor interest last asked for it (an unchanged one costs no call)
        # An admitted plaintext client in line mode: its reads skip classification (on_readable)
        self.steady = False

    def handle_event(self, mask: int) -> None:
        if mask & WRITE:
            self.server.flush(self)
        if mask & READ and not self.closed:
            self.server.on_readable(self)

    def close(self) -> None:
        self.server.close_connection(self, "handler error")

    def __repr__(self) -> str:
        return f"<client {self.id} {self.addr}>"


class _ShortLived:
    """A connection that is no longer a client and will be gone within ``seconds``: it is kept
    in ``registry`` (so shutdown closes it) and closed at the deadline whatever happens."""

    closed = False

    def __init__(self, server: ChatServer, io: BufferedSocket, registry: set, seconds: float):
        self.server, self.io, self.registry = server, io, registry
        registry.add(self)
        self.timer = server.reactor.timers.call_later(seconds, self.close)

    def _recv(self) -> bytes | None:
        """What arrived (plaintext, or what the TLS records carried); b"" at the end."""
        try:
            return self.io.recv()
        except ConnectionLost:
            return b""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.registry.discard(self)
        self.server.reactor.forget(self.io.sock)
        self.io.close()


class _StatusQuery(_ShortLived):
    """An authenticated status query waiting for its proof line (chatnet/server/status.py)."""

    def __init__(self, server: ChatServer, io: BufferedSocket, challenge: StatusChallenge):
        super().__init__(server, io, server.status_queries, STATUS_TIMEOUT)
        self.challenge = challenge

    def handle_event(self, mask: int) -> None:
        data = self._recv()
        if data is not None:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        verdict = self.challenge.receive(data)
        if verdict is None:
            return
        answer = self.server.status() if verdict else {"error": "status proof refused: wrong cluster secret"
                                                       if self.challenge.secret else
                                                       "this replica runs alone, without a cluster secret"}
        self.io.write(json_line(answer))
        try:  # one line into a fresh socket's buffer: never blocks the loop
            self.io.flush()
        except ConnectionLost:
            pass
        self.close()


class _MembersQuery(_StatusQuery):
    """A ``chatserver members`` request (chatnet/server/members.py): the proof and request
    line, then one answer -- at once, or when the change it asked for is committed."""

    def __init__(self, server: ChatServer, io: BufferedSocket, challenge: MembersChallenge):
        _ShortLived.__init__(self, server, io, server.status_queries, REQUEST_TIMEOUT)
        self.challenge = challenge
        self.asked = False

    def feed(self, data: bytes) -> None:
        if self.asked:
            return
        request = self.challenge.receive(data)
        if request is None:
            return
        self.asked = True
        if request is False:
            self.answer({"error": "members request refused: wrong cluster secret"})
        elif self.server.transport is None:
            self.answer({"error": "this replica runs alone (no --peers): it has no members to change"})
        else:
            self.server.replica_host.admin.request(request, self.answer)

    def answer(self, obj: dict) -> None:
        if self.closed:
            return
        self.io.write(json_line({**obj, "cluster_id": self.server.cluster_id.decode()}))
        try:
            self.io.flush()
        except ConnectionLost:
            pass
        self.close()


class _BackupQuery(_StatusQuery):
    """``chatserver backup --server``: once the status proof checks, a copy of the store is made
    on a thread (:class:`~.backup.StoreCopy`) and streamed back as the socket takes it."""

    def __init__(self, server: ChatServer, io: BufferedSocket, challenge: StatusChallenge):
        _ShortLived.__init__(self, server, io, server.status_queries, BACKUP_TIMEOUT)
        self.challenge = challenge
        self.copy: StoreCopy | None = None

    def handle_event(self, mask: int) -> None:
        if self.copy is None:
            super().handle_event(mask)
        elif mask & WRITE:
            self._send()

    def feed(self, data: bytes) -> None:
        verdict = self.challenge.receive(data)
        if verdict is None:
            return
        if not verdict:
            return super().feed(b"")  # the refusal line, as a status query's
        if self.server.tls is not None and self.server.tls.require and self.io.tls is None:
            # a copy carries every chat, token and password record: never in plaintext from
            # a replica that requires TLS (a status answer carries none of them)
            return self._refuse("this replica requires TLS, and a backup carries the whole store: "
                                "ask over TLS (backup --tls-ca FILE)")
        self.server.reactor.set_interest(self.io.sock, 0, self)
        self.copy = StoreCopy(self.server.replica_host.storage.path, self.server.reactor.wake)
        self.server.reactor.before_sleep.append(self._ready)

    def _refuse(self, why: str) -> None:
        self.io.write(json_line({"error": why}))
        self._send()

    def _ready(self) -> None:
        """Each loop pass until the copy is made: then queue it and write as the socket takes it."""
        if self.closed or not self.copy.done:
            return
        self.server.reactor.before_sleep.remove(self._ready)
        self.io.write(self.copy.answer())
        self.copy.data = None
        self._send()

    def _send(self) -> None:
        try:
            self.io.flush()
        except ConnectionLost:
            return self.close()
        if self.io.pending:
            self.server.reactor.set_interest(self.io.sock, WRITE, self)
        else:
            self.close()

    def close(self) -> None:
        if self.copy is not None and self._ready in self.server.reactor.before_sleep:
            self.server.reactor.before_sleep.remove(self._ready)
        super().close()


# Authenticated queries by their preface: each answers the status challenge first.
_AUTHENTICATED = {STATUS_AUTH_PREFACE: _StatusQuery, MEMBERS_PREFACE: _MembersQuery, BACKUP_PREFACE: _BackupQuery}


def _send_and_close(io: BufferedSocket, line: bytes) -> None:
    """One small line into a fresh socket's buffer (never blocks the loop), then close."""
    io.write(line)
    try:
        io.flush()
    except ConnectionLost:
        pass
    io.close()


# -- TLS: how a refused plaintext client is closed ------------------------------------------------
MAX_LINGERING = 256  # refused connections drained at once; beyond, closed at once
LINGER_SECONDS = 2.0


class _Lingering(_ShortLived):
    """A connection told it was refused (``--require-tls``): our side is shut for writing and
    what the client still sends is read and dropped until it closes (at most LINGER_SECONDS).
    Closing at once with its next request unread would make the kernel reset the connection,
    and a reset can destroy the frame that says why before the client reads it."""

    def __init__(self, server: ChatServer, io: BufferedSocket):
        super().__init__(server, io, server._lingering, LINGER_SECONDS)
        try:
            io.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        server.reactor.set_interest(io.sock, READ, self)

    def handle_event(self, mask: int) -> None:
        if self._recv() == b"":
            self.close()
# -- end TLS


class _Listener:
    closed = False

    def __init__(self, server: ChatServer):
        self.server = server

    def handle_event(self, mask: int) -> None:
        self.server.accept()


class ChatServer:
    """One replica's sockets: clients and peers on one port, around a :class:`ReplicaHost`."""

    def __init__(
        self,
        peers: list[Address],
        me: int,
        data_dir: str,
        *,
        secret: bytes | None = None,
        reactor: Reactor | None = None,
        slow_client_timeout: float = 60.0,
        heartbeat: float = 0.1,
        failure_timeout: float = 1.0,
        log_retain: int = 10_000,
        naive: bool = False,
        limits: Limits | None = None,
        metrics_port: int | None = None,
        quorum: str = "all",
        tls: TLSSettings | None = None,
        cluster: bytes | None = None,
        config=None,
    ):
        # peers: a --peers list or the id -> address map it started from; cluster: the cluster id
        self.peers = dict(peers) if isinstance(peers, dict) else dict(enumerate(peers))
        self.me = me
        self.cluster_id = cluster if cluster is not None else cluster_id(list(peers)).encode()
        self.host, self.port = peers[me].host, peers[me].port
        self.data_dir = data_dir
        self.reactor = reactor or Reactor()
        self.slow_client_timeout = slow_client_timeout
        self.heartbeat = heartbeat
        self.failure_timeout = failure_timeout
        self.transport = self._peer_transport(secret, tls)
        self.secret = secret
        self.tls = tls  # TLS on the client port (and peer links), or None: plaintext only
        self._lingering: set[_Lingering] = set()  # --require-tls: refused, draining until closed
        self.status_queries: set[_StatusQuery] = set()
        # -- metrics (--metrics-port): chatnet/server/metrics.py ------------------------------
        self.metrics = ReplicaMetrics() if metrics_port is not None else None
        self.metrics_port, self.metrics_server = metrics_port, None
        self._limit_logged = (float("-inf"), 0)  # (last connection-limit line, refusals since)
        storage = self._storage(data_dir, naive)
        # -- end metrics
        # -- passwords: scrypt off the loop thread, which it wakes when a job is done (passwords.py)
        self.hasher = ThreadHasher(wake=self.reactor.wake)
        self.replica_host = ReplicaHost(
            me, tuple(self.peers), storage, network=self.transport, addresses=self.peers,
            failure_ticks=max(2, round(failure_timeout / heartbeat)), retain_entries=log_retain,
            naive=naive, limits=limits, hasher=self.hasher, quorum=quorum, config=config,
        )
        self.service = self.replica_host.service
        self.replica = self.replica_host.replica
        self._config = None  # the configuration the transport dials (followed in _before_sleep)
        self._follow_config()
        if self.metrics is not None:
            self.replica_host.events.metrics = self.metrics
        self.limits = limits or Limits()
        self._init_connections()
        self.reactor.before_sleep.append(self._before_sleep)
        self.reactor.on_stall = self._on_stall
        self.reactor.stall_threshold = failure_timeout / 2  # peers may replace us after one timeout

    def _init_connections(self) -> None:
        """The front end's own state: client connections, caps and the status rate."""
        self.conns: dict[int, ClientConnection] = {}
        self._ids = itertools.count(1)
        self._dirty: set[ClientConnection] = set()
        self._backlog: set[ClientConnection] = set()  # used up their requests-per-pass budget
        self._listener_handler = _Listener(self)
        self.listener: socket.socket | None = None
        self._per_address: dict[str, int] = {}  # admitted clients per IP address
        self._clients = 0  # admitted clients
        self._accept_errors = 0
        self._accept_error_logged = float("-inf")
        self._status_window = (0.0, 0)  # (second it started, answers given in it)
        self._digest_asked = float("-inf")  # when a status query last asked for a fresh digest
        self._digest_seen = -1  # the applied index the previous status query saw

    def _peer_transport(self, secret: bytes | None, tls) -> PeerTransport | None:
        if len(self.peers) == 1:
            return None
        if not secret:
            raise ValueError("a cluster of several replicas needs a secret")
        return PeerTransport(self.reactor, self.me, self.peers, secret, self._on_peer_message,
                             self._on_link_change, tls=tls, cluster=self.cluster_id)

    def _follow_config(self) -> None:
        """Dial the members of the configuration in force (it changes with `members add`,
        `members remove`, and when this replica catches up on such a change)."""
        config = self.replica.config
        if config == self._config:
            return
        self._config = config
        if self.transport is not None:
            self.transport.set_addresses(config_addresses(config))

    def _storage(self, data_dir: str, naive: bool):
        """Durable writes on the storage thread, so the loop never waits for fsync (the --naive
        baseline keeps the synchronous store: one fsync per command, on the loop); timed for
        the metrics when they are on."""
        storage = Store(data_dir) if naive else BackgroundStorage(Store(data_dir), wake=self.reactor.wake_hooks)
        return TimedStorage(storage, self.metrics) if self.metrics is not None else storage

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> None:
        raise_fd_limit()
        tune_gc()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(4096)  # the kernel caps it at net.core.somaxconn; storms of connects queue here
        sock.setblocking(False)
        self.listener = sock
        self.reactor.set_interest(sock, READ, self._listener_handler)
        if self.transport is not None:
            self.transport.start()
        self.reactor.timers.call_later(self.heartbeat, self._tick)
        self.reactor.timers.call_later(SWEEP_INTERVAL, self._sweep)
        if self.metrics is not None:  # the HTTP thread only ever reads published snapshots
            self.metrics_server = MetricsServer(self.metrics.registry, self.host, self.metrics_port,
                                                self.replica_host.storage.path)
            self.metrics_server.start()
            self._publish_metrics()
        log.info(
            "chatnet replica %d of %d listening on %s:%d, data in %s (%d accounts, log at %d, view %d)",
            self.me, len(self.peers), self.host, self.port, self.data_dir,
            len(self.service.state.accounts), self.replica.last_index, self.replica.view,
            extra={"event": "started", "address": f"{self.host}:{self.port}", "data_dir": self.data_dir,
                   "metrics_port": self.metrics_server.port if self.metrics_server else None},
        )

    def serve_forever(self) -> None:
        self.reactor.install_signal_handlers()
        try:
            self.reactor.run()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("shutting down (%s)", self.reactor.stop_reason or "stopped",
                 extra={"event": "shutdown", "reason": str(self.reactor.stop_reason or "stopped")})
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.listener is not None:
            self.reactor.forget(self.listener)
            self.listener.close()
            self.listener = None
        try:  # persist what is pending, wait for the disk, and write the answers we can
            self._before_sleep()
            self.replica_host.flush()
            self._before_sleep()
        except StoreError as exc:
            log.error("%s", exc)
        for conn in list(self.conns.values()):
            self.close_connection(conn, "server shutdown")
        for query in list(self.status_queries):
            query.close()
        for lingering in list(self._lingering):
            lingering.close()
        if self.transport is not None:
            self.transport.stop()
        self.replica_host.close()
        self.reactor.close()

    # -- accepting ------------------------------------------------------------------------------
    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            if len(self.conns) >= self.limits.max_connections + Limits.PEER_RESERVE:
                sock.close()  # not even room to tell a peer from a client
                self._accept_failed(OSError(errno.EMFILE, "over the connection cap and its peer reserve"))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A fixed kernel send buffer (no autotuning to megabytes) keeps kernel memory per
            # client bounded and lets our own high-water mark see a client that does not read.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
            conn = ClientConnection(self, next(self._ids), sock, addr)
            self.conns[conn.id] = conn
            self.replica_host.open(conn.id, addr[0])  # the address: password back-off
            self._update_interest(conn)

    def _admit(self, conn: ClientConnection) -> str | None:
        """Count a connection as a client once its first bytes show it is not a peer (so peers
        always get in, within the reserve); why it may not be one, or None."""
        ip = conn.addr[0]
        if self._clients >= self.limits.max_connections:
            return T_SERVER_FULL
        cap = self.limits.max_per_address
        if cap and self._per_address.get(ip, 0) >= cap:
            return T_ADDRESS_FULL
        conn.admitted = True
        self._clients += 1
        self._per_address[ip] = self._per_address.get(ip, 0) + 1
        return None

    def _accept_failed(self, exc: OSError) -> None:
        """Count accept errors and log them at most once per ACCEPT_LOG_INTERVAL; on running out
        of descriptors or memory, pause accepting briefly (the backlog waits in the kernel)."""
        self._accept_errors += 1
        now = self.reactor.clock()
        if now - self._accept_error_logged >= ACCEPT_LOG_INTERVAL:
            log.warning("accept failed %d time(s) in the last %.0fs, latest: %s",
                        self._accept_errors, ACCEPT_LOG_INTERVAL, exc)
            self._accept_errors, self._accept_error_logged = 0, now
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self.listener is not None:
            self.reactor.set_interest(self.listener, 0, None)
            self.reactor.timers.call_later(ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.listener is not None:
            self.reactor.set_interest(self.listener, READ, self._listener_handler)

    # -- reading --------------------------------------------------------------------------------
    def on_readable(self, conn: ClientConnection) -> None:
        try:
            data = conn.io.recv()
        except ConnectionLost as exc:
            self.close_connection(conn, str(exc))
            return
        if conn.steady and data:  # the hot path: nothing left to classify, no TLS, line mode
            conn.last_active = self.reactor.clock()
            conn.decoder.receive_data(data)
            self._feed(conn)
            return
        if data is None:
            if conn.io.tls is not None:  # TLS records without plaintext: the handshake may answer
                self._tls_progress(conn)
            return
        conn.last_active = self.reactor.clock()
        if self.tls is not None and not conn.tls_checked and data and self._start_tls(conn, data):
            return
        if conn.sniff is not None and self._sniff(conn, data):
            return
        if data and self._tls_refused(conn):
            return
        if data and not conn.admitted and (refusal := self._admit(conn)) is not None:
            self._refuse(conn, refusal)  # over a cap, and not a peer: say why and go
            self._limit_reached(conn, "max_connections" if refusal == T_SERVER_FULL else "max_per_address")
            return
        self._receive(conn, data)
        if data and not conn.decoder.line_mode and not (conn.closed or conn.eof):
            self._read_on(conn)
        if conn.io.tls is not None and not conn.closed:
            self._tls_progress(conn)
        conn.steady = conn.admitted and conn.sniff is None and conn.io.tls is None \
            and conn.decoder.line_mode and (self.tls is None or conn.tls_checked)

    # -- TLS (--tls-cert): one byte tells a ClientHello from plaintext; chatnet/loop/tls.py -------
    def _start_tls(self, conn: ClientConnection, data: bytes) -> bool:
        """Look at a connection's first byte once: a ClientHello makes it a TLS connection (its
        plaintext is then classified as any connection's: client, peer or status query).
        Returns True when ``data`` was consumed here."""
        conn.tls_checked = True
        if not looks_like_tls(data):
            return False
        try:
            plain = conn.io.start_tls(self.tls.server_endpoint(), data)
        except ConnectionLost as exc:
            log.info("closing %r: %s", conn, exc)
            self.close_connection(conn, str(exc))
            return True
        if plain is not None:  # a ClientHello never carries data; b"" means it ended already
            self._handle_plaintext(conn, plain)
        else:
            self._tls_progress(conn)
        return True

    def _handle_plaintext(self, conn: ClientConnection, plain: bytes) -> None:
        """Plaintext that arrived with the first TLS records: as if read on its own."""
        if conn.sniff is not None and self._sniff(conn, plain):
            return
        if plain and not conn.admitted and (refusal := self._admit(conn)) is not None:
            self._refuse(conn, refusal)
            self._limit_reached(conn, "max_connections" if refusal == T_SERVER_FULL else "max_per_address")
            return
        self._receive(conn, plain)

    def _tls_progress(self, conn: ClientConnection) -> None:
        """Handshake records (or tickets) to send: flushed with this iteration's writes."""
        if conn.io.pending and not conn.closed:
            self._dirty.add(conn)
            self._update_interest(conn)

    def _tls_refused(self, conn: ClientConnection) -> bool:
        """--require-tls: a plaintext client is told why, then closed (status queries in
        plaintext are still answered: they were handed over before this)."""
        if self.tls is None or not self.tls.require or conn.io.tls is not None or conn.admitted:
            return False
        log.debug("refusing %r: plaintext client, and this server requires TLS", conn)
        self.reactor.forget(conn.io.sock)
        self.conns.pop(conn.id, None)
        self.replica_host.close_connection(conn.id)
        conn.closed = True
        conn.io.write(frame(STATUS_ERROR, T_TLS_REQUIRED))
        try:  # one frame into a fresh socket's buffer: never blocks the loop
            conn.io.flush()
        except ConnectionLost:
            conn.io.close()
            return True
        if len(self._lingering) >= MAX_LINGERING:
            conn.io.close()
        else:
            _Lingering(self, conn.io)
        return True
    # -- end TLS

    def _receive(self, conn: ClientConnection, data: bytes) -> None:
        if not data:
            conn.eof = True
            self.service.input_ended(conn.id)
        conn.decoder.receive_data(data)
        self._feed(conn)

    def _read_on(self, conn: ClientConnection) -> None:
        """A seed-style client (one request per write) often writes and closes at once: read on
        after its request to see the close now, so its session ends before requests that other
        connections sent after it are judged (arrival order).  Line-mode clients, ours and the
        benchmarks', never pay for this extra recv()."""
        try:
            more = conn.io.recv()
        except ConnectionLost as exc:
            self.close_connection(conn, str(exc))
            return
        if more is not None:
            self._receive(conn, more)

    def _sniff(self, conn: ClientConnection, data: bytes) -> bool:
        """Decide once, on its first bytes, whether a connection is a client, a peer or a status
        query.  Returns True when the bytes were consumed here."""
        head = conn.sniff + data
        for preface in PREFACES:
            if head.startswith(preface):
                conn.sniff = None
                self._hand_over(conn, preface, head[len(preface):])
                return True
            if data and preface.startswith(head):
                conn.sniff = head  # a prefix of a preface: wait for the rest
                return True
        conn.sniff = None
        if len(head) > len(data):  # bytes held back while sniffing belong to the client
            conn.decoder.receive_data(head[: len(head) - len(data)])
        return False

    def _hand_over(self, conn: ClientConnection, preface: bytes, rest: bytes) -> None:
        self.reactor.forget(conn.io.sock)
        self.conns.pop(conn.id, None)
        self.replica_host.close_connection(conn.id)
        conn.closed = True
        io = conn.io  # plaintext, or the TLS session the preface came in
        if preface == STATUS_PREFACE:
            if self._status_allowed():
                _send_and_close(io, json_line(public_status(self.status(digest=False))))
            else:
                io.close()
        elif preface in _AUTHENTICATED:
            self._start_status_query(io, rest, _AUTHENTICATED[preface])
        elif self.transport is None:
            log.warning("refused peer connection from %s:%d: this replica runs alone", *conn.addr[:2])
            io.close()
        elif self.tls is not None and io.tls is None:  # TLS on: peer links too, always
            self.transport.log_mismatch(f"from {conn.addr[0]}", "it dialled without TLS, and this replica "
                                        "uses TLS on peer links; give every replica --tls-cert and --tls-key")
            io.close()
        else:
            self.transport.adopt(io, conn.addr, rest)

    def status(self, digest: bool = True) -> dict:
        """The full status (an authenticated query).  ``digest`` False for a public query,
        which shows no digest: an unauthenticated poller must not make a quiet replica fork a
        serialization every DIGEST_MAX_AGE (:meth:`_state_digest`)."""
        status = self.replica_host.status()
        primary = status.get("primary")
        digest, digest_applied = self._state_digest() if digest else ("", -1)
        status.update(address=f"{self.host}:{self.port}", clients=len(self.conns), digest=digest,
                      digest_applied=digest_applied,
                      primary_address=self.replica.config.address(primary) if primary is not None else None)
        return status

    def _start_status_query(self, io: BufferedSocket, rest: bytes, kind: type) -> None:
        """An authenticated query (status, members or backup: ``kind``): the challenge now, the
        proof and what it asks for as they arrive."""
        if len(self.status_queries) >= MAX_STATUS_QUERIES:
            io.close()
            return
        challenge = (MembersChallenge if kind is _MembersQuery else StatusChallenge)(
            self.secret, self.cluster_id, os.urandom(32))
        io.write(challenge.challenge())
        try:
            io.flush()
        except ConnectionLost:
            io.close()
            return
        query = kind(self, io, challenge)
        self.reactor.set_interest(io.sock, READ, query)
        if rest:
            query.feed(rest)

    def _status_allowed(self) -> bool:
        """At most STATUS_PER_SECOND answers per second: status is for operators, not a load."""
        now = self.reactor.clock()
        started, given = self._status_window
        if now - started >= 1.0:
            started, given = now, 0
        self._status_window = (started, given + 1)
        return given < STATUS_PER_SECOND

    def _state_digest(self) -> tuple[str, int]:
        """A digest of the chat state and the applied index it describes: the latest one taken
        (off the loop, with a checkpoint or a peer's snapshot, or for this: host.Checkpoints).
        A query that finds it behind a state that has not moved since the previous query asks
        for a fresh one, at most once per DIGEST_MAX_AGE: digests are compared only at equal
        ``digest_applied``, i.e. on a quiet cluster, and a state under load is not worth a
        fork a second while someone polls."""
        checkpoints, now_applied = self.replica_host.checkpoints, self.replica_host.applied_index
        digest, applied = checkpoints.digest
        quiet, self._digest_seen = now_applied == self._digest_seen, now_applied
        now = self.reactor.clock()
        if applied != now_applied and quiet and now - self._digest_asked >= DIGEST_MAX_AGE:
            self._digest_asked = now
            checkpoints.digest_wanted = True
        return digest, applied

    def _feed(self, conn: ClientConnection) -> None:
        """Hand the connection's decoded requests to the service until it must wait.

        Any exception here comes from this connection's bytes (a request the codec or the
        service did not expect): it closes this connection, with the reason logged, and
        nothing else — one client can never stop the replica."""
        try:
            self._feed_requests(conn)
        except Exception:
            log.exception("closing %r: error while handling its request", conn)
            self.close_connection(conn, "internal error handling its request")
            return
        if not conn.closed:
            self._update_interest(conn)

    def _feed_requests(self, conn: ClientConnection) -> None:
        """At most MAX_PIPELINED requests per pass, none while its output is congested: one
        connection's pipelined reads (a flood of ``list``) never hold up other clients for
        more than a few milliseconds; what is left waits in ``_backlog`` for the next pass."""
        service, host = self.service, self.replica_host
        for _ in range(MAX_PIPELINED):
            if conn.closed or conn.closing or conn.congested or service.waiting(conn.id):
                return
            event = conn.decoder.next_event()
            if event is NEED_DATA:
                return
            if event is CLOSED:
                conn.closing = True
                self._dirty.add(conn)
                return
            conn.identified = True
            if self.metrics is not None:
                self.metrics.request_started(conn.id, getattr(event, "op", None), getattr(event, "args", ()))
            self._apply_effects(host.receive(conn.id, event))
        self._backlog.add(conn)

    def _refuse(self, conn: ClientConnection, text: str) -> None:
        """Tell a client why it is being closed, then close it once that is written."""
        conn.io.write(frame(STATUS_ERROR, text))
        conn.closing = True
        self._dirty.add(conn)
        self._update_interest(conn)

    def _sweep(self) -> None:
        """Close connections that sent no complete first request in time, and ones that are
        not logged in and stayed silent past the idle timeout (O(connections) once a second:
        a few ms at 10,000 connections)."""
        now = self.reactor.clock()
        limits, service = self.limits, self.service
        for conn in list(self.conns.values()):
            if conn.closing or conn.closed:
                continue
            if not conn.identified and now - conn.opened > limits.handshake_timeout:
                log.info("closing %r: no complete request within %gs", conn, limits.handshake_timeout,
                         extra={"event": "connection_timeout", "limit": "handshake_timeout", "client": conn.addr[0]})
                self._refuse(conn, T_HANDSHAKE_TIMEOUT.format(seconds=limits.handshake_timeout))
            elif now - conn.last_active > limits.idle_timeout and service.logged_in_as(conn.id) is None \
                    and not service.waiting(conn.id):
                log.info("closing %r: idle for %gs without logging in", conn, limits.idle_timeout,
                         extra={"event": "connection_timeout", "limit": "idle_timeout", "client": conn.addr[0]})
                self._refuse(conn, T_IDLE_TIMEOUT.format(seconds=limits.idle_timeout))
        self._flush_dirty()
        self.reactor.timers.call_later(SWEEP_INTERVAL, self._sweep)

    def _update_interest(self, conn: ClientConnection) -> None:
        # A connection stays registered for reading (no epoll_ctl per request) while its
        # undecoded input is under MAX_INPUT_BYTES: pipelined requests wait as bytes, decoded
        # only when they are handled; beyond that TCP holds the rest back.
        mask = 0
        reading = not (conn.closing or conn.eof or conn.congested) \
            and conn.decoder.buffered_bytes() < MAX_INPUT_BYTES
        if reading:
            mask |= READ
        if conn.io.pending and conn not in self._dirty:
            # Output that a flush of this iteration will try first needs no EVENT_WRITE yet:
            # it is registered only for bytes a send() could not take.
            mask |= WRITE
        if mask != conn.mask:
            self.reactor.set_interest(conn.io.sock, mask, conn)
            conn.mask = mask

    # -- the service's effects --------------------------------------------------------------------
    def _apply_effects(self, effects) -> None:
        for effect in effects:
            conn = self.conns.get(effect.conn)
            if conn is None or conn.closed:
                continue
            if isinstance(effect, Reply):
                conn.io.write(effect.data, effect.delivered)
                if self.metrics is not None:
                    self.metrics.answered(effect.conn, effect.data)
            elif isinstance(effect, Close):
                conn.closing = True
            self._dirty.add(conn)

    # -- replication ------------------------------------------------------------------------------
    def _tick(self) -> None:
        self.replica_host.tick()
        self.reactor.timers.call_later(self.heartbeat, self._tick)

    def _on_stall(self, late: float) -> None:
        log.warning("this replica's loop stalled for %.2fs (paused?); rejoining as recovering", late,
                    extra={"event": "stalled", "seconds": round(late, 3)})
        if self.metrics is not None:
            self.metrics.stalls.inc()
        self.replica_host.stalled()

    def _on_peer_message(self, peer: int, msg) -> None:
        self.replica_host.step(peer, msg)

    def _on_link_change(self, peer: int, up: bool) -> None:
        self.replica_host.peer_link(peer, up)

    # -- group commit -----------------------------------------------------------------------------
    def _before_sleep(self) -> bool:
        """One host cycle (persist once, then send), then write the answers it released.

        Returns True when more work is already pending (the loop then polls without waiting).
        A store failure propagates: the replica stops rather than acknowledge anything."""
        backlog, self._backlog = self._backlog, set()
        for conn in backlog:
            if not conn.closed:
                self._feed(conn)
        if self.metrics is not None:
            started, last_before = self.metrics.clock(), self.replica.last_index
        result = self.replica_host.cycle()
        self._follow_config()
        if self.metrics is not None:
            self.metrics.cycle(started, last_before, self.replica)
        if self.transport is not None:
            self.transport.flush()
        self._apply_effects(result.effects)
        for conn_id in result.unblocked:  # answered: their next request may go now
            conn = self.conns.get(conn_id)
            if conn is not None and not conn.closed and conn.decoder.has_input():
                self._feed(conn)
        self._flush_dirty()
        return result.more or bool(self._backlog)

    # -- writing ----------------------------------------------------------------------------------
    def _flush_dirty(self) -> None:
        while self._dirty:
            conn = self._dirty.pop()
            if not conn.closed:
                self.flush(conn)

    def flush(self, conn: ClientConnection) -> None:
        try:
            marks = conn.io.flush()
        except ConnectionLost as exc:
            self.close_connection(conn, str(exc))
            return
        for mark in marks:
            self.service.frames_written(mark)
        pending = conn.io.pending
        if not pending and conn.mask == READ and not (conn.congested or conn.closing):
            return  # all sent, as usual: no congestion to lift and no interest to change
        if conn.closing and not pending:
            self.close_connection(conn, "closed")
            return
        self._check_congestion(conn)
        self._update_interest(conn)

    def _check_congestion(self, conn: ClientConnection) -> None:
        pending = conn.io.pending
        if not conn.congested and pending > HIGH_WATER:
            conn.congested = True
            self.service.set_congested(conn.id, True)
            conn.slow_timer = self.reactor.timers.call_later(self.slow_client_timeout, self._drop_slow, conn)
            log.info("%r is not reading: live chat paused (%d bytes pending)", conn, pending)
        elif conn.congested and pending < LOW_WATER:
            conn.congested = False
            if conn.slow_timer is not None:
                conn.slow_timer.cancel()
                conn.slow_timer = None
            self.service.set_congested(conn.id, False)
            # the chat it missed, from the mailbox (behind any batch still on its way to disk)
            self._apply_effects(self.replica_host.behind_durability(self.service.take_effects()))
            self._backlog.add(conn)  # and the requests it sent meanwhile

    def _drop_slow(self, conn: ClientConnection) -> None:
        if not conn.closed and conn.congested:
            log.info("disconnecting %r: it did not read for %.0fs; its chat stays queued", conn, self.slow_client_timeout,
                     extra={"event": "slow_client_dropped", "client": f"{conn.addr[0]}:{conn.addr[1]}",
                            "account": self.service.logged_in_as(conn.id), "seconds": self.slow_client_timeout})
            if self.metrics is not None:
                self.metrics.slow_dropped.inc()
            self.close_connection(conn, "slow reader")

    def _forget_address(self, conn: ClientConnection) -> None:
        if not conn.admitted:
            return
        conn.admitted = False
        self._clients -= 1
        ip = conn.addr[0]
        left = self._per_address.get(ip, 1) - 1
        if left > 0:
            self._per_address[ip] = left
        else:
            self._per_address.pop(ip, None)

    def close_connection(self, conn: ClientConnection, reason: str) -> None:
        if conn.closed:
            return
        log.debug("closing %r: %s", conn, reason)
        conn.closed = True
        if conn.slow_timer is not None:
            conn.slow_timer.cancel()
        self.reactor.forget(conn.io.sock)
        conn.io.close()
        self.conns.pop(conn.id, None)
        self._forget_address(conn)
        self._dirty.discard(conn)
        self._backlog.discard(conn)
        self.replica_host.close_connection(conn.id)
        if self.metrics is not None:
            self.metrics.closed(conn.id)

    # -- operator events and metrics (chatnet/server/events.py, metrics.py) --------------------
    def _limit_reached(self, conn: ClientConnection, limit: str) -> None:
        """A client refused at a connection limit: counted, and logged at most once per
        ACCEPT_LOG_INTERVAL with the number refused since (a connection storm is one line)."""
        if self.metrics is not None:
            self.metrics.refused.inc(limit)
        now = self.reactor.clock()
        last, count = self._limit_logged
        count += 1
        if now - last >= ACCEPT_LOG_INTERVAL:
            log.warning("refused %d client connection(s) at a limit, latest %s from %s (%d clients now)",
                        count, limit, conn.addr[0], self._clients,
                        extra={"event": "connection_limit", "limit": limit, "client": conn.addr[0],
                               "refused": count, "clients": self._clients})
            last, count = now, 0
        self._limit_logged = (last, count)

    def _publish_metrics(self) -> None:
        """Every PUBLISH_INTERVAL: sample the gauges and publish a snapshot for the HTTP thread."""
        status = self.replica_host.status()
        match = getattr(self.replica, "_match", None) or {}  # the primary's view of each follower
        self.metrics.sample(status, dict(self.replica.config.members), dict(match), self._clients, len(self.conns))
        self.metrics.registry.publish()
        self.reactor.timers.call_later(PUBLISH_INTERVAL, self._publish_metrics)


# Allocations between two collections of the youngest generation (CPython's default is 700).
# A chat allocates a few dozen objects (request, command, entry, mail, frames, effects), so at
# the default a young collection ran every ~25 chats, and every tenth of them a middle one over
# the survivors -- the queued chat among them (docs/benchmarks.md, the hot path).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Collect the young generation less often: fewer, larger collections of garbage the chat
    state hardly has (it holds no reference cycles); every cycle is still collected."""
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), middle, old)


def raise_fd_limit() -> None:
    """Let one replica hold as many connections as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
