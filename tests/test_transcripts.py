"""Transcript tests: every tests/transcripts/*.txt is run over the simulator and its recorded
output compared (chatnet/replication/transcript.py).  A mismatch fails with a unified diff
of the story.  ``CHATNET_REWRITE=1 python3 -m pytest tests/test_transcripts.py`` regenerates
the files instead (review the diff before committing).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatnet.replication.transcript import TranscriptError, check_file, parse, render, run_text

HERE = Path(__file__).parent
FILES = sorted((HERE / "transcripts").glob("*.txt"))
REWRITE = os.environ.get("CHATNET_REWRITE") == "1"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_transcript(path):
    """The commands print what the file recorded (or, when rewriting, the file is updated)."""
    d = check_file(str(path), rewrite=REWRITE)
    if d and not REWRITE:
        pytest.fail(f"{path.name} differs from its recorded output "
                    f"(CHATNET_REWRITE=1 regenerates it):\n{d}", pytrace=False)


def test_there_are_transcripts():
    assert len(FILES) >= 8


def test_rewriting_an_up_to_date_file_is_byte_identical_whatever_the_hash_seed(tmp_path):
    """``--rewrite`` of a file that is up to date leaves it byte for byte as it was, also in
    a fresh interpreter with another string-hash seed (nothing depends on hash order)."""
    src = HERE / "transcripts" / "second_kill.txt"
    copy = tmp_path / src.name
    copy.write_bytes(src.read_bytes())
    for hash_seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-m", "chatnet.replication.transcript", "--rewrite",
                              str(copy)], env=env, capture_output=True, text=True, timeout=120,
                             cwd=HERE.parent)
        assert out.returncode == 0, out.stderr
        assert "unchanged" in out.stdout
        assert copy.read_bytes() == src.read_bytes()


def test_a_wrong_expected_line_fails_with_a_readable_diff(tmp_path):
    src = (HERE / "transcripts" / "first_kill.txt").read_text(encoding="utf-8")
    right = next(line for line in src.splitlines() if line.startswith("acknowledged by 1 at index"))
    wrong = right + "0"
    broken = tmp_path / "broken.txt"
    broken.write_text(src.replace(right, wrong, 1), encoding="utf-8")
    d = check_file(str(broken))
    assert f"-{wrong}\n" in d and f"+{right}\n" in d
    assert "broken.txt (recorded)" in d and "broken.txt (now)" in d
    assert broken.read_text(encoding="utf-8") != src  # checking never writes
    assert check_file(str(broken), rewrite=True) == d
    assert broken.read_text(encoding="utf-8") == src  # rewriting restores the recorded story


def test_format_round_trip_and_missing_output():
    """Comments and blank lines are kept; a command without ``----`` gets its output."""
    text = "# a comment\n\nstart 1\n----\nold output\n\n# another\nstatus\n"
    blocks = parse(text)
    assert [b.command for b in blocks] == [False, False, True, False, True]
    assert blocks[2].expected == ["old output"] and blocks[4].expected == []
    assert render(blocks, [["x"], ["y"]]) == "# a comment\n\nstart 1\n----\nx\n\n# another\nstatus\n----\ny\n"
    out = run_text("start 1\n\nstatus\n")
    assert out == ("start 1\n----\n[t=0] node 1 serves view 0 members (1,)\n"
                   "1 replicas up (seed=1 retain=40); 1 serves\n\n"
                   "status\n----\n1 primary    view=0 members=1 commit=0 applied=0 serving=yes\n")


@pytest.mark.parametrize("text, message", [
    ("start 3\nfly 1\n", "t.txt:2: 'fly 1': TranscriptError: unknown command 'fly'"),
    ("crash 1\n", "the first command must be 'start N'"),
    ("start 3\ncrash 4\n", "no replica '4'"),
    ("start 3\npause 1\n", "usage: pause I ticks=K"),
    ("start 3\npropose alice hi\n", "expected SENDER→RECIPIENT"),
    ("start 3\ntick 5 speed=2\n", "unknown option 'speed'"),
])
def test_bad_commands_name_their_line(text, message):
    with pytest.raises(TranscriptError) as err:
        run_text(text, "t.txt")
    assert message in str(err.value)
