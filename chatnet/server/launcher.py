"""``chatserver --local``: every replica of ``--peers`` as a child process of this one.

The launcher is a convenience for one machine: it creates the cluster secret if there is none,
starts one ``chatserver`` per peer address with its own data directory, prefixes each child's
log lines with its port, and on Ctrl-C (or SIGTERM) stops them all.  A child that dies — say an
operator ``kill -9``s it to watch a failover — is reported, not restarted: the command to start
it again by hand is printed at start-up.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import subprocess
import sys
import time

from .config import Address, format_peers, read_secret


def ensure_secret(path: str) -> bool:
    """Create a random cluster secret at ``path`` unless one exists; True if created.

    The file is created with mode 0600 by the ``open`` itself (never world-readable, not
    even for an instant), in a directory created 0700 if missing; the replicas refuse a
    secret file that group or others can access (config.read_secret)."""
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def server_program() -> list[str]:
    """How a child replica is run: ``bin/chatserver`` of this checkout by its absolute path, so
    the command line printed for it works from any directory (``python -m chatnet.server.cli``
    would find the package only from the checkout's root), or the installed package."""
    script = os.path.join(CHECKOUT, "bin", "chatserver")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-m", "chatnet.server.cli"]


def child_command(peers: list[Address], me: Address, base_dir: str, secret_file: str, extra: list[str]) -> list[str]:
    return [
        *server_program(),
        "--peers", format_peers(peers),
        "--host", me.host, "--port", str(me.port),
        "--data-dir", os.path.join(base_dir, str(me.port)),
        "--secret-file", secret_file,
        *extra,
    ]


def run_local(peers: list[Address], base_dir: str, secret_file: str, extra: list[str],
              metrics_port: int | None = None) -> int:
    """Run every replica of ``peers`` as a child until Ctrl-C; with ``metrics_port`` P the
    i-th replica serves its metrics on P+i."""
    if ensure_secret(secret_file):
        print(f"created cluster secret {secret_file}", flush=True)
    if len(peers) > 1:
        read_secret(secret_file)  # a ConfigError (say, mode 0644) once here, not per child
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    children: dict[int, tuple[Address, subprocess.Popen]] = {}
    sel = selectors.DefaultSelector()
    for i, me in enumerate(peers):
        cmd = child_command(peers, me, base_dir, secret_file, extra)
        if metrics_port is not None:
            cmd += ["--metrics-port", str(metrics_port + i)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        children[proc.pid] = (me, proc)
        sel.register(proc.stdout, selectors.EVENT_READ, me)
        print(f"[{me.port}] started pid {proc.pid}: {' '.join(cmd)}", flush=True)
    print(f"chatnet: {len(peers)} replicas on {format_peers(peers)}; Ctrl-C stops them all", flush=True)

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    partial: dict[int, bytes] = {}
    try:
        while not stopping and sel.get_map():
            for key, _ in sel.select(0.5):
                me = key.data
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                buf = partial.get(me.port, b"") + data
                *lines, partial[me.port] = buf.split(b"\n")
                for line in lines:
                    sys.stdout.write(f"[{me.port}] {line.decode('utf-8', 'replace')}\n")
                sys.stdout.flush()
            for pid, (me, proc) in list(children.items()):
                code = proc.poll()
                if code is not None:
                    how = f"signal {-code}" if code < 0 else f"code {code}"
                    print(f"[{me.port}] replica exited ({how})", flush=True)
                    del children[pid]
    finally:
        _stop_children(children, sel, partial)
    return 0


def _stop_children(children: dict, sel: selectors.BaseSelector, partial: dict[int, bytes]) -> None:
    """Stop every child still running (SIGCONT first: a stopped one cannot act on SIGTERM),
    kill those that take over 10 s, and print what they wrote last."""
    for me, proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
    deadline = time.monotonic() + 10
    for me, proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for key in list(sel.get_map().values()):
        me = key.data
        rest = key.fileobj.read() or b""
        for line in (partial.get(me.port, b"") + rest).splitlines():
            print(f"[{me.port}] {line.decode('utf-8', 'replace')}")
    print("chatnet: all replicas stopped", flush=True)
