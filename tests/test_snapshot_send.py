"""Snapshots for lagging peers are serialized off the loop (issue 12 item 2).

The host hands the core's snapshot requests to its one serializer (``host.Checkpoints``): a
forked child in the server, the simulator's delayed stand-in there.  These tests check the
host side with a real fork and with a hand-driven maker, the core's side (compaction held at
a transfer in progress, a state older than the snapshot point refused), and, marked slow, what
a client of a real cluster sees while a replica catches up by snapshot of a large state.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import time

import pytest
from test_replication_core import _runs_replica

from chatnet.replication.core import PRIMARY, InstallSnapshot
from chatnet.replication.simdisk import SimDisk
from chatnet.server import background
from chatnet.server import state as sm
from chatnet.server.background import ForkSnapshots
from chatnet.server.host import ReplicaHost
from chatnet.server.state import ChatState, encode_command
from chatnet.server.status import state_digest
from chatnet.testing import wait_until


class HandMaker:
    """A serializer the test finishes by hand (as a child would, later); busy until its
    result is taken, as ``ForkSnapshots`` is."""

    def __init__(self) -> None:
        self.started: list[tuple] = []
        self._running: tuple | None = None
        self._finished = False

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self, state, tag) -> None:
        data = state.to_snapshot()
        self.started.append(tag)
        self._running, self._finished = (tag, data, state_digest(data)), False

    def finish(self) -> None:
        self._finished = True

    def take(self):
        if not self._finished:
            return None
        done, self._running, self._finished = self._running, None, False
        return done

    def close(self) -> None:
        pass


def lone_primary(maker) -> ReplicaHost:
    disk = SimDisk()
    disk.snapshotter = maker
    host = ReplicaHost(1, (1,), disk, rng=random.Random(1))
    wait_until(lambda: host.cycle() and False or host.replica.serving, 5, what="a serving lone replica")
    return host


def apply_commands(host: ReplicaHost, cmds) -> None:
    for cmd in cmds:
        host.replica.propose(encode_command(cmd))
    target = host.replica.last_index
    wait_until(lambda: host.cycle() and False or host.applied_index >= target, 5, what="the commands applied")


def recorded_sends(host: ReplicaHost) -> list:
    sent, send = [], host.replica.send_snapshot

    def record(peer, index, view, data):
        sent.append((peer, index, view, bytes(data)))
        send(peer, index, view, data)
    host.replica.send_snapshot = record
    return sent


def test_a_snapshot_request_is_serialized_in_a_child_not_on_the_loop(monkeypatch):
    host = lone_primary(ForkSnapshots(lambda: None))
    host.checkpoints.every = 10**9  # no checkpoint of its own meanwhile
    apply_commands(host, [sm.cmd_create(f"user{i}", f"token{i}") for i in range(50)])
    expected, index = host.service.state.to_snapshot(), host.applied_index
    on_loop = []
    real = ChatState.to_snapshot
    monkeypatch.setattr(ChatState, "to_snapshot", lambda self: on_loop.append(os.getpid()) or real(self))
    sent = recorded_sends(host)
    host.checkpoints.requested([2, 3])
    wait_until(lambda: host.cycle() and False or sent, 10, what="the snapshot sent")
    assert on_loop == []  # never serialized in this process
    assert sorted(s[0] for s in sent) == [2, 3]  # one serialization for both
    assert {s[1:] for s in sent} == {(index, host.replica.entry_view(index), expected)}
    assert host.checkpoints.digest == (state_digest(expected), index)


def test_peers_share_one_serialization_taken_when_it_started():
    maker = HandMaker()
    host = lone_primary(maker)
    host.checkpoints.every = 10**9
    apply_commands(host, [sm.cmd_create("alice", "t1")])
    sent = recorded_sends(host)
    host.checkpoints.requested([2])
    host.cycle()
    assert len(maker.started) == 1 and sent == []
    index, state_then = host.applied_index, host.service.state.to_snapshot()
    apply_commands(host, [sm.cmd_create("bob", "t2")])  # the loop goes on meanwhile
    host.checkpoints.requested([3, 2])  # joins the serialization in flight
    host.cycle()
    assert len(maker.started) == 1 and sent == []
    maker.finish()
    assert host.cycle().more  # the first chunks leave with the next pass
    assert [(peer, i, data) for peer, i, _, data in sent] == [(2, index, state_then), (3, index, state_then)]
    host.cycle()
    assert len(maker.started) == 1  # nobody waits any more


def test_a_serialization_an_installed_snapshot_replaced_is_dropped():
    maker = HandMaker()
    host = lone_primary(maker)
    sent = recorded_sends(host)
    host.checkpoints.requested([2])
    host.cycle()
    host.checkpoints.installed(host.applied_index, 10)  # (as when a snapshot is installed)
    maker.finish()
    host.cycle()
    assert sent == [] and host.checkpoints.peers == [2]
    host.cycle()  # the peer still waits: a fresh serialization starts
    assert len(maker.started) == 2


def test_only_a_primary_sends_and_a_backup_forgets_the_requests():
    maker = HandMaker()
    host = lone_primary(maker)
    host.checkpoints.requested([2])
    host.replica._status = "backup"  # (it lost the primary role meanwhile)
    host.cycle()
    assert host.checkpoints.peers == [] and maker.started == []


def test_compaction_stays_behind_a_snapshot_transfer_in_progress():
    r = _runs_replica([1] * 30, applied=30)
    r._status, r._view, r._commit, r.retain_entries = PRIMARY, 1, 30, 2
    assert r.suggested_compaction() == 28
    r.send_snapshot(3, 5, None, b"state" * 1000)
    assert any(isinstance(m, InstallSnapshot) for _, m in r._msgs)
    assert r.suggested_compaction() == 5  # the peer continues from 6, out of my log


def test_a_state_older_than_the_snapshot_point_is_not_sent():
    r = _runs_replica([1] * 30, applied=30)
    r._status, r._view, r._commit = PRIMARY, 1, 30
    r.compact(10)
    r.send_snapshot(3, 8, None, b"state")  # serialized before that compaction
    assert not any(isinstance(m, InstallSnapshot) for _, m in r._msgs)
    r.send_snapshot(3, 10, None, b"state")
    assert any(isinstance(m, InstallSnapshot) for _, m in r._msgs)


@pytest.mark.slow
def test_the_primary_keeps_answering_while_a_replica_catches_up_by_snapshot():
    """A 3-replica cluster on a store of 10,000 accounts and 100,000 queued chats (about 8 MB
    serialized); a backup loses its store and catches up by snapshot while a probe client
    keeps asking the primary.  Serializing that state on the loop costs several hundred ms
    (docs/benchmarks.md); the probe's longest round trip must stay well below it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import snapshot_pause

    state = snapshot_pause.build(10_000, 100_000, random.Random(1))
    started = time.perf_counter()
    state.to_snapshot()
    inline = time.perf_counter() - started

    class Args:
        rev, accounts, chats, baseline = None, 10_000, 100_000, 1.0
    result = snapshot_pause.catchup(Args, state)
    during = result["status"]["during"]  # (the loop's own delay; chat also waits for a view change)
    assert during["n"] > 0 and during["max_ms"] / 1000 < max(0.15, inline / 2), (result, inline)


