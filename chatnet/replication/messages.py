"""Peer messages of the replication core, their binary codec, and a stream framer.

Rules this module keeps:

* Every message is a frozen dataclass; the core never sees bytes and the reactor never
  sees fields.  ``encode_message(msg) -> bytes`` and ``decode_message(bytes) -> msg`` are
  exact inverses for every well-formed message.
* Wire format (version 1)::

      payload := VERSION(1 byte = 1) TYPE(1 byte) field*
      uint    := LEB128 unsigned varint (at most 10 bytes)
      opt     := uint (0 = None, k+1 = k)
      bool    := one byte, 0 or 1
      bytes   := uint length, then that many bytes
      ids     := uint count, then count uints
      entries := uint count, then per entry: uint index, uint view, bytes data

  Fields are encoded in the order of the dataclass fields; the schema of each message is
  the ``_SCHEMA`` table below, so encoder and decoder cannot drift apart.
* ``decode_message`` raises :class:`DecodeError` (a ``ValueError``) for *any* malformed
  input -- truncated, trailing bytes, unknown version or type, oversized counts -- and
  never any other exception.
* :class:`PeerFramer` turns a byte stream into payloads: each frame is a 4-byte big-endian
  length followed by that many payload bytes; a length above ``max_payload`` raises
  :class:`FrameError` and the connection must be dropped.
* No message has to be large: a snapshot of any size travels as a sequence of bounded
  :class:`InstallSnapshot` chunks (see ``core.Replica.send_snapshot``), so ``MAX_PAYLOAD``
  only bounds what one peer link may make us buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

__all__ = [
    "Entry", "Heartbeat", "Append", "AppendResp", "ViewChange", "Vote", "InstallSnapshot",
    "SnapshotAck", "Reapply", "ReapplyAck", "TakeOver", "PeerHello", "PeerChallenge", "PeerProof",
    "encode_message", "decode_message", "DecodeError", "PeerFramer", "FrameError",
    "frame", "MAX_PAYLOAD", "WIRE_VERSION",
]

# 2: snapshots in chunks (InstallSnapshot.snap_id/offset/total, SnapshotAck) and the cluster
# id in PeerHello.  A replica of version 1 and one of version 2 refuse each other's hello.
# 3: membership changes (InstallSnapshot.config: the configuration at the snapshot point).
WIRE_VERSION = 3
# Far above any message (snapshot chunks are about 256 KiB, Append batches a few hundred
# entries): it only bounds what one authenticated peer link can make us buffer.
MAX_PAYLOAD = 64 * 1024 * 1024
_MAX_COUNT = 1 << 20


class DecodeError(ValueError):
    """A peer payload is not a well-formed message of this version."""


class FrameError(ValueError):
    """A peer stream announced a frame larger than allowed (drop the connection)."""


class Entry(NamedTuple):
    """One log entry.  ``data`` is opaque to the core (an encoded chat command).

    A named tuple (immutable, compared by value, like the frozen dataclasses here): one is
    made per proposed command and per entry decoded, and it costs 40 % of a frozen
    dataclass's construction; being the tuple ``(index, view, data)`` the store writes, it
    goes into a storage batch as it is."""
    index: int
    view: int
    data: bytes


# ----------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Heartbeat:
    """Sent by every replica to every peer every heartbeat interval.

    It is both the failure-detector probe (``inc``/``seq``) and the answer to the peer's
    probes (``echo_inc``/``echo_seq`` = the latest probe received from the addressee), and it
    carries the sender's state summary (used for elections, recovery and ``status``)."""
    inc: int            # sender's incarnation (new after every restart / stall)
    seq: int            # sender's probe number (its tick count)
    echo_inc: int       # addressee's incarnation as last heard (0 = never)
    echo_seq: int       # addressee's probe number as last heard
    promised: int       # highest view the sender has promised
    view: int           # sender's established view
    primary: int | None
    members: tuple[int, ...]
    status: int         # see core.STATUS_CODES
    serving: bool
    last_view: int
    last_index: int
    commit: int


@dataclass(frozen=True)
class Append:
    """Primary -> backup or learner: log entries after (prev_index, prev_view), plus commit."""
    view: int
    prev_index: int
    prev_view: int
    commit: int
    start: int                 # primary's last index when the view was established
    members: tuple[int, ...]
    entries: tuple[Entry, ...]
    echo_inc: int = 0          # addressee's incarnation as last heard by the primary


@dataclass(frozen=True)
class AppendResp:
    """Backup -> primary, sent only after the entries are durable."""
    view: int                  # the view the responder is in (its promised view if it refuses)
    ok: bool
    match: int                 # verified durable prefix (ok) ...
    hint: int                  # ... or where the primary should retry from (not ok)
    need_snapshot: bool


@dataclass(frozen=True)
class ViewChange:
    """Candidate -> members of its view: promise me ``view`` (the candidate's log summary)."""
    view: int
    est_view: int
    last_view: int
    last_index: int
    failover: bool             # True unless the candidate is the primary of its own view


