"""The paper's ablation (arXiv:2401.06105, Sec. 5.1, Fig. 6) reproduced in the toy world: `scripts/ablation`.

For every subject (held-out toy-world subjects), target prompt and guidance variant, one project is trained with
snapshots every `--every` steps; every snapshot (and step 0, the base model with class words, which is what every
run starts from) renders each target prompt for `--seeds` seeds, and the toy world's oracle scores text alignment and
subject fidelity (palpcompose/evaluate.py). The variants:

  none            TI+LoRA, no guidance (the paper's TI+DB baseline); one run per subject serves all prompts
  sds             SDS guidance (Eq. 4)
  palp            PALP, same noise for both branches, rescaled (Eq. 6, 7): the default
  palp-indep      PALP with independent noise for the re-noising
  palp-norescale  PALP without the sqrt(abar_t)/sqrt(1 - abar_t) rescale

Finished runs and scored snapshots are kept in WORK (default out/ablation/) and skipped when the command runs again;
an interrupted training run resumes from its checkpoint. The report (results.json, report.md with the table and a
verdict per finding of method.md, and the PNG plots) is rewritten from whatever has been scored so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from palpcompose.errors import PalpcomposeError, UserError
from palpcompose.fsutil import atomic_save_image, atomic_write_json, atomic_write_text, sha256_file
from palpcompose.outputs import out_dir

VARIANTS = {  # name -> [palp] settings
    "none": {"guidance": "none"},
    "sds": {"guidance": "sds"},
    "palp": {"guidance": "palp", "same_noise": True, "rescale": True},
    "palp-indep": {"guidance": "palp", "same_noise": False, "rescale": True},
    "palp-norescale": {"guidance": "palp", "same_noise": True, "rescale": False},
}
COLORS = {"none": (120, 120, 120), "sds": (214, 39, 40), "palp": (31, 119, 180), "palp-indep": (44, 160, 44),
          "palp-norescale": (255, 127, 14)}
# (style, ambiance) of the target prompts: "a sketch of [V1] at night", ...
PROMPTS = (("sketch", "night"), ("watercolor", "snow"), ("pop art", "sunset"), ("photo", "underwater"))
SUBJECT_SEEDS = (0, 3, 5, 6, 7)  # held-out subjects with five different classes
REFERENCE_IMAGES = 5
MARGIN = 0.05  # "keeps subject fidelity": within this much of the baseline's (finding 3, 5)


@dataclass(frozen=True)
class Settings:
    work: Path
    subjects: tuple[int, ...]
    prompts: int
    seeds: int
    steps: int
    every: int
    variants: tuple[str, ...]
    device: str
    base_model: str = "builtin:toy"
    resolution: int = 64
    lora_rank: int = 32
    # Chosen on the `none` baseline alone (subjects 0 and 3, 500 steps; docs/evaluation.md): of LoRA learning rates
    # 1e-4, 1e-3 and 3e-3 (embedding 5e-4, 5e-3, 1e-2), 1e-3 gave the baseline its highest final subject fidelity.
    learning_rate: float = 1e-3
    embedding_learning_rate: float = 5e-3
    render_steps: int = 20
    guidance_scale: float = 5.0  # builtin:toy recognises all four attributes most often at CFG 5 (training.json)
    # The regime (docs/evaluation.md, "The PALP study"): the references' shared ambiance, which their
    # personalization prompt `a photo of [V1]` does not name ("day": none, as `toyworld subject` draws them)
    context: str = "day"
    batch_size: int = 1
    accumulation: int = 1  # gradient accumulation: an effective batch of batch_size x accumulation
    weight: float = 1.0  # palp.weight (lambda)
    alpha: float = 7.5  # palp.alpha (the frozen model's CFG scale on the clean prompt)
    # True: the k-th subject of `subjects` is trained and scored on target prompt k mod `prompts` only (a reduced
    # design: every prompt is covered, by len(subjects) / prompts subjects each, at a quarter of the runs)
    rotate: bool = False
    # The clean prompt y_c of the guided variants: "class" (the target with the class word: `a sketch of a star at
    # night`) or "described" (with the subject's full description: `a sketch of a blue star with white dots at
    # night`; the paper's "a description in the clean prompt improves alignment"). `none` never reads it.
    clean: str = "class"


NAMED_AMBIANCES = ("night", "snow", "sunset", "underwater")


def prompt_pairs(context: str = "day") -> tuple[tuple[str, str], ...]:
    """The (style, ambiance) of the target prompts for references in `context`: PROMPTS, except that an ambiance
    equal to the references' context is replaced by the next one in NAMED_AMBIANCES (cyclically), so that every
    target prompt asks for an ambiance the references do not show."""
    def other(ambiance):
        if ambiance != context:
            return ambiance
        return NAMED_AMBIANCES[(NAMED_AMBIANCES.index(ambiance) + 1) % len(NAMED_AMBIANCES)]

    return tuple((style, other(ambiance)) for style, ambiance in PROMPTS)


def target_prompts(class_name: str, count: int, context: str = "day",
                   description: str | None = None) -> list[tuple[str, str]]:
    """(target prompt with [V1], clean prompt y_c naming the class, or with `description` the whole subject) for
    the first `count` prompts."""
    from palpcompose.toyworld import world

    subject = description or f"a {class_name}"
    return [(world.compose_prompt(style, "[V1]", ambiance), world.compose_prompt(style, subject, ambiance))
            for style, ambiance in prompt_pairs(context)[:count]]


def reference_images(seed: int, context: str, count: int = REFERENCE_IMAGES) -> list:
    """`count` photo-style references of held-out subject `seed` in ambiance `context` (day: exactly the images
    `toyworld subject` and toydemo.subject_images draw)."""
    import torch

    from palpcompose.toyworld import world

    g = torch.Generator().manual_seed(seed)
    scenes = world.subject_scenes(world.subject_from_seed(seed), count, g, ambiance=context)
    return [world.to_pil(image) for image in world.render(scenes, g)]


def run_dir(s: Settings, seed: int, variant: str, prompt_index: int | None) -> Path:
    name = f"s{seed}-{variant}" + ("" if prompt_index is None else f"-p{prompt_index}")
    return s.work / "runs" / name


def write_run(s: Settings, seed: int, variant: str, prompt_index: int | None) -> Path:
    """The run's project folder: palp.toml and the subject's references (kept when already there)."""
    from palpcompose.toyworld import world

    root = run_dir(s, seed, variant, prompt_index)
    subject = world.subject_from_seed(seed)
    class_name = subject.class_name
    index = prompt_index or 0  # a `none` run ignores the target prompt; it gets the first one
    described = s.clean == "described" and variant != "none"  # so a baseline run serves both kinds of clean prompt
    target, clean = target_prompts(class_name, index + 1, s.context,
                                   subject.describe()["description"] if described else None)[index]
    palp = "\n".join(f"{k} = {json.dumps(v)}" for k, v in
                     {**VARIANTS[variant], **({} if variant == "none" else {"weight": s.weight, "alpha": s.alpha})
                      }.items())
    toml = f"""[project]
