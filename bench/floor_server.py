#!/usr/bin/env python3
"""The floor: the least work one ``selectors`` loop thread can do for ``vs_seed.py``'s load.

Not a chat server anyone should run.  It answers exactly what the benchmark's load generator
sends -- a bare newline (line mode), ``1|NAME`` (create and log in), ``3|RECIPIENT|TEXT`` --
with the same frames chatnet sends, and nothing else: no accounts, no queue, no replication,
no checks beyond what the load needs.  It exists to measure what issue 12's fixed shape (one
single-threaded reactor on ``selectors`` owning every client socket) can reach at best on this
machine, so that chatnet's figures can be read against that ceiling rather than only against
the seed, whose thread per client spreads the same system calls over both cores.

``--durable`` adds the cheapest durable commit there is: each loop pass appends its chats to
a preallocated file and ``fdatasync``s it before any answer of that pass leaves (inline, on
the loop thread: the floor of "ack after fsync" without a storage thread).  ``--thread`` moves
the ``fdatasync`` to a storage thread, as chatnet does: the loop keeps reading and writing the
next passes' chats while one sync runs, holds each pass's frames until the sync that covers
them completes (a wake-up socket tells it), and the passes that arrive meanwhile share the
next sync (group commit).

    python bench/floor_server.py PORT [--durable DIR [--thread]]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import threading

_HEADER_OK = [bytes((n, 0, 0x30)) for n in range(128)]
_HEADER_CHAT = [bytes((n, 0, 0x31)) for n in range(128)]


def _frame(headers, payload: bytes) -> bytes:
    if len(payload) >= 128:
        payload = payload[:127]  # the load's texts are short; the floor does not split frames
    return headers[len(payload)] + payload


class Floor:
    """Every client connection's socket, name and pending input and output, on one loop."""

    def __init__(self, port: int, durable_dir: str | None, thread: bool = False) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.by_name: dict[bytes, socket.socket] = {}
        self.names: dict[socket.socket, bytes] = {}
        self.inbuf: dict[socket.socket, bytes] = {}
        self.out: dict[socket.socket, list[bytes]] = {}
        self.log_fd = self.log_pos = None
        self.pending: list[bytes] = []
        if durable_dir:
            path = os.path.join(durable_dir, "floor.log")
            self.log_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            zeros = bytes(1 << 20)  # written, not fallocated: a sync then journals no extent change
            for i in range(256):
                os.pwrite(self.log_fd, zeros, i << 20)
            os.fsync(self.log_fd)
            self.log_pos = 0
        self.syncer = None
        if thread and self.log_fd is not None:
            self.syncer = (_ProcessSyncer if thread == "process" else _Syncer)(self.log_fd, self.sel)

    def run(self) -> None:
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    self._accept()
                elif key.data is _Syncer:
                    self._release(self.syncer.done())
                else:
                    self._read(key.fileobj)
            if self.syncer is not None:
                self._hand_over()
            else:
                self._flush()

    def _hand_over(self) -> None:
        """Queue the pass's frames behind the next sync; start that sync if none is running."""
        if self.out:
            self.syncer.held.append(self.out)
            self.out = {}
        self._start_sync()

    def _start_sync(self) -> None:
        """Append the chats held so far to the file (page cache), then sync -- only while no
        sync runs: a write into a page under writeback may wait for that writeback."""
        if self.syncer.busy or not self.syncer.held:
            return
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            os.pwrite(self.log_fd, data, self.log_pos)
            self.log_pos += len(data)
        self.syncer.start_if_idle()

    def _release(self, batches) -> None:
        for out in batches:
            self._send(out)  # the next sync starts at the end of this pass, with what it read

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.inbuf[sock] = b""
            self.sel.register(sock, selectors.EVENT_READ, True)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        data = self.inbuf[sock] + data
        *lines, self.inbuf[sock] = data.split(b"\n")
        for line in lines:
            if line:
                self._request(sock, line)

    def _request(self, sock: socket.socket, line: bytes) -> None:
        op, _, rest = line.partition(b"|")
        if op == b"3":
            recipient, _, text = rest.partition(b"|")
            me = self.names.get(sock, b"?")
            to = self.by_name.get(recipient)
            if to is not None:
                self._queue(to, _frame(_HEADER_CHAT, me + b"|" + text))
            if self.log_fd is not None:
                self.pending.append(b"%s|%s|%s\n" % (me, recipient, text))
            self._queue(sock, _frame(_HEADER_OK, b"Message sent to " + recipient + b"."))
        elif op == b"1":
            self.by_name[rest] = sock
            self.names[sock] = rest
            self._queue(sock, _frame(_HEADER_OK, b"Account created. Logged in as " + rest + b"."))

    def _queue(self, sock: socket.socket, frame: bytes) -> None:
        frames = self.out.get(sock)
        if frames is None:
            self.out[sock] = [frame]
        else:
            frames.append(frame)

    def _flush(self) -> None:
        """Make the pass's chats durable (``--durable``), then one ``send()`` per connection."""
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            os.pwrite(self.log_fd, data, self.log_pos)
            self.log_pos += len(data)
            os.fdatasync(self.log_fd)
        out, self.out = self.out, {}
        self._send(out)

    def _send(self, out: dict) -> None:
        for sock, frames in out.items():
            try:
                sock.send(b"".join(frames))  # the load's answers are small: the kernel takes them
            except OSError:
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        if sock in self.inbuf:
            self.sel.unregister(sock)
            del self.inbuf[sock]
            name = self.names.pop(sock, None)
            if name is not None and self.by_name.get(name) is sock:
                del self.by_name[name]
            sock.close()


