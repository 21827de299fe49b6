"""open_clip's hub layout: `open_clip_config.json` (model_cfg and preprocess_cfg) and
`open_clip_model.safetensors`, with CLIP's BPE vocabulary from the folder where it carries one,
else the copy shipped with tinyclip (as open_clip uses the copy inside its own package).

config.py reads the config, weights.py maps and reads the weights, tokenizer.py and
preprocess.py are open_clip's tokenizer and evaluation transform.
"""
from __future__ import annotations

import pathlib

from ...jsonfile import read_json
from ...errors import ConfigError
from .. import Checkpoint
from . import config as _config, weights as _weights
from .config import CONFIG_FILE, WEIGHTS_FILE
from .preprocess import OpenClipImageProcessor
from .tokenizer import OpenClipTokenizer

__all__ = ["OpenClipCheckpoint", "OpenClipImageProcessor", "OpenClipTokenizer", "CONFIG_FILE", "WEIGHTS_FILE"]


class OpenClipCheckpoint(Checkpoint):
    format = "open_clip"

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.config_file = self.folder / CONFIG_FILE
        self.spec = _config.read_config(self.folder)
        self.config = self.spec.config

    @classmethod
    def claims(cls, folder: pathlib.Path) -> bool:
        """An open_clip config, and no transformers config.json beside it (a repository with both is
        read as the transformers checkpoint). timm's repositories carry open_clip's files beside a
        config.json of timm's own (an "architecture" and no "model_type"), which is not transformers'."""
        if not (folder / CONFIG_FILE).is_file():
            return False
        other = folder / "config.json"
        if not other.is_file():
            return True
        d = read_json(other, ConfigError)
        return isinstance(d, dict) and "architecture" in d and "model_type" not in d

    def weight_files(self) -> list[pathlib.Path]:
        return [_weights.weights_file(self.folder)]

    def load_weights(self, model, dtype, device: str, only=None, checked=None) -> None:
        _weights.load_weights(model, self.folder, dtype, device, only, checked)

    def tokenizer(self) -> OpenClipTokenizer:
        return OpenClipTokenizer.from_pretrained(self.folder,
                                                 context_length=self.config.text_config.max_position_embeddings)

    def image_processor(self) -> OpenClipImageProcessor:
        return OpenClipImageProcessor.from_dict(self.spec.preprocess, f"{self.config_file} preprocess_cfg")
