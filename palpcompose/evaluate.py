"""`palpcompose eval`: how well renders follow the prompt (text alignment) and keep the subjects (subject fidelity).

Two ways of measuring, chosen by the base model (docs/evaluation.md):
- `builtin:toy` (or `--oracle` for any model trained on the toy world): the toy world's oracle, a classifier trained
  on the generator's exact labels, plays the paper's user study (arXiv:2401.06105, Sec. 5.1):
  * text alignment of a render = the fraction of the prompt's toy-world elements (style phrase, ambiance, object
    class, the colour named right before the class) that the oracle recognises in it. A placeholder [Vn] counts as
    its subject's class word, so "a sketch of [V1] at night" names three elements (sketch, night, the class).
  * subject fidelity, per subject named in the prompt: an object subject (its class_name is a toy-world class) is
    scored on its identity, the mean over the class, colour, pattern and second-colour heads of the probability the
    oracle gives the value it reads off the subject's references (`toyworld.oracle.score_subject_fidelity`); an
    artwork subject (any other class_name, e.g. "painting") is scored on its style: the probability the oracle gives
    the style it reads off the artwork. A render's fidelity is the mean over the subjects its prompt names.
- any other model: CLIP (`--clip PATH`, a local transformers CLIP folder; the paper used ViT-B/32):
  * text alignment = cosine similarity of the render's and the prompt's CLIP embeddings, with each placeholder
    replaced by its class word (the paper's convention: CLIP cannot read learned tokens);
  * subject fidelity = the mean cosine similarity of the render's embedding to each reference image of the subjects
    the prompt names (image alignment). Cosines below 0 are counted as 0 (as CLIPScore does), so both lie in [0, 1];
    eval.json keeps the raw cosines too.

`evaluate(project, ...)` validates everything (project, metric, prompts, weights) before it renders or writes, then
renders the project's seeds for its target prompt (or reads existing renders), scores them and writes out/eval.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from palpcompose import __version__, trackers
from palpcompose.errors import UserError, command_line
from palpcompose.fsutil import atomic_write_json
from palpcompose.images import IMAGE_SUFFIXES
from palpcompose.models import base_model_path
from palpcompose.outputs import (
    CONTACT_SHEET_FILE,
    FINAL_NAME,
    RENDER_INDEX_FILE,
    RENDERS_DIR,
    eval_path,
    logs_dir,
    manifest_path,
    out_dir,
    read_json,
    renders_dir,
    run_out_dir,
    runs_dir,
)
from palpcompose.placeholders import class_word_prompt, subjects_in
from palpcompose.render import render

TOY_MODEL = "builtin:toy"
ARTWORK_HEADS = ("style", "ambiance")  # what an artwork subject (class_name not a toy-world class) is judged on


def is_toy_object(class_name: str) -> bool:
    """A subject whose class_name is one of the toy world's object classes (else the oracle judges it as an
    artwork, on its style and ambiance)."""
    from palpcompose.toyworld import world

    return class_name.strip().lower() in world.CLASSES


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a .png that is no image, truncated, a bomb
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}: {exc}); remove it from the folder, "
                        "or render again") from None


# ----------------------------------------------------------------------------------------------------------------
# Scorers: the same interface for the toy-world oracle and CLIP


@dataclass(frozen=True)
class PromptScores:
    """Scores of a batch of images rendered from one prompt."""

    text_alignment: list[float]  # (N,) in [0, 1]
    subjects: dict[str, list[float]]  # subject key -> (N,) fidelity in [0, 1], for the subjects the prompt names
    details: list[dict] = field(default_factory=list)  # (N,) per-image extras (oracle elements, raw cosines)


class OracleScorer:
    """Text alignment and subject fidelity read by the toy world's oracle (see the module docstring)."""

    name = "toy-oracle"

    def __init__(self, project, oracle=None):
        from palpcompose.toyworld import oracle as toy_oracle
        from palpcompose.toyworld import world

        self._oracle_module, self._world = toy_oracle, world
        # the instrument of the project's base model: its folder's own oracle when it has one (a toy-world model
        # exported with a read-out), else the shipped one
        self.oracle_path = None if oracle is not None else toy_oracle.model_oracle_path(
            base_model_path(project.config.project.base_model, project.root))
        self.oracle = oracle if oracle is not None else toy_oracle.load_oracle(self.oracle_path)
        self.class_words = {k: s.class_name for k, s in project.config.subjects.items()}
        # What each subject is judged on, read once from its references.
        self.kinds: dict[str, str] = {}
        self.targets: dict[str, dict[str, int]] = {}
        for key, subject in project.config.subjects.items():
            refs = [_open_rgb(p) for p in project.images[key]]
            if is_toy_object(subject.class_name):
                self.kinds[key] = "object"
                self.targets[key] = toy_oracle.subject_identity(self.oracle, refs)
            else:  # an artwork: what a render can take from it is its look, the style and the ambiance
                self.kinds[key] = "artwork"
                probs = toy_oracle.predict(self.oracle, refs)
                self.targets[key] = {head: int(probs[head].mean(0).argmax()) for head in ARTWORK_HEADS}

    def describe_subject(self, key: str) -> str:
        heads = self._oracle_module.HEADS
        values = ", ".join(f"{head} {heads[head][index]}" for head, index in self.targets[key].items())
        return f"{self.kinds[key]} ({values})"

    def check_prompt(self, prompt: str) -> None:
        text = class_word_prompt(prompt, self.class_words)
        if not self._oracle_module.prompt_elements(text):
            raise UserError(
                f"prompt {prompt!r} names no toy-world element, so the oracle cannot measure its text alignment; "
                f"name a style ({', '.join(self._world.STYLE_PHRASES.values())}), an ambiance "
                f"({', '.join(p for p in self._world.AMBIANCE_PHRASES.values() if p)}) or an object class "
                f"({', '.join(self._world.CLASSES)})"
            )

    def score(self, images, prompt: str) -> PromptScores:
        self.check_prompt(prompt)
        # Every element the prompt names, each placeholder as its subject's class word: with two object subjects
        # both classes count, and the toy world's one object per scene can match only one of them.
        elements = self._oracle_module.prompt_elements(class_word_prompt(prompt, self.class_words))
        probs = self._oracle_module.predict(self.oracle, images)  # head -> (N, values)
        heads = self._oracle_module.HEADS
        hits = {(head, value): (probs[head].argmax(-1) == value) for head, value in elements}
        # Same definition as toyworld.oracle.score_text_alignment: the fraction of named elements recognised.
        text = torch.stack([h.float() for h in hits.values()]).mean(0).tolist()
        subjects = {}
        for key in subjects_in(prompt, self.class_words):
            per_head = torch.stack([probs[head][:, value] for head, value in self.targets[key].items()])
            subjects[key] = per_head.mean(0).tolist()
        details = [
            {"elements": {f"{head} {heads[head][value]}": bool(hits[head, value][i]) for head, value in elements}}
            for i in range(len(text))
        ]
        return PromptScores(text, subjects, details)


