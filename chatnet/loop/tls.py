"""TLS as a sans-I/O layer: ciphertext in, plaintext out, and the other way round.

:class:`TLSEndpoint` wraps one connection's bytes with an ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` buffers, so TLS never touches a socket and never blocks: the reactor (or the
client's driver) reads ciphertext from the socket, hands it to :meth:`TLSEndpoint.receive` and
gets back the plaintext it carried; it encrypts with :meth:`TLSEndpoint.send` and writes the
ciphertext it gets back.  The handshake advances a little each time ciphertext arrives; the
records it wants sent (ServerHello, session tickets, alerts) wait in :meth:`data_to_send`.
A failure — a bad record, a certificate that does not verify, an alert from the other side — is
reported as one :class:`TLSError` with the reason and recorded in :attr:`error`; the caller
closes the connection (after sending :meth:`data_to_send`, which may hold the alert telling
the other side why).

The contexts are made here too, so server, peers, client and tests agree on the settings:
TLS 1.2 at least, certificates always verified by a client (with host name or IP address
checks against the certificate's subject alternative names).
"""

from __future__ import annotations

import ssl

__all__ = ["TLSEndpoint", "TLSError", "TLSSettings", "TLS_HANDSHAKE_BYTE", "server_context", "client_context",
           "looks_like_tls"]

TLS_HANDSHAKE_BYTE = 0x16  # the first byte of every TLS ClientHello record (content type 22)
_READ_SIZE = 65536


class TLSError(Exception):
    """The TLS session failed (handshake or record); the connection must be closed."""


def looks_like_tls(first: bytes) -> bool:
    """Whether a connection's first bytes start a TLS handshake record.  No request of the
    seed protocol (an ASCII digit, white space) and no preface (``CHATNET-``) starts with
    0x16, so one byte tells TLS from plaintext."""
    return bool(first) and first[0] == TLS_HANDSHAKE_BYTE


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """The context a replica serves TLS with (clients and inbound peer links).  Raises
    ``OSError``/``ssl.SSLError`` for a missing or unreadable certificate or key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """The context a client (or a replica dialling a peer) verifies servers with: the CA
    certificates of ``cafile``, or the system's trust store when None.  The host name (or IP
    address) dialled must be in the server certificate."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TLSEndpoint:
    """One side of one TLS connection, without I/O.

    ``server_hostname`` (client side) is what the certificate must name.  A client endpoint
    has its ClientHello ready in :meth:`data_to_send` as soon as it is made.
    """

    def __init__(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self.established = False  # the handshake completed: application data may flow
        self.peer_closed = False  # the other side sent close_notify (or its stream ended)
        self.error: str | None = None
        self._closing = False
        if not server_side:
            self._handshake()

    # -- bytes in ------------------------------------------------------------------------------
    def receive(self, ciphertext: bytes) -> bytes:
        """Feed ciphertext from the network; return the plaintext it completed (often b"",
        e.g. during the handshake).  Raises :class:`TLSError` when the session fails."""
        if self.error is not None:
            raise TLSError(self.error)
        if ciphertext:
            self._incoming.write(ciphertext)
        if not self.established and not self._handshake():
            return b""
        return self._read_all()

    def receive_eof(self) -> None:
        """The transport ended (no close_notify): nothing more will arrive."""
        self._incoming.write_eof()
        self.peer_closed = True

    # -- bytes out -----------------------------------------------------------------------------
    def send(self, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` (the handshake must be complete); return every ciphertext byte
        now due, in order (records of earlier calls not yet taken included)."""
        if self.error is not None:
            raise TLSError(self.error)
        if not self.established:
            raise TLSError("application data before the handshake completed")
        if plaintext:
            try:
                self._obj.write(plaintext)
            except ssl.SSLError as exc:
                raise self._fail(exc) from exc
        return self._outgoing.read()

    def data_to_send(self) -> bytes:
        """Ciphertext the session produced on its own (handshake records, alerts, tickets)."""
        return self._outgoing.read()

    def close(self) -> bytes:
        """Start a clean shutdown: the close_notify alert to send (b"" if none is due)."""
        if self.established and self.error is None and not self._closing:
            self._closing = True
            try:
                self._obj.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass  # we do not wait for the other side's close_notify
        return self._outgoing.read()

    # -- what the session is -------------------------------------------------------------------
    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> str | None:
        found = self._obj.cipher()
        return found[0] if found else None

    # -- internals -----------------------------------------------------------------------------
    def _handshake(self) -> bool:
        """Advance the handshake with the bytes received so far; True once it completed."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            if self.peer_closed:
                raise self._fail(TLSError("connection closed during the TLS handshake")) from None
            return False
        except ssl.SSLError as exc:
            raise self._fail(exc) from exc
        self.established = True
        return True

    def _read_all(self) -> bytes:
        """Every byte of plaintext the records received so far carry (none stays inside the
        SSLObject, so readiness of the socket is all the caller needs to watch)."""
        chunks = []
        while True:
            try:
                chunk = self._obj.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLError as exc:
                if chunks:  # hand over what came before the failure; it fails next time
                    self.error = _describe(exc)
                    break
                raise self._fail(exc) from exc
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _fail(self, exc: Exception) -> TLSError:
        self.error = _describe(exc)
        return TLSError(self.error)


def _describe(exc: Exception) -> str:
    """A one-line reason: OpenSSL's (``certificate verify failed: ...``) without the noise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class TLSSettings:
    """A replica's TLS configuration (``chatserver --tls-cert/--tls-key/--tls-ca/--require-tls``).

    ``server`` serves clients and inbound peer links; ``peer`` verifies the replicas this one
    dials (their certificates must name the address of their ``--peers`` entry); ``require``
    refuses plaintext clients.  Peer links are TLS only whenever TLS is configured (a replica
    with TLS never dials in plaintext and refuses a plaintext peer)."""

    def __init__(self, certfile: str, keyfile: str | None = None, cafile: str | None = None,
                 require: bool = False):
        self.server = server_context(certfile, keyfile)
        self.peer = client_context(cafile)
        self.require = require

    def server_endpoint(self) -> TLSEndpoint:
        return TLSEndpoint(self.server, server_side=True)

    def peer_endpoint(self, host: str) -> TLSEndpoint:
        return TLSEndpoint(self.peer, server_side=False, server_hostname=host)
