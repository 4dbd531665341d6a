"""``chatclient``: command line, then the curses window (``tui.py``) or plain mode (``plain.py``).

The connection logic lives in :mod:`chatnet.client` (a sans-I/O session and a socket driver);
the front ends only read keys or lines, show events, and run the loop.  Both wait in the
driver's selector, so network events, keys and timers are handled in one thread, in order.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys

from ..loop.tls import client_context
from .driver import SocketDriver
from .history import HistoryKeeper
from .plain import PlainUI
from .present import Presenter
from .servers import DEFAULT_SERVERS, Backoff, parse_servers
from .session import ClientSession
from .state import StateStore, default_state_dir
from .tui import CursesUI, NoCurses, run_curses

__all__ = ["build_parser", "main", "PlainUI", "CursesUI", "run_curses"]

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
  history NAME           show your stored conversation with NAME (local, nothing is sent)
  help                   show the commands
  passwd                 change your password
  shortcuts: /msg NAME MESSAGE (/m), /create NAME, /login NAME, /list [PATTERN],
             /delete, /passwd, /quit, /history NAME, /help

passwords: create, login, delete and passwd ask for passwords with hidden input (never
shown, never kept in the history or on disk).  Plain mode takes them from $CHATNET_PASSWORD
(passwd's new one from $CHATNET_NEW_PASSWORD) when set, else asks on the terminal; the
window uses them too when set.  Enter on an empty password logs in to (or deletes) an
account without one.  --no-extension sends no passwords (the seed protocol).

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

TLS: --tls-ca FILE (the CA that signed the servers' certificates) or --tls (the system's trust
store) encrypts every connection and checks that the certificate names the address dialled;
a server that fails the check is not used ("TLS: certificate verify failed: ...").  Without
them, everything, passwords included, crosses the network in clear text.

state: per server list, the resume token, the last chat sequence number and the history of
each account are kept in $XDG_DATA_HOME/chatnet (default ~/.local/share/chatnet; --state-dir),
a chat being written there before it is acknowledged.  login|NAME after a restart of the client
resumes where the last run left off (chat that came meanwhile is shown once) and shows the
conversation you left; delete the directory to forget everything.

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
    parser.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("CHATNET_TLS_CA"),
                        help="use TLS, verifying the servers with the CA certificates in FILE "
                             "(default: $CHATNET_TLS_CA)")
    parser.add_argument("--tls", action="store_true",
                        help="use TLS, verifying the servers with the system's trust store")
    _add_state_arguments(parser)
    return parser


def tls_context(args, parser: argparse.ArgumentParser) -> ssl.SSLContext | None:
    """The TLS context of --tls-ca / --tls, or None (plaintext); a bad CA file is a usage error."""
    if not (args.tls_ca or args.tls):
        return None
    try:
        return client_context(args.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"--tls-ca {args.tls_ca}: {exc}")


def _add_state_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where to keep resume state and history (default: $XDG_DATA_HOME/chatnet, "
                             "else ~/.local/share/chatnet)")
    parser.add_argument("--no-state", action="store_true",
                        help="keep nothing on disk: a restarted client logs in afresh")
    parser.add_argument("--no-history", action="store_true",
                        help="keep only the resume state on disk, no chat history")
    parser.add_argument("--history", type=int, default=0, metavar="N",
                        help="plain mode: after a login, print the last N stored lines of the conversation")


def open_state(args, servers) -> StateStore | None:
    """The state store ``args`` ask for (None with --no-state); a bad file never stops us."""
    if args.no_state:
        return None
    return StateStore.open(args.state_dir or default_state_dir(), servers, history=not args.no_history)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        servers = parse_servers(args.servers)
    except ValueError as exc:
        parser.error(f"--servers: {exc}")
    if args.max_backoff <= 0 or args.connect_timeout <= 0:
        parser.error("--max-backoff and --connect-timeout must be positive")
    if args.history < 0:
        parser.error("--history must be 0 or more")
    tls = tls_context(args, parser)
    store = open_state(args, servers)
    durable = store is not None and store.enabled
    session = ClientSession(
        servers,
        backoff=Backoff(base=min(0.5, args.max_backoff), cap=args.max_backoff),
        connect_timeout=args.connect_timeout,
        extension=not args.no_extension,
        passwords=not args.no_extension,
        saved=store.load_accounts() if durable else None,
    )
    driver = SocketDriver(session, persist=store.persist if durable else None, tls=tls)
    presenter = Presenter(verbose=args.verbose)
    history = HistoryKeeper(store)
    plain = args.plain or not (sys.stdin.isatty() and sys.stdout.isatty())
    previous = signal.signal(signal.SIGTERM, _interrupt)   # leave as cleanly as on Ctrl-C
    try:
        if not plain:
            try:
                return run_curses(session, driver, presenter, args, history)
            except NoCurses as exc:
                print(f"chatclient: cannot use this terminal ({exc}); using plain mode", file=sys.stderr)
        return PlainUI(session, driver, presenter, args, history).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        driver.close()
        if store is not None:
            store.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
