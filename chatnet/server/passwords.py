"""Account passwords (extension 2, docs/protocol.md): salted scrypt records, hashing off the
loop thread, and the back-off that makes guessing slow.

**Records.**  A password is never stored, logged or replicated: the replica that receives it
computes ``scrypt$N$r$p$SALT$HASH`` (hex salt and hash, :func:`make_record`) before it proposes
anything, and only that record enters the log, the store and snapshots.  The parameters travel
with the record, so a replica checks a password with the parameters it was hashed with, and
stronger parameters can be adopted later without invalidating old records.

**Off the loop.**  scrypt costs tens of milliseconds and 16 MiB by design, far too long for the
reactor thread, so the chat service never calls it: it queues :class:`HashJob` objects, the
replica host hands them to a *hasher*, and the finished jobs come back as input to the service
in a later loop iteration.  :class:`ThreadHasher` (the real server) runs them on a small thread
pool and wakes the reactor through a socket pair when one is done; :class:`InlineHasher` (the
tests and the deterministic simulator) runs them at once, so a run stays reproducible.

**Back-off.**  :class:`Throttle` is sans-I/O (times are passed in).  Every failed password check
doubles the wait before the next check for that account, and for that client address, up to a
cap; a success clears both.  An attempt that arrives too early is *delayed*, never refused, and
attempts on one account are not queued behind each other, so an attacker can slow the owner's
login by at most the account cap (:data:`ACCOUNT_CAP`) but never lock them out.  Attempts from
one address *are* serialised (each waiting attempt books the next slot), so one address guesses
at most once per delay, which grows to :data:`ADDRESS_CAP`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..protocol.texts import MAX_PASSWORD_CHARS

SALT_BYTES = 16
HASH_BYTES = 32
DEFAULT_PARAMS = (1 << 14, 8, 1)  # N, r, p: about 16 MiB and 30-60 ms per hash
MAX_MEMORY = 64 * 1024 * 1024  # scrypt maxmem: records with larger parameters are refused
HASH_THREADS = 2

BASE_DELAY = 1.0  # seconds after the first failure; doubled by each further one
ACCOUNT_CAP = 30.0  # the longest an account's attempts wait: the owner is never locked out
ADDRESS_CAP = 300.0  # the longest an address's attempts wait
FORGET_AFTER = 900.0  # a key with no failure for this long is forgotten
MAX_KEYS = 100_000  # accounts and addresses tracked at most (the oldest go first)


def password_problem(password: str) -> bool:
    """True when ``password`` breaks the rule in texts.PASSWORD_RULE."""
    return (not password or len(password) > MAX_PASSWORD_CHARS or "|" in password
            or any(not c.isprintable() for c in password))


def make_record(password: str, params: tuple = DEFAULT_PARAMS, salt: bytes | None = None) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$SALT$HASH``."""
    n, r, p = params
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def check_password(password: str, record: str) -> bool:
    """Whether ``password`` is the one ``record`` was made from (constant-time comparison)."""
    try:
        kind, n, r, p, salt, digest = record.split("$")
        if kind != "scrypt":
            return False
        computed = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p))
        return hmac.compare_digest(computed, bytes.fromhex(digest))
    except ValueError:  # a malformed record (or parameters over MAX_MEMORY) matches nothing
        return False


def record_salt(record: str | None) -> str | None:
    """The salt of a record, hex: it names one record (a fresh salt per password), so a command
    can say "only if the password is still the one I checked" without carrying the hash."""
    return None if record is None else record.split("$")[4]


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=MAX_MEMORY,
                          dklen=HASH_BYTES)


# -- jobs and hashers ---------------------------------------------------------------------------
_job_ids = itertools.count(1)


@dataclass(eq=False)
class HashJob:
    """One scrypt computation the service needs: ``record`` None makes a new record of
    ``password``, else checks ``password`` against ``record``.  ``context`` is the service's
    own note of what to do with the result; ``result`` is the record made, or True/False."""

    password: str | None = field(repr=False)
    record: str | None = None
    context: tuple = ()
    result: object = None
    id: int = field(default_factory=lambda: next(_job_ids))

    def run(self, params: tuple = DEFAULT_PARAMS) -> HashJob:
        """Compute the result and forget the password."""
        password, self.password = self.password, None
        if self.record is None:
            self.result = make_record(password, params)
        else:
            self.result = check_password(password, self.record)
        return self


