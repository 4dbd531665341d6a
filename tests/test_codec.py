"""Tests for chatnet.protocol.codec: table-driven cases shared by both directions, plus properties.

The tables at the top are the single source of truth for what the protocol means; the
tests below replay them through parse_request, through RequestDecoder in both framing
modes and under every chunking, and through encode_request / ResponseDecoder.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnet.protocol.codec import (
    CLOSED,
    ENVELOPE_ALLOWANCE,
    INDICATOR_CHAT,
    INDICATOR_SERVER,
    INVALID_REQUEST_TEXT,
    MAX_FRAME_BYTES,
    MAX_REQUEST_CHARS,
    NEED_DATA,
    NOT_UTF8_TEXT,
    STATUS_ERROR,
    STATUS_NOTE,
    STATUS_OK,
    TOO_LONG_TEXT,
    BadRequest,
    Frame,
    ProtocolError,
    Request,
    RequestDecoder,
    ResponseDecoder,
    decode_frames,
    encode_frame,
    encode_request,
    encode_response,
    parse_number,
    parse_request,
)

INVALID = BadRequest(INVALID_REQUEST_TEXT)
TOO_LONG = BadRequest(TOO_LONG_TEXT)
NOT_UTF8 = BadRequest(NOT_UTF8_TEXT)
BOUND = MAX_REQUEST_CHARS * 4 + 2 + ENVELOPE_ALLOWANCE

# (request text, expected event)
PARSE_CASES = [
    ("1|alice", Request(1, ("alice",))),
    (" 1 |  alice \t", Request(1, ("alice",))),
    ("1", Request(1, ("",))),
    ("1|", Request(1, ("",))),
    ("1|a|b", Request(1, ("a|b",))),
    ("2|bob", Request(2, ("bob",))),
    ("2|  élodie  ", Request(2, ("élodie",))),
    ("3|bob|hello there", Request(3, ("bob", "hello there"))),
    ("3| bob |  hi  ", Request(3, ("bob", "hi"))),
    ("3|bob|a|b || c", Request(3, ("bob", "a|b || c"))),
    ("3|bob|", Request(3, ("bob", ""))),
    ("3||hi", Request(3, ("", "hi"))),
    ("3|bob|héllo 👋", Request(3, ("bob", "héllo 👋"))),
    ("3|bob", INVALID),
    ("3", INVALID),
    ("4|a*", Request(4, ("a*",))),
    ("4| [ab]?* ", Request(4, ("[ab]?*",))),
    ("4", Request(4, ("*",))),
    ("4|", Request(4, ("*",))),
    ("4|   ", Request(4, ("*",))),
    ("5", Request(5, ())),
    ("5|", Request(5, ())),
    ("5|anything|else", Request(5, ())),
    ("6", Request(6, ())),
    (" 6 ", Request(6, ())),
    ("7", Request(7, ())),
    ("7|", Request(7, ("",))),
    ("7| alice | 42 |x", Request(7, ("alice", "42", "x"))),
    ("0|ext|1", Request(0, ("ext", "1"))),
    ("0| ack | 12 ", Request(0, ("ack", "12"))),
    ("8|alice", INVALID),
    ("8", INVALID),
    ("12|x", INVALID),
    ("+1|x", INVALID),
    ("٣|bob|hi", INVALID),  # Arabic-Indic digit three: int() would accept it
    ("create|alice", INVALID),
    ("|alice", INVALID),
    ("hello", INVALID),
]

# (status, indicator, message, exact bytes on the wire)
FRAME_CASES = [
    (STATUS_OK, INDICATOR_SERVER, "Logged in as alice.", b"\x13\x000Logged in as alice."),
    (STATUS_ERROR, INDICATOR_SERVER, "", b"\x00\x010"),
    (STATUS_NOTE, INDICATOR_SERVER, "No new messages since you've been gone.",
     b"\x27\x020No new messages since you've been gone."),
    (STATUS_OK, INDICATOR_CHAT, "alice|hi", b"\x08\x001alice|hi"),
    # L counts bytes: é is 2 bytes and the emoji 4, so L = 15 although len() is 11.
    (STATUS_OK, INDICATOR_CHAT, "bob|héllo 👋", b"\x0f\x001bob|h\xc3\xa9llo \xf0\x9f\x91\x8b"),
    (STATUS_OK, INDICATOR_SERVER, "x" * 127, b"\x7f\x000" + b"x" * 127),
    # L >= 128: chr(L) is a multi-byte character, the header grows.
    (STATUS_OK, INDICATOR_SERVER, "x" * 128, b"\xc2\x80\x000" + b"x" * 128),
    (STATUS_ERROR, INDICATOR_SERVER, "y" * 200, b"\xc3\x88\x010" + b"y" * 200),
    (STATUS_OK, INDICATOR_SERVER, "z" * 2048, b"\xe0\xa0\x80\x000" + b"z" * 2048),
    (STATUS_OK, INDICATOR_SERVER, "w" * MAX_FRAME_BYTES,
     b"\xed\x9f\xbf\x000" + b"w" * MAX_FRAME_BYTES),
]
FRAME_IDS = [f"s{s}-i{i}-L{len(m.encode())}" for s, i, m, _ in FRAME_CASES]


# --------------------------------------------------------------------------- helpers


def drain(decoder):
    """All events currently available, up to (not including) NEED_DATA / CLOSED."""
    out = []
    while True:
        event = decoder.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)


def feed(chunks, max_chars=MAX_REQUEST_CHARS):
    """Feed each chunk as one recv() result and return (decoder, events)."""
    decoder = RequestDecoder(max_chars)
    events = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        events += drain(decoder)
    return decoder, events


def split_at(data, cuts):
    """Cut ``data`` at the given offsets (any order, duplicates allowed)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# ------------------------------------------------------------------- parse_request


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_parse_request(text, expected):
    assert parse_request(text) == expected


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_seed_mode_chunk_is_one_request(text, expected):
    decoder, events = feed([text.encode()])
    assert events == [expected]
    assert not decoder.line_mode and decoder.buffered_bytes() == 0


