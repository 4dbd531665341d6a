"""Authenticated peer links between replicas, on the same reactor as the clients.

Every replica dials every other replica and sends its own messages only on the link it dialled
(outbound); what a peer sends arrives on the link that peer dialled (inbound).  So each
direction has exactly one TCP connection, nobody has to decide who dials whom, and a replica
that restarts is simply redialled (capped exponential backoff on the timer wheel) — failure
detection never depends on which connections happen to exist: it rests on heartbeats.

Peers share the client port.  A connection is a peer only if its first bytes are the preface
``CHATNET-PEER\\n``; it must then pass the mutual HMAC challenge–response of
``replication.handshake`` before anything it sends reaches the replication core.  Before that,
frames are limited to a few KiB, so an unauthenticated stranger cannot make us buffer much.
A client connection can never become a peer connection: the server decides once, on the first
bytes, and a refused peer is logged and closed.  The handshake also carries the cluster id
(a digest of the ordered ``--peers`` list): replicas started with different lists refuse each
other and log both ids.

With TLS (``chatserver --tls-cert``), every link is TLS: a replica dials its peers with TLS,
verifying that each peer's certificate names the address of its ``--peers`` entry (``--tls-ca``),
and the preface and the HMAC handshake then travel inside the TLS session, unchanged (the HMAC
still decides who is a peer; TLS keeps what they say unreadable and unalterable on the way).
A TLS failure (say, a certificate that does not verify) is logged like a ``--peers`` mismatch,
once a minute, and the link is redialled as usual.

Whatever a peer sends can only cost that peer its link: any exception while decoding its
bytes or handling one of its messages closes that link with a logged reason (the peer redials,
or is redialled, later); it never reaches the reactor, let alone stops the replica.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from ..loop.connection import BufferedSocket, ConnectionLost, TLSFailed
from ..loop.reactor import READ, WRITE, Reactor
from ..protocol.texts import PEER_PREFACE
from ..server.config import Address, cluster_id, format_peers
from .handshake import ClusterMismatch, HandshakeError, Initiator, Responder
from .messages import (
    MAX_PAYLOAD,
    DecodeError,
    FrameError,
    PeerFramer,
    PeerHello,
    PeerProof,
    decode_message,
    encode_message,
    frame,
)

log = logging.getLogger(__name__)

HANDSHAKE_MAX_PAYLOAD = 4096
HANDSHAKE_TIMEOUT = 5.0
REDIAL_MIN, REDIAL_MAX = 0.05, 1.0
MISMATCH_LOG_INTERVAL = 60.0   # a misconfigured peer redials every second: log it once a minute
PEER_OUTPUT_LIMIT = 256 * 1024 * 1024  # a peer this far behind is cut off; it catches up later
PEER_SNDBUF = 4 * 1024 * 1024


class _Link:
    """State shared by outbound and inbound links: a socket, a framer and the reactor hooks."""

    def __init__(self, transport: PeerTransport, sock: socket.socket | BufferedSocket, peer: int | None):
        self.transport = transport
        self.io = sock if isinstance(sock, BufferedSocket) else BufferedSocket(sock)  # TLS: already wrapped
        self.framer = PeerFramer(HANDSHAKE_MAX_PAYLOAD)
        self.peer = peer
        self.closed = False
        self.up = False
        self.deadline = transport.reactor.timers.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if not self.up and not self.closed:
            self.close(f"handshake with peer {self.peer} timed out")

    def send_raw(self, msg) -> None:
        self.io.write(frame(encode_message(msg)))
        self.transport.dirty.add(self)

    def handle_event(self, mask: int) -> None:
        try:
            self._handle_event(mask)
        except Exception as exc:  # e.g. a socket error nobody expected: this link only
            log.exception("closing link with peer %s: unexpected error", self.describe())
            self.close(f"unexpected error: {exc!r}")

    def _handle_event(self, mask: int) -> None:
        if mask & WRITE:
            self.flush()
        if mask & READ and not self.closed:
            try:
                data = self.io.recv()
            except TLSFailed as exc:
                self.transport.log_mismatch(self.describe(), str(exc))
                self.close(str(exc))
                return
            except ConnectionLost as exc:
                self.close(str(exc))
                return
            if self.io.tls is not None:  # handshake records to answer, or plaintext queued for after it
                self.flush()
            if data is None or self.closed:
                return
            if not data:
                self.close("connection closed by peer")
                return
            self.receive(data)

    def receive(self, data: bytes) -> None:
        """Decode and dispatch what the peer sent; any failure closes this link only."""
        try:
            for payload in self.framer.feed(data):
                msg = decode_message(payload)
                if self.up:
                    self.transport.deliver(self.peer, msg)
                else:
                    self.on_handshake(msg)
                if self.closed:
                    return
        except ClusterMismatch as exc:
            self.transport.log_mismatch(self.describe(), str(exc))
            self.close(str(exc))
        except HandshakeError as exc:
            log.warning("refused peer %s: %s", self.describe(), exc)
            self.close(str(exc))
        except (DecodeError, FrameError) as exc:
            what = "closing link with peer" if self.up else "refused peer"
            log.warning("%s %s: bad frame: %s", what, self.describe(), exc)
            self.close(f"bad frame: {exc}")
        except Exception as exc:  # a message the core choked on: drop the link, not the replica
            log.exception("closing link with peer %s: error handling its message",
                          self.describe())
            self.close(f"error handling its message: {exc!r}")

    def authenticated(self) -> None:
        self.up = True
        self.deadline.cancel()
        self.framer.max_payload = MAX_PAYLOAD

    def flush(self) -> None:
        try:
            self.io.flush()
        except ConnectionLost as exc:
            self.close(str(exc))
            return
        if self.io.pending > PEER_OUTPUT_LIMIT:
            self.close(f"peer {self.peer} is {self.io.pending} bytes behind")
            return
        self.update_interest()

    def update_interest(self) -> None:
        mask = READ | (WRITE if self.io.pending else 0)
        self.transport.reactor.set_interest(self.io.sock, mask, self)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline.cancel()
        self.transport.reactor.forget(self.io.sock)
        self.io.close()
        self.transport.dirty.discard(self)
        self.transport.link_closed(self, reason)

    def describe(self) -> str:
        return f"node {self.peer}" if self.peer is not None else "?"

    def tls_note(self) -> str:
        tls = self.io.tls
        return f" ({tls.version()}, {tls.cipher()})" if tls is not None else ""


class OutboundLink(_Link):
    """The link this replica dialled to ``peer``: it sends our messages."""

    def __init__(self, transport: PeerTransport, peer: int, address: Address):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PEER_SNDBUF)
        super().__init__(transport, sock, peer)
        self.address = address
        self.connected = False
        self.initiator = Initiator(transport.secret, transport.me, peer, os.urandom(32),
                                   transport.cluster_id)
        err = sock.connect_ex((address.host, address.port))
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise ConnectionLost(os.strerror(err))
        transport.reactor.set_interest(sock, WRITE, self)

    def handle_event(self, mask: int) -> None:
        if not self.connected:
            err = self.io.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(f"connect to {self.address}: {os.strerror(err)}")
                return
            self.connected = True
            if self.transport.tls is not None:  # the preface and the handshake go inside TLS
                self.io.start_tls(self.transport.tls.peer_endpoint(self.address.host))
            self.io.write(PEER_PREFACE)
            self.send_raw(self.initiator.hello())
            self.flush()
            return
        super().handle_event(mask)

    def update_interest(self) -> None:
        if self.connected:
            super().update_interest()

    def on_handshake(self, msg) -> None:
        proof = self.initiator.on_challenge(msg)
        self.send_raw(proof)
        self.authenticated()
        log.info("link to node %d (%s) is up%s", self.peer, self.address, self.tls_note())
        self.transport.link_up(self)


class InboundLink(_Link):
    """A link a peer dialled to us: it carries that peer's messages once authenticated."""

    def __init__(self, transport: PeerTransport, sock: socket.socket | BufferedSocket, addr):
        super().__init__(transport, sock, None)
        self.addr = addr
        # Any node id proven with the secret and the cluster id is taken: the configuration
        # changes at runtime, and a member added while this replica was away must reach it
        # (its core decides what that node's messages count for).
        self.responder = Responder(transport.secret, transport.me, None,
                                   os.urandom(32), transport.cluster_id)

    def on_handshake(self, msg) -> None:
        if isinstance(msg, PeerHello):
            challenge = self.responder.on_hello(msg)   # raises for a stranger: it stays "?"
            self.peer = msg.initiator
            self.send_raw(challenge)
            self.flush()
        elif isinstance(msg, PeerProof):
            self.peer = self.responder.on_proof(msg)
            self.authenticated()
            self.transport.inbound_up(self)
        else:
            raise HandshakeError(f"unexpected {type(msg).__name__} before authentication")

    def describe(self) -> str:
        return f"{super().describe()} from {self.addr[0]}:{self.addr[1]}"