@dataclass(frozen=True)
class Vote:
    view: int
    granted: bool
    promised: int
    est_view: int
    last_view: int
    last_index: int


@dataclass(frozen=True)
class InstallSnapshot:
    """Primary -> lagging replica: one chunk of its applied state up to ``index``.

    The state (opaque bytes, ``total`` long) is cut into chunks so that a state of any size
    fits the frame limit and no link has to buffer all of it at once.  ``data`` is the slice
    at ``offset``; the chunks of one transfer share ``(view, snap_id)`` -- ``snap_id`` grows
    with every transfer the primary starts in its view -- and the receiver installs the
    state only once it holds every byte, received in order."""
    view: int
    index: int
    snap_view: int
    commit: int
    start: int
    members: tuple[int, ...]
    snap_id: int
    offset: int
    total: int
    data: bytes
    echo_inc: int = 0
    force: bool = False        # replace the state even if it looks like the same history
    config: bytes = b""        # the configuration in force at ``index`` (membership.config_to_bytes)
    # The history's entry views up to ``index`` as flat (first index, view) pairs, the latest
    # runs only (core.VIEW_RUNS): lets the receiver tell its compacted entries apart too.
    # Added within version 3 as an optional trailing field: absent = unknown (empty).
    runs: tuple[int, ...] = ()


@dataclass(frozen=True)
class SnapshotAck:
    """Lagging replica -> primary: flow control of a snapshot transfer, not a durability
    promise.  ``received`` is how many bytes of transfer ``snap_id`` it holds in order; the
    primary keeps at most a window of chunks beyond it in flight, and sends again from it
    when it goes down (the receiver lost its partial copy).  The last chunk is answered by
    an ``AppendResp`` instead, sent once the installed snapshot is durable."""
    view: int
    snap_id: int
    received: int


@dataclass(frozen=True)
class Reapply:
    """Replica of a healed split brain's losing side -> the winning side's primary: the log
    entries it holds that the winner's history lacks (its side may have acknowledged them),
    to be proposed again there as new commands (docs/replication.md section 10).  ``view`` is
    the winner's view; ``upto`` the last index handed over; each entry keeps its original
    (index, view), its origin, by which the winner recognises one it already re-applied."""
    view: int
    upto: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class ReapplyAck:
    """Winning primary -> losing replica: every entry of its ``Reapply`` up to ``upto`` has
    been committed again (or found present, or reported as not applicable), so the loser may
    now drop its divergent log."""
    view: int
    upto: int


@dataclass(frozen=True)
class TakeOver:
    """Primary -> the member it hands over to (its own removal was asked for): campaign now.
    Sent once that member holds every entry of the primary, which proposes nothing more, so
    the member wins the votes of all (docs/replication.md section 14)."""
    view: int


@dataclass(frozen=True)
class PeerHello:
    """Peer handshake, step 1 (dialler -> listener); see :mod:`chatnet.replication.handshake`.

    ``cluster_id`` identifies the dialler's ``--peers`` list, so that replicas started with
    different lists refuse each other by name instead of exchanging misaddressed messages."""
    initiator: int
    responder: int
    nonce: bytes
    cluster_id: bytes = b""


@dataclass(frozen=True)
class PeerChallenge:
    """Step 2 (listener -> dialler): the listener's nonce and its own proof."""
    responder: int
    nonce: bytes
    proof: bytes


@dataclass(frozen=True)
class PeerProof:
    """Step 3 (dialler -> listener): the dialler's proof."""
    proof: bytes


# kind letters: u uint, o optional uint, b bool, B bytes, I ids, E entries
_SCHEMA: dict[type, tuple[int, str]] = {
    Heartbeat: (1, "uuuuuuoIubuuu"),
    Append: (2, "uuuuuIEu"),
    AppendResp: (3, "ubuub"),
    ViewChange: (4, "uuuub"),
    Vote: (5, "ubuuuu"),
    InstallSnapshot: (6, "uuuuuIuuuBubBI"),
    SnapshotAck: (7, "uuu"),
    Reapply: (8, "uuE"),       # added within version 2: an older replica closes the link
    ReapplyAck: (9, "uu"),     # on receiving one (only sent while a split brain heals)
    TakeOver: (10, "u"),
    PeerHello: (16, "uuBB"),
    PeerChallenge: (17, "uBB"),
    PeerProof: (18, "B"),
}
# Trailing fields a payload may omit (added within a version; their defaults apply).
_OPTIONAL_TAIL = {InstallSnapshot: 1}
_BY_CODE = {code: (cls, kinds) for cls, (code, kinds) in _SCHEMA.items()}
for _cls, (_code, _kinds) in _SCHEMA.items():
    assert len(_kinds) == len(fields(_cls)), _cls


def _put_uint(out: bytearray, n: int) -> None:
    if type(n) is int and 0 <= n < 0x80:  # one byte: most views, counts and lengths
        out.append(n)
        return
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n >= 1 << 64:
        raise ValueError(f"not an unsigned 64-bit integer: {n!r}")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _put_bytes(out: bytearray, b: bytes) -> None:
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise ValueError("bytes expected")
    _put_uint(out, len(b))
    out += b


