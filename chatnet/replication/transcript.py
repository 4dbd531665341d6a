"""Transcript tests: replication scenarios written as text, checked against recorded output.

In the manner of etcd raft's ``testdata/`` (the *datadriven* format), a transcript is a text
file of commands interpreted over the deterministic simulator (:mod:`.sim`, which runs the
production ``ReplicaHost`` on simulated disks, network and clients).  Under each command is
the output it produced when the file was last rewritten; the test runs the commands again and
fails, with a unified diff, when any output differs.  A scenario therefore reads as the story
it tells — who crashed, who took over and when, which chat was acknowledged at which index —
and a change of behaviour shows up as a reviewable diff of that story.

File format
-----------
::

    # a comment (kept as it is; so are blank lines between blocks)
    crash 1
    ----
    [t=160] crash 1 (lost 0 un-synced batches)

* a *command* is one line; the line ``----`` follows it, then its output: one or more
  non-blank lines (every command prints at least one line), ended by a blank line or the end
  of the file;
* a command without ``----`` has no recorded output yet: the check fails, ``--rewrite`` fills
  it in (a blank line right after such a command is taken as its end);
* lines starting with ``#`` and blank lines outside a block are comments.

Output
------
A command prints the simulator's events that happened while it ran (trace lines
``[t=T] ...``; ``T`` is simulated time in units, ``TICK`` = 10 units per replica tick), except
chat acknowledgements (``propose`` and ``write`` summarise their own), then its own result.
Everything is a function of the file alone: one seeded ``random.Random`` drives the
simulator, nothing reads the wall clock, and nothing iterates over a set of strings, so
``PYTHONHASHSEED`` does not matter.  An invariant violation of the simulator (agreement,
I1-I3, liveness) is never recorded as output: it fails the transcript, with its file and line.

Commands (replicas are numbered 1..N)
-------------------------------------
``start N [partitions] [majority] [seed=K] [retain=K]``
                                  a fresh cluster of N (no random message loss or duplication;
                                  ``retain``: log entries kept before compaction, default 40;
                                  ``partitions``: as ``--partitions``, links may be cut for long:
                                  in all mode a split brain is allowed and checked for
                                  convergence and no acknowledged chat lost at heal;
                                  ``majority``: ``--quorum majority``, every check is strict)
``propose [via=I] [ticks=K] A→B text``
                                  named client A (``A->B`` also works) logs in on the serving
                                  primary (or on replica I), creating A, and B, as needed, and
                                  sends ``text`` to B; prints whether it was acknowledged and at
                                  which log index (waits at most K ticks, default 40)
``write N [ticks=K]``             N chats from the simulator's anonymous clients; how many were
                                  acknowledged
``crash I`` / ``restart I``       kill replica I (its disk loses un-synced writes) / start it again
``pause I ticks=K``               freeze I for K ticks (longer than half the failure timeout: it
                                  calls ``stalled()`` on waking)
``partition 1 | 2 3``             cut every link between the sides until ``heal``
``heal``                          restore every link
``tick K``                        run K ticks
``wait-serving [ticks=K]``        run until some replica serves (at most K ticks, default 100)
``status``                        one line per replica: role, view, members, commit and applied
                                  index, serving
``add [ticks=K]``                  ``members add``: the serving primary adds a replica (numbered
                                  after every one so far), which starts when the add is committed
                                  (as ``--join`` does); runs until it is in the view (at most K)
``remove I [ticks=K]``            ``members remove``: replica I leaves (the primary hands over
                                  first); runs until committed, when I is shut down for good
``check``                         the simulator's heal-and-converge check: restart every replica,
                                  heal the network, require one primary serving all with equal
                                  state and every acknowledged chat (with ``partitions``: lists
                                  the chats acknowledged by ``propose`` that the split brain lost);
                                  prints its result only, not the events of the healing

Rewrite the recorded outputs (after a deliberate change of behaviour; review the diff)::

    python -m chatnet.replication.transcript --rewrite tests/transcripts/*.txt
    CHATNET_REWRITE=1 python3 -m pytest tests/test_transcripts.py

Without ``--rewrite`` the command checks the files and prints a diff for each that differs.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from dataclasses import dataclass, field

from ..server.state import decode_command
from .sim import TICK, ChatOutcome, Simulation

SEPARATOR = "----"
ARROWS = ("→", "->")


class TranscriptError(Exception):
    """A transcript that cannot be run: bad syntax, unknown command, or a violated invariant."""


@dataclass
class Block:
    """One command and its recorded output, or (``command is None``) one comment line."""

    line: int  # 1-based line number of the command (or comment) in the file
    text: str  # the command line, or the comment line as it is
    command: bool
    expected: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- the file format
def parse(text: str) -> list[Block]:
    """Split a transcript into comment lines and command blocks (module docstring)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    blocks: list[Block] = []
    k = 0
    while k < len(lines):
        line = lines[k]
        if not line.strip() or line.startswith("#"):
            blocks.append(Block(k + 1, line, command=False))
            k += 1
            continue
        block = Block(k + 1, line, command=True)
        k += 1
        if k < len(lines) and lines[k] == SEPARATOR:
            k += 1
            while k < len(lines) and lines[k].strip():
                block.expected.append(lines[k])
                k += 1
        if k < len(lines) and not lines[k].strip():
            k += 1  # the blank line that ends the block (render writes it back)
        blocks.append(block)
    return blocks


