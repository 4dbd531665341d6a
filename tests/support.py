"""Helpers for tests that run real chatnet processes: free ports, start/stop by PID, raw clients.

Every process a test starts is killed by PID when the test ends (see the ``servers`` fixture
in conftest.py), and every wait is a condition polled against a deadline, never a bare sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from chatnet.protocol.codec import NEED_DATA, ResponseDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATSERVER = os.path.join(ROOT, "bin", "chatserver")
CHATCLIENT = os.path.join(ROOT, "bin", "chatclient")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ServerProcess:
    """One ``bin/chatserver`` process; its output goes to a log file in the data dir."""

    def __init__(self, data_dir: str, port: int | None = None, host: str = "127.0.0.1", args=()):
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = data_dir
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        os.makedirs(data_dir, exist_ok=True)
        self.log_path = os.path.join(data_dir, f"server-{self.port}.log")

    def start(self, wait: bool = True) -> ServerProcess:
        peers = [] if "--peers" in self.args else ["--peers", f"{self.host}:{self.port}"]
        cmd = [sys.executable, CHATSERVER, "--host", self.host, "--port", str(self.port),
               "--data-dir", self.data_dir, *peers, *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            wait_until(lambda: self.proc.poll() is not None or port_open(self.host, self.port),
                       timeout=15, what=f"server on port {self.port}")
            assert self.proc.poll() is None, f"server exited early: {self.log()}"
        return self

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL if it does not exit in time)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


class RawClient:
    """A socket speaking the wire protocol directly, as a test harness (not a product client)."""

    def __init__(self, host: str, port: int, line_mode: bool = True, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
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

    def frame(self, timeout: float | None = None):
        """The next response frame; AssertionError on timeout, EOFError when the server closed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for a frame")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError("timed out waiting for a frame") from None
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.receive_data(data)

    def request(self, text: str):
        self.send(text)
        return self.frame()

    def frames(self, n: int):
        return [self.frame() for _ in range(n)]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
