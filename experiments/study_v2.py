"""The v2 study (issue 19; design: docs/evaluation.md, "The v2 study (issue 19)"): at the same text alignment, does
PALP keep more of the subject than the baseline simply trained less, or with its LoRA scaled down?

    python -m experiments.study_v2 --phase steps      # builtin:toy's default step count (baseline alone)
    python -m experiments.study_v2 --phase tune       # PALP's knobs on the tuning subjects (20-23)
    python -m experiments.study_v2 --phase held-out --layers 1,2,3,4,5 [--weight W --alpha A]
    python -m experiments.study_v2 --smoke            # a tiny end-to-end run (minutes); not evidence

Every training run is a project folder in WORK/runs/ (trained by `palpcompose.train`, resumed from its checkpoint
when interrupted, skipped when up to date); every scored point is cached (the run's out/study-v2-points.json, the
base model's in WORK/base-points.json) and never rendered twice, so the study can span sessions. The report
(WORK/report.md, results.json) is rewritten from whatever has been scored. The arithmetic (curve, margin, clustered
standard errors, the rules) is in study_v2_stats.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from experiments import study_v2_report as report
from experiments import study_v2_stats as st
from experiments.study_v2_stats import (
    CONTEXTS,
    HEADS,
    HELD_OUT,
    ID_HEADS,
    KNOB_CANDIDATES,
    KNOB_LETTERS,
    LORA_SCALES,
    NOTHING_AMBIANCES,
    OTHER_VARIANTS,
    PERSONALIZATION,
    REFERENCE_STYLES,
    REFERENCES,
    REGIMES,
    RENDER_SEEDS,
    SNAPSHOT_EVERY,
    T_MIN_KEY,
    TARGETS,
    TRAIN_SEEDS,
    TUNING_SUBJECTS,
    VARIANTS,
)
from palpcompose.errors import PalpcomposeError, UserError
from palpcompose.fsutil import atomic_save_image, atomic_write_json, atomic_write_text
from palpcompose.models import resolve_base_model
from palpcompose.outputs import (
    final_dir,
    load_weights,
    manifest_path,
    out_dir,
    read_json,
    read_jsonl,
    snapshot_dir,
    snapshot_steps,
    train_log_path,
)
from palpcompose.toyworld.ceiling import model_world
from palpcompose.toyworld.worlds import WORLDS


@dataclass(frozen=True)
class Settings:
    work: Path
    world: str = "v1"
    base_model: str = "builtin:toy"
    device: str = "cpu"
    render_seeds: tuple[int, ...] = RENDER_SEEDS
    train_seeds: tuple[int, ...] = TRAIN_SEEDS
    steps: int | None = None  # train.steps; None: the base model's default
    weight: float | None = None  # palp.weight of `palp` (held-out); None: the base model's default
    alpha: float | None = None
    held_out: tuple[int, ...] = HELD_OUT
    tuning: tuple[int, ...] = TUNING_SUBJECTS
    regimes: tuple[str, ...] = REGIMES
    prompts: int = 2  # target prompts per cell
    candidates: tuple[str, ...] = tuple(KNOB_CANDIDATES)
    steps_max: int = st.MAX_STEPS  # the steps phase trains the baseline this far
    smoke: bool = False


@dataclass(frozen=True)
class Run:
    phase: str  # steps | tune | held-out
    subject: int
    k: int  # the subject's position in its list (tuning or held-out): picks its context and style
    regime: str
    variant: str
    seed: int  # train.seed
    prompt: int | None  # index into cell_prompts; None: a `none` run (prompt-independent)
    knobs: tuple = ()  # (("weight", 3.0), ...): palp settings besides the variant's
    steps: int | None = None

    @property
    def name(self) -> str:
        knobs = "".join(f"-{KNOB_LETTERS[k]}{v:g}" for k, v in self.knobs)
        prompt = "" if self.prompt is None else f"-p{self.prompt}"
        return f"{self.phase}-s{self.subject}-{self.regime}-{self.variant}{knobs}-t{self.seed}{prompt}"


# ----------------------------------------------------------------------------------------------------------------
# The world: subjects, references, prompts


def make_subject(seed: int, version: str):
    return WORLDS[version].subject(seed)


def cell_prompts(regime: str, k: int, count: int = 2) -> list[tuple[str, str]]:
    """(style, ambiance) of the cell's target prompts: the first `count` of TARGETS whose style differs from the
    references' shared style (R-style) and whose ambiance differs from their shared ambiance (R-context)."""
    keep = [(s, a) for s, a in TARGETS
            if not (regime == "R-style" and s == REFERENCE_STYLES[k % 3])
            and not (regime == "R-context" and a == CONTEXTS[k % 3])]
    return keep[:count]


