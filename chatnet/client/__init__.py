"""chatnet's client library: command parsing, a sans-I/O session, and one socket driver.

* :mod:`.commands` turns what the user types (the seed's ``send|bob|hi`` syntax) into a
  :class:`Command`, a :class:`Refusal` or :class:`Help`, checked before sending.
* :mod:`.session` decides everything about connections — which server, when to retry, how to
  follow a backup's redirect, who to log in again as, what is queued — with no I/O at all.
* :mod:`.driver` executes the session's decisions on a non-blocking socket (selectors).
* :mod:`.present` turns session events into display lines for the curses and plain UIs.

Typical use::

    session = ClientSession(parse_servers("127.0.0.1:1538"))
    driver = SocketDriver(session)
    driver.start()
    session.submit(parse_command("create|alice"), driver.clock())
    driver.run_until(lambda: session.idle, timeout=5, on_event=print)
"""

from .commands import HELP_TEXT, Command, Help, Refusal, parse_command, request_length
from .driver import SocketDriver
from .session import (
    DEFAULT_SERVERS,
    Backoff,
    ClientSession,
    Pending,
    Server,
    State,
    parse_server,
    parse_servers,
)

__all__ = [
    "HELP_TEXT", "Command", "Help", "Refusal", "parse_command", "request_length",
    "SocketDriver", "DEFAULT_SERVERS", "Backoff", "ClientSession", "Pending", "Server", "State",
    "parse_server", "parse_servers",
]
