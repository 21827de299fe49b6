"""Finding a checkpoint: a local folder, or a Hugging Face hub repository.

A hub id goes through huggingface_hub.snapshot_download, restricted to the
files tinyclip reads (never pickles or other frameworks' weights), so the
standard cache, `revision`, `cache_dir`, HF_HUB_OFFLINE and
`local_files_only` all behave as in every other Hugging Face tool.
"""
from __future__ import annotations

import os
import pathlib
import warnings

from .errors import CheckpointNotFoundError

DEFAULT_MODEL = "openai/clip-vit-base-patch32"

# What tinyclip reads from a repository: config, safetensors weights (single or
# sharded), tokenizer and preprocessor files. Never *.bin, *.h5, *.msgpack.
ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    # open_clip's format (tinyclip/checkpoints/open_clip/); never its open_clip_pytorch_model.bin
    "open_clip_config.json",
    "open_clip_model.safetensors",
]


def locate(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False) -> pathlib.Path:
    """The local folder holding the checkpoint `name_or_path`.

    An existing directory is used as it is (`revision` and `cache_dir`, which select a hub
    snapshot, are then ignored, with a warning). Anything else must look like a hub id
    ("org/name" or "name") and is fetched into (or found in) the Hugging Face cache.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        ignored = [f"{what} {value!r}" for what, value in (("revision", revision), ("cache_dir", cache_dir))
                   if value is not None]
        if ignored:
            warnings.warn(f"{name_or_path} is a local folder: {' and '.join(ignored)} ignored (they select a "
                          "hub model's snapshot)")     # warned from here: once per process, whoever calls
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointNotFoundError(f"{name}: is a file; pass the checkpoint folder that holds config.json "
                                      "and model.safetensors")
    if not _looks_like_repo_id(name):
        raise CheckpointNotFoundError(f"{name}: no such folder, and not a Hugging Face repo id (like "
                                      f"{DEFAULT_MODEL!r})")
    if revision is not None and not _looks_like_revision(revision):
        raise CheckpointNotFoundError(f"{name}: revision {revision!r} is not a branch, tag or commit name (those "
                                      "hold no '..', no leading '/' and no control characters)")
    return _download(name, revision, cache_dir, local_files_only)


def _looks_like_revision(revision) -> bool:
    """Whether `revision` could name a git branch, tag or commit; never a path out of the cache (the
    hub's cache keeps snapshots in folders named by the revision's commit, and refs by its name)."""
    return (isinstance(revision, str) and revision.strip() != "" and ".." not in revision
            and not revision.startswith("/") and "\\" not in revision
            and all(c.isprintable() and not c.isspace() for c in revision))


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and p not in (".", "..") and not p.startswith(("-", ".")) and
                                        all(c.isalnum() or c in "-_." for c in p) for p in parts)


def _download(repo_id: str, revision, cache_dir, local_files_only) -> pathlib.Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import errors as hub_errors
    except ImportError as e:    # a declared dependency; say so rather than fail obscurely
        raise CheckpointNotFoundError(f"{repo_id}: loading from the hub needs huggingface_hub "
                                      "(pip install huggingface_hub)") from e
    offline = local_files_only or hub_constants.HF_HUB_OFFLINE
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=ALLOW_PATTERNS)
    except hub_errors.LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else \
              "the hub could not be reached"
        raise CheckpointNotFoundError(
            f"{repo_id}{'@' + revision if revision else ''}: not in the Hugging Face cache "
            f"({cache_dir or hub_constants.HF_HUB_CACHE}) and {why}. Download it once while online, "
            "point cache_dir (the command line's --cache-dir) at a cache that has it, or pass a local folder.") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise CheckpointNotFoundError(f"{repo_id}: repository not found or not accessible on the hub ({e.__class__.__name__}); "
                                      "check the name, or log in with `hf auth login` for a gated repo") from None
    except hub_errors.RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{repo_id}: revision {revision!r} does not exist") from None
    return pathlib.Path(folder)
