"""Connection limits of the socket front end (issue 10, item 3) and the cheap, rate-limited
status (item 4), against a real replica: a connection that never sends a request, one that
idles without logging in, the global and per-address caps, and many status queries."""

from __future__ import annotations

import socket
import time

import pytest

from chatnet.protocol.codec import STATUS_ERROR
from chatnet.protocol.texts import (
    STATUS_PREFACE,
    T_ADDRESS_FULL,
    T_HANDSHAKE_TIMEOUT,
    T_IDLE_TIMEOUT,
    T_SERVER_FULL,
)
from chatnet.server.chatserver import STATUS_PER_SECOND
from chatnet.server.cli import query_status
from chatnet.testing import RawClient


def closed_after(client: RawClient, timeout: float = 10.0):
    """The frame the server sent before closing, and that it then closed (EOF)."""
    frame = client.frame(timeout=timeout)
    with pytest.raises(EOFError):
        client.frame(timeout=timeout)
    return frame


def test_a_connection_that_sends_no_request_is_closed_with_a_reason(servers):
    server = servers(args=["--handshake-timeout", "0.5"])
    silent = RawClient(server.host, server.port)
    partial = RawClient(server.host, server.port)
    partial.send_bytes(b"1|half-a-requ")  # no newline, never completed
    for client in (silent, partial):
        frame = closed_after(client)
        assert (frame.status, frame.message) == (STATUS_ERROR, T_HANDSHAKE_TIMEOUT.format(seconds=0.5))
    ok = RawClient(server.host, server.port)
    assert ok.request("1|alice").message.startswith("Account created!")


def test_idle_connections_are_closed_only_when_not_logged_in(servers):
    server = servers(args=["--idle-timeout", "1"])
    anonymous = RawClient(server.host, server.port)
    anonymous.request("4|")  # identified, but never logs in
    member = RawClient(server.host, server.port)
    assert member.request("1|bob").message.startswith("Account created!")
    started = time.monotonic()
    frame = closed_after(anonymous)
    assert (frame.status, frame.message) == (STATUS_ERROR, T_IDLE_TIMEOUT.format(seconds=1))
    assert time.monotonic() - started >= 0.5
    assert member.request("3|bob|still here?").status == STATUS_ERROR  # to self: still answered


def test_global_cap_refuses_clients_but_keeps_serving_and_admits_status(servers):
    server = servers(args=["--max-connections", "3", "--max-per-address", "0"])
    clients = [RawClient(server.host, server.port) for _ in range(3)]
    assert clients[0].request("1|carol").message.startswith("Account created!")
    for client in clients[1:]:  # a connection counts as a client from its first request
        assert client.request("4|").status == 0
    extra = RawClient(server.host, server.port)
    extra.send("2|carol")
    frame = closed_after(extra)
    assert (frame.status, frame.message) == (STATUS_ERROR, T_SERVER_FULL)
    assert query_status(server.host, server.port) is not None  # a preface is recognised over the cap
    clients[1].close()
    retry_deadline = time.monotonic() + 10
    while True:  # the closed slot is freed once the server sees the close
        again = RawClient(server.host, server.port)
        answer = again.request("1|dave")
        if answer.message != T_SERVER_FULL or time.monotonic() > retry_deadline:
            break
        again.close()
    assert answer.message.startswith("Account created!")


def test_per_address_cap(servers):
    server = servers(args=["--max-per-address", "2"])
    first, second = RawClient(server.host, server.port), RawClient(server.host, server.port)
    assert first.request("1|erin").message.startswith("Account created!")
    assert second.request("4|").status == 0
    third = RawClient(server.host, server.port)
    third.send("4|")
    frame = closed_after(third)
    assert (frame.status, frame.message) == (STATUS_ERROR, T_ADDRESS_FULL)
    assert first.request("4|").status == 0  # the admitted ones are unaffected


def test_status_is_rate_limited(server):
    answered, started = 0, time.monotonic()
    for _ in range(3 * STATUS_PER_SECOND):
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(STATUS_PREFACE)
            answered += bool(sock.makefile("rb").readline())
    elapsed = time.monotonic() - started
    assert answered >= 1
    assert answered <= STATUS_PER_SECOND * (int(elapsed) + 2)
    if elapsed < 1.0:
        assert answered <= STATUS_PER_SECOND * 2


def test_status_beyond_role_and_primary_needs_the_cluster_secret(tmp_path):
    from chatnet.testing import Cluster

    c = Cluster(str(tmp_path), n=2).start()
    try:
        c.wait_primary()
        host, port = c.addresses[0]
        public = query_status(host, port)
        assert set(public) == {"address", "role", "serving", "primary_address"}
        full = query_status(host, port, secret=c.secret, cluster=c.cluster_id)
        assert {"view", "members", "commit_index", "digest"} <= set(full)
        assert query_status(host, port, secret=b"x" * 32, cluster=c.cluster_id) == \
            {"error": "status proof refused: wrong cluster secret"}
        assert "error" in query_status(host, port, secret=c.secret, cluster=b"another cluster")
    finally:
        c.stop_all()


def test_a_lone_replica_has_no_secret_to_check(server):
    assert query_status(server.host, server.port, secret=b"s" * 32) == \
        {"error": "this replica runs alone, without a cluster secret"}
    assert query_status(server.host, server.port)["role"] == "primary"
