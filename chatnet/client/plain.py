"""Plain mode of ``chatclient``: commands line by line on stdin, one line per event on stdout.

Used when stdin or stdout is not a terminal, or with ``--plain``.  At the end of input it sends
``exit`` after everything typed before it, waits (at most ``--eof-timeout`` seconds) for the
pending answers and exits: status 0, or 1 if some commands could never be sent.
"""

from __future__ import annotations

import codecs
import os
import sys

from .commands import HELP_TEXT, OP_EXIT, Command, Help, Refusal, parse_command
from .driver import SocketDriver
from .editor import sanitize
from .events import SessionClosed
from .present import DisplayLine, Presenter
from .session import ClientSession, State

__all__ = ["PlainUI"]

_PLAIN_PREFIX = {"ok": "ok: ", "error": "error: ", "note": "note: ", "refused": "refused: ",
                 "info": "* ", "own": "> "}


class PlainUI:
    """Lines in on stdin, one line per event out on stdout."""

    def __init__(self, session: ClientSession, driver: SocketDriver, presenter: Presenter, args) -> None:
        self.session, self.driver, self.presenter, self.args = session, driver, presenter, args
        self.fd = sys.stdin.fileno()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.eof_at: float | None = None
        self.status = 0

    def run(self) -> int:
        self.driver.add_reader(self.fd, self._on_stdin)
        try:
            self._show(self.driver.start())
            while not self.session.closed:
                if self.eof_at is not None and self.driver.clock() > self.eof_at + self.args.eof_timeout:
                    self.session.close(self.driver.clock())
                    self.status = 1
                    self._show(self.driver.take_events())
                    break
                self._show(self.driver.step(1.0))
        except KeyboardInterrupt:
            self.session.close(self.driver.clock())
            self._show(self.driver.take_events())
            return 130
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
            return 1
        return self.status

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
            self.session.submit(Command(OP_EXIT, (), "exit"), self.driver.clock())
            self.driver.pump()

    def _line(self, line: str) -> None:
        if self.session.state in (State.EXITING, State.CLOSED):
            return
        result = parse_command(line)
        if result is None:
            return
        if isinstance(result, Help):
            self._print(HELP_TEXT)
        elif isinstance(result, Refusal):
            self._emit(DisplayLine("refused", result.message))
        else:
            self.session.submit(result, self.driver.clock())
            self.driver.pump()

    def _show(self, events) -> None:
        for event in events:
            if isinstance(event, SessionClosed) and event.unsent:
                self.status = 1
            for line in self.presenter.lines(event):
                self._emit(line)

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

