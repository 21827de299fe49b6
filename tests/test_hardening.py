"""Hardening: hostile checkpoints, broken inputs, threads (issue 5).

Under bad input tinyclip gives a clear error that names the file and says what
to do, and loses nothing; it never crashes, hangs, runs foreign code or
silently returns wrong numbers. Where the input is merely unusual (animated or
16-bit images, EXIF rotation, control characters, very long text) the answer
is transformers' answer. Random mutations of files are in test_fuzz.py; the
error paths that test_loading.py, test_preprocess.py and test_tokenizer.py
already cover are not repeated here.
"""
import json
import os
import re
import shutil
import struct
import threading
import zlib

import numpy as np
import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import load_file, save_file

import tinyclip
from tests.bpe import bpe_work, write_clip_vocab
from tests.test_hub import make_cache
from tinyclip.errors import CheckpointError, ConfigError, ImageError, TokenizerError
from tinyclip.preprocess import ImageProcessor, load_image
from tinyclip.tokenizer import CLIPTokenizer

DEVICE = "cpu"
PIXEL_ATOL = 1e-5             # as in test_preprocess.py
FRAME_COLOUR_ATOL = 2         # uint8 levels: GIF's palette and WebP's colour conversion move a flat colour slightly
LONG_TEXT = 100_000           # characters
# BPE over a word of n byte-level symbols (one per UTF-8 byte) with a priority queue: n - 1 look-ups
# fill the queue, each merge pushes at most 2 new pairs (so at most 3n pops, one look-up each) and
# looks up its 2 new neighbours: at most 6n. A quadratic loop that re-scans every pair per merge
# needs about n^2 / 2: some 50,000 per byte here.
LOOKUPS_PER_BYTE = 6
THREAD_ROUNDS = 4
MODEL_ROUNDS = 12      # two models on two threads: each round captures nothing new, so rounds are cheap


@pytest.fixture
def folder(tiny_quick, tmp_path):
    """A fresh, writable copy of the tiny checkpoint."""
    dst = tmp_path / "ck"
    shutil.copytree(tiny_quick.folder, dst)
    return dst


def embed(folder):
    return tinyclip.load(folder, device=DEVICE).encode_text(["a photo of a cat"])


def split_into_shards(folder) -> list:
    st_file = folder / "model.safetensors"
    tensors = load_file(st_file)
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, ks in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: tensors[k] for k in ks}, folder / name)
        for k in ks:
            tensors[k] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": tensors}))
    st_file.unlink()
    return names


# ---- weights reached through symbolic links ------------------------------------------------------

def test_weights_linked_from_outside_the_folder_are_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"ck/model.safetensors: is a symbolic link to "
                       rf"{re.escape(str(outside.resolve()))}, outside the checkpoint folder .*ck; tinyclip reads "
                       r"weights only from inside the checkpoint. If you trust the file, copy it in."):
        tinyclip.load(folder, device=DEVICE)


def test_a_shard_linked_from_outside_the_folder_is_refused(folder, tmp_path):
    names = split_into_shards(folder)
    shutil.move(folder / names[1], tmp_path / names[1])
    (folder / names[1]).symlink_to(os.path.relpath(tmp_path / names[1], folder))   # "../model-00002-..."
    with pytest.raises(CheckpointError, match=rf"{names[1]}: is a symbolic link to .*, outside the checkpoint"):
        tinyclip.load(folder, device=DEVICE)


def test_a_shard_index_linked_from_outside_the_folder_is_refused(folder, tmp_path):
    split_into_shards(folder)
    shutil.move(folder / "model.safetensors.index.json", tmp_path / "index.json")
    (folder / "model.safetensors.index.json").symlink_to(tmp_path / "index.json")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: is a symbolic link to .*index.json, "
                       r"outside the checkpoint"):
        tinyclip.load(folder, device=DEVICE)


def test_links_within_the_folder_and_a_linked_folder_load(folder, tmp_path):
    want = embed(folder)
    (folder / "weights").mkdir()
    shutil.move(folder / "model.safetensors", folder / "weights" / "real.safetensors")
    (folder / "model.safetensors").symlink_to("weights/real.safetensors")
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    np.testing.assert_array_equal(embed(folder), want)
    np.testing.assert_array_equal(embed(tmp_path / "alias"), want)


