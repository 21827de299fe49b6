"""Fuzzing the readers of untrusted files: safetensors checkpoints and image files.

The property: whatever the bytes, tinyclip either reads the file correctly or
raises its own error (CheckpointError, ImageError) naming the file. Never
another exception, never a hang (each example runs under an alarm), never a
large allocation (tracemalloc bounds what parsing a header may take), and
never numbers other than those stored in the file.

The hostile headers written out by hand below are the holes that fuzzing
and reading the parser turned up, kept as regression tests with their
messages; the fuzzer itself found the BF16 crash (tinygrad's clang renderer
has no __bf16), the TypeError of a list as dtype, and Pillow's ValueError on
a damaged PNG header.
"""
import contextlib
import io
import json
import os
import signal
import struct
import tracemalloc
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import get_state_dict

from tinyclip import registry
from tinyclip.errors import CheckpointError, ImageError
from tinyclip.preprocess import load_image
from tinyclip.weights import INDEX_FILE, SINGLE_FILE, checkpoint_files, load_weights, read_safetensors_header

DEVICE = "cpu"
SECONDS_PER_EXAMPLE = 20        # a hang fails the example instead of stalling the run
HEADER_MEMORY_FACTOR = 64       # parsing may take this many bytes per byte of file (JSON objects are fat)
HEADER_MEMORY_SLACK = 1 << 20
MAX_MESSAGE = 2000              # an error message quotes the file, not megabytes of it
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---- a small valid checkpoint --------------------------------------------------------------------

TENSORS = {"text_model.a.weight": ("F32", (2, 3)), "text_model.b.bias": ("F16", (4,)), "vision_model.c": ("BF16", (3,)),
           "logit_scale": ("F64", ()), "empty": ("F32", (0, 5))}
STORED = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}   # numpy's reading; BF16 as its raw bits


def valid_file() -> tuple[bytes, int]:
    """A safetensors file as the reference writer lays it out (header padded with spaces to 8 bytes);
    returns the bytes and where the header ends."""
    rng = np.random.default_rng(0)
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape) in TENSORS.items():
        values = rng.integers(0, 1 << 16, shape).astype(STORED[dtype]) if dtype == "BF16" else \
            rng.standard_normal(shape).astype(STORED[dtype])
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + values.nbytes]}
        data += values.tobytes()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data, 8 + len(raw)


VALID, HEADER_END = valid_file()


def params() -> SimpleNamespace:
    """A stand-in model whose parameters are the valid file's tensors in float32; load_weights
    finds them by attribute path, as it finds a CLIPModel's."""
    empty = lambda *shape: Tensor.empty(*shape, device="CPU")  # noqa: E731
    return SimpleNamespace(text_model=SimpleNamespace(a=SimpleNamespace(weight=empty(2, 3)),
                                                      b=SimpleNamespace(bias=empty(4))),
                           vision_model=SimpleNamespace(c=empty(3)), logit_scale=empty(), empty=empty(0, 5))


def expected_values(data: bytes, info) -> np.ndarray:
    """What the stored bytes mean, decoded by numpy: the oracle for a successful load."""
    stored = np.dtype(STORED[info.dtype])
    raw = np.frombuffer(data, stored, offset=info.start, count=(info.end - info.start) // stored.itemsize)
    if info.dtype == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32).reshape(info.shape)


