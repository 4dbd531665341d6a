"""The event loop: a single-threaded ``selectors`` reactor (:mod:`.reactor`), the buffered
non-blocking socket every connection uses (:mod:`.connection`) and the hashed timer wheel that
drives heartbeats, failure detection and elections (:mod:`.timerwheel`).  Nothing here knows
about chat or replication."""
