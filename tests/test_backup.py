"""`chatserver backup` / `restore`: a copy of a running replica taken under load, restored into a
new single replica, holds every chat acknowledged before the backup started (real processes)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys

import pytest
from cluster_support import Load

from chatnet.server.backup import BackupError, backup, restore
from chatnet.testing import CHATSERVER, Cluster, FailoverClient, ServerProcess, wait_until

pytestmark = pytest.mark.timeout(120)


def chatserver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHATSERVER, *args], capture_output=True, text=True, timeout=60)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def restored_mailbox(tmp_path, src: str, name: str) -> list[str]:
    """Restore ``src`` into a new data dir (with the CLI), start one replica on it, and drain
    ``name``'s mailbox."""
    data_dir = str(tmp_path / f"restored-{os.path.basename(src)}")
    done = chatserver("restore", src, "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert mode(data_dir) == 0o700 and mode(os.path.join(data_dir, "chatnet.sqlite3")) == 0o600
    db = sqlite3.connect(os.path.join(data_dir, "chatnet.sqlite3"))
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    state_index = db.execute("SELECT idx FROM state").fetchone()[0]
    assert db.execute("SELECT count(*) FROM log").fetchone()[0] == 0  # all of it in the snapshot
    db.close()
    assert "members" not in meta and "primary" not in meta  # a new cluster
    assert state_index == meta["snapshot_index"] and meta["view"] >= meta["snapshot_view"]
    server = ServerProcess(data_dir, keep_dir=True).start()
    try:
        client = FailoverClient([server.addr], name)
        texts = [f.message.split("|", 1)[1] for f in client.pending]
        client.close()
    finally:
        server.stop()
    return texts


def test_backup_under_load_restores_every_acknowledged_chat(tmp_path):
    c = Cluster(str(tmp_path / "cluster"), n=3, extra_args=["--log-format", "json"])
    c.start()
    try:
        primary = c.wait_primary()
        c.wait_in_sync(range(3))
        FailoverClient(c.addresses, "sink", create=True).close()
        load = Load(c.addresses, "sink", senders=4).start()
        wait_until(lambda: load.total() >= 150, timeout=30, what="acknowledged chat")
        with load.lock:  # every chat acknowledged before the backups start
            before = [t for texts in load.acked.values() for t in texts]
        backup_replica = next(i for i in range(3) if i != primary)
        copies = {}
        for i in (primary, backup_replica, "network"):  # all while the senders keep going
            dest = str(tmp_path / f"backup-{i}.sqlite3")
            where = ["--data-dir", c.replicas[i].data_dir] if i != "network" else \
                ["--peers", c.peers, "--secret-file", c.secret_file]  # over the network, from the primary
            done = chatserver("backup", dest, *where)
            assert done.returncode == 0, done.stderr
            assert mode(dest) == 0o600 and not os.path.exists(dest + ".tmp")
            copies[i] = dest
        assert "backup of 127.0.0.1:%d" % c.addresses[primary][1] in done.stdout
        wait_until(lambda: load.total() >= len(before) + 50, timeout=30, what="chat after the backups")
        load.stop()
        events = [json.loads(line) for r in c.replicas for line in r.log().splitlines()
                  if line.startswith("{")]
        assert any(e.get("event") == "serving" for e in events)
        assert any(e.get("event") == "view_change" and e["view"] >= 1 and len(e["members"]) == 3 for e in events)
    finally:
        c.stop_all()
    for i, dest in copies.items():
        got = set(restored_mailbox(tmp_path, dest, "sink"))
        missing = [t for t in before if t not in got]
        assert not missing, f"backup of replica {i}: {len(missing)} acknowledged chats missing, e.g. {missing[:5]}"


def test_backup_and_restore_refuse_to_overwrite(tmp_path):
    server = ServerProcess(str(tmp_path / "s"), keep_dir=True).start()
    try:
        client = FailoverClient([server.addr], "alice", create=True)
        client.close()
        dest = str(tmp_path / "b.sqlite3")
        summary = backup(server.data_dir, dest)
        assert summary["accounts"] == 1
        with pytest.raises(BackupError, match="exists"):
            backup(server.data_dir, dest)
        with pytest.raises(BackupError, match="no store"):
            backup(str(tmp_path / "nothing"), str(tmp_path / "c.sqlite3"))
        with pytest.raises(BackupError, match="exists"):
            restore(dest, server.data_dir)  # a live replica's store is never replaced
        in_dir = backup(server.data_dir, str(tmp_path))  # a directory: a time-stamped file in it
        assert os.path.dirname(in_dir["path"]) == str(tmp_path)
    finally:
        server.stop()
    assert restore(dest, str(tmp_path / "new"))["accounts"] == 1


def test_a_new_three_replica_cluster_grows_from_one_restored_store(tmp_path):
    """Restore into one replica's data dir, start the new cluster with the others empty: the
    restored one is the most up to date, serves, and the others catch up from it."""
    server = ServerProcess(str(tmp_path / "old"), keep_dir=True).start()
    try:
        alice = FailoverClient([server.addr], "alice", create=True)
        FailoverClient([server.addr], "bob", create=True).close()
        for i in range(5):
            assert alice.request(f"3|bob|hi {i}").message.startswith("Message sent")
        alice.close()
        backup(server.data_dir, str(tmp_path / "b.sqlite3"))
    finally:
        server.stop()
    c = Cluster(str(tmp_path / "new"), n=3)
    restore(str(tmp_path / "b.sqlite3"), c.replicas[1].data_dir)
    c.start()
    try:
        assert c.wait_primary() == 1
        c.wait_in_sync(range(3))
        bob = FailoverClient(c.addresses, "bob")
        assert [f.message for f in bob.pending] == [f"alice|hi {i}" for i in range(5)]
        bob.close()
    finally:
        c.stop_all()


def test_a_network_backup_needs_the_cluster_secret(tmp_path):
    """``backup --server`` answers only a proof made with the cluster secret (the status
    challenge); with it, the copy is the replica's store, and restores."""
    c = Cluster(str(tmp_path / "cluster"), n=2)
    c.start()
    try:
        primary = c.wait_primary()
        alice = FailoverClient(c.addresses, "alice", create=True)
        FailoverClient(c.addresses, "bob", create=True).close()
        assert alice.request("3|bob|over the network").message.startswith("Message sent")
        alice.close()
        host, port = c.addresses[1 - primary]
        wrong = str(tmp_path / "wrong.secret")
        with open(wrong, "w") as f:
            f.write("0" * 64)
        os.chmod(wrong, 0o600)
        dest = str(tmp_path / "b.sqlite3")
        refused = chatserver("backup", dest, "--server", f"{host}:{port}", "--peers", c.peers, "--secret-file", wrong)
        assert refused.returncode == 1 and "refused" in refused.stderr and not os.path.exists(dest)
        done = chatserver("backup", dest, "--server", f"{host}:{port}", "--peers", c.peers,
                          "--secret-file", c.secret_file)
        assert done.returncode == 0, done.stderr
        assert "2 accounts, 1 queued chats" in done.stdout and mode(dest) == 0o600
    finally:
        c.stop_all()
    assert restored_mailbox(tmp_path, dest, "bob") == ["over the network"]


def test_a_network_backup_is_taken_only_from_a_member_of_the_view(tmp_path, monkeypatch, capsys):
    """A replica that says it is recovering (restarted and behind, removed, cut off) may lack
    acknowledged chats: ``--server`` naming one is refused with the reason, and ``--peers``
    takes the replica that serves, not the old primary a stale replica still names."""
    import chatnet.server.backup as backup_module
    import chatnet.server.cli as cli

    statuses = {  # port -> public status: 7001 is stale and names 7002, removed since; 7003 serves
        7001: {"role": "recovering", "serving": False, "primary_address": "127.0.0.1:7002"},
        7002: {"role": "recovering", "serving": False, "primary_address": "127.0.0.1:7003"},
        7003: {"role": "primary", "serving": True, "primary_address": "127.0.0.1:7003"},
    }
    monkeypatch.setattr(cli, "query_status", lambda host, port, **kw: statuses.get(port))
    fetched = []

    def fetch(host, port, dest, secret, **kw):
        fetched.append(port)
        return {"path": dest, "accounts": 0, "queued_chats": 0, "snapshot_index": 0, "last_index": 0, "view": 1}

    monkeypatch.setattr(backup_module, "fetch_backup", fetch)
    secret = tmp_path / "cluster.secret"
    secret.write_text("0" * 64)
    secret.chmod(0o600)
    common = [str(tmp_path / "b.sqlite3"), "--secret-file", str(secret)]
    assert backup_module.backup_main([*common, "--server", "127.0.0.1:7002"]) == 1
    assert "127.0.0.1:7002 is recovering, not a member of the current view" in capsys.readouterr().err
    assert backup_module.backup_main([*common, "--peers", "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"]) == 0
    assert backup_module.backup_main([*common, "--server", "127.0.0.1:7003"]) == 0
    assert fetched == [7003, 7003]


def test_a_backup_into_a_missing_directory_says_so(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chatnet.sqlite3").write_bytes(b"")  # the source is not read before DEST is checked
    with pytest.raises(BackupError, match=f"no directory {tmp_path}/nowhere to write the backup in"):
        backup(str(tmp_path / "data"), str(tmp_path / "nowhere" / "b.sqlite3"))
