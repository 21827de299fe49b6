"""What a command's collection argument names, and the check that stored embeddings are this model's.

A collection is an index folder (`tinyclip index`), an .npz (`tinyclip embed`), a Parquet folder
(`tinyclip embed --engine ray`) or a plain folder of images (embedded when used).
"""
from __future__ import annotations

import os
import warnings

from .. import index, shards, tasks
from ..errors import UsageError
from . import npz

INDEX, NPZ, PARQUET, IMAGES = "index", "npz", "parquet", "images"


def kind_of(source: str, option: str) -> str:
    """Which of INDEX, NPZ, PARQUET, IMAGES `source` is; UsageError naming `option` if none."""
    if os.path.isdir(source):
        if index.is_index(source):
            return INDEX
        if shards.is_output_folder(source):
            return PARQUET
        if next(iter(tasks.find_images([source])), None) is None:
            raise UsageError(f"{option} {source}: no image files ({' '.join(sorted(tasks.IMAGE_EXTENSIONS))}) "
                             "in the folder")
        return IMAGES
    if os.path.isfile(source) and source.lower().endswith(".npz"):
        return NPZ
    if os.path.exists(source):
        raise UsageError(f"{option} {source}: not a folder, an index or an .npz written by `tinyclip embed`")
    raise UsageError(f"{option} {source}: no such folder or file")


def read_embeddings(source: str, kind: str, option: str) -> npz.ImageEmbeddings:
    """The stored embeddings of an NPZ or PARQUET collection."""
    if kind == PARQUET:
        embeddings, paths, manifest = shards.read_embeddings(source)
        return npz.ImageEmbeddings(embeddings, list(paths), manifest["model"], manifest["dtype"], None)
    return npz.read_image_embeddings(source, option)


def check_same_model(stored_identity: dict | None, stored_dtype: str | None, args, where: str, dtype: str,
                     old_model: str | None = None, command: str = "search") -> None:
    """Refuse (or, with --allow-other-model, warn about) embeddings from other weights or another dtype,
    before the model loads: the fingerprint reads the weights once, then comes from the digest cache.
    `where` names the collection in the message ("--images photos.npz")."""
    from .. import hub, identity
    folder = hub.locate(args.model, revision=args.revision, cache_dir=args.cache_dir)
    current = identity.of_checkpoint(folder)
    if stored_identity is None:
        problem = (f"written by an older tinyclip (format 1), which recorded the model as {old_model} "
                   "without a fingerprint of its weights")
    elif not identity.same_model(stored_identity, current):
        problem = (f"embedded with {identity.describe(stored_identity)}, not with {args.model} "
                   f"(fingerprint {current['fingerprint'][:12]})")
    elif stored_dtype != dtype:
        problem = f"embedded in {stored_dtype}, but this {command} runs in {dtype} (--dtype {stored_dtype} matches it)"
    else:
        return
    if not args.allow_other_model:
        raise UsageError(f"{where}: {problem}; embed again with this model, or pass --allow-other-model to "
                         "compare anyway")
    warnings.warn(f"{where}: {problem}; comparing anyway (--allow-other-model), so the scores may mean little",
                  stacklevel=2)
