"""Unit tests of the replication core's pieces: codec, framer, handshake, Replica contract."""

import os
import pickle
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnet.replication import core
from chatnet.replication.core import (
    BACKUP,
    ELECTING,
    PRIMARY,
    RECOVERING,
    DurableState,
    HardState,
    Replica,
)
from chatnet.replication.handshake import (
    ClusterMismatch,
    HandshakeError,
    Initiator,
    Responder,
    compute_proof,
)
from chatnet.replication.messages import (
    MAX_PAYLOAD,
    Append,
    AppendResp,
    DecodeError,
    Entry,
    FrameError,
    Heartbeat,
    InstallSnapshot,
    PeerChallenge,
    PeerFramer,
    PeerHello,
    PeerProof,
    Reapply,
    ReapplyAck,
    SnapshotAck,
    ViewChange,
    Vote,
    _decode,
    decode_message,
    encode_message,
    frame,
)

# ---------------------------------------------------------------------------- codec

u = st.integers(0, 2**64 - 1)
small = st.integers(0, 1000)
ids = st.lists(small, max_size=6).map(tuple)
entries = st.lists(st.builds(Entry, u, u, st.binary(max_size=40)), max_size=5).map(tuple)

messages = st.one_of(
    st.builds(Heartbeat, u, u, u, u, u, u, st.one_of(st.none(), small), ids, st.integers(0, 3),
              st.booleans(), u, u, u),
    st.builds(Append, u, u, u, u, u, ids, entries, u),
    st.builds(AppendResp, u, st.booleans(), u, u, st.booleans()),
    st.builds(ViewChange, u, u, u, u, st.booleans()),
    st.builds(Vote, u, st.booleans(), u, u, u, u),
    st.builds(InstallSnapshot, u, u, u, u, u, ids, u, u, u, st.binary(max_size=100), u,
              st.booleans(), st.binary(max_size=20), ids),
    st.builds(SnapshotAck, u, u, u),
    st.builds(Reapply, u, u, entries),
    st.builds(ReapplyAck, u, u),
    st.builds(PeerHello, u, u, st.binary(max_size=64), st.binary(max_size=20)),
    st.builds(PeerChallenge, u, st.binary(max_size=64), st.binary(max_size=32)),
    st.builds(PeerProof, st.binary(max_size=32)),
)


@given(messages)
def test_codec_roundtrip(msg):
    assert decode_message(encode_message(msg)) == msg


# These two test the raw decoder, _decode: decode_message turns any surprise into DecodeError
# (defence in depth for the live replica), so testing it could never fail.  A non-DecodeError
# escaping _decode is a decoder bug the wrapper would only hide.

@given(st.binary(max_size=200))
def test_decode_garbage_raises_only_decode_error(data):
    try:
        _decode(data)
    except DecodeError:
        pass


@given(messages, st.data())
def test_decode_mutated_raises_only_decode_error(msg, data):
    raw = bytearray(encode_message(msg))
    op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if op == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        _decode(bytes(raw))
    except DecodeError:
        pass


def test_decode_message_turns_a_decoder_bug_into_decode_error(monkeypatch):
    from chatnet.replication import messages

    def broken(payload):
        raise IndexError("a decoder bug")

    monkeypatch.setattr(messages, "_decode", broken)
    with pytest.raises(DecodeError, match="malformed message"):
        messages.decode_message(b"\x02\x01")


@pytest.mark.parametrize("raw", [b"", b"\x01", b"\x02\x01", b"\x01\x63", b"\x01\x03" + b"\xff" * 11,
                                 encode_message(AppendResp(1, True, 2, 3, False)) + b"x",
                                 b"\x01\x03\x01\x02\x02\x02\x00", "text"])
def test_decode_rejects(raw):
    with pytest.raises(DecodeError):
        decode_message(raw)


def test_encode_rejects_bad_values():
    with pytest.raises(ValueError):
        encode_message(AppendResp(-1, True, 0, 0, False))
    with pytest.raises(ValueError):
        encode_message("not a message")


@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_framer_any_split(payloads, data):
    stream = b"".join(frame(p) for p in payloads)
    f = PeerFramer(max_payload=1000)
    got, pos = [], 0
    while pos < len(stream):
        k = data.draw(st.integers(1, max(1, len(stream) - pos)))
        got += f.feed(stream[pos:pos + k])
        pos += k
    assert got == payloads and f.buffered == 0


