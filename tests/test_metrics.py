"""Metrics: the registry and its Prometheus text (unit), and a real replica's /metrics scraped
over HTTP while it chats; every metric it exports is documented in docs/operations.md."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request

import pytest

from chatnet.protocol.codec import INDICATOR_CHAT, INDICATOR_SERVER, STATUS_ERROR, STATUS_OK, encode_frame
from chatnet.server.metrics import Registry, ReplicaMetrics, frame_status, render
from chatnet.testing import ROOT, RawClient, free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def test_render_counters_gauges_and_cumulative_histograms():
    r = Registry()
    c = r.counter("x_total", "things", ("op",))
    c.inc("a")
    c.inc("a", amount=2)
    c.inc('q"uote\\')
    r.gauge("y", "level").set(2.5)
    h = r.histogram("z_seconds", "time", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 7.0):
        h.observe(v)
    r.publish()
    c.inc("a")  # after publishing: scrapers do not see it yet
    text = render(r.published)
    assert 'x_total{op="a"} 3\n' in text and 'x_total{op="q\\"uote\\\\"} 1\n' in text
    assert "# TYPE x_total counter" in text and "y 2.5\n" in text
    assert 'z_seconds_bucket{le="0.1"} 1\nz_seconds_bucket{le="1"} 3\nz_seconds_bucket{le="+Inf"} 4\n' in text
    assert "z_seconds_sum 8.05\nz_seconds_count 4\n" in text
    assert 'x_total{op="a"} 4' in render(r.snapshot())


def test_request_outcomes_and_replication_time():
    now = [10.0]
    m = ReplicaMetrics(clock=lambda: now[0])
    assert frame_status(encode_frame(STATUS_ERROR, INDICATOR_SERVER, "é" * 100)) == (STATUS_ERROR, 0)
    m.request_started(1, 3)
    m.answered(1, encode_frame(STATUS_OK, INDICATOR_CHAT, "bob|live chat is not an answer"))
    now[0] = 10.25
    m.answered(1, encode_frame(STATUS_OK, INDICATOR_SERVER, "Message sent to bob."))
    m.request_started(2, None)
    m.closed(2)
    m.request_started(3, 0, ("send", "r1", "bob", "hi"))  # chatclient's send: a send too
    m.answered(3, encode_frame(STATUS_OK, INDICATOR_SERVER, "Message sent to bob."))
    m.request_started(3, 0, ("ack", "7"))  # no answer: not counted
    m.request_started(3, 0, ("ext", "1"))
    m.answered(3, encode_frame(STATUS_OK, INDICATOR_SERVER, "extension on"))
    assert m.requests.values == {("send", "ok"): 2, ("invalid", "closed"): 1, ("ext", "ok"): 1}
    assert m.request_seconds.values[("send",)][1] == 0.25

    class Core:
        serving, last_index, commit_index = True, 5, 3
    m.cycle(9.0, 2, Core)  # entries 3..5 appended in a cycle that started at 9.0; 3 committed
    assert m.replication_seconds.values[()][2] == 1
    Core.commit_index = 5
    m.cycle(10.0, 5, Core)
    assert m.replication_seconds.values[()][2] == 3


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def sample(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_a_replica_serves_its_metrics(replica):
    port = free_port()
    server = replica("--metrics-port", str(port))
    alice, bob = RawClient(*server.addr), RawClient(*server.addr)
    alice.request("1|alice")
    bob.request("1|bob")
    for i in range(5):
        assert alice.request(f"3|bob|hello {i}").message.startswith("Message sent")
        assert bob.frame().indicator == INDICATOR_CHAT
    assert alice.request("3|nobody|hi").status == STATUS_ERROR
    def published():
        text = scrape(port)
        return text if sample(text, "chatnet_chats_total") == 5 else None
    text = wait_until(published, timeout=10, what="the chats in the metrics")
    assert sample(text, "chatnet_requests_total", '{op="send",outcome="ok"}') == 5
    assert sample(text, "chatnet_requests_total", '{op="send",outcome="error"}') == 1
    assert sample(text, "chatnet_request_seconds_count", '{op="send"}') == 6
    assert sample(text, "chatnet_replication_seconds_count") >= 7
    assert sample(text, "chatnet_store_commit_seconds_count") >= 7
    assert sample(text, "chatnet_serving") == 1 and sample(text, "chatnet_role", '{role="primary"}') == 1
    assert sample(text, "chatnet_clients") == 2 and sample(text, "chatnet_accounts") == 2
    assert sample(text, "chatnet_store_bytes") > 0
    assert sample(text, "chatnet_snapshot_bytes") == 0  # no snapshot yet: shown at 0, not left out
    with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as f:
        docs = f.read()
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    undocumented = [n for n in names if not re.search(rf"`{n}[`{{]", docs)]
    assert not undocumented, f"metrics missing from docs/operations.md: {undocumented}"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/secret", timeout=5)


def test_timed_storage_covers_commit_and_submit():
    from chatnet.server.metrics import TimedStorage
    from chatnet.server.storage import Batch

    class Later:  # a writer that finishes batches when told to
        durable, submitted = 0, 0

        def submit(self, batch):
            self.submitted += 1
            return self.submitted

        def commit(self, batch):
            pass

    now = [0.0]
    m = ReplicaMetrics(clock=lambda: now[0])
    inner = Later()
    store = TimedStorage(inner, m)
    store.commit(Batch(entries=[(1, 1, b"x")]))
    store.count_chats(1)
    assert store.submit(Batch(entries=[(2, 1, b"y")])) == 1
    store.count_chats(1)
    assert m.chats.values[()] == 2 and m.store_seconds.values[()][2] == 1
    now[0], inner.durable = 0.5, 1
    store.poll()
    assert m.store_seconds.values[()][2] == 2 and m.store_seconds.values[()][1] == 0.5
    assert store.durable == 1  # everything else is the store's own
