"""Unit tests of the replication core's pieces: codec, framer, handshake, Replica contract."""

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnet.replication.core import (BACKUP, ELECTING, PRIMARY, RECOVERING, DurableState,
                                      HardState, Replica)
from chatnet.replication.handshake import HandshakeError, Initiator, Responder, compute_proof
from chatnet.replication.messages import (Append, AppendResp, DecodeError, Entry, FrameError,
                                          Heartbeat, InstallSnapshot, PeerChallenge, PeerFramer,
                                          PeerHello, PeerProof, ViewChange, Vote, decode_message,
                                          encode_message, frame)

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
    st.builds(InstallSnapshot, u, u, u, u, u, ids, st.binary(max_size=100), u, st.booleans()),
    st.builds(PeerHello, u, u, st.binary(max_size=64)),
    st.builds(PeerChallenge, u, st.binary(max_size=64), st.binary(max_size=32)),
    st.builds(PeerProof, st.binary(max_size=32)),
)


@given(messages)
def test_codec_roundtrip(msg):
    assert decode_message(encode_message(msg)) == msg


@given(st.binary(max_size=200))
def test_decode_garbage_raises_only_decode_error(data):
    try:
        decode_message(data)
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
        decode_message(bytes(raw))
    except DecodeError:
        pass


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
    assert rd.hard_state == HardState(6, p, (1, 2, 3), 8)
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
