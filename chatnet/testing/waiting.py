"""Ports and waiting: one ``free_port`` and one ``wait_until`` for every test and benchmark.

A harness never sleeps and hopes: it polls a condition against a deadline and, at the
deadline, fails with a message that names what it was waiting for.
"""

from __future__ import annotations

import random
import socket
import time

__all__ = ["WaitTimeout", "free_port", "port_open", "wait_until"]


class WaitTimeout(TimeoutError):
    """A condition did not come true before its deadline (the message says which)."""


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a connection's source port (Linux: the first
    field of ip_local_port_range; 32768 elsewhere, the common default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A TCP port of ``host`` nothing is bound to right now (or the first of ``count``
    consecutive ones).

    Picked at random *below* the kernel's ephemeral range: a port the kernel chose with
    ``bind(0)`` lies inside it, and between this call and the server's ``bind`` any outgoing
    connection of the test run (replicas dial each other, clients connect) may be given it as
    its source port, which makes the server fail with "Address already in use".
    """
    high = min(_ephemeral_low(), 65536) - count
    for _ in range(200):
        base = random.randrange(10_000, high) if high > 10_000 else random.randrange(1024, 65536 - count)
        if all(_bindable(host, base + i) for i in range(count)):
            return base
    raise OSError(f"no {count} consecutive free port(s) found on {host}")


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