def test_framer_oversized_frame_breaks_the_stream():
    f = PeerFramer(max_payload=10)
    assert f.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameError):
        f.feed((11).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        f.feed(b"")
    with pytest.raises(FrameError):
        frame(b"y" * 11, max_payload=10)


# ---------------------------------------------------------------------------- handshake

SECRET = b"s3cret-for-tests"


def _handshake(secret_i=SECRET, secret_r=SECRET, i=1, r=2, known=(1, 2, 3)):
    ini = Initiator(secret_i, i, r, os.urandom(32))
    res = Responder(secret_r, r, known, os.urandom(32))
    ch = res.on_hello(ini.hello())
    proof = ini.on_challenge(ch)
    return res.on_proof(proof), ini, res


def test_handshake_ok():
    peer, ini, res = _handshake()
    assert peer == 1 and ini.done and res.done and res.peer == 1


def test_handshake_wrong_secret_fails_on_both_sides():
    with pytest.raises(HandshakeError):   # initiator refuses a responder without the secret
        _handshake(secret_r=b"other")
    ini = Initiator(b"other", 1, 2, os.urandom(32))
    res = Responder(SECRET, 2, (1, 2), os.urandom(32))
    ch = res.on_hello(ini.hello())
    # a dialler without the secret cannot answer (forge a proof from the wrong key)
    forged = PeerProof(compute_proof(b"other", "initiator", 1, 2, ini.nonce, ch.nonce))
    with pytest.raises(HandshakeError):
        res.on_proof(forged)


def test_handshake_reflection_and_replay_fail():
    ini = Initiator(SECRET, 1, 2, os.urandom(32))
    res = Responder(SECRET, 2, (1, 2), os.urandom(32))
    ch = res.on_hello(ini.hello())
    with pytest.raises(HandshakeError):          # the responder's own proof reflected back
        res.on_proof(PeerProof(ch.proof))
    # replay: a valid proof from one connection on another (fresh responder nonce)
    ini2 = Initiator(SECRET, 1, 2, ini.nonce)
    res_a = Responder(SECRET, 2, (1, 2), os.urandom(32))
    proof_a = ini2.on_challenge(res_a.on_hello(ini2.hello()))
    res_b = Responder(SECRET, 2, (1, 2), os.urandom(32))
    res_b.on_hello(PeerHello(1, 2, ini.nonce))
    with pytest.raises(HandshakeError):
        res_b.on_proof(proof_a)


def test_handshake_identity_checks():
    with pytest.raises(HandshakeError):
        _handshake(i=9)                      # unknown id
    with pytest.raises(HandshakeError):
        _handshake(i=2, r=2)                 # claims to be me
    ini = Initiator(SECRET, 1, 2, os.urandom(32))
    res = Responder(SECRET, 3, (1, 2, 3), os.urandom(32))
    with pytest.raises(HandshakeError):      # hello addressed to somebody else
        res.on_hello(ini.hello())
    # a challenge from a node other than the one dialled
    other = Responder(SECRET, 3, (1, 2, 3), os.urandom(32))
    ch = other.on_hello(PeerHello(1, 3, ini.nonce))
    with pytest.raises(HandshakeError):
        ini.on_challenge(ch)
    with pytest.raises(HandshakeError):
        Initiator(SECRET, 1, 2, b"short")


# ---------------------------------------------------------------------------- Replica contract

def drain(r, store=None):
    """Minimal host loop; returns (messages, committed)."""
    msgs, committed = [], []
    while (rd := r.ready()) is not None:
        msgs += rd.messages
        committed += rd.committed
        r.advance(rd)
    return msgs, committed


def test_single_replica_commits_after_own_durability():
    r = Replica(1, [1], DurableState(), rng=random.Random(1))
    assert r.role == PRIMARY and r.serving
    idx = r.propose(b"a")
    assert idx == 1
    rd = r.ready()
    assert rd.entries == [Entry(1, r.view, b"a")] and rd.committed == []   # not durable yet
    r.advance(rd)
    rd = r.ready()
    assert [e.data for e in rd.committed] == [b"a"]
    r.advance(rd)
    assert r.commit_index == r.applied_index == 1


def test_single_replica_restart_keeps_serving():
    d = DurableState(view=0, primary=1, members=(1,), log=[Entry(1, 0, b"a"), Entry(2, 0, b"b")],
                     applied_index=1)
    r = Replica(1, [1], d, rng=random.Random(1))
    assert r.serving
    _, committed = drain(r)
    assert [e.index for e in committed] == [2]


def test_fresh_replica_of_a_cluster_is_recovering_and_does_not_serve():
    r = Replica(1, [1, 2, 3], DurableState(), rng=random.Random(1))
    assert r.role == RECOVERING and not r.serving and r.propose(b"x") is None
    for _ in range(50):
        r.tick()
    drain(r)
    assert r.role == RECOVERING and not r.serving   # reaches nobody: waits


def test_invalid_durable_state_rejected():
    with pytest.raises(ValueError):
        Replica(1, [1, 2], DurableState(log=[Entry(2, 0, b"x")]))
    with pytest.raises(ValueError):
        Replica(1, [1, 2], DurableState(applied_index=3))
    with pytest.raises(ValueError):
        Replica(4, [1, 2], DurableState())


def _backup_in_view(view=3):
    """Replica 2 of (1, 2, 3), a synced backup of ``view`` whose primary is cluster[view % 3]."""
    primary = (1, 2, 3)[view % 3]
    d = DurableState(view=view, primary=primary, members=(1, 2, 3), promised=view,
                     log=[Entry(1, view, b"a")], applied_index=0)
    r = Replica(2, [1, 2, 3], d, rng=random.Random(7))
    assert r.role == RECOVERING            # every restart starts recovering ...
    r.step(primary, Append(view=view, prev_index=1, prev_view=view, commit=0, start=1,
                           members=(1, 2, 3), entries=(), echo_inc=r._inc))
    drain(r)
    assert r.role == BACKUP                # ... until the live primary has synced it
    return r, primary


def test_message_from_an_older_view_is_refused():
    r, _ = _backup_in_view(6)           # view 6: primary is node 1
    # node 1 as primary of the older view 3 (3 % 3 = 0 -> node 1)
    r.step(1, Append(view=3, prev_index=1, prev_view=6, commit=1, start=1, members=(1, 2, 3),
                     entries=(Entry(2, 3, b"old"),)))
    msgs, committed = drain(r)
    assert committed == [] and r.last_index == 1
    [(to, resp)] = [m for m in msgs if isinstance(m[1], AppendResp)]
    assert to == 1 and not resp.ok and resp.view == 6


def test_ack_only_leaves_with_the_persisted_entries():
    r, p = _backup_in_view(6)
    r.step(p, Append(view=6, prev_index=1, prev_view=6, commit=1, start=1, members=(1, 2, 3),
                     entries=(Entry(2, 6, b"b"),), echo_inc=r._inc))
    rd = r.ready()
    resp = [m for _, m in rd.messages if isinstance(m, AppendResp)]
    assert resp and resp[0].ok and resp[0].match == 2
    assert rd.entries == [Entry(2, 6, b"b")]       # the same Ready persists what it acks
    assert [e.index for e in rd.committed] == [1]
    r.advance(rd)
    assert r.role == BACKUP


def test_vote_is_persisted_with_the_promise_and_fences_the_old_view():
    r, p = _backup_in_view(6)
    # node 3 campaigns for view 8 (8 % 3 = 2 -> node 3) with a longer log
    r.step(3, ViewChange(view=8, est_view=6, last_view=6, last_index=2, failover=True))
    rd = r.ready()
    assert rd.hard_state == HardState(6, p, (1, 2, 3), 8, promised_to=3, config=r.config)
    votes = [m for _, m in rd.messages if isinstance(m, Vote)]
    assert votes and votes[0].granted
    r.advance(rd)
    assert r.role == ELECTING and r.promised == 8
    r.step(p, Append(view=6, prev_index=1, prev_view=6, commit=1, start=1, members=(1, 2, 3),
                     entries=(Entry(2, 6, b"late"),), echo_inc=r._inc))
    msgs, _ = drain(r)
    assert r.last_index == 1
    assert any(isinstance(m, AppendResp) and not m.ok and m.view == 8 for _, m in msgs)


def test_equal_log_tie_goes_to_the_preferred_replica():
    r, p = _backup_in_view(6)       # I am node 2; node 3 is less preferred
    r.step(3, ViewChange(view=8, est_view=6, last_view=6, last_index=1, failover=True))
    msgs, _ = drain(r)
    votes = [m for _, m in msgs if isinstance(m, Vote)]
    assert votes and not votes[0].granted and r.promised == 6


def test_vote_refused_to_a_less_complete_candidate():
    r, p = _backup_in_view(6)
    r.step(3, ViewChange(view=8, est_view=6, last_view=3, last_index=5, failover=True))
    msgs, _ = drain(r)
    votes = [m for _, m in msgs if isinstance(m, Vote)]
    assert votes and not votes[0].granted and r.promised == 6


def _heartbeat_to(r, *, status, view, promised, primary, last_index=1, last_view=None):
    """A heartbeat that answers ``r``'s latest probe (so its sender counts as alive)."""
    return Heartbeat(inc=11, seq=r._ticks, echo_inc=r._inc, echo_seq=r._ticks, promised=promised,
                     view=view, primary=primary, members=(1, 2, 3),
                     status=core.STATUS_CODES[status], serving=status == PRIMARY,
                     last_view=view if last_view is None else last_view,
                     last_index=last_index, commit=0)


def test_backup_waits_for_its_primarys_view_change_and_ignores_stale_heartbeats():
    """A backup goes electing only when its primary's heartbeat shows it lost the view
    (restarted or stalled), not while it changes the view (its ViewChange will come) nor
    for a heartbeat sent before it established the backup's view (delivery reorders)."""
    r, p = _backup_in_view(6)          # primary 1
    r.step(p, _heartbeat_to(r, status=ELECTING, view=6, promised=9, primary=1))
    r.step(p, _heartbeat_to(r, status=RECOVERING, view=3, promised=4, primary=2))
    drain(r)
    assert r.role == BACKUP
    r.step(p, _heartbeat_to(r, status=RECOVERING, view=6, promised=9, primary=1))
    drain(r)
    assert r.role == ELECTING


def test_a_voter_does_not_campaign_against_the_live_candidate_it_voted_for():
    """Node 2 is preferred to node 3 on an equal log; once it granted 3's view change
    (a live primary re-adding a replica), it waits for 3 rather than run itself -- until 3
    is seen restarted."""
    r, p = _backup_in_view(8)          # primary 3; I am node 2, preferred to it
    r.step(3, ViewChange(view=11, est_view=8, last_view=8, last_index=1, failover=False))
    msgs, _ = drain(r)
    assert any(isinstance(m, Vote) and m.granted for _, m in msgs)
    assert r.role == ELECTING and r.status()["following"] == 3
    for _ in range(3 * r.failure_ticks):
        r.tick()
        r.step(3, _heartbeat_to(r, status=ELECTING, view=8, promised=11, primary=3))
        r.step(1, _heartbeat_to(r, status=ELECTING, view=8, promised=11, primary=3))
        msgs, _ = drain(r)
        assert not any(isinstance(m, ViewChange) for _, m in msgs)
    r.step(3, _heartbeat_to(r, status=RECOVERING, view=8, promised=11, primary=3))
    campaigned = False
    for _ in range(2 * r.failure_ticks):
        r.tick()
        msgs, _ = drain(r)
        campaigned |= any(isinstance(m, ViewChange) for _, m in msgs)
    assert campaigned


def test_primary_steps_down_on_hearing_a_newer_view():
    sim_primary = None
    from chatnet.replication.sim import Simulation
    sim = Simulation(3, 3, steps=0)
    sim.p_drop = sim.p_dup = 0
    sim_primary = sim.wait_serving(100)
    assert sim_primary is not None
    r = sim.nodes[sim_primary].replica
    hb = Heartbeat(inc=5, seq=1, echo_inc=0, echo_seq=0, promised=r.promised + 10, view=r.view,
                   primary=r.primary, members=r.members, status=2, serving=False,
                   last_view=0, last_index=0, commit=0)
    other = next(i for i in (1, 2, 3) if i != sim_primary)
    r.step(other, hb)
    assert not r.serving and r.role != PRIMARY and r.propose(b"x") is None


def test_status_fields():
    r = Replica(1, [1, 2, 3], DurableState(), rng=random.Random(1))
    st_ = r.status()
    for k in ("role", "view", "primary", "members", "last_index", "commit_index", "serving",
              "reachable", "suspected", "promised", "divergences"):
        assert k in st_


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6))
def test_heartbeats_only_after_ticks_and_no_suspicion_right_after_stall(seed):
    r = Replica(1, [1, 2, 3], DurableState(), rng=random.Random(seed), failure_ticks=4)
    assert r.ready() is None
    r.tick()
    msgs, _ = drain(r)
    assert sorted(to for to, m in msgs if isinstance(m, Heartbeat)) == [2, 3]
    r.stalled()
    assert r.status()["suspected"] == []     # waking up declares nobody failed


