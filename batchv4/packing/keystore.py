"""Row keys spilled to disk, by input ordinal, so that memory does not grow with the row count.

Owns a small typed encoding (never pickle) of the key types rows usually carry: None, bool, int,
float, str, bytes and tuples of these. A key of any other type stays in memory in a side table
(memory then grows with such rows only). Does not own tokens or buckets (spill.py).
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

_INT64 = struct.Struct("<q")
_FLOAT = struct.Struct("<d")
_U32 = struct.Struct("<I")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_IN_MEMORY = b"m"


def encode_key(key: object) -> bytes | None:
    """Bytes that decode_key turns back into an equal key of the same type, or None if unsupported."""
    kind = type(key)
    if kind is int:
        if _INT64_MIN <= key <= _INT64_MAX:  # type: ignore[operator]
            return b"i" + _INT64.pack(key)
        return b"I" + str(key).encode("ascii")
    if kind is str:
        return b"s" + key.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]
    if key is None:
        return b"N"
    if kind is bool:
        return b"T" if key else b"F"
    if kind is bytes:
        return b"b" + key  # type: ignore[operator]
    if kind is float:
        return b"f" + _FLOAT.pack(key)
    if kind is tuple:
        parts = [b"t", _U32.pack(len(key))]  # type: ignore[arg-type]
        for element in key:  # type: ignore[union-attr]
            encoded = encode_key(element)
            if encoded is None:
                return None
            parts.append(_U32.pack(len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    return None


def decode_key(data: bytes) -> object:
    """Inverse of encode_key."""
    tag = data[:1]
    if tag == b"i":
        return _INT64.unpack(data[1:])[0]
    if tag == b"s":
        return data[1:].decode("utf-8", "surrogatepass")
    if tag == b"N":
        return None
    if tag == b"T":
        return True
    if tag == b"F":
        return False
    if tag == b"b":
        return bytes(data[1:])
    if tag == b"f":
        return _FLOAT.unpack(data[1:])[0]
    if tag == b"I":
        return int(data[1:].decode("ascii"))
    if tag == b"t":
        count = _U32.unpack_from(data, 1)[0]
        pos = 5
        out = []
        for _ in range(count):
            size = _U32.unpack_from(data, pos)[0]
            out.append(decode_key(data[pos + 4:pos + 4 + size]))
            pos += 4 + size
        return tuple(out)
    raise ValueError(f"corrupt key record with tag {tag!r}")


class KeyStore:
    """Append-only store of keys by ordinal (0, 1, 2, ... in order); read back after `seal()`."""

    def __init__(self, directory: str) -> None:
        self._blob_path = os.path.join(directory, "keys.bin")
        self._ends_path = os.path.join(directory, "keys.end")
        self._buffer: list[bytes] = []
        self._ends: list[int] = []
        self._size = 0
        self._count = 0
        self._memory: dict[int, object] = {}
        self._blob: mmap.mmap | bytes | None = None
        self._ends_map: np.ndarray | None = None
        open(self._blob_path, "wb").close()
        open(self._ends_path, "wb").close()

    def __len__(self) -> int:
        return self._count

    def add(self, key: object) -> int:
        """Store the key of the next ordinal and return that ordinal."""
        encoded = encode_key(key)
        if encoded is None:
            self._memory[self._count] = key
            encoded = _IN_MEMORY
        self._buffer.append(encoded)
        self._size += len(encoded)
        self._ends.append(self._size)
        self._count += 1
        return self._count - 1

    def flush(self) -> None:
        if not self._buffer:
            return
        with open(self._blob_path, "ab") as f:
            f.write(b"".join(self._buffer))
        with open(self._ends_path, "ab") as f:
            np.asarray(self._ends, dtype=np.int64).tofile(f)
        self._buffer = []
        self._ends = []

    def seal(self) -> None:
        """Finish writing; keys can be read from now on."""
        self.flush()
        if self._count == 0:
            return
        self._ends_map = np.memmap(self._ends_path, dtype=np.int64, mode="r")
        if os.path.getsize(self._blob_path) == 0:
            self._blob = b""
        else:
            with open(self._blob_path, "rb") as f:
                self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def get(self, ordinals: np.ndarray) -> list[object]:
        """The keys of these ordinals ([n] int64), in the same order."""
        if self._ends_map is None or self._blob is None:
            raise RuntimeError("KeyStore.get() before seal()")
        ends = np.asarray(self._ends_map[ordinals]).tolist()
        before = ordinals - 1
        starts = np.where(ordinals > 0, self._ends_map[np.maximum(before, 0)], 0).tolist()
        blob = self._blob
        out: list[object] = []
        for ordinal, start, end in zip(ordinals.tolist(), starts, ends):
            data = blob[start:end]
            out.append(self._memory[ordinal] if data == _IN_MEMORY else decode_key(data))
        return out

    def close(self) -> None:
        if isinstance(self._blob, mmap.mmap):
            self._blob.close()
        self._blob = None
        self._ends_map = None
