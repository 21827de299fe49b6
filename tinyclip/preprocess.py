"""Image preprocessing equal to transformers' CLIPImageProcessor (its PIL backend).

The pipeline, each step guarded by its ``do_*`` flag from preprocessor_config.json:

1. convert to RGB: a PIL image with an alpha band or a ``transparency`` entry is
   composited onto white; any other mode goes through ``PIL.Image.convert("RGB")``.
2. resize in Pillow, on the uint8 RGB image, with the configured filter.
3. center crop, zero-padding where the image is smaller than the crop.
4. rescale (float64 multiply, then float32) and normalize (float32).

Without torchvision, transformers 5 resolves ``CLIPImageProcessor`` to
``CLIPImageProcessorPil``; this module reproduces that class, not the torchvision
backend (which resizes differently). Every setting comes from the config; the
defaults below are CLIPImageProcessor's own, used only for keys the config leaves
out (a key set to null does what it does in transformers; see `from_dict`).

Deliberate differences from transformers:

- numpy arrays must be uint8. transformers treats a float array in [0, 1] as
  already rescaled during the resize and then rescales it a second time.
- with ``do_convert_rgb`` false, an input whose pixels are not 3 uint8 channels
  (mode L, RGBA, I;16, ...) is rejected: the vision model needs 3 channels.
- a (H, W) uint8 array is accepted as grayscale, the same as (H, W, 1);
  transformers rejects 2-D arrays.
- strings are file paths only: URLs and base64 strings are not fetched.
- ``PIL.Image.MAX_IMAGE_PIXELS`` is a hard limit: a file with more pixels is
  refused before decoding (Pillow only warns below twice the limit), and so is
  a resize whose output would exceed it (a 200000x1 image resized by its short
  side). transformers decodes and resizes both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError
from .jsonfile import read_json

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"   # transformers 5 may nest the settings here under "image_processor"

# CLIPImageProcessor's class defaults.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
BICUBIC = 3
DEFAULTS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": DEFAULT_IMAGE_SIZE},
    "resample": BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
    "do_pad": False,
    "pad_size": None,
    "default_to_square": False,   # an int `size` means the shortest edge, not a square
    "use_square_size": False,     # Kosmos-2 legacy flag, honoured by CLIPImageProcessor
}
FIELDS = tuple(DEFAULTS)
FLAGS = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad",
         "default_to_square", "use_square_size")
NEEDED_BY = {"size": "do_resize", "resample": "do_resize", "crop_size": "do_center_crop",
             "rescale_factor": "do_rescale", "image_mean": "do_normalize", "image_std": "do_normalize",
             "pad_size": "do_pad"}

# The key sets transformers accepts in a size dict, and those its resize can act on.
SIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"longest_edge"},
                 {"max_height", "max_width"}, {"min_pixels", "max_pixels"})
RESIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"},
                   {"max_height", "max_width"})
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
CHANNEL_COUNTS = (1, 3, 4)   # what transformers looks for when guessing an array's channel axis


@dataclasses.dataclass(frozen=True)
class PixelScaling:
    """A processor's float steps after its uint8 crop, each per channel and skipped when None:
    x * scale, then (x - mean) / std, in float32. The encoder graph computes them on the device
    (tinyclip/pixels.py) for images uploaded as uint8 crops."""
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def key(self) -> str:
        """A short name for these steps, exact (float.hex) and the same in every process: part of the
        graph cache key of the encoder graphs that compute them (their constants are in the graph)."""
        def exact(v):
            return None if v is None else tuple(float(x).hex() for x in v) if isinstance(v, tuple) else float(v).hex()
        return hashlib.sha256(repr((exact(self.scale), exact(self.mean), exact(self.std))).encode()).hexdigest()[:12]


def load_image(image) -> Image.Image:
    """Open an image as transformers' ``load_image`` does for a local file.

    Parameters
    ----------
    image : str, os.PathLike or PIL.Image.Image
        A path to an image file, or an image already opened.

    Returns
    -------
    PIL.Image.Image
        The fully decoded image, turned upright by its EXIF orientation and
        converted to RGB, as transformers' ``load_image`` does (which its image
        processors apply to paths, but not to PIL images passed in: those keep
        their pixels as stored, in transformers and in `ImageProcessor`). As in
        transformers, that conversion drops an alpha band rather than
        compositing it onto white (only images passed as PIL objects are
        composited). An animated file (GIF, APNG, WebP) gives its first frame.

    Raises
    ------
    ImageError
        The file is missing, empty, unreadable, not an image, truncated or corrupt,
        or has more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's guard
        against decompression bombs). Pillow itself only warns up to twice that
        limit, and transformers decodes such a file; tinyclip refuses it before
        decoding. Raise the limit, or set it to None, if you trust your files.
    """
    if isinstance(image, Image.Image):
        return _upright_rgb(image, "the PIL image")
    if not isinstance(image, (str, os.PathLike)):
        raise ImageError(f"load_image takes a file path or a PIL image, got {type_name(image)}")
    path = os.fspath(image)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith(("http://", "https://")):
        raise ImageError(f"{path}: tinyclip does not download images; save the file and pass its path")
    if not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file")
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(f"{path}: the file is empty (0 bytes), not an image")
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageError(_bomb_message(path, None)) from None
        except (UnidentifiedImageError, OSError):
            raise
        except Exception as e:   # a damaged header can trip a format plugin (ValueError, EOFError, ...)
            raise ImageError(f"{path}: not an image Pillow can read (damaged header: {type(e).__name__}: {e})") \
                from None
        with opened:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and opened.width * opened.height > limit:
                raise ImageError(_bomb_message(path, opened.size))
            try:
                opened.load()
            # Pillow's decoders report corrupt data with many exception types (OSError, SyntaxError,
            # ValueError, EOFError, struct.error, DecompressionBombError, ...).
            except Exception as e:
                raise ImageError(f"{path}: the image is truncated or corrupt ({type(e).__name__}: {e})") from None
            return _upright_rgb(opened, path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (unknown format, or a damaged header)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _bomb_message(path: str, size: tuple[int, int] | None) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else f"more than {2 * limit:,} pixels"
    enough = size[0] * size[1] if size else 4 * limit
    return (f"{path}: the image has {what}, over Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = "
            f"{limit:,}. If you trust the file, raise the limit (PIL.Image.MAX_IMAGE_PIXELS = {enough}; the command "
            f"line's --max-pixels {enough}) or switch it off (= None; --max-pixels 0)")


def _upright_rgb(image: Image.Image, what: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as e:   # decoding a lazily opened image, or a mode Pillow cannot convert
        raise ImageError(f"{what}: cannot decode or convert mode {image.mode} to RGB "
                         f"({type(e).__name__}: {e})") from None


class ImageProcessor:
    """transformers' CLIPImageProcessor (PIL backend) without torch or transformers.

    Construct it with the field names of preprocessor_config.json; a field left
    out or None takes CLIPImageProcessor's default::

        proc = ImageProcessor.from_pretrained("path/to/checkpoint")
        pixels = proc(["cat.jpg", pil_image, hwc_uint8_array])   # (N, 3, H, W) float32

    Inputs are PIL images (any mode Pillow can convert to RGB), file paths
    (str or pathlib.Path, opened with `load_image`), and uint8 numpy arrays of
    shape (H, W, C) or (C, H, W) with C in 1, 3, 4, or (H, W). As in
    transformers, an array whose first axis has 1, 3 or 4 entries is taken as
    channels-first, so a (3, W, 3) array is read as (C, H, W). A 4-D uint8 array
    is a batch.
    """

    def __init__(self, *, do_convert_rgb=None, do_resize=None, size=None, resample=None, do_center_crop=None,
                 crop_size=None, do_rescale=None, rescale_factor=None, do_normalize=None, image_mean=None,
                 image_std=None, do_pad=None, pad_size=None, default_to_square=None, use_square_size=None):
        given = dict(do_convert_rgb=do_convert_rgb, do_resize=do_resize, size=size, resample=resample,
                     do_center_crop=do_center_crop, crop_size=crop_size, do_rescale=do_rescale,
                     rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
                     image_std=image_std, do_pad=do_pad, pad_size=pad_size, default_to_square=default_to_square,
                     use_square_size=use_square_size)
        v = {k: DEFAULTS[k] if given[k] is None else given[k] for k in FIELDS}
        for key in FLAGS:
            if not isinstance(v[key], bool):
                raise ConfigError(f"key {key!r} must be true or false, got {v[key]!r}")
        self.do_convert_rgb = v["do_convert_rgb"]
        self.do_resize = v["do_resize"]
        self.do_center_crop = v["do_center_crop"]
        self.do_rescale = v["do_rescale"]
        self.do_normalize = v["do_normalize"]
        self.do_pad = v["do_pad"]

        if v["use_square_size"]:
            # CLIPImageProcessor.__init__ replaces `size` by a square of its *default* shortest edge.
            v["size"] = {"height": DEFAULTS["size"]["shortest_edge"], "width": DEFAULTS["size"]["shortest_edge"]}
        self.size = _size_dict("size", v["size"], v["default_to_square"])
        self.crop_size = _size_dict("crop_size", v["crop_size"], True)
        self.pad_size = None if v["pad_size"] is None else _size_dict("pad_size", v["pad_size"], True)
        if self.do_resize and set(self.size) not in RESIZE_KEY_SETS:
            raise ConfigError(f"key 'size': {self.size} cannot drive a resize; use {{'shortest_edge': N}}, "
                              "{'height': H, 'width': W}, {'shortest_edge', 'longest_edge'} or "
                              "{'max_height', 'max_width'}")
        if self.do_center_crop and set(self.crop_size) != {"height", "width"}:
            raise ConfigError(f"key 'crop_size' must have 'height' and 'width' when do_center_crop is true, "
                              f"got {self.crop_size}")
        if self.do_pad and (self.pad_size is None or set(self.pad_size) != {"height", "width"}):
            raise ConfigError(f"key 'pad_size' must have 'height' and 'width' when do_pad is true, "
                              f"got {self.pad_size}")

        self.resample = v["resample"]
        if not is_int(self.resample) or self.resample not in RESAMPLE_NAMES:
            raise ConfigError(f"key 'resample' must be a PIL filter code 0-5 "
                              f"({', '.join(f'{k}={n}' for k, n in RESAMPLE_NAMES.items())}), got {self.resample!r}")
        self.resample = int(self.resample)

        self.rescale_factor = v["rescale_factor"]
        if not is_number(self.rescale_factor):
            raise ConfigError(f"key 'rescale_factor' must be a number, got {self.rescale_factor!r}")
        self.image_mean = channel_values("image_mean", v["image_mean"])
        self.image_std = channel_values("image_std", v["image_std"])
        if 0 in self.image_std:
            raise ConfigError(f"key 'image_std' must not contain 0, got {list(self.image_std)}")

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config: dict) -> "ImageProcessor":
        """Build from preprocessor_config.json's contents; keys other than the
        processor's fields (image_processor_type, processor_class, ...) are ignored.

        A key that is absent takes the default, but a key set to null does what it
        does in transformers: a null flag turns its step off, and a null setting is
        an error when its step is on.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"the preprocessor config must be a JSON object, got {type_name(config)}")
        settings = {k: config[k] for k in FIELDS if k in config}
        for key in FLAGS:
            if key in settings and settings[key] is None:
                settings[key] = False
        for key, flag in NEEDED_BY.items():
            if key in settings and settings[key] is None:
                if settings.get(flag, DEFAULTS[flag]):
                    raise ConfigError(f"key {key!r} is null but {flag} is true")
                del settings[key]
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, folder, image_size: int | None = None) -> "ImageProcessor":
        """Read a checkpoint folder's preprocessor settings.

        As transformers, an ``image_processor`` object inside processor_config.json
        takes priority over preprocessor_config.json; `folder` may also be the JSON
        file itself. A folder with neither file gets CLIP's defaults with resize and
        crop sized `image_size` (e.g. config.json's vision_config.image_size), or 224
        when that is not given; `image_size` is ignored when a config file exists.
        """
        path = pathlib.Path(folder)
        if path.is_file():
            return cls._from_file(path, nested=path.name == PROCESSOR_CONFIG)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder; from_pretrained needs the checkpoint folder that holds "
                              f"{PREPROCESSOR_CONFIG}")
        if (path / PROCESSOR_CONFIG).is_file():
            nested = read_json(path / PROCESSOR_CONFIG, ConfigError, what="a JSON object").get("image_processor")
            if nested is not None:
                return cls._from_settings(nested, f"{path / PROCESSOR_CONFIG} (key 'image_processor')")
        if (path / PREPROCESSOR_CONFIG).is_file():
            return cls._from_file(path / PREPROCESSOR_CONFIG, nested=False)
        if image_size is None:
            return cls()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
        return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})

    @classmethod
    def _from_file(cls, path: pathlib.Path, nested: bool) -> "ImageProcessor":
        settings = read_json(path, ConfigError, what="a JSON object")
        if nested:
            if "image_processor" not in settings:
                raise ConfigError(f"{path}: has no 'image_processor' object")
            return cls._from_settings(settings["image_processor"], f"{path} (key 'image_processor')")
        return cls._from_settings(settings, str(path))

    @classmethod
    def _from_settings(cls, settings, source: str) -> "ImageProcessor":
        try:
            return cls.from_dict(settings)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The resolved settings under preprocessor_config.json's names."""
        return {"do_convert_rgb": self.do_convert_rgb, "do_resize": self.do_resize, "size": dict(self.size),
                "resample": self.resample, "do_center_crop": self.do_center_crop, "crop_size": dict(self.crop_size),
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_pad": self.do_pad,
                "pad_size": None if self.pad_size is None else dict(self.pad_size)}

    def __repr__(self) -> str:
        return f"ImageProcessor({self.to_dict()})"

    def resized(self, image_size: int) -> "ImageProcessor":
        """This processor for N x N crops (load(image_size=N)): the resize keeps its kind (shortest
        edge, or height and width) at N, the crop is N x N; what transformers' processor does when
        called with size= and crop_size= of N."""
        settings = self.to_dict()
        settings["size"] = ({"height": image_size, "width": image_size} if set(self.size) == {"height", "width"}
                            else {"shortest_edge": image_size})
        settings["crop_size"] = {"height": image_size, "width": image_size}
        return ImageProcessor(**settings)

    # ---- processing --------------------------------------------------------------------------------

    def __call__(self, images) -> np.ndarray:
        """Pixel values (N, 3, H, W) float32, as CLIPImageProcessor(...)(images, return_tensors="np").

        `images` is one image or a list/tuple of images (see the class docstring);
        a single image gives N = 1.
        """
        batch = as_batch(images)
        pixels = []
        for i, image in enumerate(batch):
            pixels.append(self._process(self._rgb(image, i), i))
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            listed = ", ".join(f"image {i}: {p.shape}" for i, p in enumerate(pixels))
            raise ImageError(f"images differ in size after preprocessing ({listed}) and cannot be stacked; "
                             "enable do_center_crop or use a {'height', 'width'} size")
        return np.stack(pixels).astype(np.float32, copy=False)

    def _rgb(self, image, i: int) -> np.ndarray:
        """One input as an (H, W, 3) uint8 array, the way transformers' PilBackend.process_image reads it."""
        if isinstance(image, (str, os.PathLike)):
            try:
                image = load_image(image)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
        if isinstance(image, Image.Image):
            pixels = self._pil_pixels(image, i)
        elif isinstance(image, np.ndarray):
            pixels = self._array_pixels(image, i)
        else:
            raise ImageError(f"image {i} has unsupported type {type_name(image)}; pass a PIL.Image.Image, a file "
                             "path (str or pathlib.Path) or a uint8 numpy array (H, W, 3)")
        if 0 in pixels.shape:
            raise ImageError(f"image {i} is empty: {pixels.shape[1]}x{pixels.shape[0]} pixels")
        return pixels

    def _pil_pixels(self, image: Image.Image, i: int) -> np.ndarray:
        try:
            pixels = np.asarray(_pil_to_rgb(image) if self.do_convert_rgb else image)
        except Exception as e:   # a lazily opened file that fails to decode, or a mode Pillow cannot convert
            raise ImageError(f"image {i} (PIL mode {image.mode}, {image.width}x{image.height}) cannot be decoded "
                             f"or converted to RGB: {type(e).__name__}: {e}") from None
        if not self.do_convert_rgb and not (pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3):
            raise ImageError(f"image {i} has PIL mode {image.mode} and do_convert_rgb is false; without conversion "
                             "only 3-band 8-bit modes (RGB, YCbCr, ...) give the 3 channels the model needs")
        return pixels

    def _array_pixels(self, array: np.ndarray, i: int) -> np.ndarray:
        if array.dtype != np.uint8:
            raise ImageError(f"image {i} is an array of dtype {array.dtype} and shape {array.shape}; tinyclip takes "
                             "uint8 arrays with values 0-255 (for floats in [0, 1]: "
                             "(a * 255).round().astype(np.uint8))")
        if array.ndim == 2:
            hwc = array[:, :, None]   # (H, W) grayscale
        elif array.ndim == 3:
            # transformers' guess: channels-first when the first axis could be channels, even if the last could too
            if array.shape[0] in CHANNEL_COUNTS:
                hwc = array.transpose(1, 2, 0)   # (C, H, W) -> (H, W, C)
            elif array.shape[2] in CHANNEL_COUNTS:
                hwc = array
            else:
                raise ImageError(f"image {i} is an array of shape {array.shape}: neither its first nor its last "
                                 "axis has 1, 3 or 4 channels; pass (H, W, 3) or (3, H, W)")
        else:
            raise ImageError(f"image {i} is an array of shape {array.shape}; expected (H, W, C), (C, H, W) or (H, W)")
        channels = hwc.shape[2]
        if self.do_convert_rgb and channels == 1:
            hwc = np.repeat(hwc, 3, axis=2)
        elif self.do_convert_rgb and channels == 4:
            # transformers blends an RGBA array onto white in float64 and rounds (not PIL's integer blend)
            alpha = hwc[:, :, 3:] / 255
            hwc = np.round(alpha * hwc[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
        elif channels != 3:
            raise ImageError(f"image {i} is an array of shape {array.shape} with {channels} channel(s) and "
                             "do_convert_rgb is false; the model needs 3 channels")
        return np.ascontiguousarray(hwc)

    # ---- the split CLIP.encode_image uploads at (tinyclip/pixels.py) ----------------------------------

    def crop(self, image, i: int = 0) -> np.ndarray:
        """One image through the steps before the float ones (RGB conversion, resize, center crop):
        (H, W, 3) uint8, which `scaling()` turns into this processor's pixel values. `i` is the
        image's place in its batch, for error messages (the errors are those of __call__)."""
        return self._resize_crop(self._rgb(image, i), i)

    def output_shape(self) -> tuple[int, int] | None:
        """(height, width) of every image this processor gives (the pad size where it pads), or None
        where it depends on the image."""
        if self.do_pad:
            return self.pad_size["height"], self.pad_size["width"]
        return self.crop_shape()

    def crop_shape(self) -> tuple[int, int] | None:
        """(height, width) of every crop, or None where it depends on the image (a resize by an edge
        without a center crop)."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and set(self.size) == {"height", "width"}:
            return self.size["height"], self.size["width"]
        return None

    def scaling(self) -> PixelScaling | None:
        """The float steps after `crop` (rescale, normalize), to run on the device; None where they
        cannot: with do_pad, padding follows normalisation (its zeros are normalised values)."""
        if self.do_pad:
            return None
        return PixelScaling(scale=self.rescale_factor if self.do_rescale else None,
                            mean=self.image_mean if self.do_normalize else None,
                            std=self.image_std if self.do_normalize else None)

    def _process(self, pixels: np.ndarray, i: int) -> np.ndarray:
        """resize -> center crop -> rescale -> normalize -> pad, on (H, W, 3); returns (3, H', W')."""
        pixels = self._resize_crop(pixels, i)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            mean = np.array(self.image_mean, dtype=pixels.dtype)
            std = np.array(self.image_std, dtype=pixels.dtype)
            pixels = (pixels - mean) / std
        if self.do_pad:
            pixels = _pad_bottom_right(pixels, self.pad_size["height"], self.pad_size["width"], i)
        return pixels.transpose(2, 0, 1)   # (H, W, 3) -> (3, H, W)

    def _resize_crop(self, pixels: np.ndarray, i: int) -> np.ndarray:
        """resize -> center crop, on (H, W, 3) uint8."""
        if self.do_resize:
            height, width = self._resized_shape(*pixels.shape[:2])
            if height <= 0 or width <= 0:
                raise ImageError(f"image {i} ({pixels.shape[1]}x{pixels.shape[0]}) would be resized to "
                                 f"{width}x{height} under size {self.size}")
            # A thin image (say 100000x1) resized by its short side would need gigabytes before the crop.
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and height * width > limit:
                raise ImageError(f"image {i} ({pixels.shape[1]}x{pixels.shape[0]}) would be resized to "
                                 f"{width}x{height} under size {self.size}, more than PIL.Image.MAX_IMAGE_PIXELS "
                                 f"= {limit:,} pixels; crop it to a less extreme aspect ratio first, or raise "
                                 "the limit if you have the memory")
            resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling(self.resample))
            pixels = np.asarray(resized)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return pixels

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, with transformers' rounding (int() truncation)."""
        size = self.size
        if "shortest_edge" in size and "longest_edge" in size:
            return _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            # torchvision's rule: the short side becomes `shortest_edge`, the long side is truncated
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        if "max_height" in size:
            scale = min(size["max_height"] / height, size["max_width"] / width)
            return int(height * scale), int(width * scale)
        return size["height"], size["width"]


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb for PIL images: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _shortest_longest(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """transformers' get_size_with_aspect_ratio: the short side becomes `shortest`
    unless that pushes the long side past `longest`, in which case the long side is capped."""
    short_side, long_side = float(min(height, width)), float(max(height, width))
    exact = None   # the unrounded short side when the cap applies
    if long_side / short_side * shortest > longest:
        exact = longest * short_side / long_side
        shortest = int(round(exact))
    if min(height, width) == shortest:
        return height, width
    ratio_base = shortest if exact is None else exact
    if width < height:
        return int(ratio_base * height / width), shortest
    return shortest, int(ratio_base * width / height)


def check_image_size(processor, image_size: int, folder) -> None:
    """Refuse, at load, preprocessing whose images can never have the model's size: a crop (or pad)
    of another size than vision_config.image_size, or a crop larger than the padded image (which
    would only allocate memory before failing)."""
    out = processor.output_shape() if hasattr(processor, "output_shape") else processor.crop_shape()
    crop = processor.crop_shape()
    if out is not None and out != (image_size, image_size):
        what = "pad_size" if getattr(processor, "do_pad", False) else "crop_size"
        raise ConfigError(f"{folder}: the image preprocessing gives {out[1]}x{out[0]} images ({what}), but the model "
                          f"takes {image_size}x{image_size} (vision_config.image_size); set {what} to {image_size} "
                          "in the preprocessor config")
    if out is not None and crop is not None and (crop[0] > out[0] or crop[1] > out[1]):
        raise ConfigError(f"{folder}: crop_size {crop[1]}x{crop[0]} is larger than the {out[1]}x{out[0]} images the "
                          "preprocessing gives (pad_size); set crop_size to at most that")


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center crop of (H, W, C); a side shorter than the crop is zero-padded, the
    odd pixel of padding going to the top/left (transformers' image_transforms.center_crop)."""
    height, width = pixels.shape[:2]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + crop_height, left:left + crop_width]
    canvas_h, canvas_w = max(crop_height, height), max(crop_width, width)
    pad_top, pad_left = math.ceil((canvas_h - height) / 2), math.ceil((canvas_w - width) / 2)
    canvas = np.zeros((canvas_h, canvas_w) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[pad_top:pad_top + height, pad_left:pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[top:top + crop_height, left:left + crop_width]


def _pad_bottom_right(pixels: np.ndarray, height: int, width: int, i: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if h > height or w > width:
        raise ImageError(f"image {i} is {w}x{h} after preprocessing, larger than pad_size {width}x{height}")
    padded = np.zeros((height, width) + pixels.shape[2:], dtype=pixels.dtype)
    padded[:h, :w] = pixels
    return padded


def as_batch(images) -> list:
    """The images a processor's input holds, in order: one image, a list or tuple of images, or 4-D
    uint8 arrays (each a batch). Raises ImageError for an empty batch."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, (list, tuple)):
        batch = []
        for image in images:
            batch.extend(image if isinstance(image, np.ndarray) and image.ndim == 4 else [image])
    else:
        batch = [images]
    if not batch:
        raise ImageError("no images given: the batch is empty")
    return batch


def _size_dict(key: str, value, default_to_square: bool) -> dict:
    """A size field as one of transformers' size dicts, validated."""
    if is_int(value):
        size = {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        size = {"height": value[0], "width": value[1]}
    elif isinstance(value, dict):
        size = dict(value)
        if set(size) not in SIZE_KEY_SETS:
            raise ConfigError(f"key {key!r} has keys {sorted(size)}; expected one of "
                              + ", ".join(str(sorted(s)) for s in SIZE_KEY_SETS))
    else:
        raise ConfigError(f"key {key!r} must be an integer, a [height, width] pair or a dict, got {value!r}")
    for name, n in size.items():
        if not is_int(n) or n <= 0:
            raise ConfigError(f"key {key!r}: {name} must be a positive integer, got {n!r}")
    return size


def channel_values(key: str, value) -> tuple:
    """image_mean / image_std: one number for all channels, or one per channel."""
    if is_number(value):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(is_number(x) for x in value):
        return tuple(float(x) for x in value)
    raise ConfigError(f"key {key!r} must be a number or a list of 3 numbers (R, G, B), got {value!r}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def type_name(x) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