def test_hub_cache_snapshot_links_into_its_blobs_load(tiny_quick, tmp_path):
    snapshot = make_cache(tmp_path / "hub", tiny_quick.folder)
    assert (snapshot / "model.safetensors").is_symlink()
    np.testing.assert_array_equal(embed(snapshot), embed(tiny_quick.folder))


@pytest.mark.parametrize("target", ["outside the cache", "another repository's blob"])
def test_hub_cache_snapshot_linking_out_of_its_repository_is_refused(tiny_quick, tmp_path, target):
    snapshot = make_cache(tmp_path / "hub", tiny_quick.folder)
    if target == "outside the cache":
        elsewhere = tmp_path / "stolen.safetensors"
    else:
        other = make_cache(tmp_path / "hub", tiny_quick.folder, repo="someone/else")
        elsewhere = (other / "model.safetensors").resolve()
    shutil.copy(tiny_quick.folder / "model.safetensors", elsewhere)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(elsewhere, snapshot))
    with pytest.raises(CheckpointError, match=r"model.safetensors: is a symbolic link to .*, outside the checkpoint "
                       r"folder .* and its Hugging Face cache repository .*models--tinyclip-tests--clip-tiny;"):
        tinyclip.load(snapshot, device=DEVICE)


# ---- weights: read-only files, bfloat16 ----------------------------------------------------------

def test_a_read_only_checkpoint_loads_and_is_not_modified(folder, monkeypatch):
    # tinygrad's DISK device opened weights read-write (PermissionError on a read-only checkpoint,
    # EROFS on a read-only mount) and would extend a short file. Refuse every write-mode open in
    # the folder, which also works when the tests run as root (chmod alone would not stop root).
    want = embed(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for p in folder.iterdir():
        p.chmod(0o444)
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if str(folder) in os.fsdecode(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            raise PermissionError(13, "Permission denied (read-only checkpoint)", path)
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only_open)
    np.testing.assert_array_equal(embed(folder), want)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.slow     # ~10 s: bfloat16 compiles its own graphs
def test_bfloat16_checkpoint_loads_exactly_on_cpu(folder):
    # clang's C target has no __bf16: tinygrad's bitcast failed with a compiler error.
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch, save_file as save_torch
    path = folder / "model.safetensors"
    save_torch({k: v.to(torch.bfloat16) for k, v in load_torch(path).items()}, path)
    model = tinyclip.load(folder, device=DEVICE)
    want = load_torch(path)["text_projection.weight"].float().numpy()
    with model.backend.context():
        np.testing.assert_array_equal(model.model.text_projection.dense_weight.numpy(), want)
    assert np.isfinite(model.encode_text(["a cat"])).all()


# ---- config.json and the tokenizer files, through tinyclip.load ---------------------------------

@pytest.mark.parametrize("text, match", [
    ('{"vision_config": {"num_hidden_layers": 1000000}}',
     r"vision_config.num_hidden_layers is 1000000; tinyclip builds at most 256"),
    ('{"text_config": {"layer_norm_eps": Infinity}}',
     r"text_config.layer_norm_eps must be a finite number > 0, got inf"),
    ('{"text_config": {"layer_norm_eps": NaN}}', r"text_config.layer_norm_eps must be a finite number > 0, got nan"),
    ('{"text_config": {"hidden_size": true}}', r"text_config.hidden_size must be int, got True"),
    ('{"projection_dim": 0}', r"config.json: projection_dim must be positive, got 0"),
    ("[" * 100_000 + "]" * 100_000, r"config.json: not valid JSON \(maximum recursion depth"),
    ('{"projection_dim": ' + "9" * 5000 + "}", r"config.json: not valid JSON \(Exceeds the limit"),
    ("\xff\xfe{}", r"config.json: not valid JSON"),
])
def test_bad_config_json(folder, text, match):
    (folder / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError, match=match):
        tinyclip.load(folder, device=DEVICE)


def test_config_that_disagrees_with_the_weights(folder):
    # config.json's sizes are only a claim: the weights' shapes are checked against it before any copy
    d = json.loads((folder / "config.json").read_text())
    d["text_config"]["vocab_size"] = 10**12     # would be 10^12 x 48 floats if it were ever allocated
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"text_model.embeddings.token_embedding.weight: checkpoint "
                       r"\[49408, 48\], config.json implies \[1000000000000, 48\]"):
        tinyclip.load(folder, device=DEVICE)


