"""Per-connection byte buffers: non-blocking reads, and writes with an explicit output buffer.

Writing follows asyncio's selector transports: ``write`` only appends; ``flush`` tries
``send()`` at once and keeps the rest, and the owner registers EVENT_WRITE only while bytes
remain.  The output buffer has a high-water mark (beyond it the owner stops feeding the
connection and stops reading from it, so TCP pushes back on the peer) and a low-water mark
(below it, feeding resumes) — hysteresis, so a connection near the mark does not flap.

Each write may carry a *mark*: an opaque value reported back by ``flush`` once every byte of
that write has left through ``send()``.  The chat service uses marks to learn that a chat
frame reached the recipient's socket completely, and only then counts it delivered.

A connection may carry TLS (:meth:`BufferedSocket.start_tls`, chatnet/loop/tls.py): then
``recv`` returns plaintext (None while the records received carry none yet, e.g. during the
handshake) and ``write`` takes plaintext, which ``flush`` encrypts — everything written since
the last flush as one go, so a pass that writes many frames costs one TLS record, not one each.
A mark then counts as sent once the ciphertext of its whole chunk went through ``send()`` (a
receiver can decrypt nothing of a record before all of it arrived).  Plaintext written before
the handshake completed waits for it; the handshake's own records are sent by ``recv`` and
``flush``.  A TLS failure is a :class:`TLSFailed` (a ``ConnectionLost``).
"""

from __future__ import annotations

import errno
import socket
from collections import deque

from .tls import TLSEndpoint, TLSError

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
RECV_SIZE = 65536


class ConnectionLost(Exception):
    """The peer reset the connection or the socket failed."""


class TLSFailed(ConnectionLost):
    """The TLS session failed: a bad record, a certificate refused, an alert received."""


class BufferedSocket:
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._out = bytearray()
        self._sent_total = 0  # bytes handed to send() since the connection opened
        self._queued_total = 0  # bytes ever appended to the output
        self._marks: deque = deque()  # (end offset in the stream, mark), in order
        self.tls: TLSEndpoint | None = None
        self._plain = bytearray()  # TLS: plaintext written since the last flush
        self._plain_marks: list = []  # TLS: the marks of the writes in _plain

    @property
    def pending(self) -> int:
        """Bytes written but not yet sent (with TLS: plaintext not yet encrypted counts once
        the handshake is done; before, it cannot be sent at all)."""
        if self.tls is not None and self.tls.established:
            return len(self._out) + len(self._plain)
        return len(self._out)

    def write(self, data: bytes, mark=None) -> None:
        if self.tls is not None:
            self._plain += data
            if mark is not None:
                self._plain_marks.append(mark)
            return
        self._out += data
        self._queued_total += len(data)
        if mark is not None:
            self._marks.append((self._queued_total, mark))

    # -- TLS ---------------------------------------------------------------------------------------
    def start_tls(self, endpoint: TLSEndpoint, received: bytes = b"") -> bytes | None:
        """Carry TLS from now on; ``received`` is ciphertext already read from the socket (a
        server's sniffed ClientHello).  Returns what ``recv`` would have for those bytes."""
        self.tls = endpoint
        self._queue_ciphertext(endpoint.data_to_send())  # a client's ClientHello
        if not received:
            return None
        return self._decrypt(received)

    def _decrypt(self, ciphertext: bytes) -> bytes | None:
        tls = self.tls
        try:
            plain = tls.receive(ciphertext)
        except TLSError as exc:
            self._send_alert()
            raise TLSFailed(f"TLS: {exc}") from None
        self._queue_ciphertext(tls.data_to_send())
        if plain:
            return plain
        return b"" if tls.peer_closed else None

    def _queue_ciphertext(self, data: bytes) -> None:
        if data:
            self._out += data
            self._queued_total += len(data)

    def _encrypt(self) -> None:
        """Move the plaintext written since the last flush into the output as ciphertext."""
        if not self._plain or not self.tls.established:
            return
        try:
            data = self.tls.send(bytes(self._plain))
        except TLSError as exc:
            raise TLSFailed(f"TLS: {exc}") from None
        self._plain.clear()
        self._queue_ciphertext(data)
        for mark in self._plain_marks:
            self._marks.append((self._queued_total, mark))
        self._plain_marks.clear()

    def _send_alert(self) -> None:
        """Best effort: tell the other side why its TLS session is being dropped."""
        self._queue_ciphertext(self.tls.data_to_send())
        try:
            self.sock.send(self._out)
        except OSError:
            pass
        self._out.clear()

    def flush(self) -> list:
        """Send what the kernel takes now; return the marks whose bytes are all sent."""
        if self.tls is not None:
            self._encrypt()
        out = self._out
        while out:
            try:
                n = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise ConnectionLost(str(exc)) from exc
            del out[:n]
            self._sent_total += n
        done = []
        marks = self._marks
        while marks and marks[0][0] <= self._sent_total:
            done.append(marks.popleft()[1])
        return done

    def recv(self) -> bytes | None:
        """Bytes available now; b"" at end of stream; None when nothing is ready (with TLS:
        also when the records read carried no plaintext yet — the caller then flushes, since
        the handshake may have something to send)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ENOTCONN):
                return b""
            raise ConnectionLost(str(exc)) from exc
        if self.tls is None:
            return data
        if not data:
            self.tls.receive_eof()
            return b""
        return self._decrypt(data)

    def close(self) -> None:
        if self.tls is not None and not self._out:  # best effort: a close_notify after a whole stream
            try:
                self.sock.send(self.tls.close())
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
