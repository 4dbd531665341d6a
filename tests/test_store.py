"""The SQLite store: batches are atomic, state round-trips through tables and snapshots."""

from __future__ import annotations

import pytest

from chatnet.server import state as sm
from chatnet.server.state import ChatState
from chatnet.server.storage import Batch
from chatnet.server.store import Store, StoreError


def apply_all(state, cmds):
    changes = []
    for cmd in cmds:
        changes.extend(state.apply(cmd)[1])
    return changes


CMDS = [
    sm.cmd_create("alice"), sm.cmd_create("bob"), sm.cmd_send("alice", "bob", "one"),
    sm.cmd_send("alice", "bob", "two"), sm.cmd_delivered("bob", 2, 1), sm.cmd_create("carol"),
    sm.cmd_send("bob", "carol", "hi carol"), sm.cmd_delete("bob"), sm.cmd_send("carol", "alice", "x"),
]


def test_batch_rows_reload_to_the_same_state(tmp_path):
    state = ChatState()
    store = Store(str(tmp_path))
    changes = apply_all(state, CMDS)
    entries = [(i + 1, 1, b"cmd") for i in range(len(CMDS))]
    store.commit(Batch(entries=entries, changes=changes, applied_index=len(CMDS), meta={"view": 3}))
    store.close()
    loaded = Store(str(tmp_path)).load()
    assert loaded.state.to_snapshot() == state.to_snapshot()
    assert loaded.applied_index == len(CMDS)
    assert loaded.meta["view"] == 3
    assert [e[0] for e in loaded.log] == list(range(1, len(CMDS) + 1))
    assert [m.display_sender for m in loaded.state.mail_after("carol", 0)] == ["bob [deleted]"]


def test_a_failed_batch_leaves_nothing_behind(tmp_path):
    store = Store(str(tmp_path))
    state = ChatState()
    store.commit(Batch(changes=apply_all(state, [sm.cmd_create("alice")]), applied_index=1))
    with pytest.raises(StoreError):
        # the same account twice violates the primary key: the whole batch must roll back
        store.commit(Batch(entries=[(2, 1, b"x")], changes=[("account+", "zed", 5), ("account+", "alice", 6)],
                          applied_index=2))
    loaded = store.load()
    assert list(loaded.state.accounts) == ["alice"] and loaded.applied_index == 1 and loaded.log == []


def test_truncate_and_compact(tmp_path):
    store = Store(str(tmp_path))
    store.commit(Batch(entries=[(i, 1, b"e") for i in range(1, 11)]))
    store.commit(Batch(truncate_after=7, entries=[(8, 2, b"new")], compact_upto=3, sync=False))
    assert [(e[0], e[1]) for e in store.load().log] == [(4, 1), (5, 1), (6, 1), (7, 1), (8, 2)]


def test_snapshot_install_replaces_everything_in_the_same_transaction(tmp_path):
    store = Store(str(tmp_path))
    old = ChatState()
    store.commit(Batch(entries=[(1, 1, b"e")], changes=apply_all(old, [sm.cmd_create("old")]), applied_index=1))
    new = ChatState()
    apply_all(new, CMDS)
    store.commit(Batch(snapshot=(40, 2, new), sync=True))
    loaded = store.load()
    assert loaded.state.to_snapshot() == new.to_snapshot()
    assert loaded.applied_index == 40 and loaded.log == [] and loaded.meta["snapshot_view"] == 2
    assert ChatState.from_snapshot(new.to_snapshot()).to_snapshot() == new.to_snapshot()


def test_snapshot_and_later_entries_are_one_transaction(tmp_path):
    """A snapshot installed mid-iteration and the entries that follow it land together: a
    failure anywhere in the batch leaves the old state and log untouched."""
    store = Store(str(tmp_path))
    old = ChatState()
    store.commit(Batch(entries=[(1, 1, b"e")], changes=apply_all(old, [sm.cmd_create("old")]), applied_index=1))
    new = ChatState()
    apply_all(new, CMDS)
    with pytest.raises(StoreError):
        store.commit(Batch(snapshot=(40, 2, new), entries=[(41, 2, b"a"), (41, 2, b"dup")],
                           changes=[("account+", "zed", 9), ("account+", "zed", 9)], sync=True))
    loaded = store.load()
    assert list(loaded.state.accounts) == ["old"] and loaded.applied_index == 1
    assert [e[0] for e in loaded.log] == [1]
    store.commit(Batch(snapshot=(40, 2, new), entries=[(41, 2, b"a")], sync=True))
    loaded = store.load()
    assert loaded.state.to_snapshot() == new.to_snapshot()
    assert loaded.applied_index == 40 and [e[0] for e in loaded.log] == [41]


def test_handover_is_kept_with_the_truncation_survives_a_snapshot_and_is_removed(tmp_path):
    """A losing replica's handover (docs/replication.md section 10) is written in the batch
    that truncates the entries away, is not chat state (a snapshot install leaves it), and an
    empty handover removes it; the simulator's disk keeps it the same way."""
    from chatnet.replication.simdisk import SimDisk

    owed = [(5, 2, b"a"), (6, 2, b"b")]
    for store in (Store(str(tmp_path)), SimDisk()):
        store.commit(Batch(entries=[(i, 2, b"e") for i in range(1, 7)], sync=True))
        store.commit(Batch(truncate_after=4, handover=owed, sync=True))
        loaded = store.load()
        assert [e[0] for e in loaded.log] == [1, 2, 3, 4] and loaded.handover == owed
        store.commit(Batch(snapshot=(40, 3, ChatState().to_snapshot()), sync=True))
        assert store.load().handover == owed and store.load().log == []
        store.commit(Batch(handover=[], sync=True))
        assert store.load().handover == []