def render(blocks: list[Block], outputs: list[list[str]]) -> str:
    """The file text for ``blocks`` with ``outputs`` (one per command block, in order)."""
    out: list[str] = []
    results = iter(outputs)
    for n, block in enumerate(blocks):
        if not block.command:
            out.append(block.text)
            continue
        out += [block.text, SEPARATOR, *next(results)]
        if n < len(blocks) - 1:
            out.append("")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- the interpreter
def _split_args(words: list[str], allowed: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """Positional words and ``key=int`` options (only ``allowed`` keys)."""
    positional, options = [], {}
    for w in words:
        key, eq, value = w.partition("=")
        if not eq:
            positional.append(w)
        elif key not in allowed:
            raise TranscriptError(f"unknown option {key!r} (allowed: {', '.join(allowed) or 'none'})")
        elif not value.isdigit():
            raise TranscriptError(f"option {key}= takes a number, not {value!r}")
        else:
            options[key] = int(value)
    return positional, options


class Interpreter:
    """Runs transcript commands over one :class:`~.sim.Simulation` and formats their output."""

    def __init__(self) -> None:
        self.sim: Simulation | None = None
        self.acks: list[tuple[str, ChatOutcome]] = []  # what `propose` saw acknowledged
        self.commands = {
            "start": self.start, "propose": self.propose, "write": self.write,
            "crash": self.crash, "restart": self.restart, "pause": self.pause,
            "partition": self.partition, "heal": self.heal, "tick": self.tick,
            "wait-serving": self.wait_serving, "status": self.status, "check": self.check,
            "add": self.add, "remove": self.remove,
        }

    def run(self, line: str) -> list[str]:
        """One command line; its output lines (the events it caused, then its result)."""
        name, *words = line.split()
        handler = self.commands.get(name)
        if handler is None:
            raise TranscriptError(f"unknown command {name!r} (known: {', '.join(self.commands)})")
        if name != "start" and self.sim is None:
            raise TranscriptError("the first command must be 'start N'")
        mark = len(self.sim.trace) if self.sim is not None else 0
        result = handler(words)
        if name == "check":  # the healing's own events are not the scenario's story
            return result
        events = [e for e in self.sim.trace[mark:] if not e.split("] ", 1)[1].startswith("ack ")]
        return events + result

    # -- helpers ---------------------------------------------------------------------------
    def _replica(self, word: str) -> int:
        if not word.isdigit() or int(word) not in self.sim.nodes:
            raise TranscriptError(f"no replica {word!r} (replicas are 1..{self.sim.n})")
        return int(word)

    def _one_replica(self, words: list[str], allowed: tuple[str, ...] = ()) -> tuple[int, dict]:
        positional, options = _split_args(words, allowed)
        if len(positional) != 1:
            raise TranscriptError("expected one replica number")
        return self._replica(positional[0]), options

    def _count(self, words: list[str], allowed: tuple[str, ...] = ()) -> tuple[int, dict]:
        positional, options = _split_args(words, allowed)
        if len(positional) != 1 or not positional[0].isdigit():
            raise TranscriptError("expected one number")
        return int(positional[0]), options

    def _time(self) -> str:
        return f"t={self.sim.now}"

    # -- commands --------------------------------------------------------------------------
    def start(self, words: list[str]) -> list[str]:
        if self.sim is not None:
            raise TranscriptError("'start' may appear once per transcript")
        positional, options = _split_args(words, ("seed", "retain"))
        split, majority = "partitions" in positional[1:], "majority" in positional[1:]
        if not positional or not positional[0].isdigit() or len(positional) != 1 + split + majority:
            raise TranscriptError("usage: start N [partitions] [majority] [seed=K] [retain=K]")
        n, seed, retain = int(positional[0]), options.get("seed", 1), options.get("retain", 40)
        self.sim = Simulation(seed, n, steps=0, retain=retain, partitions=split,
                              quorum="majority" if majority else "all")
        self.sim.p_drop = self.sim.p_dup = 0.0  # scripted faults only
        mode = ("; majority quorum" if majority else "") + (
            "; partitions, split brain allowed" if split and not majority else
            "; partitions" if split else "")
        serving = self.sim.serving()
        who = f"{_ids(serving)} serves" if serving else "nobody serves yet"
        return [f"{n} replicas up (seed={seed} retain={retain}{mode}); {who}"]

    def propose(self, words: list[str]) -> list[str]:
        options: dict[str, int] = {}
        while words and "=" in words[0] and not any(a in words[0] for a in ARROWS):
            options.update(_split_args(words[:1], ("ticks", "via"))[1])
            words = words[1:]
        if len(words) < 2:
            raise TranscriptError("usage: propose alice→bob some text")
        arrow = next((a for a in ARROWS if a in words[0]), None)
        sender, _, recipient = words[0].partition(arrow or "→")
        if not arrow or not sender or not recipient:
            raise TranscriptError(f"expected SENDER→RECIPIENT, not {words[0]!r}")
        via = self._replica(str(options["via"])) if "via" in options else None
        text = " ".join(words[1:])
        outcome = self.sim.chat(sender, recipient, text, ticks=options.get("ticks", 40), via=via)
        if not outcome.acked:
            return [f"not acknowledged: {outcome.answer}"]
        self.acks.append((f"{sender}→{recipient} {text!r}", outcome))
        return [f"acknowledged by {outcome.node} at index {outcome.index}"]

    def write(self, words: list[str]) -> list[str]:
        count, options = self._count(words, ("ticks",))
        before = set(self.sim.acked)
        got = self.sim.write(count, ticks=options.get("ticks", 40))
        new = sorted(set(self.sim.acked) - before)
        where = f" (indexes {new[0]}..{new[-1]})" if new else ""
        return [f"{got} of {count} acknowledged{where}"]

    def crash(self, words: list[str]) -> list[str]:
        self.sim.crash(self._one_replica(words)[0])
        return []

    def restart(self, words: list[str]) -> list[str]:
        i, _ = self._one_replica(words)
        if self.sim.nodes[i].up:
            raise TranscriptError(f"replica {i} is up; crash it first")
        self.sim.restart(i)
        return []

    def pause(self, words: list[str]) -> list[str]:
        i, options = self._one_replica(words, ("ticks",))
        if "ticks" not in options:
            raise TranscriptError("usage: pause I ticks=K")
        self.sim.pause(i, options["ticks"])
        return []

    def partition(self, words: list[str]) -> list[str]:
        sides = [tuple(self._replica(w) for w in side.split()) for side in " ".join(words).split("|")]
        if len(sides) < 2 or not all(sides):
            raise TranscriptError("usage: partition 1 | 2 3")
        self.sim.partition(*sides)
        return []

    def add(self, words: list[str]) -> list[str]:
        _, options = _split_args(words, ("ticks",))
        return [self.sim.add_member(options.get("ticks", 100))]

    def remove(self, words: list[str]) -> list[str]:
        i, options = self._one_replica(words, ("ticks",))
        return [self.sim.remove_member(i, options.get("ticks", 100))]

    def heal(self, words: list[str]) -> list[str]:
        _split_args(words, ())
        self.sim.heal_network()
        return []

    def tick(self, words: list[str]) -> list[str]:
        count, _ = self._count(words)
        mark = len(self.sim.trace)
        self.sim.run_ticks(count)
        return [] if len(self.sim.trace) > mark else [f"no events until {self._time()}"]

    def wait_serving(self, words: list[str]) -> list[str]:
        _, options = _split_args(words, ("ticks",))
        limit, t0 = options.get("ticks", 100), self.sim.now
        who = self.sim.wait_serving(limit)
        if who is None:
            return [f"nobody serves after {limit} ticks ({self._time()})"]
        r = self.sim.nodes[who].replica
        waited = (self.sim.now - t0) / TICK
        return [f"{who} serves view {r.view}, members {_ids(r.members)} "
                f"({self._time()}, after {waited:.1f} ticks)"]

    def status(self, words: list[str]) -> list[str]:
        _split_args(words, ())
        return [self._status_line(i) for i in self.sim.cluster]

    def _status_line(self, i: int) -> str:
        nd = self.sim.nodes[i]
        if not nd.up:
            return f"{i} down"
        r = nd.replica
        line = (f"{i} {r.role:<10} view={r.view} members={_ids(r.members)} "
                f"commit={r.commit_index} applied={nd.host.applied_index} "
                f"serving={'yes' if r.serving else 'no'}")
        if r.divergences:  # snapshots installed over a divergent committed suffix (split brain)
            line += f" divergences={r.divergences}"
        return line + (" (paused: its state is frozen)" if nd.paused_until >= 0 else "")

    def check(self, words: list[str]) -> list[str]:
        _split_args(words, ())
        down = [i for i in self.sim.cluster if not self.sim.nodes[i].up]
        self.sim.heal_and_check()
        who = self.sim.serving()[0]
        p = self.sim.nodes[who].replica
        out = ["healed the network" + (f", restarted {_ids(down)}" if down else ""),
               f"converged at t={self.sim.now}: {who} serves view {p.view}, members "
               f"{_ids(p.members)}, every replica applied {p.commit_index}"]
        if self.sim.strict:  # the simulator checked every acknowledged chat on every replica
            return out + [f"every acknowledged chat is on every replica ({len(self.sim.acked)})"]
        # all mode: the simulator checked that every acknowledged chat is in the merged history
        # (perhaps re-applied at another index); say where the scripted ones ended up
        out.append(f"chats acknowledged by propose: {len(self.acks)}, lost: 0")
        hist = self.sim.nodes[who].hist
        for label, o in self.acks:
            moved = [i for i, d in sorted(hist.items()) if d != o.entry and _same_chat(d, o.entry)]
            if hist.get(o.index) != o.entry and moved:
                out.append(f"re-applied: {label} (acknowledged by {o.node} at index {o.index}, "
                           f"now at index {moved[0]})")
        counts = {i: self.sim.nodes[i].host.status()["reapply"] for i in self.sim.cluster}
        return out + [f"re-application on {who}: {counts[who]}"]


def _same_chat(data: bytes, original: bytes) -> bool:
    """Is log entry ``data`` the chat ``original``, re-applied after a split brain healed?"""
    cmd = decode_command(data)
    return cmd[0] == "reapply" and cmd[3] == decode_command(original)


def _ids(members) -> str:
    return ",".join(map(str, members)) or "-"


# ---------------------------------------------------------------------------- files
def run_text(text: str, name: str = "<transcript>") -> str:
    """Run every command of a transcript; the file text with the outputs they produce now."""
    blocks = parse(text)
    interp, outputs = Interpreter(), []
    for block in blocks:
        if not block.command:
            continue
        try:
            outputs.append(interp.run(block.text))
        except Exception as exc:  # noqa: BLE001 - name the line, whatever went wrong
            raise TranscriptError(f"{name}:{block.line}: {block.text!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return render(blocks, outputs)


def diff(expected: str, actual: str, name: str) -> str:
    """A unified diff from the recorded file to what the commands print now ('' if equal)."""
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True),
                                        actual.splitlines(keepends=True),
                                        f"{name} (recorded)", f"{name} (now)"))


def check_file(path: str, rewrite: bool = False) -> str:
    """Run the transcript at ``path``; the diff to its recorded text ('' when it matches).
    With ``rewrite`` the file is replaced by the new text (and the diff still returned)."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    actual = run_text(text, path)
    if rewrite and actual != text:
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(actual)
    return diff(text, actual, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run (or with --rewrite, regenerate) transcripts.")
    ap.add_argument("--rewrite", action="store_true", help="write the new outputs into the files")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the hosts' own warnings are not transcript output
    failed = 0
    for path in a.files:
        try:
            d = check_file(path, rewrite=a.rewrite)
        except TranscriptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if a.rewrite:
            print(f"{path}: {'rewritten' if d else 'unchanged'}")
        elif d:
            failed += 1
            sys.stdout.write(d)
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
