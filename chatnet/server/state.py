"""The replicated chat state machine: accounts and per-recipient mailboxes.

Everything that must survive a crash or reach a backup is a *command* applied here, in log
order, on every replica.  ``apply`` is deterministic: the same commands in the same order give
the same state and the same results everywhere, so the primary can decide a request's answer
from the result of applying its command (for example "name taken" when two connections create
the same name in one batch) and the backups reach the identical state.

The state machine does no I/O and reports nothing but each command's result: the store
writes only the log (and, now and then, a snapshot of this state), so ``apply`` no longer
builds the row changes it once returned for state tables (docs/benchmarks.md, "Where the
loop's time goes").  :func:`changed_state` tells from a result whether the command changed
anything.

Mailboxes hold every chat that was acknowledged but not yet confirmed delivered.  Each chat
gets a per-recipient sequence number; seqs in a mailbox are contiguous because chat is only
ever removed from the front (``delivered``) or all at once (``delete``), so the chat with a
given seq is found by arithmetic rather than search.
"""

from __future__ import annotations

import json
import marshal
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ..replication.membership import is_config_entry

# Results of applying a command (the session layer turns them into the reference texts).
OK = "ok"
NAME_TAKEN = "name-taken"
NO_SUCH_ACCOUNT = "no-such-account"
NO_SUCH_RECIPIENT = "no-such-recipient"
DUPLICATE = "duplicate"  # a send whose request id the sender already used: acknowledged, not delivered again
PASSWORD_REQUIRED = "password-required"  # a login without a password checked, of an account that has one
PASSWORD_CHANGED = "password-changed"  # the password checked before proposing is no longer the account's

RECENT_REQUEST_IDS = 1024  # per account: how far back a retried send is recognised
# Origins (view, index) of a healed split brain's re-applied commands the state remembers, so
# that one handed over twice is applied once on every replica, snapshots included.
RECENT_ORIGINS = 65_536
# Results that refuse a command: its client is told it failed (ChatState.refused).
REFUSALS = frozenset((NO_SUCH_RECIPIENT, NAME_TAKEN, NO_SUCH_ACCOUNT, PASSWORD_REQUIRED, PASSWORD_CHANGED))
# Log indexes of refused commands the state remembers (ChatState.refused), oldest dropped
# first.  A losing side hands over at most the log it kept since the split: up to
# DEGRADED_RETAIN_FACTOR x --log-retain entries (chatnet/replication/core.py; about a million
# with the default retention), so this covers every refusal of any handover in which at most
# one entry in ten was refused; a flood of refused sends beyond that hands its oldest over
# unmarked.  The bound is a count, the same on every replica whatever its --log-retain, and
# keeps what such a flood costs small (measured: 8.4 MB of memory, 0.8 MB of snapshot).
RECENT_REFUSALS = 100_000


class Mail(NamedTuple):
    """One acknowledged chat waiting in its recipient's mailbox.  A named tuple rather than a
    frozen dataclass: one is made per chat, and a tuple is built in C (180 ns here against
    480 ns for the dataclass's ``__init__``, which sets each field through
    ``object.__setattr__``) and is smaller in a long mailbox."""

    seq: int
    sender: str
    text: str
    sender_deleted: bool = False

    @property
    def display_sender(self) -> str:
        return f"{self.sender} [deleted]" if self.sender_deleted else self.sender


@dataclass
class Account:
    name: str
    order: int  # creation order, for op 4's listing
    next_seq: int = 1  # seq the next chat to this account will get
    token: str | None = None  # resume token of the latest login; None after a logout
    request_ids: dict = field(default_factory=dict)  # recent send request ids -> position, oldest first
    next_rid_pos: int = 1
    password: str | None = None  # scrypt record (chatnet/server/passwords.py), never the password

    @property
    def password_salt(self) -> str | None:
        """The salt of the current record: what a login or a change checked against."""
        return None if self.password is None else self.password.split("$")[4]


# Commands.  They travel through the replicated log as bytes, so they are plain tuples with a
# compact JSON encoding rather than objects.
def cmd_create(name: str, token: str | None = None, password: str | None = None) -> tuple:
    """``password`` is the scrypt record made by the receiving replica (never the password)."""
    return ("create", name, token) if password is None else ("create", name, token, password)


