"""Shared machinery of the chatnet benchmarks (scripts that print figures; not tests).

* :class:`Target` is what a benchmark loads: one server or a cluster, started and always
  stopped by PID through the shared harness (``chatnet.testing``: ``ServerProcess``,
  ``Cluster``), with the label of the code under test (the working tree, ``--rev`` or
  ``--server-root``).
* :class:`Loop` / :class:`Conn` drive many client connections from one process with
  ``selectors``: non-blocking connect, write and read, and incremental frame decoding.  This
  is a load generator, not a protocol client: tests and one-connection tools use
  ``chatnet.testing.RawClient``.
* :class:`FrameReader` is an allocation-light incremental decoder of response frames with
  the semantics of ``chatnet.protocol.codec.ResponseDecoder`` (checked by ``python bench/common.py``);
  it exists because it is measured about 4x faster (see its docstring).
* :func:`login_many` opens connections and logs them in (op 1 create or op 2 login) with a
  bounded number of handshakes in flight.
* TLS (``--tls`` of throughput.py): :func:`make_test_certs` makes a CA and a certificate for
  127.0.0.1 with ``openssl``, :func:`tls_server_args` the flags that serve it, and ``Loop(tls=)``
  speaks TLS on every connection (sans-I/O ``chatnet.loop.tls.TLSEndpoint``, so the loop stays
  non-blocking; requests written before the handshake completed wait for it).
* :func:`percentile`, :func:`rss_kib`, :func:`cpu_seconds`, :class:`CpuMeter` (server / load
  generator / other processes' CPU over a window), :func:`raise_nofile`, :func:`machine_facts`.

Standard library only.  All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, ROOT)

from chatnet.loop.tls import TLSEndpoint, TLSError  # noqa: E402
from chatnet.testing import Cluster, ServerProcess, server_command  # noqa: E402

HOST = "127.0.0.1"
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process of the machine


# ------------------------------------------------------------------------- machine and OS


def machine_facts() -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem_mib = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            mem_mib = int(f.readline().split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_mib": mem_mib,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def raise_nofile(want: int | None = None) -> int:
    """Raise this process' RLIMIT_NOFILE soft limit (to ``want`` or the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS from /proc), 0 if it is gone."""
    return _status_field(pid, "VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """High-water mark of the resident set size of ``pid`` in KiB (VmHWM)."""
    return _status_field(pid, "VmHWM:")


def _status_field(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by ``pid`` (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def system_busy_seconds() -> float:
    """CPU seconds all processes of the machine spent busy so far (from /proc/stat), summed over CPUs."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class CpuMeter:
    """CPU used during a window by the server, the load generator, the server's backups (in a
    cluster) and everything else."""

    def __init__(self, server_pid: int, loadgen_pids, backup_pids=()) -> None:
        self.server_pid = server_pid
        self.loadgen_pids = list(loadgen_pids) + [os.getpid()]
        self.backup_pids = list(backup_pids)

    def sample(self) -> tuple:
        return (time.monotonic(), cpu_seconds(self.server_pid),
                sum(cpu_seconds(p) for p in self.loadgen_pids), system_busy_seconds(),
                sum(cpu_seconds(p) for p in self.backup_pids))

    @staticmethod
    def percent(a: tuple, b: tuple) -> dict:
        """Percent of one core used between samples a and b: server, loadgen, backups (all of
        them together; 0 for a single replica) and other processes."""
        wall = max(b[0] - a[0], 1e-9)
        server, loadgen, total = b[1] - a[1], b[2] - a[2], b[3] - a[3]
        backups = (b[4] - a[4]) if len(a) > 4 and len(b) > 4 else 0.0
        return {
            "server": round(100 * server / wall, 1),
            "loadgen": round(100 * loadgen / wall, 1),
            "backups": round(100 * backups / wall, 1),
            "other": round(max(0.0, 100 * (total - server - loadgen - backups) / wall), 1),
            "capacity": 100 * (os.cpu_count() or 1),
        }


def percentile(sorted_values, p: float):
    """Nearest-rank percentile (p in 0..100) of an already sorted sequence; None if empty."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))  # ceil(p/100 * n), at least 1
    return sorted_values[min(n, int(rank)) - 1]


def summarize_us(samples) -> dict:
    """Latency samples in microseconds -> {count, p50, p99, p999, max, mean} in milliseconds."""
    values = sorted(samples)
    if not values:
        return {"count": 0, "p50": None, "p99": None, "p999": None, "max": None, "mean": None}
    ms = lambda us: round(us / 1000.0, 3)  # noqa: E731
    return {
        "count": len(values),
        "p50": ms(percentile(values, 50)),
        "p99": ms(percentile(values, 99)),
        "p999": ms(percentile(values, 99.9)),
        "max": ms(values[-1]),
        "mean": ms(sum(values) / len(values)),
    }


# ---------------------------------------------------------------------------- the server


def _git(*args) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True, text=True).stdout.strip()


def describe_rev(rev: str) -> str:
    try:
        return _git("rev-parse", "--short", f"{rev}^{{commit}}")
    except (OSError, subprocess.CalledProcessError):
        return rev


def describe_tree() -> str:
    """The working tree's HEAD, with '+dirty' if chatnet/ or bin/ differ from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "chatnet", "bin")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def export_rev(rev: str, into: str) -> str:
    """``git archive REV bin chatnet`` unpacked under ``into`` (read-only for the repository);
    returns the directory to run ``bin/chatserver`` from."""
    dest = os.path.join(into, "code")
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "bin", "chatnet"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def _server_help(root: str | None) -> str:
    try:
        return subprocess.run([*server_command(root), "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _takes_peers(root: str) -> bool:
    """Whether ``root/bin/chatserver`` has the replicated CLI (``--peers``), which then must
    list it; a pre-replication revision has not."""
    return "--peers" in _server_help(root)


def _load_args(root: str | None) -> list[str]:
    """Every load generator connects from 127.0.0.1: lift the per-address connection cap on
    revisions that have one."""
    return ["--max-per-address", "0"] if "--max-per-address" in _server_help(root) else []


class Target:
    """What a benchmark loads: one server, or a cluster of ``replicas`` whose primary it loads
    (both from ``chatnet.testing``), plus the label of the code under test.

    ``rev`` runs the server code of that git revision (exported with ``git archive`` into a
    temporary directory) instead of the working tree, which other people may be editing;
    ``root`` runs ``ROOT/bin/chatserver`` of another directory (an experimental copy);
    ``profile`` (single server only) runs it under cProfile, stats written at SIGTERM.
    Use as a context manager or call :meth:`stop`; both stop every process by PID."""

    def __init__(self, replicas: int = 1, *, rev: str | None = None, root: str | None = None,
                 profile: str | None = None, extra_args=(), log_level: str = "WARNING"):
        self.code_dir = tempfile.mkdtemp(prefix="chatnet-bench-code-") if rev else None
        if rev:
            root, self.label = export_rev(rev, self.code_dir), describe_rev(rev)
        elif root:
            root, self.label = os.path.abspath(root), f"tree at {os.path.abspath(root)}"
        else:
            self.label = describe_tree()
        kwargs = {"root": root, "log_level": log_level}
        extra_args = [*_load_args(root), *extra_args]
        self.cluster = self.server = None
        if replicas > 1:
            self.cluster = Cluster(n=replicas, extra_args=extra_args, **kwargs)
            self.label += f", {replicas} replicas"
        else:
            peers = None if root is None or _takes_peers(root) else ""
            self.server = ServerProcess(args=extra_args, profile=profile, peers=peers, **kwargs)
        self.primary: ServerProcess | None = None

    def start(self, timeout: float = 30.0) -> Target:
        """Start, and for a cluster wait until one primary serves every replica."""
        if self.server is not None:
            self.primary = self.server.start(timeout=timeout)
            return self
        self.cluster.start()
        self.primary = self.cluster.replicas[self.cluster.wait_primary(timeout)]
        self.cluster.wait_in_sync(timeout=timeout)
        return self

    @property
    def pid(self) -> int:
        return self.primary.pid

    @property
    def addr(self) -> tuple[str, int]:
        return self.primary.addr

    def backup_pids(self) -> list[int]:
        """PIDs of the live replicas other than the loaded primary (none for one server)."""
        if self.cluster is None:
            return []
        return [r.pid for r in self.cluster.replicas if r is not self.primary and r.alive()]

    def log_tail(self, n: int = 20) -> str:
        return self.server.log_tail(n) if self.server is not None else self.cluster.log_tail(n)

    def stop(self) -> None:
        """Stop every process by PID (SIGTERM, then SIGKILL) and remove the temporary dirs."""
        try:
            (self.server or self.cluster).stop()
        finally:
            if self.code_dir:
                shutil.rmtree(self.code_dir, ignore_errors=True)

    def __enter__(self) -> Target:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tear_down(pipes, workers, server) -> None:
    """End of a benchmark, whatever happened: close the pipes, stop the load-generator
    processes, then the server (all by PID)."""
    for pipe in pipes:
        try:
            pipe.close()
        except OSError:
            pass
    stop_workers(workers)
    server.stop()


def run_worker(target, wid: int, pipe, *args) -> None:
    """Body of a load-generator process: run ``target(wid, pipe, *args)``; an error is sent to
    the parent as ("error", text) before the process dies, Ctrl-C ends it quietly."""
    try:
        target(wid, pipe, *args)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report, then die
        try:
            pipe.send(("error", f"worker {wid}: {type(exc).__name__}: {exc}"))
        except Exception:
            pass
        raise


@contextlib.contextmanager
def sigterm_as_exit():
    """Turn SIGTERM into SystemExit in the benchmark process so its cleanup always runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stop_workers(procs, timeout: float = 5.0) -> None:
    """Stop multiprocessing workers by PID: join, then SIGTERM, then SIGKILL."""
    for p in procs:
        p.join(timeout if p.is_alive() else 0)
    for p in procs:
        if p.is_alive() and p.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(2)
        if p.is_alive() and p.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join(2)


# ------------------------------------------------------------------------ frame decoding


class ProtocolError(Exception):
    pass


class FrameReader:
    """Incremental decoder of response frames: ``feed(bytes)`` -> [(status, indicator, payload)].

    Same format and checks as ``chatnet.protocol.codec.ResponseDecoder`` (the length is one UTF-8
    character of 1-4 bytes, possibly split across chunks; status 0-2; indicator '0'/'1'), but
    it returns plain tuples with the message as *bytes* and decodes a whole chunk per call,
    so the load generator spends its CPU on sockets rather than on per-frame objects.

    Why not the codec: measured on the 2-CPU bench machine (Python 3.11), 100,000 ack or chat
    frames fed in 1,400-byte chunks decode at 3.6-3.7 M frames/s here and 0.90-0.93 M frames/s
    with ``ResponseDecoder`` (``next_event`` per frame, a ``Frame`` and a str each): about 4x.
    The load generator shares the machine's two cores with the server(s), so every cycle it
    saves is the server's.  ``python bench/common.py`` checks that both agree.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        out = []
        append = out.append
        while pos < n:
            lead = buf[pos]
            if lead < 0x80:
                size, length = 1, lead
            else:
                if 0xC2 <= lead <= 0xDF:
                    size = 2
                elif 0xE0 <= lead <= 0xEF:
                    size = 3
                elif 0xF0 <= lead <= 0xF4:
                    size = 4
                else:
                    raise ProtocolError(f"invalid UTF-8 lead byte 0x{lead:02x} in frame length")
                if n - pos < size:
                    break
                try:
                    length = ord(bytes(buf[pos:pos + size]).decode("utf-8"))
                except UnicodeDecodeError:
                    raise ProtocolError("frame length is not a valid UTF-8 character") from None
            head = pos + size
            if head < n and buf[head] > 2:
                raise ProtocolError(f"bad status byte 0x{buf[head]:02x}")
            if head + 1 < n and buf[head + 1] not in (0x30, 0x31):
                raise ProtocolError(f"bad indicator byte 0x{buf[head + 1]:02x}")
            end = head + 2 + length
            if end > n:
                break
            append((buf[head], buf[head + 1] - 0x30, bytes(buf[head + 2:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


# --------------------------------------------------------------------- many connections


class Conn:
    """One non-blocking client connection owned by a :class:`Loop`.

    ``handler(conn, frames, t_ns)`` is called with the frames decoded from each read;
    ``on_close(conn)`` when the peer closes or resets the connection.  ``tag`` and ``state``
    are free for the owner.
    """

    __slots__ = ("loop", "sock", "reader", "out", "mask", "connected", "closed", "handler",
                 "on_connect", "on_close", "tag", "state", "error", "tls", "plain")

    def __init__(self, loop: "Loop", sock: socket.socket):
        self.loop = loop
        self.sock = sock
        self.reader = FrameReader()
        self.out = bytearray()
        self.mask = 0
        self.connected = False
        self.closed = False
        self.handler = None
        self.on_connect = None
        self.on_close = None
        self.tag = None
        self.state = None
        self.error = None
        self.tls: TLSEndpoint | None = None
        self.plain = bytearray()  # TLS: requests written before the handshake completed

    def write(self, data: bytes) -> None:
        """Queue ``data``; it is sent now if the socket takes it, otherwise when writable."""
        if self.closed:
            return
        if self.tls is not None:
            if not self.tls.established:
                self.plain += data
                return
            data = self.tls.send(data)
        self._write_raw(data)

    def _write_raw(self, data: bytes) -> None:
        if self.out or not self.connected:
            self.out += data
            self._interest()
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._fail(exc)
            return
        if n < len(data):
            self.out += data[n:]
            self._interest()

    def _interest(self) -> None:
        mask = READ if self.connected else 0
        if self.out or not self.connected:
            mask |= WRITE
        if mask != self.mask:
            self.loop.sel.modify(self.sock, mask, self) if self.mask else self.loop.sel.register(self.sock, mask, self)
            self.mask = mask

    def _on_writable(self) -> None:
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(OSError(err, os.strerror(err)))
                return
            self.connected = True
            if self.on_connect is not None:
                self.on_connect(self)
            if self.closed:
                return
        out = self.out
        while out:
            try:
                n = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(exc)
                return
            del out[:n]
        self._interest()

    def _on_readable(self, t_ns: int) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if not data:
            self._fail(None)
            return
        if self.tls is not None and (data := self._decrypt(data)) is None:
            return
        frames = self.reader.feed(data)
        if frames and self.handler is not None:
            self.handler(self, frames, t_ns)

    def _decrypt(self, data: bytes) -> bytes | None:
        """TLS: the plaintext ``data`` carried (None if none); answers the handshake and sends
        what waited for it."""
        tls, handshaking = self.tls, not self.tls.established
        try:
            plain = tls.receive(data)
        except TLSError as exc:
            self._fail(exc)
            return None
        out = tls.data_to_send()
        if handshaking and tls.established and self.plain:
            out += tls.send(bytes(self.plain))
            self.plain.clear()
        if out:
            self._write_raw(out)
        return plain or None

    def _fail(self, exc) -> None:
        self.error = exc
        self.close()
        if self.on_close is not None:
            self.on_close(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mask:
            with contextlib.suppress(KeyError, ValueError):
                self.loop.sel.unregister(self.sock)
            self.mask = 0
        self.sock.close()
        self.loop.open_count -= 1


class Loop:
    """A ``selectors`` loop over many :class:`Conn` objects (level-triggered, one thread);
    with ``tls`` (a client ``ssl.SSLContext``) every connection speaks TLS."""

    def __init__(self, tls=None) -> None:
        self.sel = selectors.DefaultSelector()
        self.open_count = 0
        self.tls = tls

    def connect(self, addr) -> Conn:
        """Start a non-blocking connect; ``conn.on_connect`` runs once it is established."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(self, sock)
        self.open_count += 1
        if self.tls is not None:  # the ClientHello goes out once the connect completes
            conn.tls = TLSEndpoint(self.tls, server_side=False, server_hostname=addr[0])
            conn.out += conn.tls.data_to_send()
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            conn._interest()  # completion (or failure) is reported as writability
        else:
            conn._fail(OSError(err, os.strerror(err)))
        return conn

    def poll(self, timeout: float | None) -> int:
        events = self.sel.select(timeout)
        t = now_ns()
        for key, mask in events:
            conn = key.data
            if mask & WRITE and not conn.closed:
                conn._on_writable()
            if mask & READ and not conn.closed:
                conn._on_readable(t)
        return len(events)

    def run_until(self, done, timeout: float, step: float = 0.05) -> bool:
        """Poll until ``done()`` is true (returns True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(step, left))
        return True

    def close(self, abort: bool = True) -> None:
        """Close every connection.  ``abort`` resets them (SO_LINGER 0) instead of a FIN, so
        that tens of thousands of client ports are not left in TIME_WAIT for a minute, which
        would slow down the next run's connects (the server sees ECONNRESET, i.e. end of stream)."""
        linger = struct.pack("ii", 1, 0)
        for key in list(self.sel.get_map().values()):
            conn = key.data
            if abort:
                with contextlib.suppress(OSError):
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            conn.close()
        self.sel.close()


def make_test_certs(directory: str) -> dict:
    """A CA and a server certificate for IP:127.0.0.1 (EC P-256), made with ``openssl`` in
    ``directory`` as docs/operations.md shows: paths ``ca``, ``cert``, ``key``."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=bench replica")
    with open(os.path.join(directory, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return {name: os.path.join(directory, file) for name, file in
            (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def tls_server_args(certs: dict) -> list[str]:
    """The chatserver flags that serve (and replicate over) TLS with :func:`make_test_certs`'s files."""
    return ["--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-ca", certs["ca"]]


class LoginError(Exception):
    pass


class _Logins:
    """One :func:`login_many` in progress: the connections opened so far, how many are
    connecting or waiting for their answer, how many are logged in, and what failed."""

    def __init__(self, loop: Loop, addr, names: list[str], op: int, concurrency: int) -> None:
        self.loop, self.addr, self.names, self.op, self.concurrency = loop, addr, names, op, concurrency
        self.conns: list[Conn | None] = [None] * len(names)
        self.done = 0
        self.failures: list[str] = []
        self.next_i = 0
        self.in_flight = 0

    def open_more(self) -> None:
        """Connect the next names, up to ``concurrency`` handshakes in flight."""
        while self.next_i < len(self.names) and self.in_flight < self.concurrency:
            conn = self.loop.connect(self.addr)
            conn.tag = self.next_i
            conn.handler, conn.on_connect, conn.on_close = self.handler, self.on_connect, self.on_close
            self.conns[self.next_i] = conn
            if conn.closed:
                raise LoginError(f"connect failed: {conn.error}")
            self.next_i += 1
            self.in_flight += 1

    def on_connect(self, conn: Conn) -> None:
        conn.write(b"\n%d|%s\n" % (self.op, self.names[conn.tag].encode()))

    def handler(self, conn: Conn, frames, t_ns) -> None:
        for status, indicator, payload in frames:
            if conn.state == "ok":
                continue  # e.g. chat already arriving; the owner installs its own handler
            if status == 1:
                self.failures.append(f"{self.names[conn.tag]}: {payload.decode('utf-8', 'replace')}")
                conn.state = "failed"
                self.in_flight -= 1
                return
            if self.op == 1 or status == 2:  # op 1: the single answer; op 2: the closing note
                conn.state = "ok"
                self.done += 1
                self.in_flight -= 1

    def on_close(self, conn: Conn) -> None:
        if conn.state is None:
            self.in_flight -= 1
        if conn.state != "failed":
            self.failures.append(f"{self.names[conn.tag]}: connection lost ({conn.error})")
        conn.state = "failed"


def login_many(loop: Loop, addr, names, *, op: int = 1, concurrency: int = 256, timeout: float = 120.0,
               progress=None) -> list[Conn]:
    """Open one connection per name and log it in; return the connections in ``names`` order.

    Each connection declares line mode (a bare newline) and sends ``op|name`` (1 = create
    and log in, 2 = log in).  At most ``concurrency`` connections are connecting or waiting
    for their answer at once, so the server's accept queue never overflows.  Raises
    :class:`LoginError` on any refusal, lost connection or timeout.
    """
    logins = _Logins(loop, addr, list(names), op, concurrency)
    total = len(logins.names)
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    while logins.done < total:
        if logins.failures:
            raise LoginError(f"{len(logins.failures)} logins failed, e.g. {logins.failures[0]}")
        logins.open_more()
        if time.monotonic() > deadline:
            raise LoginError(f"only {logins.done}/{total} logged in after {timeout}s")
        loop.poll(0.05)
        if progress is not None and time.monotonic() - last_report > 1.0:
            last_report = time.monotonic()
            progress(logins.done, total)
    for conn in logins.conns:
        conn.handler = conn.on_connect = conn.on_close = None
    return logins.conns


# --------------------------------------------------------------------------- self check


def _selfcheck() -> None:
    """FrameReader agrees with chatnet.protocol.codec on random frames cut at random points."""
    import random

    from chatnet.protocol.codec import decode_frames, encode_frame

    rng = random.Random(262)
    alphabet = "ab|z é€𝄞\n"
    for _ in range(150):
        frames = []
        for _ in range(rng.randint(1, 20)):
            size = rng.choice([0, 1, 5, 120, 127, 128, 600, 2100, 40000])
            text = "".join(rng.choices(alphabet, k=size))
            while len(text.encode()) > 0xD7FF:
                text = text[:-100]
            frames.append(encode_frame(rng.randint(0, 2), rng.randint(0, 1), text))
        data = b"".join(frames)
        expected = [(f.status, f.indicator, f.message.encode()) for f in decode_frames(data)]
        reader, got, pos = FrameReader(), [], 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 64, 4096, 100000])
            got += reader.feed(data[pos:pos + step])
            pos += step
        assert got == expected and not reader.buf, "FrameReader disagrees with chatnet.protocol.codec"
    print("FrameReader agrees with chatnet.protocol.codec.ResponseDecoder on 150 random frame streams")



# -- what every benchmark script shares ---------------------------------------------------------
def add_code_args(ap, *, server_root: bool = True) -> None:
    """--rev / --server-root: which server code a benchmark runs (see Target)."""
    ap.add_argument("--rev", help="benchmark the server code of this git revision (default: the working tree)")
    if server_root:
        ap.add_argument("--server-root", metavar="DIR", help="run DIR/bin/chatserver instead (an experimental copy)")


def add_load_args(ap, *, senders: int = 50, duration: float = 10.0, size: bool = True) -> None:
    """The load generator's shape: pairs, window, warm-up, open-loop rate, chat size."""
    ap.add_argument("--senders", type=int, default=senders, help=f"sender/receiver pairs (default {senders})")
    ap.add_argument("--duration", type=float, default=duration, help=f"measured window per run, s (default {duration:g})")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window (default 1)")
    ap.add_argument("--rate", type=float, default=None, help="open loop: total chats/s offered (default: closed loop)")
    if size:
        ap.add_argument("--size", type=int, default=32, help="approximate chat text size in bytes (default 32)")


def expect(pipe, kind: str, timeout: float, what: str):
    """The next message from a load-generator process, which must be of ``kind`` (a worker's
    error is raised); RuntimeError naming ``what`` when nothing comes within ``timeout``."""
    if not pipe.poll(timeout):
        raise RuntimeError(f"{what}: no answer within {timeout:g} s")
    msg = pipe.recv()
    if msg[0] != kind:
        raise RuntimeError(msg[1])
    return msg[1]


def run_main(main) -> None:
    """A benchmark's entry point: its exit status, or 130 on Ctrl-C (its finally blocks have
    stopped every process it started)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

if __name__ == "__main__":
    _selfcheck()
