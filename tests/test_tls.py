"""TLS (issue 13 item 5) against real processes: chat end to end through ``bin/chatclient
--tls-ca`` with nothing readable on the wire, a client with the wrong CA refused while the
server goes on, plaintext refused under ``--require-tls`` (status still answered), a raw TLS
client speaking the seed protocol, a stalled or broken handshake closed by the handshake timeout
while others are served, and replication and failover over TLS peer links with ``kill -9`` of
the primary.  Certificates are made with ``openssl`` in a temporary directory (a CA and a server
certificate for IP:127.0.0.1, and a second, unrelated CA)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from chatnet.loop.tls import TLSEndpoint, client_context
from chatnet.protocol.codec import STATUS_ERROR
from chatnet.server.backup import BackupError, fetch_backup
from chatnet.server.chatserver import T_TLS_REQUIRED
from chatnet.server.cli import query_status
from chatnet.testing import CHATCLIENT, Cluster, RawClient

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")

CHAT = "the eagle lands at dawn"
PASSWORD = "Tls-Test-Password-5521"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=chatnet test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """``ca``, ``cert``, ``key`` (signed by ca, SAN IP:127.0.0.1) and ``other_ca``: paths."""
    d = tmp_path_factory.mktemp("tls")
    _make_ca(d, "ca")
    _make_ca(d, "other_ca")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=chatnet replica", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem"), "key": str(d / "server.key"),
            "other_ca": str(d / "other_ca.pem")}


def tls_flags(certs, *more):
    return ["--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-ca", certs["ca"], *more]


def chatclient(address, lines, tmp_path, *flags, timeout=30):
    """``chatclient --plain`` with a password from the environment and state under tmp_path."""
    env = dict(os.environ, CHATNET_PASSWORD=PASSWORD, XDG_DATA_HOME=str(tmp_path / "xdg"))
    for name in ("CHATNET_SERVERS", "CHATNET_NEW_PASSWORD", "CHATNET_TLS_CA"):
        env.pop(name, None)
    return subprocess.run([sys.executable, CHATCLIENT, "--plain", "--servers", address, *flags],
                          input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          timeout=timeout, env=env, start_new_session=True)


class RecordingProxy:
    """A TCP relay that keeps every byte it carries, both ways: what an eavesdropper sees."""

    def __init__(self, target):
        self.target, self.seen, self.lock = target, bytearray(), threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_chat_end_to_end_through_chatclient_nothing_readable_on_the_wire(replica, certs, tmp_path):
    server = replica(*tls_flags(certs))
    proxy = RecordingProxy(server.addr)
    try:
        ca = ["--tls-ca", certs["ca"]]
        bob = chatclient(proxy.address, ["create|bob"], tmp_path, *ca)
        assert "ok: Account created! Logged in as bob." in bob.stdout, bob.stdout + bob.stderr
        alice = chatclient(proxy.address, ["create|alice", f"send|bob|{CHAT}"], tmp_path, *ca)
        assert "ok: Message sent to bob." in alice.stdout, alice.stdout + alice.stderr
        again = chatclient(proxy.address, ["login|bob"], tmp_path, *ca)
        assert f"<alice> {CHAT}" in again.stdout, again.stdout + again.stderr
        assert bob.returncode == alice.returncode == again.returncode == 0
    finally:
        proxy.close()
    seen = bytes(proxy.seen)
    assert len(seen) > 2000  # three TLS sessions went through the relay
    for secret in (CHAT, PASSWORD, "alice", "Logged in", "0|ext|"):
        assert secret.encode() not in seen, f"{secret!r} crossed the network readable"


def test_a_client_with_the_wrong_ca_is_refused_and_the_server_goes_on(replica, certs, tmp_path):
    server = replica(*tls_flags(certs))
    address = f"{server.host}:{server.port}"
    wrong = chatclient(address, ["create|mallory"], tmp_path, "--tls-ca", certs["other_ca"],
                       "--eof-timeout", "1", "--max-backoff", "0.5")
    assert wrong.returncode == 1
    assert "TLS: certificate verify failed" in wrong.stdout, wrong.stdout
    assert "ok:" not in wrong.stdout
    right = chatclient(address, ["create|trent", "list"], tmp_path, "--tls-ca", certs["ca"])
    assert "ok: Account created! Logged in as trent." in right.stdout, right.stdout + right.stderr
    assert "mallory" not in right.stdout and server.alive()


def test_plaintext_refused_under_require_tls_status_still_answered(replica, certs):
    server = replica(*tls_flags(certs, "--require-tls"))
    with RawClient(server.host, server.port, line_mode=False) as seed:
        frame = seed.request("1|eve")
        assert (frame.status, frame.message) == (STATUS_ERROR, T_TLS_REQUIRED)
        with pytest.raises(EOFError):
            seed.frame(timeout=5)
    with RawClient(server.host, server.port) as ours:  # line mode, more requests on the way:
        ours.send_bytes(b"0|ext|1\n1|eve\n")        # the answer still arrives (no reset)
        assert ours.frame(timeout=5).message == T_TLS_REQUIRED
    with RawClient(server.host, server.port, tls=client_context(certs["ca"])) as ours:
        assert ours.request("1|eve").message == "Account created! Logged in as eve."
    for tls in (None, client_context(certs["ca"])):  # operators may ask in plaintext
        status = query_status(server.host, server.port, timeout=5, tls=tls)
        assert status and status["serving"], status


def test_plaintext_client_without_the_flag_still_served(replica, certs):
    server = replica(*tls_flags(certs))
    with RawClient(server.host, server.port, line_mode=False) as seed:
        assert seed.request("1|walter").message == "Account created! Logged in as walter."


def test_a_raw_tls_client_speaks_the_seed_protocol(replica, certs):
    server = replica(*tls_flags(certs))
    tls = client_context(certs["ca"])
    with RawClient(server.host, server.port, line_mode=False, tls=tls) as seed:
        assert seed.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert seed.request("1|frank").message == "Account created! Logged in as frank."
        time.sleep(0.05)  # the seed's clients: one request per write
        assert seed.request("4|").message.split() == ["-", "frank"]
    with RawClient(server.host, server.port, tls=tls) as lines:  # newline framing, pipelined
        lines.send_bytes(b"2|frank\n3|frank|to myself\n4|f*\n")
        messages = [f.message for f in lines.frames(4)]  # a login is followed by its missed-chat note
        assert messages[0] == "Logged in as frank." and messages[2:] == ["Cannot send messages to yourself.",
                                                                         "\n- frank\n"], messages


def _client_hello(host="127.0.0.1") -> bytes:
    return TLSEndpoint(client_context(), server_side=False, server_hostname=host).data_to_send()


def _closed_by_server(sock, timeout):
    """Whether the server closed ``sock`` within ``timeout`` (an alert it sent first is read)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


