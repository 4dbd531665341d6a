"""Cluster-test workload: senders chatting to a sink through failovers, and the loss check.

The processes, clients and waits are the shared harness's (``chatnet.testing``); what is here
is specific to the cluster tests: what a sender records and what "nothing lost" means.
"""

from __future__ import annotations

import threading
import time

from chatnet.testing import FailoverClient, NoPrimary


class Load:
    """Senders chatting to a sink account in a loop, recording every acknowledged text."""

    def __init__(self, addresses, sink: str, senders: int = 4, prefix: str = "s", client=FailoverClient):
        self.addresses = addresses
        self.client = client  # the client class (a test may count what its clients do)
        self.clients: dict = {}  # sender name -> its client
        self.sink = sink
        self.acked: dict[str, list[str]] = {}
        self.ack_times: list[float] = []
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(f"{prefix}{i}",), daemon=True)
                        for i in range(senders)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def _run(self, name: str) -> None:
        client = self.clients[name] = self.client(self.addresses, name, create=True)
        self.acked[name] = []
        i = 0
        while not self.stop_flag.is_set():
            text = f"{name}-{i}"
            try:
                f = client.request(f"3|{self.sink}|{text}")
            except NoPrimary:  # every retry failed within its deadline: send it again
                continue
            if f.status == 0 and f.message.startswith("Message sent"):
                with self.lock:
                    self.acked[name].append(text)
                    self.ack_times.append(time.monotonic())
            i += 1
        client.close()

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.acked.values())

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=40)


def drain_mailbox(addresses, name: str) -> list[str]:
    """Log in as ``name`` and return the texts of every queued chat."""
    client = FailoverClient(addresses, name)
    texts = [f.message.split("|", 1)[1] for f in client.pending]
    client.close()
    return texts


def assert_nothing_lost(load: Load, received: list[str]) -> None:
    got = set(received)
    for name, texts in load.acked.items():
        missing = [t for t in texts if t not in got]
        assert not missing, f"{name}: {len(missing)} acknowledged chats lost, e.g. {missing[:5]}"
        mine = [t for t in received if t.startswith(name + "-")]
        numbers = [int(t.rsplit("-", 1)[1]) for t in mine]
        deduped = list(dict.fromkeys(numbers))
        assert deduped == sorted(deduped), f"{name}: chats out of order"
