"""The socket front end keeps one connection's trouble to that connection (issue 10, items 1-2).

* An exception while handling one connection's request closes that connection, logged, and the
  replica goes on serving everyone else (in-process: the service is made to raise).
* A pipelined flood of cheap reads (64 KiB of ``4`` lines) is handled MAX_PIPELINED requests
  per loop pass: a well-behaved client beside it keeps getting answers quickly, and the
  replica's memory does not balloon (a real replica process).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pytest

from chatnet.protocol.codec import NEED_DATA, ResponseDecoder
from chatnet.protocol.texts import STATUS_PREFACE
from chatnet.server.chatserver import ChatServer
from chatnet.server.config import Address
from chatnet.testing import RawClient, free_port, wait_until


@pytest.fixture
def in_process_server(tmp_path):
    """A ChatServer on a free port, its reactor on a background thread."""
    port = free_port()
    server = ChatServer([Address("127.0.0.1", port)], 0, str(tmp_path / "data"))
    server.start()
    thread = threading.Thread(target=server.reactor.run, daemon=True)
    thread.start()
    wait_until(lambda: server.replica_host.serves_clients, timeout=10, what="the replica serving")
    yield server
    server.reactor.stop("test over")
    thread.join(timeout=10)
    server.shutdown()


def test_an_exception_handling_one_request_closes_only_that_connection(in_process_server, caplog):
    server = in_process_server
    service = server.service
    real_receive = service.receive

    def receive(conn, event):
        if getattr(event, "args", None) == ("boom",):
            raise ValueError("a bug triggered by this request")
        return real_receive(conn, event)

    service.receive = receive
    bystander = RawClient(server.host, server.port)
    assert bystander.request("1|alice").message.startswith("Account created!")
    victim = RawClient(server.host, server.port)
    with caplog.at_level(logging.ERROR, logger="chatnet.server.chatserver"):
        victim.send("1|boom")
        with pytest.raises(EOFError):
            victim.frame(timeout=10)
    assert "error while handling its request" in caplog.text
    assert bystander.request("4|").message == "\n- alice\n"
    assert RawClient(server.host, server.port).request("1|bob").message.startswith("Account created!")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_list_flood_does_not_freeze_others_or_blow_up_memory(server):
    for i in range(60):
        setup = RawClient(server.host, server.port)
        assert setup.request(f"1|user{i:03d}").status == 0
        setup.close()
    rss_before = _rss_kib(server.pid)
    flooder = socket.create_connection((server.host, server.port))
    flooder.sendall(b"\n" + b"4\n" * 32768)  # 64 KiB of list requests in one write
    bystander = RawClient(server.host, server.port)
    worst = 0.0
    for i in range(20):
        started = time.monotonic()
        assert bystander.request("4|user00*").status == 0
        worst = max(worst, time.monotonic() - started)
    # read the flood's answers so the server can finish it; they are well-formed frames
    decoder, answered, deadline = ResponseDecoder(), 0, time.monotonic() + 120
    flooder.settimeout(5)
    while answered < 32768 and time.monotonic() < deadline:
        decoder.receive_data(flooder.recv(1 << 20))
        while decoder.next_event() is not NEED_DATA:
            answered += 1
    assert answered == 32768
    rss_after = _rss_kib(server.pid)
    flooder.close()
    slack = float(os.environ.get("CHATNET_LATENCY_SLACK", "1"))
    print(f"worst bystander wait {worst * 1000:.1f} ms, RSS +{rss_after - rss_before} KiB")
    assert worst < 0.5 * slack, f"a bystander waited {worst:.3f}s during the flood"
    assert rss_after - rss_before < 40 * 1024, f"RSS grew {rss_after - rss_before} KiB"


def test_a_public_status_query_never_asks_for_a_state_digest(in_process_server, monkeypatch):
    """The digest (a serialization of the whole state, in a forked child) is for authenticated
    queries: an unauthenticated poller of a quiet replica must not make it fork every second."""
    server = in_process_server
    asked = []
    real = server._state_digest
    monkeypatch.setattr(server, "_state_digest", lambda: asked.append(1) or real())
    for _ in range(3):
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.sendall(STATUS_PREFACE)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                assert chunk, "the public status answer was cut short"
                data += chunk
        assert json.loads(data)["role"] == "primary"
    assert asked == []
    assert "digest" in server.status()  # the authenticated query still carries it
    assert asked == [1]
