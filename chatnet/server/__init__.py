"""A chatnet replica: the chat state machine (:mod:`.state`), the client-session service on top of
it (:mod:`.service`), the SQLite store (:mod:`.store`), the replica host that runs the
Ready/Advance cycle (:mod:`.host`), the socket front end for clients (:mod:`.chatserver`), and the
configuration, launcher and command line (:mod:`.config`, :mod:`.launcher`, :mod:`.cli`)."""
