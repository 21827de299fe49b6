"""The public entry point: `load()` and the `CLIP` object it returns.

`CLIP` bundles the tinygrad model, the tokenizer and the image processor of
one checkpoint, and converts between user inputs (texts, images, numpy
arrays) and the model's Tensors. Library users who want to stay on the device
use `clip.model` (a `tinyclip.model.CLIPModel`) with Tensors directly.
"""
from __future__ import annotations

import functools
import os
import pathlib
import threading
import warnings
from collections.abc import Callable

import numpy as np
from tinygrad import Tensor, dtypes

from . import _tinygrad, cachedir, checkpoints, hub, identity, registry, tasks, trace
from .config import requested_image_size
from .errors import ImageError, TinyClipError, TokenizerError, UsageError
from .kernels import LINEAR_DTYPES
from .model import CLIPModel
from .preprocess import ImageProcessor, PixelScaling, as_batch, check_image_size
from .runner import Runner
from .towers import Towers
from .tokenizer import CLIPTokenizer, check_vocab_size
from .vectors import unit_rows

DEFAULT_BATCH_SIZE = 32


def load(name_or_path: str | os.PathLike = hub.DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
         *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
         local_files_only: bool = False, graph_cache: bool = True, allow_tf32: bool = False,
         image_size: int | None = None) -> "CLIP":
    """Load a Hugging Face CLIPModel checkpoint, or an open_clip one (open_clip_config.json and
    open_clip_model.safetensors); tinyclip.checkpoints reads each format.

    Parameters
    ----------
    name_or_path : a local folder, or a hub repo id such as "openai/clip-vit-base-patch32".
    device : a backend name ("cpu", "cpu-llvm", "opencl", "cuda", "metal"), a raw tinygrad
        device string ("CPU", "CPU:LLVM", "CL", "CUDA", "METAL"), a registry.Backend, or None for the
        best available.
    dtype : "float32" (the default on every backend), "float16", "bfloat16" or "int8". bfloat16 and int8 compute
        the linear layers only in that dtype, everything else in float32 (the cpu backend; faster, not exact:
        README gives their tolerances): bfloat16 products summed in float32 (a CPU with AVX512_BF16), int8
        weights quantised per output channel at load and inputs per row, int32 sums (a CPU with VNNI).
    revision, cache_dir, local_files_only : passed to huggingface_hub for hub ids.
    graph_cache : keep compiled encoder graphs on disk (~/.cache/tinyclip/graphs; see
        tinyclip.graph_cache) so later processes skip compiling; TINYCLIP_GRAPH_CACHE=0 also turns it off.
    allow_tf32 : let float32 matmuls run on TF32 tensor cores (NVIDIA, the cuda and nv backends):
        faster, and no longer exact float32 (README: its tolerance). Off by default. Where it cannot
        apply (another backend, a float16 model) a warning says so and the model computes exactly.
    image_size : run the image tower at N x N instead of the checkpoint's size: the processor
        resizes and crops to N and the position embeddings are interpolated once, bicubically, as
        transformers' interpolate_pos_encoding=True does. N must be a multiple of the patch size.
    """
    if not isinstance(allow_tf32, bool):
        raise UsageError(f"allow_tf32 must be True or False, got {allow_tf32!r}")
    trace.imports()
    _tinygrad.guard_kernel_cache()
    if isinstance(device, registry.Backend):     # chosen (and traced) by the caller
        chosen = registry.select(device)
    else:
        with trace.phase("backend") as said:
            chosen = registry.select(device)
            said.append(f"{chosen.name}, {chosen.device}")
    try:
        name = chosen.check_dtype(dtype)
    except TinyClipError:
        raise
    except ValueError as e:    # a dtype name tinyclip does not know
        raise UsageError(str(e)) from None
    kernels = chosen.kernel_set()
    if name in LINEAR_DTYPES:   # only the linear layers compute in it; the model's tensors stay float32
        kernels, dt = kernels.with_linear_dtype(name), dtypes.float32
    else:
        dt = _tinygrad.dtype_named(name)
    folder = hub.locate(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    checkpoint = checkpoints.open(folder)     # its format's config, weights, tokenizer and processor
    config = checkpoint.config
    size = config.vision_config.image_size if image_size is None else \
        requested_image_size(config.vision_config, image_size)
    model = CLIPModel(config, dtype=dt, device=chosen.device, kernels=kernels)
    towers = Towers(checkpoint, model, dt, chosen, keep=cachedir.enabled(graph_cache))
    with trace.phase("weights checked (each tower read on its first use)"):
        towers.load_shared()
    if size != config.vision_config.image_size:    # the position embeddings are interpolated from the weights
        towers.load("image")
        with _tinygrad.LOCK, chosen.context():
            model.resize_images(size)
    processor = checkpoint.image_processor()
    if size != config.vision_config.image_size:
        processor = processor.resized(size)
    check_image_size(processor, size, folder)
    hub_id = None if pathlib.Path(name_or_path).expanduser().is_dir() else str(name_or_path)
    return CLIP(model, functools.partial(_read_tokenizer, checkpoint), processor, chosen, folder,
                graph_cache=graph_cache, hub_id=hub_id,
                revision=revision, tf32=allow_tf32 and _tf32_applies(chosen, dt), towers=towers)


def _read_tokenizer(checkpoint) -> CLIPTokenizer:
    """The checkpoint's tokenizer, read from its files and checked against the text model's embedding table."""
    with trace.phase("tokenizer"):
        tokenizer = checkpoint.tokenizer()
    check_vocab_size(tokenizer, checkpoint.config.text_config.vocab_size, checkpoint.folder, checkpoint.config_file.name)
    return tokenizer


def _tf32_applies(backend: registry.Backend, dtype) -> bool:
    """Whether allow_tf32 changes anything for this backend and dtype; a warning where it does not."""
    if not backend.tf32:
        warnings.warn(f"allow_tf32 has no effect on backend {backend.name}: it has no TF32 tensor cores; "
                      "computing in exact float32", stacklevel=3)
        return False
    if dtype != dtypes.float32:
        warnings.warn("allow_tf32 has no effect on a float16 model (its matmuls are float16 already)", stacklevel=3)
        return False
    return True


class CLIP:
    """A loaded checkpoint: tokenize, preprocess, encode_image, encode_text, logits."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer | Callable[[], CLIPTokenizer], processor: ImageProcessor,
                 backend: registry.Backend, folder: pathlib.Path, jit: bool = True, graph_cache: bool = True,
                 hub_id: str | None = None, revision: str | None = None, tf32: bool = False,
                 towers: Towers | None = None):
        self._model, self.processor, self.backend, self.folder = model, processor, backend, folder
        # A tokenizer, or what reads it on first use (load(): a process that embeds images never reads it).
        self._tokenizer, self._read_tokenizer = (tokenizer, None) if hasattr(tokenizer, "encode") else (None, tokenizer)
        self._tokenizer_lock = threading.Lock()
        self.towers = towers    # the towers whose weights are still to be read (None: all are read)
        self.hub_id, self.revision = hub_id, revision
        self.config = model.config
        self.label_cache = tasks.LabelCache()    # ensembled label embeddings for classify()
        # Buckets, JITs and the lock that makes one CLIP safe to share between threads.
        self.runner = Runner(model, backend, jit=jit, cache=graph_cache, tf32=tf32,
                             ready=towers.load if towers is not None else None)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The checkpoint's tokenizer, read from its files the first time texts need it (a process that only
        embeds images never reads them: 0.15 s for CLIP's vocabulary and merges); a problem with those files
        (TokenizerError, naming the file) is raised then, by the first call that takes texts."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = self._read_tokenizer()
        return self._tokenizer

    @property
    def model(self) -> CLIPModel:
        """The tinygrad model (tinyclip.model.CLIPModel), every weight read (a tower's weights are
        otherwise read when the tower first runs)."""
        if self.towers is not None:
            self.towers.load_all()
        return self._model

    @property
    def device(self) -> str:
        """The backend's name ("cpu", "opencl", ...)."""
        return self.backend.name

    @property
    def dtype(self) -> str:
        """"float32", "float16", or the linear layers' dtype ("bfloat16", "int8") where they compute in another."""
        if self._model.kernels.linear_dtype:
            return self._model.kernels.linear_dtype
        return "float16" if self._model.logit_scale.dtype == dtypes.float16 else "float32"

    @functools.cached_property
    def identity(self) -> dict:
        """Which checkpoint this is, in a form that survives copying it (tinyclip.identity): the hub id
        and revision where it came from the hub (the snapshot's commit when no revision was asked
        for), the folder, and a fingerprint of its config, weights, tokenizer and preprocessing."""
        return identity.of_checkpoint(self.folder, self.hub_id, self.revision)

    @property
    def tf32(self) -> bool:
        """Whether float32 matmuls run on TF32 tensor cores (load(allow_tf32=True) on the cuda or nv backend)."""
        return self.runner.tf32

    def __repr__(self) -> str:
        return (f"<tinyclip.CLIP {self.folder.name} on {self.backend.name} ({self.backend.device}), {self.dtype}"
                + (" with TF32 matmuls>" if self.tf32 else ">"))

    # ---- inputs -> arrays ----------------------------------------------------------------------

    def tokenize(self, texts) -> np.ndarray:
        """Token ids (N, context_length), exactly as transformers' CLIPTokenizer with
        padding="max_length", truncation=True gives them."""
        return self.tokenizer(texts)

    def preprocess(self, images) -> np.ndarray:
        """Pixel values (N, 3, S, S) float32 from PIL images, file paths or HWC uint8 arrays,
        as the checkpoint's CLIPImageProcessor gives them."""
        return self.processor(images)

    # ---- encoders ------------------------------------------------------------------------------

    def encode_image(self, images, *, normalize: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Image embeddings (N, projection_dim) float32, as transformers' get_image_features.

        `images`: PIL images, paths, HWC uint8 arrays, or already preprocessed pixel values
        (a float array or tinygrad Tensor of shape (N, C, S, S)).

        Images are preprocessed one batch at a time, the next while the device encodes this one,
        and uploaded as uint8 crops that the device rescales and normalises (tinyclip/pixels.py):
        the pixel values differ from preprocess()'s by float32 rounding (PIXEL_TOL in the tests).
        A processor whose float steps cannot run on the device, or whose crops vary in size, goes
        through preprocess() as a whole first.
        """
        _check_batch_size(batch_size)
        if isinstance(images, Tensor):
            images = self._numpy(images)
        crops = self._crops(images)
        if crops is not None:
            n, fill, scaling = crops
            out = self.runner.images(n, batch_size, fill, scaling)
        else:
            out = self._batched(self.runner.image_features, self._pixels(images), batch_size)
        return unit_rows(out) if normalize else out

    def encode_text(self, texts, *, normalize: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Text embeddings (N, projection_dim) float32, as transformers' get_text_features.

        `texts`: a string, a list of strings, or token ids (an int array or Tensor (N, T)).
        """
        ids = self._ids(texts)
        out = self._batched(self.runner.text_features, ids, batch_size)
        return unit_rows(out) if normalize else out

    def logits(self, images, texts) -> np.ndarray:
        """logits_per_image (N_images, N_texts): scaled cosine similarities, as transformers."""
        txt = self.encode_text(texts)     # first: a tokenizer problem comes before the images' work
        return self.logits_from_embeddings(self.encode_image(images), txt)

    def logits_from_embeddings(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        with self.runner.lock, self.runner.context():
            logits = self._model.logits(_tinygrad.to_tensor(np.asarray(image_embeds, np.float32), self.backend.device),
                                       _tinygrad.to_tensor(np.asarray(text_embeds, np.float32), self.backend.device))
            return _tinygrad.as_float32(logits)

    # ---- tasks (tinyclip/tasks.py) ----------------------------------------------------------------

    def classify(self, images, labels, templates="imagenet", top: int | None = None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        """Zero-shot classification: probabilities (N_images, N_labels) float32 when `top` is None,
        else per image the `top` best (label, probability) pairs. `templates`: "imagenet" (80
        prompts, ensembled), None (labels as given) or strings with "{}". See tasks.classify."""
        return tasks.classify(self, images, labels, templates, top, batch_size=batch_size)

    def similarity(self, images, texts, *, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Cosine similarities (N_images, N_texts) float32."""
        return tasks.similarity(self, images, texts, batch_size=batch_size)

    # ---- helpers -------------------------------------------------------------------------------

    def _batched(self, run, x, batch_size: int) -> np.ndarray:
        _check_batch_size(batch_size)
        if x.shape[0] == 0:
            return np.zeros((0, self.config.projection_dim), np.float32)
        return run(x, batch_size)

    def _numpy(self, t: Tensor) -> np.ndarray:
        with self.runner.lock, self.runner.context():
            return t.numpy()

    def _encode_crops(self, crops: list[np.ndarray], scaling: PixelScaling, *, normalize: bool = False,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Image embeddings of uint8 crops (S, S, 3) that processor.crop made (tasks.embed_image_files)."""
        def fill(rows: np.ndarray, start: int, stop: int) -> None:
            for j, i in enumerate(range(start, stop)):
                rows[j] = crops[i]
        out = self.runner.images(len(crops), batch_size, fill, scaling)
        return unit_rows(out) if normalize else out

    def image_scaling(self) -> PixelScaling | None:
        """The float preprocessing steps that the encoder graph computes for images given as files,
        PIL images or uint8 arrays (tinyclip/pixels.py), or None where such images go through
        preprocess() whole first: the processor cannot split its steps (scaling() is None), or its
        crops are not the model's size."""
        v = self.config.vision_config
        scaling = self.processor.scaling() if hasattr(self.processor, "scaling") else None
        if scaling is None or v.num_channels != 3 or self.processor.crop_shape() != (v.image_size, v.image_size):
            return None
        return scaling

    def _crops(self, images):
        """(n, fill, scaling) for Runner.images when `images` (not pixel values) go up as uint8 crops,
        else None."""
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return None
        if (scaling := self.image_scaling()) is None:
            return None
        v, processor = self.config.vision_config, self.processor
        batch = as_batch(images)

        def fill(rows: np.ndarray, start: int, stop: int) -> None:
            for j, i in enumerate(range(start, stop)):
                crop = processor.crop(batch[i], i)
                if crop.shape != rows.shape[1:]:    # crop_shape() promised otherwise
                    raise ImageError(f"image {i} is {crop.shape} after preprocessing; this checkpoint takes "
                                     f"{rows.shape[1:]} (vision_config.image_size {v.image_size})")
                rows[j] = crop
        return len(batch), fill, scaling

    def _pixels(self, images) -> np.ndarray:
        v = self.config.vision_config
        want = (v.num_channels, v.image_size, v.image_size)
        if isinstance(images, Tensor):
            images = self._numpy(images)
        if not (isinstance(images, np.ndarray) and images.dtype.kind == "f"):
            pixels = self.preprocess(images)
            if tuple(pixels.shape[1:]) != want:     # a processor whose size depends on the image
                raise ImageError(f"images are {pixels.shape[3]}x{pixels.shape[2]} after preprocessing; this checkpoint "
                                 f"takes {v.image_size}x{v.image_size} (vision_config.image_size): resize them, or "
                                 "set the preprocessor config's crop_size")
            return pixels
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ImageError(f"pixel values must have shape (N, {', '.join(map(str, want))}) for this "
                             f"checkpoint, got {tuple(images.shape)}; pass images to preprocess() first")
        if not np.isfinite(images).all():
            raise ImageError("pixel values contain NaN or infinity")
        return images.astype(np.float32, copy=False)

    def _ids(self, texts) -> np.ndarray:
        if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts)):
            return self.tokenize(texts)
        if isinstance(texts, Tensor):
            texts = self._numpy(texts)
        if not isinstance(texts, np.ndarray):
            raise TokenizerError(f"texts must be a string, a list of strings or token ids (N, T); "
                                 f"got {type(texts).__name__}" + _first_bad(texts))
        t = self.config.text_config
        if texts.ndim != 2 or texts.dtype.kind not in "iu":
            raise TokenizerError(f"token ids must be an integer array (N, T), got {texts.dtype} {texts.shape}")
        if texts.size and (texts.min() < 0 or texts.max() >= t.vocab_size):
            raise TokenizerError(f"token ids must lie in [0, {t.vocab_size}), got values from {texts.min()} "
                                 f"to {texts.max()}")
        if not 1 <= texts.shape[1] <= t.max_position_embeddings:
            raise TokenizerError(f"token ids have length {texts.shape[1]}; this checkpoint takes 1 to "
                                 f"{t.max_position_embeddings} (text_config.max_position_embeddings)")
        return texts.astype(np.int32)


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


def _first_bad(texts) -> str:
    if isinstance(texts, (list, tuple)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                return f" (item {i} is {type(t).__name__})"
    return ""
