"""Extension 2, passwords, in the chat service driven through the production replica host (the
``Host`` harness of test_service.py) with a fake clock and cheap scrypt parameters: wrong and
right passwords, seed-style clients on password accounts, ``require_passwords``, the back-off
(asserted from answers, counters and the fake clock), and that no password reaches a command,
a snapshot or the status."""

from __future__ import annotations

import itertools

import pytest
from test_service import Host, err, note, ok

from chatnet.protocol import texts
from chatnet.replication.simdisk import SimDisk
from chatnet.server import passwords as pw
from chatnet.server.config import Limits
from chatnet.server.host import ReplicaHost
from chatnet.server.state import ChatState, decode_command, encode_command

FAST = (16, 1, 1)  # scrypt parameters for tests: the same code path, microseconds per hash
SECRET = "correct horse battery staple"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PwHost(Host):
    """test_service's Host with an inline hasher of FAST parameters, a fake clock and client
    addresses."""

    def __init__(self, limits: Limits | None = None):
        self.clock = Clock()
        tokens = itertools.count(1)
        self.replica_host = ReplicaHost(0, (0,), SimDisk(), limits=limits or Limits(),
                                        new_token=lambda: f"token{next(tokens)}",
                                        hasher=pw.InlineHasher(FAST), clock=self.clock)
        self.log: list[tuple] = []
        self.replica_host.on_applied = lambda index, data: self.log.append(decode_command(data))
        self.service = self.replica_host.service
        self.out, self.closed, self.marks = {}, set(), {}
        self.commit()

    def open(self, conn: int, address: str = "10.0.0.1") -> int:
        self.replica_host.open(conn, address)
        self.out[conn] = []
        self.marks[conn] = []
        return conn

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass and run the loop's tick, then a cycle."""
        self.clock.now += seconds
        self.replica_host.tick()
        self.commit()


@pytest.fixture
def host():
    return PwHost()


def negotiated(host, conn, address="10.0.0.1"):
    host.open(conn, address)
    host.send(conn, "0|ext|2")
    assert host.take(conn) == [ok("ext|2")]
    return conn


def created(host, conn, name="alice", password=SECRET):
    negotiated(host, conn)
    host.send(conn, f"0|create|{name}|{password}")
    assert host.take(conn) == [ok(f"Account created! Logged in as {name}.")]
    host.send(conn, "6")
    return conn


def wrong(seconds):
    return err(texts.T_LOGIN_WRONG_PASSWORD.format(seconds=seconds))


def test_negotiation_and_verbs_need_extension_2(host):
    host.open(1)
    host.send(1, "0|create|alice|pw")  # not negotiated: op 0's invalid-operation answer
    assert host.take(1) == [err(texts.INVALID_REQUEST_TEXT)]
    host.send(1, "0|ext|2")
    assert host.take(1) == [ok("ext|2")]
    host.send(1, "0|create|alice|pw|more")
    assert host.take(1) == [err(texts.INVALID_REQUEST_TEXT)]


def test_right_and_wrong_passwords(host):
    created(host, 1)
    negotiated(host, 2)
    host.send(2, "0|login|alice|not it")
    assert host.take(2) == [wrong(1)]
    host.advance(1)
    host.send(2, f"0|login|alice|{SECRET}")
    assert host.take(2) == [ok("Logged in as alice."), note(texts.T_NO_MISSED)]
    stats = host.service.password_stats()
    assert stats["failed_checks"] == 1 and stats["good_checks"] == 1
    assert stats["accounts_backing_off"] == 0  # a success clears the account's back-off


def test_seed_style_login_and_delete_of_a_password_account_are_refused(host):
    created(host, 1)
    host.open(2)
    host.send(2, "2|alice")
    assert host.take(2) == [err(texts.T_LOGIN_NEEDS_PASSWORD)]
    host.send(2, "7|alice")  # the tokenless resume is a login
    assert host.take(2) == [err(texts.T_LOGIN_NEEDS_PASSWORD)]
    negotiated(host, 3)
    host.send(3, f"0|login|alice|{SECRET}")
    host.take(3)
    host.send(3, "5")
    assert host.take(3) == [err(texts.T_DELETE_NEEDS_PASSWORD)]
    host.send(3, "0|delete|wrong")
    assert host.take(3) == [err(texts.T_DELETE_WRONG_PASSWORD.format(seconds=1))]
    host.advance(1)
    host.send(3, f"0|delete|{SECRET}")
    assert host.take(3) == [ok("Account alice has been deleted. You are now logged out.")]


