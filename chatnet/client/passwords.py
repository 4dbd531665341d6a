"""Asking for passwords (extension 2): which questions a command needs, where the answers may
come from, and the command that results.  Shared by the window (``tui.py``, hidden input) and
plain mode (``plain.py``: ``$CHATNET_PASSWORD``, else a prompt on the terminal).

A password is never part of a typed line: the answers are attached to the command as its
``secret`` (:func:`~chatnet.client.commands.with_secret`), which no display, history or saved
state ever includes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .commands import OP_CREATE, OP_DELETE, OP_LOGIN, OP_PASSWD, Command, Refusal, password_refusal, with_secret

__all__ = ["ENV", "NEW_ENV", "Question", "questions", "from_environment", "finish", "terminal_available"]

ENV = "CHATNET_PASSWORD"  # the password, for scripts (plain mode) and tests
NEW_ENV = "CHATNET_NEW_PASSWORD"  # passwd's new password, likewise


@dataclass(frozen=True)
class Question:
    label: str
    required: bool = False  # an empty answer is refused (else: "none", seed-style)
    same_as: int | None = None  # must repeat the answer to question number ``same_as``


def questions(command: Command, user: str | None) -> list[Question]:
    """What to ask before ``command`` can be sent (empty: nothing)."""
    me = user or "your account"
    if command.op == OP_CREATE:
        name = command.params[0]
        return [Question(f"new password for {name}: ", True), Question(f"{name}'s password again: ", True, 0)]
    if command.op == OP_LOGIN:
        return [Question(f"password for {command.params[0]} (Enter if none): ")]
    if command.op == OP_DELETE:
        return [Question(f"password of {me}, to delete it (Enter if none): ")]
    if command.op == OP_PASSWD:
        return [Question(f"current password of {me} (Enter if none): "), Question("new password: ", True),
                Question("new password again: ", True, 1)]
    return []


def from_environment(command: Command, environ=os.environ) -> list[str] | None:
    """The answers ``$CHATNET_PASSWORD`` (and, for passwd, ``$CHATNET_NEW_PASSWORD``) give, or
    None when they are not set."""
    if ENV not in environ:
        return None
    if command.op == OP_PASSWD:
        if NEW_ENV not in environ:
            return None
        return [environ[ENV], environ[NEW_ENV], environ[NEW_ENV]]
    if command.op == OP_CREATE:
        return [environ[ENV], environ[ENV]]
    return [environ[ENV]]


def finish(command: Command, asked: list[Question], answers: list[str]) -> Command | Refusal:
    """``command`` with its passwords, or why it is not sent."""
    answers = [a.strip() for a in answers]
    for question, answer in zip(asked, answers):
        refusal = password_refusal(answer, question.required)
        if refusal is not None:
            return refusal
        if question.same_as is not None and answer != answers[question.same_as]:
            return Refusal("The two passwords differ. Nothing was sent.")
    if command.op == OP_PASSWD:
        return with_secret(command, answers[0], answers[1])
    return with_secret(command, answers[0])


def terminal_available() -> bool:
    """Whether a terminal can be asked (``/dev/tty`` opens): getpass would otherwise read the
    password from stdin, which in plain mode holds the commands."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True
