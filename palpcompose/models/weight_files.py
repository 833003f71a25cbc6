"""A base model's weight files checked without loading them (`check`, and every command before it loads the model):
each .safetensors file's header against the file's size, and the shards a sharded component's index names.

A .safetensors file is an 8-byte little-endian header length, a JSON header giving every tensor's byte range in the
data that follows, then the data. A download or copy cut short leaves a file shorter than its header declares (or
empty), which diffusers only finds while loading, with a message that names no file or no fix. Reading the first 8
bytes and the header is enough to tell: nothing else is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from palpcompose.errors import UserError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with the .safetensors file at `path`, in words, or None when its header reads and the file
    holds exactly the bytes the header declares."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "it is a broken link (its download did not finish)"
    if size < 8:
        return "it is empty: 0 bytes" if size == 0 else f"it is {size} bytes long, shorter than any safetensors header"
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES or 8 + length > size:
            return (f"its first bytes announce a {_bytes(length)} header in a file of {_bytes(size)}: it is cut short "
                    "or not a safetensors file")
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a readable safetensors header"
    expected = 8 + length + end
    if size < expected:
        return f"it is {_bytes(size)}, but its header declares {_bytes(expected)}: it is incomplete"
    if size > expected:
        return f"it is {_bytes(size)}, more than the {_bytes(expected)} its header declares"
    return None


def check_weight_files(folder: Path, components, fix: str) -> None:
    """Every .safetensors file in the `components` subfolders of a diffusers pipeline folder, and the shards each
    sharded component's index (`*.safetensors.index.json`) names. Raises UserError naming the first damaged or
    missing file, what is wrong, and `fix` (how to get the model again)."""
    for name in components:
        sub = folder / name
        if not sub.is_dir():
            continue
        for index in sorted(sub.glob("*.safetensors.index.json")):
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
                raise UserError(f"{index}: damaged shard index ({type(exc).__name__}); {fix}") from exc
            missing = [shard for shard in shards if not (sub / str(shard)).exists()]
            if missing:
                raise UserError(f"{index}: names {', '.join(map(str, missing))}, missing from {sub}: the model is "
                                f"incomplete; {fix}")
        for file in sorted(sub.glob("*.safetensors")):
            check_weight_file(file, fix)


def check_weight_file(file: Path, fix: str) -> None:
    """UserError naming `file`, what is wrong with it, and `fix`, when its safetensors header says it is damaged."""
    problem = safetensors_problem(file)
    if problem is not None:
        raise UserError(f"{file}: damaged or incomplete weights file ({problem}); {fix}")


def _bytes(n: int) -> str:
    return f"{n:,} bytes" if n < 10**7 else f"{n / 1e6:,.1f} MB" if n < 10**10 else f"{n / 1e9:,.2f} GB"
