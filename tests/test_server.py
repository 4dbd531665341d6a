"""A real ``bin/chatserver`` process, driven over TCP: ops, persistence, bad input, load."""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import threading
import time

import pytest

from chatnet.protocol.codec import NEED_DATA, ResponseDecoder
from chatnet.testing import CHATSERVER, RawClient, wait_until


def client(server, **kw) -> RawClient:
    return RawClient(server.host, server.port, **kw)


def logged_in(server, name: str, create: bool = True) -> RawClient:
    c = client(server)
    f = c.request(f"{1 if create else 2}|{name}")
    assert f.status == 0, f
    if not create:
        c.frame()  # the missed-messages note
    return c


def test_seed_style_client_without_terminator(server):
    c = client(server, line_mode=False)
    f = c.request("1|alice")
    assert (f.status, f.indicator, f.message) == (0, 0, "Account created! Logged in as alice.")
    f = c.request("4|a*")
    assert f.message == "\n- alice\n"
    f = c.request("3|nobody|hi")
    assert (f.status, f.message) == (1, "Recipient username cannot be found.")


def test_all_ops_and_live_chat(server):
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    assert alice.request("3|bob|hello there").message == "Message sent to bob."
    f = bob.frame()
    assert (f.status, f.indicator, f.message) == (0, 1, "alice|hello there")
    assert bob.request("3|alice|hi back").message == "Message sent to alice."
    assert alice.frame().message == "bob|hi back"
    assert alice.request("4").message == "\n- alice\n- bob\n"
    assert bob.request("5").message == "Account bob has been deleted. You are now logged out."
    assert alice.request("3|bob|gone?").message == "Recipient username cannot be found."
    alice.send("6")
    with pytest.raises(EOFError):
        alice.frame()
    again = logged_in(server, "alice", create=False)  # exit took alice offline
    again.close()


def test_pipelined_requests_in_one_write_are_all_answered_in_order(server):
    c = client(server)
    c.send_bytes(b"1|pipe\n4\n3|pipe|x\n3|nobody|x\n4|p*\n")
    messages = [f.message for f in c.frames(5)]
    assert messages == [
        "Account created! Logged in as pipe.",
        "\n- pipe\n",
        "Cannot send messages to yourself.",
        "Recipient username cannot be found.",
        "\n- pipe\n",
    ]


def test_queued_chat_in_order_and_persistence_across_sigkill(servers):
    server = servers()
    alice = logged_in(server, "alice")
    bob = logged_in(server, "bob")
    bob.send("6")
    with pytest.raises(EOFError):  # bob is offline once the server closed his connection
        bob.frame()
    for i in range(50):
        assert alice.request(f"3|bob|queued {i}").message == "Message sent to bob."
    server.kill()  # SIGKILL: no shutdown path runs
    server.start()
    bob = client(server)
    assert bob.request("2|bob").message == "Logged in as bob."
    chats = [bob.frame().message for _ in range(50)]
    assert chats == [f"alice|queued {i}" for i in range(50)]
    assert bob.frame().message == "You have 50 missed messages above."
    assert bob.request("4").message == "\n- alice\n- bob\n"