def prompt_texts(subject, pair: tuple[str, str]) -> tuple[str, str]:
    """(target with [V1], clean prompt with the class word: the product's default rule)."""
    from palpcompose.toyworld import world

    style, ambiance = pair
    return (world.compose_prompt(style, "[V1]", ambiance),
            world.compose_prompt(style, world.object_phrase(subject.class_name), ambiance))


def reference_images(subject, regime: str, k: int, count: int = REFERENCES, version: str = "v1") -> list:
    """The regime's references of `subject`, drawn by the world `version` at varied layouts (a generator seeded with
    the subject's seed): R-context photos in one ambiance, R-style in one non-photo style by day, R-nothing photos in
    each ambiance."""
    import torch

    from palpcompose.toyworld import world

    w = WORLDS[version]
    g = torch.Generator().manual_seed(subject.seed)
    if regime == "R-context":
        scenes = w.subject_scenes(subject, count, g, ambiance=CONTEXTS[k % 3])
    elif regime == "R-style":
        scenes = w.subject_scenes(subject, count, g, style=REFERENCE_STYLES[k % 3])
    else:
        scenes = w.subject_scenes(subject, count, g)
        ambiances = [world.AMBIANCES.index(NOTHING_AMBIANCES[i % len(NOTHING_AMBIANCES)]) for i in range(count)]
        scenes = dataclasses.replace(scenes, ambiance=torch.tensor(ambiances))
    return [world.to_pil(image) for image in world.render(scenes, g)]


# ----------------------------------------------------------------------------------------------------------------
# The plan