class PeerTransport:
    """Dials, authenticates and redials peers; delivers their messages to ``on_message``.

    Callbacks: ``on_message(peer, msg)``, ``on_link_change(peer, up)`` (outbound link state;
    a hint only — the replication core's failure detector uses heartbeats).
    """

    def __init__(self, reactor: Reactor, me: int, addresses, secret: bytes, on_message, on_link_change,
                 tls=None, cluster: bytes | None = None):
        self.reactor = reactor
        self.tls = tls  # chatnet.loop.tls.TLSSettings: every link is TLS, or None
        self.me = me
        # node id -> address: a --peers list (ids are positions) or the configuration's map
        self.addresses = dict(addresses) if isinstance(addresses, dict) else dict(enumerate(addresses))
        self.secret = secret
        # the cluster id, minted from the first --peers list (given; or computed, for a list)
        self.cluster_id = cluster if cluster is not None else cluster_id(list(addresses)).encode()
        self.peer_ids = frozenset(i for i in self.addresses if i != me)
        self.on_message = on_message
        self.on_link_change = on_link_change
        self.outbound: dict[int, OutboundLink | None] = {p: None for p in self.peer_ids}
        self.inbound: dict[int, InboundLink] = {}
        self.backoff: dict[int, float] = {p: REDIAL_MIN for p in self.peer_ids}
        self.dirty: set[_Link] = set()
        self.stopped = False
        self._mismatches: dict[str, tuple[float, int]] = {}   # reason -> (last logged, since)

    def start(self) -> None:
        for peer in sorted(self.peer_ids):
            self._dial(peer)

    def stop(self) -> None:
        self.stopped = True
        for link in [*self.outbound.values(), *self.inbound.values()]:
            if link is not None:
                link.close("shutting down")

    def log_mismatch(self, who: str, reason: str) -> None:
        """Log a peer started with another --peers list: the first time at once, then at most
        once per MISMATCH_LOG_INTERVAL with how often it was refused meanwhile."""
        now = time.monotonic()
        last, since = self._mismatches.get(reason, (-MISMATCH_LOG_INTERVAL, 0))
        if now - last < MISMATCH_LOG_INTERVAL:
            self._mismatches[reason] = (last, since + 1)
            log.debug("refused peer %s: %s", who, reason)
            return
        self._mismatches[reason] = (now, 0)
        again = f" [refused {since} more times since the last report]" if since else ""
        log.warning("refused peer %s: %s (ours: --peers %s)%s", who, reason,
                    format_peers(list(self.addresses.values())), again)

    # -- dialling ---------------------------------------------------------------------------
    def set_addresses(self, addresses: dict) -> None:
        """The configuration changed: dial the nodes added, stop dialling the ones removed."""
        addresses = {p: a for p, a in addresses.items()}
        for peer in self.peer_ids - set(addresses):
            link = self.outbound.pop(peer, None)
            if link is not None:
                link.close("removed from the configuration")
        self.addresses = addresses
        self.peer_ids = frozenset(i for i in addresses if i != self.me)
        for peer in sorted(self.peer_ids):
            if peer not in self.outbound:
                self.outbound[peer] = None
                self.backoff[peer] = REDIAL_MIN
                self._dial(peer)

    def _dial(self, peer: int) -> None:
        if self.stopped or self.outbound.get(peer) is not None or peer not in self.peer_ids:
            return
        try:
            self.outbound[peer] = OutboundLink(self, peer, self.addresses[peer])
        except (OSError, ConnectionLost) as exc:
            log.debug("dial node %d failed: %s", peer, exc)
            self._redial_later(peer)

    def _redial_later(self, peer: int) -> None:
        delay = self.backoff[peer]
        self.backoff[peer] = min(REDIAL_MAX, delay * 2)
        self.reactor.timers.call_later(delay, self._dial, peer)

    def link_up(self, link: OutboundLink) -> None:
        self.backoff[link.peer] = REDIAL_MIN
        self.on_link_change(link.peer, True)

    def inbound_up(self, link: InboundLink) -> None:
        old = self.inbound.get(link.peer)
        self.inbound[link.peer] = link
        if old is not None and old is not link:
            old.close("replaced by a newer connection from the same peer")
        log.info("node %d connected to us from %s:%d%s", link.peer, *link.addr[:2], link.tls_note())

    def link_closed(self, link: _Link, reason: str) -> None:
        if isinstance(link, OutboundLink):
            if self.outbound.get(link.peer) is link:
                self.outbound[link.peer] = None
                if link.up:
                    log.info("link to node %d lost: %s", link.peer, reason)
                    self.on_link_change(link.peer, False)
                else:
                    log.debug("link to node %d not established: %s", link.peer, reason)
                if not self.stopped:
                    self._redial_later(link.peer)
        elif link.peer is not None and self.inbound.get(link.peer) is link:
            del self.inbound[link.peer]

    def adopt(self, sock: socket.socket | BufferedSocket, addr, first_bytes: bytes) -> None:
        """Take over a connection whose first bytes were the peer preface (a BufferedSocket
        when the preface came inside TLS: the session goes on)."""
        link = InboundLink(self, sock, addr)
        link.update_interest()
        if first_bytes:
            link.receive(first_bytes)

    # -- messages -----------------------------------------------------------------------------
    def send(self, peer: int, msg) -> bool:
        """Queue ``msg`` on our link to ``peer``; False (dropped) when the link is down.
        A node we do not dial (not in our configuration: added while we were away) is
        answered on the link it dialled to us."""
        link = self.outbound.get(peer)
        if link is None and peer not in self.peer_ids:
            link = self.inbound.get(peer)
        if link is None or not link.up or link.closed:
            return False
        link.send_raw(msg)
        return True

    def deliver(self, peer: int, msg) -> None:
        self.on_message(peer, msg)

    def flush(self) -> None:
        while self.dirty:
            link = self.dirty.pop()
            if not link.closed:
                link.flush()

    def is_up(self, peer: int) -> bool:
        link = self.outbound.get(peer)
        return link is not None and link.up
