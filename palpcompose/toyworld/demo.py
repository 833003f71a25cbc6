"""The toy demo's reference images, drawn by the toy world when `palpcompose init DIR --template toy-demo` runs.

- `refs/subject/`: photo-like pictures of a personal object the base model never saw as such (held-out subject
  SUBJECT_SEED of the toy world), at varied placements, all in one ambiance (SUBJECT_AMBIANCE) that its
  personalization prompt `a photo of [V1]` does not name: the shared, unnamed context a baseline over-fits to.
- `refs/artwork/`: ARTWORK_IMAGES pictures by one "artist": each a random toy-world object, all in one style
  (ARTWORK_STYLE, which the prompts name) and one ambiance (ARTWORK_AMBIANCE, which no prompt names), so that what
  [V2] can lend a render is its look, not a second object (the toy world draws one object per scene).

docs/evaluation.md says how this composition was chosen. Everything is deterministic: every init writes the same
pixels, so projects/toy-demo/ in the repository matches a fresh init (a test checks it). Existing files are kept, as
init keeps every file but palp.toml.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from palpcompose.fsutil import atomic_save_image

SUBJECT_SEED = 1  # world.subject_from_seed(1): a blue star with white dots (held out of base training)
SUBJECT_IMAGES = 5
SUBJECT_AMBIANCE = "sunset"
ARTWORK_SEED = 2024  # the artwork's layout and grain
ARTWORK_STYLE = "watercolor"  # the art style in which the oracle reads a subject best (docs/evaluation.md)
ARTWORK_AMBIANCE = "night"
ARTWORK_IMAGES = 3


def subject_images(seed: int = SUBJECT_SEED, count: int = SUBJECT_IMAGES, ambiance: str = "day") -> list:
    """`count` photo-like PIL images of held-out toy-world subject `seed` in `ambiance` (by default "day", as
    `python -m palpcompose.toyworld subject` draws them)."""
    from palpcompose.toyworld import world

    g = torch.Generator().manual_seed(seed)
    scenes = world.subject_scenes(world.subject_from_seed(seed), count, g, ambiance=ambiance)
    return [world.to_pil(image) for image in world.render(scenes, g)]


def artwork_images(count: int = 1, seed: int = ARTWORK_SEED, style: str = ARTWORK_STYLE,
                   ambiance: str = ARTWORK_AMBIANCE, objects: bool = False) -> list:
    """`count` pictures in one `style` and `ambiance`: a series by one artist. With `objects`, each shows a random
    toy-world object (random class and colours, never a held-out subject); without, an empty landscape (the scene's
    object is moved out of the frame, so nothing of it is drawn)."""
    from palpcompose.toyworld import world

    g = torch.Generator().manual_seed(seed)
    scenes = world.sample_scenes(count, g, styles=(style,))
    scenes = replace(scenes, ambiance=torch.full((count,), world.AMBIANCES.index(ambiance)))
    if not objects:
        scenes = replace(scenes, center=torch.full((count, 2), 10.0))  # 10 image units away: off the canvas
    return [world.to_pil(image) for image in world.render(scenes, g)]


def artwork_image(seed: int = ARTWORK_SEED, style: str = ARTWORK_STYLE, ambiance: str = ARTWORK_AMBIANCE):
    """One empty landscape in `style` and `ambiance` (artwork_images)."""
    return artwork_images(1, seed, style, ambiance)[0]


def reference_files(root: str | Path) -> dict[Path, object]:
    """The demo's reference images by path in project folder `root`."""
    root = Path(root)
    files = {root / "refs" / "subject" / f"star-{i:02d}.png": image
             for i, image in enumerate(subject_images(ambiance=SUBJECT_AMBIANCE))}
    for i, image in enumerate(artwork_images(ARTWORK_IMAGES, objects=True)):
        files[root / "refs" / "artwork" / f"artwork-{i}.png"] = image
    return files


def write_references(root: str | Path, written: list[Path] | None = None) -> list[Path]:
    """Write the toy demo's references into project folder `root`; returns the files written (existing ones are
    kept), appending each to `written` as soon as it exists (so a caller can clean up after a failure)."""
    written = [] if written is None else written
    for path, image in reference_files(root).items():
        if not path.exists():
            atomic_save_image(path, image)
            written.append(path)
    return written
