"""``chatclient``: the chat client, as a curses split-pane UI or as one line per event (plain).

The connection logic lives in :mod:`chatnet.client` (a sans-I/O session and a socket driver);
this module only reads keys or lines, shows events, and runs the loop.  Both UIs wait in the
driver's selector, so network events, keys and timers are handled in one thread, in order.
"""

from __future__ import annotations

import argparse
import codecs
import curses
import locale
import math
import os
import signal
import sys
import time

from . import (
    DEFAULT_SERVERS,
    HELP_TEXT,
    Backoff,
    ClientSession,
    Command,
    Help,
    Refusal,
    SocketDriver,
    State,
    parse_command,
    parse_servers,
    request_length,
)
from .commands import OP_EXIT
from .editor import LineEditor, clip, sanitize, text_width, wrap
from .present import DisplayLine, Presenter, own_line
from .session import SessionClosed
from ..protocol.codec import MAX_REQUEST_CHARS

DESCRIPTION = """\
Chat with a chatnet server (the CS262 wire protocol).  In a terminal this opens a split-pane
window: messages above, a status bar (server and role, your user, connection state, request
length), and an input line.  When stdin or stdout is not a terminal, or with --plain, it reads
commands line by line and prints one line per event.
"""

EPILOG = """\
commands (the seed's syntax; checked before sending, at most 280 characters):
  create|NAME            create an account and log in as it
  login|NAME             log in; chat sent while you were away follows
  send|NAME|MESSAGE      send a chat (queued for NAME until they log in)
  list   list|PATTERN    list accounts, optionally matching a wildcard such as a*
  delete                 delete your account and log out
  exit                   leave
  help                   show the commands
  shortcuts: /msg NAME MESSAGE (/m), /create NAME, /login NAME, /list [PATTERN],
             /delete, /quit, /help

keys (curses mode):
  Enter send the line     Left/Right, Home/End (Ctrl-A/Ctrl-E) move
  Backspace/Delete        Ctrl-U/Ctrl-K delete to start/end, Ctrl-W delete a word
  Up/Down  history        PgUp/PgDn scroll the messages
  Ctrl-R   reconnect now  Ctrl-L redraw     Ctrl-C or Ctrl-D leave

reconnecting: when the connection breaks, the client tries the servers of --servers in
order (following a backup's note to the primary), then waits with capped exponential
backoff; it resumes your session by itself ("resumed as NAME"), and commands typed
meanwhile are sent afterwards.  With a chatnet server (protocol extension 1) no chat is lost
or shown twice and a send retried after a failover is delivered once; with other servers
(or --no-extension) it logs in again and delivery is at-least-once.

plain mode prints "ok: ...", "error: ...", "note: ...", "<sender> text" for chat,
"refused: ..." for lines not sent, and "* ..." for connection events; at the end of
input it waits for the pending answers (at most --eof-timeout seconds) and exits
(status 1 if some commands could not be sent).

example:  printf 'create|alice\\nlist\\n' | chatclient --servers 127.0.0.1:1538
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatclient", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ",".join(str(s) for s in DEFAULT_SERVERS)
    parser.add_argument("--servers", default=os.environ.get("CHATNET_SERVERS", default),
                        metavar="H:P,...",
                        help=f"servers to use, in order of preference (default: $CHATNET_SERVERS or {default})")
    parser.add_argument("--plain", action="store_true",
                        help="one line per event instead of the curses window (automatic when stdin "
                             "or stdout is not a terminal)")
    parser.add_argument("--no-color", action="store_true",
                        help="curses mode: no colours (also when $NO_COLOR is set)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report every connection attempt and retry, not just state changes")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="plain mode: print only answers and chat, no connection events")
    parser.add_argument("--max-backoff", type=float, default=5.0, metavar="SECONDS",
                        help="longest wait between rounds of reconnection attempts (default: 5)")
    parser.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up on a connection attempt after this long (default: 5)")
    parser.add_argument("--no-extension", action="store_true",
                        help="speak only the seed protocol: no session resume, sequence numbers or "
                             "request ids (delivery is then at-least-once)")
    parser.add_argument("--eof-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="plain mode: at the end of input, wait at most this long for pending "
                             "answers (default: 30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        servers = parse_servers(args.servers)
    except ValueError as exc:
        parser.error(f"--servers: {exc}")
    if args.max_backoff <= 0 or args.connect_timeout <= 0:
        parser.error("--max-backoff and --connect-timeout must be positive")
    session = ClientSession(
        servers,
        backoff=Backoff(base=min(0.5, args.max_backoff), cap=args.max_backoff),
        connect_timeout=args.connect_timeout,
        extension=not args.no_extension,
    )
    driver = SocketDriver(session)
    presenter = Presenter(verbose=args.verbose)
    plain = args.plain or not (sys.stdin.isatty() and sys.stdout.isatty())
    previous = signal.signal(signal.SIGTERM, _interrupt)   # leave as cleanly as on Ctrl-C
    try:
        if not plain:
            try:
                return run_curses(session, driver, presenter, args)
            except _NoCurses as exc:
                print(f"chatclient: cannot use this terminal ({exc}); using plain mode", file=sys.stderr)
        return PlainUI(session, driver, presenter, args).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        driver.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _NoCurses(Exception):
    """curses could not set up the terminal (e.g. TERM=dumb); nothing was started yet."""


# ---------------------------------------------------------------------------------- plain mode

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


# --------------------------------------------------------------------------------- curses mode

_PREFIX = {"chat": "", "own": "", "ok": "-- ", "note": "** ", "error": "!! ", "refused": "!! ",
           "info": "== ", "help": "   "}
_STAMP_WIDTH = 6      # "HH:MM "
_MAX_LINES = 5000


class CursesUI:
    """The split-pane window: message pane, status bar, input line."""

    def __init__(self, stdscr, session: ClientSession, driver: SocketDriver, presenter: Presenter,
                 color: bool) -> None:
        self.scr, self.session, self.driver, self.presenter = stdscr, session, driver, presenter
        self.editor = LineEditor()
        self.lines: list[tuple[str, DisplayLine]] = []  # (time stamp, line)
        self.rows: list[tuple[str, int, int]] = []      # (text, attr, cells of the tag in attr2)
        self.scroll = 0                                 # rows scrolled up from the bottom
        self.quit = False
        self.resized = False
        self.leftovers: list[DisplayLine] = []
        self._init_attrs(color)
        self.height, self.width = self.scr.getmaxyx()

    # attributes ----------------------------------------------------------------------------
    def _init_attrs(self, color: bool) -> None:
        bold, dim = curses.A_BOLD, curses.A_DIM
        self.attr = {"chat": curses.A_NORMAL, "chat_tag": bold, "own": bold, "ok": curses.A_NORMAL,
                     "note": curses.A_UNDERLINE, "error": bold | curses.A_STANDOUT,
                     "refused": bold | curses.A_STANDOUT, "info": dim, "help": curses.A_NORMAL,
                     "stamp": dim, "status": curses.A_REVERSE, "status_bad": curses.A_REVERSE | bold}
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
        stamp = time.strftime("%H:%M")
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
        e = self.editor
        if isinstance(key, str):
            if key in ("\n", "\r"):
                self.submit()
            elif key in ("\x7f", "\x08"):
                e.backspace()
            elif key in ("\x03", "\x04"):
                self.leave()
            elif key == "\x01":
                e.home()
            elif key == "\x05":
                e.end()
            elif key == "\x02":
                e.left()
            elif key == "\x06":
                e.right()
            elif key == "\x15":
                e.kill_to_start()
            elif key == "\x0b":
                e.kill_to_end()
            elif key == "\x17":
                e.delete_word_back()
            elif key == "\x0c":
                self.scr.clear()
            elif key == "\x12":
                self.session.retry_now(self.driver.clock())
                self.driver.pump()
            elif key == "\t":
                e.insert(" ")
            elif key >= " " and key != "\x7f":
                if not e.insert(key):
                    curses.beep()
            return
        actions = {
            curses.KEY_LEFT: e.left, curses.KEY_RIGHT: e.right, curses.KEY_HOME: e.home,
            curses.KEY_END: e.end, curses.KEY_BACKSPACE: e.backspace, curses.KEY_DC: e.delete,
            curses.KEY_UP: e.history_prev, curses.KEY_DOWN: e.history_next,
            curses.KEY_PPAGE: self.page_up, curses.KEY_NPAGE: self.page_down,
            curses.KEY_ENTER: self.submit, curses.KEY_RESIZE: self.resize,
        }
        action = actions.get(key)
        if action is not None:
            action()

    def page_up(self) -> None:
        self.scroll = min(self._max_scroll(), self.scroll + max(1, self._pane_height() - 1))

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
        elif isinstance(result, Refusal):
            self.add(DisplayLine("refused", result.message))
        else:
            self.add(own_line(result))
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
            for line in self.presenter.lines(event):
                self.add(line)
                if isinstance(event, SessionClosed) and line.kind == "error":
                    self.leftovers.append(line)     # also say it after the window is gone


def run_curses(session: ClientSession, driver: SocketDriver, presenter: Presenter, args) -> int:
    locale.setlocale(locale.LC_ALL, "")
    os.environ.setdefault("ESCDELAY", "25")
    curses.use_env(False)            # take the size from the terminal, not $LINES/$COLUMNS
    color = not args.no_color and "NO_COLOR" not in os.environ
    leftovers: list[DisplayLine] = []

    def run(stdscr) -> int:
        stdscr.nodelay(True)
        stdscr.keypad(True)
        ui = CursesUI(stdscr, session, driver, presenter, color)
        ui.leftovers = leftovers
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        def on_winch(signum, frame):
            ui.resized = True
            try:
                os.write(wake_w, b"w")
            except OSError:
                pass

        def on_wake():
            try:
                os.read(wake_r, 512)
            except OSError:
                pass

        previous = signal.signal(signal.SIGWINCH, on_winch)
        driver.add_reader(sys.stdin.fileno(), ui.on_keys)
        driver.add_reader(wake_r, on_wake)
        try:
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
            return 0
        finally:
            signal.signal(signal.SIGWINCH, previous)
            driver.remove_reader(sys.stdin.fileno())
            driver.remove_reader(wake_r)
            os.close(wake_r)
            os.close(wake_w)

    try:
        curses.setupterm()
    except curses.error as exc:
        raise _NoCurses(str(exc) or "unknown terminal") from None
    if not curses.tigetstr("cup") or not curses.tigetstr("clear"):
        raise _NoCurses(f"TERM={os.environ.get('TERM', '')} cannot move the cursor")
    try:
        status = curses.wrapper(run)
    except KeyboardInterrupt:
        session.close(driver.clock())
        driver.pump()
        status = 130
    for line in leftovers:
        print(f"chatclient: {line.text}", file=sys.stderr)
    return status
