"""Membership changes in the pure core (docs/replication.md section 14): config entries, learners
promoted once caught up (also by snapshot, which carries the configuration), removal, the
primary's hand-over, one change at a time, and one candidate per view number."""

from __future__ import annotations

import random

import pytest
from test_replication_core import _backup_in_view, _Host, _Net, drain

from chatnet.replication.core import DurableState, MembershipError, Replica
from chatnet.replication.membership import Config, decode_config, encode_config, is_config_entry
from chatnet.replication.messages import ViewChange, Vote


def _grow(net: _Net, ids) -> None:
    """Hosts for new node ids, started from the configuration the primary has now."""
    cfg = net.primary().r.config
    for i in ids:
        h = net.hosts[i] = _Host(i, list(cfg.ids))
        h.r = Replica(i, list(cfg.ids), DurableState(config=cfg), rng=random.Random(i), failure_ticks=6,
                      retain_entries=5)
        net.up.add(i)


def _serving(net: _Net, ticks: int = 200):
    for _ in range(ticks):
        net.tick()
        if (p := net.primary()) is not None and p.r.config.index <= p.r.commit_index:
            return p
    raise AssertionError("nobody serves")


def _change(net: _Net, **change):
    prim = _serving(net)
    index = prim.r.change_config(**change)
    for _ in range(100):
        net.tick()
        if prim.r.commit_index >= index:
            return prim
    raise AssertionError("the change did not commit")


def test_config_entries_round_trip_and_are_never_chat_commands():
    cfg = Config.initial([0, 1, 2], ["a:1", "b:2", "c:3"]).adding("d:4")
    data = encode_config(cfg)
    assert is_config_entry(data) and not is_config_entry(b"\x01chat") and not is_config_entry(b"[1]")
    assert decode_config(data, 9) == cfg.at(9)
    assert cfg.ids == (0, 1, 2, 3) and cfg.next_id == 4 and cfg.removing(3).next_id == 4
    with pytest.raises(ValueError):
        decode_config(data[:-3])


def test_pending_ids_round_trip_in_entries_meta_and_snapshots_and_old_forms_decode():
    from chatnet.replication.membership import (
        config_from_bytes,
        config_from_meta,
        config_to_bytes,
        config_to_meta,
    )
    base = Config.initial([0, 1, 2], ["a:1", "b:2", "c:3"])
    cfg = base.adding("d:4", pending=True).at(7)
    assert cfg.pending == (3,) and cfg.claiming(3).pending == () and cfg.removing(3).pending == ()
    assert decode_config(encode_config(cfg), 7) == cfg
    assert config_from_meta(config_to_meta(cfg)) == cfg and config_from_bytes(config_to_bytes(cfg)) == cfg
    # written before pending existed (and any configuration without pending ids): none pending,
    # byte for byte the old form
    old = b'\x00chatnet-config\x00{"members":[[0,"a:1"],[1,"b:2"],[3,"d:4"]],"next_id":4}'
    assert decode_config(old, 5).pending == () and encode_config(decode_config(old)) == old
    assert config_from_meta({"members": [[0, "a:1"]], "next_id": 1, "index": 2}).pending == ()
    with pytest.raises(ValueError):   # a pending id must be a member
        decode_config(encode_config(cfg).replace(b'"pending":[3]', b'"pending":[9]'))


def test_a_pending_node_is_claimed_once():
    net = _Net(3)
    prim = _change(net, add="node4", pending=True)
    assert prim.r.config.pending == (4,) and 4 in prim.r.config.ids
    with pytest.raises(MembershipError, match="already a member"):
        prim.r.change_config(add="node4")
    index = prim.r.change_config(claim=4)          # the replica started at node4's address
    assert prim.r.config.pending == () and prim.r.config.index == index
    net.settle()
    assert prim.r.commit_index >= index and prim.r.status()["pending"] == []
    with pytest.raises(MembershipError, match="node4 is node 4, already started: remove it with "
                                              "`members remove node4` first"):
        prim.r.change_config(claim=4)              # a second empty data directory for node4
    with pytest.raises(MembershipError, match="already started"):
        prim.r.change_config(claim=1)              # never pending
    prim = _change(net, remove=4)
    assert 4 not in prim.r.config.ids and prim.r.config.next_id == 5   # never reused


