"""The main job's comparison (scripts/demo): the same project trained with `palp` and with `none`, side by side.

`python -m palpcompose.toyworld.demo_compare baseline DIR | compare DIR`: the two steps of scripts/demo that are not
palpcompose commands. It reads the renders and eval scores in out/, so it sits above the out/ layout (outputs.py),
apart from demo.py, whose drawings `init` uses.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from palpcompose.fsutil import atomic_save_image, atomic_write_text
from palpcompose.outputs import FINAL_NAME, RENDER_INDEX_FILE, eval_path, out_dir, renders_dir
from palpcompose.project import PROJECT_FILE

BASELINE = "baseline"  # the baseline's project folder, inside the demo project's out/
COMPARE_SHEET = "compare-palp-vs-none.png"  # in the demo project's out/


def baseline_dir(project_dir: str | Path) -> Path:
    """PROJECT/out/baseline/: the baseline project."""
    return out_dir(project_dir) / BASELINE


def make_baseline(project_dir: str | Path) -> Path:
    """A copy of the project in PROJECT/out/baseline/ that differs only in `palp.guidance = "none"` (same name, so
    the same tokens; same seeds, steps and rates; the same reference files). Rewritten each time, so it follows
    palp.toml; its out/ (the baseline's training) is kept, and `train` finds it up to date when nothing changed."""
    root = Path(project_dir)
    baseline = baseline_dir(root)
    text = (root / PROJECT_FILE).read_text(encoding="utf-8")
    text, n = re.subn(r'(?m)^guidance\s*=\s*"[^"]*"', 'guidance = "none"', text)
    if n == 0:  # no guidance key: palp is the default, so add ours to [palp] (or a [palp] table)
        text, n = re.subn(r"(?m)^\[palp\]\s*$", '[palp]\nguidance = "none"', text)
        text += "" if n else '\n[palp]\nguidance = "none"\n'
    (baseline / "refs").mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "refs", baseline / "refs", dirs_exist_ok=True)
    atomic_write_text(baseline / PROJECT_FILE, text)
    return baseline


def latest_run(project_dir: str | Path) -> Path:
    """The newest render run of a project (out/renders/<run>/)."""
    runs = sorted((p for p in renders_dir(out_dir(project_dir)).iterdir() if p.is_dir()),
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
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = []
    for run in runs:
        index = json.loads((run / RENDER_INDEX_FILE).read_text(encoding="utf-8"))
        scores = json.loads(eval_path(run).read_text(encoding="utf-8"))
        images = {e["seed"]: run / e["file"] for e in index["images"] if e["model"] == FINAL_NAME}
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
    path = out_dir(project_dir) / COMPARE_SHEET
    atomic_save_image(path, compare_sheet(runs))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m palpcompose.toyworld.demo_compare baseline DIR | compare DIR`: make the baseline project; draw
    the side-by-side sheet of both scored render runs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m palpcompose.toyworld.demo_compare")
    parser.add_argument("step", choices=("baseline", "compare"))
    parser.add_argument("project", type=Path)
    args = parser.parse_args(argv)
    if args.step == "baseline":
        print(make_baseline(args.project))
        return 0
    runs = [latest_run(args.project), latest_run(baseline_dir(args.project))]
    path = write_compare_sheet(args.project, runs)
    for run in runs:
        print(_caption(json.loads(eval_path(run).read_text(encoding="utf-8"))) + f"   ({eval_path(run)})")
    print(f"side by side: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