# ---------------------------------------------------------------------------- cluster id

def test_handshake_binds_the_cluster_id():
    ini = Initiator(SECRET, 1, 2, os.urandom(32), b"aaaa")
    res = Responder(SECRET, 2, (1, 2), os.urandom(32), b"aaaa")
    assert res.on_proof(ini.on_challenge(res.on_hello(ini.hello()))) == 1


def test_replicas_with_different_peer_lists_refuse_each_other_by_name():
    ini = Initiator(SECRET, 1, 2, os.urandom(32), b"1111aaaa")
    res = Responder(SECRET, 2, (1, 2), os.urandom(32), b"2222bbbb")
    with pytest.raises(ClusterMismatch) as err:
        res.on_hello(ini.hello())
    assert "1111aaaa" in str(err.value) and "2222bbbb" in str(err.value)
    assert "--peers" in str(err.value)


def test_a_cluster_id_altered_in_transit_fails_the_proofs():
    ini = Initiator(SECRET, 1, 2, os.urandom(32), b"mine")
    res = Responder(SECRET, 2, (1, 2), os.urandom(32), b"theirs")
    hello = ini.hello()
    forged = PeerHello(hello.initiator, hello.responder, hello.nonce, b"theirs")
    challenge = res.on_hello(forged)          # the responder is fooled about the id ...
    with pytest.raises(HandshakeError):       # ... but its proof binds its own id
        ini.on_challenge(challenge)