class ClipScorer:
    """The paper's CLIP metrics from a local CLIP folder (transformers `CLIPModel` + tokenizer + image processor)."""

    name = "clip"
    oracle_path = None  # eval.json's "oracle": none for CLIP

    def __init__(self, project, clip_path: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        path = Path(clip_path).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"--clip {clip_path}: not a CLIP model folder (no config.json); pass a local folder saved with "
                "transformers' save_pretrained, e.g. a download of openai/clip-vit-base-patch32"
            )
        if not any(path.glob("*.safetensors")):
            raise UserError(f"--clip {clip_path}: no .safetensors weights there (pickled .bin files are not loaded); "
                            "convert the model to safetensors")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"--clip {clip_path}: could not load a CLIP model, tokenizer and image processor from "
                            f"this folder ({type(exc).__name__}: {exc})") from exc
        self.device = device
        self.class_words = {k: s.class_name for k, s in project.config.subjects.items()}
        self.references = {key: self.embed_images([_open_rgb(p) for p in paths])
                           for key, paths in project.images.items()}
        self.kinds = {key: "image similarity" for key in self.class_words}

    def describe_subject(self, key: str) -> str:
        return f"image similarity to {len(self.references[key])} reference(s)"

    def check_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise UserError("an empty prompt cannot be scored")

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """(N, D) unit-norm CLIP image embeddings."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns a model output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_text(self, text: str) -> torch.Tensor:
        """(1, D) unit-norm CLIP text embedding (truncated to the text encoder's length)."""
        tokens = self.tokenizer([text], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def score(self, images, prompt: str) -> PromptScores:
        self.check_prompt(prompt)
        image_emb = self.embed_images(images)  # (N, D)
        text_cos = (image_emb @ self.embed_text(class_word_prompt(prompt, self.class_words)).T)[:, 0]  # (N,)
        subjects, raw = {}, {}
        for key in subjects_in(prompt, self.class_words):
            cos = (image_emb @ self.references[key].T).mean(1)  # (N,) mean over the subject's references
            subjects[key] = cos.clamp(min=0).tolist()
            raw[key] = cos.tolist()
        details = [{"text_cosine": float(text_cos[i]), "image_cosine": {k: v[i] for k, v in raw.items()}}
                   for i in range(len(images))]
        return PromptScores(text_cos.clamp(min=0).tolist(), subjects, details)


def make_scorer(project, clip: str | Path | None = None, oracle: bool = False, device: str = "cpu"):
    """The scorer for a project: CLIP with `clip`, else the toy-world oracle for builtin:toy (or with `oracle`).
    UserError when neither applies."""
    if clip is not None and oracle:
        raise UserError("--clip and --oracle choose different metrics; pass only one")
    if clip is not None:
        return ClipScorer(project, clip, device)
    if oracle or project.config.project.base_model.strip() == TOY_MODEL:
        return OracleScorer(project)
    raise UserError(
        f"{project.file}: project.base_model is {project.config.project.base_model!r}, not {TOY_MODEL}, so the toy "
        "world's oracle cannot judge its renders; pass --clip PATH with a local CLIP model folder (the paper used "
        "openai/clip-vit-base-patch32), or --oracle if this model was trained on the toy world"
    )


# ----------------------------------------------------------------------------------------------------------------
# Which images: fresh renders of the target prompt, or an existing render folder


@dataclass(frozen=True)
class EvalImage:
    path: Path
    prompt: str  # with placeholders
    seed: int | None
    model: str | None  # "final", "step-000100", "base"; None when unknown
    step: int | None
    guidance: str | None = None  # what trained the weights, as render.json recorded it; None: the run's manifest


def images_from_folder(project, folder: Path) -> list[EvalImage]:
    """The images of a render folder: render.json's list when there is one (each image with its own prompt), else
    every image file in it, all scored against the target prompt."""
    index = folder / RENDER_INDEX_FILE
    if index.is_file():
        try:
            entries = json.loads(index.read_text(encoding="utf-8"))["images"]
            images = [EvalImage(folder / e["file"], e["prompt"], e.get("seed"), e.get("model"), e.get("step"),
                                e.get("guidance")) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(
                f"{index}: unreadable render index ({exc}); render again with `palpcompose render`") from exc
        missing = [str(i.path) for i in images if not i.path.is_file()]
        if missing:
            raise UserError(f"{index} lists images that are missing: {', '.join(missing[:3])}; render again")
        return images
    prompt = project.config.palp.target_prompt
    if not prompt:
        raise UserError(f"{folder}: no render.json to say which prompt its images show, and {project.file} has no "
                        "palp.target_prompt; score a folder written by `palpcompose render`")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != CONTACT_SHEET_FILE)
    if not files:
        raise UserError(f"--renders {folder}: no images there ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})")
    return [EvalImage(p, prompt, None, None, None) for p in files]


def resolve_renders(project, renders: str | Path) -> Path:
    """--renders: a folder path, or the name of a run under out/renders/."""
    path = Path(renders).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"--renders {renders}: is a file, not a folder; give the render folder that holds the images")
    out = out_dir(project.root)
    run = renders_dir(out) / str(renders)
    if run.is_dir():
        return run
    # `render --run ID` writes to out/runs/ID/renders/NAME (NAME is the render's time stamp)
    kept = sorted(p for p in runs_dir(out).glob(f"*/{RENDERS_DIR}/{renders}") if p.is_dir()) \
        if Path(str(renders)).name == str(renders) else []
    if len(kept) == 1:
        return kept[0]
    if kept:
        raise UserError(f"--renders {renders}: several kept runs have a render of that name; give its path: "
                        + ", ".join(command_line(str(p)) for p in kept))
    raise UserError(f"--renders {renders}: no such folder (nor a run of that name in {renders_dir(out)} "
                    f"or {runs_dir(out)}/*/{RENDERS_DIR})")


# ----------------------------------------------------------------------------------------------------------------
# eval


@dataclass(frozen=True)
class EvalResult:
    metric: str
    renders: Path
    text_alignment: float  # the means of `means_of`, the personalized weights (see `models` for every set)
    subject_fidelity: float | None
    subjects: dict[str, dict]  # key -> {"class_name", "scored_as", "subject_fidelity"} (of `means_of`)
    images: list[dict]
    eval_json: Path
    models: dict[str, dict] = field(default_factory=dict)  # weights label -> its own means, guidance and step
    means_of: str | None = None  # the weights the top-level means are of
    guidance: str | None = None  # the guidance that trained them (manifest.json), None for the base model
    run_eval_json: Path | None = None  # the copy kept in the render folder


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _trained_guidance(project, run: str | None = None) -> str | None:
    """The guidance of the trained weights, from the run's manifest.json (out/, or out/runs/<run>/ with --run; None
    when unreadable)."""
    guidance = (read_json(manifest_path(run_out_dir(project, run))) or {}).get("guidance")
    return guidance if isinstance(guidance, str) else None


def evaluate(project, *, clip=None, oracle: bool = False, renders=None, seeds=None, step: int | None = None,
             console=None, scorer=None, run: str | None = None) -> EvalResult:
    """Score renders of `project` and write eval.json into the render folder and out/eval.json (the latest).
    Without `renders`, renders the target prompt for `seeds` (default: render.seeds) with the final weights (or
    snapshot `step`, or the training run `run` kept in out/runs/) first. Images of different weights (a `--compare`
    or `--sweep` folder) get one mean each. `scorer` overrides the metric (tests, the ablation)."""
    cfg = project.config
    if renders is not None and (seeds is not None or step is not None or run is not None):
        raise UserError("--renders scores existing images; --seeds, --step and --run only apply when eval renders")
    # 1. Validate everything before rendering or writing anything.
    folder = resolve_renders(project, renders) if renders is not None else None
    if folder is None and not cfg.palp.target_prompt:
        raise UserError(f"{project.file}: palp.target_prompt is not set, so there is nothing to render and score; "
                        "set it, or score existing renders with --renders")
    trackers.check_installed(cfg.train.log_with, project.file)  # the eval table goes to the run's tracker too
    scorer = scorer or make_scorer(project, clip, oracle)
    listed = images_from_folder(project, folder) if folder is not None else None
    for prompt in dict.fromkeys(i.prompt for i in listed) if listed else [cfg.palp.target_prompt]:
        scorer.check_prompt(prompt)

    # 2. Images: render the target prompt, or the folder's images.
    if listed is None:
        result = render(project, prompts=[cfg.palp.target_prompt], seeds=seeds, step=step, console=console, run=run)
        folder = result.run_dir
        listed = [EvalImage(i.path, i.prompt, i.seed, i.model, i.step) for i in result.images]

    # 3. Score, one prompt at a time.
    trained_guidance = _trained_guidance(project, run)
    rows: list[dict] = []
    for prompt in dict.fromkeys(i.prompt for i in listed):
        group = [i for i in listed if i.prompt == prompt]
        scores = scorer.score([_open_rgb(i.path) for i in group], prompt)
        for n, image in enumerate(group):
            per_subject = {key: values[n] for key, values in scores.subjects.items()}
            rows.append({
                "file": image.path.name, "prompt": prompt, "seed": image.seed, "model": image.model,
                "guidance": None if image.model in ("base", None) else image.guidance or trained_guidance,
                "step": image.step, "text_alignment": scores.text_alignment[n],
                "subject_fidelity": sum(per_subject.values()) / len(per_subject) if per_subject else None,
                "subjects": per_subject, **(scores.details[n] if scores.details else {}),
            })
    order = {i.path.name: n for n, i in enumerate(listed)}
    rows.sort(key=lambda r: order[r["file"]])  # the folder's order, not grouped by prompt

    # 4. Means per set of weights (base model, each snapshot, final), and eval.json.
    def means(group: list[dict]) -> dict:
        return {"text_alignment": _mean(r["text_alignment"] for r in group),
                "subject_fidelity": _mean(r["subject_fidelity"] for r in group),
                "subjects": {key: _mean(r["subjects"].get(key) for r in group) for key in cfg.subjects}}

    labels = list(dict.fromkeys(r["model"] or "renders" for r in rows))
    models = {}
    for label in labels:
        group = [r for r in rows if (r["model"] or "renders") == label]
        models[label] = {"guidance": group[0]["guidance"], "step": group[0]["step"], "images": len(group),
                         **means(group)}
    # The top-level means are those of the personalized weights: the final ones when scored, else the last set.
    trained = [label for label in labels if label != "base"] or labels
    means_of = FINAL_NAME if FINAL_NAME in trained else trained[-1]
    top = models[means_of]
    subjects = {
        key: {"class_name": cfg.subjects[key].class_name, "scored_as": scorer.describe_subject(key),
              "reference_images": len(project.images[key]), "subject_fidelity": top["subjects"][key]}
        for key in cfg.subjects
    }
    data = {
        "palpcompose_version": __version__, "project": cfg.project.name, "base_model": cfg.project.base_model,
        "metric": scorer.name, "clip_model": str(clip) if clip is not None else None,
        "oracle": str(scorer.oracle_path) if scorer.oracle_path else None, "renders": str(folder),
        "means_of": means_of, "guidance": top["guidance"], "text_alignment": top["text_alignment"],
        "subject_fidelity": top["subject_fidelity"], "subjects": subjects, "models": models, "images": rows,
    }
    # Kept with the render run, so a later eval does not replace it: a folder in out/ (out/renders/<run>/,
    # out/runs/<id>/renders/<run>/) or one `render --out` wrote (it has our render.json). A folder of the user's
    # own images gets nothing written into it.
    outputs = out_dir(project.root).resolve()
    ours = folder.resolve().is_relative_to(outputs) or (folder / RENDER_INDEX_FILE).is_file()
    run_eval_json = eval_path(folder) if ours else None
    if run_eval_json is not None:
        atomic_write_json(run_eval_json, data)
    eval_json = eval_path(out_dir(project.root))  # the latest eval
    atomic_write_json(eval_json, data)
    _log_to_tracker(project, run, models, top["step"])
    return EvalResult(scorer.name, folder, top["text_alignment"], top["subject_fidelity"], subjects, rows, eval_json,
                      models, means_of, top["guidance"], run_eval_json)


def _log_to_tracker(project, run: str | None, models: dict, step: int | None) -> None:
    """train.log_with: the eval's means, one row per set of weights, as a table in the training run's tracker
    (out/logs/ of that run), at the step of the weights scored."""
    log_with = project.config.train.log_with
    if log_with == "none":
        return
    keys = list(project.config.subjects)
    columns = ["weights", "step", "guidance", "images", "text_alignment", "subject_fidelity", *keys]
    rows = [[label, m["step"], m["guidance"], m["images"], m["text_alignment"], m["subject_fidelity"],
             *(m["subjects"].get(k) for k in keys)] for label, m in models.items()]
    tracker = trackers.open_tracker(log_with, logs_dir(run_out_dir(project, run)), "eval", None,
                                    project=project.config.project.name)
    try:
        tracker.log_table("eval", columns, rows, step=step)
    finally:
        tracker.finish()


def summary_table(result: EvalResult):
    """Per-image scores and the means, as a rich table. The prompt is in the title when every image shares it."""
    from rich.table import Table
    from rich.text import Text

    keys = list(result.subjects)
    prompts = list(dict.fromkeys(row["prompt"] for row in result.images))
    title = f"eval ({result.metric}) of {len(result.images)} image(s) in {result.renders}"
    if len(prompts) == 1:
        title += f"\nprompt: {prompts[0]}"
    table = Table(title=Text(title), title_justify="left")
    columns = ["image"] + (["prompt"] if len(prompts) > 1 else []) + ["text alignment"]
    has_elements = any("elements" in row for row in result.images)
    columns += (["elements recognised"] if has_elements else []) + ["subject fidelity"] + [f"[{k}]" for k in keys]
    for column in columns:
        table.add_column(Text(column), justify="right" if "alignment" in column or "fidelity" in column
                         or column.startswith("[") else "left")

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    for row in result.images:
        cells = [Text(row["file"])] + ([Text(row["prompt"])] if len(prompts) > 1 else []) + [fmt(row["text_alignment"])]
        if has_elements:
            found = [name.split(" ", 1)[1] for name, ok in row.get("elements", {}).items() if ok]
            cells.append(Text(", ".join(found) or "none"))
        cells += [fmt(row["subject_fidelity"])] + [fmt(row["subjects"].get(k)) for k in keys]
        table.add_row(*cells)
    table.add_section()
    # one mean per set of weights (a sweep, --compare), each named; one set: a plain "mean"
    sets = result.models if len(result.models) > 1 else {None: {
        "text_alignment": result.text_alignment, "subject_fidelity": result.subject_fidelity,
        "subjects": {k: result.subjects[k]["subject_fidelity"] for k in keys}}}
    for label, m in sets.items():
        means = [Text("mean" if label is None else f"mean ({label})", style="bold")]
        means += ([""] if len(prompts) > 1 else []) + [fmt(m["text_alignment"])]
        means += ([""] if has_elements else []) + [fmt(m["subject_fidelity"])]
        table.add_row(*means, *(fmt(m["subjects"].get(k)) for k in keys))
    return table
