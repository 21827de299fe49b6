"""The real CLIP vocabulary as Hugging Face files, built offline for tests.

`data/clip-bpe/bpe_simple_vocab_16e6.txt.gz` is OpenAI's merge list (see the
README beside it). Every `openai/clip-vit-*` checkpoint's `vocab.json` and
`merges.txt` derive from it as that README describes; `write_clip_vocab`
rebuilds them so tests can load tinyclip and the transformers oracle on the
same 49,408-token vocabulary without a download.
"""

import functools
import gzip
import json
from pathlib import Path

BPE_FILE = Path(__file__).parent / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 48_894  # lines 2..48895 of the gz file; the rest were never used by CLIP
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in OpenAI's order (printable bytes keep their
    own character, the rest are shifted to U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as in openai/clip-vit-base-patch32."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    assert all(len(m) == 2 for m in merges), "corrupt bpe_simple_vocab_16e6.txt.gz"
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49_408, "duplicate tokens: corrupt bpe_simple_vocab_16e6.txt.gz"
    return vocab, merges


@functools.lru_cache(maxsize=1)
def _file_texts() -> tuple[str, str]:
    vocab, merges = clip_vocab()
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def write_clip_vocab(folder) -> None:
    """Write `vocab.json` and `merges.txt` of the real CLIP tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = _file_texts()
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
