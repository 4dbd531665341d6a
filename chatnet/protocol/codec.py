"""Sans-I/O wire codec for the CS262 chat protocol (bytes in, events out).

Like h11, this module never touches a socket or a clock: the caller feeds it whatever
``recv()`` returned and pulls parsed events out.  Keeping framing and parsing pure makes
every corner of the protocol testable with plain byte strings (and with hypothesis), and
lets the server, the client and the replication layer share one implementation.

Two directions, two asymmetric formats (see docs/protocol.md for the full spec):

* Requests (client -> server) are UTF-8 text ``op|params``.  The seed reference client
  sent one request per write with *no terminator*, while our own clients frame requests
  with ``\\n`` so that they survive TCP coalescing/splitting.  A connection therefore
  starts in *seed mode* (one ``recv()`` chunk = one request) and switches for good to
  *line mode* at the first newline it sees.  :class:`RequestDecoder` never raises:
  anything a client can send turns into a :class:`Request` or a :class:`BadRequest`
  whose text the server answers verbatim.
* Responses (server -> client) are frames ``chr(L) chr(status) '0'|'1' message``,
  UTF-8 encoded, where ``L`` is the message size in bytes.  Because the header is made
  of *characters*, its byte size varies (3 bytes while L < 128, more above), so
  :class:`ResponseDecoder` decodes the header incrementally from arbitrary chunks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from .texts import INVALID_REQUEST_TEXT, NOT_UTF8_TEXT, TOO_LONG_TEXT  # noqa: F401 (re-exported)

__all__ = [
    "MAX_REQUEST_CHARS", "MAX_FRAME_BYTES",
    "STATUS_OK", "STATUS_ERROR", "STATUS_NOTE", "INDICATOR_SERVER", "INDICATOR_CHAT",
    "INVALID_REQUEST_TEXT", "TOO_LONG_TEXT", "NOT_UTF8_TEXT",
    "NEED_DATA", "CLOSED", "Request", "BadRequest", "RequestDecoder",
    "parse_request", "parse_number", "encode_request",
    "Frame", "encode_frame", "encode_response", "ProtocolError", "ResponseDecoder",
    "decode_frames",
]

MAX_REQUEST_CHARS = 280
# chr(L) must be encodable: chr(0xD800)..chr(0xDFFF) are surrogates, which UTF-8 forbids.
# Staying below them also keeps the length character at most 3 bytes long.
MAX_FRAME_BYTES = 0xD7FF

STATUS_OK, STATUS_ERROR, STATUS_NOTE = 0, 1, 2
INDICATOR_SERVER, INDICATOR_CHAT = 0, 1


class _Sentinel:
    """A named singleton marker (like h11.NEED_DATA): compare with ``is``."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # no complete event yet: call receive_data() again
CLOSED = _Sentinel("CLOSED")        # the peer sent EOF and every buffered event was returned


# --------------------------------------------------------------------------- requests


class Request(NamedTuple):
    """A syntactically valid request.  ``args`` are already stripped; semantic checks
    (does the user exist, is the name acceptable...) belong to the chat layer.

    A named tuple, not a frozen dataclass: one is made per request, and a frozen dataclass's
    ``__init__`` costs about three times as much (docs/benchmarks.md, the hot path)."""

    op: int
    args: tuple[str, ...]


class BadRequest(NamedTuple):
    """A request the codec rejected; ``text`` is the answer the server sends back
    (status 1, indicator 0).  The connection stays usable after it."""

    text: str


_INVALID = BadRequest(INVALID_REQUEST_TEXT)
_TOO_LONG = BadRequest(TOO_LONG_TEXT)
_NOT_UTF8 = BadRequest(NOT_UTF8_TEXT)
_OPS = {str(op): op for op in range(0, 8)}  # exact ASCII digits: int() would accept "٣" or "+3"


