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
    files = {root / "refs" / "subject" / f"star-{i:02d}.png": image for i, image in enumerate(subject_images(ambiance=SUBJECT_AMBIANCE))}
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


# ----------------------------------------------------------------------------------------------------------------
# The main job's comparison (scripts/demo): the same project trained with `palp` and with `none`, side by side.

BASELINE = Path("out") / "baseline"  # the baseline's project folder, inside the demo project's outputs
COMPARE_SHEET = "compare-palp-vs-none.png"


def make_baseline(project_dir: str | Path) -> Path:
    """A copy of the project in PROJECT/out/baseline/ that differs only in `palp.guidance = "none"` (same name, so
    the same tokens; same seeds, steps and rates; the same reference files). Rewritten each time, so it follows
    palp.toml; its out/ (the baseline's training) is kept, and `train` finds it up to date when nothing changed."""
    import re
    import shutil

    from palpcompose.fsutil import atomic_write_text

    root = Path(project_dir)
    baseline = root / BASELINE
    text = (root / "palp.toml").read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^guidance\s*=\s*"[^"]*"', 'guidance = "none"', text)
    if n == 0:  # no guidance key: palp is the default, so add ours to [palp] (or a [palp] table)
        text, n = re.subn(r"(?m)^\[palp\]\s*$", '[palp]\nguidance = "none"', text)
        text += "" if n else '\n[palp]\nguidance = "none"\n'
    (baseline / "refs").mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "refs", baseline / "refs", dirs_exist_ok=True)
    atomic_write_text(baseline / "palp.toml", text)
    return baseline


def latest_run(project_dir: str | Path) -> Path:
    """The newest render run of a project (out/renders/<run>/)."""
    runs = sorted((p for p in (Path(project_dir) / "out" / "renders").iterdir() if p.is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"{project_dir}: no render runs in out/renders/")
    return runs[-1]


def _caption(data: dict) -> str:
    """'palp: text 0.92 | [V1] 0.61 | [V2] 0.88' from an eval.json."""
    parts = [f"{data['guidance']}: text {data['text_alignment']:.2f}"]
    parts += [f"[{key}] {info['subject_fidelity']:.2f}" for key, info in data["subjects"].items()
              if info["subject_fidelity"] is not None]
    return " | ".join(parts)


def compare_sheet(runs: list[Path], min_cell: int = 128):
    """One sheet of the final-weights images of several scored render runs (a row each, a column per seed, the
    seeds every run has), each row captioned with its guidance and eval means from the run's eval.json."""
    import json

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = []
    for run in runs:
        index = json.loads((run / "render.json").read_text(encoding="utf-8"))
        scores = json.loads((run / "eval.json").read_text(encoding="utf-8"))
        images = {e["seed"]: run / e["file"] for e in index["images"] if e["model"] == "final"}
        rows.append((_caption(scores), images, index["prompts"][0]))
    seeds = [s for s in rows[0][1] if all(s in images for _, images, _ in rows)]
    if not seeds:
        raise ValueError("the render runs share no seed; render them with the same render.seeds")
    with Image.open(rows[0][1][seeds[0]]) as first:
        scale = max(1, -(-min_cell // min(first.size)))
        cell_w, cell_h = first.width * scale, first.height * scale
    pad, head_h, caption_h = 4, 20, 18
    sheet = Image.new("RGB", (len(seeds) * (cell_w + pad) + pad, head_h + len(rows) * (caption_h + cell_h + pad)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), f"{rows[0][2]}   (seeds {', '.join(map(str, seeds))})", fill="black", font=font)
    for r, (caption, images, _) in enumerate(rows):
        y = head_h + r * (caption_h + cell_h + pad)
        draw.text((pad, y + 3), caption, fill="black", font=font)
        for c, seed in enumerate(seeds):
            with Image.open(images[seed]) as picture:
                cell = picture.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(cell, (pad + c * (cell_w + pad), y + caption_h))
    return sheet


def write_compare_sheet(project_dir: str | Path, runs: list[Path]) -> Path:
    """compare_sheet of `runs`, saved as PROJECT/out/compare-palp-vs-none.png."""
    path = Path(project_dir) / "out" / COMPARE_SHEET
    atomic_save_image(path, compare_sheet(runs))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m palpcompose.toyworld.demo baseline DIR | compare DIR`: the two steps of scripts/demo that are not
    palpcompose commands (make the baseline project; draw the side-by-side sheet of both scored render runs)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m palpcompose.toyworld.demo")
    parser.add_argument("step", choices=("baseline", "compare"))
    parser.add_argument("project", type=Path)
    args = parser.parse_args(argv)
    if args.step == "baseline":
        print(make_baseline(args.project))
        return 0
    runs = [latest_run(args.project), latest_run(args.project / BASELINE)]
    path = write_compare_sheet(args.project, runs)
    for run in runs:
        print(_caption(json.loads((run / "eval.json").read_text(encoding="utf-8"))) + f"   ({run / 'eval.json'})")
    print(f"side by side: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
