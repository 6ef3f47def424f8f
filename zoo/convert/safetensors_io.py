"""Streaming safetensors reading and writing, one tensor at a time.

Reads memory-map each file and hand out one tensor at a time (bf16 and fp8 through ml_dtypes, which
the numpy backend of the `safetensors` package lacks). Writes fill one shard at a time.

Block-quantised weights are dequantised as they are read: a weight `<p>.weight` with a scale tensor
`<p>.scale` (DeepSeek) or `<p>.weight_scale_inv` (Hugging Face) is either FP8 e4m3 with one scale per
128 x 128 block, or FP4 e2m1 packed two to an int8 byte (low nibble first) with one scale per 32 inputs;
scales are float32, bfloat16 or UE8M0 (a bare power-of-two exponent).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_BLOCK = 128   # FP8 weights: one scale per FP8_BLOCK x FP8_BLOCK block
FP4_GROUP = 32    # FP4 weights: one scale per FP4_GROUP consecutive inputs
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """int8 [..., n] holding two e2m1 codes per byte (low nibble first) -> float32 [..., 2n]."""
    codes = packed.view(np.uint8)
    pairs = np.stack([FP4_VALUES[codes & 0xF], FP4_VALUES[codes >> 4]], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 weight from FP8 (e4m3, scale per 128 x 128 block) or packed FP4 (int8, scale per 32 inputs)."""
    scale = scale.astype(np.float32)
    if weight.dtype in (np.int8, np.uint8):
        values = unpack_fp4(weight)
        return values * np.repeat(scale, FP4_GROUP, axis=-1)[..., :values.shape[-1]]
    rows, cols = weight.shape[-2:]
    scale = np.repeat(np.repeat(scale, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)[..., :rows, :cols]
    return weight.astype(np.float32) * scale


def read_json(file: str) -> dict:
    """A JSON object from `file`; invalid JSON is reported with the file's name."""
    try:
        with open(file) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not valid JSON: not UTF-8 text") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def read_header(file: str) -> tuple[dict, int]:
    """(tensor infos by name, offset of the data) of a safetensors file, checked against the file's size
    so a damaged or foreign file is named instead of failing in allocation or memory mapping."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file: {size} bytes, shorter than its header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{file} is not a safetensors file or is truncated: its header claims "
                             f"{header_len} bytes but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{file} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + header_len
    for key, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(n) for n in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: tensor {key!r} has a malformed header entry") from None
        if not 0 <= start <= end or base + end > size:
            raise ValueError(f"{file} is truncated or damaged: tensor {key!r} needs bytes {base + start}-"
                             f"{base + end} but the file has {size}")
        if dtype in DTYPES and end - start != int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize:
            raise ValueError(f"{file}: tensor {key!r} of shape {shape} and dtype {dtype} does not fill "
                             f"its {end - start} bytes")
    return header, base


class SafetensorsDir:
    """The tensors of a checkpoint directory: `model.safetensors`, or shards listed in the index."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no `weight_map` object")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no safetensors weights in {path}")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"checkpoint shard {file} is missing (listed in {INDEX})")
            header, base = read_header(file)
            for key, info in header.items():
                self._where[key] = (file, info, base)
        self.files = [os.path.join(path, name) for name in files]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def scale_of(self, name: str) -> str | None:
        """The block-scale tensor of a quantised weight, if `name` has one."""
        stem = name[:-len("weight")] if name.endswith("weight") else None
        for scale in ((stem + "scale",) if stem else ()) + (name + "_scale_inv",):
            if scale in self._where:
                return scale
        return None

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """The shape after dequantisation (packed FP4 holds two inputs per byte)."""
        shape = self.shape(name)
        if self.scale_of(name) and self._where[name][1]["dtype"] in ("I8", "U8"):
            return shape[:-1] + (2 * shape[-1],)
        return shape

    def get_float32(self, name: str) -> np.ndarray:
        """One tensor as float32, dequantised with its block scales when it has them."""
        scale = self.scale_of(name)
        if scale is None:
            return self.get(name).astype(np.float32)
        return dequantize(self.get(name), self.get(scale))

    def get(self, name: str) -> np.ndarray:
        """A copy of one tensor (the file is memory-mapped, so only this tensor is read)."""
        if name not in self._where:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        file, info, base = self._where[name]
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
        except KeyError:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}") from None
        start, end = info["data_offsets"]
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return np.array(data.view(dtype).reshape(info["shape"]))


def write_shards(tensors: Iterable[tuple[str, np.ndarray]], path: str, *, max_shard_bytes: int = 2 << 30,
                 metadata: dict | None = None) -> list[str]:
    """Writes (name, array) pairs into shards of at most `max_shard_bytes`, holding one shard in memory;
    adds the index file when there is more than one shard. Returns the file names."""
    os.makedirs(path, exist_ok=True)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    current: list[tuple[str, np.ndarray]] = []
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(files) + 1:05d}.safetensors.part"
            _write_file(os.path.join(path, name), current, metadata)
            files.append(name)
            for key, _ in current:
                weight_map[key] = name
            current, size = [], 0

    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if current and size + array.nbytes > max_shard_bytes:
            flush()
        current.append((key, array))
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(files) == 1:
        final = [SINGLE]
    else:
        final = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    renames = dict(zip(files, final))
    for old, new in renames.items():
        os.replace(os.path.join(path, old), os.path.join(path, new))
    if len(final) > 1:
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {k: renames[v] for k, v in weight_map.items()}}, f, indent=2)
    return final


def _write_file(file: str, tensors: list[tuple[str, np.ndarray]], metadata: dict | None) -> None:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, array in tensors:
        header[key] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(array.tobytes())

