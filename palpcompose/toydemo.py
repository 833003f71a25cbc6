"""The toy demo's reference images, drawn by the toy world when `palpcompose init DIR --template toy-demo` runs.

- `refs/subject/`: photo-like pictures of a personal object the base model never saw as such: held-out subject
  SUBJECT_SEED of the toy world (a blue star with white dots), at varied placements.
- `refs/artwork/pixel-art.png`: one "artwork" in pixel art, the toy world's style that `builtin:toy` was never trained on
  (world.HELD_OUT_STYLES), like the single painting of the paper's art-inspired compositions (Appendix E).

Both are deterministic: every init writes the same pixels, so projects/toy-demo/ in the repository matches a fresh
init. Existing files are kept, as init keeps every file but palp.toml.
"""

from __future__ import annotations

from pathlib import Path

import torch

from palpcompose.fsutil import atomic_save_image

SUBJECT_SEED = 1  # world.subject_from_seed(1): a blue star with white dots (held out of base training)
SUBJECT_IMAGES = 5
ARTWORK_SEED = 2024  # the scene of the artwork: a pixel-art picture of another object
ARTWORK_STYLE = "pixel art"


def _to_pil(image: torch.Tensor):
    """(3, H, W) in [0, 1] -> an RGB PIL image."""
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def subject_images(seed: int = SUBJECT_SEED, count: int = SUBJECT_IMAGES) -> list:
    """`count` photo-like PIL images of held-out toy-world subject `seed` (as `python -m palpcompose.toyworld
    subject` draws them)."""
    from palpcompose.toyworld import world

    g = torch.Generator().manual_seed(seed)
    scenes = world.subject_scenes(world.subject_from_seed(seed), count, g)
    return [_to_pil(image) for image in world.render(scenes, g)]


def artwork_image(seed: int = ARTWORK_SEED, style: str = ARTWORK_STYLE):
    """One picture in `style` (default pixel art, which the base model never saw) of a random toy-world scene."""
    from palpcompose.toyworld import world

    g = torch.Generator().manual_seed(seed)
    scenes = world.sample_scenes(1, g, styles=(style,))
    return _to_pil(world.render(scenes, g)[0])


def write_references(root: str | Path, written: list[Path] | None = None) -> list[Path]:
    """Write the toy demo's references into project folder `root`; returns the files written (existing ones are
    kept), appending each to `written` as soon as it exists (so a caller can clean up after a failure)."""
    root = Path(root)
    wanted = {root / "refs" / "subject" / f"star-{i:02d}.png": image for i, image in enumerate(subject_images())}
    wanted[root / "refs" / "artwork" / "pixel-art.png"] = artwork_image()
    written = [] if written is None else written
    for path, image in wanted.items():
        if not path.exists():
            atomic_save_image(path, image)
            written.append(path)
    return written