# ---------------------------------------------------------------------------- snapshot chunks

def _chunks(data, size, *, view=6, index=5, snap_view=6, snap_id=1, echo_inc=0):
    """The InstallSnapshot chunks a primary of ``view`` would send for ``data``."""
    return [InstallSnapshot(view=view, index=index, snap_view=snap_view, commit=index, start=1,
                            members=(1, 2, 3), snap_id=snap_id, offset=o, total=len(data),
                            data=data[o:o + size], echo_inc=echo_inc)
            for o in range(0, max(len(data), 1), size)]


def _drain_all(r):
    """Like drain(), also returning the snapshots the host was asked to install."""
    msgs, snaps = [], []
    while (rd := r.ready()) is not None:
        msgs += rd.messages
        if rd.snapshot is not None:
            snaps.append(rd.snapshot)
            assert any(isinstance(m, AppendResp) and m.ok for _, m in rd.messages)
        r.advance(rd)
    return msgs, snaps


def test_snapshot_chunks_are_assembled_in_order_and_exposed_only_when_complete():
    r, p = _backup_in_view(6)
    data = bytes(range(256)) * 3 + b"tail"
    parts = _chunks(data, 100, echo_inc=r._inc)
    assert len(parts) == 8
    for i, chunk in enumerate(parts[:-1]):
        r.step(p, chunk)
        msgs, snaps = _drain_all(r)
        assert snaps == []                                  # nothing before the last chunk
        acks = [m for _, m in msgs if isinstance(m, SnapshotAck)]
        assert acks and acks[-1].received == 100 * (i + 1) and acks[-1].snap_id == 1
    r.step(p, parts[3])                                     # a duplicate: ignored
    r.step(p, parts[-1])
    msgs, snaps = _drain_all(r)
    assert [(s.index, s.view, s.data) for s in snaps] == [(5, 6, data)]
    assert any(isinstance(m, AppendResp) and m.ok and m.match == 5 for _, m in msgs)
    assert r.commit_index == 5 and r.snapshot_index == 5


def test_a_gap_is_reported_and_nothing_is_installed_until_it_is_filled():
    r, p = _backup_in_view(6)
    data = b"x" * 250
    a, b, c = _chunks(data, 100, echo_inc=r._inc)
    r.step(p, a)
    r.step(p, c)                                            # b lost
    msgs, snaps = _drain_all(r)
    assert snaps == [] and [m.received for _, m in msgs if isinstance(m, SnapshotAck)] == [100, 100]
    r.step(p, b)
    r.step(p, c)                                            # the primary resent from 100
    _, snaps = _drain_all(r)
    assert [s.data for s in snaps] == [data]


