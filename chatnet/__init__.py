"""chatnet: a persistent, replicated chat service speaking the CS262 pipe-delimited wire protocol.

The package keeps protocol logic free of I/O: ``codec`` turns bytes into requests and
responses into bytes, ``state`` is the deterministic chat state machine, ``service`` maps
connection events to state-machine commands and response frames.  Only ``reactor`` touches
sockets and the clock, and only ``store`` touches SQLite.
"""

__version__ = "0.1.0"
