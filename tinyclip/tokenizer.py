"""CLIP's byte-level BPE tokenizer, id for id equal to transformers' `CLIPTokenizer`.

The pipeline, in the order transformers 5 runs it (its `CLIPTokenizer` is the
`tokenizers`-backed fast tokenizer; `models/clip/tokenization_clip.py`):

1. Added tokens (`<|startoftext|>`, `<|endoftext|>` and any other special token,
   such as a pad token `!`) are cut out of the raw text and become their ids.
   Tokens marked `normalized` are instead looked for after step 2.
2. Each remaining piece is normalized: NFC, every run of Unicode White_Space
   becomes one space, then each character is lower-cased on its own.
3. Pre-tokenization keeps the matches of CLIP's regex
   (`<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`)
   and drops the rest; GPT-2's regex then splits each match again (which only
   breaks `<|endoftext|>` into `<|` `endoftext` `|>`); each word is UTF-8
   encoded and its bytes mapped to printable symbols.
4. BPE merges each word (its last symbol carries `</w>`); symbols missing
   from the vocabulary become the unk token.
5. `<|startoftext|>` + ids + `<|endoftext|>`, truncated to `context_length`
   with eos kept last, then right-padded with the pad token.

Python's `re` has no `\\p{L}`, so the character classes are built once from
`unicodedata`. The oracle's Unicode data is not Python's: the regex engine
(oniguruma) knows Unicode 16, Rust's lower-casing Unicode 17 and the NFC tables
Unicode 9. The three small tables below pin those answers for the code points
where they differ from Python 3.11's Unicode 14 (or from a later Python's).
"""

from __future__ import annotations

import functools
import heapq
import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tinyclip import clip_bpe
from tinyclip.errors import TokenizerError
from tinyclip.jsonfile import read_json

# Classes the oracle gives to code points that are unassigned in Unicode 14
# ("first-last:class"; L letter, N number, O other). L/N entries are letters and
# numbers of Unicode 15-16 that oniguruma knows; O entries are Unicode 17
# additions that a newer Python would call letters but oniguruma does not yet.
_CLASS_OVERRIDES = """
558:O 58B-58C:O 88F:O C5C:O CDC:O 1C89-1C8A:L 208F:O 209D-209F:O A7CB-A7CD:L
A7CE-A7CF:O A7D2:O A7D4:O A7DA-A7DC:L A7DD:O A7E2:O A7F1:O AB6C-AB6D:O 105C0-105F3:L
107BB-107BF:O 10940-10959:O 10D40-10D49:N 10D4A-10D65:L 10D6F-10D85:L 10EC2-10EC4:L
10EC5-10EC7:O 10ED9-10EEE:O 1123F-11240:L 11380-11389:L 1138B:L 1138E:L
11390-113B5:L 113B7:L 113D1:L 113D3:L 116D0-116E3:N 11B0A:O 11BC0-11BE0:L
11BF0-11BF9:N 11DB0-11DDB:O 11DE0-11DE9:O 11DF1:O 11F02:L 11F04-11F10:L
11F12-11F33:L 11F50-11F59:N 1246F:O 12475-1247F:O 12550-12686:O 1342F:L
13441-13446:L 13460-143FA:L 16100-1611D:L 16130-16139:N 16D40-16D6C:L 16D70-16D79:N
16EA0-16EB8:O 16EBB-16ED3:O 16FF2-16FF6:O 187F8-187FF:O 18CD6-18CDA:O 18CFF:L
18D09-18D20:O 18D80-18DF2:O 18E00-19191:O 191A0-191D2:O 1B123-1B128:O 1B132:L
1B155:L 1B168:O 1CCF0-1CCF9:N 1D2C0-1D2D3:N 1D6A6:O 1DF1F-1DF24:O 1DF25-1DF2A:L
1DF2B-1DF81:O 1DF90-1DF96:O 1DFCD-1DFFF:O 1E030-1E06D:L 1E4D0-1E4EB:L 1E4F0-1E4F9:N
1E5D0-1E5ED:L 1E5F0:L 1E5F1-1E5FA:N 1E6C0-1E6DE:O 1E6E0-1E6E2:O 1E6E4-1E6E5:O
1E6E7-1E6ED:O 1E6F0-1E6F4:O 1E6FE-1E6FF:O 2B739:L 2B73A-2B73F:O 2B81E:O
2CEA2-2CEAD:O 2EBF0-2EE5D:L 31350-323AF:L 323B0-33479:O 3D000-3FC3F:O
"""