def encode_message(msg: Any) -> bytes:
    """Encode one message (raises ValueError for a value the format cannot carry)."""
    try:
        code, kinds = _SCHEMA[type(msg)]
    except KeyError:
        raise ValueError(f"not a replication message: {type(msg).__name__}") from None
    out = bytearray((WIRE_VERSION, code))
    for kind, f in zip(kinds, fields(msg)):
        v = getattr(msg, f.name)
        if kind == "u":
            _put_uint(out, v)
        elif kind == "o":
            _put_uint(out, 0 if v is None else v + 1)
        elif kind == "b":
            out.append(1 if v else 0)
        elif kind == "B":
            _put_bytes(out, v)
        elif kind == "I":
            _put_uint(out, len(v))
            for x in v:
                _put_uint(out, x)
        else:  # "E"
            _put_uint(out, len(v))
            for e in v:
                _put_uint(out, e.index)
                _put_uint(out, e.view)
                _put_bytes(out, e.data)
    return bytes(out)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def uint(self) -> int:
        pos, buf = self.pos, self.buf
        if pos < len(buf) and buf[pos] < 0x80:  # one byte: most views, counts and lengths
            self.pos = pos + 1
            return buf[pos]
        n = shift = 0
        while True:
            if self.pos >= len(buf):
                raise DecodeError("truncated integer")
            b = buf[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 64:
                raise DecodeError("integer too long")
        if n >= 1 << 64:
            raise DecodeError("integer too large")
        return n

    def count(self) -> int:
        n = self.uint()
        if n > _MAX_COUNT or n > len(self.buf) - self.pos:
            raise DecodeError("count too large")
        return n

    def raw(self) -> bytes:
        n = self.uint()
        if n > len(self.buf) - self.pos:
            raise DecodeError("truncated bytes")
        b = self.buf[self.pos:self.pos + n]  # buf is bytes (_decode): a slice is bytes
        self.pos += n
        return b

    def boolean(self) -> bool:
        if self.pos >= len(self.buf):
            raise DecodeError("truncated bool")
        b = self.buf[self.pos]
        self.pos += 1
        if b > 1:
            raise DecodeError("bad bool")
        return b == 1


def decode_message(payload: bytes) -> Any:
    """Decode one payload; raises :class:`DecodeError` and nothing else on bad input."""
    try:
        return _decode(payload)
    except DecodeError:
        raise
    except Exception as exc:  # defensive: any surprise is a decode error, never a crash
        raise DecodeError(f"malformed message: {exc!r}") from None


def _decode(payload: bytes) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError("payload must be bytes")
    payload = bytes(payload)
    if len(payload) < 2:
        raise DecodeError("payload too short")
    if payload[0] != WIRE_VERSION:
        raise DecodeError(f"unsupported version {payload[0]}")
    try:
        cls, kinds = _BY_CODE[payload[1]]
    except KeyError:
        raise DecodeError(f"unknown message type {payload[1]}") from None
    r = _Reader(payload)
    r.pos = 2
    values: list[Any] = []
    required = len(kinds) - _OPTIONAL_TAIL.get(cls, 0)
    for kind in kinds:
        if len(values) >= required and r.pos == len(payload):
            break  # an optional trailing field left out (a sender that predates it)
        if kind == "u":
            values.append(r.uint())
        elif kind == "o":
            v = r.uint()
            values.append(None if v == 0 else v - 1)
        elif kind == "b":
            values.append(r.boolean())
        elif kind == "B":
            values.append(r.raw())
        elif kind == "I":
            values.append(tuple(r.uint() for _ in range(r.count())))
        else:
            n = r.count()
            uint, raw = r.uint, r.raw
            values.append(tuple([Entry(uint(), uint(), raw()) for _ in range(n)]))
    if r.pos != len(payload):
        raise DecodeError("trailing bytes")
    return cls(*values)


# ----------------------------------------------------------------------------- framing

_LEN = struct.Struct(">I")


def frame(payload: bytes, max_payload: int = MAX_PAYLOAD) -> bytes:
    """One frame: 4-byte big-endian length, then the payload."""
    if len(payload) > max_payload:
        raise FrameError(f"payload of {len(payload)} bytes exceeds {max_payload}")
    return _LEN.pack(len(payload)) + payload


class PeerFramer:
    """Incremental decoder of length-prefixed frames (sans I/O).

    ``feed(data)`` returns the list of complete payloads now available (possibly empty);
    partial frames are kept.  A frame header above ``max_payload`` raises FrameError, after
    which the framer stays broken (every later ``feed`` raises too): drop the connection."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._broken: FrameError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken is not None:
            raise self._broken
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > self.max_payload:
                self._broken = FrameError(f"frame of {n} bytes exceeds {self.max_payload}")
                raise self._broken
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