@pytest.mark.parametrize("text, expected", PARSE_CASES)
@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_line_mode_request_under_every_split(text, expected, terminator):
    data = b"\n" + text.encode() + terminator
    for cut in range(1, len(data)):
        decoder, events = feed([data[:cut], data[cut:]])
        assert events == [expected], cut
        assert decoder.line_mode and decoder.buffered_bytes() == 0


# ------------------------------------------------------------- framing: seed/line mode


def test_seed_chunks_are_separate_requests():
    decoder, events = feed([b"1|alice", b"3|bob|hi there", b"4"])
    assert events == [Request(1, ("alice",)), Request(3, ("bob", "hi there")),
                      Request(4, ("*",))]
    assert not decoder.line_mode


def test_bare_newline_declares_line_mode():
    decoder = RequestDecoder()
    decoder.receive_data(b"\n")
    assert decoder.line_mode and decoder.next_event() is NEED_DATA
    decoder.receive_data(b"1|al")
    assert decoder.next_event() is NEED_DATA and decoder.buffered_bytes() == 4
    decoder.receive_data(b"ice")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"\n")
    assert drain(decoder) == [Request(1, ("alice",))]
    assert decoder.buffered_bytes() == 0


def test_switch_on_first_newline_keeps_remainder_partial():
    decoder, events = feed([b"1|alice", b"2|bob\n3|bob|x\n4|a"])
    assert events == [Request(1, ("alice",)), Request(2, ("bob",)), Request(3, ("bob", "x"))]
    assert decoder.line_mode and decoder.buffered_bytes() == 3
    decoder.receive_data(b"*")                     # no longer a complete request
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"\r\n")
    assert drain(decoder) == [Request(4, ("a*",))]


def test_line_mode_is_for_good():
    decoder, events = feed([b"5\n", b"6"])
    assert events == [Request(5, ())]
    assert decoder.line_mode and decoder.buffered_bytes() == 1


def test_crlf_blank_lines_and_pipelining():
    _, events = feed([b"\n\r\n  \n\t\r\n1|alice\r\n\n3|bob|a\r\n4\n5|\n6\n"])
    assert events == [Request(1, ("alice",)), Request(3, ("bob", "a")), Request(4, ("*",)),
                      Request(5, ()), Request(6, ())]


def test_blank_seed_chunks_are_ignored():
    decoder, events = feed([b"   ", b"\r", b"\t", b"5"])
    assert events == [Request(5, ())] and not decoder.line_mode


def test_only_trailing_cr_is_removed():
    _, events = feed([b"\n3|bob|a\rb\r\r\n"])
    assert events == [Request(3, ("bob", "a\rb"))]


# ----------------------------------------------------------------------- limits/errors


