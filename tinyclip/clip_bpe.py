"""CLIP's BPE vocabulary, as shipped inside the package (`data/bpe_simple_vocab_16e6.txt.gz`).

open_clip ships this file and builds its tokenizer from it, so an open_clip checkpoint saved by
open_clip's own tools carries no `vocab.json` or `merges.txt`. The vocabulary and merges derived
here are id for id those of every `openai/clip-vit-*` repository's `vocab.json` and `merges.txt`
(the derivation is open_clip's `SimpleTokenizer.__init__`; data/README.md describes it).
"""
from __future__ import annotations

import functools
import gzip
import pathlib

from .errors import TokenizerError

BPE_FILE = pathlib.Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894                  # lines 2..48895; the rest of the file were never used by CLIP
VOCAB_SIZE = 49_408
START, END = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in vocabulary order: printable latin-1 bytes as themselves, then the
    other 68 shifted to U+0100 onwards (GPT-2's bytes_to_unicode, its values in its order)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(0x100 + n) for n in range(len(shifted))]


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab.json, merges.txt without its header) of CLIP's tokenizer, read from the shipped file."""
    try:
        with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:N_MERGES + 1]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{BPE_FILE}: cannot read CLIP's BPE vocabulary shipped with tinyclip ({e}); "
                             "reinstall tinyclip") from None
    merges = tuple(tuple(line.split()) for line in lines)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges) or len(vocab) != VOCAB_SIZE:
        raise TokenizerError(f"{BPE_FILE}: is not CLIP's BPE vocabulary ({len(merges)} merges, {len(vocab)} "
                             "tokens); reinstall tinyclip")
    return vocab, merges
