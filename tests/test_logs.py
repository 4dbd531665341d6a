"""`--log-format json`: one JSON object per line, with each operator event's fields (unit: the
formatter; real process: start, serving, a connection limit, shutdown)."""

from __future__ import annotations

import json
import logging
import signal

import pytest

from chatnet.server.logformat import JsonFormatter, event_fields
from chatnet.testing import RawClient, wait_until

pytestmark = pytest.mark.timeout(60)


def test_json_formatter_puts_event_fields_beside_the_message():
    record = logging.LogRecord("chatnet.server.events", logging.INFO, __file__, 1, "entered view %d", (4,), None)
    record.__dict__.update(event="view_change", view=4, members=["10.0.0.1:1538"])
    line = JsonFormatter("10.0.0.1:1538").format(record)
    obj = json.loads(line)
    assert "\n" not in line
    assert obj["msg"] == "entered view 4" and obj["level"] == "INFO" and obj["replica"] == "10.0.0.1:1538"
    assert obj["event"] == "view_change" and obj["view"] == 4 and obj["members"] == ["10.0.0.1:1538"]
    assert obj["ts"].endswith("Z")
    assert event_fields(logging.LogRecord("x", logging.INFO, "", 0, "plain", (), None)) == {}


def events(server) -> list[dict]:
    lines = [line for line in server.log().splitlines() if not line.startswith("--- start")]
    return [json.loads(line) for line in lines]  # every line is JSON


def test_a_replica_logs_its_events_as_json(replica):
    server = replica("--log-format", "json", "--max-connections", "1")
    first = RawClient(*server.addr)
    assert first.request("1|alice").status == 0
    second = RawClient(*server.addr)
    second.send("4|*")
    assert "full" in second.frame().message
    wait_until(lambda: any(e.get("event") == "connection_limit" for e in events(server)), timeout=10,
               what="the connection-limit line")
    server.signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    got = {e.get("event"): e for e in events(server)}
    assert got["started"]["address"] == f"{server.host}:{server.port}"
    assert got["serving"]["view"] == 0 and got["serving"]["members"] == [f"{server.host}:{server.port}"]
    limit = got["connection_limit"]
    assert limit["limit"] == "max_connections" and limit["client"] == "127.0.0.1" and limit["refused"] == 1
    assert got["shutdown"]["reason"] == "SIGTERM"
