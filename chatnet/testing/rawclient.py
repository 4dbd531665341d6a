"""The seed protocol spoken directly on a blocking socket, as a test and benchmark harness.

:class:`RawClient` is one connection: send request text or raw bytes, read response frames
decoded by ``chatnet.protocol.codec.ResponseDecoder``, each read bounded by a timeout.
:class:`FailoverClient` finds the primary of a cluster (following the backups' redirect
notes), identifies as an account, and sends a request again on a new primary when the
connection drops before its answer.  Neither is a product client (see ``chatnet.client``).
"""

from __future__ import annotations

import re
import socket
import ssl
import time

from chatnet.protocol.codec import NEED_DATA, Frame, ResponseDecoder

__all__ = ["RawClient", "FrameTimeout", "FailoverClient", "NoPrimary", "REDIRECT", "redirect_target"]

REDIRECT = re.compile(r"The primary is at (\S+):(\d+)\.$")
NO_PRIMARY = "knows no primary"


class FrameTimeout(TimeoutError):
    """No complete frame arrived in time (the connection may still be fine)."""


def redirect_target(frame: Frame) -> tuple[str, int] | None:
    """The primary a backup's note names, if it names one."""
    match = REDIRECT.search(frame.message) if frame.status == 2 else None
    return (match.group(1), int(match.group(2))) if match else None


class RawClient:
    """One blocking connection.  ``line_mode`` declares newline-terminated requests (a bare
    newline first) and appends one to each :meth:`send`; without it, requests go as the seed's
    clients send them, one per write and no terminator.  Frame reads raise
    :class:`FrameTimeout` after ``timeout`` seconds, ``EOFError`` when the server closed, and
    ``ProtocolError`` on bytes that are not frames.  ``tls`` (a client ``ssl.SSLContext``)
    speaks TLS, verifying the server's certificate for ``host``."""

    def __init__(self, host: str, port: int, line_mode: bool = True, timeout: float = 10.0,
                 connect_timeout: float | None = None, tls: ssl.SSLContext | None = None):
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=connect_timeout or timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = ResponseDecoder()
        self.timeout = timeout
        self.line_mode = line_mode
        if line_mode:
            self.sock.sendall(b"\n")

    def send(self, text: str) -> None:
        data = text.encode("utf-8")
        self.sock.sendall(data + b"\n" if self.line_mode else data)

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, timeout: float | None = None) -> Frame:
        """The next response frame, waiting at most ``timeout`` (default: the client's)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeout("timed out waiting for a frame")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise FrameTimeout("timed out waiting for a frame") from None
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.receive_data(data)

    def request(self, text: str, timeout: float | None = None) -> Frame:
        """Send ``text`` and return the next frame (for a logged-in user, that may be a chat)."""
        self.send(text)
        return self.frame(timeout)

    def frames(self, n: int) -> list[Frame]:
        return [self.frame() for _ in range(n)]

    def read_available(self) -> tuple[list[Frame], bool]:
        """Without waiting: every frame already received, and whether the server closed."""
        closed = False
        try:
            self.sock.setblocking(False)
            while True:
                data = self.sock.recv(65536)
                if not data:
                    closed = True
                    break
                self.decoder.receive_data(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            pass
        except OSError:
            closed = True
        frames = []
        while (event := self.decoder.next_event()) is not NEED_DATA:
            frames.append(event)
        return frames, closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoPrimary(ConnectionError):
    """No replica served (or let us identify) before the client's deadline."""


class FailoverClient:
    """A harness client that finds the primary and reconnects on failure.

    With a ``name`` it creates (``create``) or logs in as that account on every new
    connection; chat queued for it on a login is kept in :attr:`pending`.  :meth:`request`
    sends a request again on a new primary when the connection drops before the answer, so an
    answer it returns came from a serving primary (a chat may be executed twice).
    ``connected_to`` and ``connected_at`` describe the current connection.
    """

    def __init__(self, addresses, name: str | None = None, create: bool = False, deadline: float = 30.0,
                 timeout: float = 3.0):
        self.addresses = [tuple(a) for a in addresses]
        self.name = name
        self.deadline = deadline
        self.timeout = timeout
        self.conn: RawClient | None = None
        self.connected_to: tuple[str, int] | None = None
        self.connected_at = 0.0
        self.pending: list[Frame] = []
        self.connect(create)

    def _open(self, first: str, end: float) -> tuple[RawClient, Frame]:
        """A connection whose server answered ``first`` as a primary: servers in order, a
        backup's redirect followed, a short pause after each full round."""
        target = None
        while time.monotonic() < end:
            for addr in ([target] if target else []) + self.addresses:
                try:
                    conn = RawClient(addr[0], addr[1], timeout=self.timeout)
                except OSError:
                    continue
                try:
                    answer = conn.request(first)
                except (OSError, EOFError):
                    conn.close()
                    continue
                if answer.status == 2:  # a backup's note (it closes): go where it points
                    target = redirect_target(answer)
                    conn.close()
                    continue
                self.connected_to = addr
                return conn, answer
            time.sleep(0.05)
        raise NoPrimary(f"no primary among {self.addresses} within {self.deadline:g}s")

    def connect(self, create: bool = False) -> None:
        """(Re)connect to the primary; identify as :attr:`name` if there is one."""
        end = time.monotonic() + self.deadline
        if self.name is None:  # a list that matches nothing shows whether this is the primary
            self.conn, _ = self._open("4|\x00probe", end)
            self.connected_at = time.monotonic()
            return
        while True:
            conn, answer = self._open(f"{1 if create else 2}|{self.name}", end)
            if answer.status == 0:
                break
            conn.close()
            if create and "taken" in answer.message:
                create = False  # our earlier create committed but its answer was lost
            elif time.monotonic() >= end:
                raise NoPrimary(f"cannot identify as {self.name}: {answer.message!r}")
        self.conn = conn
        self.connected_at = time.monotonic()
        self.pending = []
        if answer.message.startswith("Logged in"):  # queued chat, then the summary note
            while (frame := conn.frame()).indicator == 1:
                self.pending.append(frame)

    def request(self, text: str, retries: int = 20) -> Frame:
        """The answer to ``text`` from a serving primary, skipping live chat meanwhile."""
        for _ in range(retries):
            try:
                if self.conn is None:
                    self.connect()
                answer = self.conn.request(text)
                while answer.indicator == 1:  # live chat for us: not the answer
                    answer = self.conn.frame()
                if answer.status == 2 and (redirect_target(answer) or NO_PRIMARY in answer.message):
                    raise EOFError("the primary stepped down")
                return answer
            except (OSError, EOFError):
                self.close()
        raise NoPrimary(f"request {text!r} failed {retries} times")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