class InlineHasher:
    """Runs every job as it is submitted (tests, the simulator): deterministic, blocking."""

    def __init__(self, params: tuple = DEFAULT_PARAMS) -> None:
        self.params = params
        self._done: list[HashJob] = []

    def submit(self, job: HashJob) -> None:
        self._done.append(job.run(self.params))

    def has_done(self) -> bool:
        return bool(self._done)

    def take_done(self) -> list[HashJob]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass


class ThreadHasher:
    """Runs jobs on ``threads`` worker threads.  A finished job is appended to a queue and
    ``wake`` is called (the reactor's thread-safe :meth:`~chatnet.loop.reactor.Reactor.wake`),
    so the loop wakes up and the next host cycle takes the result.  The loop thread never
    waits for a job."""

    closed = False

    def __init__(self, params: tuple = DEFAULT_PARAMS, threads: int = HASH_THREADS, wake=None) -> None:
        self.params = params
        self.wake = wake or (lambda: None)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chatnet-scrypt")
        self._done: deque[HashJob] = deque()
        self._lock = threading.Lock()

    def submit(self, job: HashJob) -> None:
        self._pool.submit(self._run, job)

    def _run(self, job: HashJob) -> None:
        try:
            job.run(self.params)
        except Exception:  # a bug must still answer the waiting client: as a failed check
            job.result = False if job.record is not None else None
        with self._lock:
            self._done.append(job)
        self.wake()

    def has_done(self) -> bool:
        return bool(self._done)

    def take_done(self) -> list[HashJob]:
        with self._lock:
            done = list(self._done)
            self._done.clear()
        return done

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- back-off -----------------------------------------------------------------------------------
@dataclass
class _Key:
    failures: int = 0
    free_at: float = 0.0  # no check for this key before this time
    last: float = 0.0  # time of the last failure (for forgetting)


def backoff(failures: int, cap: float) -> float:
    """The wait after ``failures`` consecutive failures: 1, 2, 4, ... seconds, at most ``cap``."""
    return 0.0 if failures <= 0 else min(cap, BASE_DELAY * 2 ** min(failures - 1, 30))


@dataclass
class Throttle:
    """Per-account and per-address exponential back-off of password checks (module docstring).
    Local to the replica that checks (not replicated): after a failover it starts afresh."""

    accounts: dict = field(default_factory=dict)  # name -> _Key
    addresses: dict = field(default_factory=dict)  # address -> _Key
    failures: int = 0  # counters for status
    successes: int = 0
    delayed: int = 0

    def when(self, name: str, address: str | None, now: float) -> float:
        """When an attempt on ``name`` from ``address`` arriving ``now`` may be checked.  A
        delayed attempt books the address's next slot, so one address's attempts go one by one."""
        account, source = self.accounts.get(name), self.addresses.get(address)
        at = max(now, account.free_at if account else now, source.free_at if source else now)
        if at > now:
            self.delayed += 1
            if source is not None:
                source.free_at = at + backoff(source.failures, ADDRESS_CAP)
        return at

    def failed(self, name: str, address: str | None, now: float) -> float:
        """A check failed ``now``; returns the wait before the next attempt on this account from
        this address."""
        self.failures += 1
        waits = [self._fail(self.accounts, name, now, ACCOUNT_CAP)]
        if address is not None:
            waits.append(self._fail(self.addresses, address, now, ADDRESS_CAP))
        return max(waits)

    def succeeded(self, name: str, address: str | None) -> None:
        self.successes += 1
        self.accounts.pop(name, None)
        self.addresses.pop(address, None)

    def _fail(self, table: dict, key: str, now: float, cap: float) -> float:
        entry = table.pop(key, None) or _Key()
        table[key] = entry  # re-inserted: the dict stays ordered by last failure
        entry.failures += 1
        entry.last = now
        wait = backoff(entry.failures, cap)
        entry.free_at = max(entry.free_at, now + wait)
        while len(table) > MAX_KEYS:
            del table[next(iter(table))]
        return wait

    def prune(self, now: float) -> None:
        """Forget keys without a failure for FORGET_AFTER seconds (oldest first: dict order)."""
        for table in (self.accounts, self.addresses):
            while table:
                key, entry = next(iter(table.items()))
                if now - entry.last < FORGET_AFTER or entry.free_at > now:
                    break
                del table[key]

    def stats(self) -> dict:
        return {"failed_checks": self.failures, "good_checks": self.successes, "delayed_attempts": self.delayed,
                "accounts_backing_off": len(self.accounts), "addresses_backing_off": len(self.addresses)}
