"""Metrics: counters, gauges and histograms, the Prometheus text format, and its HTTP endpoint.

Threading: only the replica's loop thread changes a :class:`Registry`.  The loop calls
:meth:`Registry.publish` every ``PUBLISH_INTERVAL`` seconds, which copies every value into an
immutable snapshot and swaps one reference; the HTTP thread (:class:`MetricsServer`, stdlib
``http.server`` on a daemon thread) only renders the latest published snapshot.  So a scrape
never touches loop state, never sees a half-updated histogram, and the loop never waits for a
scraper (a slow or hostile one only ties up its own handler thread).

:class:`ReplicaMetrics` is the set of chatnet metrics (each documented in
docs/operations.md, "Metrics"); the registry and :func:`render` are generic and pure.
"""

from __future__ import annotations

import bisect
import collections
import http.server
import logging
import os
import threading
import time

from ..protocol.codec import STATUS_ERROR, STATUS_NOTE, STATUS_OK

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 0.5  # seconds between snapshots the loop publishes for scrapers
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Metric:
    kind = ""
    starts_at_zero = False  # an unlabelled series of this kind exists from the start, at 0

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.values: dict[tuple, object] = {}
        if self.starts_at_zero and not self.labels:
            # a scrape shows it before its first update (a TYPE line with no sample is what
            # chatnet_snapshot_bytes showed until a snapshot was sent or installed)
            self.values[()] = 0

    def _key(self, labels: tuple) -> tuple:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {labels}")
        return tuple(str(v) for v in labels)

    def clear(self) -> None:
        """Forget every labelled series (say, peers that are no longer followed)."""
        self.values.clear()

    def copy_values(self) -> tuple:
        return tuple(sorted(self.values.items()))


class Counter(_Metric):
    kind = "counter"
    starts_at_zero = True

    def inc(self, *labels, amount: float = 1) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0) + amount


class Gauge(_Metric):
    kind = "gauge"
    starts_at_zero = True

    def set(self, value: float, *labels) -> None:
        self.values[self._key(labels)] = value


class Histogram(_Metric):
    """Cumulative buckets as Prometheus wants them; per series [counts per bucket, sum, count]."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        if not self.labels:
            self.values[()] = [[0] * len(self.buckets), 0.0, 0]

    def observe(self, value: float, *labels) -> None:
        key = self._key(labels)
        series = self.values.get(key)
        if series is None:
            series = self.values[key] = [[0] * len(self.buckets), 0.0, 0]
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            series[0][i] += 1
        series[1] += value
        series[2] += 1

    def copy_values(self) -> tuple:
        return tuple(sorted((key, (tuple(counts), total, n)) for key, (counts, total, n) in self.values.items()))


class Registry:
    """The metrics of one process; ``publish`` makes a snapshot that another thread may render."""

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []
        self._published: tuple = ()

    def _add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self.metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self.metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labels=()) -> Counter:
        return self._add(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels=()) -> Gauge:
        return self._add(Gauge(name, help_text, labels))

    def histogram(self, name: str, help_text: str, labels=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help_text, labels, buckets))

    def snapshot(self) -> tuple:
        """Every metric's values, copied: (kind, name, help, label names, buckets, values)."""
        return tuple((m.kind, m.name, m.help, m.labels, getattr(m, "buckets", ()), m.copy_values())
                     for m in self.metrics)

    def publish(self) -> None:
        """Loop thread: make the current values what scrapers see (one reference swap)."""
        self._published = self.snapshot()

    @property
    def published(self) -> tuple:
        return self._published


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(names: tuple, values: tuple, extra: tuple = ()) -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in (*zip(names, values), *extra)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def render(snapshot: tuple) -> str:
    """The Prometheus text exposition format (0.0.4) of a :meth:`Registry.snapshot`."""
    lines = []
    for kind, name, help_text, names, buckets, values in snapshot:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for key, value in values:
            if kind != "histogram":
                lines.append(f"{name}{_labels(names, key)} {_number(value)}")
                continue
            counts, total, n = value
            running = 0
            for bound, count in zip(buckets, counts):
                running += count
                lines.append(f"{name}_bucket{_labels(names, key, (('le', _number(float(bound))),))} {running}")
            lines.append(f"{name}_bucket{_labels(names, key, (('le', '+Inf'),))} {n}")
            lines.append(f"{name}_sum{_labels(names, key)} {_number(total)}")
            lines.append(f"{name}_count{_labels(names, key)} {n}")
    return "\n".join(lines) + "\n"


# -- chatnet's metrics ---------------------------------------------------------------------------

OP_NAMES = {0: "ext", 1: "create", 2: "login", 3: "send", 4: "list", 5: "delete", 6: "exit", 7: "resume"}
_EXT_VERBS = frozenset({"create", "login", "send", "delete", "passwd"})  # op-0 verbs counted by name
OUTCOMES = {STATUS_OK: "ok", STATUS_ERROR: "error", STATUS_NOTE: "note"}
ROLES = ("primary", "backup", "electing", "recovering")


