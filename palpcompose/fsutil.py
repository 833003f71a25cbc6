"""Atomic writes: every file palpcompose produces appears whole or not at all (temp file in the same folder, then
`os.replace`). Readers never see half-written JSON, images or weights, and an interrupt loses nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from palpcompose.errors import UserError


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the permissions any new file gets (0666 minus the umask).
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    return Path(tmp)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A .safetensors file's bytes (`safetensors.torch.save`); tensors are made contiguous on the CPU."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of tensors as a .safetensors file, atomically."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write several files all or nothing: every one to a temporary file first (where a full disk fails), then all
    renamed into place. On a failure the temporary files, and folders this call created, are removed and the
    earlier files stay as they were."""
    created = sorted({d for path in files for d in (path.parent, *path.parent.parents) if not d.exists()},
                     key=lambda d: len(d.parts))
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temps[path] = _tmp_path(path)
            with open(temps[path], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def atomic_save_image(path: str | os.PathLike, image, **save_kwargs) -> None:
    """Save a PIL image atomically; the format comes from the path's suffix."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    image.save(buf, format=fmt, **save_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_folder_can_be_made(folder: Path, what: str) -> None:
    """Before writing into `folder` (created if missing): raise UserError, naming `what` (e.g. "--out"), when a
    file stands where the folder or one of its parents must be, or the nearest existing folder is not writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, so the folder cannot be created; choose another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {existing} is not writable; choose a folder you can write to")


def os_error_text(exc: OSError) -> str:
    """'No space left on device: /path', or without the path when the OS did not name one (a failed write)."""
    text = exc.strerror or str(exc)
    return f"{text}: {exc.filename}" if exc.filename else text
