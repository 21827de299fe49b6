"""Reading CLIP weights from safetensors files, strictly.

tinygrad's own `safe_load` trusts the header (offsets, sizes); this module
parses and checks it first, with plain Python on a bounded read, and only then
lets tinygrad map the checked byte ranges of the file onto the target device.
Nothing here ever unpickles: a folder with only pytorch_model.bin is refused.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.nn.state import get_state_dict

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
UNSAFE_FORMATS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
MAX_HEADER_BYTES = 100 * 1024 * 1024       # the safetensors reference implementation's own limit
# Buffers that transformers saved in older checkpoints; they are not parameters.
NON_PARAMETERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# safetensors dtype name -> (tinygrad dtype, bytes per element); floats only: CLIP's parameters are floats.
SAFE_DTYPES = {"F16": (dtypes.float16, 2), "BF16": (dtypes.bfloat16, 2), "F32": (dtypes.float32, 4),
               "F64": (dtypes.float64, 8)}
KNOWN_NON_FLOAT = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2")


class TensorInfo:
    """One checked header entry: where its bytes are and what they hold."""

    def __init__(self, path: pathlib.Path, key: str, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.path, self.key, self.dtype, self.shape, self.start, self.end = path, key, dtype, shape, start, end

    def load(self, device: str, dtype: DType) -> Tensor:
        """The tensor on `device` in `dtype`, read straight from the file's checked byte range."""
        src_dtype, _ = SAFE_DTYPES[self.dtype]
        disk = Tensor(self.path)[self.start:self.end]
        t = disk.bitcast(src_dtype).reshape(self.shape).to(device)
        return t if src_dtype == dtype else t.cast(dtype)


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; every problem names the file and the key."""
    try:
        size = path.stat().st_size
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
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")

    data_start, data_len = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        infos[key] = _check_entry(path, key, entry, data_start, data_len)
    spans = sorted((i.start, i.end, i.key) for i in infos.values() if i.end > i.start)
    for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap in the file (bytes {s0}-{e0} and "
                                  f"{s1}-{e1}); the header is corrupt")
    return infos


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _check_entry(path, key, entry, data_start, data_len) -> TensorInfo:
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFE_DTYPES:
        kind = "a non-float dtype" if dtype in KNOWN_NON_FLOAT else "an unknown dtype"
        raise CheckpointError(f"{where} has {kind} {dtype!r}; CLIP parameters must be one of {', '.join(SAFE_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and
            all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} lie outside the {data_len} data bytes of the file; "
                              "the file is truncated or its header is corrupt")
    want = math.prod(shape) * SAFE_DTYPES[dtype][1]
    if end - begin != want:
        raise CheckpointError(f"{where}: {end - begin} bytes stored but dtype {dtype} and shape {shape} need {want}; "
                              "the header is corrupt")
    return TensorInfo(path, key, dtype, tuple(shape), data_start + begin, data_start + end)


def checkpoint_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index lists."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        return _shards(index)
    unsafe = [name for name in UNSAFE_FORMATS if (folder / name).exists()]
    if unsafe:
        raise CheckpointError(
            f"{folder}: has {', '.join(unsafe)} but no {SINGLE_FILE}; tinyclip reads only safetensors and never "
            "unpickles. Convert it once with transformers: CLIPModel.from_pretrained(folder)"
            ".save_pretrained(out, safe_serialization=True)")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face CLIPModel folder?")


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index (JSON with a 'weight_map' object): {e}") from None
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


def read_headers(files: list[pathlib.Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_header(path).items():
            if key in infos:
                raise CheckpointError(f"tensor {key!r} appears in both {infos[key].path} and {path}")
            infos[key] = info
    return infos


def load_weights(model, folder: pathlib.Path, dtype: DType, device: str) -> None:
    """Fill `model`'s parameters from the folder's safetensors, after checking every key and shape.

    Every missing, unexpected and mis-shaped key is reported at once.
    """
    files = checkpoint_files(folder)
    infos = read_headers(files)
    params = get_state_dict(model)
    where = files[0].name if len(files) == 1 else f"{INDEX_FILE} ({len(files)} shards)"
    missing = sorted(k for k in params if k not in infos)
    unexpected = sorted(k for k in infos if k not in params and k not in NON_PARAMETERS)
    misshaped = sorted(f"{k}: checkpoint {list(infos[k].shape)}, config.json implies {list(params[k].shape)}"
                       for k in params if k in infos and not _same_shape(infos[k].shape, params[k].shape))
    if missing or unexpected or misshaped:
        parts = [f"{folder / where} does not match config.json:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {len(items)} {title}:\n    " + "\n    ".join(shown))
        parts.append("Check that the folder holds a CLIPModel checkpoint (not a CLIPVisionModel or "
                     "CLIPTextModel alone) and that config.json belongs to these weights.")
        raise CheckpointError("\n".join(parts))
    for key, param in params.items():
        param.replace(infos[key].load(device, dtype).reshape(param.shape)).realize()


def _same_shape(stored: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # logit_scale is a scalar in transformers but was saved as (1,) by some converters.
    return tuple(stored) == tuple(expected) or {tuple(stored), tuple(expected)} == {(), (1,)}
