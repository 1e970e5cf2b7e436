"""A light GGUF reader: scalar metadata and the tensor table, without the vocabulary.

`gguf.GGUFReader` turns every metadata item into numpy views, two per string: for a 49 k-token
vocabulary and its merges that is about 160 MB of Python objects, held for as long as the
reader lives. Loading and sizing need only the scalar metadata, array lengths and the tensor
table, so this reader parses those (long arrays are skipped, only their length is kept) and maps
a tensor's bytes only when asked. The tokenizer is still read by transformers, in the frontend.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
KEEP_ARRAY_ITEMS = 64  # longer arrays (vocabularies, merges, scores) keep their length only
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9
# ggml types that gguf's reader maps as their own numpy dtype (the rest are bytes of blocks)
PLAIN_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                GGMLQuantizationType.I64: np.int64}


class SkippedArray:
    """A long metadata array that was not read: only its length is known."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TableTensor:
    """One tensor-table entry; `shape` is in ggml order (columns first), like gguf's reader."""

    path: str
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes mapped read-only, shaped as `gguf.GGUFReader` shapes them."""
        dims = tuple(reversed(self.shape))
        dtype = PLAIN_DTYPES.get(self.tensor_type)
        if dtype is None:  # quantized: rows of block bytes
            block, size = GGML_QUANT_SIZES[self.tensor_type]
            dtype, dims = np.uint8, (*dims[:-1], dims[-1] // block * size)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_offset, shape=dims)


@dataclass(frozen=True)
class DataFile:
    filename: str  # what iter_gguf reads packed bytes from (gguf's reader has data.filename)


class HeaderTruncated(ValueError):
    """The bytes given end inside the header: read more of the file and parse again."""


class GGUFTable:
    """Metadata (`fields`: key -> value) and `tensors` of a GGUF file.

    The first part of a split file (`NAME-00001-of-0000N.gguf`, as llama.cpp's gguf-split
    writes it) opens all its parts: metadata from the first, tensors from every part (each
    tensor knows its own file). `data_start` is where the first part's tensor data begins.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data = DataFile(path)
        self.parts = split_part_paths(path)
        self.fields, self.tensors, self.data_start = _parse_file(self.parts[0])
        for part in self.parts[1:]:
            self.tensors += _parse_file(part)[1]


SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_names(name: str) -> list[str]:
    """All part names of a split GGUF given its first part's name; [name] for any other file.
    Raises ValueError for a later part (the first part carries the metadata)."""
    match = SPLIT_NAME.match(name)
    if not match:
        return [name]
    if int(match.group("part")) != 1:
        raise ValueError(f"{name} is part {int(match.group('part'))} of a split GGUF: pass its "
                         "first part (-00001-of-...)")
    count, stem = match.group("count"), match.group("stem")
    return [f"{stem}-{i:05d}-of-{count}.gguf" for i in range(1, int(count) + 1)]


def split_part_paths(path: str) -> list[str]:
    """`split_part_names` for a path; a missing part is a ValueError naming it."""
    folder, name = os.path.split(path)
    paths = [os.path.join(folder, part) for part in split_part_names(name)]
    missing = [p for p in paths[1:] if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"split GGUF {path}: part {missing[0]} is missing")
    return paths


def _parse_file(path: str) -> tuple[dict[str, Any], list[TableTensor], int]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf, \
            memoryview(buf) as view:
        return _parse(view, path)


def parse_header(buf: bytes | memoryview,
                 path: str) -> tuple[dict[str, Any], list[TableTensor], int]:
    """Parse the header at the start of a GGUF file: (fields, tensors, data_start).

    Raises HeaderTruncated when `buf` ends before the tensor data starts (read more),
    ValueError when it is not a GGUF file.
    """
    try:
        fields, tensors, data_start = _parse(memoryview(buf), path)
    except (struct.error, IndexError) as exc:
        raise HeaderTruncated(f"header longer than {len(buf)} bytes") from exc
    if data_start > len(buf):
        raise HeaderTruncated(f"header ends at {data_start}, after {len(buf)} bytes")
    return fields, tensors, data_start


def _parse(buf: memoryview, path: str) -> tuple[dict[str, Any], list[TableTensor], int]:
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("no GGUF magic")
    version, = struct.unpack_from("<I", buf, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or 3 are)")
    num_tensors, num_fields = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string() -> str:
        nonlocal pos
        length, = struct.unpack_from("<Q", buf, pos)
        if pos + 8 + length > len(buf):
            raise IndexError("string past the end")
        value = bytes(buf[pos + 8 : pos + 8 + length]).decode("utf-8", errors="replace")
        pos += 8 + length
        return value

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == STRING:
            return string()
        if kind == ARRAY:
            item_kind, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if count <= KEEP_ARRAY_ITEMS:
                return [value(item_kind) for _ in range(count)]
            if item_kind == STRING:  # skip without decoding: only the lengths are read
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            elif item_kind in SCALARS:
                pos += count * struct.calcsize("<" + SCALARS[item_kind])
            else:
                raise ValueError(f"nested GGUF arrays of type {item_kind} are not supported")
            return SkippedArray(count)
        fmt = "<" + SCALARS[kind]
        result, = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return result

    fields: dict[str, Any] = {}
    for _ in range(num_fields):
        key = string()
        kind, = struct.unpack_from("<I", buf, pos)
        pos += 4
        fields[key] = value(kind)
    entries = []
    for _ in range(num_tensors):
        name = string()
        n_dims, = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, tuple(int(d) for d in dims), GGMLQuantizationType(kind), offset))
    alignment = int(fields.get("general.alignment", 32))
    start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, dims, qtype, offset in entries:
        block, size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims))
        tensors.append(TableTensor(path, name, qtype, dims, n_elements,
                                   n_elements // block * size, start + offset))
    return fields, tensors, start
