"""The SQLite store (and the simulator's disk, which must behave the same): the log is the
durable record, the state is a stored snapshot plus the committed log after it, batches are
atomic, and start-up recovers exactly what was committed (issue 12)."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3

import pytest

from chatnet.replication.core import HardState
from chatnet.replication.simdisk import SimDisk
from chatnet.server import state as sm
from chatnet.server.background import BackgroundStorage
from chatnet.server.host import ReplicaHost, durable_state, hard_state_meta
from chatnet.server.state import ChatState, encode_command
from chatnet.server.storage import Batch
from chatnet.server.store import IDLE_CHECKPOINT_COMMITS, Store, StoreError
from chatnet.testing import RawClient, wait_until

CMDS = [
    sm.cmd_create("alice"), sm.cmd_create("bob"), sm.cmd_send("alice", "bob", "one", "r1"),
    sm.cmd_send("alice", "bob", "two"), sm.cmd_delivered("bob", 2, 1), sm.cmd_create("carol"),
    sm.cmd_send("bob", "carol", "hi carol"), sm.cmd_delete("bob"), sm.cmd_send("carol", "alice", "x"),
]
ENTRIES = [(i + 1, 1, encode_command(c)) for i, c in enumerate(CMDS)]


def replayed(cmds) -> bytes:
    state = ChatState()
    for cmd in cmds:
        state.apply(cmd)
    return state.to_snapshot()


@pytest.fixture(params=["sqlite", "simdisk"])
def make(request, tmp_path):
    """A factory of the store under test; ``make()`` again reopens the same one (a restart)."""
    if request.param == "simdisk":
        disk = SimDisk()
        return lambda: disk
    return lambda: Store(str(tmp_path))


def test_committed_entries_replay_onto_the_snapshot_and_the_rest_stay_unapplied(make):
    store = make()
    store.commit(Batch(entries=ENTRIES[:6], committed=4, meta={"view": 3}, sync=True))
    store.commit(Batch(entries=ENTRIES[6:], committed=6, sync=True))
    loaded = make().load()
    # only what the replica knew was committed is applied: a new primary may replace the rest
    assert loaded.applied_index == 6 and loaded.state.to_snapshot() == replayed(CMDS[:6])
    assert [e[0] for e in loaded.log] == list(range(1, len(CMDS) + 1)) and loaded.meta["view"] == 3
    store.commit(Batch(entries=[(10, 1, encode_command(sm.cmd_create("dan")))], committed=9, sync=True))
    loaded = make().load()
    assert loaded.applied_index == 9 and loaded.state.to_snapshot() == replayed(CMDS)
    assert [m.display_sender for m in loaded.state.mail_after("carol", 0)] == ["bob [deleted]"]


def test_a_failed_batch_leaves_nothing_behind(tmp_path):
    store = Store(str(tmp_path))
    store.commit(Batch(entries=ENTRIES[:1], committed=1, sync=True))
    with pytest.raises(StoreError):  # a value SQLite cannot bind: the whole batch rolls back
        store.commit(Batch(entries=[ENTRIES[1], (3, 1, object())], committed=3, meta={"view": 9}, sync=True))
    loaded = store.load()
    assert list(loaded.state.accounts) == ["alice"] and loaded.applied_index == 1
    assert [e[0] for e in loaded.log] == [1] and "view" not in loaded.meta


def test_truncate_and_compact(make):
    store = make()
    store.commit(Batch(entries=[(i, 1, encode_command(("delivered", []))) for i in range(1, 11)], sync=True))
    store.commit(Batch(checkpoint=(3, 1, ChatState().to_snapshot()), sync=True))
    store.commit(Batch(truncate_after=7, entries=[(8, 2, encode_command(("delivered", [])))], compact_upto=3,
                       sync=True))
    assert [(e[0], e[1]) for e in make().load().log] == [(4, 1), (5, 1), (6, 1), (7, 1), (8, 2)]


def test_snapshot_install_replaces_everything_in_the_same_transaction(make):
    store = make()
    store.commit(Batch(entries=ENTRIES[:1], committed=1, sync=True))
    new = ChatState()
    for cmd in CMDS:
        new.apply(cmd)
    store.commit(Batch(snapshot=(40, 2, new.to_snapshot()), meta={"snapshot_index": 40, "snapshot_view": 2},
                       sync=True))
    loaded = make().load()
    assert loaded.state.to_snapshot() == new.to_snapshot()
    assert loaded.applied_index == 40 and loaded.log == [] and loaded.meta["snapshot_view"] == 2
    assert durable_state(loaded).snapshot_index == 40


def test_snapshot_and_later_entries_are_one_transaction(tmp_path):
    """A snapshot installed mid-iteration and the entries that follow it land together: a
    failure anywhere in the batch leaves the old state and log untouched."""
    store = Store(str(tmp_path))
    store.commit(Batch(entries=ENTRIES[:1], committed=1, sync=True))
    new = replayed(CMDS)
    with pytest.raises(StoreError):
        store.commit(Batch(snapshot=(40, 2, new), entries=[(41, 2, b"a"), (42, 2, object())], sync=True))
    loaded = store.load()
    assert list(loaded.state.accounts) == ["alice"] and loaded.applied_index == 1
    assert [e[0] for e in loaded.log] == [1]
    store.commit(Batch(snapshot=(40, 2, new), entries=[(41, 2, encode_command(sm.cmd_create("x")))], committed=40,
                       sync=True))
    loaded = store.load()
    assert loaded.state.to_snapshot() == new and loaded.applied_index == 40 and [e[0] for e in loaded.log] == [41]


def test_a_crash_between_the_checkpoint_and_the_truncation_loses_nothing(make):
    """The checkpoint landed, the log below it was never deleted: start-up replays only the
    entries after the snapshot, and the core sees the whole retained log."""
    store = make()
    store.commit(Batch(entries=ENTRIES, committed=len(CMDS), sync=True))
    store.commit(Batch(checkpoint=(5, 1, replayed(CMDS[:5])), sync=True))
    loaded = make().load()
    assert loaded.state_index == 5 and loaded.applied_index == len(CMDS)
    assert loaded.state.to_snapshot() == replayed(CMDS)
    durable = durable_state(loaded)
    assert durable.snapshot_index == 0 and len(durable.log) == len(CMDS)
    store.commit(Batch(compact_upto=5, sync=True))  # the truncation, later
    loaded = make().load()
    assert loaded.state.to_snapshot() == replayed(CMDS) and durable_state(loaded).snapshot_index == 5


def test_the_commit_index_can_never_point_past_the_log(make):
    """The pitfall of a commit index saved apart from the log: here it is written with the
    rows it covers, and at load it is clamped to the last row; a truncation removes only
    entries above it."""
    store = make()
    store.commit(Batch(entries=ENTRIES[:5], committed=3, sync=True))
    store.commit(Batch(truncate_after=3, entries=[(4, 2, encode_command(sm.cmd_create("zed")))], committed=3,
                       sync=True))
    loaded = make().load()
    assert loaded.applied_index == 3 and [e[1] for e in loaded.log] == [1, 1, 1, 2]
    store.commit(Batch(entries=[(5, 2, encode_command(sm.cmd_create("amy")))], committed=99, sync=True))
    loaded = make().load()
    assert loaded.applied_index == 5
    assert durable_state(loaded).applied_index == 5  # the core accepts it (applied <= last index)
    assert set(loaded.state.accounts) == {"alice", "bob", "zed", "amy"}


def test_a_torn_or_absent_snapshot_stops_the_replica_rather_than_guess(tmp_path):
    store = Store(str(tmp_path))
    store.commit(Batch(entries=ENTRIES, committed=len(CMDS), sync=True))
    store.commit(Batch(checkpoint=(5, 1, replayed(CMDS[:5])[:-7]), compact_upto=5))  # torn bytes
    with pytest.raises(StoreError, match="unreadable"):
        store.load()
    store.close()
    db = sqlite3.connect(os.path.join(tmp_path, "chatnet.sqlite3"))
    db.execute("DELETE FROM state")  # absent, with the log below it gone
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="lost"):
        Store(str(tmp_path)).load()


def test_a_store_of_the_earlier_version_is_converted_once(tmp_path):
    """State rows and meta applied_index (before issue 12) become the stored snapshot."""
    path = os.path.join(tmp_path, "chatnet.sqlite3")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE log(idx INTEGER PRIMARY KEY, view INTEGER NOT NULL, data BLOB NOT NULL);
        CREATE TABLE accounts(name TEXT PRIMARY KEY, ord INTEGER NOT NULL, next_seq INTEGER NOT NULL,
                              token TEXT, password TEXT);
        CREATE TABLE request_ids(account TEXT NOT NULL, pos INTEGER NOT NULL, rid TEXT NOT NULL);
        CREATE TABLE mail(recipient TEXT NOT NULL, seq INTEGER NOT NULL, sender TEXT NOT NULL,
                          text TEXT NOT NULL, sender_deleted INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE origins(pos INTEGER PRIMARY KEY, view INTEGER NOT NULL, idx INTEGER NOT NULL);
        INSERT INTO meta VALUES ('applied_index', '4'), ('view', '2');
        INSERT INTO accounts VALUES ('alice', 1, 1, 't', NULL), ('bob', 2, 3, NULL, NULL);
        INSERT INTO request_ids VALUES ('alice', 1, 'r1');
        INSERT INTO mail VALUES ('bob', 1, 'alice', 'one', 0), ('bob', 2, 'alice', 'two', 0);
    """)
    db.executemany("INSERT INTO log VALUES (?, ?, ?)", ENTRIES[:5])
    db.commit()
    db.close()
    loaded = Store(str(tmp_path)).load()
    assert loaded.state_index == 4 and loaded.applied_index == 4 and loaded.meta["view"] == 2
    assert [m.text for m in loaded.state.mail_after("bob", 0)] == ["one", "two"]
    assert loaded.state.accounts["alice"].request_ids == {"r1": 1} and len(loaded.log) == 5
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not tables & {"accounts", "mail", "request_ids", "origins"}


