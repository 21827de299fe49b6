"""The real CLIP vocabulary as Hugging Face files, built offline for tests.

`tinyclip/data/bpe_simple_vocab_16e6.txt.gz` is OpenAI's merge list (see the
README beside it). Every `openai/clip-vit-*` checkpoint's `vocab.json` and
`merges.txt` derive from it as that README describes; `write_clip_vocab`
rebuilds them so tests can load tinyclip and the transformers oracle on the
same 49,408-token vocabulary without a download.
"""

import contextlib
import functools
import gzip
import json
from pathlib import Path

BPE_FILE = Path(__file__).parent.parent / "tinyclip" / "data" / "bpe_simple_vocab_16e6.txt.gz"
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


class _CountingMerges(dict):
    """The tokenizer's merge table, counting its look-ups: each is one step of BPE work."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


@contextlib.contextmanager
def bpe_work(tokenizer):
    """Count the BPE work a real tinyclip CLIPTokenizer does inside the block: yields a dict whose
    "lookups" (merge-table look-ups) and "words" (words given to BPE) are filled in on exit.

    Counts, unlike timings, do not depend on the machine: a quadratic merge loop or a tokenizer
    that reads on past the truncation point shows as more work on any computer."""
    counts = {"lookups": 0, "words": 0}
    merges, bpe = tokenizer._merges, tokenizer._bpe
    counting = _CountingMerges(merges)

    def counted_bpe(word):
        counts["words"] += 1
        return bpe(word)

    tokenizer._merges, tokenizer._bpe = counting, counted_bpe
    try:
        yield counts
    finally:
        tokenizer._merges = merges
        del tokenizer._bpe        # the instance attribute; the method shows through again
        counts["lookups"] = counting.lookups