def frame_status(data: bytes) -> tuple[int, int] | None:
    """(status, indicator) of an encoded response frame, or None if it is not one.  The
    length character is 1 to 3 UTF-8 bytes (codec.MAX_FRAME_BYTES), then one byte each."""
    if not data:
        return None
    lead = data[0]
    skip = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3
    if len(data) < skip + 2:
        return None
    return data[skip], data[skip + 1] - 0x30


class ReplicaMetrics:
    """Every chatnet metric, and the few hooks the loop calls to update them.

    Request outcomes: :meth:`request_started` when a request is handed to the service,
    :meth:`answered` for each frame written to that connection; the first non-chat frame after
    a request is its answer (status ok / error / note — a note is a backup's redirect)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        r = self.registry = Registry()
        self.chats = r.counter("chatnet_chats_total", "chats stored on this replica (committed sends that "
                                                      "reached a mailbox)")
        self.requests = r.counter("chatnet_requests_total", "client requests handled, by op and outcome",
                                  ("op", "outcome"))
        self.request_seconds = r.histogram("chatnet_request_seconds",
                                           "time from a request being handled to its answer being released", ("op",))
        self.store_seconds = r.histogram("chatnet_store_commit_seconds",
                                         "duration of one store transaction (group commit, fsync included)")
        self.replication_seconds = r.histogram(
            "chatnet_replication_seconds", "primary: time from appending an entry to its commit (durable on every member)")
        self.view_changes = r.counter("chatnet_view_changes_total", "views this replica entered")
        self.snapshots = r.counter("chatnet_snapshots_total", "snapshots sent to peers or installed here", ("direction",))
        self.snapshot_bytes = r.gauge("chatnet_snapshot_bytes", "size of the last snapshot sent or installed")
        self.slow_dropped = r.counter("chatnet_slow_clients_dropped_total", "clients disconnected for not reading")
        self.refused = r.counter("chatnet_connections_refused_total", "client connections refused at a limit",
                                 ("limit",))
        self.stalls = r.counter("chatnet_loop_stalls_total", "times the loop found it had stalled (paused)")
        self.gauges = {name: r.gauge(f"chatnet_{name}", text) for name, text in (
            ("view", "the view this replica is in"),
            ("serving", "1 when this replica serves clients as primary"),
            ("members", "replicas in the current view"),
            ("last_index", "last log index"),
            ("commit_index", "commit index"),
            ("applied_index", "last log index applied to the chat state"),
            ("snapshot_index", "log index the retained log starts after (compaction point)"),
            ("log_entries", "log entries retained for catch-up"),
            ("accounts", "accounts in the chat state"),
            ("clients", "client connections (counted once identified as clients)"),
            ("connections", "open client sockets, including ones not yet identified"),
        )}
        self.role = r.gauge("chatnet_role", "1 for this replica's current role", ("role",))
        self.peer_lag = r.gauge("chatnet_peer_lag_entries", "primary: entries a follower lacks", ("peer",))
        self.peer_reachable = r.gauge("chatnet_peer_reachable", "1 when the peer answers heartbeats", ("peer",))
        self.timed_storage = None  # the TimedStorage feeding chatnet_store_commit_seconds, if any
        self._pending: dict[int, tuple[str, float]] = {}  # conn -> (op, handed to the service at)
        self._proposed: list[tuple[int, float]] = []  # primary: (log index, appended at), in order

    # -- requests ----------------------------------------------------------------------------
    def request_started(self, conn: int, op: int | None, args: tuple = ()) -> None:
        """``op`` None: a request that did not parse.  An extension request (op 0) counts under
        its verb when the verb is an op's (``0|send|RID|..``, ``0|login|..``: what chatclient
        sends), so a send is a ``send`` whichever client made it; an ``ack`` has no answer and
        is not counted."""
        if op == 0 and args:
            if args[0] == "ack":
                return
            name = args[0] if args[0] in _EXT_VERBS else "ext"
        else:
            name = OP_NAMES.get(op, "other") if op is not None else "invalid"
        self._pending[conn] = (name, self.clock())

    def answered(self, conn: int, data: bytes) -> None:
        """A frame for ``conn`` is released: if it answers its pending request, count it."""
        if conn not in self._pending:
            return
        status = frame_status(data)
        if status is None or status[1] != 0:  # a chat frame is not an answer
            return
        op, started = self._pending.pop(conn)
        self.requests.inc(op, OUTCOMES.get(status[0], "other"))
        self.request_seconds.observe(self.clock() - started, op)

    def closed(self, conn: int) -> None:
        pending = self._pending.pop(conn, None)
        if pending is not None:
            self.requests.inc(pending[0], "closed")

    # -- replication ---------------------------------------------------------------------------
    def cycle(self, started: float, last_before: int, replica) -> None:
        """After one loop iteration: entries this primary appended in it were proposed at
        ``started``; every recorded entry now committed has taken its replication time."""
        if self.timed_storage is not None:
            self.timed_storage.poll()
        proposed = self._proposed
        if replica.serving and replica.last_index > last_before:
            proposed.extend((i, started) for i in range(last_before + 1, replica.last_index + 1))
        elif not replica.serving and proposed:
            proposed.clear()  # entries of a view we no longer lead: never counted
            return
        if proposed and proposed[0][0] <= replica.commit_index:
            now = self.clock()
            cut = bisect.bisect_right(proposed, (replica.commit_index, float("inf")))
            for _, at in proposed[:cut]:
                self.replication_seconds.observe(now - at)
            del proposed[:cut]

    def sample(self, status: dict, peers, match: dict, clients: int, connections: int) -> None:
        """Gauges from the replica's status (called on the loop thread before publishing)."""
        peers = peers if isinstance(peers, dict) else dict(enumerate(peers))  # node id -> name
        g = self.gauges
        for name in ("view", "last_index", "commit_index", "applied_index", "snapshot_index"):
            g[name].set(status.get(name, 0))
        g["serving"].set(int(bool(status.get("serving"))))
        g["members"].set(len(status.get("members", ())))
        g["log_entries"].set(status.get("last_index", 0) - status.get("snapshot_index", 0))
        g["accounts"].set(status.get("accounts", 0))
        g["clients"].set(clients)
        g["connections"].set(connections)
        for role in ROLES:
            self.role.set(int(status.get("role") == role), role)
        self.peer_lag.clear()
        if status.get("role") == "primary":
            followers = set(status.get("members", ())) | set(status.get("learners", ()))
            for peer, matched in match.items():
                if peer in followers and peer != status.get("id") and peer in peers:
                    self.peer_lag.set(max(0, status.get("last_index", 0) - matched), peers[peer])
        self.peer_reachable.clear()
        reachable = set(status.get("reachable", ()))
        for peer in peers:
            if peer != status.get("id"):
                self.peer_reachable.set(int(peer in reachable), peers[peer])


