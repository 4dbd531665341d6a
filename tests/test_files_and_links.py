"""Operators' mistakes and hostile peers: private store and secret files, a peer link that
sends garbage, and replicas started with different --peers lists."""

from __future__ import annotations

import logging
import os
import socket
import stat

import pytest

from chatnet.loop.reactor import Reactor
from chatnet.protocol.texts import PEER_PREFACE
from chatnet.replication.handshake import Initiator
from chatnet.replication.messages import (
    Heartbeat,
    PeerFramer,
    decode_message,
    encode_message,
    frame,
)
from chatnet.replication.transport import PeerTransport
from chatnet.server import launcher
from chatnet.server.config import Address, ConfigError, cluster_id, read_secret
from chatnet.server.store import Store

SECRET = b"0123456789abcdef0123456789abcdef"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    """Run with umask 0, so only the code under test keeps files private."""
    old = os.umask(0)
    yield
    os.umask(old)


# ---------------------------------------------------------------------------- store files

def test_store_directory_is_0700_and_database_files_0600(tmp_path, loose_umask):
    data_dir = tmp_path / "data" / "1538"
    store = Store(str(data_dir))
    try:
        assert mode(data_dir) == 0o700
        names = sorted(os.listdir(data_dir))
        assert "chatnet.sqlite3" in names and "chatnet.sqlite3-wal" in names
        for name in names:
            assert mode(data_dir / name) == 0o600, name
    finally:
        store.close()


def test_store_files_left_readable_by_an_older_version_are_made_private(tmp_path):
    Store(str(tmp_path)).close()
    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / f"chatnet.sqlite3{suffix}"
        path.touch()
        os.chmod(path, 0o644)
    store = Store(str(tmp_path))
    try:
        for suffix in ("", "-wal", "-shm"):
            assert mode(tmp_path / f"chatnet.sqlite3{suffix}") == 0o600
    finally:
        store.close()


def test_an_existing_data_directory_keeps_its_mode(tmp_path):
    os.chmod(tmp_path, 0o750)
    Store(str(tmp_path)).close()
    assert mode(tmp_path) == 0o750        # the operator's directory, the operator's choice


# ---------------------------------------------------------------------------- secret files

def write(path, text, perms):
    path.write_text(text)
    os.chmod(path, perms)
    return str(path)


@pytest.mark.parametrize("perms", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_secret_file_others_can_access_is_refused_with_the_fix(tmp_path, perms):
    path = write(tmp_path / "cluster.secret", "x" * 64, perms)
    with pytest.raises(ConfigError) as err:
        read_secret(path)
    msg = str(err.value)
    assert f"chmod 600 {path}" in msg and f"{perms:04o}" in msg


@pytest.mark.parametrize("perms", [0o600, 0o400])
def test_a_private_secret_file_is_read(tmp_path, perms):
    assert read_secret(write(tmp_path / "s", "y" * 64 + "\n", perms)) == b"y" * 64


def test_missing_secret_file_message_creates_it_private(tmp_path):
    with pytest.raises(ConfigError) as err:
        read_secret(str(tmp_path / "nope"))
    assert "umask 077" in str(err.value)


def test_launcher_creates_the_secret_0600_and_its_directory_0700(tmp_path, loose_umask):
    path = tmp_path / "chatnet-data" / "cluster.secret"
    assert launcher.ensure_secret(str(path))
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert read_secret(str(path))
    assert not launcher.ensure_secret(str(path))        # an existing one is kept


def test_launcher_refuses_a_readable_secret_before_starting_anything(tmp_path, monkeypatch):
    path = write(tmp_path / "cluster.secret", "z" * 64, 0o644)
    started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: started.append(a))
    peers = [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]
    with pytest.raises(ConfigError, match="chmod 600"):
        launcher.run_local(peers, str(tmp_path), path, [])
    assert started == []


# ---------------------------------------------------------------------------- peer links

class FakePeer:
    """A peer speaking the real handshake over a blocking socket, then whatever a test wants."""

    def __init__(self, addr, me, to, cid, secret=SECRET):
        self.sock = socket.create_connection(addr, timeout=5)
        self.ini = Initiator(secret, me, to, os.urandom(32), cid)
        self.framer = PeerFramer()
        self.sock.sendall(PEER_PREFACE + frame(encode_message(self.ini.hello())))

    def read_message(self, reactor):
        for _ in range(200):
            reactor.run_once(0.01)
            try:
                self.sock.settimeout(0.01)
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return None
            for payload in self.framer.feed(data):
                return decode_message(payload)
        raise AssertionError("no answer")

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def closed_by_other_end(self, reactor) -> bool:
        for _ in range(200):
            reactor.run_once(0.01)
            try:
                self.sock.settimeout(0.01)
                if self.sock.recv(65536) == b"":
                    return True
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
        return False


