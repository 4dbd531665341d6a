"""A seeded protocol fuzzer against a live replica (issue 10).

Hostile clients send random ops and arguments, extension ops (``0|ext|1``, ``0|ack|N``, the
password verbs of extension 2, a mangled TLS record,
``0|send|…``, op 7 resumes with real and forged tokens), arbitrary bytes and Unicode, pipelined
requests, requests cut into partial chunks, floods, and close abruptly (RST, half-close, close
mid-request).  Meanwhile a well-behaved pair of clients chats and lists.  The run asserts that
the replica stays up, every byte it sends on any connection decodes as well-formed frames
(chatnet.protocol.codec.ResponseDecoder), the well-behaved clients get every answer within a
deadline, and the replica's log shows no traceback.

Why a live replica and not the service in memory: crashes found so far lived in the glue between
the codec, the service and the reactor (pipelined requests handled in a hook without a guard),
which only a real process exercises.

Seeded: the seed is printed and every failure names it; rerun with
``CHATNET_FUZZ_SEED=N python3 -m pytest tests/test_fuzz.py``.  The interleaving of threads and
the kernel's chunking are not reproducible, the request streams are.  The default run lasts
``CHATNET_FUZZ_SECONDS`` (20 s); ``-m slow`` runs ``test_fuzz_long`` for
``CHATNET_FUZZ_LONG_SECONDS`` (600 s).
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import threading
import time

import pytest

from chatnet.protocol.codec import NEED_DATA, ProtocolError, ResponseDecoder
from chatnet.testing import FrameTimeout, RawClient, ServerProcess

HOSTILE_THREADS = 3
ANSWER_DEADLINE = float(os.environ.get("CHATNET_FUZZ_DEADLINE", "3"))  # seconds, well-behaved clients


# ---------------------------------------------------------------------------- generators

# Characters that have broken parsers before: non-ASCII digits (isdigit() but not int()),
# separators str.splitlines() honours, zero-width and bidi marks, NUL, combining marks.
TRICKY = "²³¹٣١３߁𝟙\u0085\u2028\u2029\u200b\u200f\u202e\ufeff\x00\x7f\t\r\x0b\x0c é\u0301ß\U0001F600\uffff"
DIGITS = ["0", "1", "2", "17", "999999", "9" * 40, "0" * 200 + "1", "²", "٣", "１", "-1", "+1", " 3 ", "", "1e3", "0x10"]


class Generator:
    """Random requests from one seeded ``random.Random``: mostly well-formed-looking ops with
    hostile arguments, some garbage, some raw bytes."""

    def __init__(self, rng: random.Random, tokens: list) -> None:
        self.rng = rng
        self.tokens = tokens  # tokens seen in answers (shared): resumes with real ones too

    def text(self, limit: int = 40) -> str:
        rng = self.rng
        pools = [TRICKY, "abcxyz|*?[]!-_ ", "".join(map(chr, range(32, 127)))]
        n = rng.choice([0, 1, 2, rng.randrange(limit + 1), rng.randrange(300)])
        out = []
        for _ in range(n):
            if rng.random() < 0.1:
                out.append(chr(rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)])))
            else:
                out.append(rng.choice(rng.choice(pools)))
        return "".join(out)

    def name(self) -> str:
        rng = self.rng
        if rng.random() < 0.7:
            return f"f{rng.randrange(40)}"
        return self.text(40)

    def number(self) -> str:
        return self.rng.choice(DIGITS) if self.rng.random() < 0.7 else str(self.rng.randrange(1 << 70))

    def pattern(self) -> str:
        rng = self.rng
        base = rng.choice(["", "*", "f*", "f1?", "[f]*", "[!a]*", "[", "[]", "[z-a]*", "*" * 60, "?" * 33,
                           "f[0-9]", self.name(), self.text(20)])
        if rng.random() < 0.3:
            base += "|" + self.number()
        return base

    def extension(self) -> str:
        rng = self.rng
        return rng.choice([
            "ext|1", "ext|1", "ext|2", "ext", f"ack|{self.number()}", f"ack|{self.number()}",
            f"send|{rng.choice(['r1', 'r' + str(rng.randrange(9)), self.text(40)])}|{self.name()}|{self.text()}",
            f"{self.text(8)}|{self.text(8)}",
            # extension 2 (passwords): the verbs with right, wrong, empty and hostile fields
            f"create|{self.name()}|{self.password()}", f"login|{self.name()}|{self.password()}",
            f"passwd|{self.password()}|{self.password()}", f"delete|{self.password()}",
            f"login|{self.name()}", f"passwd|{self.password()}",
        ])

    def password(self) -> str:
        return self.rng.choice(["pw", "pw", "", " ", "x" * 129, self.text(12)])

    def resume(self) -> str:
        rng = self.rng
        token = rng.choice(self.tokens) if self.tokens and rng.random() < 0.5 else self.text(30)
        fields = [self.name(), token, self.number()] + ([self.text(5)] if rng.random() < 0.1 else [])
        return "|".join(fields[: rng.choice([1, 2, 3, 3, 3, len(fields)])])

    def request(self) -> bytes:
        """One request's bytes, without terminator."""
        rng = self.rng
        op = rng.choice("01234567012345670123456789") if rng.random() < 0.95 else rng.choice(
            ["", " ", "12", "٣", "+1", "create", "-0", self.text(5)])
        args = {
            "0": self.extension, "1": self.name, "2": self.name, "4": self.pattern, "7": self.resume,
            "3": lambda: f"{self.name()}|{self.text()}",
        }.get(op, lambda: self.text(10))()
        line = op if rng.random() < 0.05 else f"{op}|{args}"
        data = line.encode("utf-8", "surrogatepass")
        if rng.random() < 0.05:  # raw bytes: invalid UTF-8, lone continuation bytes, overlongs
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif rng.random() < 0.05 and data:
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([rng.choice([0x80, 0xC0, 0xED, 0xF5, 0xFF])]) + data[pos + 1:]
        return data


