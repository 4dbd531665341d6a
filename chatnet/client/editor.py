"""Terminal text helpers with no curses in them: a line editor, display widths, wrapping.

Kept apart from the curses code so that every editing rule can be unit-tested with plain
strings.  Widths follow the terminal convention: East Asian wide/fullwidth characters take two
cells, combining marks none, everything else one.  Text from the network is passed through
:func:`sanitize` before it reaches a terminal, so a chat cannot carry escape sequences.
"""

from __future__ import annotations

import unicodedata

__all__ = ["char_width", "text_width", "sanitize", "wrap", "clip", "LineEditor"]


def char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(ch) for ch in text)


def sanitize(text: str) -> str:
    """Make ``text`` safe to put on a terminal: C0 controls and DEL in caret notation (``^[``),
    other non-printable code points (C1 controls, surrogates, unassigned) as U+FFFD."""
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or code == 0x7F:
            out.append("^" + chr(code ^ 0x40))
        elif not ch.isprintable() and ch != " " and unicodedata.category(ch) not in ("Mn", "Me", "Mc"):
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def clip(text: str, width: int) -> str:
    """The longest prefix of ``text`` at most ``width`` cells wide."""
    used = 0
    for i, ch in enumerate(text):
        w = char_width(ch)
        if used + w > width:
            return text[:i]
        used += w
    return text


def wrap(text: str, width: int) -> list[str]:
    """Split ``text`` into rows of at most ``width`` cells, preferring to break after a space
    in the second half of a row.  Always at least one row; never loses a character."""
    width = max(1, width)
    rows: list[str] = []
    while text_width(text) > width:
        head = clip(text, width)
        if not head:                       # a wide character in a 1-cell row
            head = text[0]
        space = head.rfind(" ")
        if space >= len(head) // 2 and space > 0:
            head = head[:space + 1]
        rows.append(head.rstrip(" ") or head)
        text = text[len(head):]
    rows.append(text)
    return rows


class LineEditor:
    """One line of input: a cursor, editing operations, and Up/Down history with a draft.

    Browsing history keeps what was being typed as a draft, restored by going past the newest
    entry, as in readline.  ``max_chars`` bounds the line (insertions beyond it are refused
    and :meth:`insert` returns False so the caller can beep)."""

    def __init__(self, max_chars: int = 1000, history_size: int = 500) -> None:
        self.chars: list[str] = []
        self.cursor = 0
        self.max_chars = max_chars
        self.history: list[str] = []
        self.history_size = history_size
        self._browse: int | None = None   # index into history while browsing
        self._draft = ""
        self._scroll = 0                  # first visible character (horizontal scrolling)

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def set_text(self, text: str) -> None:
        self.chars = list(text)
        self.cursor = len(self.chars)

    def insert(self, text: str) -> bool:
        room = self.max_chars - len(self.chars)
        accepted = text[:max(0, room)]
        self.chars[self.cursor:self.cursor] = list(accepted)
        self.cursor += len(accepted)
        return len(accepted) == len(text)

    def left(self) -> None:
        self.cursor = max(0, self.cursor - 1)

    def right(self) -> None:
        self.cursor = min(len(self.chars), self.cursor + 1)

    def home(self) -> None:
        self.cursor = 0

    def end(self) -> None:
        self.cursor = len(self.chars)

    def backspace(self) -> None:
        if self.cursor > 0:
            self.cursor -= 1
            del self.chars[self.cursor]

    def delete(self) -> None:
        if self.cursor < len(self.chars):
            del self.chars[self.cursor]

    def kill_to_start(self) -> None:
        del self.chars[:self.cursor]
        self.cursor = 0

    def kill_to_end(self) -> None:
        del self.chars[self.cursor:]

    def delete_word_back(self) -> None:
        start = self.cursor
        while start > 0 and self.chars[start - 1] == " ":
            start -= 1
        while start > 0 and self.chars[start - 1] not in " |":
            start -= 1
        if start == self.cursor and start > 0:     # only a separator before the cursor
            start -= 1
        del self.chars[start:self.cursor]
        self.cursor = start

    def history_prev(self) -> None:
        if not self.history:
            return
        if self._browse is None:
            self._draft = self.text
            self._browse = len(self.history)
        if self._browse > 0:
            self._browse -= 1
            self.set_text(self.history[self._browse])

    def history_next(self) -> None:
        if self._browse is None:
            return
        self._browse += 1
        if self._browse >= len(self.history):
            self._browse = None
            self.set_text(self._draft)
        else:
            self.set_text(self.history[self._browse])

    def submit(self) -> str:
        """Return the line, remember it in the history, and clear the editor."""
        text = self.text
        if text.strip() and (not self.history or self.history[-1] != text):
            self.history.append(text)
            del self.history[:-self.history_size]
        self.chars, self.cursor, self._browse, self._draft, self._scroll = [], 0, None, "", 0
        return text

    def view(self, width: int) -> tuple[str, int]:
        """The part of the line to show in ``width`` cells and the cursor's cell in it.

        Scrolls horizontally just enough to keep the cursor visible (one cell is kept free
        at the right for the cursor at the end of the line)."""
        width = max(2, width)
        shown = [sanitize(ch) for ch in self.chars]   # a pasted control shows as ^X
        if self.cursor < self._scroll:
            self._scroll = self.cursor
        while self._scroll < self.cursor and \
                sum(text_width(c) for c in shown[self._scroll:self.cursor]) > width - 1:
            self._scroll += 1
        # Scroll back left when the line got shorter and there is room for more.
        while self._scroll > 0 and \
                sum(text_width(c) for c in shown[self._scroll - 1:]) <= width - 1:
            self._scroll -= 1
        visible = clip("".join(shown[self._scroll:]), width)
        col = sum(text_width(c) for c in shown[self._scroll:self.cursor])
        return visible, col
