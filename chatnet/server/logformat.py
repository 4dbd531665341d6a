"""Log formats of ``chatserver``: the human one, and ``--log-format json`` for machines.

A state change an operator cares about is logged as one record whose ``extra=`` fields say what
happened (``event``) and its facts (``view``, ``primary``, ``peer``, ...); docs/operations.md,
"Logs", lists every event.  The text format shows only the message, which already says it in
words; the JSON format writes one object per line with the standard fields (``ts``, ``level``,
``logger``, ``replica``, ``msg``) and every extra field, so a log shipper needs no parsing.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def event_fields(record: logging.LogRecord) -> dict:
    """The ``extra=`` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601 with milliseconds), level, logger, replica
    (this replica's address), msg, the event's fields, and exc for a traceback."""

    def __init__(self, replica: str = ""):
        super().__init__()
        self.replica = replica

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
               "replica": self.replica, "msg": record.getMessage()}
        for key, value in event_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str, replica: str, port: int | str) -> None:
    """Configure the root logger on stderr: ``text`` (the default) or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(replica))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {port} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