@pytest.mark.parametrize("line_mode", [False, True])
@pytest.mark.parametrize("text, expected", [
    ("3|bob|" + "x" * (MAX_REQUEST_CHARS - 6), Request(3, ("bob", "x" * 274))),
    ("3|bob|" + "x" * (MAX_REQUEST_CHARS - 5), TOO_LONG),
    ("3|bob|" + "😀" * (MAX_REQUEST_CHARS - 6), Request(3, ("bob", "😀" * 274))),  # 1102 bytes
    ("3|bob|" + "😀" * (MAX_REQUEST_CHARS - 5), TOO_LONG),
    ("1|" + " " * 400 + "alice", TOO_LONG),      # the limit applies before stripping
    (" " * 2000, TOO_LONG),                      # blank but beyond the byte bound
    (" " * 500, None),                           # blank within the bound: ignored
], ids=["280-ascii", "281-ascii", "280-emoji", "281-emoji", "padded", "2000-blank", "500-blank"])
def test_length_limit(text, expected, line_mode):
    data = text.encode()
    chunks = [b"\n", data, b"\n"] if line_mode else [data]
    _, events = feed(chunks + ([b"5\n"] if line_mode else [b"5"]))
    assert events == ([] if expected is None else [expected]) + [Request(5, ())]


@pytest.mark.parametrize("chunks, expected", [
    ([b"\xff"], NOT_UTF8),
    ([b"3|bob|caf\xc3"], NOT_UTF8),               # seed mode: a chunk is a whole request
    ([b"\n3|bob|caf\xc3", b"\xa9\n"], Request(3, ("bob", "café"))),  # line mode waits
    ([b"\n3|bob|\xed\xa0\x80\n"], NOT_UTF8),      # encoded surrogate
    ([b"\n1|\xc0\xaf\n"], NOT_UTF8),              # overlong encoding
    ([b"9|x"], INVALID),
    ([b"\nhello\n"], INVALID),
])
def test_bad_requests_leave_connection_usable(chunks, expected):
    decoder, events = feed(chunks)
    decoder.receive_data(b"5\n" if decoder.line_mode else b"5")
    assert events + drain(decoder) == [expected, Request(5, ())]


@pytest.mark.parametrize("chunk_size, total", [
    (1, 5_000), (7, 1_000_000), (4096, 1_000_000), (65536, 1_000_000), (1_000_000, 1_000_000),
])
def test_flood_without_newline_is_bounded(chunk_size, total):
    decoder = RequestDecoder()
    decoder.receive_data(b"\n")
    piece = b"A" * chunk_size
    events = []
    for _ in range(total // chunk_size):
        decoder.receive_data(piece)
        events += drain(decoder)
        assert decoder.buffered_bytes() <= BOUND
    decoder.receive_data(b"still the same line\n5\n")
    events += drain(decoder)
    assert events == [TOO_LONG, Request(5, ())]


def test_flood_in_one_seed_chunk():
    decoder, events = feed([b"\xff" * 1_000_000, b"5"])
    assert events == [TOO_LONG, Request(5, ())]
    assert decoder.buffered_bytes() == 0


def test_custom_max_chars():
    _, events = feed([b"\n4|abc\n4|abcd\n" + b"x" * 100 + b"\n6\n"], max_chars=5)
    assert events == [Request(4, ("abc",)), TOO_LONG, TOO_LONG, Request(6, ())]


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 6, ENVELOPE_ALLOWANCE + 6, ENVELOPE_ALLOWANCE + 7,
                                 ENVELOPE_ALLOWANCE + 8])
def test_byte_bound_counts_the_cr_whatever_the_chunking(cut):
    # max_chars=1: bound 6 bytes + the envelope allowance.  One byte more before the newline
    # (invalid bytes + CR) is too long whether the partial-line check or the complete-line
    # check sees it first.
    data = b"\xff" * (6 + ENVELOPE_ALLOWANCE) + b"\r\n5\n"
    _, events = feed([b"\n", data[:cut], data[cut:]], max_chars=1)
    assert events == [TOO_LONG, Request(5, ())]


def test_trailing_cr_is_removed_in_seed_mode_too():
    _, events = feed([b"3|bob|" + b"x" * 274 + b"\r"])
    assert events == [Request(3, ("bob", "x" * 274))]


