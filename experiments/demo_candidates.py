"""Choosing the toy demo's composition: candidates tried on the base model and on the baseline (`none`) first.

    python experiments/demo_candidates.py base WORK [NAME]          # every (or one) candidate's prompts, base model
    python experiments/demo_candidates.py train WORK NAME VARIANT   # train one candidate (none or palp), score it
    python -m experiments.demo_candidates ceiling WORK              # per style: the base model told the subject
                                                                    # in words

Each candidate is a two-subject art-inspired composition in the toy world: an object [V1] (five photo-like
references that may share an ambiance their prompt does not name) and an artwork [V2] (one picture without an
object: a style and an ambiance). The base-model step renders the target prompt with class words and the clean
prompt for 8 seeds and scores them with the oracle; the train step trains the candidate with the given guidance,
renders the target prompt for 8 seeds and scores it as `palpcompose eval` does. Results go to WORK/<name>-<variant>/
and are printed as one JSON line. docs/evaluation.md ("How the demo's composition was chosen") reports them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CANDIDATES = {
    # name: (subject seed, reference ambiance, artwork (style, ambiance), target prompt, clean prompt)
    "sunset-refs": (1, "sunset", ("sketch", "night"), "a sketch of [V1] inspired by [V2] painting",
                    "a sketch of a star"),
    "day-refs": (1, "day", ("sketch", "night"), "a sketch of [V1] inspired by [V2] painting", "a sketch of a star"),
    "series": (1, "sunset", ("sketch", "night", 3), "a sketch of [V1] inspired by [V2] painting", "a sketch of a star"),
    # the demo since the redesign (docs/evaluation.md): watercolor, the clean prompt describing the subject
    "watercolor": (1, "sunset", ("watercolor", "night", 3), "a watercolor painting of [V1] inspired by [V2] painting",
                   "a watercolor painting of a blue star with white dots"),
    "pixel-art": (1, "day", ("pixel art", "day"), "a pixel art picture of [V1] inspired by [V2] painting at night",
                  "a pixel art picture of a star at night"),
}


def write_candidate(root: Path, name: str, guidance: str, steps: int) -> None:
    from palpcompose.toyworld import demo

    seed, ambiance, artwork, target, clean = CANDIDATES[name]
    style, art_ambiance = artwork[:2]
    series = artwork[2] if len(artwork) > 2 else 0  # that many artworks with objects, else one empty landscape
    for i, image in enumerate(demo.subject_images(seed, ambiance=ambiance)):
        path = root / "refs" / "subject" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    (root / "refs" / "artwork").mkdir(parents=True, exist_ok=True)
    art = (demo.artwork_images(series, style=style, ambiance=art_ambiance, objects=True) if series
           else [demo.artwork_image(style=style, ambiance=art_ambiance)])
    for i, image in enumerate(art):
        image.save(root / "refs" / "artwork" / f"artwork-{i}.png")
    from palpcompose.toyworld import world

    (root / "palp.toml").write_text(f"""[project]
name = "cand"
base_model = "builtin:toy"
[subjects.V1]
class_name = "{world.subject_from_seed(seed).class_name}"
images = ["refs/subject"]
prompt = "a photo of [V1]"
[subjects.V2]
class_name = "painting"
images = ["refs/artwork"]
prompt = "{world.STYLE_PHRASES[style]} [V2]"
[palp]
target_prompt = "{target}"
clean_prompt = "{clean}"
guidance = "{guidance}"
[train]
steps = {steps}
resolution = 64
mixed_precision = "no"
learning_rate = 1e-3
embedding_learning_rate = 5e-3
save_every = {steps // 2}
preview_every = 0
[render]
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
steps = 20
guidance_scale = 5.0
""")


def scores(project, folder) -> dict:
    from palpcompose.evaluate import evaluate

    result = evaluate(project, renders=folder)
    out = {}
    for row in result.images:
        group = out.setdefault(f"{row['model']}|{row['prompt']}", {"text": [], "V1": [], "V2": [], "found": {}})
        group["text"].append(row["text_alignment"])
        for key in ("V1", "V2"):
            if key in row["subjects"]:
                group[key].append(row["subjects"][key])
        for element, ok in row.get("elements", {}).items():
            group["found"][element] = group["found"].get(element, 0) + int(ok)
    return {k: {"text": round(sum(v["text"]) / len(v["text"]), 3),
                **{s: round(sum(v[s]) / len(v[s]), 3) for s in ("V1", "V2") if v[s]}, "found": v["found"]}
            for k, v in out.items()}


CEILING_STYLES = ("sketch", "pop art", "watercolor", "photo")


def ceiling(work: Path, seeds: int = 8) -> list[dict]:
    """How well the oracle can read the demo's subject (held-out subject 1) in each style at all: the base model,
    untrained, renders `<style> a blue star with white dots` (the subject's full description) and `<style> a star`
    (its class word), and each render is scored for [V1] fidelity against the demo's references. No training, so
    nothing here depends on any guidance: it is what decides the demo's style (docs/evaluation.md, "Redesign")."""
    from experiments.ablation import Renderer, Settings
    from palpcompose.evaluate import OracleScorer
    from palpcompose.project import load_project
    from palpcompose.toyworld import world

    root = work / "ceiling"
    write_candidate(root, "series", "none", 1)
    scorer = OracleScorer(load_project(root))
    renderer = Renderer(Settings(work=work, subjects=(1,), prompts=1, seeds=seeds, steps=1, every=1,
                                 variants=("none",), device="cpu"))
    description = world.subject_from_seed(1).describe()["description"]
    rows = []
    for style in CEILING_STYLES:
        for words in (description, f"a {world.subject_from_seed(1).class_name}"):
            prompt = f"{world.STYLE_PHRASES[style]} {words}"
            images = renderer.images(None, [prompt] * seeds, list(range(seeds)))
            fidelity = scorer.score(images, f"{world.STYLE_PHRASES[style]} [V1]").subjects["V1"]
            rows.append({"prompt": prompt, "V1": round(sum(fidelity) / len(fidelity), 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    from palpcompose.project import load_project
    from palpcompose.render import render
    from palpcompose.train import train

    mode, work = sys.argv[1], Path(sys.argv[2])
    if mode == "ceiling":
        ceiling(work)
        return
    if mode == "train":
        name, variant = sys.argv[3], sys.argv[4]
        steps = int(sys.argv[5]) if len(sys.argv) > 5 else 500
        root = work / f"{name}-{variant}"
        write_candidate(root, name, variant, steps)
        project = load_project(root)
        t0 = time.monotonic()
        train(project)
        t_train = time.monotonic() - t0
        rows = {}
        for step in (steps // 2, None):
            run = render(project, step=step, compare=step is None)
            rows[str(step or steps)] = scores(project, run.run_dir)
        print(json.dumps({"candidate": name, "variant": variant, "train_s": round(t_train, 1), "scores": rows}))
    elif mode == "base":
        names = sys.argv[3:] or list(CANDIDATES)
        for name in names:
            _, _, _, target, clean = CANDIDATES[name]
            root = work / f"{name}-base"
            write_candidate(root, name, "none", 1)
            project = load_project(root)
            train(project)  # one step: render needs weights; --compare's base row is the untouched base model
            run = render(project, prompts=[target, clean], compare=True)
            result = {k: v for k, v in scores(project, run.run_dir).items() if k.startswith("base")}
            print(json.dumps({"candidate": name, "base": result}))


if __name__ == "__main__":
    main()