def test_handover_is_kept_with_the_truncation_survives_a_snapshot_and_is_removed(make):
    """A losing replica's handover (docs/replication.md section 10) is written in the batch
    that truncates the entries away, is not chat state (a snapshot install leaves it), and an
    empty handover removes it; the simulator's disk keeps it the same way."""
    owed = [(5, 2, b"a"), (6, 2, b"b")]
    store = make()
    store.commit(Batch(entries=[(i, 2, b"e") for i in range(1, 7)], sync=True))
    store.commit(Batch(truncate_after=4, handover=owed, sync=True))
    loaded = make().load()
    assert [e[0] for e in loaded.log] == [1, 2, 3, 4] and loaded.handover == owed
    store.commit(Batch(snapshot=(40, 3, ChatState().to_snapshot()), sync=True))
    assert make().load().handover == owed and make().load().log == []
    store.commit(Batch(handover=[], sync=True))
    assert make().load().handover == []


def _serving_host(store, retain: int) -> ReplicaHost:
    host = ReplicaHost(0, (0,), store, retain_entries=retain, rng=random.Random(1))
    for _ in range(5):
        host.cycle()
    assert host.replica.serving
    return host


def test_restart_replays_the_snapshot_and_log_suffix_to_exactly_the_committed_state(tmp_path):
    """A lone replica commits commands, checkpoints every few entries and compacts; dropped
    without a clean stop (no final checkpoint) and restarted, it holds exactly the state of
    every committed command, from a snapshot and a short log."""
    rng = random.Random(7)
    cmds = [sm.cmd_create(f"u{i}") for i in range(5)]
    cmds += [sm.cmd_send(f"u{rng.randrange(5)}", f"u{rng.randrange(5)}", f"chat {i}", f"r{i}") for i in range(120)]
    host = _serving_host(Store(str(tmp_path)), retain=10)
    for cmd in cmds:
        host.replica.propose(encode_command(cmd))
        host.cycle()
    assert host.applied_index == host.replica.last_index and host.checkpoints.written >= 3
    expected = host.service.state.to_snapshot()
    assert expected == replayed(cmds)
    host.storage.close()  # a crash: nothing more is written
    loaded = Store(str(tmp_path)).load()
    assert loaded.state.to_snapshot() == expected and loaded.applied_index == host.applied_index
    assert 0 < loaded.state_index and len(loaded.log) < len(cmds) // 2
    again = ReplicaHost(0, (0,), Store(str(tmp_path)), retain_entries=10)
    assert again.service.state.to_snapshot() == expected
    again.close()  # a clean stop writes the final checkpoint: nothing to replay
    assert Store(str(tmp_path)).load().state_index == again.applied_index


