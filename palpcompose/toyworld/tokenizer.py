"""The word-level CLIP BPE vocabulary of `builtin:toy`.

Every byte has a token (byte-level BPE), so ANY text encodes; on top of that, each word of the toy world and a few
common prompt words get merges that turn the whole word into one token. Merges are added until every listed word
encodes as exactly one token (a merge made for one word can split another, so we simulate BPE and repeat).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from palpcompose.fsutil import atomic_write_text
from palpcompose.toyworld import world

COMMON_WORDS = ["a", "an", "the", "of", "in", "on", "at", "by", "with", "and", "photo", "painting", "picture",
                "drawing", "image", "art", "style", "inspired", "sketch", "pop", "watercolor", "pixel", "night",
                "sunset", "snow", "underwater", "stripes", "dots", "checks", "toy", "object", "shape", "my", "white",
                "black", "sitting", "next", "to"]


def words() -> list[str]:
    found = list(COMMON_WORDS)
    for name in world.CLASSES + world.COLORS2:
        found += name.split()
    for phrase in list(world.STYLE_PHRASES.values()) + list(world.AMBIANCE_PHRASES.values()):
        found += phrase.split()
    return list(dict.fromkeys(found))


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (printable bytes map to themselves)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_vocab() -> dict[str, int]:
    """The vocabulary every CLIP BPE vocabulary starts with: each byte stand-in, then each as a word end ("a</w>")."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in byte_level_alphabet():
            vocab.setdefault(ch + suffix, len(vocab))
    return vocab


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair with the lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        best = next((pieces[i], pieces[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_vocab() -> tuple[dict[str, int], list[str]]:
    vocab = byte_level_vocab()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words():
            pieces = _bpe(word, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                changed = True
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(folder: str | Path) -> None:
    """vocab.json and merges.txt for `CLIPTokenizer`."""
    folder = Path(folder)
    vocab, merges = build_vocab()
    atomic_write_text(folder / "vocab.json", json.dumps(vocab))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tokenizer(folder: str | Path, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        write_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