def parse_request(text: str) -> Request | BadRequest:
    """Parse the text of one request (already decoded, terminator removed).

    Only syntax is checked here; the length limit is a framing rule and is enforced by
    :class:`RequestDecoder`.  Parameter rules follow the seed reference server: fields
    are stripped, and free text (usernames for ops 1/2, the message of op 3) keeps any
    ``|`` it contains because it is everything after the separator.
    """
    op_text, sep, rest = text.partition("|")
    op = _OPS.get(op_text.strip())
    if op == 3:                                        # send: recipient | text (the common one)
        recipient, sep2, message = rest.partition("|")
        if not sep2:
            return _INVALID
        return Request(op, (recipient.strip(), message.strip()))
    if op is None:
        return _INVALID
    if op in (1, 2):                                   # create / login: username
        return Request(op, (rest.strip(),))
    if op == 4:                                        # list: fnmatch pattern
        return Request(op, (rest.strip() or "*",))
    if op in (5, 6):                                   # delete / exit: params ignored
        return Request(op, ())
    # op 0 (extension control) and op 7 (resume): hand every field to the layer that
    # implements them (the chat service; see "Extension 1" in docs/protocol.md).  The text of
    # `0|send|RID|RECIPIENT|TEXT` is, like op 3's, everything after its separator.
    if op == 0 and rest.partition("|")[0].strip() == "send":
        fields = rest.split("|", 3)
        if len(fields) == 4:
            return Request(op, tuple(field.strip() for field in fields))
    return Request(op, tuple(field.strip() for field in rest.split("|")) if sep else ())


def parse_number(text: str) -> int | None:
    """A numeric field of a request (a sequence number, a list cursor): ASCII digits only.

    ``str.isdigit()`` is also true for "²" or "٣", which ``int()`` rejects or reads as a digit
    of another script, so a client could crash or confuse the server with them; and ``int()``
    alone accepts "+3", " 3" and "3_0".  A request is at most 280 characters, far below
    Python's 4,300-digit conversion limit, so ``int()`` of what passes cannot raise.
    """
    if text.isascii() and text.isdigit():
        return int(text)
    return None


def encode_request(op: int, *params: str) -> bytes:
    """Client side: ``b"op|p1|p2\\n"``.  Always newline-framed (line mode).

    Raises ValueError for an op outside 0..7 or a parameter containing a newline, since
    either would be misread by the server.  The 280-character limit is *not* checked
    here: the server answers TOO_LONG_TEXT, and interactive clients check
    MAX_REQUEST_CHARS themselves to refuse before sending, as the seed client did.
    """
    if op not in range(0, 8):
        raise ValueError(f"unknown operation {op!r}")
    if any("\n" in p for p in params):
        raise ValueError("request parameters cannot contain a newline")
    return "|".join((str(op), *params)).encode("utf-8") + b"\n"


