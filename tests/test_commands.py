"""The encoding of replicated commands: every command round-trips exactly through
``encode_command``/``decode_command``, entries written by the JSON encoding of earlier versions
still decode (and a store holding them still replays to the same state), and corrupt entries
are refused with ValueError rather than turned into some other command."""

from __future__ import annotations

import json
import marshal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnet.server import state as sm
from chatnet.server.state import ChatState, decode_command, encode_command
from chatnet.server.storage import Batch
from chatnet.server.store import Store

texts = st.text(max_size=300)  # every code point, lone surrogates included
ids = st.integers(min_value=0, max_value=2**70)
marks = st.lists(st.tuples(texts, ids, ids), max_size=40)

commands = st.one_of(
    st.builds(sm.cmd_create, texts, st.none() | texts),
    st.builds(sm.cmd_login, texts, texts),
    st.builds(sm.cmd_logout, texts),
    st.builds(sm.cmd_send, texts, texts, texts, st.none() | texts),
    st.builds(sm.cmd_delivered, texts, ids, ids),
    st.builds(sm.cmd_delivered_many, marks),
    st.builds(sm.cmd_delete, texts),
)


def json_encode(cmd: tuple) -> bytes:
    """The encoding of log entries before version 1 (kept here to write old-style entries)."""
    return json.dumps(cmd, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@given(commands)
def test_every_command_round_trips_exactly(cmd):
    data = encode_command(cmd)
    assert data[0] == sm.COMMAND_V1
    back = decode_command(data)
    assert back == cmd and type(back) is tuple
    assert [type(x) for x in back] == [type(x) for x in cmd]  # None stays None, lists stay lists


@given(commands)
def test_decoding_accepts_bytes_and_memoryviews(cmd):
    data = encode_command(cmd)
    assert decode_command(memoryview(data)) == decode_command(bytearray(data)) == cmd


@given(commands)
def test_entries_written_as_json_still_decode(cmd):
    try:
        data = json_encode(cmd)
    except UnicodeEncodeError:  # a lone surrogate: the JSON version could not write it either
        return
    assert data[:1] == b"["
    assert decode_command(data) == cmd


def test_a_store_written_with_json_entries_replays_to_the_same_state(tmp_path):
    cmds = [sm.cmd_create("alice", "t1"), sm.cmd_create("bob"), sm.cmd_send("alice", "bob", "é|€ \n 𝄞", "r1"),
            sm.cmd_send("alice", "bob", "two"), sm.cmd_delivered_many([("bob", 2, 1)]), sm.cmd_login("bob", "t2"),
            sm.cmd_logout("alice"), sm.cmd_create("carol"), sm.cmd_delete("bob")]
    store = Store(str(tmp_path))
    old, new = cmds[:5], cmds[5:]  # written by the JSON version, then by this one after an upgrade
    entries = [(i + 1, 1, json_encode(c)) for i, c in enumerate(old)]
    entries += [(len(old) + i + 1, 2, encode_command(c)) for i, c in enumerate(new)]
    store.commit(Batch(entries=entries, sync=True))
    store.close()
    loaded = Store(str(tmp_path)).load()
    replayed = ChatState()
    for _index, _view, data in loaded.log:
        replayed.apply(decode_command(data))
    expected = ChatState()
    for cmd in cmds:
        expected.apply(cmd)
    assert replayed.to_snapshot() == expected.to_snapshot()
    assert [decode_command(e[2]) for e in loaded.log] == cmds


@pytest.mark.parametrize("data", [
    b"", b"\x01", b"\x01)", b"\x01" + marshal.dumps(("send", "a"))[:-1], b"\x01" + marshal.dumps(["send"]),
    b"\x01" + marshal.dumps(()), b"\x01" + marshal.dumps((1, 2)), b"\x01" + marshal.dumps("send"),
    b"\x02" + marshal.dumps(("send",)), b"{}", b"\xff", b"[1,",
])
def test_corrupt_or_unknown_entries_are_refused(data):
    with pytest.raises(ValueError):
        decode_command(data)


def test_the_encoding_is_compact():
    """A typical chat is no bigger than its JSON form (the JSON form is the ceiling we replaced)."""
    cmd = sm.cmd_send("s12", "r12", "1234567890123456789:123:xxxxxxxxxx", None)
    assert len(encode_command(cmd)) <= len(json_encode(cmd))
