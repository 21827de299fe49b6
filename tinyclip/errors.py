"""The exceptions tinyclip raises for bad input.

Every message names what was wrong (the file, key, shape, device or input)
and says what to do about it. They all derive from TinyClipError, so a caller
can catch one type; each also derives from the builtin it refines (ValueError,
FileNotFoundError, RuntimeError) so existing handlers keep working.
"""


class TinyClipError(Exception):
    """Base class of every error tinyclip raises on purpose."""


class ConfigError(TinyClipError, ValueError):
    """config.json or preprocessor_config.json is missing, malformed or unsupported."""


class CheckpointError(TinyClipError, ValueError):
    """The weights cannot be read: corrupt or truncated safetensors, missing,
    unexpected or mis-shaped keys, or an unsupported format (pytorch_model.bin)."""


class CheckpointNotFoundError(TinyClipError, FileNotFoundError):
    """Neither a local folder nor a (cached) hub repository by that name."""


class TokenizerError(TinyClipError, ValueError):
    """vocab.json / merges.txt are unusable, or a text cannot be tokenized."""


class ImageError(TinyClipError, ValueError):
    """An image cannot be read or converted (unreadable file, unsupported mode or shape)."""


class BackendError(TinyClipError, RuntimeError):
    """The requested device or backend is unknown or unavailable.

    str() is one line: what is wrong and the backends that run here. `table`, where given, lists
    every registered backend with its tinygrad device and status (or why it is unavailable), one
    per line, for a program that wants to show it."""

    def __init__(self, message: str, table: str | None = None):
        super().__init__(message)
        self.table = table


class UsageError(TinyClipError, ValueError):
    """An argument is invalid: no labels, a template without "{}", top < 1, an embeddings file
    from another model, ..."""


class UnsafeFileError(TinyClipError, PermissionError):
    """A cache file or folder that another user owns or could write, or that is not a plain file: tinyclip
    neither reads nor writes it (tinyclip.trust)."""


class TruncationWarning(UserWarning):
    """A text is longer than the model's context length and is cut, as transformers cuts it."""


class MissingDependencyError(TinyClipError, ImportError):
    """An optional feature needs a package that is not installed (Ray for `--engine ray`)."""
