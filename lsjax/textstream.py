"""Text as tokens arrive: incremental detokenizing with stop strings, shared by every streaming path.

A stop string must never show, not even in part, so text that may still become one (the end of
the text matching a stop string's start) and a partial UTF-8 character are held back until the
next token decides them.
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Feed token ids one by one; `push` returns the newly visible text and whether a stop string ended it."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token_id: int, last: bool = False) -> tuple[str, bool]:
        """`(new text, stopped)`: `stopped` when a stop string appeared (its text and after are cut);
        `last` releases everything held back (the sequence ends here)."""
        self.ids.append(int(token_id))
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = first_stop_string(text, self.stop_strings)
        if cut is not None:
            text = text[:cut]
        elif not last:
            text = text[:len(text) - stop_string_start(text, self.stop_strings)].rstrip("\ufffd")
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += new
        return new, cut is not None


def first_stop_string(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


def stop_string_start(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (and so may become one)."""
    return max((n for s in stop_strings for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
               default=0)


def ids_covering(tokenizer, ids: list[int], text: str) -> list[int]:
    """The shortest prefix of `ids` whose decoded text reaches `text` (the part before a stop string)."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=True)) >= len(text):
            return ids[:n]
    return ids