def test_seed_login_arriving_while_the_create_is_in_flight_is_refused_at_apply(host):
    """The create (hashed, then proposed) and a seed login sent right after it on another
    connection: the login goes after the create and is refused because of the password."""
    negotiated(host, 1)
    host.open(2)
    host.send(1, f"0|create|bob|{SECRET}", commit=False)
    host.send(2, "2|bob", commit=False)
    host.commit()
    assert host.take(1) == [ok("Account created! Logged in as bob.")]
    assert host.take(2) == [err(texts.T_LOGIN_NEEDS_PASSWORD)]


def test_a_create_of_the_same_name_waits_for_the_hashing_one(host):
    negotiated(host, 1)
    host.open(2)
    host.send(1, f"0|create|bob|{SECRET}", commit=False)
    host.send(2, "1|bob", commit=False)  # arrived later: must lose, although it needs no hash
    host.commit()
    assert host.take(1) == [ok("Account created! Logged in as bob.")]
    assert host.take(2) == [err(texts.T_CREATE_TAKEN)]


def test_password_less_accounts_keep_the_seed_behaviour(host):
    host.open(1)
    host.send(1, "1|carol")
    host.send(1, "6")
    host.open(2)
    host.send(2, "2|carol")
    assert host.take(2) == [ok("Logged in as carol."), note(texts.T_NO_MISSED)]
    host.send(2, "5")
    assert host.take(2) == [ok("Account carol has been deleted. You are now logged out.")]


def test_passwd_changes_the_password(host):
    created(host, 1)
    negotiated(host, 2)
    host.send(2, f"0|login|alice|{SECRET}")
    host.take(2)
    host.send(2, "0|passwd|wrong|newpass")
    assert host.take(2) == [err(texts.T_PASSWD_WRONG.format(seconds=1))]
    host.advance(1)
    host.send(2, "0|passwd|x|bad|pipe")
    assert host.take(2) == [err(texts.INVALID_REQUEST_TEXT)]
    host.send(2, f"0|passwd|{SECRET}|")
    assert host.take(2) == [err(texts.T_PASSWD_BAD)]
    host.send(2, f"0|passwd|{SECRET}|newpass")
    assert host.take(2) == [ok(texts.T_PASSWORD_CHANGED)]
    host.send(2, "6")
    negotiated(host, 3)
    host.send(3, f"0|login|alice|{SECRET}")
    assert host.take(3)[0][0] == 1
    host.advance(2)
    host.send(3, "0|login|alice|newpass")
    assert host.take(3)[0] == ok("Logged in as alice.")


def test_passwd_sets_a_first_password_on_a_password_less_account(host):
    negotiated(host, 1)
    host.send(1, "1|dave")
    host.take(1)
    host.send(1, "0|passwd||first")  # no old password to check
    assert host.take(1) == [ok(texts.T_PASSWORD_CHANGED)]
    host.send(1, "6")
    host.open(2)
    host.send(2, "2|dave")
    assert host.take(2) == [err(texts.T_LOGIN_NEEDS_PASSWORD)]


def test_a_login_checked_against_an_old_password_is_refused_at_apply(host):
    """The command names the record it checked: a password changed between the check and the
    apply is never bypassed."""
    created(host, 1)
    account = host.service.state.accounts["alice"]
    stale = host.service.state.apply(("login", "alice", "tokX", "not-the-salt"))
    assert stale == "password-changed"
    assert account.token != "tokX"


