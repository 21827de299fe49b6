"""Text files of one item per line (texts to embed, templates, labels), read lazily."""
from __future__ import annotations

from ..errors import UsageError


def read_lines(path):
    """The lines of a UTF-8 text file, without their line endings, read lazily. A byte-order mark at
    its start (Windows editors save one) is not part of the first line.

    Raises
    ------
    UsageError
        naming the file, when it is not UTF-8 or cannot be read.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                yield line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the file ({e.strerror or e})") from None
