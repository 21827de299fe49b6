"""Request bodies read with a size limit, and uploaded images decoded with a pixel limit.

The pixel limit is checked on the size in the image's header, before any pixel is decoded, so a
small file that would decode to gigabytes (a decompression bomb) costs nothing.
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..preprocess import load_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024       # a large phone photo is 5-15 MB
MAX_UPLOAD_PIXELS = 40_000_000            # 8000 x 5000; decoded RGB that is 120 MB


class UploadError(Exception):
    """A request the server refuses: `status` (400, 413, 415) and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"the upload is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(413, f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """An uploaded file as an upright RGB image, exactly as `load_image` opens a file on disk."""
    if not data:
        raise UploadError(400, "the upload is empty: choose an image file")
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UploadError(413, f"the image has more than {max_pixels:,} pixels, the limit") from None
    except (UnidentifiedImageError, OSError):
        raise UploadError(400, "not an image this server can read (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except Exception as e:      # a damaged header can trip a format plugin (ValueError, EOFError, ...)
        raise UploadError(400, f"not an image this server can read (damaged header: {type(e).__name__})") from None
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise UploadError(413, f"the image is {width}x{height} = {width * height:,} pixels, over the limit of "
                                   f"{max_pixels:,}")
        try:
            opened.load()
        except Exception as e:     # Pillow reports corrupt data with many exception types
            raise UploadError(400, f"the image is truncated or corrupt ({type(e).__name__})") from None
        try:
            return load_image(opened)
        except Exception as e:
            raise UploadError(400, f"the image cannot be converted to RGB ({type(e).__name__})") from None
