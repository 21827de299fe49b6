"""open_clip's tokenizer (`SimpleTokenizer`, clean='lower'), id for id, on CLIP's BPE.

The BPE itself is tinyclip's (`tinyclip.tokenizer.CLIPTokenizer`); what differs is the cleaning,
the split regex, the start and end tokens' text and the padding.
Reference: open_clip 3.3.0, `tokenizer.py`.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

from ...tokenizer import CLIPTokenizer, bpe_alphabet, read_bpe

# open_clip's SimpleTokenizer names its start and end tokens differently from transformers'
# vocab.json (same ids); its split regex matches them before anything else.
OPENCLIP_START, OPENCLIP_END = "<start_of_text>", "<end_of_text>"
_OPENCLIP_PATTERN = (rf"{OPENCLIP_START}|{OPENCLIP_END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|"
                     r"[^\s\p{L}\p{N}]+")


def normalize_openclip(text: str, after_lt: bool = False) -> str:
    """open_clip's `clean='lower'`: ftfy's `fix_text`, `html.unescape` twice, strip, white space
    runs (str.split) -> " ", lower-case (`tokenizer.py`, `_clean_lower`).

    `after_lt`: `text` continues a text whose earlier lines hold a "<" (ftfy stops unescaping HTML
    for the rest of a text from the first line that holds one)."""
    import ftfy   # a declared dependency, imported here as only open_clip checkpoints need it

    text = html.unescape(html.unescape(ftfy.fix_text(text, unescape_html=False if after_lt else "auto"))).strip()
    return " ".join(text.split()).strip().lower()


class OpenClipTokenizer(CLIPTokenizer):
    """open_clip's `SimpleTokenizer` (clean='lower'), id for id, on CLIP's BPE.

    It differs from transformers' CLIPTokenizer in its cleaning (`normalize_openclip`),
    its split regex (the `regex` package's `\\p{L}`, case-insensitive, with the literal
    `<start_of_text>` / `<end_of_text>` as the start and end ids), and its padding: id 0.
    Nothing is cut out of the raw text: `<|endoftext|>` in a text is BPE-encoded as text.
    The BPE merges are the same (lowest rank first; see `CLIPTokenizer._bpe`).

    Parameters
    ----------
    vocab, merges : CLIP's `vocab.json` and `merges.txt` (open_clip's bpe_simple_vocab_16e6).
    context_length : int
        Row length (open_clip: text_cfg.context_length).
    """

    PAD_ID = 0   # open_clip pads with zeros, which is also the id of "!"

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, context_length: int = 77):
        super().__init__(vocab, merges, context_length=context_length)
        import regex   # a declared dependency; its Unicode tables are open_clip's own

        self.clean = "openclip"
        self._normalize = normalize_openclip
        self.pad_token_id = self.PAD_ID
        self._pattern = regex.compile(_OPENCLIP_PATTERN, regex.IGNORECASE)
        self._special_words = {OPENCLIP_START: self.bos_token_id, OPENCLIP_END: self.eos_token_id}
        # ftfy's fix_text repairs each line on its own (it splits the text after each "\n"), so a
        # text is cut into pieces only there: its mojibake repairs may span a space.
        self._cut = re.compile("\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, context_length: int | None = None, **_) -> "OpenClipTokenizer":
        """CLIP's BPE from the folder's `vocab.json` and `merges.txt` (or `tokenizer.json`), as
        open_clip repositories on the hub carry them, else CLIP's BPE shipped with tinyclip; start
        and end ids are those of `<|startoftext|>` and `<|endoftext|>` there."""
        folder = Path(folder)
        # open_clip builds this tokenizer from CLIP's BPE inside its package and saves no vocabulary
        # files beside the checkpoint; tinyclip ships the same file (clip_bpe.py).
        _, vocab, merges = read_bpe(folder, shipped_if_absent=True)
        return cls(vocab, merges, context_length=77 if context_length is None else context_length)

    def pre_tokenize(self, text: str) -> list[str]:
        return [bpe_alphabet(w) for w in self._pattern.findall(text)]

    def _encode(self, text: str, limit: int | None) -> list[int]:
        ids = []
        after_lt = False
        for chunk in self._pieces(text):
            for word in self._pattern.findall(self._normalize(chunk, after_lt)):
                special = self._special_words.get(word)
                if special is not None:
                    ids.append(special)
                else:
                    ids += self._bpe(bpe_alphabet(word))
                if limit is not None and len(ids) > limit:
                    return ids
            after_lt = after_lt or "<" in chunk
        return ids
