"""`chatserver`'s command-line forms: which cluster each form means (unit), a plain single server
from `--port P` alone, and a local cluster of N replicas on chosen ports (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from chatnet.server.cli import build_parser, choose_peers, query_status
from chatnet.server.config import Address, ConfigError
from chatnet.testing import CHATCLIENT, CHATSERVER, ServerProcess, WaitTimeout, free_port, port_open, wait_until

SEED = [Address("127.0.0.1", 1538), Address("127.0.0.1", 2538), Address("127.0.0.1", 3538)]


@pytest.mark.parametrize("argv, expected", [
    ([], SEED),                                          # the seed's three replicas
    (["--port", "2538"], SEED),                          # an entry of them, as documented
    (["--port", "5000"], [Address("127.0.0.1", 5000)]),  # anything else: one plain server
    (["--host", "0.0.0.0", "--port", "5000"], [Address("0.0.0.0", 5000)]),
    (["--port", "5000", "--peers", "127.0.0.1:1538"], [Address("127.0.0.1", 1538)]),  # explicit list
    (["--local", "--replicas", "2", "--base-port", "7000"],
     [Address("127.0.0.1", 7000), Address("127.0.0.1", 7001)]),
    (["--local", "--replicas", "4"], SEED + [Address("127.0.0.1", 4538)]),
])
def test_which_cluster_each_form_means(argv, expected):
    assert choose_peers(build_parser().parse_args(argv)) == expected


@pytest.mark.parametrize("argv", [["--replicas", "2"], ["--local", "--replicas", "0"],
                                  ["--local", "--replicas", "2", "--peers", "127.0.0.1:1538"],
                                  ["--host", "10.0.0.9"]])
def test_forms_that_make_no_sense_say_why(argv):
    with pytest.raises(ConfigError):
        choose_peers(build_parser().parse_args(argv))


def test_port_alone_runs_one_plain_server(tmp_path):
    server = ServerProcess(str(tmp_path / "data"), peers="")  # exactly `--port P --host H`, no --peers
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "client"),  # the client keeps its state there
           "CHATNET_PASSWORD": "test-password"}  # passwords (extension 2): not asked on a terminal
    with server:
        chat = subprocess.run([sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}"],
                              input="create|alice\nlist\n", capture_output=True, text=True, timeout=30, env=env)
        assert "ok: Account created! Logged in as alice." in chat.stdout, chat.stdout + chat.stderr
        commands = tmp_path / "commands.txt"  # `chatclient < FILE`: stdin a file, which epoll refuses
        commands.write_text("login|alice\nlist\n")
        with open(commands) as stdin:
            chat = subprocess.run([sys.executable, CHATCLIENT, "--servers", f"{server.host}:{server.port}"],
                                  stdin=stdin, capture_output=True, text=True, timeout=30, env=env)
        assert "ok: Logged in as alice." in chat.stdout and "ok: 1 account: alice" in chat.stdout, chat.stderr
        status = query_status(server.host, server.port)
        assert status["role"] == "primary" and status["serving"] is True


def _restart_by_printed_command(cwd, port: int) -> None:
    """Kill the replica on ``port`` and start it again, from ``cwd``, with the command line the
    launcher printed for it (README: "restart a killed replica by hand")."""
    line = next(x for x in (cwd / "local.log").read_text().splitlines() if x.startswith(f"[{port}] started pid"))
    pid, cmd = line.split("started pid ", 1)[1].split(": ", 1)
    os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: not port_open("127.0.0.1", port), timeout=10, what=f"replica on {port} gone")
    again = subprocess.Popen(cmd.split(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: query_status("127.0.0.1", port), timeout=30, what=f"restarted replica on {port}")
    finally:
        again.kill()
        again.wait()


def test_local_cluster_of_n_replicas_on_chosen_ports(tmp_path):
    """Run from a directory outside the checkout, as a user would: the children (and the
    command line printed for each, to restart it by hand) must still find the package."""
    base = free_port(count=2)
    log = open(tmp_path / "local.log", "wb")  # a file, not a pipe nobody reads: the launcher never blocks
    proc = subprocess.Popen([sys.executable, CHATSERVER, "--local", "--replicas", "2", "--base-port", str(base),
                             "--data-dir", "data"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path)
    try:
        for port in (base, base + 1):
            try:
                wait_until(lambda port=port: query_status("127.0.0.1", port), timeout=30,
                           what=f"replica on {port} answering")
            except WaitTimeout:
                raise AssertionError((tmp_path / "local.log").read_text(errors="replace")[-3000:]) from None
        wait_until(lambda: any((query_status("127.0.0.1", p) or {}).get("serving") for p in (base, base + 1)),
                   timeout=30, what="one of the two serving")
        assert sorted(os.listdir(tmp_path / "data")) == sorted([str(base), str(base + 1), "cluster.secret"])
        _restart_by_printed_command(tmp_path, base + 1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert not port_open("127.0.0.1", base) and not port_open("127.0.0.1", base + 1)


@pytest.mark.parametrize("flag", ["--port", "--base-port", "--metrics-port"])
def test_a_port_out_of_range_is_a_usage_error(flag, capsys):
    for bad in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([flag, bad])
        assert exit_.value.code == 2 and "is not a port (1-65535)" in capsys.readouterr().err


def test_a_data_dir_of_another_node_is_refused_not_adopted(tmp_path):
    """A data directory records its node and address (chatnet/server/members.py): started with a
    --port naming another replica, it must not silently run as the recorded node."""
    from chatnet.replication.membership import Config
    from chatnet.server.cli import replica_identity
    from chatnet.server.config import cluster_id
    from chatnet.server.members import write_identity
    from chatnet.testing.cluster import write_secret

    peers = [Address("127.0.0.1", p) for p in (7100, 7101, 7102)]
    data_dir = str(tmp_path / "d")
    write_identity(data_dir, 2, cluster_id(peers), Config.initial(range(3), peers))  # node 2 = :7102
    secret = write_secret(str(tmp_path / "cluster.secret"))
    argv = ["--peers", ",".join(map(str, peers)), "--data-dir", data_dir, "--secret-file", secret]
    with pytest.raises(ConfigError, match=r"holds node 2 at 127.0.0.1:7102 .*not 127.0.0.1:7100"):
        replica_identity(build_parser().parse_args([*argv, "--port", "7100"]), peers)
    node, addresses, *_ = replica_identity(build_parser().parse_args([*argv, "--port", "7102"]), peers)
    assert node == 2 and addresses[2] == peers[2]


def test_the_status_table_names_a_removed_replica_removed():
    from chatnet.server.cli import status_row

    removed = {"role": "recovering", "serving": False, "removed": True, "view": 3, "members": []}
    assert status_row(SEED[2], removed, SEED).split()[1] == "removed"
    assert status_row(SEED[0], {**removed, "removed": False}, SEED).split()[1] == "recovering"


def test_status_exits_1_when_every_replica_refuses_the_secret(monkeypatch, tmp_path, capsys):
    from chatnet.server import cli
    from chatnet.testing.cluster import write_secret

    answers = {1538: {"error": "status proof refused: wrong cluster secret"}, 2538: None, 3538: None}
    monkeypatch.setattr(cli, "query_status", lambda host, port, **kw: answers[port])
    argv = ["--secret-file", write_secret(str(tmp_path / "s"))]
    assert cli.status_main(argv) == 1 and "refused" in capsys.readouterr().out
    answers[2538] = {"role": "primary", "serving": True, "view": 1, "members": [0, 1]}
    assert cli.status_main(argv) == 0