class RequestDecoder:
    """Server side: turns the bytes of one client connection into Request / BadRequest
    events.

    Framing (why: stay compatible with the seed client, which sends one request per
    write and no terminator, while letting our clients pipeline safely):

    * seed mode (initial): a ``receive_data`` chunk without a newline is one request;
    * the first newline ever seen switches to line mode for good: requests end at
      ``\\n`` and a partial line waits for more bytes;
    * in both modes one trailing ``\\r`` is dropped (CRLF clients such as telnet);
    * blank lines (and blank seed chunks) are ignored, so a client can declare line mode
      by sending a bare ``\\n``.

    Work and memory are bounded: in line mode ``receive_data`` only appends to a buffer and
    ``next_event`` cuts and parses one line at a time, so a 64 KiB read of ``4\n`` repeated is
    not 32,768 requests decoded at once — the caller decodes as many as it is willing to handle
    (the server: ``MAX_PIPELINED`` per pass) and stops reading while ``buffered_bytes()`` is over
    its input bound, so TCP pushes back.  Once ``next_event`` has returned NEED_DATA, a partial
    line holds at most ``max_chars * 4 + 2 + ENVELOPE_ALLOWANCE`` bytes (280 characters of up
    to 4 UTF-8 bytes each, plus ``\r``, plus room for an extension send's envelope); a longer
    line is reported once as too long and the rest of it is discarded as it arrives.  The same
    byte bound is applied to complete lines, so the events of a line mode connection do not
    depend on how TCP chunked it.

    Seed mode depends on chunk boundaries, so a seed-mode chunk becomes its event in
    ``receive_data``; it is one event per read, never more.
    """

    def __init__(self, max_chars: int = MAX_REQUEST_CHARS) -> None:
        self._max_chars = max_chars
        # + room for an extension envelope (`0|send|RID|` instead of `3|`), see _envelope()
        self._max_bytes = max_chars * 4 + 2 + ENVELOPE_ALLOWANCE
        self._line_mode = False
        self._raw = bytearray()       # line mode: bytes not yet cut into lines
        self._discarding = False      # line mode: skipping the tail of an over-long line
        self._events: deque[Request | BadRequest] = deque()
        self._eof = False

    @property
    def line_mode(self) -> bool:
        """True once a newline has been seen on this connection (it never goes back)."""
        return self._line_mode

    def pending_events(self) -> int:
        """Requests already decoded and not yet taken by ``next_event`` (at most one seed chunk
        or one bad line in practice: line mode decodes on demand)."""
        return len(self._events)

    def has_input(self) -> bool:
        """Whether ``next_event`` may return anything but NEED_DATA: bytes or events buffered,
        or the end of the stream to report.  The server skips a connection without any."""
        return bool(self._events or self._raw or self._eof)

    def buffered_bytes(self) -> int:
        """Bytes received and not yet decoded; after ``next_event`` returned NEED_DATA, never
        more than ``max_chars * 4 + 2 + ENVELOPE_ALLOWANCE``."""
        return len(self._raw)

    def receive_data(self, data: bytes) -> None:
        """Feed the result of one ``recv()``; ``b""`` means EOF.

        Data after EOF is ignored.  An unterminated line still pending at EOF in line
        mode is dropped: the client declared newline framing, so those bytes are a
        request cut short (e.g. a truncated chat text), not one to execute.
        """
        if self._eof:
            return
        if not data:
            self._eof = True
            return
        if not self._line_mode:
            if b"\n" not in data:
                event = self._complete(bytes(data))   # seed mode: the whole chunk is a request
                if event is not None:
                    self._events.append(event)
                return
            self._line_mode = True
        self._raw += data

    def next_event(self) -> Request | BadRequest | _Sentinel:
        """Return the next Request / BadRequest, else NEED_DATA (or CLOSED after EOF)."""
        if self._events:
            return self._events.popleft()
        while self._raw:
            event = self._cut_line()
            if event is NEED_DATA:
                break
            if event is not None:
                return event
        if self._eof:
            self._raw.clear()  # a line cut short by EOF is not a request
            self._discarding = False
            return CLOSED
        return NEED_DATA

    def _cut_line(self) -> Request | BadRequest | _Sentinel | None:
        """Decode the next line of the buffer: its event, None for a line that makes none
        (blank, or the tail of an over-long one), NEED_DATA when no line is complete."""
        raw = self._raw
        newline = raw.find(b"\n")
        if newline < 0:
            if len(raw) > self._max_bytes:
                raw.clear()
                if not self._discarding:
                    self._discarding = True
                    return _TOO_LONG
            return NEED_DATA
        line = raw[:newline]
        del raw[:newline + 1]
        if self._discarding:                  # the newline ends the over-long line
            self._discarding = False
            return None
        return self._complete(line)

    def _complete(self, raw: bytes | bytearray) -> Request | BadRequest | None:
        """Turn one complete request's bytes into an event (None if blank).

        Order matters: the byte bound first, on the same bytes the partial-line check
        measures (so results do not depend on chunking, and a flood is never decoded),
        then the trailing ``\r``, UTF-8, blank lines, and the character count.
        """
        if len(raw) > self._max_bytes:
            return _TOO_LONG
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _NOT_UTF8
        if not text or text.isspace():  # what strip() would empty: a blank line
            return None
        if len(text) > self._max_chars and len(text) - _envelope(text) > self._max_chars:
            return _TOO_LONG
        return parse_request(text)


ENVELOPE_ALLOWANCE = 64  # bytes: "0|send|" + a 32-character request id + "|" - "3|", with slack


def _envelope(text: str) -> int:
    """Characters of an extension send's envelope beyond op 3's: the 280-character limit
    applies to the equivalent `3|RECIPIENT|TEXT`, so a request id never makes a chat that
    the seed would accept too long."""
    if not text.startswith("0|send|"):
        return 0
    fields = text.split("|", 3)
    if len(fields) < 4 or len(fields[2]) > 32:
        return 0
    return len("0|send|") + len(fields[2]) + 1 - len("3|")


# -------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Frame:
    """One response frame.  For indicator 1 (chat) the message is ``sender|text``."""

    status: int
    indicator: int
    message: str


class ProtocolError(Exception):
    """The server sent bytes that are not a valid response frame."""


# Headers of messages under 128 bytes (one byte of length), by (status, indicator): every
# answer and chat frame of the hot path is one of these, so it is a table look-up rather than
# building and encoding a three-character string per frame.
_SHORT_HEADERS = {(status, indicator): [bytes((n, status, 0x30 + indicator)) for n in range(128)]
                  for status in (STATUS_OK, STATUS_ERROR, STATUS_NOTE)
                  for indicator in (INDICATOR_SERVER, INDICATOR_CHAT)}


def _frame(status: int, indicator: int, payload: bytes) -> bytes:
    headers = _SHORT_HEADERS.get((status, indicator))
    if headers is not None and len(payload) < 128:
        return headers[len(payload)] + payload
    if status not in (STATUS_OK, STATUS_ERROR, STATUS_NOTE):
        raise ValueError(f"status must be 0, 1 or 2, not {status!r}")
    if indicator not in (INDICATOR_SERVER, INDICATOR_CHAT):
        raise ValueError(f"indicator must be 0 or 1, not {indicator!r}")
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"message of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    header = chr(len(payload)) + chr(status) + ("1" if indicator else "0")
    return header.encode("utf-8") + payload