# ------------------------------------------------------------------------ hostile clients


class Failures:
    """Failures found by any thread, each naming the seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.items: list[str] = []
        self.lock = threading.Lock()
        self.stats = {"episodes": 0, "bytes": 0, "frames": 0, "errors": 0, "closed by server": 0}

    def count(self, **counts: int) -> None:
        with self.lock:
            for key, n in counts.items():
                self.stats[key.replace("_", " ")] += n

    def add(self, what: str) -> None:
        with self.lock:
            if len(self.items) < 20:
                self.items.append(f"[seed {self.seed}] {what}")


def _read_available(sock: socket.socket, decoder: ResponseDecoder, wait: float) -> tuple[list, bool]:
    """Read what the server sends for up to ``wait`` seconds (or until EOF): (frames, eof).
    A malformed frame raises ProtocolError."""
    frames, eof = [], False
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            break
        except OSError:  # reset by the server: allowed, it may close hostile clients
            eof = True
            break
        if not data:
            eof = True
            break
        decoder.receive_data(data)
        while (frame := decoder.next_event()) is not NEED_DATA:
            frames.append(frame)
    return frames, eof


def _stream(gen: Generator) -> list[bytes]:
    """The chunks one episode writes: seed-mode requests one per write, or a line-mode stream
    (pipelined) cut at random byte positions (partial requests, split UTF-8 characters)."""
    rng = gen.rng
    requests = [gen.request() for _ in range(rng.choice([1, 2, 5, rng.randrange(1, 60)]))]
    if rng.random() < 0.4:  # reach deeper states: an extended, logged-in session first
        requests[:0] = [b"0|ext|1", f"{rng.choice('12')}|f{rng.randrange(40)}".encode()]
    elif rng.random() < 0.2:  # or a password session (extension 2)
        requests[:0] = [b"0|ext|1", b"0|ext|2", f"0|{rng.choice(['create', 'login'])}|p{rng.randrange(20)}|pw".encode()]
    if rng.random() < 0.3:  # seed mode: one request per write (a newline inside switches, as it may)
        return requests
    terms = [rng.choice([b"\n", b"\n", b"\r\n", b"\n\n"]) for _ in requests]
    data = b"\n" + b"".join(r + t for r, t in zip(requests, terms))
    if rng.random() < 0.2:
        data += gen.request()  # an unterminated request left pending (discarded at EOF)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.choice([0, 1, 3, 20]))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def _flood(rng: random.Random) -> list[bytes]:
    """Rare episodes: a pipelined flood, or an endless line."""
    return rng.choice([
        [b"\n" + b"4\n" * 32768],
        [b"\n" + b"4|*\n0|ext|1\n1|flood\n" * 2000],
        [b"\n" + b"x" * 65536 for _ in range(8)],
        [b"3|" + b"\xff" * 65536],
        [b"\x16\x03\x01" + bytes(rng.randrange(256) for _ in range(300))],  # a mangled TLS record
    ])


def _close(sock: socket.socket, rng: random.Random, read) -> None:
    how = rng.choice(["close", "reset", "half", "half"])
    if how == "reset":  # RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif how == "half":  # EOF, then read what the server still says
        try:
            sock.shutdown(socket.SHUT_WR)
            read(0.5)
        except OSError:
            pass
    sock.close()


def episode(gen: Generator, port: int, failures: Failures, label: str) -> None:
    """One hostile connection: write a random stream in random chunks, check every frame."""
    rng = gen.rng
    chunks = _stream(gen) if rng.random() > 0.01 else _flood(rng)
    decoder = ResponseDecoder()
    sent: list[bytes] = []

    def read(wait: float) -> bool:
        frames, eof = _read_available(sock, decoder, wait)
        _collect_tokens(frames, gen)
        failures.count(frames=len(frames), errors=sum(f.status == 1 for f in frames), closed_by_server=eof)
        return eof

    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
    except OSError as exc:
        failures.add(f"{label}: cannot connect: {exc}")
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    failures.count(episodes=1, bytes=sum(map(len, chunks)))
    try:
        for chunk in chunks:
            sock.sendall(chunk)
            sent.append(chunk)
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.005)  # let the chunk arrive on its own
            if rng.random() < 0.05 or read(0.001):
                break  # close mid-stream (or the server closed)
        else:
            read(rng.choice([0, 0.01, 0.1, 0.3]))
        _close(sock, rng, read)
    except ProtocolError as exc:
        failures.add(f"{label}: malformed frame ({exc}) after sending {_show(sent)}")
        sock.close()
    except OSError:
        sock.close()  # the server may drop a hostile connection; that is allowed


def _collect_tokens(frames: list, gen: Generator) -> None:
    """Keep a few real resume tokens, so that some fuzzed resumes are genuine takeovers."""
    for frame in frames:
        if frame.status == 0 and frame.indicator == 0 and frame.message.startswith("token|"):
            gen.tokens.append(frame.message[len("token|"):])
            del gen.tokens[:-20]


def _show(chunks: list[bytes]) -> str:
    data = b"".join(chunks)
    return repr(data[:300]) + (f"... ({len(data)} bytes)" if len(data) > 300 else "")


def hostile(seed: int, index: int, port: int, stop: threading.Event, failures: Failures, tokens: list) -> None:
    gen = Generator(random.Random(f"{seed}-{index}"), tokens)
    n = 0
    while not stop.is_set():
        episode(gen, port, failures, f"hostile {index} episode {n}")
        n += 1


# ----------------------------------------------------------------- the well-behaved clients


class Watcher:
    """Two line-mode clients that chat and list in a loop; every answer must come within
    ANSWER_DEADLINE seconds, and be the right one."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.a, self.b = f"wa{seed % 10**9}", f"wb{seed % 10**9}"
        self.rounds = 0
        self.worst = 0.0

    def _connect(self, name: str) -> RawClient:
        client = RawClient("127.0.0.1", self.port, timeout=ANSWER_DEADLINE)
        client.send(f"1|{name}")
        self._expect(client, f"Account created! Logged in as {name}.")
        return client

    def _expect(self, client: RawClient, message: str) -> None:
        try:
            frame = client.frame()
        except FrameTimeout:
            raise AssertionError(f"no answer within {ANSWER_DEADLINE}s (expected {message!r})") from None
        except EOFError:
            raise AssertionError(f"server closed a well-behaved connection (expected {message!r})") from None
        assert frame.message == message, f"expected {message!r}, got {frame}"

    def run(self, stop: threading.Event, failures: Failures) -> None:
        try:
            a, b = self._connect(self.a), self._connect(self.b)
            while not stop.is_set():
                start = time.monotonic()
                a.send(f"3|{self.b}|ping {self.rounds}")
                self._expect(a, f"Message sent to {self.b}.")
                self._expect(b, f"{self.a}|ping {self.rounds}")
                b.send(f"4|{self.a}")
                self._expect(b, f"\n- {self.a}\n")
                self.worst = max(self.worst, time.monotonic() - start)
                self.rounds += 1
                stop.wait(0.02)
        except (AssertionError, OSError, ProtocolError) as exc:
            failures.add(f"well-behaved client, round {self.rounds}: {exc}")
            stop.set()