# Lower-case mappings of Unicode 16-17 capitals ("first-last:target": first maps
# to target, the next code point to target + 1, ...).
_LOWER_OVERRIDES = """
1C89:1C8A A7CB:264 A7CC:A7CD A7CE:A7CF A7D2:A7D3 A7D4:A7D5 A7DA:A7DB A7DC:19B
10D50-10D65:10D70 16EA0-16EB8:16EBB
"""

# Characters the oracle's NFC does not know (Unicode 10 and later combining
# marks, and the parts of Dives Akuru's one composition): to it they are plain
# starters that neither reorder nor compose, so NFC runs on the text between them.
_NFC_OPAQUE = """
5C8-5C9 7FD 897-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1AF0 1DF6-1DFA A82C
10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50
10F82-10F85 11070 1133B 113B8 113BB 113C2 113C5 113C7-113C9 113CE-113D0 1145E
11839-1183A 11930 11935 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42
11D44-11D45 11D97 11F41-11F42 1611E-16129 1612F 16D67-16D68 16FF0-16FF1 1D127-1D128
1D250-1D252 1D25B-1D25C 1D25F 1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF
1E4EC-1E4EF 1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5
"""

# Unicode's White_Space property: what both oniguruma's and Rust's `\s` match
# (Python's `\s` also matches U+001C..U+001F, which the oracle keeps).
_WHITE_SPACE = [(0x9, 0xD), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]

# No Unicode version up to 17 has letters or numbers beyond plane 3.
_LAST_LETTER_PLANE_END = 0x40000

CLEAN_MODES = ("hf", "openai")
# tokenizer_config.json's tokenizer_class values that mean CLIP's own BPE vocabulary
CLIP_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_SIGMA = "\u03a3"
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_CACHED_WORD = 256  # longer words are not cached: a cache entry per hostile megabyte word would grow without bound
# Where a long text may be cut into pieces that are cleaned and split on their own: ASCII white space,
# which every cleaning mode turns into a word break. Only the pieces a row needs are read.
_CUT = re.compile(r"[ \t\n\r\f\v]")
CHUNK_CHARS = 1024     # characters a piece holds at least (a piece ends at the first cut after that)
_SPECIAL_WORDS = {"<|startoftext|>": ["<|", "startoftext", "|>"], "<|endoftext|>": ["<|", "endoftext", "|>"]}


def _parse_ranges(table: str) -> list[tuple[int, int, str]]:
    """'A-B:x C:y' -> [(0xA, 0xB, 'x'), (0xC, 0xC, 'y')]."""
    out = []
    for item in table.split():
        span, _, value = item.partition(":")
        first, _, last = span.partition("-")
        out.append((int(first, 16), int(last or first, 16), value))
    return out


def _char_class(ranges) -> str:
    """The inside of a `re` character class for sorted, non-overlapping ranges."""
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)


def _to_ranges(code_points) -> list[tuple[int, int]]:
    out = []
    for cp in sorted(code_points):
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return [tuple(r) for r in out]


@dataclass(frozen=True)
class _Unicode:
    """Compiled patterns for the normalizer and pre-tokenizer; built once by `_unicode()`."""

    letter: re.Pattern  # \p{L} as the oracle's regex engine sees it
    number: re.Pattern  # \p{N}
    white_space: re.Pattern  # \s+
    pre_tokenizer: re.Pattern
    nfc_opaque: re.Pattern
    lower_overrides: dict[int, str]
    lower_override_chars: re.Pattern
    byte_symbols: dict[int, str]  # latin-1 code point (= byte) -> BPE alphabet symbol


