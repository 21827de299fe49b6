"""tinyclip's CLIP tokenizer against the oracle, transformers' `CLIPTokenizer`,
on the real 49,408-token CLIP vocabulary (rebuilt offline by `tests.bpe`).

The oracle call is the one CLIP pipelines make:
`tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]`.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bpe import BOS, EOS, bpe_work, clip_vocab, write_clip_vocab
from tinyclip.errors import TokenizerError
from tinyclip.tokenizer import CLIPTokenizer, _ascii, _unicode

CONTEXT_LENGTH = 77
BOS_ID, EOS_ID, BANG_ID = 49406, 49407, 0  # "!" is id 0: the first byte symbol
CORPUS_FILE = Path(__file__).parent / "data" / "text_corpus.json"


def hand_written_texts() -> list[str]:
    return [text for group in json.loads(CORPUS_FILE.read_text(encoding="utf-8")).values() for text in group]


def generated_texts(count: int = 150, seed: int = 0) -> list[str]:
    """Deterministic mixes of corpus fragments, separators and case changes."""
    rng = random.Random(seed)
    fragments = sorted({w for text in hand_written_texts() for w in text.split(" ") if w})
    fragments += [BOS, EOS, "'s", "'LL", "’t", "\u0301", "\u00a0", "&amp;", "!", "9", "🏽", "\u200d", "Σ"]
    separators = [" ", "", "  ", "\t", "\n", "\u3000", "-", "'", ".", "!"]
    texts = []
    for _ in range(count):
        words = [rng.choice(fragments) for _ in range(rng.randint(1, 40))]
        words = [w.upper() if rng.random() < 0.2 else w for w in words]
        texts.append("".join(w + rng.choice(separators) for w in words))
    return texts


CORPUS = hand_written_texts() + generated_texts()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip-vocab")
    write_clip_vocab(folder)
    return folder


@pytest.fixture(scope="module")
def ours(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_folder)


@pytest.fixture(scope="module")
def oracle(clip_folder):
    return transformers.CLIPTokenizer(str(clip_folder / "vocab.json"), str(clip_folder / "merges.txt"))


def oracle_ids(oracle, texts, max_length=CONTEXT_LENGTH) -> np.ndarray:
    out = oracle(texts, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    return np.asarray(out, dtype=np.int64)


def assert_same_ids(texts, ours_ids: np.ndarray, oracle_ids: np.ndarray):
    assert ours_ids.shape == oracle_ids.shape and ours_ids.dtype == np.int64
    wrong = [i for i in range(len(texts)) if not np.array_equal(ours_ids[i], oracle_ids[i])]
    details = [f"{texts[i]!r}:\n  ours   {ours_ids[i].tolist()}\n  oracle {oracle_ids[i].tolist()}" for i in wrong[:5]]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, e.g.\n" + "\n".join(details)


def folder_with(base: Path, target: Path, **files) -> Path:
    """A copy of the vocabulary folder plus JSON files (keyword = file name, dots as '_')."""
    target.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (target / name).write_bytes((base / name).read_bytes())
    for name, content in files.items():
        (target / name.replace("_json", ".json")).write_text(json.dumps(content), encoding="utf-8")
    return target


def token(content, normalized, **flags):
    """A token as transformers writes it in tokenizer_config.json / special_tokens_map.json."""
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, **flags}


# --- the vocabulary files ---------------------------------------------------


def test_written_vocabulary_is_the_clip_vocabulary(clip_folder, oracle):
    vocab, merges = clip_vocab()
    assert len(vocab) == 49_408 and len(merges) == 48_894
    assert (vocab["!"], vocab[BOS], vocab[EOS]) == (BANG_ID, BOS_ID, EOS_ID)
    assert len(oracle) == 49_408
    # The ids every CLIP port prints for this caption.
    assert oracle("a photo of a cat")["input_ids"] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]


def test_corpus_is_large_and_deterministic():
    assert len(CORPUS) >= 300
    assert generated_texts() == generated_texts()


# --- equality with transformers ---------------------------------------------


def test_batch_equals_transformers(ours, oracle):
    assert_same_ids(CORPUS, ours(CORPUS), oracle_ids(oracle, CORPUS))


def test_one_text_at_a_time_equals_transformers(ours, oracle):
    for text in CORPUS:
        assert_same_ids([text], ours(text), oracle_ids(oracle, [text]))


def test_encode_equals_transformers_without_special_tokens(ours, oracle):
    for text in CORPUS:
        assert ours.encode(text) == oracle(text, add_special_tokens=False)["input_ids"], repr(text)


@pytest.mark.parametrize("context_length", [2, 16, 32])
def test_other_context_lengths_equal_transformers_max_length(clip_folder, oracle, context_length):
    ours = CLIPTokenizer.from_pretrained(clip_folder, context_length=context_length)
    assert_same_ids(CORPUS, ours(CORPUS), oracle_ids(oracle, CORPUS, max_length=context_length))


PIECES = st.one_of(st.sampled_from(list("aZ9!' \t\n\u00a0\u0301\u0345Σσİ😀🏽\u200d<|>")),
                   st.sampled_from([BOS, EOS, "'s", "'LL", "&amp;"]),
                   st.characters(exclude_categories=["Cs"]))


@given(st.lists(PIECES, max_size=40).map("".join))
@settings(max_examples=200, deadline=None)
def test_random_text_equals_transformers(ours, oracle, text):
    assert_same_ids([text], ours(text), oracle_ids(oracle, [text]))


def test_normalizer_equals_transformers_for_every_code_point(ours, oracle):
    # One character per line: "\n" is a starter, so neighbours cannot compose.
    everything = "\n".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert ours.normalize(everything) == oracle.backend_tokenizer.normalizer.normalize_str(everything)


def test_ascii_tables_answer_as_the_full_ones_on_ascii_text(ours):
    """An ASCII text is tokenized with tables built for ASCII alone (_ascii): for each of the 128 characters,
    and for texts of them, every pattern gives what the full tables give."""
    a, u = _ascii(), _unicode()
    every = "".join(map(chr, range(128)))
    for c in every:
        for name in ("letter", "number", "white_space", "nfc_opaque", "lower_override_chars"):
            assert bool(getattr(a, name).search(c)) == bool(getattr(u, name).search(c)), (name, hex(ord(c)))
    text = every + " A photo of 2 CATS, isn't it?\t<|endoftext|>x'LL 3.5%"
    assert a.pre_tokenizer.findall(text) == u.pre_tokenizer.findall(text)
    assert a.white_space.sub(" ", text) == u.white_space.sub(" ", text)
    assert a.byte_symbols == u.byte_symbols


def test_ascii_texts_equal_transformers(ours, oracle):
    """The ASCII path against the oracle: 3,000 random texts of ASCII words, digits, punctuation, control
    characters, white space and special-token text, and every ASCII character alone."""
    rng = random.Random(7)
    words = ["a", "photo", "of", "The", "CAT", "don't", "it's", "we'll", "I'M", "x2", "3.14", "hot-air", "<|endoftext|>",
             "<|startoftext|>", "e-mail@x.org", "C++", "$100", "#tag", "...", "''", "\\", "\x00", "\x1f", "\x7f"]
    pieces = words + [chr(c) for c in range(128)] + [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c"]
    texts = ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += [chr(c) for c in range(128)]
    assert all(t.isascii() for t in texts)
    assert_same_ids(texts, ours(texts), oracle_ids(oracle, texts))


def test_ascii_texts_do_not_build_the_unicode_tables(clip_folder, ours):
    """Tokenizing ASCII texts (most prompts) never builds the full tables, 0.2 s of a new process; a
    non-ASCII text does, and gets the ids a process that had built them first gives."""
    ascii_texts, other = ["a photo of a cat", "A PHOTO, of 2 dogs!\t<|endoftext|>"], ["ΣΑΣ and café"]
    script = ("import sys, tinyclip.tokenizer as t; tok = t.CLIPTokenizer.from_pretrained(sys.argv[1]); "
              f"a = tok({ascii_texts!r}).tolist(); assert t._unicode.cache_info().currsize == 0; "
              f"b = tok({other!r}).tolist(); assert t._unicode.cache_info().currsize == 1; print(a, b)")
    out = subprocess.run([sys.executable, "-c", script, str(clip_folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    _unicode()    # built in this process
    assert out.stdout.strip() == f"{ours(ascii_texts).tolist()} {ours(other).tolist()}"


def test_pre_tokenizer_classes_equal_transformers_for_every_code_point(ours, oracle):
    """Group code points by our class (letter, number, white space, other) between anchors
    of that class: one character that the oracle classes otherwise splits a run.

    Planes 4-13 (unassigned) and 15-16 (private use) hold no letter, number or
    space in any Unicode version; a sample of them keeps the test fast."""
    u = _unicode()
    code_points = [*range(0xD800), *range(0xE000, 0x40000), *range(0xE0000, 0xF0000),
                   *range(0x40000, 0xE0000, 251), *range(0xF0000, 0x110000, 251)]
    everything = "".join(map(chr, code_points))
    letters, numbers = u.letter.findall(everything), u.number.findall(everything)
    spaces = list("".join(u.white_space.findall(everything)))
    others = u.white_space.sub("", u.number.sub("", u.letter.sub("", everything)))
    assert len(letters) > 100_000 and len(numbers) > 1_000 and len(spaces) == 25
    assert len(letters) + len(numbers) + len(spaces) + len(others) == len(code_points)
    probes = [
        "a" + "".join(letters) + "a",
        "!" + others + "!",
        "a" + "a".join(numbers) + "a",  # a letter among the numbers would join its neighbours
        "!" + "!".join(numbers) + "!",  # another character would join the "!"s
        "a" + "a".join(spaces) + "a",
    ]
    for text in probes:
        expected = [word for word, _ in oracle.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
        assert ours.pre_tokenize(text) == expected


def test_symbols_missing_from_the_vocabulary_become_unk(tmp_path):
    # A toy vocabulary without accents or digits: each missing symbol is its own unk.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    tokens = letters + [c + "</w>" for c in letters] + ["he", "ll", "hell", "<unk>", BOS, EOS]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ours = CLIPTokenizer.from_pretrained(tmp_path, context_length=16)
    ours_unk = CLIPTokenizer(json.loads((tmp_path / "vocab.json").read_text()), merges, unk_token="<unk>")
    oracle = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    oracle_unk = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                            unk_token="<unk>")
    texts = ["hello", "héllo", "ÿÿ 12", "a1b", "hell\u00e9", ""]
    assert_same_ids(texts, ours(texts), oracle_ids(oracle, texts, max_length=16))
    assert_same_ids(texts, ours_unk(texts), oracle_ids(oracle_unk, texts))
    unk = tokens.index("<unk>")
    assert ours_unk.encode("hé") == [tokens.index("h"), unk, unk]  # é is two bytes, two unknown symbols


# --- special tokens, truncation, padding ------------------------------------


def test_special_token_text_becomes_its_id(ours, oracle):
    text = "a<|endoftext|>b <|startoftext|>"
    expected = [BOS_ID, 320, EOS_ID, 321, BOS_ID, EOS_ID]
    assert ours(text)[0, :6].tolist() == expected == oracle(text)["input_ids"]


def test_upper_case_special_token_text_is_plain_text(ours, oracle):
    # Special tokens are matched before lower-casing (they are not `normalized`), so
    # this is BPE of the words "<|" "endoftext" "|>" (GPT-2's regex splits them apart).
    expected = [27, 347, 40786, 4160, 91, 285]
    assert ours.encode("<|ENDOFTEXT|>") == expected == oracle("<|ENDOFTEXT|>", add_special_tokens=False)["input_ids"]


def test_empty_text_is_start_end_and_padding(ours):
    assert ours("").tolist() == [[BOS_ID, EOS_ID] + [EOS_ID] * (CONTEXT_LENGTH - 2)]


def test_single_string_gives_one_row(ours):
    ids = ours("a photo of a cat")
    assert ids.shape == (1, CONTEXT_LENGTH) and ids.dtype == np.int64


def test_long_text_is_truncated_with_end_token_last(ours):
    text = "a photo of a cat " * 30
    row = ours(text)[0]
    assert row.tolist() == [BOS_ID, *ours.encode(text)[:CONTEXT_LENGTH - 2], EOS_ID]


def test_truncate_false_rejects_long_text(ours):
    with pytest.raises(TokenizerError, match=r"texts\[1\] has 152 tokens .*context_length=77"):
        ours(["short", "cat " * 150], truncate=False)
    assert ours(["cat " * 75], truncate=False)[0, -1] == EOS_ID  # exactly full is fine


OPENAI_TOKEN = dict(normalized=True, __type="AddedToken")  # as in openai/clip-vit-*'s tokenizer_config.json


@pytest.mark.parametrize("files, pad_id", [
    pytest.param({  # openai/clip-vit-*: pad is eos, special tokens saved as normalized AddedTokens
        "tokenizer_config_json": {"bos_token": token(BOS, **OPENAI_TOKEN), "eos_token": token(EOS, **OPENAI_TOKEN),
                                  "unk_token": token(EOS, **OPENAI_TOKEN), "pad_token": EOS, "model_max_length": 77},
        "special_tokens_map_json": {"bos_token": token(BOS, True), "eos_token": token(EOS, True),
                                    "unk_token": token(EOS, True), "pad_token": EOS}}, EOS_ID, id="openai"),
    pytest.param({"tokenizer_config_json": {"pad_token": "!"}}, BANG_ID, id="tokenizer_config.json"),
    pytest.param({"special_tokens_map_json": {"pad_token": "!"}}, BANG_ID, id="special_tokens_map.json"),
    pytest.param({  # as in the LAION/open_clip exports: every special token marked normalized
        "tokenizer_config_json": {"model_max_length": 77, "pad_token": "!", "tokenizer_class": "CLIPTokenizer"},
        "special_tokens_map_json": {"bos_token": token(BOS, True), "eos_token": token(EOS, True), "pad_token": "!",
                                    "unk_token": token(EOS, True)}}, BANG_ID, id="laion-normalized"),
    pytest.param({"tokenizer_config_json": {  # transformers 4.3x style, with added_tokens_decoder
        "added_tokens_decoder": {"0": token("!", True, special=True), "49406": token(BOS, True, special=True),
                                 "49407": token(EOS, False, special=True)},
        "bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS, "model_max_length": 32}},
        BANG_ID, id="added_tokens_decoder"),
])
def test_special_tokens_from_config_equal_transformers(clip_folder, tmp_path, files, pad_id):
    folder = folder_with(clip_folder, tmp_path / "checkpoint", **files)
    ours, oracle = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == oracle.pad_token_id == pad_id
    texts = CORPUS + ["!", "hi!!", "<|ENDOFTEXT|>!", "<|Startoftext|>"]
    assert_same_ids(texts, ours(texts), oracle_ids(oracle, texts, max_length=ours.context_length))


def test_overlapping_added_tokens_match_leftmost_longest(clip_folder, tmp_path):
    # transformers finds added tokens with a leftmost-longest Aho-Corasick automaton.
    folder = folder_with(clip_folder, tmp_path / "checkpoint",
                         tokenizer_config_json={"additional_special_tokens": ["th", "the", "there", "in", "ing"]})
    ours, oracle = CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)
    texts = ["there is thing in the inn", "THERE", "singing there then thin"]
    assert_same_ids(texts, ours(texts), oracle_ids(oracle, texts))
    assert ours.encode("there")[0] == ours.vocab["there"]


def test_pad_token_text_becomes_the_pad_id(clip_folder, tmp_path):
    # transformers makes the pad token a special token, so "!" in a text is cut
    # out as id 0 instead of being merged by BPE ("!!" would be one token).
    folder = folder_with(clip_folder, tmp_path / "checkpoint", tokenizer_config_json={"pad_token": "!"})
    ids = CLIPTokenizer.from_pretrained(folder)("hi!!")[0]
    assert ids[:5].tolist() == [BOS_ID, 1883, BANG_ID, BANG_ID, EOS_ID] and set(ids[5:]) == {BANG_ID}


def test_model_max_length_sets_context_length(clip_folder, tmp_path):
    folder = folder_with(clip_folder, tmp_path / "checkpoint", tokenizer_config_json={"model_max_length": 32})
    assert CLIPTokenizer.from_pretrained(folder).context_length == 32
    assert CLIPTokenizer.from_pretrained(folder, context_length=77).context_length == 77


def test_checkpoint_saved_by_transformers_5_has_only_tokenizer_json(clip_folder, tmp_path):
    source = folder_with(clip_folder, tmp_path / "source", tokenizer_config_json={"pad_token": "!"})
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(source).save_pretrained(saved)
    assert not (saved / "vocab.json").exists() and (saved / "tokenizer.json").exists()
    ours, oracle = CLIPTokenizer.from_pretrained(saved), transformers.CLIPTokenizer.from_pretrained(saved)
    assert_same_ids(CORPUS, ours(CORPUS), oracle_ids(oracle, CORPUS))


# --- OpenAI's cleaning (not a transformers feature: checked against its definition)


@pytest.fixture(scope="module")
def openai_clean(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_folder, clean="openai")


@pytest.mark.parametrize("raw, cleaned", [
    ("&amp;", "&"),
    ("fish &amp; chips", "fish & chips"),
    ("&amp;lt;b&amp;gt;", "<b>"),  # unescaped twice, as simple_tokenizer.py does
    ("it&#39;s", "it's"),
    ("&quot;Quoted&quot;", '"quoted"'),
    ("a&nbsp;b", "a b"),
    ("  Leading\tand\n trailing  ", "leading and trailing"),
    ("a\x1cb", "a b"),  # Python's \s, unlike Unicode White_Space, includes U+001C
    ("cafe\u0301", "café"),
])
def test_openai_clean_unescapes_html_and_collapses_white_space(ours, openai_clean, raw, cleaned):
    assert openai_clean.encode(raw) == ours.encode(cleaned)


def test_openai_clean_lower_cases_a_final_sigma_as_python_does(ours, openai_clean):
    # Python's str.lower gives a final "ς"; transformers lower-cases per character ("σ").
    assert openai_clean.encode("ΟΔΟΣ") == ours.encode("οδος")
    assert ours.encode("ΟΔΟΣ") == ours.encode("οδοσ") != ours.encode("οδος")


def test_openai_clean_equals_transformers_on_plain_text(ours, openai_clean):
    texts = ["a photo of a cat", "A Diagram", "it's 10:30pm!"]
    assert np.array_equal(openai_clean(texts), ours(texts))
    assert not np.array_equal(openai_clean("&amp;"), ours("&amp;"))


# --- errors -----------------------------------------------------------------


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(TokenizerError, match="is not a folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_vocabulary_file(clip_folder, tmp_path, missing):
    folder = folder_with(clip_folder, tmp_path / "checkpoint")
    (folder / missing).unlink()
    with pytest.raises(TokenizerError, match=rf"{missing} is missing; a CLIP tokenizer needs vocab.json and merges"):
        CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"vocab.json: not valid JSON"),
    ('["a", "b"]', r"vocab.json must map each token \(str\) to an id"),
    ('{"a": "0"}', r"vocab.json must map each token \(str\) to an id"),
    ('{"a": -1}', r"vocab.json must map each token \(str\) to an id"),
])
def test_malformed_vocab_json(clip_folder, tmp_path, content, message):
    folder = folder_with(clip_folder, tmp_path / "checkpoint")
    (folder / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        CLIPTokenizer.from_pretrained(folder)


def test_malformed_merges_line(clip_folder, tmp_path):
    folder = folder_with(clip_folder, tmp_path / "checkpoint")
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merges.txt line 3 is 't h e', not two symbols"):
        CLIPTokenizer.from_pretrained(folder)


def test_merge_missing_from_vocab():
    vocab = {"i": 0, "n": 1, "<|endoftext|>": 2, "<|startoftext|>": 3}
    with pytest.raises(TokenizerError, match=r"merge 1 \('i' 'n'\) needs \['in'\], which vocab.json lacks"):
        CLIPTokenizer(vocab, [("i", "n")])


def test_special_token_missing_from_vocab():
    with pytest.raises(TokenizerError, match=r"special tokens \['<\|startoftext\|>'\] are not in the vocabulary"):
        CLIPTokenizer({"<|endoftext|>": 0}, [])


def test_pad_token_missing_from_vocab(clip_folder, tmp_path):
    folder = folder_with(clip_folder, tmp_path / "checkpoint", tokenizer_config_json={"pad_token": "<pad>"})
    with pytest.raises(TokenizerError, match=r"special tokens \['<pad>'\] are not in the vocabulary"):
        CLIPTokenizer.from_pretrained(folder)


def test_single_word_added_token_is_unsupported(clip_folder, tmp_path):
    folder = folder_with(clip_folder, tmp_path / "checkpoint", tokenizer_config_json={
        "added_tokens_decoder": {"49407": token(EOS, False, single_word=True, special=True)}})
    with pytest.raises(TokenizerError, match=r"sets single_word, which tinyclip does not support"):
        CLIPTokenizer.from_pretrained(folder)


def test_non_string_text(ours):
    with pytest.raises(TokenizerError, match=r"texts\[1\] is a int, not a str"):
        ours(["a cat", 3])
    with pytest.raises(TokenizerError, match=r"texts must be a str or a list of str, not bytes"):
        ours(b"a cat")


def test_lone_surrogate_in_text(ours):
    with pytest.raises(TokenizerError, match=r"texts\[0\] holds a lone surrogate at index 1"):
        ours(["a\ud800b"])


def test_empty_list_of_texts(ours):
    with pytest.raises(TokenizerError, match="texts is an empty list"):
        ours([])


@pytest.mark.parametrize("kwargs, message", [
    ({"clean": "ftfy"}, r"clean='ftfy' is not a cleaning mode"),
    ({"context_length": 1}, r"context_length=1 leaves no room for the start and end tokens"),
])
def test_bad_options(kwargs, message):
    vocab, merges = clip_vocab()
    with pytest.raises(TokenizerError, match=message):
        CLIPTokenizer(vocab, merges, **kwargs)


# --- speed -------------------------------------------------------------------


def test_a_warm_text_merges_nothing_again(ours):
    # Words seen before come from the word cache: a warm call does no BPE work at all, which is
    # what keeps it near 0.05 ms (timings live in benchmarks, not in tests).
    text = " ".join(["a photo of a big orange cat sleeping"] * 10)
    first = ours(text)
    with bpe_work(ours) as work:
        again = ours(text)
    np.testing.assert_array_equal(again, first)
    assert work["lookups"] == 0 and work["words"] > 0, work
