"""Curses mode of ``chatclient``: the split-pane window (message pane, status bar, input line).

:class:`CursesUI` keeps the message pane's lines and rows, draws the window and handles keys;
:func:`run_curses` sets the terminal up, runs the loop (keys, network events and timers all wait
in the driver's selector, so they are handled in one thread, in order) and always restores the
terminal, whatever ends it.

History (``history.py``): on a login the pane shows the last screenful of that account's stored
conversation between two ``==`` lines, dimmed and stamped with the time it was stored (``MM-DD``
for another day); PgUp past the top loads older stored lines above them; ``history NAME`` shows
the conversation with NAME.  Problems with the state file are shown as errors in the pane.
"""

from __future__ import annotations

import curses
import locale
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from ..protocol.codec import MAX_REQUEST_CHARS
from .commands import HELP_TEXT, OP_EXIT, Command, Help, Refusal, ShowHistory, parse_command, request_length
from .driver import SocketDriver
from .editor import LineEditor, clip, sanitize, text_width, wrap
from .events import SessionClosed, UserChanged
from .history import HistoryKeeper, HistoryView, row_text, row_time
from .passwords import Question, finish, from_environment, questions
from .present import DisplayLine, Presenter, own_line
from .session import ClientSession, State

__all__ = ["CursesUI", "run_curses", "NoCurses"]


class NoCurses(Exception):
    """curses could not set up the terminal (e.g. TERM=dumb); nothing was started yet."""


_PREFIX = {"chat": "", "own": "", "ok": "-- ", "note": "** ", "error": "!! ", "refused": "!! ",
           "info": "== ", "help": "   ", "history": ""}
_STAMP_WIDTH = 6      # "HH:MM "
_MAX_LINES = 5000


@dataclass(eq=False)
class _Asking:
    """A command waiting for its passwords, typed blind into the input line."""

    command: Command
    questions: list[Question]
    answers: list[str] = field(default_factory=list, repr=False)
    typed: list[str] = field(default_factory=list, repr=False)


