"""Text clean-up for MedQuAD questions and answers, and the keys the split groups on.

Answers come from scraped pages: indentation runs, tabs and no-break spaces inside lines, blank lines between
paragraphs. Questions come from templates with a stray space before "?" and sometimes a doubled "? ?".
"""

from __future__ import annotations

import re
import unicodedata

# Any whitespace except the newline: spaces, tabs, no-break spaces (U+00A0), \r, \f, \v, Unicode spaces.
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_QMARK = re.compile(r"\s+\?")
_REPEATED_QMARK = re.compile(r"\?{2,}")
_NON_WORD = re.compile(r"[\W_]+")


def normalize_answer(text: str) -> str:
    """Collapse whitespace inside each line; keep paragraph breaks as single newlines (ROUGE-Lsum splits on them)."""
    lines = (_INLINE_SPACE.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def normalize_question(text: str) -> str:
    """One line, single spaces, and "X ?" / "X? ?" turned into "X?"."""
    text = _SPACE.sub(" ", text).strip()
    text = _SPACE_BEFORE_QMARK.sub("?", text)
    return _REPEATED_QMARK.sub("?", text)


def normalize_key(text: str) -> str:
    """Grouping key: texts that differ only in case, punctuation, spacing or Unicode form count as the same text.

    Deliberately coarser than the normalized text, so near-identical questions or answers cannot end up in two
    splits and leak.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    return _NON_WORD.sub(" ", text).strip()