name = "{root.name}"
base_model = "{s.base_model}"

[subjects.V1]
class_name = "{class_name}"
images = ["refs"]
prompt = "a photo of [V1]"

[palp]
target_prompt = "{target}"
clean_prompt = "{clean}"
{palp}

[train]
steps = {s.steps}
resolution = {s.resolution}
mixed_precision = "no"
learning_rate = {s.learning_rate}
embedding_learning_rate = {s.embedding_learning_rate}
lora_rank = {s.lora_rank}
batch_size = {s.batch_size}
gradient_accumulation_steps = {s.accumulation}
save_every = {s.every}
preview_every = 0

[render]
steps = {s.render_steps}
guidance_scale = {s.guidance_scale}
"""
    if not (root / "palp.toml").is_file() or (root / "palp.toml").read_text() != toml:
        atomic_write_text(root / "palp.toml", toml)
    for i, image in enumerate(reference_images(seed, s.context)):
        path = root / "refs" / f"{i:02d}.png"
        if not path.exists():
            atomic_save_image(path, image)
    return root


def train_run(root: Path, console) -> str:
    """Train a run to the end: skipped when up to date, resumed when a checkpoint exists. Returns the status."""
    from palpcompose.outputs import checkpoint_dir, manifest_path, out_dir
    from palpcompose.project import load_project
    from palpcompose.train import train

    manifest = manifest_path(out_dir(root))
    status = json.loads(manifest.read_text()).get("status") if manifest.is_file() else None
    resume = status in ("interrupted", "running", "failed") and checkpoint_dir(out_dir(root)).exists()
    return train(load_project(root), resume=resume, console=console).status


class Renderer:
    """One pipeline for every render: trained weights are swapped in per snapshot (render.attach_trained_weights)."""

    def __init__(self, s: Settings):
        import torch

        from palpcompose.models import load_pipeline, resolve_base_model
        from palpcompose.render import RenderSettings, make_scheduler

        dtype = torch.float16 if s.device == "cuda" else torch.float32
        self.pipe = load_pipeline(resolve_base_model(s.base_model), torch_dtype=dtype)
        self.pipe.scheduler = make_scheduler("dpm++", self.pipe.scheduler.config)
        self.pipe.to(s.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = RenderSettings(s.render_steps, s.guidance_scale, s.resolution, s.resolution, "", "dpm++", 16)

    def images(self, weights, texts: list[str], seeds: list[int]):
        from palpcompose.attach import attach_trained_weights
        from palpcompose.render import generate

        if weights is None:
            if getattr(self.pipe.unet, "peft_config", None):
                self.pipe.unet.disable_adapters()
        else:
            attach_trained_weights(self.pipe, weights)
        return generate(self.pipe, texts, seeds, self.settings)


def score_run(s: Settings, root: Path, prompt_indices: list[int], renderer: Renderer, oracle,
              base_scores: dict) -> dict:
    """Scores of every snapshot of a trained run (and step 0), cached in out/ablation-scores.json:
    {"<step>": {"<prompt index>": {"text": [per seed], "fidelity": [per seed]}}}. Step 0 (the base model with the
    class word) is the same for every variant of a subject: `base_scores` keeps it across runs."""
    from palpcompose.evaluate import OracleScorer
    from palpcompose.models import expand_placeholders, placeholder_tokens
    from palpcompose.outputs import load_weights, manifest_path, out_dir, snapshot_dir, snapshot_steps
    from palpcompose.project import load_project

    cache_path = out_dir(root) / "ablation-scores.json"
    manifest = json.loads(manifest_path(out_dir(root)).read_text())
    key = {"seeds": s.seeds, "render_steps": s.render_steps, "guidance_scale": s.guidance_scale,
           "training_hash": manifest["training_hash"], "steps_done": manifest["steps_done"]}
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("settings") != key:
        cache = {"settings": key, "steps": {}}
    project = load_project(root)
    scorer = OracleScorer(project, oracle)
    tokens = placeholder_tokens(project.config.project.name, project.config.subjects)
    class_name = project.config.subjects["V1"].class_name
    prompts = target_prompts(class_name, max(prompt_indices) + 1, s.context)
    seeds = list(range(s.seeds))
    references = tuple(sha256_file(p) for p in project.images["V1"])
    for step in [0] + snapshot_steps(out_dir(root)):
        done = cache["steps"].setdefault(str(step), {})
        todo = [i for i in prompt_indices if str(i) not in done]
        if not todo:
            continue
        weights = None if step == 0 else load_weights(snapshot_dir(out_dir(root), step))
        words = {"V1": class_name} if weights is None else tokens
        for i in todo:
            target = prompts[i][0]
            shared = (references, target)  # step 0 only: the same for every run with these references and prompt
            if step == 0 and shared in base_scores:
                done[str(i)] = base_scores[shared]
                continue
            images = renderer.images(weights, [expand_placeholders(target, words)] * len(seeds), seeds)
            scores = scorer.score(images, target)
            done[str(i)] = {"text": scores.text_alignment, "fidelity": scores.subjects["V1"]}
            if step == 0:
                base_scores[shared] = done[str(i)]
        atomic_write_json(cache_path, cache)
    return cache["steps"]


# ----------------------------------------------------------------------------------------------------------------
# Aggregation, findings, plots


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def aggregate(scored: dict[str, dict[tuple[int, int], dict]]) -> dict:
    """scored[variant][(subject seed, prompt index)] = {step: {"text": [...], "fidelity": [...]}} ->
    {variant: {step: {"text": (mean, se), "fidelity": (mean, se), "n": images}}}, over the steps every run has."""
    table = {}
    for variant, runs in scored.items():
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r) for r in runs.values())))
        table[variant] = {}
        for step in steps:
            text = [v for r in runs.values() for v in r[step]["text"]]
            fidelity = [v for r in runs.values() for v in r[step]["fidelity"]]
            table[variant][step] = {"text": mean_se(text), "fidelity": mean_se(fidelity), "n": len(text)}
    return table


def _diff(a, b) -> tuple[float, float]:
    """Difference of two (mean, se) pairs and its standard error (independent samples)."""
    return a[0] - b[0], math.hypot(a[1], b[1])


def _fmt(d) -> str:
    return f"{d[0]:+.3f} ± {2 * d[1]:.3f}"


def _verdict(ok: bool, significant: bool) -> str:
    if ok and significant:
        return "reproduced"
    if ok:
        return "same direction, within noise (2 SE)"
    return "not reproduced"


def findings(table: dict) -> list[dict]:
    """A verdict for each of method.md's five findings, from the final step (and, for 1, the first snapshot)."""
    out = []

    def final(variant):
        return table[variant][max(table[variant])]

    if "none" in table and len([k for k in table["none"] if k > 0]) >= 2:
        steps = sorted(k for k in table["none"] if k > 0)
        first, last = table["none"][steps[0]], table["none"][steps[-1]]
        dt, df = _diff(last["text"], first["text"]), _diff(last["fidelity"], first["fidelity"])
        ok = dt[0] < 0 < df[0]
        out.append({"finding": 1, "claim": "early stopping trades text alignment for subject fidelity (none)",
                    "figure": f"step {steps[0]} -> {steps[-1]}: text {_fmt(dt)}, fidelity {_fmt(df)}",
                    "verdict": _verdict(ok, abs(dt[0]) > 2 * dt[1] and abs(df[0]) > 2 * df[1])})
    if {"none", "sds"} <= table.keys():
        dt = _diff(final("sds")["text"], final("none")["text"])
        df = _diff(final("sds")["fidelity"], final("none")["fidelity"])
        out.append({"finding": 2, "claim": "SDS raises text alignment but lowers subject fidelity (vs none)",
                    "figure": f"sds - none at the last step: text {_fmt(dt)}, fidelity {_fmt(df)}",
                    "verdict": _verdict(dt[0] > 0 > df[0], dt[0] > 2 * dt[1] and -df[0] > 2 * df[1])})
    if {"none", "palp"} <= table.keys():
        dt = _diff(final("palp")["text"], final("none")["text"])
        df = _diff(final("palp")["fidelity"], final("none")["fidelity"])
        out.append({"finding": 3, "claim": f"PALP raises text alignment and keeps subject fidelity (within {MARGIN})",
                    "figure": f"palp - none at the last step: text {_fmt(dt)}, fidelity {_fmt(df)}",
                    "verdict": _verdict(dt[0] > 0 and df[0] > -MARGIN, dt[0] > 2 * dt[1])})
    if {"palp", "palp-indep"} <= table.keys():
        dt = _diff(final("palp")["text"], final("palp-indep")["text"])
        df = _diff(final("palp")["fidelity"], final("palp-indep")["fidelity"])
        out.append({"finding": 4, "claim": "same noise aligns better than independent noise",
                    "figure": f"palp - palp-indep at the last step: text {_fmt(dt)}, fidelity {_fmt(df)}",
                    "verdict": _verdict(dt[0] > 0, dt[0] > 2 * dt[1])})
    if {"palp", "palp-norescale"} <= table.keys():
        dt = _diff(final("palp")["text"], final("palp-norescale")["text"])
        df = _diff(final("palp")["fidelity"], final("palp-norescale")["fidelity"])
        out.append({"finding": 5, "claim": f"the rescale improves results (text up, fidelity within {MARGIN})",
                    "figure": f"palp - palp-norescale at the last step: text {_fmt(dt)}, fidelity {_fmt(df)}",
                    "verdict": _verdict(dt[0] > 0 and df[0] > -MARGIN, dt[0] > 2 * dt[1])})
    return out