class CursesUI:
    """The split-pane window: message pane, status bar, input line."""

    def __init__(self, stdscr, session: ClientSession, driver: SocketDriver, presenter: Presenter,
                 color: bool, history: HistoryKeeper | None = None) -> None:
        self.scr, self.session, self.driver, self.presenter = stdscr, session, driver, presenter
        self.history = history or HistoryKeeper(None)
        self.history_view: HistoryView | None = None   # the stored history shown at the last login
        self.history_top: DisplayLine | None = None     # its first line: older rows go below it
        self.editor = LineEditor()
        self.lines: list[tuple[str, DisplayLine]] = []  # (time stamp, line)
        self.rows: list[tuple[str, int, int]] = []      # (text, attr, cells of the tag in attr2)
        self.scroll = 0                                 # rows scrolled up from the bottom
        self.quit = False
        self.resized = False
        self.leftovers: list[DisplayLine] = []
        self.asking: _Asking | None = None               # a password being typed (hidden)
        self._init_attrs(color)
        self.height, self.width = self.scr.getmaxyx()

    # attributes ----------------------------------------------------------------------------
    def _init_attrs(self, color: bool) -> None:
        bold, dim = curses.A_BOLD, curses.A_DIM
        self.attr = {"chat": curses.A_NORMAL, "chat_tag": bold, "own": bold, "ok": curses.A_NORMAL,
                     "note": curses.A_UNDERLINE, "error": bold | curses.A_STANDOUT,
                     "refused": bold | curses.A_STANDOUT, "info": dim, "help": curses.A_NORMAL,
                     "stamp": dim, "history": dim, "status": curses.A_REVERSE, "status_bad": curses.A_REVERSE | bold}
        if not (color and curses.has_colors()):
            return
        try:
            curses.use_default_colors()
            background = -1
        except curses.error:
            background = curses.COLOR_BLACK
        pairs = {"chat_tag": curses.COLOR_CYAN, "own": curses.COLOR_GREEN, "note": curses.COLOR_YELLOW,
                 "error": curses.COLOR_RED, "info": curses.COLOR_MAGENTA}
        for number, (name, fg) in enumerate(pairs.items(), start=1):
            curses.init_pair(number, fg, background)
            self.attr[name] = curses.color_pair(number) | (bold if name in ("chat_tag", "error") else 0)
        self.attr["refused"] = self.attr["error"]
        self.attr["chat"] = curses.A_NORMAL
        curses.init_pair(6, curses.COLOR_WHITE, curses.COLOR_BLUE)
        curses.init_pair(7, curses.COLOR_WHITE, curses.COLOR_RED)
        self.attr["status"] = curses.color_pair(6)
        self.attr["status_bad"] = curses.color_pair(7) | bold

    # messages ------------------------------------------------------------------------------
    def add(self, line: DisplayLine) -> None:
        stamp = line.stamp or time.strftime("%H:%M")
        self.lines.append((stamp, line))
        new_rows = self._rows_of(stamp, line)
        self.rows.extend(new_rows)
        if self.scroll:
            self.scroll += len(new_rows)       # keep the view still while reading old lines
        if len(self.lines) > _MAX_LINES:
            del self.lines[:len(self.lines) - _MAX_LINES * 9 // 10]
            self._rebuild_rows()

    def _rows_of(self, stamp: str, line: DisplayLine) -> list[tuple[str, int, int]]:
        body_width = max(1, self.width - _STAMP_WIDTH)
        attr = self.attr.get(line.kind, curses.A_NORMAL)
        rows = []
        texts = line.text.split("\n") if line.kind == "help" else [line.text]
        for i, text in enumerate(texts):
            tag = f"<{sanitize(line.sender or '')}> " if line.kind == "chat" else _PREFIX.get(line.kind, "")
            body = tag + sanitize(text)
            tag_cells = len(tag) if line.kind == "chat" else 0
            for j, row in enumerate(wrap(body, body_width)):
                lead = (stamp if i == 0 and j == 0 else "").ljust(_STAMP_WIDTH)
                rows.append((lead + row, attr, tag_cells if j == 0 else 0))
        return rows

    def _rebuild_rows(self) -> None:
        self.rows = [row for stamp, line in self.lines for row in self._rows_of(stamp, line)]
        self.scroll = min(self.scroll, self._max_scroll())

    def _pane_height(self) -> int:
        return max(0, self.height - 2)

    def _max_scroll(self) -> int:
        return max(0, len(self.rows) - self._pane_height())

    # drawing -------------------------------------------------------------------------------
    def _put(self, y: int, x: int, text: str, attr: int) -> None:
        if y >= self.height or x >= self.width:
            return
        text = clip(text, self.width - x - (1 if y == self.height - 1 else 0))
        try:
            self.scr.addstr(y, x, text, attr)
        except curses.error:
            pass

    def draw(self) -> None:
        self.scr.erase()
        self._draw_pane()
        self._draw_status()
        self._draw_input()

    def _draw_pane(self) -> None:
        height = self._pane_height()
        top = len(self.rows) - self.scroll - height
        for y in range(height):
            index = top + y
            if 0 <= index < len(self.rows):
                text, attr, tag = self.rows[index]
                self._put(y, 0, text[:_STAMP_WIDTH], self.attr["stamp"])
                if tag:
                    self._put(y, _STAMP_WIDTH, text[_STAMP_WIDTH:_STAMP_WIDTH + tag], self.attr["chat_tag"])
                x = _STAMP_WIDTH + text_width(text[_STAMP_WIDTH:_STAMP_WIDTH + tag])
                self._put(y, x, text[_STAMP_WIDTH + tag:], attr)

    def status_text(self) -> tuple[str, str, bool]:
        """Left part, right part and whether the state is bad (for the status bar)."""
        s = self.session
        now = self.driver.clock()
        server = str(s.server) if s.server else "-"
        if s.role:
            server += f" ({s.role})"
        user = s.user or "not logged in"
        bad = False
        if s.state is State.CONNECTING:
            state = f"connecting to {s.server}"
        elif s.state is State.IDENTIFYING:
            state = f"connected, logging in as {s.user}" if s.user else "connected, starting"
        elif s.state is State.READY:
            state = "connected, resumed" if s.resumed else "connected"
        elif s.state is State.WAITING:
            wait = math.ceil(max(0.0, (s.retry_at or now) - now))
            why = "all servers down, " if s.all_down else "no primary yet, " if s.no_primary else ""
            state = f"{why}reconnecting in {wait}s"
            bad = True
        elif s.state is State.EXITING:
            state = "leaving"
        elif s.state is State.CLOSED:
            state = "closed"
        else:
            state = "starting"
        parts = [user, state]
        if s.queued:
            parts.append(f"{len(s.queued)} queued")
        if self.scroll:
            parts.append(f"scrolled up {self.scroll} (PgDn)")
        length = request_length(self.editor.text)
        right = f"{length}/{MAX_REQUEST_CHARS}" + (" too long" if length > MAX_REQUEST_CHARS else "") + " "
        rest = " | " + " | ".join(parts)
        room = self.width - len(right) - len(rest) - 2       # the server gives way on narrow screens
        if len(server) > room:
            server = server[:max(0, room - 1)] + "~"
        return " " + server + rest, right, bad

    def _draw_status(self) -> None:
        if self.height < 2:
            return
        left, right, bad = self.status_text()
        y = self.height - 2
        attr = self.attr["status_bad"] if bad else self.attr["status"]
        room = self.width - text_width(right) - 1
        left = clip(sanitize(left), max(0, room))
        self._put(y, 0, left + " " * (self.width - text_width(left)), attr)
        long_attr = self.attr["status_bad"] if "too long" in right else attr
        self._put(y, max(0, self.width - text_width(right)), right, long_attr)

    def _draw_input(self) -> None:
        y = self.height - 1
        if self.asking is not None:  # hidden input: the question only, nothing of the answer
            label = clip(self.asking.questions[len(self.asking.answers)].label, max(2, self.width - 1))
            self._put(y, 0, label + " " * (self.width - text_width(label) - 1), curses.A_BOLD)
            try:
                self.scr.move(y, min(self.width - 1, text_width(label)))
            except curses.error:
                pass
            return
        prompt = "> "
        visible, col = self.editor.view(max(2, self.width - len(prompt) - 1))
        self._put(y, 0, prompt + visible, curses.A_NORMAL)
        try:
            self.scr.move(y, min(self.width - 1, len(prompt) + col))
        except curses.error:
            pass

    def refresh(self) -> None:
        self.draw()
        self.scr.refresh()

    # input ---------------------------------------------------------------------------------
    def on_keys(self) -> None:
        """Read every key curses has (stdin was readable)."""
        while not self.quit:
            try:
                key = self.scr.get_wch()
            except curses.error:
                return
            self.key(key)

    def key(self, key) -> None:
        """One key from ``get_wch``: a character (str) or a curses key code (int)."""
        if self.asking is not None:
            self._secret_key(key)
            return
        action = self._char_action(key) if isinstance(key, str) else self._key_action(key)
        if action is not None:
            action()

    def _char_action(self, key: str):
        e = self.editor
        control = {
            "\n": self.submit, "\r": self.submit, "\x7f": e.backspace, "\x08": e.backspace,
            "\x03": self.leave, "\x04": self.leave,                      # Ctrl-C, Ctrl-D
            "\x01": e.home, "\x05": e.end, "\x02": e.left, "\x06": e.right,  # Ctrl-A/E/B/F
            "\x15": e.kill_to_start, "\x0b": e.kill_to_end,             # Ctrl-U, Ctrl-K
            "\x17": e.delete_word_back, "\x0c": self.scr.clear,          # Ctrl-W, Ctrl-L
            "\x12": self.reconnect, "\t": lambda: e.insert(" "),         # Ctrl-R, Tab
        }
        if key in control:
            return control[key]
        if key >= " ":
            return lambda: self.insert(key)
        return None                                 # other control characters: ignored

    def _key_action(self, key: int):
        e = self.editor
        return {
            curses.KEY_LEFT: e.left, curses.KEY_RIGHT: e.right, curses.KEY_HOME: e.home,
            curses.KEY_END: e.end, curses.KEY_BACKSPACE: e.backspace, curses.KEY_DC: e.delete,
            curses.KEY_UP: e.history_prev, curses.KEY_DOWN: e.history_next,
            curses.KEY_PPAGE: self.page_up, curses.KEY_NPAGE: self.page_down,
            curses.KEY_ENTER: self.submit, curses.KEY_RESIZE: self.resize,
        }.get(key)

    def insert(self, char: str) -> None:
        if not self.editor.insert(char):
            curses.beep()                           # the line is full

    def reconnect(self) -> None:
        """Ctrl-R: skip the rest of a backoff wait."""
        self.session.retry_now(self.driver.clock())
        self.driver.pump()

    def page_up(self) -> None:
        step = max(1, self._pane_height() - 1)
        if self.scroll + step > self._max_scroll():
            self._load_older(self._pane_height())
        self.scroll = min(self._max_scroll(), self.scroll + step)

    def page_down(self) -> None:
        self.scroll = max(0, self.scroll - max(1, self._pane_height() - 1))

    def submit(self) -> None:
        line = self.editor.text
        result = parse_command(line)
        if result is None:
            self.editor.submit()
            return
        if isinstance(result, Refusal) and request_length(line) > MAX_REQUEST_CHARS:
            self.add(DisplayLine("refused", result.message))   # keep the text to shorten it
            return
        self.editor.submit()
        self.scroll = 0
        if isinstance(result, Help):
            self.add(DisplayLine("help", HELP_TEXT))
        elif isinstance(result, ShowHistory):
            self._show_conversation(result.peer)
        elif isinstance(result, Refusal):
            self.add(DisplayLine("refused", result.message))
        else:
            self.add(own_line(result))
            self._ask_or_send(result)

    # passwords (extension 2): asked with hidden input, never echoed nor kept in the history ----
    def _ask_or_send(self, command: Command) -> None:
        asked = questions(command, self.session.user) if self.session.passwords else []
        answers = from_environment(command) if asked else None
        if asked and answers is None:
            self.asking = _Asking(command, asked)
            return
        self._send(finish(command, asked, answers) if asked else command)

    def _secret_key(self, key) -> None:
        """A key while a password is asked: typed blind; Enter answers, Esc cancels."""
        asking = self.asking
        if key in ("\n", "\r") or key == curses.KEY_ENTER:
            asking.answers.append("".join(asking.typed))
            asking.typed.clear()
            if len(asking.answers) == len(asking.questions):
                self.asking = None
                self._send(finish(asking.command, asking.questions, asking.answers))
        elif key in ("\x7f", "\x08") or key == curses.KEY_BACKSPACE:
            if asking.typed:
                asking.typed.pop()
        elif key == "\x15":  # Ctrl-U
            asking.typed.clear()
        elif key in ("\x1b", "\x03", "\x04"):  # Esc, Ctrl-C, Ctrl-D: not sent
            self.asking = None
            self.add(DisplayLine("refused", f"{asking.command}: cancelled, nothing was sent."))
        elif isinstance(key, str) and key >= " " and len(asking.typed) < 1000:
            asking.typed.append(key)

    def _send(self, result) -> None:
        if isinstance(result, Refusal):
            self.add(DisplayLine("refused", result.message))
        else:
            told = self.history.login_submitted(result, self.session.saved)
            if told:
                self.add(DisplayLine("info", told))
            waiting = len(self.session.queued)
            if self.session.submit(result, self.driver.clock()) is not None and result.op == OP_EXIT \
                    and not self.session.closed:
                if self.session.state is not State.EXITING:
                    self.add(DisplayLine("info", f"leaving after {waiting} queued command(s) are sent; "
                                                 "Ctrl-C leaves now"))
            self.driver.pump()

    def leave(self) -> None:
        self.session.close(self.driver.clock())
        self.driver.pump()
        self.quit = True

    def resize(self) -> None:
        try:
            size = os.get_terminal_size(sys.__stdout__.fileno())
            if (size.lines, size.columns) != self.scr.getmaxyx():
                curses.resizeterm(size.lines, size.columns)
        except (OSError, curses.error):
            pass
        self.height, self.width = self.scr.getmaxyx()
        self._rebuild_rows()
        self.scr.clear()

    def show(self, events) -> None:
        for event in events:
            self.history.observe(event, self.session.user)
            if isinstance(event, UserChanged) and event.user is not None:
                self._show_history(event.user)
            for line in self.presenter.lines(event):
                self.add(line)
                if isinstance(event, SessionClosed) and line.kind == "error":
                    self.leftovers.append(line)     # also say it after the window is gone
        for notice in self.history.take_notices():
            self.add(DisplayLine("error", notice))

    # history -------------------------------------------------------------------------------
    @staticmethod
    def _history_line(row) -> DisplayLine:
        return DisplayLine("history", row_text(row), stamp=row_time(row))

    def _show_history(self, user: str) -> None:
        """``user`` logged in: the last screenful of what is stored, marked as history."""
        view = self.history.on_login(user, max(1, self._pane_height() - 3))
        self.history_view = view
        if view is None:
            return
        self.history_top = DisplayLine("info", f"history of {user}, as stored on this computer (PgUp for older)")
        self.add(self.history_top)
        for row in view.rows:
            self.add(self._history_line(row))
        self.add(DisplayLine("info", "end of history"))

    def _load_older(self, count: int) -> None:
        """PgUp past the top: older stored lines go right below the history heading."""
        if self.history_view is None:
            return
        rows = self.history.older(self.history_view, count)
        if not rows:
            return
        index = next((i + 1 for i, (_, line) in enumerate(self.lines) if line is self.history_top), 0)
        self.lines[index:index] = [(row_time(row), self._history_line(row)) for row in rows]
        self._rebuild_rows()

    def _show_conversation(self, peer: str) -> None:
        rows, heading = self.history.conversation(self.session.user, peer)
        self.add(DisplayLine("info" if rows else "error", heading))
        for row in rows:
            self.add(self._history_line(row))


def run_curses(session: ClientSession, driver: SocketDriver, presenter: Presenter, args,
               history: HistoryKeeper | None = None) -> int:
    """Run the window until the session ends or the user leaves; the exit status.  Raises
    :class:`NoCurses` (before touching the screen) if the terminal cannot do it."""
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")
    curses.use_env(False)            # take the size from the terminal, not $LINES/$COLUMNS
    color = not args.no_color and "NO_COLOR" not in os.environ
    leftovers: list[DisplayLine] = []

    def run(stdscr) -> int:
        stdscr.nodelay(True)
        stdscr.keypad(True)
        ui = CursesUI(stdscr, session, driver, presenter, color, history)
        ui.leftovers = leftovers
        with _WindowInput(ui, driver):
            _loop(ui, session, driver)
        return 0

    _check_terminal()
    try:
        status = curses.wrapper(run)
    except KeyboardInterrupt:
        session.close(driver.clock())
        driver.pump()
        status = 130
    for line in leftovers:
        print(f"chatclient: {line.text}", file=sys.stderr)
    return status


def _check_terminal() -> None:
    try:
        curses.setupterm()
    except curses.error as exc:
        raise NoCurses(str(exc) or "unknown terminal") from None
    if not curses.tigetstr("cup") or not curses.tigetstr("clear"):
        raise NoCurses(f"TERM={os.environ.get('TERM', '')} cannot move the cursor")


def _loop(ui: CursesUI, session: ClientSession, driver: SocketDriver) -> None:
    ui.show(driver.start())
    ui.refresh()
    while not ui.quit and not session.closed:
        try:
            ui.show(driver.step(0.25 if session.state is State.WAITING else 1.0))
            if ui.resized:
                ui.resized = False
                ui.resize()
            ui.refresh()
        except KeyboardInterrupt:
            ui.leave()
    ui.show(driver.take_events())


class _WindowInput:
    """While the window is up: keys from stdin go to the UI, and SIGWINCH marks it resized and
    wakes the driver's selector (through a pipe, since a signal handler may not redraw)."""

    def __init__(self, ui: CursesUI, driver: SocketDriver) -> None:
        self.ui, self.driver = ui, driver
        self.stdin = sys.stdin.fileno()

    def __enter__(self) -> _WindowInput:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.previous = signal.signal(signal.SIGWINCH, self._on_winch)
        self.driver.add_reader(self.stdin, self.ui.on_keys)
        self.driver.add_reader(self.wake_r, self._on_wake)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGWINCH, self.previous)
        self.driver.remove_reader(self.stdin)
        self.driver.remove_reader(self.wake_r)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _on_winch(self, signum, frame) -> None:
        self.ui.resized = True
        try:
            os.write(self.wake_w, b"w")
        except OSError:
            pass

    def _on_wake(self) -> None:
        try:
            os.read(self.wake_r, 512)
        except OSError:
            pass
