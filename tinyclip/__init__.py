"""tinyclip: OpenAI's CLIP with tinygrad tensors, loading Hugging Face CLIPModel checkpoints.

    import tinyclip
    model = tinyclip.load("openai/clip-vit-base-patch32")
    logits = model.logits(["cat.jpg"], ["a photo of a cat", "a photo of a dog"])

The heavy parts (tinygrad, the model) load on first use of `load` or `CLIP`,
so `import tinyclip` stays fast for the command line.
"""
from .errors import (BackendError, CheckpointError, CheckpointNotFoundError, ConfigError, ImageError,
                     TinyClipError, TokenizerError, UsageError)

__version__ = "0.1.0"
__all__ = ["load", "CLIP", "BackendError", "CheckpointError", "CheckpointNotFoundError", "ConfigError",
           "ImageError", "TinyClipError", "TokenizerError", "UsageError",
           "__version__"]


def __getattr__(name):
    if name in ("load", "CLIP"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'tinyclip' has no attribute {name!r}")