def cmd_login(name: str, token: str, checked: str | None = None, *, verified: bool = False) -> tuple:
    """A login: the new token supersedes any earlier session's (the primary draws it).

    Without ``verified`` (a seed-style login) it applies only to an account without a password.
    With it, the receiving replica checked the password against the record whose salt is
    ``checked`` (None: the account had none), and the login applies only if that is still the
    account's record, so a password changed in between is never bypassed."""
    return ("login", name, token, checked) if verified else ("login", name, token)


def cmd_password(name: str, record: str, checked: str | None) -> tuple:
    """Change ``name``'s password to ``record`` if its record's salt is still ``checked``."""
    return ("password", name, record, checked)


def cmd_logout(name: str) -> tuple:
    return ("logout", name)


def cmd_send(sender: str, recipient: str, text: str, request_id: str | None = None) -> tuple:
    return ("send", sender, recipient, text, request_id)


def cmd_delivered(recipient: str, order: int, upto_seq: int) -> tuple:
    """Chat up to ``upto_seq`` reached ``recipient``.  ``order`` names the account incarnation,
    so a late confirmation can never remove chat of a new account that reuses the name."""
    return cmd_delivered_many([(recipient, order, upto_seq)])


def cmd_delivered_many(marks) -> tuple:
    """Every delivery confirmed in one loop iteration, as one log entry: (recipient, order, seq)."""
    return ("delivered", [list(mark) for mark in marks])


def cmd_delete(name: str) -> tuple:
    return ("delete", name)


# Encoding of a command in a log entry.  Version 1 is one version byte, then the tuple in
# ``marshal`` format 4: C code in both directions, 5-8x cheaper than the JSON it replaced
# (measured in docs/benchmarks.md, "Faster than the seed?"), and generic, so a command that
# grows a field needs no codec change.  Format 4 has been written and read unchanged by
# every CPython since 3.4, and it is pinned here, so replicas on different Pythons agree.
# Entries written before it are JSON arrays (first byte ``[``) and are still read.  Entry
# bytes come only from our own disk and from HMAC-authenticated peers, and ``marshal`` is
# not for untrusted input; what it decodes is still checked to be a command-shaped tuple.
COMMAND_V1 = 0x01
_MARSHAL_FORMAT = 4
_V1 = bytes([COMMAND_V1])


def encode_command(cmd: tuple) -> bytes:
    return _V1 + marshal.dumps(cmd, _MARSHAL_FORMAT)


def decode_command(data: bytes) -> tuple:
    """Decode a log entry of either encoding (a version byte, or a JSON array).  A membership
    change's config entry (chatnet/replication/membership.py) decodes as ``("config",)``, which
    changes no chat state: every replay of a log (store, backup, simulator) passes over it."""
    if data[:1] == _V1:
        try:
            cmd = marshal.loads(data[1:])
        except (EOFError, ValueError, TypeError) as exc:
            raise ValueError(f"corrupt command entry: {exc}") from None
        if type(cmd) is not tuple or not cmd or type(cmd[0]) is not str:
            raise ValueError(f"corrupt command entry: decodes to {type(cmd).__name__}")
        return cmd
    if data[:1] == b"[":
        return _decode_json_command(data)
    if is_config_entry(data):
        return ("config",)
    raise ValueError(f"unknown command encoding (first byte {bytes(data[:1])!r})")


def _decode_json_command(data: bytes) -> tuple:
    """A command as the JSON array the first versions wrote (nested tuples came back as lists)."""
    return tuple(json.loads(bytes(data).decode("utf-8")))


def changed_state(result: object) -> bool:
    """Whether a command whose ``apply`` returned ``result`` changed the state: it did exactly
    when it succeeded (OK) or queued a chat (a Mail); every refusal and DUPLICATE changes
    nothing.  (Not for ``delivered``, which answers OK whether or not it removed chat.)"""
    return isinstance(result, Mail) or result == OK


