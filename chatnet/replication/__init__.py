"""Replication: a pure primary-backup core (:mod:`.core`), its peer messages and framing
(:mod:`.messages`), the peer handshake (:mod:`.handshake`) and a deterministic cluster
simulator (:mod:`.sim`).  See docs/replication.md."""

from .core import BACKUP, ELECTING, PRIMARY, RECOVERING, DurableState, Entry, HardState, Ready, Replica, Snapshot
from .messages import DecodeError, FrameError, PeerFramer, decode_message, encode_message, frame

__all__ = ["Replica", "Ready", "DurableState", "HardState", "Snapshot", "Entry",
           "PRIMARY", "BACKUP", "ELECTING", "RECOVERING",
           "encode_message", "decode_message", "DecodeError", "PeerFramer", "FrameError", "frame"]