def encode_frame(status: int, indicator: int, message: str) -> bytes:
    """Encode one frame: UTF-8 of ``chr(L) + chr(status) + "0"/"1" + message``.

    ``L`` is the message size in *bytes* (the seed spec; the reference counted
    characters, which only agrees for ASCII).  ValueError if ``L > MAX_FRAME_BYTES``
    (use :func:`encode_response` for long texts) or status/indicator are out of range.
    """
    return _frame(status, indicator, message.encode("utf-8"))


def encode_response(status: int, indicator: int, message: str) -> bytes:
    """Encode a message of any length as one or more frames with the same header values.

    Long ``list`` answers can exceed what one length character can express.  Each cut is
    made right after the last ``\\n`` that fits, so that a client printing frames as they
    arrive never splits a ``- name`` line; without a newline in range the cut falls on a
    character boundary.  The frames' messages concatenate to ``message`` exactly.
    """
    data = message.encode("utf-8")
    frames = []
    start = 0
    while len(data) - start > MAX_FRAME_BYTES:
        limit = start + MAX_FRAME_BYTES
        cut = data.rfind(b"\n", start, limit) + 1
        if cut == 0:
            cut = limit
            while data[cut] & 0xC0 == 0x80:   # back off UTF-8 continuation bytes
                cut -= 1
        frames.append(_frame(status, indicator, data[start:cut]))
        start = cut
    frames.append(_frame(status, indicator, data[start:]))
    return b"".join(frames)


def _char_size(lead: int) -> int:
    """Byte size of the UTF-8 character starting with ``lead`` (0 if not a lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


class ResponseDecoder:
    """Client side: incremental decoder of response frames from arbitrary byte chunks.

    The header is read as *characters*: the length character takes 1 to 4 bytes, and a
    chunk may end anywhere (inside it, inside the header or inside the message).  Lengths
    are accepted up to any valid code point except surrogates, to be liberal with
    servers that send frames bigger than we ever do.  After a ProtocolError the byte
    stream cannot be resynchronised (no frame marker), so the decoder stays broken and
    every later call raises: the client must drop the connection.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: str | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes.  ``b""`` (EOF) is accepted and changes nothing."""
        self._raise_if_broken()
        self._buf += data

    def next_event(self) -> Frame | _Sentinel:
        """Return the next complete Frame, or NEED_DATA; raise ProtocolError if bad."""
        self._raise_if_broken()
        buf = self._buf
        if not buf:
            return NEED_DATA
        size = _char_size(buf[0])
        if size == 0:
            self._fail(f"invalid UTF-8 lead byte 0x{buf[0]:02x} in frame length")
        if len(buf) < size:
            return NEED_DATA
        try:
            length = ord(bytes(buf[:size]).decode("utf-8"))  # rejects surrogates, overlongs
        except UnicodeDecodeError:
            self._fail(f"frame length is not a valid UTF-8 character: {bytes(buf[:size])!r}")
        if len(buf) > size and buf[size] > STATUS_NOTE:
            self._fail(f"bad status byte 0x{buf[size]:02x}")
        if len(buf) > size + 1 and buf[size + 1] not in b"01":
            self._fail(f"bad indicator byte 0x{buf[size + 1]:02x}")
        end = size + 2 + length
        if len(buf) < end:
            return NEED_DATA
        try:
            message = bytes(buf[size + 2:end]).decode("utf-8")
        except UnicodeDecodeError:
            self._fail("frame message is not valid UTF-8")
        frame = Frame(buf[size], buf[size + 1] - 0x30, message)
        del buf[:end]                 # front deletion of a bytearray is amortised O(1)
        return frame

    def _fail(self, reason: str) -> None:
        self._error = reason
        self._buf.clear()
        raise ProtocolError(reason)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise ProtocolError(f"decoder unusable after earlier error: {self._error}")


def decode_frames(data: bytes) -> list[Frame]:
    """All frames of a complete byte string; ProtocolError if it ends mid-frame."""
    decoder = ResponseDecoder()
    decoder.receive_data(data)
    frames = []
    while (event := decoder.next_event()) is not NEED_DATA:
        frames.append(event)
    if decoder._buf:
        raise ProtocolError(f"{len(decoder._buf)} trailing bytes of an incomplete frame")
    return frames