class ChatState:
    """Accounts (in creation order) and their mailboxes; mutated only by ``apply``."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.mailboxes: dict[str, deque[Mail]] = {}
        self._next_order = 1
        self.origins: dict[tuple[int, int], int] = {}  # re-applied (view, index) -> position, oldest first
        self._next_origin_pos = 1
        self.refused: dict[int, None] = {}  # log indexes of refused commands, oldest first (note_refused)

    # -- loading (used by the store when it rebuilds the state from its tables) ------------
    def load_account(self, name: str, order: int, next_seq: int, token: str | None = None,
                     password: str | None = None) -> None:
        self.accounts[name] = Account(name, order, next_seq, token, password=password)
        self.mailboxes[name] = deque()
        self._next_order = max(self._next_order, order + 1)

    def load_mail(self, recipient: str, mail: Mail) -> None:
        self.mailboxes[recipient].append(mail)

    def load_request_id(self, name: str, pos: int, request_id: str) -> None:
        account = self.accounts[name]
        account.request_ids[request_id] = pos
        account.next_rid_pos = max(account.next_rid_pos, pos + 1)

    def load_origin(self, pos: int, view: int, index: int) -> None:
        self.origins[(view, index)] = pos
        self._next_origin_pos = max(self._next_origin_pos, pos + 1)

    # -- snapshots (catch-up of a replica that is behind the compacted log) -----------------
    def to_snapshot(self) -> bytes:
        """The whole state as bytes: accounts in creation order, each with its mailbox (and its
        password record, as a seventh field, only when it has one)."""
        accounts = [
            [a.name, a.order, a.next_seq,
             [[m.seq, m.sender, m.text, int(m.sender_deleted)] for m in self.mailboxes[a.name]],
             a.token, [[pos, rid] for rid, pos in a.request_ids.items()]]
            + ([a.password] if a.password is not None else [])
            for a in self.accounts.values()
        ]
        doc = {"v": 1, "next_order": self._next_order, "accounts": accounts}
        if self.origins:  # (absent in a state that never re-applied anything: older readers)
            doc["origins"] = [[pos, view, index] for (view, index), pos in self.origins.items()]
        if self.refused:  # (absent, like origins, in a state that never refused a command)
            doc["refused"] = list(self.refused)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_snapshot(cls, data: bytes) -> "ChatState":
        doc = json.loads(data.decode("utf-8"))
        if doc.get("v") != 1:
            raise ValueError(f"unknown snapshot version {doc.get('v')!r}")
        state = cls()
        for name, order, next_seq, mails, token, request_ids, *password in doc["accounts"]:
            state.load_account(name, order, next_seq, token, password[0] if password else None)
            for seq, sender, text, deleted in mails:
                state.load_mail(name, Mail(seq, sender, text, bool(deleted)))
            for pos, rid in request_ids:
                state.load_request_id(name, pos, rid)
        state._next_order = max(state._next_order, doc["next_order"])
        for pos, view, index in doc.get("origins", ()):
            state.load_origin(pos, view, index)
        state.refused = dict.fromkeys(doc.get("refused", ()))
        return state

    # -- queries ---------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return name in self.accounts

    def mail_after(self, name: str, seq: int) -> list[Mail]:
        """The chats in ``name``'s mailbox with a sequence number above ``seq``, oldest first."""
        box = self.mailboxes.get(name)
        if not box:
            return []
        start = max(0, seq + 1 - box[0].seq)
        return [box[i] for i in range(start, len(box))]

    def pending_count(self, name: str) -> int:
        return len(self.mailboxes.get(name, ()))

    def last_seq(self, name: str) -> int:
        account = self.accounts.get(name)
        return account.next_seq - 1 if account else 0

    # -- the state machine -----------------------------------------------------------------
    def apply(self, cmd: tuple, index: int = 0) -> object:
        """Apply one command, the committed log entry at ``index`` (0: not from the log, nothing
        remembered); return its result (OK, a refusal, DUPLICATE, or the queued Mail)."""
        if cmd[0] == "send":  # the common case, without a second call
            result = self._send(cmd[1], cmd[2], cmd[3], cmd[4])
        else:
            result = self._apply(cmd)
        if index and result.__class__ is str and result in REFUSALS:  # (a Mail is a tuple)
            self.note_refused(index)
        return result

    def note_refused(self, index: int) -> None:
        """Remember that the command at ``index`` was refused: a healed split brain's losing side
        hands it over marked so, and the winner does not re-apply what its client was told had
        failed (docs/replication.md section 10).  Part of the state, as ``origins`` is: every
        replica applies the same entries in the same order, so each remembers the same ones,
        and snapshots (checkpoints included) carry them across a restart.

        The index alone names the entry: a state and its replica's log agree on every index up
        to the applied one (a committed entry is replaced only with the whole state, by a
        snapshot), and only that replica's own log entries are looked up."""
        refused = self.refused
        refused[index] = None
        while len(refused) > RECENT_REFUSALS:
            del refused[next(iter(refused))]

    def _apply(self, cmd: tuple) -> object:
        kind = cmd[0]
        if kind == "config":  # a membership change: the replication core's, not the chat's
            return OK
        if kind == "create":
            return self._create(cmd[1], cmd[2], cmd[3] if len(cmd) > 3 else None)
        if kind == "send":
            return self._send(cmd[1], cmd[2], cmd[3], cmd[4])
        if kind == "login":
            return self._login(cmd)
        if kind == "password":
            return self._set_password(cmd[1], cmd[2], cmd[3])
        if kind == "logout":
            return self._set_token(cmd[1], None)
        if kind == "delivered":
            for recipient, order, upto_seq in cmd[1]:
                self._delivered(recipient, order, upto_seq)
            return OK
        if kind == "delete":
            return self._delete(cmd[1])
        if kind == "reapply":  # ("reapply", view, index, command): a healed split brain's losing
            if not self.note_origin(cmd[1], cmd[2]):  # side, re-applied (docs/replication.md section 10)
                return DUPLICATE
            return self._apply(cmd[3])
        raise ValueError(f"unknown command {kind!r}")

    def has_origin(self, view: int, index: int) -> bool:
        return (view, index) in self.origins

    def note_origin(self, view: int, index: int) -> bool:
        """Remember that the command of ``(view, index)`` (its original log position) is being
        re-applied; False if it was already: then it must change nothing.
        Part of the state (and of snapshots), so the answer is the same on every replica and
        survives a snapshot that replaces the state -- memory outside it would not."""
        if (view, index) in self.origins:
            return False
        pos = self._next_origin_pos
        self._next_origin_pos += 1
        self.origins[(view, index)] = pos
        if len(self.origins) > RECENT_ORIGINS:
            del self.origins[next(iter(self.origins))]
        return True

    def _create(self, name: str, token: str | None, password: str | None):
        if name in self.accounts:
            return NAME_TAKEN
        order = self._next_order
        self._next_order += 1
        self.accounts[name] = Account(name, order, token=token, password=password)
        self.mailboxes[name] = deque()
        return OK

    def _login(self, cmd: tuple):
        """``("login", name, token)`` (seed-style: only without a password) or ``("login", name,
        token, checked)`` (the password was checked against the record with salt ``checked``)."""
        account = self.accounts.get(cmd[1])
        if account is None:
            return NO_SUCH_ACCOUNT
        if len(cmd) < 4 and account.password is not None:
            return PASSWORD_REQUIRED
        if len(cmd) >= 4 and account.password_salt != cmd[3]:
            return PASSWORD_CHANGED
        return self._set_token(cmd[1], cmd[2])

    def _set_password(self, name: str, record: str, checked: str | None):
        account = self.accounts.get(name)
        if account is None:
            return NO_SUCH_ACCOUNT
        if account.password_salt != checked:
            return PASSWORD_CHANGED
        account.password = record
        return OK

    def _set_token(self, name: str, token: str | None):
        account = self.accounts.get(name)
        if account is None:
            return NO_SUCH_ACCOUNT
        account.token = token
        return OK

    def _send(self, sender: str, recipient: str, text: str, request_id: str | None):
        account = self.accounts.get(recipient)
        if account is None:  # refused: its request id is not spent (a retry is refused again)
            return NO_SUCH_RECIPIENT
        if request_id is not None:
            sender_account = self.accounts.get(sender)
            if sender_account is not None:
                if request_id in sender_account.request_ids:
                    return DUPLICATE
                sender_account.request_ids[request_id] = sender_account.next_rid_pos
                sender_account.next_rid_pos += 1
                if len(sender_account.request_ids) > RECENT_REQUEST_IDS:
                    del sender_account.request_ids[next(iter(sender_account.request_ids))]
        mail = Mail(account.next_seq, sender, text)
        account.next_seq += 1
        self.mailboxes[recipient].append(mail)
        return mail

    def _delivered(self, recipient: str, order: int, upto_seq: int) -> None:
        account = self.accounts.get(recipient)
        box = self.mailboxes.get(recipient)
        if account is None or account.order != order or not box or box[0].seq > upto_seq:
            return
        while box and box[0].seq <= upto_seq:
            box.popleft()

    def _delete(self, name: str):
        if name not in self.accounts:
            return NO_SUCH_ACCOUNT
        del self.accounts[name]
        del self.mailboxes[name]
        # Chat this account already sent keeps waiting for its recipients, shown as "name [deleted]".
        for box in self.mailboxes.values():
            for i, mail in enumerate(box):
                if mail.sender == name and not mail.sender_deleted:
                    box[i] = Mail(mail.seq, mail.sender, mail.text, True)
        return OK
