"""Which checkpoint made an embedding: an identity that survives copying the checkpoint folder.

Embedding files (`tinyclip embed`), Ray output manifests and the label-embedding cache record
`model_identity(...)`, and compare identities, not folder paths: a copy of the same checkpoint, or
the same hub model in another cache, is the same model; another checkpoint of the same
architecture (a fine-tune, even one that changes a single projection) is not, nor is the same
checkpoint with another tokenizer or image preprocessing.

The fingerprint hashes config.json (parsed, so formatting does not count), every byte of every
weight file, and the bytes of the files that turn inputs into ids and pixels (the tokenizer files
and preprocessor_config.json, whichever exist). Hashing every byte costs one read of a weight file
(SHA-256 over CHUNK_BYTES pieces in parallel threads); the digest is then kept in a cache file,
keyed by the file's path, size, modification and change times, inode and device, so a checkpoint
is read once, not at every run.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import warnings

from .errors import CheckpointError

CHUNK_BYTES = 8 << 20          # a weight file is hashed in pieces of this size, several at once
HASH_THREADS = 8               # at most; hashlib releases the GIL while it hashes a piece
DIGEST_CACHE = "file-digests.json"
DIGEST_CACHE_FORMAT = 1
DIGEST_CACHE_ENTRIES = 1000    # files remembered; the oldest are forgotten first
# The files that decide a checkpoint's token ids and pixel values, besides its config and weights.
PROCESSING_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json",
                    "preprocessor_config.json")


def fingerprint(folder: pathlib.Path, weight_files: list[pathlib.Path], config_name: str = "config.json") -> str:
    """sha256 (hex, 32 characters) of the checkpoint's config, every byte of its weight files and its
    tokenizer and preprocessing files."""
    h = hashlib.sha256()
    config = folder / config_name
    try:
        h.update(json.dumps(json.loads(config.read_text(encoding="utf-8")), sort_keys=True).encode())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: cannot read it to identify the checkpoint ({e})") from None
    processing = [folder / name for name in PROCESSING_FILES if (folder / name).is_file()]
    digests = files_digests([*weight_files, *processing])
    for path, digest in zip([*weight_files, *processing], digests):
        h.update(f"\n{path.name}\n{digest}".encode())
    return h.hexdigest()[:32]


def files_digests(files: list[pathlib.Path]) -> list[str]:
    """The SHA-256 (hex) of every byte of each file, taken from the digest cache where the file is
    unchanged since it was hashed, else computed and remembered there.

    Raises
    ------
    CheckpointError
        naming a file that cannot be read.
    """
    from . import cachedir
    cache = _DigestCache(cachedir.cache_root() / DIGEST_CACHE) if cachedir.enabled() else None
    out = []
    for path in files:
        try:
            st = os.stat(path)
            stamp = _stamp(st)
            digest = cache.get(path, stamp) if cache else None
            if digest is None:
                digest = file_digest(path, st.st_size)
                if cache:
                    cache.put(path, stamp, digest)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it to identify the checkpoint ({e.strerror or e})") from None
        out.append(digest)
    if cache:
        cache.save()
    return out


def file_digest(path: os.PathLike, size: int | None = None) -> str:
    """SHA-256 (hex) of a file's bytes, read and hashed CHUNK_BYTES at a time on several threads: the
    digest of the pieces' digests (and the size), so that no thread waits for another."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size if size is None else size

        def piece(offset: int) -> bytes:
            data = os.pread(fd, min(CHUNK_BYTES, size - offset), offset)
            if offset + CHUNK_BYTES <= size and len(data) != CHUNK_BYTES:
                raise OSError(f"short read at byte {offset} (the file changed while it was hashed)")
            return hashlib.sha256(data).digest()

        offsets = range(0, size, CHUNK_BYTES)
        workers = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(offsets)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pieces = list(pool.map(piece, offsets))
    finally:
        os.close(fd)
    return hashlib.sha256(size.to_bytes(8, "little") + b"".join(pieces)).hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class _DigestCache:
    """{absolute path: (stamp, digest)} in one JSON file in tinyclip's cache folder, read only when it
    can be trusted (tinyclip.trust) and written whole (tinyclip.atomic). Losing it costs a re-hash."""

    def __init__(self, path: pathlib.Path):
        from . import trust
        self.path, self.changed = path, False
        try:
            data = json.loads(trust.read_trusted(path))
            files = data["files"] if data.get("format") == DIGEST_CACHE_FORMAT else {}
            self.files = {k: v for k, v in files.items()
                          if isinstance(v, list) and len(v) == 2 and isinstance(v[1], str)}
        except FileNotFoundError:
            self.files = {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:   # not ours alone, damaged
            warnings.warn(f"{path}: file digests not used ({e}); hashing the checkpoint again", stacklevel=4)
            self.files = {}

    def get(self, path, stamp: list[int]) -> str | None:
        entry = self.files.get(os.path.abspath(path))
        return entry[1] if entry and entry[0] == stamp else None

    def put(self, path, stamp: list[int], digest: str) -> None:
        key = os.path.abspath(path)
        self.files.pop(key, None)          # re-inserted last: the newest
        self.files[key] = [stamp, digest]
        while len(self.files) > DIGEST_CACHE_ENTRIES:
            del self.files[next(iter(self.files))]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        from .atomic import write_atomic
        body = json.dumps({"format": DIGEST_CACHE_FORMAT, "files": self.files}).encode()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path, lambda f: f.write(body))
        except OSError as e:      # a cache that cannot be written costs a re-hash next time
            warnings.warn(f"{self.path}: file digests not saved ({e.strerror or e}); the checkpoint will be "
                          "hashed again next time", stacklevel=4)
        self.changed = False


def of_checkpoint(folder: pathlib.Path, hub_id: str | None = None, revision: str | None = None) -> dict:
    """The identity of the checkpoint in `folder` (what `CLIP.identity` gives), without loading it:
    the hub id and revision where it came from the hub (the snapshot's commit when no revision was
    asked for), the folder, and the fingerprint of its config, weights, tokenizer and preprocessing."""
    from . import checkpoints
    if hub_id and revision is None and folder.parent.name == "snapshots":
        revision = folder.name
    checkpoint = checkpoints.open(folder)
    files, config_name = checkpoint.weight_files(), checkpoint.config_file.name
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