def plot_curves(table: dict, path: Path) -> None:
    """Two panels, text alignment and subject fidelity against training steps, a line per variant (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panel_w, panel_h, pad = 420, 300, 50
    image = Image.new("RGB", (2 * panel_w + 3 * pad, panel_h + 2 * pad + 40), "white")
    draw = ImageDraw.Draw(image)
    max_step = max(max(steps) for steps in table.values()) or 1
    for p, metric in enumerate(("text", "fidelity")):
        x0, y0 = pad + p * (panel_w + pad), pad
        draw.rectangle([x0, y0, x0 + panel_w, y0 + panel_h], outline="black")
        draw.text((x0, y0 - 30), {"text": "text alignment (oracle)", "fidelity": "subject fidelity (oracle)"}[metric],
                  fill="black", font=font)
        for tick in range(0, 11, 2):
            y = y0 + panel_h - tick / 10 * panel_h
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 28, y - 6), f"{tick / 10:.1f}", fill="black", font=font)
        for step in sorted({k for steps in table.values() for k in steps}):
            x = x0 + step / max_step * panel_w
            draw.line([x, y0 + panel_h, x, y0 + panel_h + 4], fill="black")
            draw.text((x - 8, y0 + panel_h + 6), str(step), fill="black", font=font)
        for variant, steps in table.items():
            points = [(x0 + k / max_step * panel_w, y0 + panel_h - v[metric][0] * panel_h)
                      for k, v in sorted(steps.items())]
            draw.line(points, fill=COLORS[variant], width=2)
            for (x, y), (_, v) in zip(points, sorted(steps.items())):
                err = 2 * v[metric][1] * panel_h
                draw.line([x, y - err, x, y + err], fill=COLORS[variant])
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[variant])
    for i, variant in enumerate(table):
        x = pad + i * 150
        y = panel_h + 2 * pad + 10
        draw.rectangle([x, y, x + 14, y + 10], fill=COLORS[variant])
        draw.text((x + 20, y), variant, fill="black", font=font)
    draw.text((pad, panel_h + pad + 20), "training step (bars: +-2 standard errors)", fill="black", font=font)
    atomic_save_image(path, image)


def plot_tradeoff(table: dict, path: Path) -> None:
    """Subject fidelity (x) against text alignment (y), one polyline per variant through its steps (Fig. 6)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    size, pad = 420, 60
    image = Image.new("RGB", (size + 2 * pad + 140, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad, pad + size, pad + size], outline="black")
    draw.text((pad, pad - 40), "text alignment (y) vs subject fidelity (x), labels: training step", fill="black",
              font=font)
    for tick in range(0, 11, 2):
        t = tick / 10
        draw.text((pad - 28, pad + size - t * size - 6), f"{t:.1f}", fill="black", font=font)
        draw.text((pad + t * size - 8, pad + size + 6), f"{t:.1f}", fill="black", font=font)
    for i, (variant, steps) in enumerate(table.items()):
        points = [(pad + v["fidelity"][0] * size, pad + size - v["text"][0] * size) for _, v in sorted(steps.items())]
        draw.line(points, fill=COLORS[variant], width=2)
        for (x, y), step in zip(points, sorted(steps)):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[variant])
            draw.text((x + 4, y - 12), str(step), fill=COLORS[variant], font=font)
        draw.rectangle([pad + size + 20, pad + 20 * i, pad + size + 34, pad + 20 * i + 10], fill=COLORS[variant])
        draw.text((pad + size + 40, pad + 20 * i), variant, fill="black", font=font)
    atomic_save_image(path, image)


