"""Plain mode of ``chatclient``: commands line by line on stdin, one line per event on stdout.

Used when stdin or stdout is not a terminal, or with ``--plain``.  At the end of input it sends
``exit`` after everything typed before it, waits (at most ``--eof-timeout`` seconds) for the
pending answers and exits: status 0, or 1 if some commands could never be sent.

Stored history is printed only when asked: ``--history N`` prints the last N lines stored
before a login when that login succeeds, ``history NAME`` the conversation with NAME, each line
as ``history: YYYY-MM-DD HH:MM <NAME> TEXT``.  Problems with the state file go to stderr.

Passwords (``create``, ``login``, ``delete``, ``passwd``) come from ``$CHATNET_PASSWORD`` (and
``$CHATNET_NEW_PASSWORD`` for passwd's new one) when set, else from a prompt on the terminal
(``/dev/tty``, not echoed); with neither, the line is refused and says so.
"""

from __future__ import annotations

import codecs
import getpass
import os
import sys
from collections import deque

from .commands import HELP_TEXT, OP_EXIT, Command, Help, Refusal, ShowHistory, parse_command
from .driver import SocketDriver
from .editor import sanitize
from .events import SessionClosed, UserChanged
from .history import HistoryKeeper, row_text, row_time
from .passwords import ENV, NEW_ENV, finish, from_environment, questions, terminal_available
from .present import DisplayLine, Presenter
from .session import ClientSession, State

__all__ = ["PlainUI"]

_PLAIN_PREFIX = {"ok": "ok: ", "error": "error: ", "note": "note: ", "refused": "refused: ",
                 "info": "* ", "own": "> "}


class PlainUI:
    """Lines in on stdin, one line per event out on stdout."""

    def __init__(self, session: ClientSession, driver: SocketDriver, presenter: Presenter, args,
                 history: HistoryKeeper | None = None) -> None:
        self.session, self.driver, self.presenter, self.args = session, driver, presenter, args
        self.history = history or HistoryKeeper(None)
        self.history_lines = getattr(args, "history", 0)
        self.fd = sys.stdin.fileno()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.eof_at: float | None = None
        self.status = 0
        # Lines held behind a local command (history NAME) that waits for the answers before it,
        # so that its output comes where the line was typed; None stands for the end of input.
        self.held: deque[str | None] = deque()

    def run(self) -> int:
        polled = self._watch_stdin()
        try:
            self._notices()
            self._show(self.driver.start())
            while not self.session.closed:
                if self.eof_at is not None and self.driver.clock() > self.eof_at + self.args.eof_timeout:
                    self.session.close(self.driver.clock())
                    self.status = 1
                    self._show(self.driver.take_events())
                    break
                reading = polled and self.eof_at is None
                if reading:
                    self._on_stdin()  # a file is always readable: read on, do not wait for it
                self._show(self.driver.step(0 if reading else 1.0))
                self._release()
        except KeyboardInterrupt:
            self.session.close(self.driver.clock())
            self._show(self.driver.take_events())
            return 130
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
            return 1
        return self.status

    def _watch_stdin(self) -> bool:
        """Have the driver call :meth:`_on_stdin` when stdin is readable; True when it must be
        read without the selector instead: epoll refuses regular files and /dev/null
        (``chatclient < commands.txt``), which never block anyway."""
        try:
            self.driver.add_reader(self.fd, self._on_stdin)
        except PermissionError:
            return True
        return False

    def _on_stdin(self) -> None:
        data = os.read(self.fd, 65536)
        text = self.partial + self.decoder.decode(data, final=not data)
        *lines, self.partial = text.split("\n")
        for line in lines:
            self._line(line.rstrip("\r"))
        if not data:
            if self.partial.strip():
                self._line(self.partial)
            self.partial = ""
            self.driver.remove_reader(self.fd)
            self.eof_at = self.driver.clock()
            if self.held:
                self.held.append(None)
            else:
                self._exit_at_eof()

    def _exit_at_eof(self) -> None:
        self.session.submit(Command(OP_EXIT, (), "exit"), self.driver.clock())
        self.driver.pump()

    def _release(self) -> None:
        """Go on with held lines once every answer the first of them waits for has come."""
        while self.held and (self.session.idle or self.session.closed):
            line = self.held.popleft()
            if line is None:
                self._exit_at_eof()
            else:
                self._line(line, held=True)

    def _line(self, line: str, held: bool = False) -> None:
        if self.session.state in (State.EXITING, State.CLOSED):
            return
        if self.held and not held:
            self.held.append(line)
            return
        result = parse_command(line)
        if result is None:
            return
        if isinstance(result, ShowHistory) and not (self.session.idle or self.session.closed):
            if held:
                self.held.appendleft(line)      # still first in line
            else:
                self.held.append(line)
            return
        if isinstance(result, Help):
            self._print(HELP_TEXT)
        elif isinstance(result, ShowHistory):
            rows, heading = self.history.conversation(self.session.user, result.peer)
            self._print("history: " + heading)
            self._print_rows(rows)
        elif isinstance(result, Refusal):
            self._emit(DisplayLine("refused", result.message))
        elif isinstance(result := self._with_password(result), Refusal):
            self._emit(DisplayLine("refused", result.message))
        else:
            told = self.history.login_submitted(result, self.session.saved)
            if told:
                self._emit(DisplayLine("info", told))
            self.session.submit(result, self.driver.clock())
            self.driver.pump()

    def _with_password(self, command: Command) -> Command | Refusal:
        """``command`` with the passwords it needs (environment, else the terminal), if the
        session uses passwords."""
        asked = questions(command, self.session.user) if self.session.passwords else []
        if not asked:
            return command
        answers = from_environment(command)
        if answers is None:
            if not terminal_available():
                extra = f" (and {NEW_ENV})" if len(asked) > 2 else ""
                return Refusal(f"{command} needs a password: set {ENV}{extra}, or run chatclient on a "
                               "terminal to be asked. Nothing was sent.")
            answers = [getpass.getpass(question.label) for question in asked]
        return finish(command, asked, answers)

    def _show(self, events) -> None:
        for event in events:
            if isinstance(event, SessionClosed) and event.unsent:
                self.status = 1
            self.history.observe(event, self.session.user)
            if isinstance(event, UserChanged) and event.user is not None:
                view = self.history.on_login(event.user, self.history_lines)
                if view is not None and self.history_lines:
                    self._print_rows(view.rows)
            for line in self.presenter.lines(event):
                self._emit(line)
        self._notices()

    def _print_rows(self, rows) -> None:
        for row in rows:
            self._print(f"history: {row_time(row, full=True)} {sanitize(row_text(row))}")

    def _notices(self) -> None:
        """Problems with the state file (moved aside, unwritable...), once each, on stderr."""
        for notice in self.history.take_notices():
            sys.stderr.write(f"chatclient: {notice}\n")
            sys.stderr.flush()

    def _emit(self, line: DisplayLine) -> None:
        if self.args.quiet and line.kind == "info":
            return
        if line.kind == "chat":
            text = f"<{sanitize(line.sender or '')}> {sanitize(line.text)}"
        else:
            text = _PLAIN_PREFIX.get(line.kind, "") + sanitize(line.text)
        self._print(text)

    @staticmethod
    def _print(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

