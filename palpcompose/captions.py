"""Per-image captions: a sidecar `name.txt` beside a reference image `name.png` (the kohya convention) holds that
image's personalization prompt, with the subject's placeholder (docs/training.md, "Per-image captions").

This module reads one caption file and turns it into a prompt; project/references.py checks the placeholders and
collects them, and the training data gives each image its own prompt. Every problem is a UserError naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from palpcompose.errors import UserError

CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 4096  # a prompt the text encoder reads is ~77 tokens, a few hundred bytes: more is not a caption


def caption_path(image: str | os.PathLike) -> Path:
    """The caption file of an image: refs/V1/cat.png -> refs/V1/cat.txt."""
    return Path(image).with_suffix(CAPTION_SUFFIX)


class CaptionError(UserError):
    """A caption file that cannot be used: `path`, the `line` (or None) and the `reason`, for file:line messages."""

    def __init__(self, path: Path, reason: str, line: int | None = None):
        self.path, self.reason, self.line = path, reason, line
        super().__init__(f"{path}{'' if line is None else f':{line}'}: {reason}")


def read_caption(path: str | os.PathLike) -> str:
    """The caption in `path`, its lines joined by spaces and surrounding blanks removed. UserError (naming the file
    and, where it helps, the line) for a caption that is not a regular file, is over MAX_CAPTION_BYTES, is not
    UTF-8 or is empty (CaptionError)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(path, "not a regular file; a caption is a text file beside its image")
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise CaptionError(path, f"{size} bytes, over the {MAX_CAPTION_BYTES}-byte limit for a caption; a caption "
                                 "is one prompt of at most 77 tokens: shorten it (or rename the file if it is not a "
                                 "caption)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CaptionError(path, "the caption is not UTF-8 text; save it as UTF-8", line) from None
    text = " ".join(text.split())
    if not text:
        raise CaptionError(path, "the caption is empty; write the image's prompt in it (e.g. 'A photo of [V1] on "
                                 "a beach'), or delete the file to use the subject's prompt")
    return text