def test_a_stale_chunk_is_ignored_and_a_newer_transfer_replaces_the_partial_one():
    r, p = _backup_in_view(6)
    old, new, newer = b"o" * 300, b"n" * 300, b"N" * 300
    new_parts = _chunks(new, 100, snap_id=5, echo_inc=r._inc)
    r.step(p, new_parts[0])
    # a delayed chunk of an earlier transfer of the same primary: ignored
    r.step(p, _chunks(old, 100, snap_id=4, echo_inc=r._inc)[0])
    # a chunk of an older view: refused (the sender is told the newer view)
    r.step(3, _chunks(old, 100, view=5, snap_view=5, snap_id=9, echo_inc=r._inc)[0])
    for chunk in new_parts[1:]:
        r.step(p, chunk)
    _, snaps = _drain_all(r)
    assert [s.data for s in snaps] == [new]
    # a newer transfer (say after a timeout) discards a partial one ...
    r2, p2 = _backup_in_view(6)
    first = _chunks(old, 100, index=7, snap_id=1, echo_inc=r2._inc)
    second = _chunks(newer, 100, index=7, snap_id=2, echo_inc=r2._inc)
    r2.step(p2, first[0])
    r2.step(p2, second[0])
    r2.step(p2, first[1])                                   # ... whose chunks are now stale
    r2.step(p2, first[2])
    msgs, snaps = _drain_all(r2)
    assert snaps == []
    for chunk in second[1:]:
        r2.step(p2, chunk)
    _, snaps = _drain_all(r2)
    assert [(s.index, s.data) for s in snaps] == [(7, newer)]


def test_a_partial_snapshot_is_dropped_on_a_stall():
    r, p = _backup_in_view(6)
    parts = _chunks(b"z" * 300, 100, echo_inc=r._inc)
    r.step(p, parts[0])
    r.stalled()
    r.step(p, parts[1])
    msgs, snaps = _drain_all(r)
    assert snaps == []
    assert [m.received for _, m in msgs if isinstance(m, SnapshotAck)] == [100, 0]  # from 0 again


class _Host:
    """A minimal host of one Replica for end-to-end snapshot transfers: its state is a blob
    (standing for a large chat state) plus the data of the entries applied since."""

    def __init__(self, i, cluster, **kw):
        self.id = i
        self.r = Replica(i, cluster, DurableState(), rng=random.Random(i), failure_ticks=6,
                         retain_entries=5, **kw)
        self.blob, self.applied, self.index = b"", [], 0
        self.installed = 0
        self.inbox = []
        self.hard = None   # the last hard state handed to the "store"

    def dump(self):
        return struct.pack(">Q", len(self.blob)) + self.blob + pickle.dumps(self.applied)

    def install(self, snap):
        (n,) = struct.unpack_from(">Q", snap.data)
        self.blob, self.applied = snap.data[8:8 + n], pickle.loads(snap.data[8 + n:])
        self.index = snap.index
        self.installed += 1


class _Net:
    """Lossless, in-order links that frame every message with the real framer and codec
    (so a message over the frame limit raises FrameError here as it would on a socket)."""

    def __init__(self, n, **kw):
        cluster = list(range(1, n + 1))
        self.kw = kw
        self.hosts = {i: _Host(i, cluster, **kw) for i in cluster}
        self.up = set(cluster)
        self.framers = {}
        self.max_chunks_per_ready = 0

    def process(self, h):
        moved = False
        while (rd := h.r.ready()) is not None:
            moved = True
            if rd.snapshot is not None:
                h.install(rd.snapshot)
            h.hard = rd.hard_state or h.hard
            chunks = sum(isinstance(m, InstallSnapshot) for _, m in rd.messages)
            self.max_chunks_per_ready = max(self.max_chunks_per_ready, chunks)
            for peer, msg in rd.messages:
                if peer in self.up:
                    framer = self.framers.setdefault((h.id, peer), PeerFramer())
                    for payload in framer.feed(frame(encode_message(msg))):
                        self.hosts[peer].inbox.append((h.id, decode_message(payload)))
            for e in rd.committed:
                if e.index > h.index:
                    h.applied.append(e.data)
                    h.index = e.index
            for peer in rd.snapshot_requests:
                h.r.send_snapshot(peer, h.index, h.r.entry_view(h.index), h.dump())
            h.r.advance(rd)
            if (c := h.r.suggested_compaction()) is not None:
                h.r.compact(c)
        return moved

    def settle(self):
        moved = True
        while moved:
            moved = False
            for i in sorted(self.up):
                h = self.hosts[i]
                inbox, h.inbox = h.inbox, []
                for sender, msg in inbox:
                    h.r.step(sender, msg)
                moved |= bool(inbox) | self.process(h)

    def tick(self, k=1):
        for _ in range(k):
            for i in sorted(self.up):
                self.hosts[i].r.tick()
            self.settle()

    def primary(self):
        return next((h for i, h in self.hosts.items() if i in self.up and h.r.serving), None)


