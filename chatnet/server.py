"""A chatnet replica: the reactor wired to the codec, the chat service and the store.

This is the only place where the pure parts meet I/O.  Per loop iteration:

1. socket events: requests are decoded and handed to the service; a connection waiting for
   the answer of a state-changing request is not read further (its requests stay in order,
   and TCP pushes back on a client that pipelines without bound);
2. before sleeping (``_before_sleep``): every command proposed this iteration is appended to
   the log and applied, and all of it is written in **one** SQLite transaction (group commit);
   only then are the answers and live chat put on the wire;
3. writes go straight to the sockets; EVENT_WRITE is registered only while bytes remain.

Flow control: a connection whose output exceeds the high-water mark stops receiving live chat
(it stays queued in the store) and is not read until it drains below the low-water mark; one
that stays congested for ``slow_client_timeout`` seconds is disconnected — its account goes
offline and its undelivered chat waits for its next login.
"""

from __future__ import annotations

import errno
import itertools
import logging
import resource
import socket

from .codec import CLOSED, NEED_DATA, RequestDecoder
from .connection import HIGH_WATER, LOW_WATER, BufferedSocket, ConnectionLost
from .reactor import READ, WRITE, Reactor
from .service import ChatService, Close, Reply
from .state import decode_command, encode_command
from .store import Store

log = logging.getLogger(__name__)

LOG_RETAIN = 10_000  # log entries kept behind the applied index (catch-up source for backups)
ACCEPT_BATCH = 64
CLIENT_SNDBUF = 128 * 1024
ACCEPT_BACKOFF = 0.1  # seconds to stop accepting after EMFILE and friends


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

    def handle_event(self, mask: int) -> None:
        if mask & WRITE:
            self.server.flush(self)
        if mask & READ and not self.closed:
            self.server.on_readable(self)

    def close(self) -> None:
        self.server.close_connection(self, "handler error")

    def __repr__(self) -> str:
        return f"<client {self.id} {self.addr}>"


class _Listener:
    closed = False

    def __init__(self, server: ChatServer):
        self.server = server

    def handle_event(self, mask: int) -> None:
        self.server.accept()


class ChatServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1538,
        data_dir: str = "chatnet-data/1538",
        *,
        reactor: Reactor | None = None,
        slow_client_timeout: float = 60.0,
    ):
        self.host, self.port, self.data_dir = host, port, data_dir
        self.reactor = reactor or Reactor()
        self.slow_client_timeout = slow_client_timeout
        self.store = Store(data_dir)
        loaded = self.store.load()
        self.service = ChatService(loaded.state)
        self.applied_index = loaded.applied_index
        # A single replica applies every entry in the transaction that appends it, so nothing
        # can be left unapplied; replay defensively anyway, in log order.
        changes = []
        for idx, _view, data in loaded.log:
            changes.extend(self.service.state.apply(decode_command(data))[1])
            self.applied_index = idx
        if loaded.log:
            self.store.write_batch(changes=changes, applied_index=self.applied_index)
        self.conns: dict[int, ClientConnection] = {}
        self._ids = itertools.count(1)
        self._dirty: set[ClientConnection] = set()
        self._listener_handler = _Listener(self)
        self.listener: socket.socket | None = None
        self.reactor.before_sleep.append(self._before_sleep)

    # -- start and stop ------------------------------------------------------------------------
    def start(self) -> None:
        raise_fd_limit()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.port = sock.getsockname()[1]
        self.reactor.set_interest(sock, READ, self._listener_handler)
        log.info(
            "chatnet serving on %s:%d, data in %s (%d accounts)",
            self.host, self.port, self.data_dir, len(self.service.state.accounts),
        )

    def serve_forever(self) -> None:
        self.reactor.install_signal_handlers()
        try:
            self.reactor.run()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        log.info("shutting down (%s)", self.reactor.stop_reason or "stopped")
        if self.listener is not None:
            self.reactor.forget(self.listener)
            self.listener.close()
            self.listener = None
        self._before_sleep()  # commit what is pending and write the answers we can
        for conn in list(self.conns.values()):
            self.close_connection(conn, "server shutdown")
        self.store.close()
        self.reactor.close()

    # -- accepting ------------------------------------------------------------------------------
    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); pausing accepts for %.1fs", exc, ACCEPT_BACKOFF)
                    self.reactor.set_interest(self.listener, 0, None)
                    self.reactor.timers.call_later(ACCEPT_BACKOFF, self._resume_accepting)
                else:
                    log.warning("accept failed: %s", exc)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A fixed kernel send buffer (no autotuning to megabytes) keeps kernel memory per
            # client bounded and lets our own high-water mark see a client that does not read.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
            conn = ClientConnection(self, next(self._ids), sock, addr)
            self.conns[conn.id] = conn
            self.service.connection_opened(conn.id)
            self._update_interest(conn)

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
        if data is None:
            return
        if not data:
            conn.eof = True
        conn.decoder.receive_data(data)
        self._feed(conn)

    def _feed(self, conn: ClientConnection) -> None:
        """Hand the connection's decoded requests to the service until it must wait."""
        service = self.service
        while not (conn.closed or conn.closing or service.waiting(conn.id)):
            event = conn.decoder.next_event()
            if event is NEED_DATA:
                break
            if event is CLOSED:
                conn.closing = True
                self._dirty.add(conn)
                break
            service.receive(conn.id, event)
            self._apply_effects()
        if not conn.closed:
            self._update_interest(conn)

    def _update_interest(self, conn: ClientConnection) -> None:
        mask = 0
        reading = not (conn.closing or conn.eof or conn.congested or self.service.waiting(conn.id))
        if reading:
            mask |= READ
        if conn.io.pending:
            mask |= WRITE
        self.reactor.set_interest(conn.io.sock, mask, conn)

    # -- the service's effects --------------------------------------------------------------------
    def _apply_effects(self) -> None:
        for effect in self.service.take_effects():
            conn = self.conns.get(effect.conn)
            if conn is None or conn.closed:
                continue
            if isinstance(effect, Reply):
                conn.io.write(effect.data, effect.delivered)
            elif isinstance(effect, Close):
                conn.closing = True
            self._dirty.add(conn)

    # -- group commit -----------------------------------------------------------------------------
    def _before_sleep(self) -> bool:
        """Commit this iteration's commands in one transaction, then write every answer.

        Returns True when more work is already pending (the loop then polls without waiting).
        """
        proposals = self.service.take_proposals()
        if proposals:
            self._commit(proposals)
        self._flush_dirty()
        return bool(self.service.proposals) or self.service.has_delivery_marks()

    def _commit(self, proposals: list) -> None:
        service = self.service
        entries, changes, answered = [], [], []
        for cmd, conn_id in proposals:
            self.applied_index += 1
            index = self.applied_index
            service.bind(index, cmd, conn_id)
            entries.append((index, 0, encode_command(cmd)))
            changes.extend(service.apply(index, cmd))
            if conn_id is not None:
                answered.append(conn_id)
        compact = None
        if self.applied_index % 1000 < len(proposals) and self.applied_index > LOG_RETAIN:
            compact = self.applied_index - LOG_RETAIN
        # Durable before any answer leaves: write_batch returns after the fsync.
        self.store.write_batch(entries=entries, changes=changes, applied_index=self.applied_index, compact_upto=compact)
        self._apply_effects()
        for conn_id in answered:  # their next pipelined requests may go now
            conn = self.conns.get(conn_id)
            if conn is not None and not conn.closed:
                self._feed(conn)

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
        if conn.closing and not conn.io.pending:
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
            self._apply_effects()  # the chat it missed, from the mailbox

    def _drop_slow(self, conn: ClientConnection) -> None:
        if not conn.closed and conn.congested:
            log.info("disconnecting %r: it did not read for %.0fs; its chat stays queued", conn, self.slow_client_timeout)
            self.close_connection(conn, "slow reader")

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
        self._dirty.discard(conn)
        self.service.connection_closed(conn.id)


def raise_fd_limit() -> None:
    """Let one replica hold as many connections as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