@functools.cache
def _unicode() -> _Unicode:
    """The tables for any text (0.2 s to build: every code point's category up to plane 3)."""
    return _tables(_LAST_LETTER_PLANE_END)


@functools.cache
def _ascii() -> _Unicode:
    """The same tables restricted to ASCII, built in a millisecond: on an ASCII text every pattern matches
    what _unicode()'s does (a class's answer for a character depends on that character alone, and NFC
    and the lower-case overrides leave ASCII as it is), so most texts never build the full tables."""
    return _tables(0x80)


def _tables_for(text: str) -> _Unicode:
    return _ascii() if text.isascii() else _unicode()


def _tables(end: int) -> _Unicode:
    """The tables for the code points below `end`; what lies beyond is left out of every class."""
    letters, numbers = set(), set()
    everything = "".join(map(chr, range(end)))
    # Python's \w (str.isalnum) matches every L and N character (and a few
    # others), so only its runs need a category look-up: 5x faster than all.
    for run in re.finditer(r"\w+", everything):
        for offset, char in enumerate(run.group()):
            major = unicodedata.category(char)[0]
            if major == "L":
                letters.add(run.start() + offset)
            elif major == "N":
                numbers.add(run.start() + offset)
    for first, last, cls in _parse_ranges(_CLASS_OVERRIDES):
        span = range(first, min(last + 1, end))
        letters.difference_update(span)
        numbers.difference_update(span)
        if cls == "L":
            letters.update(span)
        elif cls == "N":
            numbers.update(span)
    white_space = [(a, min(b, end - 1)) for a, b in _WHITE_SPACE if a < end]
    L, N, S = _char_class(_to_ranges(letters)), _char_class(_to_ranges(numbers)), _char_class(white_space)
    # The oracle's Split regex, alternative for alternative (both engines are leftmost-first).
    pre_tokenizer = re.compile(
        rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{S}{L}{N}]+")

    lower = {}
    for first, last, target in _parse_ranges(_LOWER_OVERRIDES):
        for cp in range(first, min(last + 1, end)):
            lower[cp] = chr(int(target, 16) + cp - first)
    opaque = [(a, min(b, end - 1)) for a, b, _ in _parse_ranges(_NFC_OPAQUE) if a < end]

    # GPT-2's byte -> symbol map: printable latin-1 bytes stand for themselves,
    # the other 68 are shifted to U+0100 onwards in byte order.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) for b in printable} | {b: chr(0x100 + n) for n, b in enumerate(shifted)}
    return _Unicode(
        letter=re.compile(f"[{L}]"),
        number=re.compile(f"[{N}]"),
        white_space=re.compile(f"[{S}]+"),
        pre_tokenizer=pre_tokenizer,
        nfc_opaque=re.compile(f"([{_char_class(opaque)}])" if opaque else "((?!))"),   # (?!): nothing matches
        lower_overrides=lower,
        lower_override_chars=re.compile(f"[{_char_class(_to_ranges(lower))}]" if lower else "(?!)"),
        byte_symbols=symbols,
    )


def bpe_alphabet(word: str) -> str:
    """`word`'s UTF-8 bytes as BPE symbols (GPT-2's byte -> symbol map)."""
    return word.encode("utf-8").decode("latin-1").translate(_ascii().byte_symbols)


def _nfc(text: str) -> str:
    """NFC as the oracle computes it: characters it does not know split the text."""
    if text.isascii():
        return text
    parts = _unicode().nfc_opaque.split(text)  # odd indices: the opaque characters
    return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))