def report_markdown(s: Settings, table: dict, verdicts: list[dict], runs_done: dict, wall: float) -> str:
    lines = [
        "# Ablation results (generated by scripts/ablation)", "",
        (f"Subjects (held-out seeds): {', '.join(map(str, s.subjects))}; target prompts: {s.prompts}; seeds: "
         f"{s.seeds}; {s.steps} steps, snapshots every {s.every}; base model {s.base_model}; device {s.device}."),
        (f"Regime: references' context {s.context}; learning rates {s.learning_rate:g} (LoRA) / "
         f"{s.embedding_learning_rate:g} (embedding); batch {s.batch_size} x accumulation {s.accumulation}; "
         f"palp.weight {s.weight:g}, palp.alpha {s.alpha:g}; clean prompt: {s.clean} words"
         + ("; each subject on one prompt (k-th subject: prompt k mod prompts)." if s.rotate else ".")),
        (f"Subjects with finished and scored runs, per variant: {', '.join(f'{v} {n}' for v, n in runs_done.items())}"
         f"; wall time of this invocation {wall / 60:.1f} min."), "",
        "Mean over subjects x prompts x seeds (± 2 standard errors).", "",
        "| variant | step | images | text alignment | subject fidelity |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, steps in table.items():
        for step, v in sorted(steps.items()):
            lines.append(f"| {variant} | {step} | {v['n']} | {v['text'][0]:.3f} ± {2 * v['text'][1]:.3f} | "
                         f"{v['fidelity'][0]:.3f} ± {2 * v['fidelity'][1]:.3f} |")
    lines += ["", "| finding (method.md) | figure | verdict |", "| --- | --- | --- |"]
    lines += [f"| {f['finding']}. {f['claim']} | {f['figure']} | {f['verdict']} |" for f in verdicts]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The command


def cached_scores(root: Path) -> dict:
    """The scores a run's earlier scoring left in out/ablation-scores.json ({} when none)."""
    path = out_dir(root) / "ablation-scores.json"
    return json.loads(path.read_text()).get("steps", {}) if path.is_file() else {}


def run_ablation(s: Settings, log=print, report_only: bool = False) -> dict:
    from rich.console import Console

    from palpcompose.toyworld import oracle as toy_oracle
    from palpcompose.toyworld import world

    started = time.monotonic()
    quiet = Console(quiet=True)
    oracle = toy_oracle.load_oracle()
    renderer, base_scores = None, {}
    scored: dict[str, dict] = {v: {} for v in s.variants}
    plan = []  # (subject seed, variant, prompt index of the run or None, prompt indices it is scored on)
    for k, seed in enumerate(s.subjects):
        prompts = [k % s.prompts] if s.rotate else list(range(s.prompts))
        for variant in s.variants:
            if variant == "none":  # the baseline does not read the target prompt: one run serves them all
                plan.append((seed, variant, None, prompts))
            else:
                plan += [(seed, variant, i, [i]) for i in prompts]
    for n, (seed, variant, prompt_index, indices) in enumerate(plan, 1):
        if report_only:  # what earlier invocations scored; nothing is trained or rendered
            steps = cached_scores(run_dir(s, seed, variant, prompt_index))
            for i in indices:
                runs = {int(step): by_prompt[str(i)] for step, by_prompt in steps.items() if str(i) in by_prompt}
                if len(runs) > 1:
                    scored[variant][(seed, i)] = runs
            continue
        root = write_run(s, seed, variant, prompt_index)
        t0 = time.monotonic()
        status = train_run(root, quiet)
        t1 = time.monotonic()
        renderer = renderer or Renderer(s)
        steps = score_run(s, root, indices, renderer, oracle, base_scores)
        log(f"[{n}/{len(plan)}] {root.name} ({world.subject_from_seed(seed).describe()['description']}): train "
            f"{status} {t1 - t0:.0f}s, score {time.monotonic() - t1:.0f}s")
        for i in indices:
            scored[variant][(seed, i)] = {int(step): by_prompt[str(i)] for step, by_prompt in steps.items()
                                          if str(i) in by_prompt}
    table = aggregate(scored)
    verdicts = findings(table)
    wall = time.monotonic() - started
    runs_done = {v: len({k[0] for k in r}) for v, r in scored.items()}
    s.work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(s.work / "results.json", {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in s.__dict__.items()},
        "table": {v: {str(k): x for k, x in steps.items()} for v, steps in table.items()},
        "findings": verdicts, "wall_time_s": round(wall, 1),
    })
    plot_curves(table, s.work / "ablation-curves.png")
    plot_tradeoff(table, s.work / "ablation-tradeoff.png")
    atomic_write_text(s.work / "report.md", report_markdown(s, table, verdicts, runs_done, wall))
    return {"table": table, "findings": verdicts}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{text!r}: expected comma-separated integers, e.g. 0,3,5") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for runs, scores and the report (default out/ablation/, "
                        "with --quick out/ablation-quick/)")
    parser.add_argument("--subjects", default=",".join(map(str, SUBJECT_SEEDS)), help="held-out subject seeds")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"target prompts, 1-{len(PROMPTS)}")
    parser.add_argument("--seeds", type=int, default=4, help="render seeds per prompt and step")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=100, help="snapshot period (the curves' x axis)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a small version: 2 subjects, 2 prompts, 2 seeds, 200 steps, snapshots every 100")
    parser.add_argument("--base-model", default="builtin:toy", help="another toy-world model (diffusers folder)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the scores already in WORK (e.g. after runs split over several "
                        "processes); trains and renders nothing")
    parser.add_argument("--learning-rate", "--lr", type=float, default=Settings.learning_rate,
                        help="LoRA learning rate")
    parser.add_argument("--embedding-learning-rate", "--emb-lr", type=float,
                        default=Settings.embedding_learning_rate, help="learning rate of the placeholder embedding")
    parser.add_argument("--context", default=Settings.context,
                        help="the ambiance all references share, which `a photo of [V1]` does not name: day (none, "
                        "the default), night, sunset, snow or underwater; target prompts then avoid it")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size, help="train.batch_size")
    parser.add_argument("--accumulation", type=int, default=Settings.accumulation,
                        help="train.gradient_accumulation_steps (effective batch: batch size x accumulation)")
    parser.add_argument("--rotate", action="store_true",
                        help="the k-th subject gets only target prompt k mod --prompts (a quarter of the runs)")
    parser.add_argument("--clean-prompt", choices=("class", "described"), default=Settings.clean,
                        help="y_c of the guided variants: the class word (default) or the subject's description")
    parser.add_argument("--weight", type=float, default=Settings.weight, help="palp.weight (lambda)")
    parser.add_argument("--alpha", type=float, default=Settings.alpha,
                        help="palp.alpha (CFG scale of the frozen model on the clean prompt)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # as the CLI: no torchvision notices
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(VARIANTS)}")
        if not 1 <= args.prompts <= len(PROMPTS):
            raise UserError(f"--prompts must be between 1 and {len(PROMPTS)}")
        if args.seeds < 1 or args.steps < 1 or args.every < 1:
            raise UserError("--seeds, --steps and --every must be at least 1")
        if not 0 < args.learning_rate <= 1 or not 0 <= args.embedding_learning_rate <= 1:  # train.* bounds
            raise UserError("--learning-rate must be in (0, 1] and --embedding-learning-rate in [0, 1], e.g. 1e-3 "
                            "and 5e-3")
        from palpcompose.toyworld import world

        if args.context not in world.AMBIANCES:
            raise UserError(f"--context {args.context!r}: choose one of {', '.join(world.AMBIANCES)}")
        if args.batch_size < 1 or args.accumulation < 1:
            raise UserError("--batch-size and --accumulation must be at least 1")
        if args.weight < 0 or args.alpha <= 0:
            raise UserError("--weight must be >= 0 and --alpha > 0 (the paper: weight 1, alpha 7.5 or 15)")
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train() and the renderer use CUDA whenever they see it
        else:
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        work = Path(args.work or ("out/ablation-quick" if args.quick else "out/ablation"))
        s = Settings(work, _ints(args.subjects), args.prompts, args.seeds, args.steps, args.every, variants,
                     args.device, args.base_model, args.resolution,
                     learning_rate=args.learning_rate, embedding_learning_rate=args.embedding_learning_rate,
                     context=args.context, batch_size=args.batch_size, accumulation=args.accumulation,
                     weight=args.weight, alpha=args.alpha, rotate=args.rotate, clean=args.clean_prompt)
        if args.quick:
            s = replace(s, subjects=s.subjects[:2], prompts=min(s.prompts, 2), seeds=min(s.seeds, 2), steps=200,
                        every=100)
        result = run_ablation(s, log=lambda m: print(m, flush=True), report_only=args.report_only)
        for f in result["findings"]:
            print(f"finding {f['finding']}: {f['verdict']}: {f['figure']}")
        print(f"report: {s.work / 'report.md'}")
    except PalpcomposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