def _catch_up_by_snapshot(net, blob):
    """Nodes 1, 2 and 3 start a cluster, write and compact (in the full view: in all mode a
    view without node 3 keeps its log, section 6); node 3 then arrives with a replaced, empty
    disk and must catch up by snapshot.  Returns the primary's host."""
    for _ in range(60):
        net.tick()
        if net.primary() is not None and len(net.primary().r.members) == 3:
            break
    prim = net.primary()
    assert prim is not None and len(prim.r.members) == 3
    prim.blob = blob               # the state is large from here on (the entries say nothing)
    for k in range(30):
        assert prim.r.propose(b"w%d" % k) is not None
        net.settle()
    assert prim.r.snapshot_index > 0           # compacted: a newcomer needs a snapshot
    net.up = {1, 2}                            # node 3 is down for a while ...
    net.tick(30)
    net.hosts[3] = _Host(3, [1, 2, 3], **net.kw)
    net.up.add(3)                              # ... and back with an empty disk
    for _ in range(200):
        net.tick()
        if 3 in prim.r.members and net.hosts[3].index == prim.index:
            break
    newcomer = net.hosts[3]
    assert newcomer.installed >= 1
    assert newcomer.blob == blob and newcomer.applied == prim.applied
    assert prim.r.members == (1, 2, 3)
    return prim


def test_a_multi_chunk_snapshot_reaches_a_newcomer_with_flow_control():
    net = _Net(3, snapshot_chunk=64, snapshot_window=3)
    _catch_up_by_snapshot(net, bytes(range(256)) * 20)    # about 80 chunks
    assert 1 <= net.max_chunks_per_ready <= 3     # never more than the window at once


def test_default_chunk_size_is_read_at_construction(monkeypatch):
    monkeypatch.setattr(core, "SNAPSHOT_CHUNK", 10)
    monkeypatch.setattr(core, "SNAPSHOT_WINDOW", 2)
    r = Replica(1, [1, 2], DurableState(), rng=random.Random(1))
    assert (r.snapshot_chunk, r.snapshot_window) == (10, 2)


