"""Ports and waiting: one ``free_port`` and one ``wait_until`` for every test and benchmark.

A harness never sleeps and hopes: it polls a condition against a deadline and, at the
deadline, fails with a message that names what it was waiting for.
"""

from __future__ import annotations

import socket
import time

__all__ = ["WaitTimeout", "free_port", "port_open", "wait_until"]


class WaitTimeout(TimeoutError):
    """A condition did not come true before its deadline (the message says which)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float = 10.0, *, what: str = "a condition", interval: float = 0.01):
    """Poll ``predicate`` until it returns a true value and return that value.

    Raises :class:`WaitTimeout` ("timed out after Ts waiting for WHAT") at the deadline, so a
    failure says what never happened instead of failing later on a confusing symptom.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
