"""Issue 11 against a real replica, the way the seed's own test suite and a newcomer's script use
it: requests on short-lived connections see each other in arrival order, and a seed-style
recipient that resets its connection with chat unread gets every acknowledged chat again at its
next login."""

from __future__ import annotations

import socket
import struct

from chatnet.testing import RawClient


def one_shot(server, request: str) -> None:
    """The seed client's way: connect, write one request, close without reading the answer."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(request.encode())


def test_a_login_right_after_a_create_on_another_connection_succeeds(server):
    one_shot(server, "1|bob")
    assert RawClient(server.host, server.port).request("2|bob").message == "Logged in as bob."


def test_a_list_after_four_short_lived_creates_shows_all_four(server):
    for name in ("w", "x", "y", "z"):
        one_shot(server, f"1|{name}")
    assert RawClient(server.host, server.port).request("4").message == "\n- w\n- x\n- y\n- z\n"


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset: whatever the kernel still holds unread is thrown away."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_chat_unread_at_a_reset_is_delivered_at_the_next_login(server):
    sender, bob = RawClient(server.host, server.port), RawClient(server.host, server.port)
    assert sender.request("1|alice").status == 0
    assert bob.request("1|bob").status == 0
    for i in range(20):
        assert sender.request(f"3|bob|chat {i}").message == "Message sent to bob."
    reset(bob.sock)  # 20 chats sat in bob's socket, unread
    again = RawClient(server.host, server.port)
    again.send("2|bob")
    frames = [again.frame() for _ in range(22)]
    assert frames[0].message == "Logged in as bob."
    assert [f.message for f in frames[1:21]] == [f"alice|chat {i}" for i in range(20)]
    assert frames[21].message == "You have 20 missed messages above."


def test_a_later_request_is_evidence_and_nothing_is_shown_twice(server):
    sender, bob = RawClient(server.host, server.port), RawClient(server.host, server.port)
    sender.request("1|alice")
    bob.request("1|bob")
    for i in range(5):
        sender.request(f"3|bob|chat {i}")
    assert [bob.frame().message for _ in range(5)] == [f"alice|chat {i}" for i in range(5)]
    assert bob.request("4|nobody").status == 0  # read, then asked something: evidence
    reset(bob.sock)
    again = RawClient(server.host, server.port)
    again.send("2|bob")
    assert [again.frame().message for _ in range(2)] == ["Logged in as bob.",
                                                         "No new messages since you've been gone."]