class MetricsError(Exception):
    """The metrics endpoint cannot listen (port taken, address not local)."""


class MetricsServer:
    """``GET /metrics`` on its own daemon thread, rendering the registry's published snapshot.

    ``store_path`` (the database file) is stat-ed by the HTTP thread at each scrape, so the
    loop never does that file I/O."""

    def __init__(self, registry: Registry, host: str, port: int, store_path: str | None = None):
        self.registry, self.store_path = registry, store_path
        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), _handler_class(self))
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {exc}") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def text(self) -> str:
        snapshot = self.registry.published
        extra = ""
        if self.store_path:
            size = 0
            for suffix in ("", "-wal"):
                try:
                    size += os.stat(self.store_path + suffix).st_size
                except OSError:
                    pass
            extra = ("# HELP chatnet_store_bytes size of the database and its WAL (read at scrape)\n"
                     f"# TYPE chatnet_store_bytes gauge\nchatnet_store_bytes {size}\n")
        return render(snapshot) + extra

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler_class(server: MetricsServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5  # a scraper that sends nothing is dropped, it never holds a thread for long

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served here")
                return
            body = server.text().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # noqa: A002
            log.debug("metrics: %s %s", self.address_string(), format % args)

    return Handler


class TimedStorage:
    """A store whose transactions are timed into ``chatnet_store_commit_seconds``, with a
    counter of new chats (:meth:`count_chats`, which the host calls as it applies them);
    everything else goes to the store itself.  All of it runs on the loop thread.

    Both storage interfaces are covered: ``commit(batch)`` (durable when it returns), and
    ``submit(batch)`` returning a batch number with ``durable`` counting the batches on disk
    (a writer that may finish later): a submitted batch's time runs until the loop sees it
    durable (:meth:`poll`, after each loop iteration)."""

    def __init__(self, storage, metrics: ReplicaMetrics):
        self._storage, self._metrics = storage, metrics
        self._waiting: collections.deque = collections.deque()  # (batch number, submitted at)
        metrics.timed_storage = self

    def count_chats(self, chats: int) -> None:
        """The host applied ``chats`` new chats (counted as applied: a batch may write none)."""
        self._metrics.chats.inc(amount=chats)

    def commit(self, batch) -> None:
        clock = self._metrics.clock
        started = clock()
        self._storage.commit(batch)
        self._metrics.store_seconds.observe(clock() - started)

    def submit(self, batch) -> int:
        started = self._metrics.clock()
        number = self._storage.submit(batch)
        self._waiting.append((number, started))
        self.poll()
        return number

    def poll(self) -> None:
        durable = getattr(self._storage, "durable", None)
        if not self._waiting or durable is None:
            return
        now = self._metrics.clock()
        while self._waiting and self._waiting[0][0] <= durable:
            self._metrics.store_seconds.observe(now - self._waiting.popleft()[1])

    def __getattr__(self, name: str):
        return getattr(self._storage, name)
