"""Membership changes at runtime (issue 14 item 2), with real processes: a dead replica is replaced
in a live cluster under chat load -- a new replica started with ``--join``, then ``chatserver
members remove`` of the dead one -- and no acknowledged chat is lost, and no client fails over
more than once (the kill of the primary is the one failover); removing the live primary hands
over first; bad requests are refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cluster_support import Load, assert_nothing_lost, drain_mailbox

from chatnet.server.cli import query_status
from chatnet.server.members import format_answer
from chatnet.testing import CHATSERVER, Cluster, FailoverClient, ServerProcess, free_port, wait_until

FAST = ["--heartbeat-ms", "50", "--failure-timeout-ms", "500"]


def members(c: Cluster, *args: str, server=None) -> dict:
    """``chatserver members ... --json`` against ``server`` (default: every original replica)."""
    where = ["--server", f"{server[0]}:{server[1]}"] if server else ["--peers", c.peers]
    out = subprocess.run([sys.executable, CHATSERVER, "members", *args, *where, "--secret-file", c.secret_file, "--json"],
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


class CountingClient(FailoverClient):
    """Counts its connections: every one after the first is a failover."""

    connects = 0

    def connect(self, create: bool = False) -> None:
        self.connects += 1
        super().connect(create)


def test_a_dead_replica_is_replaced_under_load_with_one_failover_at_most(tmp_path):
    with Cluster(str(tmp_path / "c"), n=3, extra_args=FAST) as c:
        primary = c.wait_primary()
        new = ("127.0.0.1", free_port())
        everyone = [*c.addresses, new]
        FailoverClient(everyone, "sink", create=True).close()
        load = Load(everyone, "sink", senders=3, client=CountingClient).start()
        wait_until(lambda: load.total() >= 60, timeout=20, what="chat before the kill")
        c.kill(primary)  # the machine dies: the one failover the clients see
        wait_until(lambda: load.total() >= 120, timeout=20, what="chat after the failover")

        joined = ServerProcess(str(tmp_path / "new"), port=new[1], peers="",
                               args=["--join", "%s:%d" % c.addresses[(primary + 1) % 3],
                                     "--secret-file", c.secret_file, *FAST])
        joined.start()
        try:
            dead = "%s:%d" % c.addresses[primary]
            answer = members(c, "remove", dead)
            assert answer.get("ok"), answer
            assert dead not in [a for _, a in answer["config"]["members"]]
            listing = members(c)
            assert listing["ok"] and not listing["change_pending"]
            assert sorted(a for _, a in listing["config"]) == sorted(
                "%s:%d" % a for a in [*c.addresses, new] if a != c.addresses[primary])
            # the new replica caught up and counts toward acknowledgements: a member of the view
            node = next(i for i, a in listing["config"] if a == "%s:%d" % new)
            wait_until(lambda: node in members(c)["members"], timeout=20, what="the new replica in the view")
            before = load.total()
            wait_until(lambda: load.total() >= before + 60, timeout=20, what="chat after the replacement")
            load.stop()
            assert_nothing_lost(load, drain_mailbox(everyone, "sink"))
            failovers = {name: cl.connects - 1 for name, cl in load.clients.items()}
            assert max(failovers.values()) <= 1, failovers
            # `status` of the changed cluster: the members column names the new replica
            now = ",".join("%s:%d" % a for a in everyone if a != c.addresses[primary])
            table = subprocess.run([sys.executable, CHATSERVER, "status", "--peers", now, "--secret-file",
                                    c.secret_file], capture_output=True, text=True, timeout=60).stdout
            assert all(str(new[1]) in line.split()[-1] for line in table.splitlines()[1:4]), table
            # its data directory records the membership: a restart needs no --join
            joined.stop()
            joined.args = ["--secret-file", c.secret_file, *FAST]
            joined.start()
            wait_until(lambda: node in members(c)["members"], timeout=20, what="the restarted replica back")
        finally:
            load.stop_flag.set()
            joined.stop()


def test_members_add_then_the_replica_started_there_with_join_claims_the_node_once(tmp_path):
    """etcd's flow: `members add X` (X pending: added, not started), then X starts with --join
    and claims that node id, catches up, and counts; a second empty data directory joining as X
    is refused (an id is never handed to two data directories)."""
    with Cluster(str(tmp_path / "c"), n=3, extra_args=FAST) as c:
        c.wait_primary()
        new = ("127.0.0.1", free_port())
        x = "%s:%d" % new
        added = members(c, "add", x)
        assert added.get("ok") and added["config"]["pending"] == [added["node"]], added
        node = added["node"]
        listing = members(c)
        assert listing["pending"] == [node] and "added, not started" in format_answer(listing)
        joined = ServerProcess(str(tmp_path / "x"), port=new[1], peers="",
                               args=["--join", "%s:%d" % c.addresses[0], "--secret-file", c.secret_file, *FAST])
        joined.start()
        try:
            wait_until(lambda: node in members(c)["members"], timeout=20, what="the claimed replica in the view")
            listing = members(c)
            assert listing["pending"] == [] and not listing["change_pending"], listing
            assert [i for i, a in listing["config"] if a == x] == [node]   # the same id, not a new one
            sender = FailoverClient([*c.addresses, new], "alice", create=True)
            FailoverClient([*c.addresses, new], "bob", create=True).close()
            assert sender.request("3|bob|with x in the view").status == 0
            sender.close()
            assert "with x in the view" in drain_mailbox([*c.addresses, new], "bob")
            mine = query_status(*new, secret=c.secret, cluster=c.cluster_id)
            assert mine["id"] == node and node in mine["members"]
            again = subprocess.run([sys.executable, CHATSERVER, "--host", new[0], "--port", str(new[1]),
                                    "--data-dir", str(tmp_path / "empty"), "--join", "%s:%d" % c.addresses[1],
                                    "--secret-file", c.secret_file], capture_output=True, text=True, timeout=60)
            assert again.returncode != 0
            assert f"{x} is node {node}, already started: remove it with `members remove {x}` first" \
                in again.stderr, again.stderr
        finally:
            joined.stop()


def test_members_refuses_bad_requests(tmp_path):
    with Cluster(str(tmp_path / "c"), n=3, extra_args=FAST) as c:
        c.wait_primary()
        assert "not a member" in members(c, "remove", "127.0.0.1:1")["error"]
        me = "%s:%d" % c.addresses[0]
        assert "already a member" in members(c, "add", me)["error"]
        bad = tmp_path / "bad.secret"
        bad.write_text("x" * 40)
        os.chmod(bad, 0o600)
        out = subprocess.run([sys.executable, CHATSERVER, "members", "--server", me, "--secret-file", str(bad), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert "wrong cluster secret" in json.loads(out.stdout)["error"]


def test_removing_the_live_primary_hands_over_first(tmp_path):
    with Cluster(str(tmp_path / "c"), n=3, extra_args=FAST) as c:
        primary = c.wait_primary()
        FailoverClient(c.addresses, "bob", create=True).close()
        client = CountingClient(c.addresses, "alice", create=True)
        assert client.request("3|bob|before").status == 0
        answer = members(c, "remove", "%s:%d" % c.addresses[primary])
        assert answer.get("ok") and answer["node"] == primary, answer
        listing = members(c)
        assert listing["primary"] != primary and primary not in [i for i, _ in listing["config"]]
        wait_until(lambda: (c.status(primary) or {}).get("removed"), timeout=10, what="the old primary out")
        assert client.request("3|bob|after").status == 0  # redirected once, to the new primary
        assert client.connects <= 2
        client.close()