class Hang(BaseException):
    """Not an OSError (as TimeoutError is) or any Exception, so no handler under test can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expired(signum, frame):
        raise Hang(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def cpu():
    return registry.select(DEVICE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_checkpoint(data: bytes, folder, cpu) -> str:
    """Write `data` as folder/model.safetensors and read it as tinyclip does: either it loads with
    exactly the stored values, or it raises CheckpointError naming the file. Returns "ok" or "error"."""
    path = folder / SINGLE_FILE
    path.write_bytes(data)
    with time_limit(SECONDS_PER_EXAMPLE):
        tracemalloc.start()
        try:
            infos = read_safetensors_header(path)
        except CheckpointError as e:
            assert_good_message(e, path)
            return "error"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < HEADER_MEMORY_FACTOR * len(data) + HEADER_MEMORY_SLACK, f"parsing took {peak} bytes"
        assert all(info.start >= 8 and info.end <= len(data) for info in infos.values())
        model = params()
        try:
            with cpu.context():
                load_weights(model, folder, dtypes.float32, cpu.device)
        except CheckpointError as e:    # keys or shapes that do not fit the model
            assert str(folder) in str(e) and len(str(e)) < MAX_MESSAGE
            return "error"
        with cpu.context():
            for key, param in get_state_dict(model).items():
                want = expected_values(data, infos[key]).reshape(param.shape)
                np.testing.assert_array_equal(param.numpy(), want, err_msg=key)
    return "ok"


def assert_good_message(e: Exception, path) -> None:
    message = str(e)
    assert str(path) in message, message
    assert len(message) < MAX_MESSAGE, f"{len(message)}-character message"


def test_the_unmutated_file_loads_exactly(workdir, cpu):
    assert check_checkpoint(VALID, workdir, cpu) == "ok"


# ---- mutations -----------------------------------------------------------------------------------

def flip_bits(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


# Bit positions: mostly in the header (flips in the data only change values), some anywhere.
BITS = st.lists(st.one_of(st.integers(0, 8 * HEADER_END - 1), st.integers(0, 8 * len(VALID) - 1)),
                min_size=1, max_size=8)


@FUZZ
@given(bits=BITS)
def test_bit_flips(workdir, cpu, bits):
    check_checkpoint(flip_bits(VALID, bits), workdir, cpu)


@FUZZ
@given(cut=st.integers(0, len(VALID) - 1))
def test_truncation_anywhere(workdir, cpu, cut):
    assert check_checkpoint(VALID[:cut], workdir, cpu) == "error"


@FUZZ
@given(data=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=300).map(lambda b: struct.pack("<Q", len(b)) + b),
                      st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=100))
                      .map(lambda t: struct.pack("<Q", t[0]) + t[1])))
def test_random_bytes(workdir, cpu, data):
    assert check_checkpoint(data, workdir, cpu) == "error"


# JSON values a corrupt or hostile header might hold where a dtype, shape or offset belongs.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**63, 2**64, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "f32", ""]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
FIELDS = ["dtype", "shape", "data_offsets"]
SHAPES = st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**62, 2**64 + 1, 10**100])), max_size=5)
OFFSETS = st.lists(st.one_of(st.integers(-4, len(VALID) + 4), st.sampled_from([2**63, 2**64])),
                   min_size=2, max_size=2)
EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(TENSORS)), st.sampled_from(FIELDS), JSON_VALUES),
    st.tuples(st.just("set"), st.sampled_from(sorted(TENSORS)), st.just("shape"), SHAPES),
    st.tuples(st.just("set"), st.sampled_from(sorted(TENSORS)), st.just("data_offsets"), OFFSETS),
    st.tuples(st.just("set"), st.sampled_from(sorted(TENSORS)), st.just("dtype"),
              st.sampled_from(["F32", "F16", "BF16", "F64"])),
    st.tuples(st.just("delete"), st.sampled_from(sorted(TENSORS)), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("replace"), st.sampled_from(sorted(TENSORS) + ["__metadata__"]), st.none(), JSON_VALUES),
    st.tuples(st.just("add"), st.text(max_size=8), st.none(), JSON_VALUES),
    st.tuples(st.just("remove"), st.sampled_from(sorted(TENSORS)), st.none(), st.none()),
)


def edited(edits, length_delta: int, data_delta: int) -> bytes:
    header = json.loads(VALID[8:HEADER_END])
    for action, key, field, value in edits:
        entry = header.get(key)
        if action == "set" and isinstance(entry, dict):
            entry[field] = value
        elif action == "delete" and isinstance(entry, dict):
            entry.pop(field, None)
        elif action in ("replace", "add"):
            header[key] = value
        elif action == "remove":
            header.pop(key, None)
    raw = json.dumps(header).encode()
    data = VALID[HEADER_END:]
    data = data + b"\x7f" * data_delta if data_delta >= 0 else data[:data_delta]
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


@FUZZ
@given(edits=st.lists(EDITS, min_size=1, max_size=4),
       length_delta=st.one_of(st.just(0), st.integers(-16, 16), st.sampled_from([2**40, 2**63])),
       data_delta=st.one_of(st.just(0), st.integers(-20, 20)))
def test_header_edits(workdir, cpu, edits, length_delta, data_delta):
    check_checkpoint(edited(edits, length_delta, data_delta), workdir, cpu)


@FUZZ
@given(a=st.integers(0, 60), b=st.integers(0, 60), key=st.sampled_from(sorted(TENSORS)))
def test_moved_offsets_either_load_what_they_point_at_or_fail(workdir, cpu, a, b, key):
    # A same-sized range moved elsewhere loads those bytes (still within the file, not overlapping)
    # or is refused: never bytes from outside the range the header names.
    header = json.loads(VALID[8:HEADER_END])
    header[key]["data_offsets"] = [min(a, b), max(a, b)]
    raw = json.dumps(header).encode()
    check_checkpoint(struct.pack("<Q", len(raw)) + raw + VALID[HEADER_END:], workdir, cpu)


# ---- shard indexes -------------------------------------------------------------------------------

@FUZZ
@given(index=st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(["weight_map", "metadata"]), JSON_VALUES),
                       st.dictionaries(st.just("weight_map"), st.dictionaries(
                           st.text(max_size=6), st.one_of(st.sampled_from([
                               SINGLE_FILE, "../model.safetensors", "/etc/passwd", "..", ".", "", "a\\b", "sub/x",
                               "model-1.safetensors"]), st.text(max_size=8)), max_size=4))))
def test_shard_index_contents(workdir, index):
    folder = workdir / "sharded"
    folder.mkdir(exist_ok=True)
    (folder / SINGLE_FILE).unlink(missing_ok=True)
    (folder / "model-1.safetensors").write_bytes(VALID)
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with time_limit(SECONDS_PER_EXAMPLE):
        try:
            files = checkpoint_files(folder)
        except CheckpointError as e:
            assert_good_message(e, folder)
            return
    assert all(f.parent == folder and f.resolve().is_relative_to(folder.resolve()) for f in files)


# ---- hostile headers found by fuzzing and by reading the parser, with their messages -------------

def file_with_header(raw: bytes, data: bytes = b"\0" * 8) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def tensor(**entry) -> bytes:
    base = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    base.update(entry)
    return file_with_header(json.dumps({"logit_scale": base}).encode())


HOSTILE = {
    # json raised RecursionError, not a ValueError
    "deep-nesting": (file_with_header(b"[" * 100_000 + b"]" * 100_000), r"header nests too deeply"),
    # the byte count has 8000 digits: formatting it raised ValueError (int max str digits)
    "4000-digit-dimensions": (tensor(shape=[10**4000, 10**4000]),
                              r"tensor 'logit_scale': 8 bytes stored but dtype F32 and shape \[1000.*need more than the "
                              r"file's 8; the header is corrupt"),
    # math.prod over 200,000 dimensions of 10**18 ran for three minutes
    "200000-huge-dimensions": (tensor(shape=[10**18] * 200_000),
                               r"shape \[1000000000000000000, .*\.\.\. \(\d+ characters\) need more than"),
    # the duplicate-key check was quadratic: minutes for 100,000 keys with the duplicate last
    "100000-keys-duplicate-last": (file_with_header(("{" + ",".join(f'"k{i}": 1' for i in range(100_000))
                                                     + ', "k99999": 1}').encode()), r"duplicate key 'k99999'"),
    "integer-past-the-digit-limit": (file_with_header(b'{"a": ' + b"9" * 5000 + b"}"),
                                     r"header is not valid JSON \(Exceeds the limit"),
    "megabyte-tensor-name": (file_with_header(json.dumps({"x" * 2**20: 1}).encode()),
                             r"tensor 'xxxx.*\.\.\. \(1048578 characters\): header entry is not an object"),
    "nan-dimension": (file_with_header(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}'),
                      r"shape \[nan\] is not a list of non-negative integers"),
    "list-as-dtype": (tensor(dtype=["F32"]), r"has an unknown dtype \['F32'\]"),
    "header-length-2**64-1": (struct.pack("<Q", 2**64 - 1) + b"{}", r"header length 18446744073709551615 runs past"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header(workdir, cpu, name):
    data, message = HOSTILE[name]
    path = workdir / SINGLE_FILE
    path.write_bytes(data)
    with time_limit(SECONDS_PER_EXAMPLE), pytest.raises(CheckpointError, match=message) as e:
        read_safetensors_header(path)
    assert_good_message(e.value, path)


def test_a_fifo_is_not_read(tmp_path):
    # opening a FIFO blocks until someone writes to it: a hang
    path = tmp_path / SINGLE_FILE
    os.mkfifo(path)
    with time_limit(5), pytest.raises(CheckpointError, match=r"model.safetensors: not a regular file"):
        read_safetensors_header(path)


# ---- image files ---------------------------------------------------------------------------------

def encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(len(fmt))
    image = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


IMAGE_FILES = {fmt: encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM")}


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(IMAGE_FILES)), bits=st.lists(st.integers(0, 8 * 400), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_damaged_image_files(workdir, fmt, bits, cut):
    data = IMAGE_FILES[fmt]
    data = flip_bits(data, bits) if bits else data
    data = data[:cut] if cut is not None else data
    path = workdir / f"image.{fmt.lower()}"
    path.write_bytes(data)
    with time_limit(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
        warnings.simplefilter("ignore")    # Pillow warns about some damaged files before failing
        try:
            image = load_image(path)
        except ImageError as e:
            assert_good_message(e, path)
            return
    assert image.mode == "RGB" and image.width * image.height <= Image.MAX_IMAGE_PIXELS