def test_eof():
    decoder = RequestDecoder()
    decoder.receive_data(b"\n1|alice\n2|bo")
    decoder.receive_data(b"")
    assert decoder.next_event() == Request(1, ("alice",))
    assert decoder.next_event() is CLOSED         # the cut-short "2|bo" is dropped
    decoder.receive_data(b"b\n")                  # data after EOF is ignored
    assert decoder.next_event() is CLOSED and decoder.buffered_bytes() == 0


# ---------------------------------------------------------------------- encode_request


@pytest.mark.parametrize("args, wire", [
    ((1, "alice"), b"1|alice\n"),
    ((3, "bob", "hello | there"), b"3|bob|hello | there\n"),
    ((4, "a*"), b"4|a*\n"),
    ((5,), b"5\n"),
    ((6,), b"6\n"),
    ((7, "alice", "42"), b"7|alice|42\n"),
    ((2, "élodie"), "2|élodie\n".encode()),
])
def test_encode_request(args, wire):
    assert encode_request(*args) == wire


@pytest.mark.parametrize("args", [(-1,), (8, "x"), (3, "bob", "two\nlines")])
def test_encode_request_rejects(args):
    with pytest.raises(ValueError):
        encode_request(*args)


@pytest.mark.parametrize("text, expected", [c for c in PARSE_CASES if isinstance(c[1], Request)])
def test_table_requests_round_trip(text, expected):
    op, args = expected.op, expected.args
    if op in (5, 6):
        args = ()
    _, events = feed([b"\n", encode_request(op, *args)])
    assert events == [expected]


# -------------------------------------------------------------------------- responses


@pytest.mark.parametrize("status, indicator, message, wire", FRAME_CASES, ids=FRAME_IDS)
def test_encode_frame(status, indicator, message, wire):
    assert encode_frame(status, indicator, message) == wire
    assert encode_response(status, indicator, message) == wire


@pytest.mark.parametrize("status, indicator, message, wire", FRAME_CASES, ids=FRAME_IDS)
def test_decode_frame_byte_by_byte(status, indicator, message, wire):
    decoder = ResponseDecoder()
    for i in range(len(wire) - 1):
        decoder.receive_data(wire[i:i + 1])
        assert decoder.next_event() is NEED_DATA
    decoder.receive_data(wire[-1:])
    assert decoder.next_event() == Frame(status, indicator, message)
    assert decoder.next_event() is NEED_DATA


def test_decode_all_table_frames_at_once():
    wire = b"".join(case[3] for case in FRAME_CASES)
    assert decode_frames(wire) == [Frame(*case[:3]) for case in FRAME_CASES]


