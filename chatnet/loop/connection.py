"""Per-connection byte buffers: non-blocking reads, and writes with an explicit output buffer.

Writing follows asyncio's selector transports: ``write`` only appends; ``flush`` tries
``send()`` at once and keeps the rest, and the owner registers EVENT_WRITE only while bytes
remain.  The output buffer has a high-water mark (beyond it the owner stops feeding the
connection and stops reading from it, so TCP pushes back on the peer) and a low-water mark
(below it, feeding resumes) — hysteresis, so a connection near the mark does not flap.

Each write may carry a *mark*: an opaque value reported back by ``flush`` once every byte of
that write has left through ``send()``.  The chat service uses marks to learn that a chat
frame reached the recipient's socket completely, and only then counts it delivered.
"""

from __future__ import annotations

import errno
import socket
from collections import deque

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
RECV_SIZE = 65536


class ConnectionLost(Exception):
    """The peer reset the connection or the socket failed."""


class BufferedSocket:
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._out = bytearray()
        self._sent_total = 0  # bytes handed to send() since the connection opened
        self._queued_total = 0  # bytes ever appended to the output
        self._marks: deque = deque()  # (end offset in the stream, mark), in order

    @property
    def pending(self) -> int:
        """Bytes written but not yet sent."""
        return len(self._out)

    def write(self, data: bytes, mark=None) -> None:
        self._out += data
        self._queued_total += len(data)
        if mark is not None:
            self._marks.append((self._queued_total, mark))

    def flush(self) -> list:
        """Send what the kernel takes now; return the marks whose bytes are all sent."""
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
        """Bytes available now; b"" at end of stream; None when nothing is ready."""
        try:
            return self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ENOTCONN):
                return b""
            raise ConnectionLost(str(exc)) from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