@pytest.fixture
def replica0():
    """Node 0's PeerTransport (it dials nobody) and a listening socket standing for its
    port: accept() hands a connection to the transport the way the server's front end does."""
    reactor = Reactor()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    addrs = [Address("127.0.0.1", lst.getsockname()[1]), Address("127.0.0.1", 1),
             Address("127.0.0.1", 2)]
    got = []

    def on_message(peer, msg):
        if msg == "boom":
            raise RuntimeError("the core choked")
        got.append((peer, msg))

    t = PeerTransport(reactor, 0, addrs, SECRET, on_message, lambda peer, up: None)

    def accept():
        sock, addr = lst.accept()
        sock.settimeout(5)
        preface = sock.recv(len(PEER_PREFACE))
        assert preface == PEER_PREFACE
        t.adopt(sock, addr, b"")
    yield t, reactor, addrs, got, accept
    t.stop()
    lst.close()
    reactor.close()


def handshake(t, reactor, addrs, accept, me=1):
    peer = FakePeer((addrs[0].host, addrs[0].port), me, 0, cluster_id(addrs).encode())
    accept()
    challenge = peer.read_message(reactor)
    peer.send(encode_message(peer.ini.on_challenge(challenge)))
    for _ in range(20):
        reactor.run_once(0.01)
    assert me in t.inbound
    return peer


HB = Heartbeat(1, 1, 0, 0, 0, 0, None, (), 3, False, 0, 0, 0)


def test_garbage_after_a_valid_handshake_closes_that_link_only(replica0, caplog):
    t, reactor, addrs, got, accept = replica0
    bad = handshake(t, reactor, addrs, accept, me=1)
    good = handshake(t, reactor, addrs, accept, me=2)
    bad.send(encode_message(HB))
    with caplog.at_level(logging.WARNING):
        bad.send(b"\x02\x63 not a message")
        assert bad.closed_by_other_end(reactor)
    assert 1 not in t.inbound and 2 in t.inbound
    assert "closing link with peer node 1" in caplog.text and "bad frame" in caplog.text
    good.send(encode_message(HB))             # the other link goes on
    for _ in range(20):
        reactor.run_once(0.01)
    assert got == [(1, HB), (2, HB)]


def test_an_oversized_frame_header_closes_the_link(replica0, caplog):
    t, reactor, addrs, got, accept = replica0
    bad = handshake(t, reactor, addrs, accept)
    with caplog.at_level(logging.WARNING):
        bad.sock.sendall((1 << 31).to_bytes(4, "big"))
        assert bad.closed_by_other_end(reactor)
    assert t.inbound == {} and "bad frame" in caplog.text


def test_an_exception_handling_a_message_closes_the_link_not_the_replica(replica0, caplog,
                                                                          monkeypatch):
    t, reactor, addrs, got, accept = replica0
    bad = handshake(t, reactor, addrs, accept)
    monkeypatch.setattr("chatnet.replication.transport.decode_message", lambda payload: "boom")
    with caplog.at_level(logging.WARNING):
        bad.send(encode_message(HB))
        assert bad.closed_by_other_end(reactor)
    assert t.inbound == {} and "error handling its message" in caplog.text


def test_a_replica_with_another_peers_list_is_refused_naming_both(replica0, caplog):
    t, reactor, addrs, got, accept = replica0
    other = [addrs[0], Address("127.0.0.1", 2), Address("127.0.0.1", 1)]    # another order
    theirs, ours = cluster_id(other), cluster_id(addrs)
    assert theirs != ours
    peer = FakePeer((addrs[0].host, addrs[0].port), 1, 0, theirs.encode())
    with caplog.at_level(logging.WARNING):
        accept()
        assert peer.closed_by_other_end(reactor)
    assert t.inbound == {}
    line = next(r.getMessage() for r in caplog.records if "refused peer" in r.getMessage())
    assert theirs in line and ours in line and "--peers" in line
    # it redials every second: the same refusal is not logged again at once
    again = FakePeer((addrs[0].host, addrs[0].port), 1, 0, theirs.encode())
    with caplog.at_level(logging.WARNING):
        accept()
        assert again.closed_by_other_end(reactor)
    assert sum("refused peer" in r.getMessage() for r in caplog.records) == 1


def test_a_peer_with_the_same_list_but_the_wrong_secret_is_refused(replica0, caplog):
    t, reactor, addrs, got, accept = replica0
    peer = FakePeer((addrs[0].host, addrs[0].port), 1, 0, cluster_id(addrs).encode(),
                    secret=b"another-secret-of-enough-length")
    accept()
    challenge = peer.read_message(reactor)
    with pytest.raises(Exception):
        peer.ini.on_challenge(challenge)      # we prove the secret; they cannot check it
    assert t.inbound == {}