@pytest.mark.parametrize("args", [
    (STATUS_OK, INDICATOR_SERVER, "x" * (MAX_FRAME_BYTES + 1)),
    (STATUS_OK, INDICATOR_SERVER, "é" * (MAX_FRAME_BYTES // 2 + 1)),   # bytes, not chars
    (3, INDICATOR_SERVER, "x"),
    (-1, INDICATOR_SERVER, "x"),
    (STATUS_OK, 2, "x"),
    (STATUS_OK, INDICATOR_SERVER, "\ud800"),                           # lone surrogate
], ids=["too-long", "too-long-bytes", "status-3", "status-neg", "indicator-2", "surrogate"])
def test_encode_frame_rejects(args):
    with pytest.raises(ValueError):
        encode_frame(*args)


def test_encode_response_splits_long_list_at_newlines():
    names = [f"user{i:05d}-{'ü' if i % 3 else 'x'}" for i in range(16_000)]
    text = "\n" + "".join(f"- {name}\n" for name in names)
    assert len(text.encode()) > 200_000
    frames = decode_frames(encode_response(STATUS_OK, INDICATOR_SERVER, text))
    assert len(frames) > 1
    assert "".join(f.message for f in frames) == text
    assert all(len(f.message.encode()) <= MAX_FRAME_BYTES for f in frames)
    assert all(f.message.endswith("\n") for f in frames)
    assert {(f.status, f.indicator) for f in frames} == {(STATUS_OK, INDICATOR_SERVER)}


def test_encode_response_splits_at_char_boundary_without_newline():
    text = "a" + "€😀" * 30_000                  # 3- and 4-byte chars, odd offset
    frames = decode_frames(encode_response(STATUS_NOTE, INDICATOR_CHAT, text))
    assert "".join(f.message for f in frames) == text
    assert all(MAX_FRAME_BYTES - 3 <= len(f.message.encode()) <= MAX_FRAME_BYTES
               for f in frames[:-1])
    assert {(f.status, f.indicator) for f in frames} == {(STATUS_NOTE, INDICATOR_CHAT)}


@pytest.mark.parametrize("wire", [
    b"\x02\x030hi",              # status 3
    b"\x02\xc3\x80hi",           # status as a multi-byte char
    b"\x02\x002hi",              # indicator '2'
    b"\x02\x00\x00hi",           # indicator as chr(0) instead of '0'
    b"\x80\x000",                # continuation byte as lead byte
    b"\xc1\x81\x000",            # overlong lead byte
    b"\xff\x000",                # never valid in UTF-8
    b"\xed\xa0\x80\x000",        # surrogate length U+D800
    b"\xc3\x28\x000",            # bad continuation byte
    b"\x02\x000\xff\xfe",        # message not UTF-8
])
def test_response_decoder_errors_are_sticky(wire):
    decoder = ResponseDecoder()
    decoder.receive_data(wire)
    with pytest.raises(ProtocolError):
        decoder.next_event()
    with pytest.raises(ProtocolError):
        decoder.next_event()
    with pytest.raises(ProtocolError):
        decoder.receive_data(encode_frame(0, 0, "ok"))
    with pytest.raises(ProtocolError):
        decode_frames(wire)


def test_header_errors_are_reported_before_the_message_arrives():
    decoder = ResponseDecoder()
    decoder.receive_data(b"\xc3\x88\x00")       # L = 200, status 0, indicator pending
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"7")
    with pytest.raises(ProtocolError):
        decoder.next_event()


def test_decoder_accepts_lengths_beyond_what_we_send():
    message = "m" * 0xE000                       # chr(0xE000) is encodable: be liberal
    wire = (chr(len(message)) + "\x00" + "0" + message).encode()
    assert decode_frames(wire) == [Frame(0, 0, message)]


def test_decode_frames_rejects_trailing_partial_frame():
    wire = encode_frame(0, 0, "hello") + encode_frame(0, 1, "a|b")[:-1]
    with pytest.raises(ProtocolError):
        decode_frames(wire)
    assert decode_frames(b"") == []


# ------------------------------------------------------------------------- properties

frames_st = st.lists(st.builds(
    Frame,
    status=st.integers(0, 2),
    indicator=st.integers(0, 1),
    message=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=1200),
        st.text("ab|\n€😀", min_size=100, max_size=1200),
    ),
), max_size=6)


