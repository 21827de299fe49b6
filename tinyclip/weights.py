"""Reading CLIP weights from safetensors files, strictly.

tinygrad's own `safe_load` trusts the header (offsets, sizes); this module
parses and checks it first, with plain Python on a bounded read, and only then
reads the checked byte ranges (read-only) and copies them onto the target device.
Nothing here ever unpickles: a folder with only pytorch_model.bin is refused.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pathlib
import stat
import sys

import numpy as np
from tinygrad import Tensor
from tinygrad.dtype import DType
from tinygrad.nn.state import get_state_dict

from . import _tinygrad
from .errors import CheckpointError
from .jsonfile import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
UNSAFE_FORMATS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
MAX_HEADER_BYTES = 100 * 1024 * 1024       # the safetensors reference implementation's own limit
# Buffers that transformers saved in older checkpoints; they are not parameters.
NON_PARAMETERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# safetensors dtype name -> how its bytes are read: little-endian, as safetensors stores them; BF16 as
# its raw 16 bits. Floats only: CLIP's parameters are floats.
READ_THREADS = 4    # tensors read at once by load_weights: more than 2 cores help little, fewer leave one idle
FILE_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
KNOWN_NON_FLOAT = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2")
MAX_SHOWN = 120     # characters of a header value quoted in an error message


class TensorInfo:
    """One checked header entry: where its bytes are and what they hold."""

    def __init__(self, path: pathlib.Path, key: str, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.path, self.key, self.dtype, self.shape, self.start, self.end = path, key, dtype, shape, start, end

    def load(self, device: str, dtype: DType) -> Tensor:
        """The tensor on `device` in `dtype`, from the file's checked byte range.

        The bytes are read with a plain read-only open. tinygrad's DISK device would open the
        file read-write (failing on a read-only checkpoint, and extending a file shorter than
        asked for) and keeps one mapping per path for the whole process.
        """
        tensor, view = self.direct(device, dtype)
        if view is not None:
            self.read_into(view)
            return tensor
        return self.converted(device, dtype)

    def direct(self, device: str, dtype: DType) -> tuple[Tensor | None, memoryview | None]:
        """Where the file's bytes are already `dtype` and the device is host memory: a new tensor and
        the view of its buffer that read_into fills (the bytes go straight in, no copy); else (None, None)."""
        if FILE_DTYPES[self.dtype] == _tinygrad.numpy_dtype(dtype) and sys.byteorder == "little":
            return _tinygrad.host_tensor(self.shape, dtype, device)
        return None, None

    def converted(self, device: str, dtype: DType) -> Tensor:
        """The tensor read into numpy, converted to `dtype` there and uploaded."""
        array = self.array()
        # numpy rounds to nearest even when narrowing, as tinygrad's casts do
        return _tinygrad.from_numpy(array.astype(_tinygrad.numpy_dtype(dtype), copy=False), device)

    def array(self) -> np.ndarray:
        """The stored values as a numpy array of this shape, in native byte order, exactly: float16,
        float32 or float64 as stored, bfloat16 as float32 (for arithmetic before upload, such as
        folding a batch norm into its convolution)."""
        array = np.empty(math.prod(self.shape), FILE_DTYPES[self.dtype])
        self.read_into(memoryview(array).cast("B"))
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        if self.dtype == "BF16":   # bfloat16's 16 bits are the top half of a float32: exact
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(self.shape)

    def read_into(self, target: memoryview) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                got = f.readinto(target)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {_short(self.key)} ({e.strerror or e})") from None
        if got != self.end - self.start:
            raise CheckpointError(f"{self.path}: ended after {got} of the {self.end - self.start} bytes of tensor "
                                  f"{_short(self.key)}; the file changed while it was being read. Load it again.")


def read_safetensors_header(path: pathlib.Path, skip=None) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; every problem names the file and the key. Entries whose
    key `skip(key)` is true are left out unchecked (a format's bookkeeping that is no parameter,
    such as a batch norm's integer num_batches_tracked)."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):   # a FIFO or device would block or never end
            raise CheckpointError(f"{path}: not a regular file; a checkpoint's weights are a safetensors file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; a header needs at least 8). "
                                      "Download or convert the checkpoint again.")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes): "
                                      "the file is truncated or not safetensors. Download it again.")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; "
                                      "not a valid safetensors file")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:   # "[[[[..." nested deeper than the JSON parser's recursion limit
        raise CheckpointError(f"{path}: the safetensors header nests too deeply to be a tensor table; "
                              "the file is corrupt") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        # ValueError also covers integers of more than sys.get_int_max_str_digits() digits.
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({_short(e)}); "
                              "the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")

    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__" or (skip is not None and skip(key)):
            continue
        infos[key] = _check_entry(path, key, entry, data_start, data_len)
    spans = sorted((i.start, i.end, i.key) for i in infos.values() if i.end > i.start)
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {_short(k0)} and {_short(k1)} overlap in the file (bytes "
                                  f"{s0}-{e0} and {s1}-{e1}); the header is corrupt")
    return infos


def _no_duplicates(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {_short(k)}")
        seen.add(k)
    return dict(pairs)


def _short(value) -> str:
    """repr(value) for an error message, cut to MAX_SHOWN characters (see `cut`)."""
    try:
        return cut(str(value) if isinstance(value, BaseException) else repr(value))
    except ValueError:   # an integer with more digits than sys.get_int_max_str_digits() allows
        return f"<{type(value).__name__} too long to print>"


def cut(text: str) -> str:
    """`text`, cut to MAX_SHOWN characters: a hostile header can hold megabyte-long names and shapes."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + f"... ({len(text)} characters)"