def normalize_hf(text: str) -> str:
    """transformers' CLIP normalizer: NFC, White_Space runs -> " ", per-character lower-case.

    Lower-casing is per character (Rust's `char::to_lowercase`), so a final
    capital sigma becomes "σ" where Python's `str.lower` would give "ς".
    """
    u = _tables_for(text)
    text = u.white_space.sub(" ", _nfc(text))
    text = text.replace(_SIGMA, "\u03c3").lower()
    if not text.isascii() and u.lower_override_chars.search(text):
        text = text.translate(u.lower_overrides)
    return text


def normalize_openai(text: str) -> str:
    """OpenAI's `simple_tokenizer.py` cleaning, without ftfy.

    `basic_clean` (ftfy's `fix_text`, whose last step is NFC; then
    `html.unescape` twice; strip) followed by `whitespace_clean` (Python's
    `\\s+` -> " "; strip) and Python's `str.lower`. Only the NFC step of
    ftfy is kept: its mojibake repairs are heuristics outside CLIP's training.
    """
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


_NORMALIZERS = {"hf": normalize_hf, "openai": normalize_openai}


@dataclass(frozen=True)
class AddedToken:
    """A token cut out of the text before BPE, as in transformers' `added_tokens_decoder`.

    `normalized=False` tokens are matched in the raw text, `normalized=True` ones
    in the normalized text (so `<|ENDOFTEXT|>` matches once lower-cased).
    `lstrip`/`rstrip` only swallow white space, which CLIP drops anyway, so they
    do not change any id and are accepted for completeness.
    """

    content: str
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False


def _token_splitter(contents: Sequence[str]) -> re.Pattern | None:
    """Leftmost-longest matching of literal tokens, like the oracle's Aho-Corasick automaton:
    the regex tries positions left to right and, at each, the longest token first."""
    contents = sorted({c for c in contents if c}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, contents))) if contents else None


def _split(text: str, splitter: re.Pattern | None, ids: dict[str, int]):
    """Yield (piece, None) for plain text and (token, id) for each added token found."""
    if splitter is None:
        yield text, None
        return
    start = 0
    for match in splitter.finditer(text):
        if match.start() > start:
            yield text[start:match.start()], None
        yield match.group(), ids[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:], None