@settings(max_examples=200, deadline=None)
@given(frames=frames_st, cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_frames_survive_any_chunking(frames, cuts):
    wire = b"".join(encode_frame(f.status, f.indicator, f.message) for f in frames)
    decoder = ResponseDecoder()
    decoded = []
    for chunk in split_at(wire, cuts):
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not NEED_DATA:
            decoded.append(event)
    assert decoded == frames
    assert decode_frames(wire) == frames


@settings(max_examples=30, deadline=None)
@given(base=st.text("ab\n€😀", min_size=1, max_size=300), extra=st.integers(0, 3 * MAX_FRAME_BYTES),
       status=st.integers(0, 2), indicator=st.integers(0, 1))
def test_encode_response_round_trip(base, extra, status, indicator):
    message = base * ((MAX_FRAME_BYTES + extra) // len(base.encode()) + 1)
    frames = decode_frames(encode_response(status, indicator, message))
    assert "".join(f.message for f in frames) == message
    assert all(len(f.message.encode()) <= MAX_FRAME_BYTES for f in frames)
    assert all((f.status, f.indicator) == (status, indicator) for f in frames)


request_bytes_st = st.lists(st.one_of(
    st.sampled_from([b"\n", b"\r\n", b"\r", b"|", b" ", b"1|", b"3|bob|", b"5", b"\xc3",
                     b"\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"x" * 50]),
    st.binary(max_size=8),
), max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=request_bytes_st, cuts=st.lists(st.integers(0, 10**6), max_size=10),
       max_chars=st.sampled_from([1, 4, 16, MAX_REQUEST_CHARS]), eof=st.booleans())
def test_request_decoder_never_raises(data, cuts, max_chars, eof):
    decoder = RequestDecoder(max_chars)
    errors = {INVALID_REQUEST_TEXT, TOO_LONG_TEXT, NOT_UTF8_TEXT}
    for chunk in split_at(data, cuts) + ([b""] if eof else []):
        decoder.receive_data(chunk)
        while True:
            event = decoder.next_event()
            if event is NEED_DATA or event is CLOSED:
                assert (event is CLOSED) == (eof and chunk == b"")
                break
            assert isinstance(event, (Request, BadRequest))
            assert isinstance(event, Request) or event.text in errors
        # decoded on demand: the bound holds once the decoder has said it needs more data
        assert decoder.buffered_bytes() <= max_chars * 4 + 2 + ENVELOPE_ALLOWANCE


@settings(max_examples=200, deadline=None)
@given(data=request_bytes_st, cuts=st.lists(st.integers(0, 10**6), max_size=10),
       max_chars=st.sampled_from([4, 16, MAX_REQUEST_CHARS]))
def test_line_mode_events_do_not_depend_on_chunking(data, cuts, max_chars):
    _, whole = feed([b"\n", data], max_chars)
    _, chunked = feed([b"\n", *split_at(data, cuts)], max_chars)
    assert chunked == whole


param_st = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp")),
                   max_size=20)
field_st = param_st.filter(lambda s: "|" not in s and s == s.strip())
free_st = st.builds(lambda a, b: (a + " | " + b).strip(), param_st, param_st).filter(
    lambda s: s == s.strip())


@settings(max_examples=200, deadline=None)
@given(case=st.one_of(
    st.tuples(st.sampled_from([1, 2]), free_st.map(lambda s: (s,))),
    st.tuples(st.just(3), st.tuples(field_st, free_st)),
    st.tuples(st.just(4), field_st.filter(bool).map(lambda s: (s,))),
    st.tuples(st.sampled_from([5, 6]), st.just(())),
    st.tuples(st.just(7), st.lists(field_st, min_size=1, max_size=4).map(tuple)),
))
def test_encode_request_round_trip(case):
    op, args = case
    wire = encode_request(op, *args)
    assert parse_request(wire[:-1].decode()) == Request(op, args)
    _, events = feed([b"\n", wire])
    expected = Request(op, args)
    if len(wire.decode()) - 1 > MAX_REQUEST_CHARS:
        expected = TOO_LONG
    assert events == [expected]


def test_the_limit_applies_to_the_op3_equivalent_of_an_extension_send():
    text = "x" * (280 - len("3|bob|"))
    assert isinstance(parse_request(f"3|bob|{text}"), Request)
    decoder = RequestDecoder()
    decoder.receive_data(f"\n0|send|rid-0123456789|bob|{text}\n3|bob|{text}y\n".encode())
    assert decoder.next_event() == Request(0, ("send", "rid-0123456789", "bob", text))
    assert decoder.next_event() == BadRequest(TOO_LONG_TEXT)
    decoder.receive_data(f"0|send|rid|bob|{text}y\n".encode())
    assert decoder.next_event() == BadRequest(TOO_LONG_TEXT)


# ------------------------------------------------------------------ numeric fields (issue 10)


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("42", 42), ("007", 7), ("9" * 270, int("9" * 270)),
    ("²", None), ("٣", None), ("１", None), ("+3", None), ("-1", None), (" 3", None),
    ("3_0", None), ("", None), ("0x1", None), ("1.0", None), ("³³", None),
])
def test_numeric_fields_are_ascii_digits_only(text, expected):
    """``"²".isdigit()`` is true and ``int("²")`` raises: a client once crashed a replica with it."""
    assert parse_number(text) == expected


@given(st.text(max_size=MAX_REQUEST_CHARS))
def test_parse_number_never_raises(text):
    value = parse_number(text)
    if value is None:
        assert not (text.isascii() and text.isdigit())
    else:
        assert text.isascii() and text.isdigit() and value == int(text)


def test_line_mode_decodes_on_demand_not_on_receive():
    """A 64 KiB read of `4` lines is not 32,768 requests decoded at once: each next_event cuts
    one line, so a caller that stops after MAX_PIPELINED requests leaves the rest as bytes."""
    decoder = RequestDecoder()
    decoder.receive_data(b"\n" + b"4\n" * 32768)
    assert decoder.pending_events() == 0
    assert decoder.buffered_bytes() == 1 + 2 * 32768   # the line-mode newline, then the lines
    for _ in range(16):
        assert decoder.next_event() == Request(4, ("*",))
    assert decoder.buffered_bytes() == 2 * (32768 - 16)