def test_a_pending_node_already_running_cannot_be_claimed():
    """A claim lost with its primary leaves the id pending while its replica runs: the primary
    hears it, and refuses to hand the id to another data directory."""
    net = _Net(3)
    prim = _change(net, add="node4", pending=True)
    _grow(net, [4])
    for _ in range(200):
        net.tick()
        if 4 in prim.r.members:
            break
    assert 4 in prim.r.members and prim.r.config.pending == (4,)
    with pytest.raises(MembershipError, match="already started"):
        prim.r.change_config(claim=4)


def test_an_added_replica_catches_up_by_snapshot_then_joins_the_view():
    net = _Net(3)
    prim = _serving(net)
    for k in range(30):               # compacted past the start: the newcomer needs a snapshot
        prim.r.propose(b"w%d" % k)
        net.settle()
    prim = _change(net, add="node4")
    assert prim.r.config.ids == (1, 2, 3, 3 + 1) and 4 not in prim.r.members  # learner first
    _grow(net, [4])
    for _ in range(200):
        net.tick()
        if 4 in prim.r.members:
            break
    newcomer = net.hosts[4].r
    assert prim.r.members == (1, 2, 3, 4)
    assert newcomer.config == prim.r.config and newcomer.applied_index >= 30
    # now it counts: a write commits only once node 4 has it
    index = prim.r.propose(b"after")
    net.settle()
    assert prim.r.commit_index >= index and newcomer.last_index >= index


def test_a_removed_replica_leaves_the_view_and_never_campaigns():
    net = _Net(3)
    prim = _serving(net)
    other = next(i for i in (1, 2, 3) if i != prim.id)
    prim = _change(net, remove=other)
    net.tick(20)
    assert other not in prim.r.members and other not in prim.r.config.ids
    gone = net.hosts[other].r
    assert gone.status()["removed"]
    net.up.discard(prim.id)         # its primary dies: the removed replica must not take over
    net.tick(100)
    assert gone.role == "recovering" and not gone.serving
    assert any(net.hosts[i].r.serving for i in net.up if i != other)


def test_one_change_at_a_time_and_the_primary_hands_over_before_it_is_removed():
    net = _Net(3)
    prim = _serving(net)
    prim.r.change_config(add="node4")
    with pytest.raises(MembershipError, match="in progress"):
        prim.r.change_config(add="node5")
    with pytest.raises(MembershipError, match="hands over"):
        net.settle()
        prim.r.change_config(remove=prim.id)
    net.tick(5)
    target = prim.r.hand_over()
    assert not prim.r.serving
    for _ in range(100):
        net.tick()
        if net.hosts[target].r.serving:
            break
    assert net.hosts[target].r.serving and prim.r.role == "backup"
    new = _change(net, remove=prim.id)     # an ordinary member now
    assert new is net.hosts[target] and prim.id not in new.r.config.ids
    net.tick(20)
    assert prim.id not in new.r.members and new.r.serving


def test_majority_mode_refuses_a_removal_that_leaves_no_majority():
    net = _Net(3, quorum="majority")
    prim = _serving(net)
    down = next(i for i in (1, 2, 3) if i != prim.id)
    net.up.discard(down)
    net.tick(30)                      # the view is now the two others
    prim = _serving(net)
    last = next(i for i in prim.r.members if i != prim.id)
    with pytest.raises(MembershipError, match="majority"):
        prim.r.change_config(remove=last)
    prim.r.change_config(remove=down)  # the dead one may go


def test_a_view_number_is_promised_to_one_candidate_only():
    r, p = _backup_in_view(6)
    r.step(3, ViewChange(view=8, est_view=6, last_view=6, last_index=2, failover=True))
    votes = [m for _, m in drain(r)[0] if isinstance(m, Vote)]
    assert votes and votes[0].granted
    # another candidate asking for the same number (it computed it from another configuration)
    r.step(1, ViewChange(view=8, est_view=6, last_view=6, last_index=2, failover=True))
    votes = [m for _, m in drain(r)[0] if isinstance(m, Vote)]
    assert votes and not votes[0].granted


def test_members_names_every_replica_it_could_not_reach():
    """Off the default ports without --server, the error names every address tried (was: only
    the last one's 'Connection refused')."""
    from chatnet.server.config import Address
    from chatnet.server.members import members_call
    from chatnet.testing import free_port

    servers = [Address("127.0.0.1", free_port()), Address("127.0.0.1", free_port())]
    answer = members_call(servers, b"s" * 32, {"op": "list"})
    assert answer["error"].startswith("no replica answered: ")
    assert all(str(a) in answer["error"] for a in servers) and "--server" in answer["error"]
