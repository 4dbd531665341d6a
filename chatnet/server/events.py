"""Operator events of a replica host: the state changes an operator cares about, each logged as
one line with its fields (``extra=``; see chatnet/server/logformat.py) and counted in the
metrics when there are any.

The replication core is sans-I/O and logs nothing; this watcher compares what the core shows
after each loop iteration (role, view, primary, members: a few attribute reads) and, once per
tick, which peers the primary is catching up (learners).  It runs in the real server and in the
simulator alike and never changes what the host does.
"""

from __future__ import annotations

import logging

log = logging.getLogger("chatnet.server.events")


class HostEvents:
    def __init__(self, host) -> None:
        self.host = host
        self.metrics = None  # a metrics.ReplicaMetrics, when the server exports metrics
        self._last: tuple | None = None  # (role, view, primary, members)
        self._learners: frozenset = frozenset()

    def _name(self, member) -> str:
        return str(self.host._name(member)) if member is not None else None

    def after_cycle(self) -> None:
        r = self.host.replica
        now = (r.role, r.view, r.primary, r.members)
        last, self._last = self._last, now
        if last is None or now == last:
            return
        role, view, primary, members = now
        fields = {"role": role, "view": view, "primary": self._name(primary),
                  "members": [self._name(m) for m in members]}
        if view != last[1]:
            log.info("entered view %d: primary %s, members %s, role %s", view, fields["primary"],
                     ",".join(fields["members"]), role, extra={"event": "view_change", **fields,
                                                                "previous_view": last[1]})
            if self.metrics is not None:
                self.metrics.view_changes.inc()
        if role != last[0]:
            log.info("role %s -> %s (view %d)", last[0], role, view,
                     extra={"event": "role_change", "previous_role": last[0], **fields})

    def tick(self) -> None:
        """Once per heartbeat: peers the primary started or stopped catching up."""
        learners = frozenset(self.host.replica.status().get("learners", ()))
        if learners == self._learners:
            return
        if self.host.replica.role != "primary":  # stepped down: its catch-ups simply stop
            self._learners = learners
            return
        members = set(self.host.replica.members)
        for peer in sorted(learners - self._learners):
            log.info("catching up %s before it rejoins the view", self._name(peer),
                     extra={"event": "catchup_start", "peer": self._name(peer)})
        for peer in sorted(self._learners - learners):
            joined = peer in members
            log.info("catch-up of %s ended: %s", self._name(peer), "rejoined the view" if joined else "dropped",
                     extra={"event": "catchup_end", "peer": self._name(peer), "rejoined": joined})
        self._learners = learners

    def snapshot_sent(self, peer: int, index: int, size: int) -> None:
        log.info("sending a snapshot at index %d (%d bytes) to %s", index, size, self._name(peer),
                 extra={"event": "snapshot_sent", "peer": self._name(peer), "index": index, "bytes": size})
        if self.metrics is not None:
            self.metrics.snapshots.inc("sent")
            self.metrics.snapshot_bytes.set(size)

    def snapshot_installed(self, index: int, size: int) -> None:
        log.info("installed a snapshot at index %d (%d bytes)", index, size,
                 extra={"event": "snapshot_installed", "index": index, "bytes": size})
        if self.metrics is not None:
            self.metrics.snapshots.inc("installed")
            self.metrics.snapshot_bytes.set(size)