# ----------------------------------------------------------------------------- the runs


def _seed(variable: str = "CHATNET_FUZZ_SEED") -> int:
    value = os.environ.get(variable)
    return int(value) if value else random.SystemRandom().randrange(1, 10**9)


def fuzz(replica: ServerProcess, seed: int, seconds: float) -> None:
    """Run the hostile threads and the watcher for ``seconds``; fail naming the seed."""
    print(f"\nfuzzing 127.0.0.1:{replica.port} for {seconds:g}s with seed {seed} "
          f"(rerun: CHATNET_FUZZ_SEED={seed})")
    failures, stop, tokens = Failures(seed), threading.Event(), []
    watcher = Watcher(replica.port, seed)
    threads = [threading.Thread(target=watcher.run, args=(stop, failures), daemon=True)]
    threads += [threading.Thread(target=hostile, args=(seed, i, replica.port, stop, failures, tokens), daemon=True)
                for i in range(HOSTILE_THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set() and replica.alive():
        stop.wait(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    problems = [] if replica.alive() else [f"[seed {seed}] the replica died (exit {replica.proc.returncode})"]
    tracebacks = re.findall(r"Traceback.*?\n(?=\S)[^\n]*", replica.log(), re.S)
    problems += [f"[seed {seed}] the replica logged an exception:\n{tb}" for tb in tracebacks[:3]]
    problems += failures.items[:10]
    print(f"seed {seed}: {watcher.rounds} well-behaved rounds, worst {watcher.worst * 1000:.0f} ms; hostile: "
          + ", ".join(f"{n} {key}" for key, n in failures.stats.items()))
    assert not problems, "\n".join(problems) + f"\nreplica log tail:\n{replica.log()[-3000:]}"
    assert watcher.rounds > 0, f"[seed {seed}] the well-behaved clients never completed a round"


def test_fuzz(replica):
    fuzz(replica(), _seed(), float(os.environ.get("CHATNET_FUZZ_SECONDS", "20")))


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_fuzz_long(replica):
    fuzz(replica(), _seed(), float(os.environ.get("CHATNET_FUZZ_LONG_SECONDS", "600")))
