"""Hugging Face `CLIPModel` folders: config.json, model.safetensors (or shards), the tokenizer's
files and preprocessor_config.json, as transformers' save_pretrained writes them."""
from __future__ import annotations

import pathlib

from .. import weights
from ..config import CLIPConfig
from ..preprocess import ImageProcessor
from ..tokenizer import CLIPTokenizer
from . import Checkpoint

CONFIG_FILE = "config.json"


class HuggingFaceCheckpoint(Checkpoint):
    format = "huggingface"

    def __init__(self, folder: pathlib.Path):
        self.folder = pathlib.Path(folder)
        self.config_file = self.folder / CONFIG_FILE
        self.config = CLIPConfig.from_file(self.config_file)

    @classmethod
    def claims(cls, folder: pathlib.Path) -> bool:
        return (folder / CONFIG_FILE).is_file()

    def weight_files(self) -> list[pathlib.Path]:
        return weights.checkpoint_files(self.folder)

    def load_weights(self, model, dtype, device: str, only=None, checked=None) -> None:
        weights.load_weights(model, self.folder, dtype, device, only, checked)

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(self.folder, context_length=self.config.text_config.max_position_embeddings)

    def image_processor(self) -> ImageProcessor:
        return ImageProcessor.from_pretrained(self.folder, image_size=self.config.vision_config.image_size)
