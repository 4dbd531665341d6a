"""Mutual peer authentication: HMAC-SHA256 challenge-response (sans I/O).

A peer connection is authenticated once, before the reactor hands anything it carries to
the replication core; a connection is either an authenticated peer or a client, never both.

Exchange (``I`` dials, ``R`` listens; ``K`` = cluster secret; nonces come from the host,
``os.urandom(32)``, one fresh pair per connection)::

    I -> R  PeerHello(initiator=i, responder=r, nonce=nI, cluster_id=C)
    R -> I  PeerChallenge(responder=r, nonce=nR, proof=HMAC(K, "responder" | C | i | r | nI | nR))
    I -> R  PeerProof(proof=HMAC(K, "initiator" | C | i | r | nI | nR))

* Both proofs bind both node ids and both nonces, so an answer recorded on another
  connection (replay) or for another pair of nodes fails.
* The two proofs use different role labels, so a responder's proof reflected back as an
  initiator proof fails.
* ``I`` checks ``R``'s proof before it reveals its own, and ``R`` acts on nothing ``I`` sends
  until ``I``'s proof checked out; every comparison uses ``hmac.compare_digest``.
* ``C`` is the cluster id, a digest of the ordered ``--peers`` list (node ids are positions
  in that list, so two replicas with different lists would mean different nodes by the same
  id).  ``R`` refuses a hello with another id at once, saying so; and since both proofs bind
  each side's own id, a hello whose id was altered in transit fails the proofs.

It authenticates the *start* of a TCP connection only; later frames carry no MAC.  An
attacker who can inject into an established TCP stream is outside the fault model (see
docs/replication.md); run peers over a trusted network or a tunnel.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from .messages import PeerChallenge, PeerHello, PeerProof

__all__ = ["HandshakeError", "ClusterMismatch", "Initiator", "Responder", "compute_proof",
           "MIN_NONCE", "MAX_NONCE"]

MIN_NONCE = 16
MAX_NONCE = 64
_LABEL = b"chatnet-peer-auth-v1"


class HandshakeError(Exception):
    """The peer failed authentication (log it and close the connection)."""


class ClusterMismatch(HandshakeError):
    """The peer was started with another ``--peers`` list (an operator's mistake, not an
    attack as far as we can tell: the message names both cluster ids)."""


def compute_proof(secret: bytes, role: str, initiator: int, responder: int,
                  nonce_i: bytes, nonce_r: bytes, cluster_id: bytes = b"") -> bytes:
    """HMAC-SHA256 over an unambiguous encoding of (label, role, cluster id, ids, nonces)."""
    if role not in ("initiator", "responder"):
        raise ValueError(role)
    msg = b"".join((
        _LABEL, b"\x00", role.encode(), b"\x00",
        struct.pack(">H", len(cluster_id)), cluster_id,
        struct.pack(">QQ", initiator, responder),
        struct.pack(">H", len(nonce_i)), nonce_i,
        struct.pack(">H", len(nonce_r)), nonce_r,
    ))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def _check_nonce(nonce: bytes) -> None:
    if not (MIN_NONCE <= len(nonce) <= MAX_NONCE):
        raise HandshakeError("bad nonce length")


class Initiator:
    """The dialling side.  ``hello()`` -> send; ``on_challenge(msg)`` -> send the returned
    proof; the peer is then authenticated (``self.peer``)."""

    def __init__(self, secret: bytes, me: int, peer: int, nonce: bytes,
                 cluster_id: bytes = b"") -> None:
        if not secret:
            raise ValueError("empty secret")
        _check_nonce(nonce)
        self.secret, self.me, self.peer, self.nonce = secret, me, peer, nonce
        self.cluster_id = bytes(cluster_id)
        self.done = False
        self._sent = False

    def hello(self) -> PeerHello:
        self._sent = True
        return PeerHello(self.me, self.peer, self.nonce, self.cluster_id)

    def on_challenge(self, msg: object) -> PeerProof:
        if not self._sent or self.done or not isinstance(msg, PeerChallenge):
            raise HandshakeError("unexpected handshake message")
        if msg.responder != self.peer:
            raise HandshakeError(f"expected node {self.peer}, got {msg.responder}")
        _check_nonce(msg.nonce)
        want = compute_proof(self.secret, "responder", self.me, self.peer, self.nonce, msg.nonce,
                             self.cluster_id)
        if not hmac.compare_digest(want, msg.proof):
            raise HandshakeError(f"node {self.peer} does not know the cluster secret "
                                 f"(or was started with another --peers list)")
        self.done = True
        return PeerProof(compute_proof(self.secret, "initiator", self.me, self.peer,
                                       self.nonce, msg.nonce, self.cluster_id))


class Responder:
    """The listening side.  ``on_hello(msg)`` -> send the challenge; ``on_proof(msg)`` returns
    the authenticated peer id (or raises HandshakeError)."""

    def __init__(self, secret: bytes, me: int, known: "set[int] | frozenset[int] | tuple[int, ...] | None",
                 nonce: bytes, cluster_id: bytes = b"") -> None:
        if not secret:
            raise ValueError("empty secret")
        _check_nonce(nonce)
        # known None: any node id (the configuration changes at runtime; the proofs and the
        # cluster id still decide who is a peer)
        self.secret, self.me, self.nonce = secret, me, nonce
        self.known = None if known is None else frozenset(known)
        self.cluster_id = bytes(cluster_id)
        self.peer: int | None = None
        self.done = False
        self._hello: PeerHello | None = None

    def on_hello(self, msg: object) -> PeerChallenge:
        if self._hello is not None or not isinstance(msg, PeerHello):
            raise HandshakeError("unexpected handshake message")
        if msg.cluster_id != self.cluster_id:
            # checked first: with another --peers list, the ids below mean other nodes
            raise ClusterMismatch(
                f"peer claiming to be node {msg.initiator} was started with another --peers "
                f"list (its cluster id {_show(msg.cluster_id)}, ours {_show(self.cluster_id)}); "
                f"give every replica the same --peers, in the same order")
        if msg.responder != self.me:
            raise HandshakeError(f"hello addressed to node {msg.responder}, I am {self.me}")
        if msg.initiator == self.me or (self.known is not None and msg.initiator not in self.known):
            raise HandshakeError(f"unknown peer id {msg.initiator}")
        _check_nonce(msg.nonce)
        self._hello = msg
        return PeerChallenge(self.me, self.nonce, compute_proof(
            self.secret, "responder", msg.initiator, self.me, msg.nonce, self.nonce,
            self.cluster_id))

    def on_proof(self, msg: object) -> int:
        if self._hello is None or self.done or not isinstance(msg, PeerProof):
            raise HandshakeError("unexpected handshake message")
        h = self._hello
        want = compute_proof(self.secret, "initiator", h.initiator, self.me, h.nonce, self.nonce,
                             self.cluster_id)
        if not hmac.compare_digest(want, msg.proof):
            raise HandshakeError(f"peer claiming to be node {h.initiator} failed the challenge")
        self.done = True
        self.peer = h.initiator
        return h.initiator


def _show(cluster_id: bytes) -> str:
    """A cluster id for a log line (it is ASCII hex when it comes from config.cluster_id)."""
    if not cluster_id:
        return "(none)"
    text = cluster_id.decode("ascii", "replace")
    return text if text.isprintable() and len(text) <= 64 else cluster_id[:32].hex()
