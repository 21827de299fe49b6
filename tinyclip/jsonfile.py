"""Reading the JSON files of a checkpoint (config.json, preprocessor_config.json, the tokenizer
files, the shard index) with one kind of error message."""
from __future__ import annotations

import json
import pathlib

from .errors import TinyClipError


def read_json(path: str | pathlib.Path, error: type[TinyClipError], *, what: str = "", advice: str = ""):
    """The parsed content of the JSON file `path`.

    Parameters
    ----------
    path : the file.
    error : the TinyClipError subclass to raise (ConfigError for configs, TokenizerError, ...).
    what : set to a name such as "a JSON object" to require a JSON object (dict) and say so.
    advice : what to do about a broken file, appended to the message ("restore it from the checkpoint").

    Raises
    ------
    error
        "PATH: not valid JSON (reason)", "PATH: cannot read the file (reason)" or
        "PATH: expected a JSON object, got list".
    """
    path = pathlib.Path(path)
    tail = f"; {advice}" if advice else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: JSONDecodeError, UnicodeDecodeError, and integers longer than
    # sys.get_int_max_str_digits(); RecursionError: "[[[[..." nested past the recursion limit
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e}){tail}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the file ({e.strerror or e}){tail}") from None
    if what and not isinstance(value, dict):
        raise error(f"{path}: expected {what}, got {type(value).__name__}{tail}")
    return value