class _Syncer:
    """One storage thread that ``fdatasync``s the log file on request and wakes the loop."""

    def __init__(self, fd: int, sel: selectors.BaseSelector) -> None:
        self.fd = fd
        self.held: list[dict] = []  # frames waiting for the next sync
        self.syncing: list[dict] = []  # frames waiting for the running sync
        self.busy = False  # loop side: a sync is running or its result not yet taken
        self.requested = False  # under cond: the thread is asked for one more sync
        self.cond = threading.Condition()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        sel.register(self.wake_r, selectors.EVENT_READ, _Syncer)
        threading.Thread(target=self._run, daemon=True).start()

    def start_if_idle(self) -> None:
        if not self.busy and self.held:
            self.syncing, self.held = self.held, []
            self.busy = True
            with self.cond:
                self.requested = True
                self.cond.notify()

    def done(self) -> list[dict]:
        self.wake_r.recv(64)
        self.busy = False
        batches, self.syncing = self.syncing, []
        return batches

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.requested:
                    self.cond.wait()
                self.requested = False
            os.fdatasync(self.fd)
            self.wake_w.send(b"x")


class _ProcessSyncer(_Syncer):
    """The same, but the ``fdatasync`` runs in a forked child process that shares the file: the
    child has its own interpreter lock, so returning from the sync never waits for the loop's."""

    def __init__(self, fd: int, sel: selectors.BaseSelector) -> None:
        self.fd = fd
        self.held, self.syncing, self.busy = [], [], False
        self.wake_r, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            self.wake_r.close()
            while child.recv(64):
                os.fdatasync(fd)
                child.send(b"x")
            os._exit(0)
        child.close()
        self.wake_r.setblocking(False)
        sel.register(self.wake_r, selectors.EVENT_READ, _Syncer)

    def start_if_idle(self) -> None:
        if not self.busy and self.held:
            self.syncing, self.held = self.held, []
            self.busy = True
            self.wake_r.send(b"s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--durable", metavar="DIR", help="append each pass's chats to DIR/floor.log and fdatasync it")
    ap.add_argument("--thread", nargs="?", const="thread", choices=("thread", "process"),
                    help="with --durable: fdatasync on a storage thread, or (--thread=process) in a child process")
    args = ap.parse_args(argv)
    try:
        Floor(args.port, args.durable, args.thread).run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