def test_sigkill_at_a_random_moment_loses_nothing_acknowledged(servers):
    """Senders run flat out; the server is killed mid-stream; every acknowledged chat survives."""
    server = servers()
    setup = client(server)
    setup.request("1|sink")
    setup.send("6")
    acked: dict[str, list[str]] = {}
    stop = threading.Event()

    def sender(name: str):
        c = logged_in(server, name)
        acked[name] = []
        i = 0
        try:
            while not stop.is_set():
                text = f"{name}-{i}"
                c.send(f"3|sink|{text}")
                f = c.frame(timeout=5)
                if f.message == "Message sent to sink.":
                    acked[name].append(text)
                i += 1
        except (OSError, EOFError):  # FrameTimeout is an OSError
            pass

    threads = [threading.Thread(target=sender, args=(f"s{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(len(v) for v in acked.values()) >= random.randint(200, 800), timeout=30,
               what="some acknowledged chat")
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    server.start()
    sink = client(server)
    assert sink.request("2|sink").message == "Logged in as sink."
    got = []
    while True:
        f = sink.frame()
        if f.indicator == 0:
            break
        got.append(f.message.split("|", 1)[1])
    for name, texts in acked.items():
        mine = [g for g in got if g.startswith(name + "-")]
        # Everything acknowledged is there, in the order it was sent (unacknowledged may be too).
        assert set(texts) <= set(mine), f"{name} lost {sorted(set(texts) - set(mine))[:5]}"
        assert mine == sorted(mine, key=lambda t: int(t.rsplit("-", 1)[1]))


@pytest.mark.parametrize("payload", [
    b"\xff\xfe\xfd garbage \x00\x01\n",
    b"A" * 10_000 + b"\n",
    b"1|\xc3\x28bad\n",
    b"3|" + "é".encode() * 300 + b"\n",
    bytes(range(256)) * 4 + b"\n",
], ids=["garbage", "10KB-line", "bad-utf8", "300-chars", "all-bytes"])
def test_bad_input_gets_an_error_and_the_connection_stays_usable(server, payload):
    c = client(server)
    c.send_bytes(payload)
    f = c.frame()
    assert f.status == 1
    c.send("1|still-ok")
    while f.message != "Account created! Logged in as still-ok.":
        f = c.frame()


def test_random_bytes_and_connection_storms_do_not_hurt_the_server(server):
    rng = random.Random(7)
    for _ in range(200):
        s = socket.create_connection((server.host, server.port))
        if rng.random() < 0.5:
            s.sendall(rng.randbytes(rng.randint(1, 3000)))
        if rng.random() < 0.3:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()
    half_open = [socket.create_connection((server.host, server.port)) for _ in range(50)]
    for s in half_open[:25]:
        s.sendall(b"3|someone|partial line without end")
    c = logged_in(server, "survivor")
    assert c.request("4|surv*").message == "\n- survivor\n"
    for s in half_open:
        s.close()
    assert server.proc.poll() is None


def test_flood_without_newline_is_bounded(server):
    c = client(server)
    chunk = b"x" * 65536
    for _ in range(64):  # 4 MiB without a newline
        c.send_bytes(chunk)
    c.send_bytes(b"\n4\n")
    first = c.frame()
    assert first.message.startswith("Request too long")
    assert c.frame().message == "\n"  # the next request is served normally


def test_a_client_that_never_reads_does_not_slow_anyone_and_loses_nothing(servers):
    server = servers(args=["--slow-client-timeout", "2"])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    raw.connect((server.host, server.port))
    raw.sendall(b"\n1|lazy\n")  # and never read again
    wait_until(lambda: b"lazy" in _probe(server, "4|lazy"), what="lazy account")
    pairs = [(logged_in(server, f"a{i}"), logged_in(server, f"b{i}")) for i in range(20)]
    big = "z" * 250
    per_spammer = 1500
    errors = []

    def spam(k):
        c = logged_in(server, f"spammer{k}")
        for i in range(per_spammer):
            f = c.request(f"3|lazy|{big} {k} {i}")
            if f.status != 0:
                errors.append(f)

    spammers = [threading.Thread(target=spam, args=(k,)) for k in range(4)]
    for t in spammers:
        t.start()
    latencies = []
    while any(t.is_alive() for t in spammers):
        for i, (a, b) in enumerate(pairs):
            t0 = time.perf_counter()
            assert a.request(f"3|b{i}|ping").status == 0
            assert b.frame().message == f"a{i}|ping"
            latencies.append(time.perf_counter() - t0)
    for t in spammers:
        t.join()
    assert not errors
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 0.25, f"others slowed down: p99 {p99 * 1000:.1f} ms"
    assert "is not reading: live chat paused" in server.log()
    # The lazy client is dropped after the timeout; everything it did not get is still queued for it.
    wait_until(lambda: "did not read for 2s" in server.log(), timeout=15, what="slow client dropped")
    received = b""
    raw.settimeout(5)
    while True:  # what the kernel had already accepted for the lazy client before the drop
        data = raw.recv(1 << 20)
        if not data:
            break
        received += data
    raw.close()
    decoder = ResponseDecoder()
    decoder.receive_data(received)  # may end in a frame cut short by the drop: not delivered
    early = []
    while (event := decoder.next_event()) is not NEED_DATA:
        early.append(event.message)
    early = early[1:]  # skip the create answer
    again = client(server)
    assert again.request("2|lazy").message == "Logged in as lazy."
    late = []
    while True:
        f = again.frame()
        if f.indicator == 0:
            break
        late.append(f.message)
    assert f.message == f"You have {len(late)} missed messages above."
    got = {m.split("|", 1)[1] for m in early + late}
    sent = {f"{big} {k} {i}" for k in range(4) for i in range(per_spammer)}
    assert got == sent  # at least once, none lost
    assert len(late) > 0


def _closed(c: RawClient) -> bool:
    try:
        c.sock.setblocking(False)
        while True:
            data = c.sock.recv(1 << 20)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_thousand_concurrent_logged_in_connections(servers):
    server = servers(args=["--max-per-address", "0"])  # all 1000 come from 127.0.0.1
    n = 1000
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        s = socket.create_connection((server.host, server.port))
        s.sendall(f"\n1|user{i}\n".encode())
        s.setblocking(False)
        dec = ResponseDecoder()
        sel.register(s, selectors.EVENT_READ, dec)
        socks.append((s, dec))
    answered = 0
    deadline = time.monotonic() + 60
    pending = {s for s, _ in socks}
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            data = key.fileobj.recv(4096)
            key.data.receive_data(data)
            if key.data.next_event() is not NEED_DATA:
                answered += 1
                pending.discard(key.fileobj)
                sel.unregister(key.fileobj)
    assert answered == n
    # All of them are still connected and logged in: one of them chats with another.
    a, b = socks[0][0], socks[n - 1][0]
    a.setblocking(True)
    b.setblocking(True)
    a.sendall(f"3|user{n - 1}|across the crowd\n".encode())
    dec = ResponseDecoder()
    wait_until(lambda: (dec.receive_data(b.recv(4096)) or True) and _first_chat(dec), timeout=10, what="chat")
    assert b"already connected" in _probe(server, "2|user500")
    for s, _ in socks:
        s.close()
    sel.close()


def _first_chat(dec):
    event = dec.next_event()
    return event is not NEED_DATA and event.message == "user0|across the crowd"


def _probe(server, text: str) -> bytes:
    c = client(server)
    return c.request(text).message.encode()


def test_sigterm_shuts_down_cleanly_and_keeps_data(servers):
    server = servers()
    c = logged_in(server, "alice")
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=10) == 0
    assert "shutting down (SIGTERM)" in server.log()
    server.start()
    assert client(server).request("2|alice").message == "Logged in as alice."
    c.close()


def test_store_lives_in_the_data_dir(servers, tmp_path):
    server = servers("mydata")
    logged_in(server, "persisted").close()
    assert os.path.exists(os.path.join(server.data_dir, "chatnet.sqlite3"))


def test_usage_errors_are_clear(tmp_path):
    import subprocess
    import sys

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    out = subprocess.run([sys.executable, CHATSERVER, "--peers", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=20)
    busy.close()
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
