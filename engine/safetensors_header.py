"""Reading a safetensors header without loading tensors, with clear errors for damaged files.

Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {str: str}}, then the data. safetensors' own errors ("HeaderTooLarge", "invalid
JSON") do not say what the user should do, so the header is checked here first.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import FileFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path) -> Header:
    path = os.fspath(path)
    hint = "re-download or re-export the file; it must be a complete .safetensors file"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise FileFormatError("file is too short to be a safetensors file", path=path, hint=hint)
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FileFormatError(f"not a safetensors file or truncated (header length {n}, file size {size})",
                                      path=path, hint=hint)
            raw = f.read(n)
    except FileNotFoundError:
        raise FileFormatError("file not found", path=path, hint="check the path or the models folder") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"not a safetensors file (header is not JSON: {exc})", path=path, hint=hint) from None
    if not isinstance(obj, dict):
        raise FileFormatError("not a safetensors file (header is not a JSON object)", path=path, hint=hint)
    data_start = 8 + n
    metadata = obj.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in obj.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FileFormatError("malformed header entry", path=path, tensor=name, hint=hint) from None
        entry = TensorEntry(name, dtype, shape, data_start + int(b), data_start + int(e))
        count = 1
        for s in shape:
            count *= s
        if dtype in DTYPE_SIZES and entry.nbytes != count * DTYPE_SIZES[dtype]:
            raise FileFormatError(f"header says {dtype}{list(shape)} but stores {entry.nbytes} bytes",
                                  path=path, tensor=name, hint=hint)
        if entry.end > size:
            raise FileFormatError(f"file is truncated: the tensor ends at byte {entry.end} of {size}",
                                  path=path, tensor=name, hint=hint)
        tensors[name] = entry
    return Header(path, tensors, dict(metadata), data_start, size)
