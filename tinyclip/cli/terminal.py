"""Everything the command line prints goes through `say` (text) or `json_text` (JSON): file names,
labels and texts come from files others may have written, and must not drive the terminal.

Control characters (escape sequences, carriage returns, bells, C1 controls), the bidirectional
overrides that reorder what is shown, and lone surrogates (the bytes of a file name that is not
UTF-8, as Python decodes it) are shown escaped, `\\x1b`, `\\u202e`, `\\xe9`: nothing printed can
move the cursor, recolour the terminal, hide text, or fail on a strict UTF-8 stdout.
"""
from __future__ import annotations

import re
import sys

# C0 and C1 controls and DEL, bidirectional embeddings, overrides and isolates, and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")   # json escapes C0
_UNSAFE_IN_LINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    c = ord(match.group())
    if 0xDC80 <= c <= 0xDCFF:           # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def shown(text) -> str:
    """`text` (a file name, a label) safe to print inside a line: every control character (line
    ends and tabs too), bidirectional control and lone surrogate escaped."""
    return _UNSAFE.sub(_escape, str(text))


def say(text="", *, file=None, flush: bool = False) -> None:
    """Print `text` as print() would, with shown()'s escapes except for line ends (a table or a
    listing keeps its lines), in what the stream can encode."""
    stream = file if file is not None else sys.stdout
    text = _UNSAFE_IN_LINES.sub(_escape, str(text))
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = text.encode(encoding if _known(encoding) else "ascii", "backslashreplace").decode(
            encoding if _known(encoding) else "ascii")
    print(text, file=stream, flush=flush)


def _known(encoding: str) -> bool:
    try:
        "".encode(encoding)
        return True
    except LookupError:
        return False


def json_text(value, indent: int | None = 2) -> str:
    """`value` as JSON for printing: non-ASCII text stays readable, while control characters,
    bidirectional controls and lone surrogates are JSON escapes (which parse back to the same string)."""
    import json
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, indent=indent, ensure_ascii=False))
