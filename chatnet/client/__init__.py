"""chatnet's client library: command parsing, a sans-I/O session, and one socket driver.

* :mod:`.commands` turns what the user types (the seed's ``send|bob|hi`` syntax) into a
  :class:`Command`, a :class:`Refusal` or :class:`Help`, checked before sending.
* :mod:`.session` decides everything about connections — which server, when to retry, how to
  follow a backup's redirect, who to log in again as, what is queued — with no I/O at all.  It
  coordinates small pieces, one rule each: :mod:`.servers` (server choice, :class:`Backoff`),
  :mod:`.identity` (who we are, resume state, the handshake of each connection), :mod:`.outbox`
  (queued and in-flight commands, request ids), :mod:`.acks` (exactly-once chat),
  :mod:`.listing` (list answers over several frames); :mod:`.events` holds what it emits.
* :mod:`.driver` executes the session's decisions on a non-blocking socket (selectors), and
  hands its :class:`~.events.Persist` actions (durable state, ``ClientSession(saved=...)``; off by
  default) to :mod:`.state`, the SQLite store ``chatclient`` keeps per server list, before the
  acknowledgement that follows them; :mod:`.history` is the front ends' side of it.
* :mod:`.present` turns session events into display lines for the curses and plain UIs
  (:mod:`.tui`, :mod:`.plain`; :mod:`.cli` is the ``chatclient`` command).

Typical use::

    session = ClientSession(parse_servers("127.0.0.1:1538"))
    driver = SocketDriver(session)
    driver.start()
    session.submit(parse_command("create|alice"), driver.clock())
    driver.run_until(lambda: session.idle, timeout=5, on_event=print)
"""

from .commands import HELP_TEXT, Command, Help, Refusal, parse_command, request_length
from .driver import SocketDriver
from .outbox import Pending
from .servers import DEFAULT_SERVERS, Backoff, Server, parse_server, parse_servers
from .session import ClientSession, State

__all__ = [
    "HELP_TEXT", "Command", "Help", "Refusal", "parse_command", "request_length",
    "SocketDriver", "DEFAULT_SERVERS", "Backoff", "ClientSession", "Pending", "Server", "State",
    "parse_server", "parse_servers",
]