def test_a_stalled_or_broken_tls_handshake_is_closed_others_are_served(replica, certs):
    server = replica(*tls_flags(certs, "--handshake-timeout", "1"))
    stalled = socket.create_connection(server.addr)
    stalled.sendall(_client_hello()[:40])  # half a ClientHello, then nothing
    broken = socket.create_connection(server.addr)
    broken.sendall(b"\x16\x03\x01\x00\x10" + os.urandom(16))  # a record header, then noise
    started = time.monotonic()
    with RawClient(server.host, server.port, tls=client_context(certs["ca"])) as ok:
        assert ok.request("1|grace").message == "Account created! Logged in as grace."
    assert time.monotonic() - started < 1.0  # served while the stalled handshake waits
    assert _closed_by_server(broken, 5)
    assert _closed_by_server(stalled, 5)
    assert 0.8 < time.monotonic() - started < 4.5  # by the --handshake-timeout sweep
    stalled.close()
    broken.close()
    assert server.alive() and query_status(server.host, server.port, timeout=5)
    assert not server.log_problems()


def test_replication_and_failover_over_tls(certs, tmp_path):
    tls = client_context(certs["ca"])
    with Cluster(str(tmp_path / "c"), n=3, extra_args=tls_flags(certs, "--require-tls"),
                 tls_ca=certs["ca"]) as cluster:
        first = cluster.wait_primary()
        cluster.wait_in_sync()
        host, port = cluster.replicas[first].addr
        with RawClient(host, port, tls=tls) as heidi:
            assert heidi.request("1|heidi").message.startswith("Account created!")
        with RawClient(host, port, tls=tls) as ivan:
            assert ivan.request("1|ivan").message.startswith("Account created!")
            assert ivan.request(f"3|heidi|{CHAT}").message == "Message sent to heidi."
        links = cluster.replicas[first].log()
        assert "is up (TLSv1" in links and "connected to us from" in links
        cluster.kill(first)
        second = cluster.wait_primary(exclude=[first])
        servers = ",".join(f"{h}:{p}" for h, p in cluster.addresses)  # the dead one first, if it was
        out = chatclient(servers, ["login|heidi"], tmp_path, "--tls-ca", certs["ca"])
        assert f"<ivan> {CHAT}" in out.stdout, out.stdout + out.stderr
        status = cluster.status(second)
        assert status["serving"] and first not in status["members"]
        _backup_only_over_tls(cluster, second, tmp_path, certs)
        for r in cluster.replicas:
            assert not r.log_problems(), r.log_tail()


def _backup_only_over_tls(cluster, i, tmp_path, certs):
    """A copy of the store (every chat, token and password record) is refused in plaintext by a
    --require-tls replica, with the reason; over TLS it is made."""
    host, port = cluster.replicas[i].addr
    secret = cluster.secret
    with pytest.raises(BackupError, match="requires TLS"):
        fetch_backup(host, port, str(tmp_path / "plain.sqlite3"), secret)
    assert not os.path.exists(tmp_path / "plain.sqlite3")
    copy = fetch_backup(host, port, str(tmp_path / "tls.sqlite3"), secret, tls=client_context(certs["ca"]))
    assert copy["accounts"] >= 2, copy


def test_a_plaintext_chatclient_at_a_tls_only_server_says_why_and_backs_off(replica, certs, tmp_path):
    server = replica(*tls_flags(certs, "--require-tls"))
    plain = chatclient(f"{server.host}:{server.port}", ["list"], tmp_path, "--eof-timeout", "3")
    assert plain.returncode == 1
    assert "This server requires TLS" in plain.stdout, plain.stdout
    # a refusal is a failed attempt, retried with back-off, not a good connection redialled at once
    assert plain.stdout.count("This server requires TLS") <= 8, plain.stdout
