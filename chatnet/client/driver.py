"""The socket driver: carries out a ClientSession's actions with one non-blocking socket.

It owns a ``selectors`` selector, so a user interface can wait on its own file descriptors in the
same loop: :meth:`SocketDriver.add_reader` registers a callback for, say, stdin, and
:meth:`SocketDriver.step` waits (at most until the session's next timer), moves bytes, fires
timers, and returns the session's events.  An outer loop that prefers to select itself can use
:meth:`fileno` (the selector's own descriptor, readable when a registered object is ready; epoll
and kqueue only), :meth:`timeout` and ``step(0)``.

Actions are carried out in the order the session emitted them.  A :class:`Persist` (durable
state on) goes to the ``persist`` callable given to the driver — ``StateStore.persist``, which
returns once the state is committed — so the acknowledgement behind it is written only after
the chat it covers is on disk.  Without ``persist`` the action is dropped.

Writes follow asyncio's transports: ``send()`` at once, keep only what the kernel did not take,
and watch EVENT_WRITE only while something is left.  Name resolution (``getaddrinfo``) is the
one blocking call; use numeric addresses where that matters.

With ``tls`` (an ``ssl.SSLContext``, see :func:`chatnet.loop.tls.client_context`) every
connection is TLS, through the sans-I/O :class:`~chatnet.loop.tls.TLSEndpoint`: the socket
stays non-blocking, the session is told of the connection only once the handshake completed
and the server's certificate checked out for the host name (or IP address) dialled, so the
session's connect timeout covers the handshake; a failed handshake is a failed connection
attempt whose reason says why (``TLS: certificate verify failed: ...``), and the session goes
on to the next server as for any other failure.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl
import time
from typing import Callable

from ..loop.tls import TLSEndpoint, TLSError
from .events import Connect, Disconnect, Persist, Send
from .servers import Server
from .session import ClientSession

__all__ = ["SocketDriver"]

_RECV_SIZE = 65536
_SOCKET = object()   # selector key data marking our socket


class SocketDriver:
    """Runs ``session`` on real sockets; ``clock`` gives the ``now`` the session sees;
    ``persist`` makes a :class:`Persist` durable (synchronously, before the next action)."""

    def __init__(self, session: ClientSession, clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None,
                 persist: Callable[[Persist], None] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.session = session
        self.tls_context = tls
        self.tls: TLSEndpoint | None = None  # the current connection's TLS session
        self.persist = persist
        self.clock = clock
        self.selector = selector or selectors.DefaultSelector()
        self.sock: socket.socket | None = None
        self._connecting = False
        self._out = bytearray()
        self._mask = 0
        self._events: list = []

    # ------------------------------------------------------------------ loop interface
    def fileno(self) -> int:
        return self.selector.fileno()

    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fileobj`` is readable (during :meth:`step`)."""
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def start(self) -> list:
        """Start the session (first connection attempt); return its events."""
        self.session.start(self.clock())
        return self.take_events()

    def timeout(self, limit: float | None = None) -> float | None:
        """Seconds until the session's next timer, capped by ``limit`` (None: no limit)."""
        deadline = self.session.next_deadline()
        if deadline is None:
            return limit
        wait = max(0.0, deadline - self.clock())
        return wait if limit is None else min(wait, limit)

    def step(self, timeout: float | None = None) -> list:
        """Wait up to ``timeout`` seconds (less if a session timer is due) for I/O, handle it,
        fire due timers, and return the session's events (also those of reader callbacks)."""
        self.pump()
        for key, mask in self.selector.select(self.timeout(timeout)):
            if key.data is _SOCKET:
                if key.fileobj is self.sock:          # an earlier callback may have closed it
                    self._on_socket(mask)
            else:
                key.data()
            self.pump()
        self.session.tick(self.clock())
        return self.take_events()

    def take_events(self) -> list:
        """Carry out pending actions, then return (and clear) the session events so far."""
        self.pump()
        events, self._events = self._events, []
        return events

    def pump(self) -> None:
        """Carry out the session's pending actions (call after feeding it input yourself,
        e.g. after ``session.submit``); its events are kept for the next :meth:`step`."""
        while True:
            actions = self.session.take_actions()
            if not actions:
                break
            for action in actions:
                if isinstance(action, Send):
                    self._send(action.data)
                elif isinstance(action, Connect):
                    self._connect(action.server)
                elif isinstance(action, Disconnect):
                    self._close(flush=True)
                elif isinstance(action, Persist) and self.persist is not None:
                    self.persist(action)
        self._events.extend(self.session.take_events())

    def run_until(self, predicate: Callable[[], bool], timeout: float,
                  on_event: Callable[[object], None] | None = None) -> bool:
        """Step until ``predicate()`` is true or ``timeout`` seconds passed; return which."""
        deadline = self.clock() + timeout
        while not predicate():
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            for event in self.step(min(remaining, 0.5)):
                if on_event is not None:
                    on_event(event)
        return True

    def close(self) -> None:
        """Close the socket and the selector (the session is not told)."""
        self._close(flush=True)
        self.selector.close()

    # ---------------------------------------------------------------------- internals
    def _connect(self, server: Server) -> None:
        self._close(flush=False)
        now = self.clock
        try:
            infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            self.session.connect_failed(now(), f"cannot resolve {server.host}: {exc}")
            return
        infos.sort(key=lambda info: info[0] != socket.AF_INET)  # prefer IPv4 for "localhost"
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            sock.close()
            self.session.connect_failed(now(), os.strerror(err))
            return
        self.sock = sock
        self._connecting = True
        self._server_host = server.host  # what the certificate must name
        self._out.clear()
        self._mask = selectors.EVENT_WRITE
        self.selector.register(sock, self._mask, _SOCKET)

    def _on_socket(self, mask: int) -> None:
        now = self.clock
        if self._connecting:
            if not mask & selectors.EVENT_WRITE and not mask & selectors.EVENT_READ:
                return
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._connecting = False
            if err:
                self._close(flush=False)
                self.session.connect_failed(now(), os.strerror(err))
                return
            if self.tls_context is not None:
                self._start_tls()
                return
            self._update_mask()
            self.session.connection_made(now())
            return
        if mask & selectors.EVENT_READ:
            self._read()
        if self.sock is not None and mask & selectors.EVENT_WRITE:
            self._write()

    def _read(self) -> None:
        sock = self.sock
        while sock is self.sock and sock is not None:
            try:
                data = sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                return
            if not data:
                self._lost("server closed the connection")
                return
            more = len(data) == _RECV_SIZE
            if self.tls is not None and (data := self._decrypt(data)) is None:
                if not more:
                    return
                continue
            self.session.data_received(data, self.clock())
            self.pump()
            if not more:
                return

    # -- TLS ------------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        """The TCP connection is up: send the ClientHello; the session hears of the connection
        once the handshake is done (:meth:`_decrypt`)."""
        try:
            self.tls = TLSEndpoint(self.tls_context, server_side=False, server_hostname=self._server_host)
        except (ssl.SSLError, ValueError) as exc:
            self._lost(f"TLS: {exc}")
            return
        self._out += self.tls.data_to_send()
        self._write()

    def _decrypt(self, data: bytes) -> bytes | None:
        """Plaintext carried by ``data`` (None if none, or the connection failed); completes
        the handshake and tells the session the connection is made."""
        tls, handshaking = self.tls, not self.tls.established
        try:
            plain = tls.receive(data)
        except TLSError as exc:
            self._out += tls.data_to_send()   # the alert that tells the server why
            self._close(flush=True)
            self.session.connection_lost(self.clock(), f"TLS: {exc}")
            return None
        self._out += tls.data_to_send()
        if handshaking and tls.established:
            self.session.connection_made(self.clock())
            self.pump()
        if self.sock is not None:
            self._write()
        return plain or None
    def _send(self, data: bytes) -> None:
        if self.sock is None:
            return                     # the session will hear of the loss from the socket
        if self.tls is not None:
            try:
                data = self.tls.send(data)   # the session sends only once the handshake is done
            except TLSError as exc:
                self._lost(f"TLS: {exc}")
                return
        self._out += data
        if not self._connecting:
            self._write()

    def _write(self) -> None:
        while self._out and self.sock is not None:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(exc.strerror or str(exc))
                return
            del self._out[:sent]
        self._update_mask()

    def _update_mask(self) -> None:
        if self.sock is None:
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        if mask != self._mask:
            self.selector.modify(self.sock, mask, _SOCKET)
            self._mask = mask

    def _lost(self, reason: str) -> None:
        self._close(flush=False)
        self.session.connection_lost(self.clock(), reason)

    def _close(self, flush: bool) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        tls, self.tls = self.tls, None
        if tls is not None and flush:
            self._out += tls.close()       # close_notify after the last request
        if flush and self._out and not self._connecting:
            try:
                sock.send(self._out)       # best effort, e.g. the exit request
            except OSError:
                pass
        self._out.clear()
        self._connecting = False
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