class CLIPTokenizer:
    """CLIP's tokenizer, equal to `transformers.CLIPTokenizer` for every input.

    Parameters
    ----------
    vocab : dict[str, int]
        `vocab.json`: BPE symbol -> id.
    merges : list[tuple[str, str]]
        `merges.txt` without its `#version` header, highest priority first.
    bos_token, eos_token, pad_token, unk_token : str
        Special tokens; each must be in `vocab`. Their text in the input is
        cut out and mapped to their id, as transformers does.
    context_length : int
        Length of every row `__call__` returns (CLIP: 77).
    clean : {"hf", "openai"}
        "hf" (default) normalizes exactly as transformers; "openai" uses
        OpenAI's `basic_clean` + `whitespace_clean` + lower-case instead
        (HTML entities unescaped twice, text stripped), see `normalize_openai`.
    added_tokens : sequence of AddedToken
        Extra tokens to cut out of the text, or different flags for the
        special tokens (which default to `normalized=False`).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = "<|startoftext|>", eos_token: str = "<|endoftext|>",
                 pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 context_length: int = 77, clean: str = "hf", added_tokens: Sequence[AddedToken] = ()):
        if clean not in _NORMALIZERS:
            raise TokenizerError(f"clean={clean!r} is not a cleaning mode; use one of {CLEAN_MODES}")
        if not isinstance(context_length, int) or context_length < 2:
            raise TokenizerError(f"context_length={context_length!r} leaves no room for the start and end "
                                 "tokens; use an int >= 2 (CLIP uses 77)")
        self.vocab, self.context_length, self.clean = vocab, context_length, clean
        self._normalize = _NORMALIZERS[clean]

        tokens = {t: AddedToken(t) for t in (bos_token, eos_token, unk_token, pad_token)}
        tokens |= {t.content: t for t in added_tokens}
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise TokenizerError(f"special tokens {missing} are not in the vocabulary; add them to vocab.json "
                                 "or name tokens that it has (bos/eos/pad/unk_token)")
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self._token_ids = {c: vocab[c] for c in tokens}
        self._raw_tokens = _token_splitter([c for c, t in tokens.items() if not t.normalized])
        # Normalized tokens are looked for in normalized text, so their own text is normalized too.
        normalized = {c: self._normalize(c) for c, t in tokens.items() if t.normalized}
        self._normalized_ids = {n: vocab[c] for c, n in normalized.items()}
        self._normalized_tokens = _token_splitter(list(normalized.values()))
        # A text is read piece by piece (see _pieces) unless a token could span a cut.
        self._cut = None if any(_CUT.search(t) for t in [*tokens, *normalized.values()]) else _CUT

        # (left id, right id) -> (rank, merged id); a repeated pair keeps its last rank, as in tokenizers.
        self._merges = {}
        get = vocab.get
        for rank, (a, b) in enumerate(merges):
            left, right, merged = get(a), get(b), get(a + b)
            if left is None or right is None or merged is None:
                absent = [t for t in (a, b, a + b) if t not in vocab]
                raise TokenizerError(f"merge {rank + 1} ({a!r} {b!r}) needs {absent}, which vocab.json lacks; "
                                     "vocab.json and merges.txt come from different tokenizers")
            self._merges[(left, right)] = (rank, merged)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_pretrained(cls, folder: str | Path, context_length: int | None = None, *,
                        clean: str = "hf") -> CLIPTokenizer:
        """Load the tokenizer of a checkpoint folder.

        The vocabulary comes from `vocab.json` and `merges.txt`, or, when
        neither exists, from `tokenizer.json` (all that transformers 5's
        `save_pretrained` writes). Special tokens come from
        `tokenizer_config.json`, `special_tokens_map.json` and `tokenizer.json`
        when present, resolved as transformers 5 does (see `_special_tokens`).
        `context_length` defaults to the config's `model_max_length`, else 77.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"{folder} is not a folder; pass the checkpoint folder that holds vocab.json "
                                 "and merges.txt")
        config = _read_json(folder / "tokenizer_config.json") or {}
        # A folder whose tokenizer_config.json names CLIP's tokenizer but carries no vocabulary
        # files gets CLIP's BPE shipped with tinyclip (clip_bpe.py); any other tokenizer needs its files.
        shipped = isinstance(config, dict) and config.get("tokenizer_class") in CLIP_TOKENIZER_CLASSES
        tokenizer_json, vocab, merges = read_bpe(folder, shipped)
        names, added = _special_tokens(config, _read_json(folder / "special_tokens_map.json"), tokenizer_json, folder)
        if context_length is None:
            max_length = config.get("model_max_length")
            context_length = max_length if isinstance(max_length, int) and 2 <= max_length <= 1_000_000 else 77
        return cls(vocab, merges, **names, context_length=context_length, clean=clean, added_tokens=added)

    def normalize(self, text: str) -> str:
        """The normalizer alone (transformers: `backend_tokenizer.normalizer.normalize_str`)."""
        return self._normalize(text)

    def pre_tokenize(self, text: str) -> list[str]:
        """Words in the BPE alphabet (transformers: `backend_tokenizer.pre_tokenizer.pre_tokenize_str`)."""
        return list(self._words(text))

    def _words(self, text: str):
        u = _tables_for(text)
        for match in u.pre_tokenizer.finditer(text):
            # The ByteLevel step re-splits each word with GPT-2's regex; that only
            # changes the two special-token alternatives: "<|" "endoftext" "|>".
            word = match.group()
            for w in _SPECIAL_WORDS.get(word, (word,)):
                yield w.encode("utf-8").decode("latin-1").translate(u.byte_symbols)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`, without start/end tokens, truncation or padding; with `limit`, it stops
        reading the text once more than `limit` ids are known (a text longer than a row then costs
        what a row does, and `len(ids) > limit` still says it was too long)."""
        check_text(text, "the text")
        return self._encode(text, limit)

    def _pieces(self, text: str):
        """`text` in consecutive pieces of CHUNK_CHARS or more, each ending just after a cut (`_cut`).
        Cleaning a piece alone gives what cleaning the whole text gives there (nothing joins across
        white space: not NFC, not a white-space run, which only separates words, not an HTML
        entity, nor an added token), so its words and ids are those of the whole text."""
        start = 0
        while self._cut is not None and len(text) - start > CHUNK_CHARS:
            cut = self._cut.search(text, start + CHUNK_CHARS)
            if cut is None:
                break
            yield text[start:cut.end()]
            start = cut.end()
        yield text[start:] if start else text

    def _encode(self, text: str, limit: int | None) -> list[int]:
        """`encode`, stopping once more than `limit` ids are known (None: never); words are
        independent, so the first ids do not depend on what follows."""
        ids = []
        for chunk in self._pieces(text):
            for raw, token_id in _split(chunk, self._raw_tokens, self._token_ids):
                if token_id is not None:
                    ids.append(token_id)
                else:
                    for piece, token_id in _split(self._normalize(raw), self._normalized_tokens,
                                                  self._normalized_ids):
                        if token_id is not None:
                            ids.append(token_id)
                            continue
                        for word in self._words(piece):
                            ids += self._bpe(word)
                            if limit is not None and len(ids) > limit:
                                return ids
                if limit is not None and len(ids) > limit:
                    return ids
        return ids

    def __call__(self, texts: str | Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """Token ids of a batch, shape (N, context_length), int64.

        Each row is start token, ids, end token, then pad tokens. A text with
        more than `context_length - 2` ids is cut so the end token stays last
        (transformers' `truncation=True`); with `truncate=False` it is an error.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TokenizerError(f"texts must be a str or a list of str, not {type(texts).__name__}")
        if not texts:
            raise TokenizerError("texts is an empty list; pass at least one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"texts[{i}] is a {type(text).__name__}, not a str; pass text only")
        rows = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int64)
        room = self.context_length - 2
        for i, text in enumerate(texts):
            check_text(text, f"texts[{i}]")
            # With truncation only the first `room` ids are kept: stop there (a megabyte of text
            # then costs what a sentence does); without it the full count goes into the error.
            ids = self._encode(text, room if truncate else None)
            if len(ids) > room and not truncate:
                raise TokenizerError(f"texts[{i}] has {len(ids) + 2} tokens with start and end, more than "
                                     f"context_length={self.context_length}; shorten it or pass truncate=True")
            ids = [self.bos_token_id, *ids[:room], self.eos_token_id]
            rows[i, :len(ids)] = ids
        return rows

    def _bpe(self, word: str) -> list[int]:
        """Merge the symbols of one word, lowest rank first and leftmost on ties, with
        tokenizers' priority queue (`models/bpe/word.rs`, `merge_all`), stale entries and
        all: O(n log n), so a 100,000-letter word takes a fraction of a second."""
        if (ids := self._cache.get(word)) is not None:
            return ids
        vocab, unk = self.vocab, self.unk_token_id
        ids = [vocab.get(c, unk) for c in word[:-1]] + [vocab.get(word[-1] + "</w>", unk)]
        merges = self._merges
        n = len(ids)
        # A doubly linked list over the symbols; a merge keeps the left one and kills the right.
        after, before, alive = [*range(1, n), -1], [*range(-1, n - 1)], [True] * n
        queue = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((ids[i], ids[i + 1])))]
        heapq.heapify(queue)  # (rank, position of the left symbol, merged id)
        while queue:
            _, pos, new_id = heapq.heappop(queue)
            right = after[pos]
            if not alive[pos] or right == -1:
                continue
            current = merges.get((ids[pos], ids[right]))
            if current is None or current[1] != new_id:  # the pair changed since it was queued
                continue
            ids[pos], alive[right] = new_id, False
            after[pos] = nxt = after[right]
            if nxt != -1:
                before[nxt] = pos
            if (prev := before[pos]) != -1 and (m := merges.get((ids[prev], new_id))):
                heapq.heappush(queue, (m[0], prev, m[1]))
            if nxt != -1 and (m := merges.get((new_id, ids[nxt]))):
                heapq.heappush(queue, (m[0], pos, m[1]))
        ids = [t for t, keep in zip(ids, alive) if keep]
        if len(word) <= MAX_CACHED_WORD:
            if len(self._cache) > 100_000:  # bounded, like tokenizers' own word cache
                self._cache.clear()
            self._cache[word] = ids
        return ids


def check_vocab_size(tokenizer: CLIPTokenizer, vocab_size: int, folder: Path, config_file: str) -> None:
    """Refuse a checkpoint whose text embedding table (`vocab_size` rows) is smaller than its tokenizer's
    ids: the largest id would read past the table (transformers raises an IndexError there)."""
    largest = max(tokenizer.vocab.values())
    if largest >= vocab_size:
        folder = Path(folder)
        source = next((n for n in ("vocab.json", "tokenizer.json") if (folder / n).is_file()), "the tokenizer files")
        raise TokenizerError(f"{folder / config_file}: the text model has vocab_size {vocab_size}, but {folder / source} "
                             f"has token ids up to {largest}; the tokenizer and the weights come from different "
                             "checkpoints: use the tokenizer files this checkpoint was trained with")


def check_text(text: str, what: str) -> None:
    """A lone surrogate (from bytes decoded with errors="surrogateescape", or a broken UTF-16
    pair) is not text and has no UTF-8 bytes; transformers raises a TypeError for it."""
    if not text.isascii() and (bad := _SURROGATE.search(text)):
        raise TokenizerError(f"{what} holds a lone surrogate at index {bad.start()}, which is not text; "
                             "decode the bytes with errors='replace' or drop it")


def read_bpe(folder: Path, shipped_if_absent: bool = False):
    """(tokenizer.json's content or None, vocabulary, merges) of a folder: from vocab.json and merges.txt
    where either is there (missing one is then an error naming it), else from tokenizer.json; where
    there is none of the three and `shipped_if_absent`, CLIP's BPE shipped with tinyclip."""
    tokenizer_json = _read_json(folder / "tokenizer.json")
    if shipped_if_absent and tokenizer_json is None and not (folder / "vocab.json").exists() \
            and not (folder / "merges.txt").exists():
        vocab, merges = clip_bpe.vocab_and_merges()
        return None, vocab, merges
    if tokenizer_json is None or (folder / "vocab.json").exists() or (folder / "merges.txt").exists():
        return tokenizer_json, _read_vocab(folder / "vocab.json"), _read_merges(folder / "merges.txt")
    return (tokenizer_json, *_bpe_from_tokenizer_json(tokenizer_json, folder / "tokenizer.json"))


def _read_json(path: Path):
    """Parsed JSON, or None when the file does not exist."""
    if not path.is_file():
        return None
    return read_json(path, TokenizerError, advice="restore it from the checkpoint")


def _missing(path: Path) -> TokenizerError:
    return TokenizerError(f"{path} is missing; a CLIP tokenizer needs vocab.json and merges.txt (or a "
                          "tokenizer.json) from the checkpoint")


def _check_vocab(vocab, where) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(type(i) is int and i >= 0 for i in vocab.values()):
        raise TokenizerError(f"{where} must map each token (str) to an id (int >= 0); "
                             "restore it from the checkpoint")
    return vocab


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise _missing(path)
    return _check_vocab(_read_json(path), path)


def _bpe_from_tokenizer_json(tokenizer_json, path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges from a `tokenizer.json`, whose merges are "a b" strings or [a, b] pairs."""
    model = tokenizer_json.get("model") if isinstance(tokenizer_json, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise TokenizerError(f"{path} holds no BPE model; a CLIP tokenizer needs vocab.json and merges.txt")
    merges = []
    for number, merge in enumerate(model.get("merges") or [], start=1):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise TokenizerError(f"{path} model.merges entry {number} is {merge!r}, not two symbols; "
                                 "restore the file from the checkpoint")
        merges.append((parts[0], parts[1]))
    return _check_vocab(model.get("vocab"), f"{path} model.vocab"), merges


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt as tokenizers reads it: `#version` lines skipped, every other line "a b"."""
    if not path.is_file():
        raise _missing(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text ({e}); restore it from the checkpoint") from e
    except OSError as e:
        raise TokenizerError(f"{path} cannot be read ({e.strerror or e})") from None
    if lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, start=1):
        parts = line.split(" ")
        if len(parts) == 2 and not parts[1].endswith("\r") and not parts[0].startswith("#version"):   # most lines
            merges.append((parts[0], parts[1]))
            continue
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path} line {number} is {line!r}, not two symbols separated by one space; "
                                 "restore the file from the checkpoint")
        merges.append((parts[0], parts[1]))
    return merges