def _stored(data_dir: str) -> tuple[int, int, int]:
    """(index of the stored snapshot, first and last log index) of a replica's store."""
    with contextlib.closing(sqlite3.connect(os.path.join(data_dir, "chatnet.sqlite3"))) as db:
        row = db.execute("SELECT idx FROM state").fetchone()
        first, last = db.execute("SELECT min(idx), max(idx) FROM log").fetchone()
    return (row[0] if row else 0), first or 0, last or 0


def test_a_real_replica_checkpoints_in_a_child_and_recovers_from_sigkill_and_sigterm(servers):
    """``bin/chatserver --log-retain 20``: the forked checkpoints land while chat is sent, the
    log is trimmed to them, a SIGKILL restart recovers every acknowledged chat from snapshot +
    log, and a SIGTERM leaves a final checkpoint at the last entry."""
    server = servers(args=["--log-retain", "20"])
    alice = RawClient(server.host, server.port)
    assert alice.request("1|alice").status == 0
    bob = RawClient(server.host, server.port)
    assert bob.request("1|bob").status == 0
    bob.send("6")  # logged out: everything queues
    for i in range(300):
        assert alice.request(f"3|bob|queued {i}").message == "Message sent to bob."
    wait_until(lambda: "checkpoint of the chat state" in server.log(), timeout=10, what="a checkpoint")
    server.kill()
    state_index, first, last = _stored(server.data_dir)
    assert 0 < state_index <= last and first <= state_index + 1 and last - first < 200
    server.start()
    bob = RawClient(server.host, server.port)
    assert bob.request("2|bob").message == "Logged in as bob."
    assert [bob.frame().message for _ in range(300)] == [f"alice|queued {i}" for i in range(300)]
    assert server.stop() == 0  # SIGTERM
    state_index, _, last = _stored(server.data_dir)
    assert state_index == last


