"""open_clip's evaluation image transform, without torch (see `OpenClipImageProcessor`).

Inputs and errors are those of tinyclip's `ImageProcessor`; the crops feed the same device-side
scaling (`PixelScaling`). Reference: open_clip 3.3.0 `transform.py`, torchvision's `Resize` and
`CenterCrop`.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from ...errors import ConfigError, ImageError
from ...preprocess import (CHANNEL_COUNTS, DEFAULT_IMAGE_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PixelScaling,
                           as_batch, channel_values, is_int, is_number, load_image, type_name)

OPENCLIP_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
OPENCLIP_RESIZE_MODES = ("shortest", "longest", "squash")
OPENCLIP_DEFAULTS = {"size": DEFAULT_IMAGE_SIZE, "mode": "RGB", "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
                     "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


class OpenClipImageProcessor:
    """open_clip's evaluation transform (`transform.py`, `image_transform(..., is_train=False)`)
    without torch: what `create_model_and_transforms(...)[2]` does to an image.

    The steps run in open_clip's order, in the image's own PIL mode until the conversion:

    - resize (Pillow, `interpolation`): `shortest` side to `size` (torchvision's Resize, long side
      truncated), `longest` side to `size` (timm's ResizeKeepRatio, both sides rounded), or
      `squash` to size x size;
    - center crop to size x size (`shortest`), or pad with `fill_color` and crop (`longest`);
      torchvision puts the crop at round((H - size) / 2) with Python's round (half to even);
    - convert to RGB (an alpha band is dropped, not composited), divide by 255 and normalize
      with `mean` and `std` in float32.

    Parameters take open_clip's `preprocess_cfg` names. Inputs are those of `ImageProcessor`;
    a uint8 array becomes the PIL image of its channels (L, RGB or RGBA) first.
    """

    def __init__(self, *, size=None, mode=None, mean=None, std=None, interpolation=None, resize_mode=None,
                 fill_color=None):
        given = dict(size=size, mode=mode, mean=mean, std=std, interpolation=interpolation,
                     resize_mode=resize_mode, fill_color=fill_color)
        v = {k: OPENCLIP_DEFAULTS[k] if given[k] is None else given[k] for k in OPENCLIP_DEFAULTS}
        if isinstance(v["size"], (list, tuple)) and len(v["size"]) == 2 and v["size"][0] == v["size"][1]:
            v["size"] = v["size"][0]
        if not is_int(v["size"]) or v["size"] <= 0:
            raise ConfigError(f"key 'size' must be a positive integer (a square), got {v['size']!r}")
        if v["mode"] != "RGB":
            raise ConfigError(f"key 'mode' must be 'RGB' (open_clip's only mode), got {v['mode']!r}")
        if v["interpolation"] not in OPENCLIP_INTERPOLATIONS:
            raise ConfigError(f"key 'interpolation' must be one of {', '.join(OPENCLIP_INTERPOLATIONS)} for "
                              f"evaluation, got {v['interpolation']!r}")
        if v["resize_mode"] not in OPENCLIP_RESIZE_MODES:
            raise ConfigError(f"key 'resize_mode' must be one of {', '.join(OPENCLIP_RESIZE_MODES)}, "
                              f"got {v['resize_mode']!r}")
        if not is_int(v["fill_color"]) or not 0 <= v["fill_color"] <= 255:
            raise ConfigError(f"key 'fill_color' must be an integer 0-255, got {v['fill_color']!r}")
        # open_clip repeats a single mean or std number over the three channels
        for key in ("mean", "std"):
            if is_number(v[key]):
                v[key] = (v[key],) * 3
        self.size, self.interpolation, self.resize_mode = int(v["size"]), v["interpolation"], v["resize_mode"]
        self.fill_color = int(v["fill_color"])
        self.image_mean, self.image_std = channel_values("mean", v["mean"]), channel_values("std", v["std"])
        if 0 in self.image_std:
            raise ConfigError(f"key 'std' must not contain 0, got {list(self.image_std)}")

    @classmethod
    def from_dict(cls, config: dict, source: str = "preprocess_cfg") -> "OpenClipImageProcessor":
        """From open_clip's `preprocess_cfg`; unknown keys are errors, as open_clip's merge drops them
        silently and a misspelt setting would otherwise change nothing unnoticed."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source} must be a JSON object, got {type_name(config)}")
        unknown = sorted(set(config) - set(OPENCLIP_DEFAULTS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; open_clip's "
                              f"preprocess_cfg has {', '.join(OPENCLIP_DEFAULTS)}")
        try:
            return cls(**config)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """The resolved settings under open_clip's preprocess_cfg names."""
        return {"size": self.size, "mode": "RGB", "mean": list(self.image_mean), "std": list(self.image_std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode, "fill_color": self.fill_color}

    def __repr__(self) -> str:
        return f"OpenClipImageProcessor({self.to_dict()})"

    def resized(self, image_size: int) -> "OpenClipImageProcessor":
        """This transform for N x N crops (load(image_size=N)), as open_clip builds it for a model whose
        image_size is N."""
        return OpenClipImageProcessor(**{**self.to_dict(), "size": image_size})

    def __call__(self, images) -> np.ndarray:
        """Pixel values (N, 3, size, size) float32."""
        return np.stack([self._process(self._pil(image, i), i) for i, image in enumerate(as_batch(images))])

    def _pil(self, image, i: int) -> Image.Image:
        if isinstance(image, (str, os.PathLike)):
            try:
                return load_image(image)
            except ImageError as e:
                raise ImageError(f"image {i}: {e}") from None
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            # The channel guess and checks of ImageProcessor, without its alpha compositing.
            if image.dtype != np.uint8:
                raise ImageError(f"image {i} is an array of dtype {image.dtype} and shape {image.shape}; tinyclip "
                                 "takes uint8 arrays with values 0-255")
            hwc = image[:, :, None] if image.ndim == 2 else image
            if image.ndim == 3 and image.shape[0] in CHANNEL_COUNTS:
                hwc = image.transpose(1, 2, 0)
            if hwc.ndim != 3 or hwc.shape[2] not in CHANNEL_COUNTS:
                raise ImageError(f"image {i} is an array of shape {image.shape}; expected (H, W, C), (C, H, W) "
                                 "or (H, W) with C in 1, 3, 4")
            if 0 in hwc.shape:
                raise ImageError(f"image {i} is empty: {hwc.shape[1]}x{hwc.shape[0]} pixels")
            hwc = np.ascontiguousarray(hwc)
            return Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, {3: "RGB", 4: "RGBA"}.get(hwc.shape[2]))
        raise ImageError(f"image {i} has unsupported type {type_name(image)}; pass a PIL.Image.Image, a file "
                         "path (str or pathlib.Path) or a uint8 numpy array (H, W, 3)")

    def crop(self, image, i: int = 0) -> np.ndarray:
        """One image through the steps before the float ones (resize, crop, RGB conversion):
        (size, size, 3) uint8, which `scaling()` turns into this processor's pixel values. `i` is
        the image's place in its batch, for error messages (the errors are those of __call__)."""
        return self._crop(self._pil(image, i), i)

    def crop_shape(self) -> tuple[int, int]:
        """(height, width) of every crop."""
        return self.size, self.size

    def scaling(self) -> PixelScaling:
        """The float steps after `crop` (divide by 255, normalize), to run on the device."""
        return PixelScaling(scale=1 / 255, mean=self.image_mean, std=self.image_std)

    def _process(self, image: Image.Image, i: int) -> np.ndarray:
        pixels = self._crop(image, i)
        # torchvision's to_tensor (uint8 / 255) and Normalize, in float32
        x = pixels.astype(np.float32) / np.float32(255)
        x = (x - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return x.transpose(2, 0, 1)   # (H, W, 3) -> (3, H, W)

    def _crop(self, image: Image.Image, i: int) -> np.ndarray:
        """resize -> crop (or pad and crop) -> RGB, as (size, size, 3) uint8."""
        width, height = image.size
        if width == 0 or height == 0:
            raise ImageError(f"image {i} is empty: {width}x{height} pixels")
        s = self.size
        if self.resize_mode == "squash":
            new_h, new_w = s, s
        elif self.resize_mode == "longest":
            ratio = max(height / s, width / s)
            new_h, new_w = round(height / ratio), round(width / ratio)
        elif width <= height:     # torchvision's _compute_resized_output_size
            new_h, new_w = int(s * height / width), s
        else:
            new_h, new_w = s, int(s * width / height)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and new_h * new_w > limit:
            raise ImageError(f"image {i} ({width}x{height}) would be resized to {new_w}x{new_h}, more than "
                             f"PIL.Image.MAX_IMAGE_PIXELS = {limit:,} pixels; crop it to a less extreme aspect "
                             "ratio first, or raise the limit if you have the memory")
        try:
            if (new_h, new_w) != (height, width):
                image = image.resize((new_w, new_h), resample=OPENCLIP_INTERPOLATIONS[self.interpolation])
            if self.resize_mode != "squash":
                image = _openclip_center_crop(image, s, self.fill_color if self.resize_mode == "longest" else 0)
            pixels = np.asarray(image.convert("RGB"))
        except ImageError:
            raise
        except Exception as e:   # a lazily opened file that fails to decode, or a mode Pillow cannot convert
            raise ImageError(f"image {i} (PIL mode {image.mode}, {width}x{height}) cannot be decoded, resized or "
                             f"converted to RGB: {type(e).__name__}: {e}") from None
        return pixels


def _openclip_center_crop(image: Image.Image, size: int, fill: int) -> Image.Image:
    """torchvision's center_crop (and open_clip's center_crop_or_pad): pad a side shorter than the crop
    with `fill`, the odd pixel going right/bottom, then crop at round((side - size) / 2)."""
    width, height = image.size
    if size > width or size > height:
        left, top = max(size - width, 0) // 2, max(size - height, 0) // 2
        right, bottom = max(size - width + 1, 0) // 2, max(size - height + 1, 0) // 2
        bands = len(image.getbands())
        color = fill if bands == 1 or image.mode == "P" else (fill,) * bands
        palette = image.getpalette() if image.mode == "P" else None
        image = ImageOps.expand(image, border=(left, top, right, bottom), fill=color)
        if palette is not None:
            image.putpalette(palette)
        width, height = image.size
        if (width, height) == (size, size):
            return image
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))
