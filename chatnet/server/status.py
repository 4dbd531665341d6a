"""Status queries: a public answer for anyone, the full answer only for holders of the secret.

Anyone who can reach a replica's port may ask ``CHATNET-STATUS\\n`` and gets one JSON line with
what a client could learn anyway by connecting: this replica's address, its role, whether it
serves clients, and the primary's address.  Everything else (view, members, log positions, the
state digest, counters) reveals topology and progress, so it takes the cluster secret:

    client -> replica   CHATNET-STATUS-AUTH\\n
    replica -> client   <nonce, 64 hex digits> <cluster id>\\n
    client -> replica   <HMAC-SHA256(K, label | cluster id | nonce), 64 hex digits>\\n
    replica -> client   <the full status as one JSON line>\\n     (or {"error": ...})

``K`` is the cluster secret the peers authenticate with and the cluster id binds the ``--peers``
list, as in the peer handshake (chatnet/replication/handshake.py); a distinct label keeps a
status proof from ever being mistaken for a peer proof.  A fresh nonce per connection defeats
replay.  Sans I/O: the front end moves the lines.
"""

from __future__ import annotations

import hashlib
import hmac
import json

STATUS_LABEL = b"chatnet-status-auth-v1"
MEMBERS_LABEL = b"chatnet-members-auth-v1"  # `chatserver members`: same scheme, its own label
MAX_MEMBERS_LINE = 1024
PUBLIC_FIELDS = ("address", "role", "serving", "primary_address")
MAX_LINE = 256  # bytes of a proof line, newline included, with slack


def status_proof(secret: bytes, cluster_id: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"\x00".join((STATUS_LABEL, cluster_id, nonce)), hashlib.sha256).digest()


def members_proof(secret: bytes, cluster_id: bytes, nonce: bytes, request: bytes) -> bytes:
    """The proof of a membership request binds the request itself: a changed request fails."""
    return hmac.new(secret, b"\x00".join((MEMBERS_LABEL, cluster_id, nonce, request)),
                    hashlib.sha256).digest()


def state_digest(data: bytes) -> str:
    """The ``digest`` of the full status: a SHA-256 prefix of the serialized chat state (taken
    off the loop with a snapshot: chatnet/server/host.py, ``Checkpoints``)."""
    return hashlib.sha256(data).hexdigest()[:16]


def serialized(state, tag: tuple) -> tuple:
    """Serialize ``state`` now: what a snapshot maker hands back, ``(tag, bytes, digest)``
    (the inline maker, the simulator's, a forked child's fallback when fork() fails)."""
    data = state.to_snapshot()
    return tag, data, state_digest(data)


def public_status(status: dict) -> dict:
    """What an unauthenticated query may see."""
    return {key: status.get(key) for key in PUBLIC_FIELDS}


def json_line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class StatusChallenge:
    """The replica's side of one authenticated status query."""

    def __init__(self, secret: bytes | None, cluster_id: bytes, nonce: bytes):
        self.secret, self.cluster_id, self.nonce = secret, cluster_id, nonce
        self.buffer = b""

    def challenge(self) -> bytes:
        """``<nonce hex> <cluster id>``: the cluster id was minted from the first --peers list and
        outlives membership changes, so the operator's tool learns it here."""
        return self.nonce.hex().encode() + b" " + self.cluster_id + b"\n"

    def receive(self, data: bytes) -> bool | None:
        """Feed bytes; None while the proof line is incomplete, then whether it is right."""
        self.buffer += data
        line, sep, _ = self.buffer.partition(b"\n")
        if not sep:
            return False if len(self.buffer) > MAX_LINE or not data else None
        if self.secret is None:
            return False
        try:
            proof = bytes.fromhex(line.strip().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
        return hmac.compare_digest(proof, status_proof(self.secret, self.cluster_id, self.nonce))


class MembersChallenge:
    """The replica's side of one ``chatserver members`` request (chatnet/server/members.py).

    Like a status query, with two differences: the challenge line also names the cluster id
    (``<nonce hex> <cluster id>``: the operator may name just one replica, and the id is no
    longer a function of any --peers list once members change), and the answer line carries
    the request with its proof, ``<proof hex> <request JSON>``, the proof covering it."""

    def __init__(self, secret: bytes | None, cluster_id: bytes, nonce: bytes):
        self.secret, self.cluster_id, self.nonce = secret, cluster_id, nonce
        self.buffer = b""

    def challenge(self) -> bytes:
        return self.nonce.hex().encode() + b" " + self.cluster_id + b"\n"

    def receive(self, data: bytes):
        """Feed bytes; None while the line is incomplete, then the request (a dict) if the
        proof is right, else False."""
        self.buffer += data
        line, sep, _ = self.buffer.partition(b"\n")
        if not sep:
            return False if len(self.buffer) > MAX_MEMBERS_LINE or not data else None
        proof_hex, _, request = line.strip().partition(b" ")
        try:
            proof = bytes.fromhex(proof_hex.decode("ascii"))
            ok = self.secret is not None and hmac.compare_digest(
                proof, members_proof(self.secret, self.cluster_id, self.nonce, request))
            parsed = json.loads(request) if ok else None
        except (UnicodeDecodeError, ValueError):
            return False
        return parsed if isinstance(parsed, dict) else False