def plan_runs(s: Settings, phase: str, layers: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[Run]:
    """Every training run of a phase, in the design's order."""
    runs: list[Run] = []
    if phase == "steps":  # the baseline alone, R-context, to steps_max, scored on its own prompt
        return [Run("steps", subj, k, "R-context", "none", 0, None, steps=s.steps_max)
                for k, subj in enumerate(s.tuning)]
    if phase == "tune":
        for k, subj in enumerate(s.tuning):
            runs.append(Run("tune", subj, k, "R-context", "none", 0, None, steps=s.steps))
            for name in s.candidates:
                knobs = KNOB_CANDIDATES[name]
                if "t_min" in knobs and not t_min_supported():
                    continue
                runs.append(Run("tune", subj, k, "R-context", "palp", 0, 0, tuple(sorted(knobs.items())), s.steps))
        return runs
    knobs = tuple((k, v) for k, v in (("weight", s.weight), ("alpha", s.alpha)) if v is not None)
    core, extension = s.held_out[:8], s.held_out[8:]

    def layer(subjects, regime):
        for subj in subjects:
            k = s.held_out.index(subj)
            for seed in s.train_seeds:
                runs.append(Run("held-out", subj, k, regime, "none", seed, None, steps=s.steps))
                runs.extend(Run("held-out", subj, k, regime, "palp", seed, p, knobs, s.steps)
                            for p in range(len(cell_prompts(regime, k, s.prompts))))

    for number in layers:
        if number in (1, 2, 3):
            regime = ("R-context", "R-nothing", "R-style")[number - 1]
            if regime in s.regimes:
                layer(core, regime)
        elif number == 4:
            for regime in (r for r in ("R-context", "R-nothing", "R-style") if r in s.regimes):
                for subj in core[:4]:
                    k = s.held_out.index(subj)  # their curve: the `none` run of seed 0 (layers 1-3 trained it)
                    runs.append(Run("held-out", subj, k, regime, "none", 0, None, steps=s.steps))
                    runs.extend(Run("held-out", subj, k, regime, v, 0, 0, knobs, s.steps) for v in OTHER_VARIANTS)
        elif number == 5:
            for regime in (r for r in ("R-context", "R-nothing", "R-style") if r in s.regimes):
                layer(extension, regime)
    return list(dict.fromkeys(runs))


def t_min_supported() -> bool:
    from palpcompose.project.schema import PalpConfig

    return T_MIN_KEY in {f.name for f in dataclasses.fields(PalpConfig)}


def write_run(s: Settings, run: Run) -> Path:
    """The run's project folder: palp.toml and the references (kept when already there)."""
    root = s.work / "runs" / run.name
    subject = make_subject(run.subject, s.world)
    pair = cell_prompts(run.regime, run.k, s.prompts)[run.prompt or 0]
    target, clean = prompt_texts(subject, pair)
    palp = {**VARIANTS[run.variant], **({} if run.variant == "none" else
                                        {(T_MIN_KEY if k == "t_min" else k): v for k, v in run.knobs})}
    train = {"seed": run.seed, "save_every": SNAPSHOT_EVERY, "preview_every": 0}
    if run.steps is not None:
        train["steps"] = run.steps
    lines = ["[project]", f'name = "{run.name.replace(".", "_")[:64]}"', f'base_model = "{s.base_model}"', "",
             "[subjects.V1]", f'class_name = "{subject.class_name}"', 'images = ["refs"]',
             f'prompt = "{PERSONALIZATION[run.regime]}"', "", "[palp]", f'target_prompt = "{target}"',
             f'clean_prompt = "{clean}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in palp.items()] + ["", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    toml = "\n".join(lines) + "\n"
    if not (root / "palp.toml").is_file() or (root / "palp.toml").read_text() != toml:
        atomic_write_text(root / "palp.toml", toml)
    for i, image in enumerate(reference_images(subject, run.regime, run.k, version=s.world)):
        path = root / "refs" / f"{i:02d}.png"
        if not path.exists():
            atomic_save_image(path, image)
    return root


def train_run(root: Path, console) -> str:
    """Train to the end: skipped when up to date, resumed from the checkpoint when interrupted."""
    from palpcompose.outputs import checkpoint_dir
    from palpcompose.project import load_project
    from palpcompose.train import train

    manifest = read_json(manifest_path(out_dir(root))) or {}
    resume = manifest.get("status") in ("interrupted", "running", "failed") and checkpoint_dir(out_dir(root)).exists()
    return train(load_project(root), resume=resume, console=console).status


# ----------------------------------------------------------------------------------------------------------------
# Rendering and scoring


class Renderer:
    """One pipeline for every render; trained weights are swapped in per point, at a LoRA scale."""

    def __init__(self, s: Settings, project):
        import torch

        from palpcompose.models import load_pipeline
        from palpcompose.render import RenderSettings, make_scheduler

        rc = project.config.render  # the base model's render defaults (builtin:toy: 20 steps, CFG 5)
        dtype = torch.float16 if s.device == "cuda" else torch.float32
        self.pipe = load_pipeline(resolve_base_model(s.base_model), torch_dtype=dtype)
        self.pipe.scheduler = make_scheduler("dpm++", self.pipe.scheduler.config)
        self.pipe.to(s.device)
        self.pipe.set_progress_bar_config(disable=True)
        size = project.config.train.resolution
        self.settings = RenderSettings(rc.steps, rc.guidance_scale, size, size, "", "dpm++", 16)

    def images(self, weights, text: str, seeds: tuple[int, ...], lora_scale: float = 1.0):
        from palpcompose.attach import attach_trained_weights
        from palpcompose.render import generate

        if weights is None:
            if getattr(self.pipe.unet, "peft_config", None):
                self.pipe.unet.disable_adapters()
        else:
            attach_trained_weights(self.pipe, weights, lora_scale=lora_scale)
        return generate(self.pipe, [text] * len(seeds), list(seeds), self.settings)


def score_images(oracle, images, class_prompt: str, identity: dict[str, int]) -> dict:
    """One point's metrics, per image where they are per image: text alignment T (the oracle's definition, on the
    prompt with the class word), fidelity F (the four identity heads), F-id (colour, pattern, second colour), each
    head, saturation (mean HSV saturation); and the diversity of the images (mean pairwise L2 distance of the
    oracle's pooled features)."""
    import torch

    from palpcompose.toyworld import oracle as toy_oracle

    batch = toy_oracle.to_batch(images)
    probs = toy_oracle.predict(oracle, batch)
    text = toy_oracle.score_text_alignment(batch, class_prompt, oracle)
    heads = {h: probs[h][:, identity[h]].tolist() for h in HEADS}
    n = len(text)
    fidelity = [sum(heads[h][i] for h in HEADS) / len(HEADS) for i in range(n)]
    fid_id = [sum(heads[h][i] for h in ID_HEADS) / len(ID_HEADS) for i in range(n)]
    top, low = batch.amax(1), batch.amin(1)
    saturation = torch.where(top > 0, (top - low) / top.clamp_min(1e-8), torch.zeros_like(top)).mean((1, 2))
    with torch.no_grad():
        features = oracle.features(batch.to(next(oracle.parameters()).device) * 2 - 1).mean((2, 3)).float().cpu()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    diversity = (sum(float((features[i] - features[j]).norm()) for i, j in pairs) / len(pairs)) if pairs else 0.0
    return {"text": text, "fidelity": fidelity, "fid_id": fid_id, "heads": heads,
            "saturation": saturation.tolist(), "diversity": diversity}


def identity_of(subject) -> dict[str, int]:
    """The subject's true identity (the world's own values, not the oracle's reading of its references)."""
    return {"cls": subject.cls, "color": subject.color, "pattern": subject.pattern, "color2": subject.color2}


class Scorer:
    def __init__(self, s: Settings):
        from palpcompose.toyworld import oracle as toy_oracle

        # the base model's own instrument (its folder's oracle.safetensors), else the shipped oracle
        self.oracle_path = toy_oracle.model_oracle_path(resolve_base_model(s.base_model).location)
        self.s, self.oracle, self.renderer = s, toy_oracle.load_oracle(self.oracle_path), None
        self.base_path = s.work / "base-points.json"
        self.base = read_json(self.base_path) or {}

    def _renderer(self, root: Path):
        from palpcompose.project import load_project

        if self.renderer is None:
            self.renderer = Renderer(self.s, load_project(root))
        return self.renderer

    def key(self, root: Path) -> dict:
        from palpcompose.project import load_project

        rc = load_project(root).config.render
        return {"render_seeds": list(self.s.render_seeds), "render_steps": rc.steps, "cfg": rc.guidance_scale,
                "world": self.s.world, "base_model": self.s.base_model, "oracle": str(self.oracle_path)}

    def base_point(self, root: Path, subject, target: str, class_prompt: str) -> dict:
        """The base model on the prompt with the class word (step 0), cached per subject and prompt."""
        name = f"{json.dumps(self.key(root), sort_keys=True)}|{subject.seed}|{class_prompt}"
        if name not in self.base:
            images = self._renderer(root).images(None, class_prompt, self.s.render_seeds)
            self.base[name] = score_images(self.oracle, images, class_prompt, identity_of(subject))
            atomic_write_json(self.base_path, self.base)
        return self.base[name]

    def run_points(self, root: Path, run: Run, subject, prompts: list[tuple[str, str]]) -> dict:
        """{target: {"<step>@<scale>": point}} of a trained run: every snapshot at scale 1, and for `none` its final
        weights at LORA_SCALES too. Cached in the run's out/study-v2-points.json."""
        from palpcompose.models import expand_placeholders, placeholder_tokens
        from palpcompose.project import load_project

        project = load_project(root)
        manifest = read_json(manifest_path(out_dir(root))) or {}
        key = {**self.key(root), "training_hash": manifest.get("training_hash"),
               "steps_done": manifest.get("steps_done")}
        path = out_dir(root) / "study-v2-points.json"
        cache = read_json(path) or {}
        if cache.get("key") != key:
            cache = {"key": key, "points": {}}
        tokens = placeholder_tokens(project.config.project.name, project.config.subjects)
        steps = snapshot_steps(out_dir(root))
        final = manifest.get("steps_done")
        todo = [(step, 1.0) for step in steps]
        if run.variant == "none" and final:
            todo += [(final, scale) for scale in LORA_SCALES]
        for target, class_prompt in prompts:
            done = cache["points"].setdefault(target, {})
            for step, scale in todo:
                name = f"{step}@{scale:g}"
                if name in done:
                    continue
                folder = final_dir(out_dir(root)) if step == final and scale != 1.0 else snapshot_dir(out_dir(root),
                                                                                                       step)
                images = self._renderer(root).images(load_weights(folder), expand_placeholders(target, tokens),
                                                     self.s.render_seeds, scale)
                done[name] = score_images(self.oracle, images, class_prompt, identity_of(subject))
                atomic_write_json(path, cache)
            done["base"] = self.base_point(root, subject, target, class_prompt)
        atomic_write_json(path, cache)
        return cache["points"]


def cosine_from_log(root: Path, every: int = 10) -> float | None:
    """The run's mean cos_palp_sds over the logged steps that are multiples of `every` (None: not logged)."""
    values = [e["cos_palp_sds"] for e in read_jsonl(train_log_path(out_dir(root)))
              if "cos_palp_sds" in e and e["step"] % every == 0]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Running a phase


def run_prompts(s: Settings, run: Run, subject) -> list[tuple[str, str]]:
    """(target, prompt with the class word) pairs a run is scored on: the steps phase its own personalization
    prompt; a `none` run every prompt of its cell; the others their own prompt."""
    if run.phase == "steps":
        from palpcompose.toyworld import world

        return [(PERSONALIZATION[run.regime], world.compose_prompt("photo", world.object_phrase(subject.class_name)))]
    pairs = cell_prompts(run.regime, run.k, s.prompts)
    chosen = pairs if run.prompt is None else [pairs[run.prompt]]
    return [prompt_texts(subject, pair) for pair in chosen]


def run_phase(s: Settings, phase: str, layers: tuple[int, ...] = (1, 2, 3, 4, 5), log=print,
              report_only: bool = False) -> list[dict]:
    """Train and score every run of the phase (skipping what is done); with `report_only`, read what is cached and
    train or render nothing. Returns one record per run with scores."""
    from rich.console import Console

    quiet, scorer, records = Console(quiet=True), None, []
    runs = plan_runs(s, phase, layers)
    for n, run in enumerate(runs, 1):
        root = s.work / "runs" / run.name
        subject = make_subject(run.subject, s.world)
        if report_only:
            points = (read_json(out_dir(root) / "study-v2-points.json") or {}).get("points")
            if not points:
                continue
        else:
            t0 = time.monotonic()
            root = write_run(s, run)
            status = train_run(root, quiet)
            t1 = time.monotonic()
            scorer = scorer or Scorer(s)
            points = scorer.run_points(root, run, subject, run_prompts(s, run, subject))
            log(f"[{n}/{len(runs)}] {run.name}: train {status} {t1 - t0:.0f}s, score {time.monotonic() - t1:.0f}s")
        manifest = read_json(manifest_path(out_dir(root))) or {}
        records.append({"run": run, "points": points, "final": manifest.get("steps_done"),
                        "cos": cosine_from_log(root)})
    return records




# ----------------------------------------------------------------------------------------------------------------
# The command


PHASES = ("steps", "tune", "held-out")


def smoke_settings(work: Path) -> Settings:
    """A tiny version on builtin:toy (v1) that runs every phase end to end in minutes: one subject per list, one
    regime, one prompt, one training seed, two render seeds, two knob candidates, 50 steps (100 for the steps
    phase). It proves the pipeline; its numbers are not evidence."""
    return Settings(work, world="v1", base_model="builtin:toy", render_seeds=(0, 1), train_seeds=(0,), steps=50,
                    held_out=HELD_OUT[:1], tuning=TUNING_SUBJECTS[:1], regimes=("R-context",), prompts=1,
                    candidates=("w1-a7.5", "w3-a7.5"), steps_max=100, smoke=True)


def study(s: Settings, phases: tuple[str, ...], layers: tuple[int, ...], log=print, report_only: bool = False) -> dict:
    """Run (or, with `report_only`, read) each phase, then write WORK/results.json and WORK/report.md."""
    started = time.monotonic()
    results = {}
    for phase in phases:
        records = run_phase(s, phase, layers, log=log, report_only=report_only)
        results[phase] = report.analyse(records, phase) if records else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()}
    header = ["# The v2 study (generated by experiments/study_v2.py)", "",
              ("**SMOKE RUN: a pipeline check on a tiny design; these numbers are not evidence.**" if s.smoke else
               "Design: docs/evaluation.md, \"The v2 study (issue 19)\"."), "",
              (f"World {s.world}, base model {s.base_model}, device {s.device}; render seeds {list(s.render_seeds)}; "
              f"training seeds {list(s.train_seeds)}; train.steps {s.steps or 'the base model default'}; PALP knobs "
              f"(held-out) weight {s.weight or 'default'}, alpha {s.alpha or 'default'}; wall time "
              f"{(time.monotonic() - started) / 60:.1f} min."), ""]
    sections = [report.markdown(p, r, [], smoke=s.smoke) for p, r in results.items() if r is not None]
    s.work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(s.work / "results.json", {"settings": settings, "results": results})
    atomic_write_text(s.work / "report.md", "\n".join(header) + "\n" + "\n".join(sections))
    return results


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{text!r}: expected comma-separated integers, e.g. 1,2,3") from None


def model_world_name(base_model: str, asked: str | None) -> str:
    """The world the base model recorded (ceiling.model_world); `asked` must be it: references drawn in another
    world than the model learnt would measure the world change, not the method."""
    source = resolve_base_model(base_model)
    recorded = model_world(source.location).name if source.kind in ("builtin", "folder") else None
    if asked is not None and recorded is not None and asked != recorded:
        raise UserError(f"--world {asked}: --base-model {base_model} was trained on world {recorded}; drop --world")
    return asked or recorded or "v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.study_v2", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=PHASES, action="append",
                        help="steps, tune or held-out (repeatable; default: held-out)")
    parser.add_argument("--layers", default="1,2,3,4,5", help="held-out layers of the design's order, e.g. 1,2")
    parser.add_argument("--work", default=None, help="runs, scores and the report (default out/study-v2/, with "
                        "--smoke out/study-v2-smoke/)")
    parser.add_argument("--world", choices=tuple(WORLDS), default=None,
                        help="the toy world's subjects and references (palpcompose/toyworld/worlds.py); default: the "
                        "world --base-model was trained on (its training.json), which it must match")
    parser.add_argument("--base-model", default="builtin:toy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the base model's default)")
    parser.add_argument("--weight", type=float, default=None, help="palp.weight of the held-out palp runs (the "
                        "tune phase's choice; default: the base model's default)")
    parser.add_argument("--alpha", type=float, default=None, help="palp.alpha of the held-out palp runs")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the cached scores; "
                        "trains and renders nothing")
    parser.add_argument("--smoke", action="store_true", help="every phase on a tiny design in a few minutes on "
                        "builtin:toy (a pipeline check, not evidence)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        layers = _ints(args.layers)
        if not set(layers) <= {1, 2, 3, 4, 5} or not layers:
            raise UserError(f"--layers {args.layers!r}: layers are 1-5 (docs/evaluation.md, the v2 study's order)")
        if args.steps is not None and args.steps < 1:
            raise UserError("--steps must be at least 1")
        if (args.weight is not None and args.weight < 0) or (args.alpha is not None and args.alpha <= 0):
            raise UserError("--weight must be >= 0 and --alpha > 0")
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train() and the renderer use CUDA whenever they see it
        work = Path(args.work or ("out/study-v2-smoke" if args.smoke else "out/study-v2"))
        if args.smoke:
            s, phases = dataclasses.replace(smoke_settings(work), device=args.device), PHASES
            layers = (1,)
        else:
            world_name = model_world_name(args.base_model, args.world)
            s = Settings(work, world=world_name, base_model=args.base_model, device=args.device, steps=args.steps,
                         weight=args.weight, alpha=args.alpha)
            phases = tuple(dict.fromkeys(args.phase or ["held-out"]))
        make_subject(s.held_out[0], s.world)  # the world version exists, before anything is written
        study(s, phases, layers, log=lambda m: print(m, flush=True), report_only=args.report_only)
        print(f"report: {s.work / 'report.md'}")
    except PalpcomposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
