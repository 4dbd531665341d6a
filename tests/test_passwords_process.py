"""Passwords (extension 2) against real server processes: the plain client end to end with
``CHATNET_PASSWORD``, its refusal without a password source, seed-style clients on password
accounts and under ``--require-passwords``, the window's hidden prompt, and a run after which
a known password is nowhere in the data directories (SQLite files included), the logs or the
status output, while the status counts the failed checks and the delayed attempts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import test_client_tui
from test_client_tui import KEY_UP, Term, client_env

from chatnet.protocol import texts
from chatnet.testing import CHATCLIENT, Cluster, RawClient, wait_until

SECRET = "Zebra-Quartz-9417-known"


def plain(server, lines, password=SECRET, tmp_path=None, extra_env=None):
    """``chatclient`` in plain mode, without a terminal (its own session)."""
    env = client_env()
    env.pop("CHATNET_PASSWORD")
    if password is not None:
        env["CHATNET_PASSWORD"] = password
    env.update(extra_env or {})
    if tmp_path is not None:
        env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    address = f"{server.host}:{server.port}" if hasattr(server, "host") else "%s:%d" % server
    result = subprocess.run([sys.executable, CHATCLIENT, "--servers", address, "--quiet"],
                            input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                            timeout=60, env=env, start_new_session=True)
    return result.stdout.splitlines()


def test_plain_client_end_to_end_with_chatnet_password(server, tmp_path):
    assert plain(server, ["create|alice"], tmp_path=tmp_path) == ["ok: Account created! Logged in as alice."]
    wrong = plain(server, ["login|alice"], password="not-it", tmp_path=tmp_path)
    assert wrong == ["error: " + texts.T_LOGIN_WRONG_PASSWORD.format(seconds=1)]
    raw = RawClient(server.host, server.port, line_mode=False)  # a seed-style client
    assert raw.request("2|alice").message == texts.T_LOGIN_NEEDS_PASSWORD
    raw.close()
    right = wait_until(lambda: (out := plain(server, ["login|alice", "send|alice|x"], tmp_path=tmp_path))
                       and out[0] == "ok: Logged in as alice." and out, what="the back-off to pass")
    assert right[-1] == "error: Cannot send messages to yourself."
    changed = plain(server, ["login|alice", "passwd"], tmp_path=tmp_path,
                    extra_env={"CHATNET_NEW_PASSWORD": SECRET + "2"})
    assert "ok: Password changed." in changed
    assert plain(server, ["login|alice", "delete"], password=SECRET + "2", tmp_path=tmp_path)[-1] \
        == "ok: Account alice has been deleted. You are now logged out."


def test_plain_client_without_a_password_source_says_so(server, tmp_path):
    out = plain(server, ["create|bob", "list"], password=None, tmp_path=tmp_path)
    assert out[0].startswith("refused: create|bob needs a password: set CHATNET_PASSWORD")
    assert out[1] == "ok: no accounts"  # nothing was created


def test_seed_style_clients_keep_working_without_the_flag(server):
    with RawClient(server.host, server.port, line_mode=False) as seed:
        assert seed.request("1|carol").message == "Account created! Logged in as carol."
    with RawClient(server.host, server.port, line_mode=False) as seed:
        assert seed.request("2|carol").message == "Logged in as carol."


def test_require_passwords(replica, tmp_path):
    server = replica("--require-passwords")
    with RawClient(server.host, server.port, line_mode=False) as seed:
        assert seed.request("1|dave").message == texts.T_POLICY_CREATE
        assert seed.request("2|dave").message == texts.T_POLICY_LOGIN
    assert plain(server, ["create|dave"], tmp_path=tmp_path) == ["ok: Account created! Logged in as dave."]
    with RawClient(server.host, server.port, line_mode=False) as seed:
        assert seed.request("2|dave").message == texts.T_POLICY_LOGIN


def test_the_window_asks_with_hidden_input(server, tmp_path, monkeypatch):
    env = client_env()
    env.pop("CHATNET_PASSWORD")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    monkeypatch.setattr(test_client_tui, "client_env", lambda: env)
    term = Term(server)
    try:
        term.wait_text("connected")
        term.enter("create|erin")
        term.wait(lambda: term.input().startswith("new password for erin:"), "the password question")
        term.type(SECRET)
        term.type("\r")
        term.wait(lambda: term.input().startswith("erin's password again:"), "the second question")
        assert SECRET not in term.text()
        term.type(SECRET + "\r")
        term.wait_text("Logged in as erin.")
        term.type(KEY_UP)  # Up: the line history has the command, never the password
        term.wait(lambda: term.input().endswith("create|erin"), "the command recalled")
        assert SECRET not in term.text()
    finally:
        term.child.terminate(force=True)


def test_a_known_password_is_nowhere_after_a_run_and_status_counts(tmp_path):
    with Cluster(str(tmp_path / "cluster"), n=2) as cluster:
        primary = cluster.addresses[cluster.wait_primary()]
        out = plain(primary, ["create|frank", "passwd"], tmp_path=tmp_path,
                    extra_env={"CHATNET_NEW_PASSWORD": SECRET + "-new"})
        assert "ok: Password changed." in out
        with RawClient(*primary) as raw:
            raw.request("0|ext|1")
            raw.request("0|ext|2")
            assert raw.request(f"0|login|frank|{SECRET}").status == 1  # the old one: refused
            assert raw.request(f"0|login|frank|{SECRET}x").status == 1  # delayed, then refused
            assert raw.request(f"0|login|frank|{SECRET}-new").message == "Logged in as frank."
        cluster.wait_in_sync()
        statuses = cluster.statuses()
        counters = statuses[cluster.primary()]["passwords"]
        assert counters["failed_checks"] == 2 and counters["delayed_attempts"] >= 1
        status_text = subprocess.run(
            [sys.executable, os.path.join(os.path.dirname(CHATCLIENT), "chatserver"), "status", "--json",
             "--peers", cluster.peers, "--secret-file", cluster.secret_file],
            capture_output=True, text=True, timeout=30).stdout + json.dumps(statuses)
    for where, data in _everything(tmp_path):
        assert SECRET.encode() not in data, f"the password is in {where}"
    assert SECRET not in status_text and "scrypt$" not in status_text


def _everything(root):
    """Every file under ``root`` (stores with their -wal files, logs, client state), as bytes."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                yield path, f.read()