def test_the_status_digest_is_taken_off_the_loop_once_the_state_is_quiet(tmp_path):
    """Two replicas: the digest a status query reports describes ``digest_applied``; a quiet
    state gets a fresh one (asked by one query, taken by a forked child, shown by a later
    query), and both replicas report the same one at the same index."""
    from chatnet.server.cli import query_status
    from chatnet.testing import Cluster, RawClient

    c = Cluster(str(tmp_path), n=2).start()
    try:
        primary = c.wait_primary()
        c.wait_in_sync()
        with RawClient(*c.addresses[primary]) as alice:
            assert alice.request("1|alice").message == "Account created! Logged in as alice."

        def fresh():
            full = [query_status(*address, secret=c.secret, cluster=c.cluster_id) for address in c.addresses]
            ok = all(s and s["digest"] and s["digest_applied"] == s["applied"] for s in full)
            return full if ok and len({(s["digest"], s["applied"]) for s in full}) == 1 else None
        wait_until(fresh, 10, what="equal fresh digests", interval=0.2)
    finally:
        c.stop_all()


def test_a_refused_fork_serializes_on_the_loop_and_the_peer_still_gets_its_snapshot(monkeypatch, caplog):
    """Out of memory or at the process limit, fork() fails: the replica carries on, serializing
    on the loop as it did before snapshots were forked, instead of raising out of its cycle."""
    host = lone_primary(ForkSnapshots(lambda: None))
    host.checkpoints.every = 10**9
    apply_commands(host, [sm.cmd_create(f"user{i}", f"token{i}") for i in range(20)])
    expected, index = host.service.state.to_snapshot(), host.applied_index

    def refuse():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    monkeypatch.setattr(background.os, "fork", refuse)
    sent = recorded_sends(host)
    host.checkpoints.requested([2])
    wait_until(lambda: host.cycle() and False or sent, 5, what="the snapshot sent")
    assert [s[1:] for s in sent] == [(index, host.replica.entry_view(index), expected)]
    assert "cannot fork a snapshot child" in caplog.text


def test_a_failing_snapshot_child_is_not_forked_again_on_every_pass(monkeypatch, caplog):
    """A child that dies is retried after CHILD_RETRY_S, not on the next loop pass (peers still
    wait: every pass would fork and log again); once children work again, the peer is served."""
    host = lone_primary(ForkSnapshots(lambda: None))
    host.checkpoints.every = 10**9
    apply_commands(host, [sm.cmd_create("alice", "t1")])
    real_fork, real_snapshot, forks = os.fork, ChatState.to_snapshot, []

    def counting_fork():
        forks.append(1)
        return real_fork()

    def broken(self):
        raise RuntimeError("serialization fails in the child")
    monkeypatch.setattr(background.os, "fork", counting_fork)
    monkeypatch.setattr(ChatState, "to_snapshot", broken)  # inherited by the child
    sent = recorded_sends(host)
    host.checkpoints.requested([2])
    wait_until(lambda: host.cycle() and False or "snapshot child" in caplog.text, 10,
               what="the failed child reaped")
    until = time.monotonic() + 0.3
    while time.monotonic() < until:
        host.cycle()
    assert len(forks) == 1  # no second child within 0.3 s (CHILD_RETRY_S is 1 s)
    monkeypatch.setattr(ChatState, "to_snapshot", real_snapshot)
    wait_until(lambda: host.cycle() and False or sent, 10, what="the snapshot sent once a child works")
    assert len(forks) == 2 and [s[0] for s in sent] == [2]