def _stored_size(shape: list[int], itemsize: int, limit: int) -> int | None:
    """Bytes that `shape` needs, or None when that exceeds `limit`; stops multiplying as soon as
    the product passes the limit, so a shape of a million huge dimensions costs no more than a read."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _check_entry(path, key, entry, data_start, data_len) -> TensorInfo:
    where = f"{path}: tensor {_short(key)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FILE_DTYPES:
        kind = "a non-float dtype" if dtype in KNOWN_NON_FLOAT else "an unknown dtype"
        raise CheckpointError(f"{where} has {kind} {_short(dtype)}; CLIP parameters must be one of "
                              f"{', '.join(FILE_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{where}: data_offsets {_short(offsets)} lie outside the {data_len} data bytes of "
                              "the file; the file is truncated or its header is corrupt")
    want = _stored_size(shape, FILE_DTYPES[dtype].itemsize, data_len)
    if want != end - begin:
        need = f"need {want}" if want is not None else f"need more than the file's {data_len}"
        raise CheckpointError(f"{where}: {end - begin} bytes stored but dtype {dtype} and shape {_short(shape)} "
                              f"{need}; the header is corrupt")
    return TensorInfo(path, key, dtype, tuple(shape), data_start + begin, data_start + end)


def checkpoint_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index lists."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return [inside_checkpoint(single, folder)]
    if index.is_file():
        return [inside_checkpoint(shard, folder) for shard in _shards(inside_checkpoint(index, folder))]
    unsafe = [name for name in UNSAFE_FORMATS if (folder / name).exists()]
    if unsafe:
        raise CheckpointError(
            f"{folder}: has {', '.join(unsafe)} but no {SINGLE_FILE}; tinyclip reads only safetensors and never "
            "unpickles. Convert it once with transformers: CLIPModel.from_pretrained(folder)"
            ".save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face CLIPModel folder?")


def inside_checkpoint(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """`path`, after checking that it does not lead out of the checkpoint through a symbolic link.

    A file may resolve anywhere inside the folder or, when the folder is a snapshot in a Hugging
    Face cache (`.../models--org--name/snapshots/<commit>/`), anywhere inside that repository's
    `models--org--name/` folder: the cache stores snapshot files as links to `../../blobs/<hash>`.
    """
    real = path.resolve()
    roots = _checkpoint_roots(folder)
    if not any(real.is_relative_to(root) for root in roots):
        raise CheckpointError(
            f"{path}: is a symbolic link to {real}, outside the checkpoint folder {roots[0]}"
            + (f" and its Hugging Face cache repository {roots[-1]}" if len(roots) > 1 else "")
            + "; tinyclip reads weights only from inside the checkpoint. If you trust the file, copy it in.")
    return path


def _checkpoint_roots(folder: pathlib.Path) -> list[pathlib.Path]:
    """The folder (resolved), then the `models--*` folder of the hub cache it is a snapshot in, if any."""
    roots = [folder.resolve()]
    for candidate in (pathlib.Path(os.path.abspath(folder)), roots[0]):
        parts = candidate.parts
        for i in range(len(parts) - 2, 0, -1):     # "snapshots" must have the snapshot folder below it
            if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
                repo = pathlib.Path(*parts[:i]).resolve()
                if repo not in roots:
                    roots.append(repo)
                break
    return roots


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
    advice = "a shard index is JSON with a 'weight_map' object"
    index_json = read_json(index, CheckpointError, what="a JSON object", advice=advice)
    if "weight_map" not in index_json:
        raise CheckpointError(f"{index}: not a valid shard index, no 'weight_map' key; {advice}")
    weight_map = index_json["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    names = []
    for key, name in weight_map.items():
        # HF writes bare file names; anything with a directory part could read outside the checkpoint.
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", "..") \
                or "\\" in name or pathlib.PurePath(name).is_absolute():
            raise CheckpointError(f"{index}: tensor {key!r} points to {name!r}; shard entries must be plain file "
                                  "names inside the checkpoint folder")
        if name not in names:
            names.append(name)
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"{index}: lists shard(s) {', '.join(missing)} that are not in {index.parent}")
    return [index.parent / n for n in names]


def read_safetensors_headers(files: list[pathlib.Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_safetensors_header(path).items():
            if key in infos:
                raise CheckpointError(f"tensor {_short(key)} appears in both {infos[key].path} and {path}")
            infos[key] = info
    return infos


def load_weights(model, folder: pathlib.Path, dtype: DType, device: str, only=None, checked=None) -> None:
    """Fill `model`'s parameters from the folder's safetensors, after checking every key and shape.

    Every missing, unexpected and mis-shaped key is reported at once. `only(key)`, when given, picks the
    parameters to read now (tinyclip/towers.py reads each tower on its first use); every key's presence is
    checked all the same, and the shape of those `checked(key)` accepts (default: those read; a parameter
    that a kernel set already stores its own way has another shape than the checkpoint's).
    """
    files = checkpoint_files(folder)
    infos = read_safetensors_headers(files)
    params = get_state_dict(model)
    where = files[0].name if len(files) == 1 else f"{INDEX_FILE} ({len(files)} shards)"
    missing = sorted(k for k in params if k not in infos)
    unexpected = sorted(cut(k) for k in infos if k not in params and k not in NON_PARAMETERS)
    checked = checked or only or (lambda key: True)
    misshaped = sorted(f"{k}: checkpoint {cut(str(list(infos[k].shape)))}, config.json implies "
                       f"{list(params[k].shape)}"
                       for k in params if k in infos and checked(k) and not same_shape(infos[k].shape, params[k].shape))
    if missing or unexpected or misshaped:
        raise mismatch_error(f"{folder / where} does not match config.json", missing, unexpected, misshaped,
                             "Check that the folder holds a CLIPModel checkpoint (not a CLIPVisionModel or "
                             "CLIPTextModel alone) and that config.json belongs to these weights.")
    # Tensors whose bytes go straight into host buffers are read by READ_THREADS threads at once (file reads
    # release the GIL, and filling fresh memory costs a page fault per page, which one core does at about
    # 1.2 GB/s: half a second for ViT-B/32); tinygrad's own objects are made on this thread only.
    if only is not None:
        params = {key: param for key, param in params.items() if only(key)}
    loaded, reads = {}, []
    for key in params:
        tensor, view = infos[key].direct(device, dtype)
        if view is None:
            tensor = infos[key].converted(device, dtype)
        else:
            reads.append((infos[key], view))
        loaded[key] = tensor
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for _ in pool.map(lambda job: job[0].read_into(job[1]), reads):
            pass   # re-raises the first CheckpointError; leaving the pool waits for the other reads
    for key, param in params.items():
        tensor = loaded[key]
        param.replace(tensor if tensor.shape == param.shape else tensor.reshape(param.shape))


def mismatch_error(title: str, missing: list[str], unexpected: list[str], misshaped: list[str],
                   advice: str) -> CheckpointError:
    """One error listing every missing, unexpected and mis-shaped key (20 of each at most)."""
    parts = [f"{title}:"]
    for heading, items in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("shape mismatches", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            parts.append(f"  {len(items)} {heading}:\n    " + "\n    ".join(shown))
    parts.append(advice)
    return CheckpointError("\n".join(parts))


def same_shape(stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # logit_scale is a scalar in transformers but was saved as (1,) by some converters.
    return tuple(stored) == tuple(expected) or {tuple(stored), tuple(expected)} == {(), (1,)}
