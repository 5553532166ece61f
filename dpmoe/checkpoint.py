"""Reading tensors from a safetensors checkpoint directory, memory-mapped, without torch.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
(plus an optional ``"__metadata__"``), then the raw little-endian data; offsets count from
the end of the header. A sharded checkpoint adds ``model.safetensors.index.json`` whose
``weight_map`` names each tensor's file.

:class:`Checkpoint` checks every header it opens (offsets inside the file, no overlaps,
sizes that match dtype and shape) and hands out read-only NumPy views of the mapped file:
a tensor's bytes are read from disk (or the page cache) only when they are used, so
taking one layer's experts reads only those.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from typing import Any

import ml_dtypes
import numpy as np

# safetensors dtype names -> NumPy dtypes (16-bit and 8-bit floats through ml_dtypes)
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# larger JSON headers than this are not a checkpoint's (the format caps them at 100 MB)
MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims: names the file and tensor."""


def _json(path: str, raw: bytes | None = None) -> Any:
    """A JSON file (or its bytes), every failure a CheckpointError naming it. Only regular
    files are opened (a FIFO would block)."""
    try:
        if raw is None:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise CheckpointError(f"{path}: not a regular file")
            with open(path, "rb") as f:
                raw = f.read()
        return json.loads(raw)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not JSON ({type(e).__name__}: {e})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _File:
    """One safetensors file: its checked header and a read-only map of its bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the file ({e.strerror})") from None
        if size < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, not even a header length")
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > min(MAX_HEADER, size - 8):
                    raise CheckpointError(f"{path}: header length {length} runs past the file "
                                          f"({size} bytes): truncated or not safetensors")
                header = _json(f"{path} (its header)", f.read(length))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the file ({e.strerror})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the header is not a JSON object")
        self.start = 8 + length
        data_size = size - self.start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            self.entries[name] = self._entry(name, entry, data_size)
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.entries.items())
        for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(f"{path}: tensors {name!r} and {other!r} overlap "
                                      f"(bytes {begin} < {end})")

    def _entry(self, name: str, entry: Any, data_size: int) -> tuple:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where}: malformed header entry {str(entry)[:200]}") from None
        if not (isinstance(shape, list) and all(map(_is_int, shape)) and _is_int(begin)
                and _is_int(end) and isinstance(dtype_name, str)):
            raise CheckpointError(f"{where}: malformed header entry (dtype a string, shape and "
                                  f"data_offsets integers): {str(entry)[:200]}")
        shape = tuple(shape)
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype_name!r} "
                                  f"(dpmoe reads {sorted(DTYPES)})")
        dtype = DTYPES[dtype_name]
        if any(n < 0 for n in shape) or not 0 <= begin <= end:
            raise CheckpointError(f"{where}: bad shape {shape} or offsets [{begin}, {end}]")
        if end > data_size:
            raise CheckpointError(f"{where}: data [{begin}, {end}) runs past the end of the "
                                  f"file's {data_size} data bytes (truncated?)")
        if end - begin != math.prod(shape) * dtype.itemsize:  # Python ints: no overflow
            raise CheckpointError(f"{where}: {end - begin} bytes for shape {shape} of "
                                  f"{dtype_name}")
        return dtype, shape, begin, end

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return np.empty(shape, dtype)
        return np.frombuffer(self._map, dtype, (end - begin) // dtype.itemsize,
                             self.start + begin).reshape(shape)


class Checkpoint:
    """A model directory: ``config.json`` and its safetensors file(s).

    Args:
        path: the directory (``model.safetensors``, or ``model.safetensors.index.json`` and
            the shards it names).

    ``config`` is the parsed config.json; :meth:`tensor` returns a read-only NumPy array
    mapped from the file (bf16 as ``ml_dtypes.bfloat16``, F8_E4M3 as
    ``ml_dtypes.float8_e4m3fn``). Every error is a :class:`CheckpointError` (a
    ``ValueError``) naming the file and the tensor.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory")
        config = os.path.join(self.path, "config.json")
        self.config: dict = _json(config)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config}: not a JSON object")
        self._files: dict[str, _File] = {}
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            try:
                weight_map = _json(index)["weight_map"]
                self._where = {str(k): str(v) for k, v in weight_map.items()}
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for shard in sorted(set(self._where.values())):
                if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                    raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the "
                                          "model's directory")
                if not os.path.isfile(os.path.join(self.path, shard)):
                    names = sorted(k for k, v in self._where.items() if v == shard)
                    raise CheckpointError(f"{os.path.join(self.path, shard)}: the shard the "
                                          f"index names for {names[0]!r} (and {len(names) - 1} "
                                          "more) is missing")
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            self._where = {name: SINGLE for name in self._file(SINGLE).entries}
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE} nor {INDEX}")

    def _file(self, shard: str) -> _File:
        if shard not in self._files:
            self._files[shard] = _File(os.path.join(self.path, shard))
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self, prefix: str = "") -> list[str]:
        """The tensor names that start with ``prefix``, sorted."""
        return sorted(n for n in self._where if n.startswith(prefix))

    def _entry(self, name: str) -> tuple[_File, tuple]:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        file = self._file(self._where[name])
        if name not in file.entries:
            raise CheckpointError(f"{file.path}: tensor {name!r} is missing from the file "
                                  "(the index names this shard for it)")
        return file, file.entries[name]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name``, read-only, mapped from its file."""
        file, _ = self._entry(name)
        return file.tensor(name)

    def location(self, name: str) -> tuple[str, int, int]:
        """(file path, byte offset in the file, byte count) of tensor ``name``'s data."""
        file, (_, _, begin, end) = self._entry(name)
        return file.path, file.start + begin, end - begin
