"""--max-pixels, the option of every command that reads image files (classify, embed, search).

Pillow refuses to decode an image of more than PIL.Image.MAX_IMAGE_PIXELS pixels (its guard against
decompression bombs, 89,478,485 by default) and tinyclip refuses it before decoding; a large
panorama or a 144-megapixel photo is over it. The option sets that limit for the command.
"""
from __future__ import annotations

import warnings

from ..errors import UsageError


def add(p) -> None:
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="read images of up to N pixels (width x height; default: Pillow's guard against "
                        "decompression bombs, 89,478,485); 0 switches the limit off for files you trust")


def apply(args) -> None:
    """Set Pillow's limit from --max-pixels (checked first), and show Pillow's own warning about a
    large image once per run: tinyclip refuses or reads such a file with a message of its own."""
    from PIL import Image
    warnings.filterwarnings("once", category=Image.DecompressionBombWarning)
    if args.max_pixels is None:
        return
    if args.max_pixels < 0:
        raise UsageError(f"--max-pixels must be 0 (no limit) or a positive number of pixels, got {args.max_pixels}")
    Image.MAX_IMAGE_PIXELS = args.max_pixels or None
