"""Checkpoint formats: the one place that knows what a checkpoint folder is.

`open(folder)` looks at the folder and returns a `Checkpoint` of its format, which supplies
everything tinyclip needs from it: the model config, the weights (read strictly through
weights.py), the tokenizer, the image processor, and the files that identify it (identity.py).
`api.load`, `identity`, the Ray engine and validate.py all go through it.

One module per format: `huggingface` (transformers' CLIPModel folders) and `open_clip`
(open_clip's hub layout). A new format is one new module with a `Checkpoint` subclass and its
`claims(folder)` rule, listed in FORMATS.
"""
from __future__ import annotations

import pathlib

from ..config import CLIPConfig


class Checkpoint:
    """A checkpoint folder in tinyclip's terms. Subclasses set `format`, `folder`, `config` and
    `config_file` (the file whose content, with `weight_files()`, identifies the checkpoint)."""

    format: str
    folder: pathlib.Path
    config: CLIPConfig
    config_file: pathlib.Path

    @classmethod
    def claims(cls, folder: pathlib.Path) -> bool:
        """Whether `folder` is a checkpoint of this format."""
        raise NotImplementedError

    def weight_files(self) -> list[pathlib.Path]:
        """The safetensors files the weights are read from (checked to lie inside the checkpoint)."""
        raise NotImplementedError

    def load_weights(self, model, dtype, device: str, only=None, checked=None) -> None:
        """Fill `model` (a tinyclip CLIPModel built from `config`) after checking every key and shape; only
        the parameters whose state-dict key `only(key)` accepts when it is given, checking the shapes of
        those `checked(key)` accepts (default: those read)."""
        raise NotImplementedError

    def tokenizer(self):
        """The tokenizer, rows of text_config.max_position_embeddings ids."""
        raise NotImplementedError

    def image_processor(self):
        """The image processor, crops of vision_config.image_size."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.format} checkpoint {self.folder}>"


def open(folder: str | pathlib.Path) -> Checkpoint:   # noqa: A001 (the module's verb, as gzip.open)
    """The checkpoint in `folder`, of the first format in FORMATS that claims it; a folder no
    format claims is read as a Hugging Face folder, whose errors say what it lacks."""
    folder = pathlib.Path(folder)
    for fmt in FORMATS:
        if fmt.claims(folder):
            return fmt(folder)
    return HuggingFaceCheckpoint(folder)


from .huggingface import HuggingFaceCheckpoint   # noqa: E402 (the formats import Checkpoint above)
from .open_clip import OpenClipCheckpoint        # noqa: E402

# open_clip first: a timm repository carries open_clip's files beside a config.json that is timm's.
FORMATS: tuple[type[Checkpoint], ...] = (OpenClipCheckpoint, HuggingFaceCheckpoint)