def test_merges_from_another_vocabulary(folder):
    with open(folder / "merges.txt", "a", encoding="utf-8") as f:
        f.write("qz xk\n")
    with pytest.raises(TokenizerError, match=r"merge 48895 \('qz' 'xk'\) needs \[.*'qzxk'\], which vocab.json lacks; "
                       r"vocab.json and merges.txt come from different tokenizers"):
        tinyclip.load(folder, device=DEVICE).tokenize("a photo")    # read on first use


def test_vocab_from_another_tokenizer(folder):
    # a GPT-2 style vocabulary: no CLIP start token and no "</w>" word ends
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
    with pytest.raises(TokenizerError, match=r"special tokens \['<\|startoftext\|>'\] are not in the vocabulary"):
        tinyclip.load(folder, device=DEVICE).tokenize("a photo")    # read on first use


def test_vocab_json_nested_too_deeply(folder):
    (folder / "vocab.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TokenizerError, match=r"vocab.json: not valid JSON \(maximum recursion depth"):
        tinyclip.load(folder, device=DEVICE).tokenize("a photo")    # read on first use


# ---- images --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle_class():
    transformers.utils.logging.set_verbosity_error()
    return transformers.CLIPImageProcessorPil


def oracle(oracle_class, images, **config):
    return oracle_class(**config)(images, return_tensors="np")["pixel_values"]


def ours(images, **config):
    return ImageProcessor.from_dict(config)(images)


def noise(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


SMALL = {"size": {"shortest_edge": 32}, "crop_size": 32}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # Pillow's, before our error
@pytest.mark.parametrize("size, match", [
    ((40, 40), r"40x40 = 1,600 pixels, over Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS = 1,000\. "
               r"If you trust the file, raise the limit \(PIL.Image.MAX_IMAGE_PIXELS = 1600; the command line's "
               r"--max-pixels 1600\) or switch it off \(= None; --max-pixels 0\)"),
    ((50, 50), r"more than 2,000 pixels, over Pillow's decompression-bomb limit"),   # Pillow raises itself
])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch, size, match):
    # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above; tinyclip refuses both.
    path = tmp_path / "bomb.png"
    Image.new("L", size).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=rf"image 0: {re.escape(str(path))}: the image has {match}"):
        ImageProcessor()(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).size == size


def test_a_damaged_header_that_trips_pillow_is_an_image_error(tmp_path):
    # an IHDR chunk shorter than 13 bytes: Pillow's PNG plugin raises ValueError("Truncated IHDR
    # chunk"), which Image.open lets through (found by test_fuzz.py)
    path = tmp_path / "short.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + b"IHDR" + b"\0" * 9)
    with pytest.raises(ImageError, match=r"short.png: not an image Pillow can read \(damaged header: ValueError"):
        load_image(path)


def test_a_thin_image_is_resized_like_transformers(oracle_class, tmp_path):
    path = tmp_path / "thin.png"
    noise(10_000, 10).save(path)      # resized to 224000x224 before the crop, as in transformers
    np.testing.assert_allclose(ours(path), oracle(oracle_class, str(path)), rtol=0, atol=PIXEL_ATOL)


def test_an_image_whose_resize_would_be_gigantic_is_refused():
    # 200000x1 -> 44800000x224 = 10^10 pixels (30 GB) before the crop; transformers would try.
    with pytest.raises(ImageError, match=r"image 0 \(200000x1\) would be resized to 44800000x224 under size "
                       r"\{'shortest_edge': 224\}, more than PIL.Image.MAX_IMAGE_PIXELS = 89,478,485 pixels"):
        ImageProcessor()(Image.new("RGB", (200_000, 1)))


def test_exif_orientation_of_a_pil_image_is_not_applied_like_transformers(oracle_class, tmp_path):
    # transformers applies EXIF orientation only when it opens a path (load_image); a PIL image
    # passed in keeps its stored pixels. (Paths: test_preprocess.py.)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(60, 40).save(path, exif=exif)
    config = {"size": {"shortest_edge": 32}, "do_center_crop": False}
    with Image.open(path) as image:
        pixels = ours(image, **config)
        assert pixels.shape == (1, 3, 32, 48)          # still landscape
        np.testing.assert_allclose(pixels, oracle(oracle_class, image, **config), rtol=0, atol=PIXEL_ATOL)


FRAME_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def animated(path, fmt):
    frames = [Image.new("RGB", (24, 20), c) for c in FRAME_COLOURS]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)


