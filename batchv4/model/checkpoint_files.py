"""Safetensors shards of a checkpoint directory: which files, which tensors (from the headers only),
and reading one tensor at a time.

Owns: shard discovery (`model.safetensors.index.json` when present, else every `*.safetensors`),
header reading with one-line errors that name the file, and a small cache of open shards. Does not
own: what the tensors mean (`checkpoint.py`, `inventory.py`). Reads through `safe_open` (mmap),
never through pickle.
"""

from __future__ import annotations

import glob

import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors import safe_open

from batchv4.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "BF16": 2,
               "F16": 2, "I16": 2, "U16": 2, "F32": 4, "I32": 4, "U32": 4, "F64": 8, "I64": 8, "U64": 8}


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into the model; the message names the tensors or file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str                  # key in the file
    file: str
    dtype: str                 # safetensors dtype string, e.g. "F8_E4M3"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 1)
        for s in self.shape:
            n *= s
        return n


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for corrupt or truncated files
        raise CheckpointError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None


def shard_files(path: str) -> list[str]:
    """The shard files of a checkpoint directory (or [path] for a single file)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory or file")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({_one_line(e)})") from None
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{index} names {os.path.basename(f)}, which does not exist")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def read_headers(path: str) -> tuple[dict[str, TensorInfo], list[str]]:
    """Every tensor's name, file, dtype and shape, from the shard headers (no data is read)."""
    files = shard_files(path)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                if key in infos:
                    raise CheckpointError(f"tensor {key} is stored twice ({os.path.basename(infos[key].file)} "
                                          f"and {os.path.basename(file)})")
                infos[key] = TensorInfo(key, file, sl.get_dtype(), tuple(sl.get_shape()))
    return infos, files


class ShardReader:
    """Reads single tensors, keeping at most `max_open` shards open (least recently used closed)."""

    def __init__(self, max_open: int = 2) -> None:
        self.max_open = max_open
        self._open: OrderedDict[str, tuple] = OrderedDict()  # file -> (context, handle)

    def get(self, info: TensorInfo) -> torch.Tensor:
        """The tensor `info` names, as stored: shape info.shape, dtype from info.dtype."""
        entry = self._open.get(info.file)
        if entry is None:
            ctx = _open(info.file)
            entry = self._open[info.file] = (ctx, ctx.__enter__())
            while len(self._open) > self.max_open:
                _, (old, _) = self._open.popitem(last=False)
                old.__exit__(None, None, None)
        else:
            self._open.move_to_end(info.file)
        h = entry[1]
        try:
            return h.get_tensor(info.name)
        except Exception as e:
            raise CheckpointError(f"{info.file}: cannot read {info.name} ({_one_line(e)})") from None

    def close(self) -> None:
        while self._open:
            _, (ctx, _) = self._open.popitem()
            ctx.__exit__(None, None, None)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
