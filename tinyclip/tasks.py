"""What people do with CLIP: zero-shot classification, similarity, embedding files, search.

Functions here take a loaded `tinyclip.CLIP` (`clip`) and work in numpy; the
`CLIP` methods `classify` and `similarity` call them. The streaming helpers
(`find_images`, `embed_image_files`, `top_indices`) serve the `embed` and
`search` commands and library users with many files alike.

Zero-shot classification follows OpenAI's prompt ensembling
(https://github.com/openai/CLIP/blob/main/notebooks/Prompt_Engineering_for_ImageNet.ipynb):
each label's prompts are encoded and normalised, averaged, and the mean is
normalised again; the probabilities are softmax(exp(logit_scale) * cosine).
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import ImageError, TruncationWarning, UsageError
from .templates import NAMED
from .vectors import unit_rows

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LABEL_CACHE_SIZE = 4096       # label embeddings kept per model (4096 x 768 float32 = 12 MiB at most)
PROMPTS_PER_CHUNK = 1024      # prompts tokenized and encoded together when building label embeddings


class LabelCache:
    """Ensembled label embeddings of one model, keyed by (templates, label), least recently used
    dropped first. Keyed per label so that a new label set re-encodes only its new labels.
    Safe to share between threads, as a CLIP is."""

    def __init__(self, max_entries: int = LABEL_CACHE_SIZE):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._longest: dict[tuple, int] = {}     # tokens in each entry's longest prompt: a cut one warns each time
        self._lock = threading.Lock()
        self.logit_scale: float | None = None    # exp(logit_scale), read from the model once

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            return None

    def longest(self, key: tuple) -> int | None:
        """How many tokens the longest prompt of the entry `key` has (start and end included), if known."""
        with self._lock:
            return self._longest.get(key)

    def put(self, key: tuple, value: np.ndarray, longest: int | None = None) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            if longest is not None:
                self._longest[key] = longest
            while len(self._entries) > self.max_entries:
                self._longest.pop(self._entries.popitem(last=False)[0], None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._longest.clear()


# ---- classification and similarity -------------------------------------------------------------

def classify(clip, images, labels: Sequence[str], templates="imagenet", top: int | None = None, *,
             batch_size: int = 32):
    """Zero-shot classification of `images` over `labels`.

    Parameters
    ----------
    images : anything `CLIP.encode_image` takes: one or a list of file paths, PIL images,
        uint8 arrays, or pixel values (N, C, S, S).
    labels : the class names, a list of distinct non-empty strings.
    templates : "imagenet" (the 80 prompts of the CLIP paper, ensembled), None (each label is
        the prompt as given), one template string or a list of them, each containing "{}"
        where the label goes.
    top : None for the probability matrix; an integer K >= 1 for the K best labels per image.

    Returns
    -------
    np.ndarray (N_images, N_labels) float32 when `top` is None: probabilities, columns in the
    order of `labels`, each row summing to 1.
    list of N_images lists of (label, probability) tuples, best first, min(K, N_labels) long,
    when `top` is K (see `ranked` to rank a matrix yourself).
    """
    labels = check_labels(labels)
    top = check_top(top, allow_none=True)
    label_embeds = label_embeddings(clip, labels, templates, batch_size=batch_size)    # (L, D), unit rows
    image_embeds = _encode_images(clip, images, batch_size)                            # (N, D), unit rows
    logits = _logit_scale(clip) * (image_embeds.astype(np.float64) @ label_embeds.T.astype(np.float64))
    probs = _softmax(logits).astype(np.float32)
    return probs if top is None else ranked(probs, labels, top)


def similarity(clip, images, texts, *, batch_size: int = 32) -> np.ndarray:
    """Cosine similarities (N_images, N_texts) float32 between `images` and `texts`
    (anything `encode_image` and `encode_text` take)."""
    text_embeds = clip.encode_text(texts, normalize=True, batch_size=batch_size)   # first: a tokenizer problem
    image_embeds = _encode_images(clip, images, batch_size)                        # comes before the images' work
    return (image_embeds @ text_embeds.T).astype(np.float32)


def label_embeddings(clip, labels: Sequence[str], templates="imagenet", *, batch_size: int = 32,
                     store=None, on_progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The unit-length text embedding (L, D) float32 of each label, prompt-ensembled over `templates`
    (see `classify`).

    Cached on `clip`: a label already embedded with the same templates is not encoded again. With
    `store` (a tinyclip.label_store.LabelStore), labels are also looked up on disk, keyed by the
    model's fingerprint, dtype and the templates, and new ones are written there.
    `on_progress(prompts_done, prompts_total)` is called before the first chunk of prompts is encoded
    and after each.
    A label whose prompts exceed the context length warns (TruncationWarning) and is cut, as
    transformers' tokenizer cuts it.
    """
    labels = check_labels(labels)
    templates = resolve_templates(templates)
    cache: LabelCache = clip.label_cache
    missing = [label for label in dict.fromkeys(labels) if cache.get((templates, label)) is None]
    stored: dict[str, np.ndarray] = {}
    stored_longest: dict[str, int] = {}
    if missing and store is not None:
        key = (clip.identity["fingerprint"], clip.dtype, templates)
        stored, stored_longest = store.load_with_lengths(key, dim=clip.config.projection_dim)
        for label in missing:
            if label in stored:
                if label not in stored_longest:     # a file written before lengths were stored
                    stored_longest[label] = _longest_prompt(clip, label, templates)
                cache.put((templates, label), stored[label], stored_longest[label])
        missing = [label for label in missing if label not in stored]
    encoded: dict[str, np.ndarray] = {}
    per_chunk = max(1, PROMPTS_PER_CHUNK // len(templates))
    if missing and on_progress is not None:
        on_progress(0, len(missing) * len(templates))     # before the wait, so a bar shows from its start
    for i in range(0, len(missing), per_chunk):
        chunk = missing[i:i + per_chunk]
        prompts = [t.replace("{}", label) for label in chunk for t in templates]
        embeds = clip.encode_text(prompts, normalize=True, batch_size=batch_size).astype(np.float64)
        embeds = unit_rows(embeds.reshape(len(chunk), len(templates), -1).mean(axis=1))     # (n_labels, D)
        for label, e in zip(chunk, embeds.astype(np.float32)):
            stored_longest[label] = _longest_prompt(clip, label, templates)
            cache.put((templates, label), e, stored_longest[label])
            encoded[label] = e
        if on_progress is not None:
            on_progress((i + len(chunk)) * len(templates), len(missing) * len(templates))
    if encoded and store is not None:
        store.save(key, {**stored, **encoded}, stored_longest)
    _warn_truncated(clip, labels, templates)
    return np.stack([cache.get((templates, label)) for label in labels])


def _longest_prompt(clip, label: str, templates: tuple[str, ...]) -> int:
    """Tokens of the label's longest prompt, start and end included (counted up to one past the context)."""
    return max(token_count(clip, t.replace("{}", label)) for t in templates)


def _warn_truncated(clip, labels: Sequence[str], templates: tuple[str, ...]) -> None:
    """One TruncationWarning per label whose longest prompt does not fit the context length, whether the
    label was encoded now or came from a cache (which keeps its prompts' lengths). Python shows each
    once per process (classify and the command line's label cache fill both come here)."""
    context = clip.config.text_config.max_position_embeddings
    room = context - 2     # besides the start and end tokens
    cache: LabelCache = clip.label_cache
    for label in labels:
        longest = cache.longest((templates, label))
        if longest is None:
            longest = _longest_prompt(clip, label, templates)
        if longest > context:
            shown = repr(label) if len(label) <= 60 else f"{label[:60]!r}..."
            warnings.warn(f"label {shown} is cut to fit the model's {context}-token context (a prompt of it has "
                          f"more than {room} tokens besides start and end): only its start counts",
                          TruncationWarning)   # located here: once a process, whoever calls


def token_count(clip, text: str) -> int:
    """How many tokens `text` takes in the model's context, its start and end tokens included; counted up
    to one past the context (reading stops there: a huge text costs what a row does)."""
    room = clip.config.text_config.max_position_embeddings - 2
    return len(clip.tokenizer.encode(text, limit=room)) + 2


def is_cut(clip, text: str) -> bool:
    """Whether `text` is longer than the model's context, so that encoding it cuts it (as transformers does)."""
    return token_count(clip, text) > clip.config.text_config.max_position_embeddings


def resolve_templates(templates) -> tuple[str, ...]:
    """`templates` as a tuple of strings with "{}": a name ("imagenet"), None (the label alone),
    one template string, or a sequence of template strings."""
    if templates is None:
        return ("{}",)
    if isinstance(templates, str):
        if templates.lower() in NAMED:
            return tuple(NAMED[templates.lower()])
        if "{}" not in templates:
            raise UsageError(f"templates {templates!r} is neither a template containing '{{}}' nor a known set "
                             f"({', '.join(sorted(NAMED))})")
        return (templates,)
    if not isinstance(templates, (list, tuple)) or not all(isinstance(t, str) for t in templates):
        raise UsageError(f"templates must be a name ({', '.join(sorted(NAMED))}), None, or a list of strings "
                         f"containing '{{}}'; got {type(templates).__name__}")
    if not templates:
        raise UsageError("templates is an empty list; pass None to use the labels as they are")
    for i, t in enumerate(templates):
        if "{}" not in t:
            raise UsageError(f"template {i + 1} of {len(templates)} ({t!r}) has no '{{}}' where the label should go, "
                             "e.g. 'a photo of a {}.'")
    return tuple(templates)


def ranked(probs: np.ndarray, labels: Sequence[str], top: int | None = None) -> list[list[tuple[str, float]]]:
    """Per row of `probs` (N, L), the (label, probability) pairs best first, the `top` best only
    when given. Ties keep the order of `labels`."""
    top = check_top(top, allow_none=True)
    out = []
    for row in np.asarray(probs):
        order = top_indices(row, top)
        out.append([(labels[j], float(row[j])) for j in order])
    return out


def check_top(top, allow_none: bool = False, name: str = "top") -> int | None:
    """`top` as an int >= 1 (or None where allowed); UsageError otherwise."""
    if top is None and allow_none:
        return None
    return _positive_int(top, name)


def top_indices(scores: np.ndarray, top: int | None = None) -> np.ndarray:
    """Indices of the `top` highest scores (all when None), highest first; ties in index order."""
    scores = np.asarray(scores)
    if top is not None and top < len(scores):
        # Only the candidates at or above the top-th best score get sorted: linear for a few of many.
        kth = np.partition(scores, len(scores) - top)[len(scores) - top]
        keep = np.flatnonzero(scores >= kth)
        return keep[np.argsort(-scores[keep], kind="stable")][:top]
    return np.argsort(-scores, kind="stable")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_labels(labels) -> list[str]:
    """`labels` as a list of distinct non-empty strings; UsageError otherwise."""
    if isinstance(labels, str):
        raise UsageError(f"labels must be a list of strings, got the single string {labels!r}; "
                         f"write [{labels!r}] if you mean one label")
    if labels is None or not isinstance(labels, Iterable):
        raise UsageError(f"labels must be a list of strings, got {type(labels).__name__}")
    labels = list(labels)
    if not labels:
        raise UsageError("no labels: pass at least one class name")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise UsageError(f"label {i + 1} of {len(labels)} is {type(label).__name__}, not a string")
        if not label.strip():
            raise UsageError(f"label {i + 1} of {len(labels)} is empty")     # counted from 1, as people count
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise UsageError(f"labels must be distinct; repeated: {', '.join(map(repr, dupes))}")
    return labels


def _encode_images(clip, images, batch_size: int) -> np.ndarray:
    """Unit image embeddings; a list of images is preprocessed one batch at a time."""
    if isinstance(images, (list, tuple)) and len(images) > batch_size:
        parts = [clip.encode_image(list(images[i:i + batch_size]), normalize=True, batch_size=batch_size)
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts)
    return clip.encode_image(images, normalize=True, batch_size=batch_size)


def _logit_scale(clip) -> float:
    cache: LabelCache = clip.label_cache
    if cache.logit_scale is None:
        from . import _tinygrad
        with clip.runner.lock, clip.runner.context():
            raw = _tinygrad.as_float32(clip.runner.model.logit_scale)   # read at load: not a tower's
        cache.logit_scale = float(np.exp(np.float64(raw)))
    return cache.logit_scale


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---- many files ------------------------------------------------------------------------------------

def is_image_file(path) -> bool:
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def looks_like_a_path(text: str) -> str | None:
    """Why `text`, given where a label or a query goes, looks like a file path (it contains a path
    separator, or names an existing folder), or None. The command line refuses such words there:
    they are almost always a mistyped or misplaced image path, not a text."""
    if os.path.isdir(text):
        return "is a folder"
    for sep in filter(None, (os.sep, os.altsep)):
        if sep in text:
            return f"contains {sep} like a path (no such file)" if not os.path.exists(text) else "is a file"
    return None


def find_images(paths: Iterable, on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Image files under `paths`, one at a time and in a stable order.

    A file is yielded as given, whatever its extension. A folder is walked recursively in sorted
    order for files with a common image extension (IMAGE_EXTENSIONS, any case), leaving out hidden
    files and folders (names starting with "."). A file reached twice (named twice, inside a folder
    also given, through a link) is yielded once, the first time, compared by its resolved path.
    A folder that cannot be listed is reported to `on_error(path, reason)` and skipped. A path that
    does not exist raises ImageError.
    """
    seen: set[str] = set()
    for found in _walk_images(paths, on_error):
        resolved = os.path.realpath(found)
        if resolved not in seen:
            seen.add(resolved)
            yield found


def _walk_images(paths: Iterable, on_error) -> Iterator[str]:
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            def walk_error(e: OSError, _p=p):
                if on_error is not None:
                    on_error(e.filename or _p, f"cannot list the folder ({e.strerror or e})")
            for root, dirs, files in os.walk(p, onerror=walk_error):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and is_image_file(name):
                        yield os.path.join(root, name)
        elif os.path.exists(p):
            yield p
        else:
            raise ImageError(f"{p}: no such file or folder")


def embed_image_files(clip, files: Iterable[str], *, batch_size: int = 32, normalize: bool = False,
                      on_skip: Callable[[str, str], None] | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """Embed image files a batch at a time, holding two batches of crops in memory.

    Yields (paths, embeddings (n, D) float32) per batch of up to `batch_size` readable files.
    A file that cannot be read or preprocessed is skipped and reported to `on_skip(path, reason)`,
    in order, before the batch that follows it. While the device encodes one batch, a thread reads
    and crops the files of the next (`files` is advanced from that thread, one batch at a time);
    the crops go up as uint8 and are normalised in the graph (CLIP.image_scaling), or, where the
    processor cannot split its steps, as preprocessed pixel values.
    """
    from .preprocess import load_image
    _positive_int(batch_size, "batch_size")
    scaling = clip.image_scaling()
    files = iter(files)

    def prepare(image) -> np.ndarray:
        return clip.processor.crop(image) if scaling is not None else clip.preprocess(image)[0]

    def next_batch() -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
        """(paths, their crops or pixel values, skipped (path, reason)) of the next batch of files."""
        paths, arrays, skipped = [], [], []
        for path in files:
            try:
                arrays.append(prepare(load_image(path)))
            except Exception as e:     # one bad file must never end a long run
                reason = str(e)
                skipped.append((path, reason[len(path) + 2:] if reason.startswith(f"{path}: ") else reason))
                continue
            paths.append(path)
            if len(paths) == batch_size:
                break
        return paths, arrays, skipped

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tinyclip-files") as pool:
        coming = pool.submit(next_batch)
        while True:
            paths, arrays, skipped = coming.result()
            for path, reason in skipped:
                if on_skip is not None:
                    on_skip(path, reason)
            if not paths:
                return
            coming = pool.submit(next_batch)
            if scaling is None:
                embeds = clip.encode_image(np.stack(arrays), normalize=normalize, batch_size=batch_size)
            else:
                embeds = clip._encode_crops(arrays, scaling, normalize=normalize, batch_size=batch_size)
            yield paths, embeds
