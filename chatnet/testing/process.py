"""One chatnet server process: started on a free port, always stopped and reaped by PID.

Used by the tests (a server per test, killed in the fixture's cleanup), by the benchmarks
(a server per run, stopped in ``finally`` and on SIGTERM) and by the chaos runner (killed,
restarted, paused and resumed at random, possibly inside a network namespace).  The child runs in a session of its
own, so a terminal's Ctrl-C reaches only the harness, which then stops it; on Linux it also
dies with the harness (PR_SET_PDEATHSIG, set by a tiny launcher that then execs the server,
because ``preexec_fn`` is unsafe in a process that runs threads).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from chatnet.testing.waiting import free_port, port_open, wait_until

__all__ = ["ROOT", "CHATSERVER", "CHATCLIENT", "ServerProcess", "server_command"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHATSERVER = os.path.join(ROOT, "bin", "chatserver")
CHATCLIENT = os.path.join(ROOT, "bin", "chatclient")

# Runs in the child before the server: die with the parent (even on SIGKILL), then exec.  The
# parent's PID is checked after the prctl, so a parent that died meanwhile is not missed.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])  # a prefix such as `ip` is found on PATH\n"
)


def server_command(root: str | None = None) -> list[str]:
    """How to run a chatserver: ``ROOT/bin/chatserver`` of a checkout (``root`` names another
    copy of the code), or ``python -m chatnet.server.cli`` when there is no checkout."""
    script = os.path.join(root or ROOT, "bin", "chatserver")
    if root or os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-m", "chatnet.server.cli"]


class ServerProcess:
    """One ``chatserver`` with its store in ``data_dir`` (a temporary directory, removed by
    :meth:`stop`, when none is given) and its output in ``log_path``.

    ``peers`` is the replica list (default: this server alone); ``args`` are more flags;
    ``root`` runs another copy of the code; ``profile`` (a path) runs it under cProfile, whose
    stats are written when it exits after SIGTERM; ``prefix`` goes before the command (e.g.
    ``["ip", "netns", "exec", NS]`` to run it in a network namespace).  :meth:`start` may be
    called again after :meth:`kill` or :meth:`stop`: the replica restarts on the same port and
    store, and its log goes on in the same file (each run after a ``--- start`` line).

    :attr:`state` is what the harness last did to it — ``down`` (never started, or stopped),
    ``up``, ``paused`` (SIGSTOP) or ``killed`` — so a fault injector knows which replicas are
    out and how to bring each back, without asking a process that may not answer.
    """

    def __init__(self, data_dir: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                 args=(), *, peers: str | None = None, root: str | None = None, profile: str | None = None,
                 log_level: str | None = None, keep_dir: bool = False, prefix=()):
        self.host = host
        self.port = port or free_port(host)
        self.owns_dir = data_dir is None and not keep_dir
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="chatnet-server-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.join(self.data_dir, f"server-{self.port}.log")
        self.args = list(args)  # read at each start: a test may change a flag between runs
        self.peers, self.root, self.profile, self.log_level = peers, root, profile, log_level
        self.prefix = list(prefix)
        self.state = "down"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def command(self) -> list[str]:
        """The server's command line, as :meth:`start` runs it."""
        base = server_command(self.root)
        if self.profile:
            base = [base[0], "-m", "cProfile", "-o", os.path.abspath(self.profile), *base[1:]]
        cmd = [*base, "--host", self.host, "--port", str(self.port), "--data-dir", self.data_dir]
        peers = f"{self.host}:{self.port}" if self.peers is None else self.peers
        if peers:  # "" = no --peers flag at all (a pre-replication server of an old revision)
            cmd += ["--peers", peers]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        return [*self.prefix, *cmd, *self.args]

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait: bool = True, timeout: float = 15.0) -> ServerProcess:
        """Start the server; with ``wait``, return once it accepts connections (see
        :meth:`wait_listening`).  Without, return at once: a fault injector restarting a
        replica must not block on it."""
        if self.alive():
            raise RuntimeError(f"server on port {self.port} is already running (pid {self.pid})")
        self._close_log()
        os.makedirs(self.data_dir, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *self.command()],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.data_dir, start_new_session=True)
        self.state = "up"
        if wait:
            self.wait_listening(timeout)
        return self

    def wait_listening(self, timeout: float = 15.0) -> None:
        """Return once the server accepts connections; it must not exit meanwhile (its log is
        in the error)."""
        wait_until(lambda: not self.alive() or port_open(self.host, self.port), timeout,
                   what=f"the server on {self.host}:{self.port} to listen")
        if not self.alive():
            raise RuntimeError(f"server on {self.host}:{self.port} exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    def log(self) -> str:
        """Everything the server wrote so far (all its runs on this data dir)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def log_problems(self, limit: int = 5) -> list[str]:
        """Up to ``limit`` ERROR/CRITICAL lines and traceback starts of the log: a handler that
        failed, which a run that otherwise passes must still report."""
        found = [line[:300] for line in self.log().splitlines()
                 if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
        return found[:limit]

    def exited(self) -> int | None:
        """The exit status if the server exited while the harness had it up or paused (a
        crash, not a fault it injected), else None."""
        if self.state in ("up", "paused") and self.proc is not None:
            return self.proc.poll()
        return None

    def signal(self, signum: int) -> None:
        """Send ``signum`` by PID if the server still runs (SIGSTOP, SIGCONT, SIGTERM...);
        SIGSTOP and SIGCONT also set :attr:`state` (``paused`` / ``up``)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
        if signum == signal.SIGSTOP and self.state == "up":
            self.state = "paused"
        elif signum == signal.SIGCONT and self.state == "paused":
            self.state = "up"

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it answers nothing."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (no shutdown path runs) and reap."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.state = "killed"
        self._close_log()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGCONT + SIGTERM, wait, SIGKILL if it does not exit in time; always reaped.
        Returns the exit code (None if it never ran); removes a temporary data dir."""
        code = None
        if self.proc is not None:
            if self.alive():
                self.signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
                self.signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
            code = self.proc.wait(timeout=10)
            self.state = "down"
            self._close_log()
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self if self.alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