def test_a_snapshot_larger_than_the_old_frame_limit_transfers():
    big = bytes(range(256)) * ((MAX_PAYLOAD + 4096) // 256)
    assert len(big) > MAX_PAYLOAD       # one InstallSnapshot of it could not be framed
    with pytest.raises(FrameError):
        frame(big)
    net = _Net(3)                       # default chunk size and window
    _catch_up_by_snapshot(net, big)
    assert net.max_chunks_per_ready <= core.SNAPSHOT_WINDOW


def test_quorum_mode_is_checked_and_reported():
    r = Replica(1, (1, 2, 3), DurableState.fresh(), rng=random.Random(1), quorum="majority")
    assert r.status()["quorum"] == "majority"
    assert Replica(1, (1, 2, 3), DurableState.fresh(), rng=random.Random(1)).quorum == "all"
    with pytest.raises(ValueError):
        Replica(1, (1, 2, 3), DurableState.fresh(), quorum="most")


def test_majority_mode_never_forms_a_minority_view():
    """A replica that hears nobody forms a view of itself in all mode; in majority mode it
    never serves, and once it suspects the others it promises no new view number either
    (which would only disrupt the majority's view at heal)."""
    for quorum, alone_serves in (("all", True), ("majority", False)):
        r = Replica(1, (1, 2, 3), DurableState(view=3, primary=1, members=(1, 2, 3), promised=3),
                    rng=random.Random(1), quorum=quorum)
        r._become_electing()   # (as after its primary's failure)
        promised = []
        for _ in range(100):
            r.tick()
            while (rd := r.ready()) is not None:
                r.advance(rd)
            promised.append(r.promised)
        assert r.serving is alone_serves
        if not alone_serves:
            assert r.suspected(2) and r.suspected(3) and len(set(promised[50:])) == 1


def test_reapplied_origins_are_state_applied_once_and_survive_snapshots_and_the_store(tmp_path):
    """A healed split brain's command is applied once per origin (view, index) on every
    replica: the origin is part of the chat state, so a snapshot that replaces the state (and
    a restart from the store) carries the memory with it (docs/replication.md section 10)."""
    from chatnet.server.state import DUPLICATE, ChatState, cmd_create, cmd_send, encode_command
    from chatnet.server.storage import Batch
    from chatnet.server.store import Store

    state = ChatState()
    state.apply(cmd_create("bob"))
    wrapped = ("reapply", 6, 25, cmd_send("amy", "bob", "hi"))
    result = state.apply(wrapped)
    assert result != DUPLICATE and state.has_origin(6, 25)
    assert state.apply(wrapped) == DUPLICATE                 # handed over twice: applied once
    assert state.pending_count("bob") == 1
    copy = ChatState.from_snapshot(state.to_snapshot())
    assert copy.has_origin(6, 25) and copy.apply(wrapped) == DUPLICATE
    store = Store(str(tmp_path / "a"))  # replayed from the log at start-up
    store.commit(Batch(entries=[(1, 1, encode_command(cmd_create("bob"))), (2, 6, encode_command(wrapped))],
                       committed=2, sync=True))
    store.close()
    assert Store(str(tmp_path / "a")).load().state.has_origin(6, 25)
    other = Store(str(tmp_path / "b"))
    other.commit(Batch(snapshot=(2, 1, state.to_snapshot())))
    assert other.load().state.has_origin(6, 25)


def test_refusals_are_state_remembered_bounded_and_survive_snapshots_and_the_store(tmp_path, monkeypatch):
    """The log indexes of refused commands are part of the chat state (ChatState.refused), as
    origins are: recorded by apply at a log index (not without one), carried by snapshots and
    rebuilt by the store's replay, absent from the snapshot while empty (older snapshots, and
    the digests of states that never refused anything, are unchanged), oldest dropped first."""
    import json

    from chatnet.server import state as sm
    from chatnet.server.state import NO_SUCH_RECIPIENT, ChatState, cmd_create, cmd_send, encode_command
    from chatnet.server.storage import Batch
    from chatnet.server.store import Store

    state = ChatState()
    state.apply(cmd_create("bob"), 1)
    assert "refused" not in json.loads(state.to_snapshot())        # none yet: no field
    assert state.apply(cmd_send("bob", "amy", "hi"), 2) == NO_SUCH_RECIPIENT
    assert state.apply(cmd_create("bob"), 3) == sm.NAME_TAKEN
    assert state.apply(cmd_send("bob", "amy", "again")) == NO_SUCH_RECIPIENT   # no index: not logged
    assert state.apply(("reapply", 7, 40, cmd_send("bob", "amy", "x")), 4) == NO_SUCH_RECIPIENT
    assert list(state.refused) == [2, 3, 4]
    copy = ChatState.from_snapshot(state.to_snapshot())
    assert list(copy.refused) == [2, 3, 4] and copy.to_snapshot() == state.to_snapshot()
    old = json.loads(state.to_snapshot())                            # a snapshot of an older version
    del old["refused"]
    assert ChatState.from_snapshot(json.dumps(old).encode()).refused == {}
    store = Store(str(tmp_path / "a"))  # replayed from the log at start-up
    store.commit(Batch(entries=[(1, 1, encode_command(cmd_create("bob"))),
                                (2, 1, encode_command(cmd_send("bob", "amy", "hi")))], committed=2, sync=True))
    store.close()
    assert list(Store(str(tmp_path / "a")).load().state.refused) == [2]
    monkeypatch.setattr(sm, "RECENT_REFUSALS", 2)
    state.apply(cmd_send("bob", "amy", "y"), 9)
    assert list(state.refused) == [4, 9]


def test_a_lone_primary_restarted_hands_its_entries_over_before_a_snapshot_replaces_them():
    """All mode: replica 2 led view 5 alone (a split brain's cut-off side), acknowledged 2-3
    and was killed before its stored commit index covered them (the store writes it only with
    later log rows).  Restarted, it never compared the sides; the other side's primary syncs
    it with a snapshot beyond its log.  Its entries of its lone view go to that primary first
    (Ready.handover and a Reapply), instead of being replaced unseen (chaos seed 45)."""
    d = DurableState(view=5, primary=2, members=(2,), promised=5,
                     log=[Entry(1, 3, b"a"), Entry(2, 5, b"x"), Entry(3, 5, b"y")], applied_index=1)
    r = Replica(2, [1, 2, 3], d, rng=random.Random(7))
    assert r.role == RECOVERING and r.commit_index == 1
    data = b"the winner's state"
    for chunk in _chunks(data, 100, view=6, index=9, snap_view=6, echo_inc=r._inc):
        r.step(3, InstallSnapshot(**{**chunk.__dict__, "members": (3, 1), "force": True}))
    handed, sent = [], []
    while (rd := r.ready()) is not None:
        if rd.handover is not None:
            handed += [(e.index, e.view) for e in rd.handover]
        sent += [m for _, m in rd.messages if isinstance(m, Reapply)]
        r.advance(rd)
    assert {(2, 5), (3, 5)} <= set(handed)          # (the common entry 1 too: the winner skips it)
    assert sent and {(2, 5), (3, 5)} <= {(e.index, e.view) for e in sent[0].entries}


# ---------------------------------------------------------------------------- view runs

def test_an_install_snapshot_without_its_trailing_runs_still_decodes():
    """``runs`` was added within wire version 3 as an optional trailing field."""
    msg = InstallSnapshot(7, 9, 6, 9, 1, (1, 2), 3, 0, 2, b"ab", 0, True, b"cfg")
    full = encode_message(msg)
    assert full[-1] == 0 and decode_message(full[:-1]) == msg      # (an empty list: one byte)
    with_runs = InstallSnapshot(**{**msg.__dict__, "runs": (1, 2, 5, 6)})
    assert decode_message(encode_message(with_runs)) == with_runs
    with pytest.raises(DecodeError):
        decode_message(encode_message(Vote(1, True, 2, 3, 4, 5))[:-1])  # only that field may be absent


def _runs_replica(views, applied):
    log = [Entry(i, v, b"x") for i, v in enumerate(views, start=1)]
    return Replica(2, [1, 2, 3], DurableState(view=views[-1], primary=1, members=(1, 2, 3),
                                              promised=views[-1], log=log, applied_index=applied),
                   rng=random.Random(1))


def test_compaction_keeps_the_entry_views_as_bounded_runs(monkeypatch):
    views = [1, 1, 2, 2, 2, 4, 5, 5, 7, 7]
    r = _runs_replica(views, applied=9)
    r.compact(4)
    assert r.view_runs == ((1, 1), (3, 2)) and r.entry_view(3) is None
    r.compact(9)
    assert r.view_runs == ((1, 1), (3, 2), (6, 4), (7, 5), (9, 7))
    assert [r.history_view(i) for i in range(0, 12)] == [None] + views + [None]
    monkeypatch.setattr(core, "VIEW_RUNS", 2)   # beyond the bound: unknown, as before
    r = _runs_replica(views, applied=9)
    r.compact(9)
    assert r.view_runs == ((7, 5), (9, 7)) and r.history_view(6) is None and r.history_view(8) == 5


def test_a_snapshot_carries_the_entry_views_of_the_history_before_it():
    """The primary sends its runs up to the snapshot's index with every chunk; the receiver
    adopts them with the snapshot (and bad ones fall back to the one view it is sure of)."""
    prim = _runs_replica([1, 1, 2, 3, 3, 3], applied=6)
    prim._status, prim._view, prim._commit = PRIMARY, 3, 6
    prim.compact(2)
    prim.send_snapshot(3, 5, None, b"state")
    sent = [m for _, m in prim._msgs if isinstance(m, InstallSnapshot)]
    assert sent and sent[0].runs == (1, 1, 3, 2, 4, 3) and sent[0].index == 5
    for runs, expected in (((1, 1, 3, 2, 4, 3), ((1, 1), (3, 2), (4, 3))),
                           ((), ((5, 3),)), ((1, 1, 4, 1), ((5, 3),)), ((1, 9, 2), ((5, 3),))):
        r = Replica(3, [1, 2, 3], DurableState(), rng=random.Random(1))
        for chunk in _chunks(b"state", 100, view=3, index=5, snap_view=3, echo_inc=r._inc):
            r.step(1, InstallSnapshot(**{**chunk.__dict__, "runs": runs}))
        snaps = _drain_all(r)[1]
        assert [s.index for s in snaps] == [5] and snaps[0].runs == expected == r.view_runs
        assert r.history_view(4) == (3 if len(expected) > 1 else None) and r.entry_view(4) is None


def test_a_newcomer_synced_by_snapshot_knows_the_views_of_the_history_it_never_held():
    net = _Net(3)
    prim = _catch_up_by_snapshot(net, b"state")
    newcomer = net.hosts[3].r
    point = newcomer.snapshot_index
    assert point > 0 and newcomer.view_runs
    assert all(newcomer.history_view(i) == prim.r.history_view(i) is not None for i in range(1, point + 1))


# ---------------------------------------------------------------------------- degraded views

def _restarted(h):
    """Replica ``h`` restarted from what its store would hold (hard state, log, applied)."""
    r, hs = h.r, h.hard
    d = DurableState(view=hs.view, primary=hs.primary, members=hs.members, promised=hs.promised,
                     promised_to=hs.promised_to, config=hs.config, degraded_from=hs.degraded_from,
                     snapshot_index=r.snapshot_index, snapshot_view=r._snap_view,
                     log=list(r._log), applied_index=r.applied_index, view_runs=r.view_runs)
    return Replica(h.id, [1, 2, 3], d, rng=random.Random(h.id), failure_ticks=6, retain_entries=5)


def test_a_degraded_view_keeps_its_log_from_the_split_point_until_the_view_is_full_again():
    """All mode: a lone primary (a crash or a partition cut the others off) keeps every entry
    above what it knew committed when it left the full view, whatever the retention -- it may
    have to hand them over at a heal -- across a restart too, and compacts again in a full
    view with nothing left to hand over."""
    def full_view_writes(tag):
        q = net.primary()
        assert q is not None and set(q.r.members) == {1, 2, 3}
        for i in range(30):
            q.r.propose(b"%s%d" % (tag, i))
            net.settle()
        return q

    net = _Net(3)
    net.tick(20)
    p = full_view_writes(b"full")
    assert p.r.snapshot_index > 0 and p.hard.degraded_from is None   # compacts in a full view
    split = p.r.commit_index + 1
    net.up = {p.id}
    net.tick(30)
    assert p.r.serving and p.r.members == (p.id,)
    assert p.hard.degraded_from == split
    for i in range(40):
        p.r.propose(b"lone%d" % i)
        net.settle()
    assert p.r.applied_index >= split + 39
    assert p.r.snapshot_index < split and p.r.entry_view(split) is not None
    p.r = _restarted(p)
    net.tick(3)
    assert p.r.suggested_compaction() is None and p.r.entry_view(split) is not None
    net.up = {1, 2, 3}
    net.tick(60)
    full_view_writes(b"healed")
    net.tick(5)
    for h in net.hosts.values():
        assert h.hard.degraded_from is None and h.r.snapshot_index >= split, h.id


def test_a_degraded_view_keeps_its_log_only_up_to_a_bound(monkeypatch):
    """The log kept from the split point is bounded (DEGRADED_RETAIN_FACTOR x the retention):
    a replica down for days does not grow the survivors' log without end."""
    from chatnet.replication import core

    monkeypatch.setattr(core, "DEGRADED_RETAIN_FACTOR", 4)   # retain_entries=5: 20 kept at most
    net = _Net(3)
    net.tick(20)
    p = net.primary()
    net.up = {p.id}
    net.tick(30)
    assert p.r.serving and p.r.members == (p.id,) and p.hard.degraded_from is not None
    split = p.hard.degraded_from
    for i in range(60):
        p.r.propose(b"lone%d" % i)
        net.settle()
    assert p.r.snapshot_index >= split                # compacted past the split point ...
    assert p.r.applied_index - p.r.snapshot_index >= 20    # ... never below the bound
    assert p.hard.degraded_from == split              # still degraded