def _main_file_log_rows(data_dir) -> int:
    """Log rows in the database file alone, without its WAL: what checkpoints copied there."""
    copy = os.path.join(str(data_dir), "main-only.sqlite3")
    with open(os.path.join(str(data_dir), "chatnet.sqlite3"), "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    with contextlib.closing(sqlite3.connect(copy)) as db:
        try:
            return db.execute("SELECT count(*) FROM log").fetchone()[0]
        except sqlite3.OperationalError:  # not even the schema checkpointed yet
            return 0


def test_the_storage_thread_checkpoints_the_wal_when_idle_and_keeps_a_checkpoint_failure(tmp_path):
    store_dir = tmp_path / "store"
    background = BackgroundStorage(Store(str(store_dir)))
    try:
        # one batch at a time, each waited for: the thread is idle after every commit
        for i in range(1, IDLE_CHECKPOINT_COMMITS + 1):
            background.submit(Batch(entries=[(i, 1, encode_command(sm.cmd_create(f"u{i}")))],
                                    committed=i, sync=True))
            assert background.flush(timeout=10)
        # far below SQLite's own 1,000-page checkpoint: only the idle checkpoint copies rows
        wait_until(lambda: _main_file_log_rows(store_dir) == IDLE_CHECKPOINT_COMMITS,
                   what="the idle checkpoint to copy every row into the database file")
        assert background.error is None

        def broken():
            raise StoreError("disk gone")
        background.store.checkpoint_when_idle = broken
        number = background.submit(Batch(entries=[(999, 1, b"x")], committed=0, sync=True))
        wait_until(lambda: background.error is not None, what="the failed checkpoint to be kept")
        assert background.durable == number and str(background.error) == "disk gone"
    finally:
        background.close()
    loaded = Store(str(store_dir)).load()  # everything acknowledged is there after reopening
    assert loaded.applied_index == IDLE_CHECKPOINT_COMMITS and len(loaded.state.accounts) == IDLE_CHECKPOINT_COMMITS


def test_a_batch_of_more_rows_than_one_insert_takes_writes_them_all_in_order(tmp_path):
    store = Store(str(tmp_path))
    rows = [(i, 1, encode_command(sm.cmd_create(f"u{i}"))) for i in range(1, 151)]
    rows.append((70, 2, encode_command(sm.cmd_create("replaced"))))  # a later row replaces index 70
    store.commit(Batch(entries=rows, committed=150, sync=True))
    loaded = Store(str(tmp_path)).load()
    assert [e[0] for e in loaded.log] == list(range(1, 151)) and loaded.log[69][1] == 2
    assert "replaced" in loaded.state.accounts and "u70" not in loaded.state.accounts
    assert len(loaded.state.accounts) == 150


def test_the_entry_views_of_the_compacted_prefix_survive_restarts(make):
    """The core keeps the views of compacted entries as runs (docs/replication.md section 10,
    "The bound"); they are written with the compaction that extends them and loaded at
    start-up, so a restarted replica still tells its compacted entries' views."""
    views = {i: 1 + (i - 1) // 10 for i in range(1, 31)}  # a history of views 1, 2 and 3
    make().commit(Batch(entries=[(i, v, encode_command(sm.cmd_create(f"a{i}"))) for i, v in views.items()],
                        committed=30, meta={"view": 3, "primary": 0, "members": [0], "promised": 3},
                        sync=True))
    for start in range(3):
        host = _serving_host(make(), retain=5)
        for k in range(40):
            host.replica.propose(encode_command(sm.cmd_create(f"u{start}-{k}")))
            host.cycle()
            replica = host.replica
            views.update((i, replica.entry(i).view) for i in range(replica.snapshot_index + 1,
                                                                    replica.last_index + 1))
        before = host.replica.view_runs
        host.storage.close()  # dropped: what the compactions wrote is what a restart has
        replica = ReplicaHost(0, (0,), make(), retain_entries=5).replica
        assert replica.view_runs == before and replica.snapshot_index > 0
    assert [v for _, v in replica.view_runs][:3] == [1, 2, 3] and replica.snapshot_index > 30
    assert all(replica.history_view(i) == views[i] for i in range(1, replica.snapshot_index + 1))
    assert replica.entry_view(1) is None  # (the protocol's own view: compacted = unknown)


def test_a_group_of_log_only_batches_is_one_statement_and_a_failing_one_leaves_nothing(tmp_path):
    store = Store(str(tmp_path))
    store.commit_many([Batch(entries=ENTRIES[:3], committed=2, sync=True),
                       Batch(entries=ENTRIES[3:5], committed=5, sync=True)])
    with pytest.raises(StoreError):  # its last row breaks NOT NULL mid-statement: none stays
        store.commit_many([Batch(entries=ENTRIES[5:7], committed=7, sync=True),
                           Batch(entries=[(8, 1, None)], committed=8, sync=True)])
    loaded = Store(str(tmp_path)).load()
    assert [e[0] for e in loaded.log] == [1, 2, 3, 4, 5] and loaded.applied_index == 5
    assert loaded.state.to_snapshot() == replayed(CMDS[:5])


def test_degraded_from_is_kept_with_the_hard_state_and_unset_in_older_stores(make):
    """``HardState.degraded_from`` (the first entry kept for a split brain's handover) is a
    meta key written with the view; a store written before it loads it as unset."""
    store = make()
    store.commit(Batch(entries=ENTRIES[:1], meta={"view": 1, "members": [1, 2, 3]}, sync=True))
    assert durable_state(make().load()).degraded_from is None
    store.commit(Batch(meta=hard_state_meta(HardState(4, 1, (1,), 4, 1, None, 2)), sync=True))
    durable = durable_state(make().load())
    assert (durable.view, durable.members, durable.degraded_from) == (4, (1,), 2)
    store.commit(Batch(meta=hard_state_meta(HardState(5, 1, (1, 2, 3), 5, 1)), sync=True))
    assert durable_state(make().load()).degraded_from is None