def test_back_off_grows_per_account_and_waits_instead_of_refusing(host):
    created(host, 1)
    negotiated(host, 2, "10.0.0.2")
    waits = []
    for attempt in range(4):
        host.send(2, "0|login|alice|guess")
        answer = host.take(2)
        if not answer:  # delayed: nothing until the clock reaches the back-off
            assert host.service.waiting(2)
            host.advance(waits[-1] - 0.01)
            assert host.take(2) == []
            host.advance(0.01)
            answer = host.take(2)
        assert len(answer) == 1 and answer[0][0] == 1
        waits.append(float(answer[0][2].split("wait ")[1].split(" ")[0]))
    assert waits == [1, 2, 4, 8]
    stats = host.service.password_stats()
    assert stats["failed_checks"] == 4 and stats["delayed_attempts"] == 3
    # The owner, from another address, is delayed by the account's back-off only, never refused.
    negotiated(host, 3, "10.0.0.3")
    host.send(3, f"0|login|alice|{SECRET}")
    assert host.take(3) == []
    host.advance(8)
    assert host.take(3)[0] == ok("Logged in as alice.")


def test_account_back_off_is_capped_so_the_owner_is_never_locked_out(host):
    created(host, 1)
    throttle = host.service.throttle
    for _ in range(40):  # an attacker with many addresses
        throttle.failed("alice", None, host.clock.now)
    assert throttle.when("alice", "10.9.9.9", host.clock.now) == host.clock.now + pw.ACCOUNT_CAP


def test_attempts_from_one_address_go_one_by_one(host):
    throttle = pw.Throttle()
    throttle.failed("x", "a", 0.0)  # address a must wait 1 s
    first = throttle.when("y", "a", 0.0)
    second = throttle.when("z", "a", 0.0)
    assert first == 1.0 and second > first


def test_require_passwords_refuses_seed_style_clients(host):
    strict = PwHost(Limits(require_passwords=True))
    strict.open(1)
    strict.send(1, "1|erin")
    assert strict.take(1) == [err(texts.T_POLICY_CREATE)]
    strict.send(1, "2|erin")
    assert strict.take(1) == [err(texts.T_POLICY_LOGIN)]
    strict.send(1, "0|ext|2")
    strict.take(1)
    strict.send(1, f"0|create|erin|{SECRET}")
    assert strict.take(1) == [ok("Account created! Logged in as erin.")]


def test_require_passwords_refuses_logging_into_a_password_less_account():
    """A store made without the flag, then served with it."""
    state = ChatState()
    state.apply(("create", "old", None))
    strict = PwHost(Limits(require_passwords=True))
    strict.service.replace_state(state)
    negotiated(strict, 1)
    strict.send(1, "0|login|old|anything")
    assert strict.take(1) == [err(texts.T_POLICY_NO_PASSWORD)]


def test_the_password_is_in_no_command_snapshot_or_status(host):
    created(host, 1)
    negotiated(host, 2)
    host.send(2, f"0|login|alice|{SECRET}")
    host.send(2, f"0|passwd|{SECRET}|{SECRET}2")
    host.send(2, f"0|delete|{SECRET}2")
    everything = b"".join(encode_command(cmd) for cmd in host.log)
    everything += host.service.state.to_snapshot() + repr(host.replica_host.status()).encode()
    assert SECRET.encode() not in everything
    assert any(cmd[0] == "create" and len(cmd) == 4 and cmd[3].startswith("scrypt$") for cmd in host.log)


def test_records_round_trip_through_a_snapshot():
    state = ChatState()
    record = pw.make_record(SECRET, FAST)
    state.apply(("create", "alice", None, record))
    again = ChatState.from_snapshot(state.to_snapshot())
    assert again.accounts["alice"].password == record
    assert pw.check_password(SECRET, record) and not pw.check_password("other", record)
    assert not pw.check_password(SECRET, "garbage") and not pw.check_password(SECRET, "scrypt$1$1$1$zz$zz")


def test_thread_hasher_runs_off_the_calling_thread_and_wakes():
    import threading

    woke = threading.Event()
    hasher = pw.ThreadHasher(FAST, wake=woke.set)
    try:
        seen = []
        job = pw.HashJob(SECRET)
        job.run = lambda params, run=job.run: (seen.append(threading.current_thread().name), run(params))[1]
        hasher.submit(job)
        assert woke.wait(10)
        done = hasher.take_done()
        assert done == [job] and job.result.startswith("scrypt$16$1$1$") and job.password is None
        assert seen and seen[0].startswith("chatnet-scrypt")
    finally:
        hasher.close()
