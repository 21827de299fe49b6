"""Where a collection of images is listed: a folder, a text file of paths, or a Parquet or CSV table.

`image_paths(src)` yields the paths one at a time, so a list of millions of files is never read
whole by this module. Relative paths in a list are taken relative to the list's own folder, so the
list means the same files from wherever it is run.
"""
from __future__ import annotations

import csv
import os
from typing import Iterator

from . import tasks
from .tasks import UsageError

PATH_COLUMN = "path"
TABLE_BATCH_ROWS = 65536      # rows of a Parquet list read at a time


def image_paths(src) -> Iterator[str]:
    """The image paths `src` names.

    Parameters
    ----------
    src : a folder (searched recursively for image files, as `tasks.find_images`); an image file;
        a .parquet file with a `path` column of strings or bytes (`os.fsencode`, for names that are
        not UTF-8); a UTF-8 .csv file with a `path` column; or any other file, read as UTF-8 text
        with one path per line (blank lines and lines starting with "#" left out).

    Raises
    ------
    UsageError
        `src` does not exist, is not UTF-8 text (a list or CSV), or a table has no `path` column of
        strings or bytes.
    """
    src = os.fspath(src)
    if os.path.isdir(src):
        yield from tasks.find_images([src])
        return
    if not os.path.isfile(src):
        raise UsageError(f"{src}: no such folder or file")
    if tasks.is_image_file(src):
        yield src
        return
    base = os.path.dirname(os.path.abspath(src))
    lower = src.lower()
    rows = _parquet(src) if lower.endswith(".parquet") else _csv(src) if lower.endswith(".csv") else _lines(src)
    for p in rows:
        yield os.path.join(base, p)      # an absolute p stays as it is


def _lines(src: str) -> Iterator[str]:
    try:
        with open(src, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip() and not line.startswith("#"):
                    yield line
    except UnicodeDecodeError as e:
        raise UsageError(f"{src}: not a UTF-8 list of paths ({e.reason} at byte {e.start}); give a folder, "
                         "a text file with one path per line, or a .parquet/.csv with a path column") from None


def _csv(src: str) -> Iterator[str]:
    try:
        with open(src, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if PATH_COLUMN not in (reader.fieldnames or []):
                raise UsageError(f"{src}: no {PATH_COLUMN!r} column in the CSV header "
                                 f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
            for row in reader:
                if row[PATH_COLUMN]:
                    yield row[PATH_COLUMN]
    except UnicodeDecodeError as e:
        raise UsageError(f"{src}: not a UTF-8 CSV ({e.reason} at byte {e.start}); save it as UTF-8, or list "
                         "the paths in a .parquet with a binary path column") from None
    except csv.Error as e:
        raise UsageError(f"{src}: not a readable CSV ({e}); give a .csv with a header line and a path "
                         "column") from None


def _parquet(src: str) -> Iterator[str]:
    """The `path` column of a Parquet table: strings, or bytes (file names as the file system holds
    them, `os.fsencode`), which are decoded as `os.fsdecode` does so that any name stays exact."""
    from .shards import _pyarrow
    pa = _pyarrow()
    try:
        table = pa.parquet.ParquetFile(src)
    except Exception as e:
        raise UsageError(f"{src}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if PATH_COLUMN not in table.schema_arrow.names:
        raise UsageError(f"{src}: no {PATH_COLUMN!r} column (columns: {', '.join(table.schema_arrow.names)})")
    kind = table.schema_arrow.field(PATH_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise UsageError(f"{src}: the {PATH_COLUMN!r} column holds {kind}, not file paths; it must be a string "
                         "(or binary) column")
    try:
        for batch in table.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[PATH_COLUMN]):
            for p in batch.column(0).to_pylist():
                if p:
                    yield os.fsdecode(p)
    except OSError as e:
        raise UsageError(f"{src}: cannot read the Parquet file ({e})") from None
