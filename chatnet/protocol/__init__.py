"""The wire protocol, without I/O: the request/response codec (:mod:`.codec`) and every text a
client or peer sees on the wire (:mod:`.texts`).  See docs/protocol.md."""
