"""Text from clients (file names, captions, queries) made safe to print on a terminal.

A file name added through `POST /v1/images` can hold ESC sequences that clear the screen,
retitle the window or forge earlier output lines when `avg-jax search` prints it raw, and
Unicode direction overrides that show text in another order than it is stored. `safe`
writes every control character (C0, DEL, C1), lone surrogate, line or paragraph separator and
bidirectional formatting character as a visible escape (`\\x1b`, `\\u202e`); other text,
emoji sequences included, is unchanged.
"""

import unicodedata

# Direction marks, embeddings, overrides and isolates (Unicode bidi formatting characters).
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# Controls, lone surrogates (not printable at all) and the line / paragraph separators.
_ESCAPED = frozenset(("Cc", "Cs", "Zl", "Zp"))


def _escape(ch: str) -> str:
  code = ord(ch)
  return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
  """`text` with control and bidi formatting characters escaped (module doc)."""
  text = str(text)
  if text.isprintable() and not _BIDI.intersection(text):
    return text  # the common case, checked in C
  return "".join(
    _escape(ch) if unicodedata.category(ch) in _ESCAPED or ch in _BIDI else ch for ch in text
  )