@pytest.mark.parametrize("fmt, suffix", [("GIF", "gif"), ("WEBP", "webp"), ("PNG", "png")], ids=["GIF", "WebP", "APNG"])
def test_animated_images_give_their_first_frame_like_transformers(oracle_class, tmp_path, fmt, suffix):
    path = tmp_path / f"animated.{suffix}"
    animated(path, fmt)
    with Image.open(path) as image:
        assert image.is_animated and image.n_frames == 3
    assert np.abs(np.asarray(load_image(path)).astype(int) - FRAME_COLOURS[0]).max() <= FRAME_COLOUR_ATOL
    np.testing.assert_allclose(ours(path, **SMALL), oracle(oracle_class, str(path), **SMALL), rtol=0, atol=PIXEL_ATOL)
    with Image.open(path) as image:    # a PIL image gives its current frame, in both
        image.seek(1)
        np.testing.assert_allclose(ours(image, **SMALL), oracle(oracle_class, image, **SMALL), rtol=0,
                                   atol=PIXEL_ATOL)


def png_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["16-bit gray PNG", "16-bit RGB PNG", "float TIFF", "32-bit int TIFF"])
def test_high_bit_depth_files_match_transformers(oracle_class, tmp_path, kind):
    rng = np.random.default_rng(3)
    path = tmp_path / ("image.tiff" if "TIFF" in kind else "image.png")
    if kind == "16-bit gray PNG":
        Image.fromarray(rng.integers(0, 65536, (30, 40)).astype(np.uint16)).save(path)
    elif kind == "16-bit RGB PNG":
        path.write_bytes(png_rgb16(rng.integers(0, 65536, (30, 40, 3))))
    elif kind == "float TIFF":
        Image.fromarray((rng.random((30, 40)) * 400 - 50).astype(np.float32)).save(path)
    else:
        Image.fromarray(rng.integers(-300, 600, (30, 40)).astype(np.int32)).save(path)
    np.testing.assert_allclose(ours(path, **SMALL), oracle(oracle_class, str(path), **SMALL), rtol=0, atol=PIXEL_ATOL)


# ---- text ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-vocab")
    write_clip_vocab(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(vocab_folder):
    return CLIPTokenizer.from_pretrained(vocab_folder)


@pytest.fixture(scope="module")
def oracle_tokenizer(vocab_folder):
    return transformers.CLIPTokenizer(str(vocab_folder / "vocab.json"), str(vocab_folder / "merges.txt"))


def oracle_ids(oracle_tokenizer, text):
    return np.asarray(oracle_tokenizer([text], padding="max_length", max_length=77, truncation=True)["input_ids"])


SPACES_AND_CONTROLS = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"])
WORDS = st.sampled_from(["a", "Cat", "naïve", "日本", "9", "!!", "'s", "<|endoftext|>", "🏽"])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(SPACES_AND_CONTROLS, max_size=30))
def test_white_space_and_control_only_text_equals_transformers(tokenizer, oracle_tokenizer, text):
    np.testing.assert_array_equal(tokenizer(text), oracle_ids(oracle_tokenizer, text))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.one_of(WORDS, st.text(SPACES_AND_CONTROLS, min_size=1, max_size=3)), max_size=30).map("".join))
def test_words_between_control_characters_equal_transformers(tokenizer, oracle_tokenizer, text):
    np.testing.assert_array_equal(tokenizer(text), oracle_ids(oracle_tokenizer, text))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.one_of(st.text(min_size=1, max_size=12).filter(lambda t: not re.search("[\ud800-\udfff]", t)),
                 st.sampled_from(["a", "ab", "é", "!", "1", "a cat ", "\u200d", "x\u0301"])))
