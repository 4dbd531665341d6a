#!/usr/bin/env python3
"""Try a multi-machine chatnet deployment on one box: three replicas on three "machines".

    sudo python3 bench/netns_cluster.py [--keep SECONDS] [--messages N]

Each replica runs in a network namespace of its own with its own address (10.213.X.1, .2, .3 on
a /24), joined to the others by a veth pair per namespace on a bridge that this script creates
(the bridge holds .254, so this box — the "client machine" — reaches them; nothing else of the
host's network is touched).  It starts ``bin/chatserver`` in each namespace with the same
``--peers`` list and secret file (exactly the several-machines recipe of the README), shows
``chatserver status``, then drives a chat with two ``bin/chatclient --plain`` processes, alice
and bob, pointed at the three addresses; kills -9 the primary; and shows the chat going on
through the new primary.  With ``--keep S`` it waits S seconds before tearing down, so you can
run your own ``bin/chatclient --servers ...`` (the command is printed) meanwhile.

Everything it made — processes, namespaces, links, the temporary directory — is removed at the
end, also on Ctrl-C or an error; namespaces and links left by a run that was SIGKILLed are swept
at the next start.  The namespace plumbing is bench/chaos.py's ``Netns``.  Needs root and
iproute2 (``ip``).  Exit status: 0 when the chat continued after the kill, 1 when it did not, 2
when the namespaces could not be made.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.chaos import Netns, NetnsError  # noqa: E402
from chatnet.testing import CHATCLIENT, CHATSERVER, Cluster  # noqa: E402


class DemoNetns(Netns):
    PREFIX = "chatnet-demo-"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Client:
    """One ``chatclient --plain`` process; its output lines are printed (prefixed with the
    user's name) and kept, so the script can wait for a given line."""

    def __init__(self, name: str, servers: str, state_dir: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, CHATCLIENT, "--plain", "--servers", servers, "--state-dir", state_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            print(f"   [{self.name}] {line.rstrip()}", flush=True)
            self.lines.put(line)

    def type(self, line: str) -> None:
        print(f"   [{self.name}] > {line}", flush=True)
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, text: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if text in self.lines.get(timeout=left):
                    return True
            except queue.Empty:
                break
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.type("exit")
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def show_status(cluster: Cluster) -> None:
    subprocess.run([sys.executable, CHATSERVER, "status", "--peers", cluster.peers,
                    "--secret-file", cluster.secret_file], timeout=30)


def chat(cluster: Cluster, workdir: str, messages: int, keep: float) -> bool:
    """The demonstration proper: chat, kill the primary, chat on.  True if it went on."""
    servers = cluster.peers
    alice = Client("alice", servers, os.path.join(workdir, "alice"))
    bob = Client("bob", servers, os.path.join(workdir, "bob"))
    try:
        say("alice and bob connect to the cluster (bin/chatclient --plain --servers " + servers + ")")
        bob.type("create|bob")
        alice.type("create|alice")
        if not (bob.wait_for("ok:") and alice.wait_for("ok:")):
            return False
        for i in range(1, messages + 1):
            alice.type(f"send|bob|hello {i} before the kill")
        if not bob.wait_for(f"hello {messages} before the kill"):
            return False
        primary = cluster.wait_primary()
        victim = cluster.replicas[primary]
        say(f"kill -9 the primary {victim.host}:{victim.port} (pid {victim.pid})")
        killed = time.monotonic()
        cluster.kill(primary)
        for i in range(1, messages + 1):
            alice.type(f"send|bob|hello {i} after the kill")
        went_on = bob.wait_for(f"hello {messages} after the kill", timeout=30)
        if went_on:
            say(f"the chat went on: bob had every chat {time.monotonic() - killed:.1f}s after the kill")
        show_status(cluster)
        if keep > 0:
            say(f"try it yourself for {keep:g}s: {CHATCLIENT} --servers {servers}")
            time.sleep(keep)
        return went_on
    finally:
        alice.stop()
        bob.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3, help="chats alice sends before and after the kill")
    parser.add_argument("--keep", type=float, default=0.0, metavar="SECONDS",
                        help="keep the cluster up this long at the end, to try it by hand")
    args = parser.parse_args(argv)
    netns = DemoNetns(3)
    try:
        hosts = netns.setup()
    except NetnsError as exc:
        print(f"netns_cluster: cannot make the namespaces: {exc}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="chatnet-netns-")
    cluster = None
    try:
        say(f"three machines: namespaces {', '.join(netns.names)} with addresses {', '.join(hosts)}")
        cluster = Cluster(workdir, hosts=hosts, ports=[1538] * 3, log_level="INFO",
                          prefixes=[netns.prefix(i) for i in range(3)])
        for r in cluster.replicas:
            print("   " + " ".join(r.command()), flush=True)
        cluster.start()
        cluster.wait_primary(timeout=30)
        cluster.wait_in_sync(timeout=30)
        say("chatserver status")
        show_status(cluster)
        ok = chat(cluster, workdir, args.messages, args.keep)
        say("PASS: the chat continued after the primary was killed" if ok else "FAIL: the chat did not continue")
        if not ok:
            print(cluster.log_tail(), flush=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if cluster is not None:
            cluster.stop()
        netns.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        print("netns_cluster: namespaces, links and processes removed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
