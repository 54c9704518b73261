"""safetensors files written one tensor at a time and read by header, so no step holds a whole file.

`safetensors.torch.save_file` needs every tensor of a file in memory at once (DCP's safetensors writer even
builds the whole file as bytes). A sharded checkpoint or a 100B export writes far more than fits, so the
header (names, dtypes, shapes, byte offsets: all known before any data) goes first and the tensors follow in
header order. The file's sha256 is computed as the bytes go out: each file is hashed once, while written.
Format: https://huggingface.co/docs/safetensors (8-byte little-endian header length, JSON header padded to a
multiple of 8 with spaces, then the raw little-endian tensor bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kmoe.hashing import itemsize, tensor_raw

DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPE_CODES.items()}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (message names it)."""


class StreamWriter:
    """Write `specs` = [(name, dtype name, shape)] in that order; `add` each tensor, then `close`.

    `close` returns (sha256 hex, bytes written) and fsyncs the file.
    """

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):  # fmt: skip
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {})} if metadata else {}
        self.sizes: list[tuple[str, int]] = []
        pos = 0
        for name, dtype, shape in specs:
            n = itemsize(dtype)
            for s in shape:
                n *= int(s)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [pos, pos + n],
            }
            self.sizes.append((name, n))
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._sha = hashlib.sha256()
        self._f = open(self.path, "wb")  # noqa: SIM115 -- closed by close()
        self._next, self.total = 0, 8 + len(raw) + pos
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: Any) -> None:
        self._f.write(data)
        self._sha.update(data)

    def add(self, name: str, tensor: Any) -> None:
        """The next tensor, in header order (torch or numpy; its bytes as laid out, little-endian)."""
        want, n = self.sizes[self._next]
        _, _, raw = tensor_raw(tensor)
        if name != want or raw.size != n:
            raise SafetensorsError(
                f"{self.path}: got {name} ({raw.size} bytes), header expects {want} ({n} bytes)"
            )
        self._put(memoryview(raw))
        self._next += 1

    def close(self) -> tuple[str, int]:
        if self._next != len(self.sizes):
            raise SafetensorsError(f"{self.path}: closed after {self._next} of {len(self.sizes)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._sha.hexdigest(), self.total


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header dict, offset of the data section) without reading any tensor."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{path}: truncated (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise SafetensorsError(f"{path}: header length {n} is not plausible")
            raw = f.read(n)
            if len(raw) != n:
                raise SafetensorsError(f"{path}: truncated inside its header")
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise SafetensorsError(f"{path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise SafetensorsError(
            f"{path}: {size} bytes on disk but its header describes {8 + n + end} (truncated or padded)"
        )
    return header, 8 + n