def test_a_100000_character_text_takes_bounded_work_and_equals_transformers(tokenizer, oracle_tokenizer, fragment):
    # One BPE word of 10^5 letters took quadratic time (minutes); now O(n log n), and with truncation
    # the tokenizer stops after the ids a row can hold.
    text = (fragment * (LONG_TEXT // len(fragment) + 1))[:LONG_TEXT]
    tokenizer._cache.clear()    # count the work of a first encounter, not of cached words
    with bpe_work(tokenizer) as work:
        ids = tokenizer(text)
    assert work["lookups"] <= LOOKUPS_PER_BYTE * len(text.encode()), work
    # with truncation, BPE stops once a row is full: each word gives at least one id
    assert work["words"] <= tokenizer.context_length - 1, work
    np.testing.assert_array_equal(ids, oracle_ids(oracle_tokenizer, text))


def test_one_100000_letter_word_encodes_fully_like_transformers(tokenizer, oracle_tokenizer):
    text = "ab" * (LONG_TEXT // 2)
    with bpe_work(tokenizer) as work:
        ids = tokenizer.encode(text)
    assert work["words"] == 1 and work["lookups"] <= LOOKUPS_PER_BYTE * len(text.encode()), work
    assert ids == oracle_tokenizer(text, add_special_tokens=False)["input_ids"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(text=st.text(max_size=20).filter(lambda t: not re.search("[\ud800-\udfff]", t)),
       at=st.integers(0, 20), surrogate=st.integers(0xD800, 0xDFFF).map(chr))
def test_lone_surrogates_are_a_tokenizer_error(tokenizer, oracle_tokenizer, text, at, surrogate):
    at = min(at, len(text))
    text = text[:at] + surrogate + text[at:] + " long tail" * 100    # past the truncation point too
    with pytest.raises(TypeError):      # transformers: "TextEncodeInput must be Union[...]"
        oracle_tokenizer(text)
    with pytest.raises(TokenizerError, match=rf"texts\[0\] holds a lone surrogate at index {at}, which is not text"):
        tokenizer(text)
    with pytest.raises(TokenizerError, match=rf"the text holds a lone surrogate at index {at}"):
        tokenizer.encode(text)


# ---- threads -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_quick):
    return tinyclip.load(tiny_quick.folder, device=DEVICE)


# Same batch sizes and token lengths, so that both threads use one compiled graph per tower.
TEXTS_A = ["a photo of a cat", "a dog"]
TEXTS_B = ["two red birds", "x"]


def images(n, seed):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 30, 41, 3), dtype=np.uint8))


JOBS = {
    "texts": lambda m: m.encode_text(TEXTS_A),
    "other-texts": lambda m: m.encode_text(TEXTS_B),
    "images": lambda m: m.encode_image(images(2, 0)),
    "other-images": lambda m: m.encode_image(images(2, 1)),
}


def on_two_threads(calls, rounds: int) -> list[list]:
    """Run calls[0] and calls[1] `rounds` times each on two threads started together; every result, in order."""
    start = threading.Barrier(2)
    got, errors = [[], []], []

    def worker(i):
        try:
            start.wait()
            for _ in range(rounds):
                got[i].append(calls[i]())
        except BaseException as e:   # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [len(g) for g in got] == [rounds, rounds]
    return got


@pytest.mark.slow     # compiles a graph per batch shape and text length the threads meet
@pytest.mark.parametrize("first, second", [("texts", "other-texts"), ("images", "other-images"),
                                           ("texts", "images")])
def test_two_threads_sharing_one_model_get_the_sequential_answers(model, first, second):
    # tinygrad's scheduler and JIT are not thread-safe; CLIP must serialize its own use of them.
    jobs = [JOBS[first], JOBS[second]]
    want = [job(model) for job in jobs]
    got = on_two_threads([lambda: jobs[0](model), lambda: jobs[1](model)], THREAD_ROUNDS)
    for i in range(2):
        for result in got[i]:
            np.testing.assert_array_equal(result, want[i])


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """A second checkpoint of another architecture (tiny-gelu) on the same device."""
    from tests.conftest import checkpoint
    return tinyclip.load(checkpoint("tiny-gelu", tmp_path_factory).folder, device=DEVICE)


@pytest.mark.slow     # compiles both models' graphs
def test_two_models_on_two_threads_get_their_sequential_answers(model, second_model):
    """tinygrad's scheduler, JIT and Context settings are process-wide: a lock per model would let two models
    capture and run at once. One process-wide lock (_tinygrad.LOCK) makes each call correct."""
    models = [model, second_model]
    jobs = [lambda m: (m.encode_text(TEXTS_A), m.encode_image(images(2, 0))),
            lambda m: (m.encode_image(images(3, 1)), m.encode_text(TEXTS_B))]
    want = [jobs[i](models[i]) for i in range(2)]
    got = on_two_threads([lambda: jobs[0](models[0]), lambda: jobs[1](models[1])], MODEL_ROUNDS)
    assert models[0].runner.lock is models[1].runner.lock
    for i in range(2):
        for result in got[i]:
            for a, b in zip(result, want[i]):
                np.testing.assert_array_equal(a, b)
