"""Which checkpoint made an embedding: an identity that survives copying the checkpoint folder.

Embedding files (`tinyclip embed`), Ray output manifests and the label-embedding cache record
`model_identity(...)`, and compare identities, not folder paths: a copy of the same checkpoint, or
the same hub model in another cache, is the same model; another checkpoint of the same
architecture (a fine-tune) is not.

The fingerprint hashes config.json (parsed, so formatting does not count), every safetensors header
(names, dtypes, shapes, offsets) and, since headers say nothing of the values, FINGERPRINT_BLOCKS
blocks of FINGERPRINT_BLOCK_BYTES taken at evenly spaced places in each file's data: different
weights differ there, and reading a few MB costs milliseconds, where hashing 600 MB would cost a
second.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

from .errors import CheckpointError

FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 1 << 16


def fingerprint(folder: pathlib.Path, weight_files: list[pathlib.Path], config_name: str = "config.json") -> str:
    """sha256 (hex, 32 characters) of the checkpoint's config, headers and sampled weight bytes."""
    h = hashlib.sha256()
    config = folder / config_name
    try:
        h.update(json.dumps(json.loads(config.read_text(encoding="utf-8")), sort_keys=True).encode())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: cannot read it to identify the checkpoint ({e})") from None
    for path in weight_files:
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                header_len = int.from_bytes(f.read(8), "little")
                h.update(f.read(header_len))
                data_start, data_len = 8 + header_len, max(0, size - 8 - header_len)
                for i in range(FINGERPRINT_BLOCKS):
                    f.seek(data_start + data_len * i // FINGERPRINT_BLOCKS)
                    h.update(f.read(FINGERPRINT_BLOCK_BYTES))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it to identify the checkpoint ({e.strerror or e})") from None
    return h.hexdigest()[:32]


def of_checkpoint(folder: pathlib.Path, hub_id: str | None = None, revision: str | None = None) -> dict:
    """The identity of the checkpoint in `folder` (what `CLIP.identity` gives), without loading it:
    the hub id and revision where it came from the hub (the snapshot's commit when no revision was
    asked for), the folder, and the fingerprint of its config and weights."""
    from . import openclip
    from .weights import checkpoint_files
    if hub_id and revision is None and folder.parent.name == "snapshots":
        revision = folder.name
    if openclip.is_openclip_folder(folder):
        files, config_name = [openclip.weights_file(folder)], openclip.CONFIG_FILE
    else:
        files, config_name = checkpoint_files(folder), "config.json"
    return {"hub_id": hub_id, "revision": revision, "folder": str(folder.resolve()),
            "fingerprint": fingerprint(folder, files, config_name)}


def same_model(a: dict, b: dict) -> bool:
    """Whether two identities (as model_identity makes them) name the same weights: same fingerprint."""
    return isinstance(a, dict) and isinstance(b, dict) and a.get("fingerprint") == b.get("fingerprint") is not None


def describe(identity: dict) -> str:
    """A short human name for an identity: the hub id (and revision) where known, else the folder."""
    name = identity.get("hub_id") or identity.get("folder") or "?"
    if identity.get("revision"):
        name += f"@{identity['revision']}"
    return f"{name} (fingerprint {str(identity.get('fingerprint', '?'))[:12]})"