def _added_token(value, where: str, special: bool = True) -> AddedToken:
    """An AddedToken from a config value: a str, or a dict as transformers saves it
    (whose `normalized` defaults to `not special`, as in tokenizers)."""
    if isinstance(value, str):
        return AddedToken(value)
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise TokenizerError(f"{where}: {value!r} is not a token (a str or a dict with 'content')")
    if value.get("single_word"):
        raise TokenizerError(f"{where}: token {value['content']!r} sets single_word, which tinyclip does not "
                             "support (no CLIP checkpoint uses it); set it to false")
    return AddedToken(value["content"], bool(value.get("normalized", not value.get("special", special))),
                      bool(value.get("lstrip")), bool(value.get("rstrip")))


def _special_tokens(config: dict, special_map: dict | None, tokenizer_json: dict | None, folder: Path):
    """(bos/eos/pad/unk_token names, added tokens with their flags), as transformers 5 resolves them.

    `tokenizer_config.json` is the base. Without an `added_tokens_decoder` in it,
    `special_tokens_map.json` overrides its entries and `tokenizer.json`'s
    `added_tokens` supply the flags; a named token whose text is one of those
    added tokens takes that token's flags. transformers then adds the added
    tokens, then the named ones in the order bos, eos, unk, sep, pad, cls, mask
    (a plain string as `normalized=False`); for a text seen twice the last wins.
    (`tokenization_utils_base.py`, `_from_pretrained`; `tokenization_utils_tokenizers.py`, `_post_init`.)
    """
    if not isinstance(config, dict):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'} must hold a JSON object")
    config = dict(config)
    decoder = config.get("added_tokens_decoder")
    where = str(folder / "tokenizer_config.json")
    if decoder is None:
        decoder = {}
        if isinstance(special_map, dict):
            config |= special_map
            where = f"{where} / special_tokens_map.json"
        if isinstance(tokenizer_json, dict):
            decoder = {t.get("id", i): t for i, t in enumerate(tokenizer_json.get("added_tokens") or [])}
    if not isinstance(decoder, dict) or not all(str(k).isdigit() for k in decoder):
        raise TokenizerError(f"{where}: added_tokens_decoder must map ids to tokens; restore it from the checkpoint")
    known = [_added_token(decoder[k], where, special=False) for k in sorted(decoder, key=int)]
    by_text = {t.content: t for t in known}
    resolved = {t.content: t for t in known}
    names = {}
    for name in _SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if value is None:
            continue
        token = _added_token(value, f"{where} {name}")
        token = by_text.get(token.content, token)
        resolved[token.content] = token  # the last addition of a text sets its flags
        if name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            names[name] = token.content
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    for value in extra.values() if isinstance(extra, dict) else extra:
        token = _added_token(value, f"{where} extra_special_tokens")
        resolved[token.content] = by_text.get(token.content, token)
    return names, list(resolved.values())
