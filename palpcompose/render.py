"""Rendering prompts with a project's trained weights: plain renders, step sweeps, base-vs-personalized comparisons.

A render loads the base model once, attaches the LoRA and the learned token embeddings (`attach_trained_weights`), and
renders every (prompt, seed) pair. Each image's starting noise comes from its own CPU `torch.Generator` seeded with
its seed, so an image depends only on its seed and the settings: not on the batch it was rendered in, nor on the
device's random number generator. Outputs go to `DIR/out/renders/<run>/`: one PNG per image with its generation
parameters in the `parameters` text chunk AUTOMATIC1111 and ComfyUI read, a captioned contact sheet, and
`render.json` listing every image with its settings.

`plan_render` makes every check that needs no model and writes nothing; `render` then loads the model, checks what
needs it, and renders. Beside it: attach.py (weights into a pipeline), contact_sheet.py, outputs.py (which weights,
and whether they are stale).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from palpcompose import __version__
from palpcompose.attach import (  # noqa: F401 - ADAPTER_NAME, attach_trained_tokens: palpcompose.render's names
    ADAPTER_NAME,
    attach_trained_tokens,
    attach_trained_weights,
    denoiser,
    merged_lora,
)
from palpcompose.contact_sheet import contact_sheet
from palpcompose.errors import Interrupted, ProjectError, UserError, command_line
from palpcompose.fsutil import atomic_save_image, atomic_write_json, check_folder_can_be_made
from palpcompose.models import (
    SDXL_RESOLUTION,
    expand_placeholders,
    family_of,
    load_pipeline,
    native_resolution,
    placeholder_tokens,
    resolve_base_model,
    source_size_alignment,
)
from palpcompose.outputs import (
    CONTACT_SHEET_FILE,
    FINAL_NAME,
    RENDER_INDEX_FILE,
    check_trained_for,
    load_weights,
    locate_weights,
    read_manifest,
    renders_dir,
    run_out_dir,
    snapshot_dir,
    snapshot_name,
    snapshot_steps,
)
from palpcompose.project import (
    PLACEHOLDER,
    check_option,
    config_prompts,
    count_prompt_tokens,
    placeholder_problems,
    sampler_problem,
    size_problem,
    too_long_problems,
)
from palpcompose.sampling import SCHEDULERS, make_scheduler, parse_seeds
from palpcompose.weights import TrainedWeights


@dataclass(frozen=True)
class RenderSettings:
    """How each image is rendered; what every PNG's `parameters` chunk records."""

    steps: int
    guidance_scale: float
    width: int
    height: int
    negative_prompt: str
    scheduler: str  # a key of SCHEDULERS
    batch_size: int
    lora_scale: float = 1.0  # the trained LoRA's strength (peft's adapter scale); the learned tokens stay whole


@dataclass(frozen=True)
class ModelChoice:
    """One row group of a render: the personalized model at some weights, or the base model (weights None)."""

    label: str  # "final", "step-000100" or "base"
    weights: TrainedWeights | None
    step: int | None
    guidance: str = "base"  # the guidance mode that trained the weights ("base": the untrained model)

    @property
    def caption(self) -> str:
        if self.weights is None:
            return "base model"
        return f"step {self.step}" if self.label.startswith("step-") else f"{self.label} (step {self.step})"


@dataclass(frozen=True)
class RenderedImage:
    path: Path
    model: str  # ModelChoice.label
    step: int | None
    prompt: str  # as the user wrote it, with [V1] placeholders
    text: str  # what the text encoder saw (tokens, or class words for the base model)
    seed: int
    guidance: str = "base"  # ModelChoice.guidance


@dataclass(frozen=True)
class RenderResult:
    run_dir: Path
    images: tuple[RenderedImage, ...]
    contact_sheet: Path
    settings: RenderSettings
    warnings: tuple[str, ...] = field(default_factory=tuple)


# --- prompt lengths (seeds and samplers: sampling.py) ---------------------------------------------------------


MAX_LORA_SCALE = 2.0  # --lora-scale and render.lora_scale: (0, 2]


def _check_prompt_lengths(project, tokenizer, prompts, negative_prompt: str, *, from_options: bool,
                          negative_from_option: bool) -> None:
    """Refuse prompts longer than the text encoder reads (they would be cut off without a word), naming the
    palp.toml key or the option they came from."""
    from_file = [(key, text) for key, text in config_prompts(project.config)
                 if not ((from_options and key.startswith(("render.prompts", "palp.target_prompt")))
                         or (negative_from_option and key == "render.negative_prompt"))]
    problems = too_long_problems(project.file, tokenizer, from_file)
    if problems:
        raise ProjectError(problems)
    named = [("--prompt", p) for p in prompts] if from_options else []
    if negative_from_option and negative_prompt:
        named.append(("--negative-prompt", negative_prompt))
    limit, counts = count_prompt_tokens(tokenizer, named)
    for option, prompt, n in counts:
        if n > limit:
            raise UserError(f"{option} {prompt[:40]!r}...: {n} tokens, but the text encoder reads at most {limit} "
                            f"(start and end tokens included); shorten it by {n - limit} tokens")


# --- the render itself --------------------------------------------------------------------------------------------


def a1111_parameters(
    prompt: str, settings: RenderSettings, seed: int, model: str, extra: dict[str, str]
) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs (and ComfyUI and most image viewers read):
    the prompt, an optional `Negative prompt:` line, then `Key: value` pairs separated by commas."""

    def quote(value: str) -> str:
        return json.dumps(value) if any(c in value for c in ',:\n"') else value

    fields = {
        "Steps": str(settings.steps),
        "Sampler": SCHEDULERS[settings.scheduler][2],
        "CFG scale": f"{settings.guidance_scale:g}",
        "Seed": str(seed),
        "Size": f"{settings.width}x{settings.height}",
        "Model": model,
        **extra,
        "Version": f"palpcompose {__version__}",
    }
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def default_render_size(source) -> int:
    """The image side StableDiffusionXLPipeline renders at by default: the model's native size (its UNet's sample
    size times the VAE's scale factor, models.native_resolution); SDXL's 1024 when its configs cannot be read."""
    return native_resolution(source) or SDXL_RESOLUTION


def _pick_device() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


@dataclass
class RenderPlan:
    """What `render` is about to do, decided by `plan_render` before anything is loaded or written."""

    project: object
    settings: RenderSettings
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    texts: dict[str, str]  # prompt -> what the text encoder reads with the trained weights (tokens)
    base_texts: dict[str, str]  # prompt -> what the base model reads (class words)
    source: object  # models.BaseModelSource
    out_dir: Path  # the training run rendered: out/, or out/runs/<run>/
    manifest: dict | None  # its manifest.json (None: none, or the base model alone)
    models: list[ModelChoice]  # the row groups of the render, in order
    warnings: list[str]
    out: Path | None  # --out; None: a new folder in out_dir/renders/
    kind: str  # the new render folder's suffix: "sweep", "compare", "base" or ""
    run: str | None  # --run
    prompts_from_options: bool  # the prompts came from --prompt (not palp.toml)
    negative_from_option: bool  # the negative prompt came from --negative-prompt


def plan_render(project, *, prompts=None, seeds=None, step: int | None = None, steps: int | None = None,
                guidance_scale: float | None = None, width: int | None = None, height: int | None = None,
                negative_prompt: str | None = None, scheduler: str | None = None, batch_size: int | None = None,
                sweep: bool = False, compare: bool = False, out: str | Path | None = None, run: str | None = None,
                base_only: bool = False, lora_scale: float | None = None) -> RenderPlan:
    """Every check `render` can make before loading the base model: options, prompts, seeds, settings, which
    weights (read, so a damaged file is found now) and the guard rails. Writes nothing. Arguments as `render`'s."""
    cfg = project.config
    rc = cfg.render
    warnings: list[str] = []

    # 1. Settings: options over palp.toml's [render], validated before any work.
    if sweep and step is not None:
        raise UserError("--sweep renders every snapshot; it cannot be combined with --snapshot")
    if base_only and (sweep or compare or step is not None or run is not None):
        raise UserError("--base renders the base model alone; it cannot be combined with --sweep, --compare, "
                        "--snapshot or --run")
    if out is not None:
        _check_out_folder(Path(out))
    prompt_options = prompts
    if prompts and not all(p.strip() for p in prompts):
        raise UserError("--prompt is empty; give the text to render, e.g. --prompt \"A sketch of [V1]\", or leave "
                        "--prompt out to render render.prompts / palp.target_prompt")
    named = [("--prompt", text) for text in prompt_options or ()]
    if negative_prompt:
        named.append(("--negative-prompt", negative_prompt))
    for option, text in named:  # as check does for palp.toml's prompts
        for message, hint in placeholder_problems(text, cfg.subjects):
            raise UserError(f"{option} {text!r}: {message}; {hint}")
    prompts = tuple(prompts) if prompts else (tuple(rc.prompts) or (cfg.palp.target_prompt,))
    prompts = tuple(dict.fromkeys(p for p in prompts if p and p.strip()))  # each prompt once, in order
    if not prompts:
        raise UserError(
            f"{project.file}: nothing to render; set render.prompts or palp.target_prompt, or pass --prompt"
        )
    listed = ", ".join(f"[{key}]" for key in cfg.subjects)
    if not base_only:
        warnings += [f"prompt {p!r} has no placeholder ({listed}), so its images show none of the trained subjects"
                     for p in prompts if not PLACEHOLDER.search(p)]
    if seeds is None:
        seeds = tuple(rc.seeds)
    elif isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise UserError(f"{project.file}: render.seeds is empty; list seeds there, or pass --seeds, e.g. --seeds 0-3")
    source = resolve_base_model(cfg.project.base_model, project.root, cfg.project.allow_pickle)
    # SD 1.x/2.x: the size trained at; SDXL: the pipeline's own default size (1024 for SDXL base)
    size = default_render_size(source) if source.family == "sdxl" else cfg.train.resolution

    def pick(option, configured):
        return configured if option is None else option

    settings = RenderSettings(
        steps=pick(steps, rc.steps),
        guidance_scale=pick(guidance_scale, rc.guidance_scale),
        width=pick(width, rc.width or size),
        height=pick(height, rc.height or size),
        negative_prompt=pick(negative_prompt, rc.negative_prompt),
        scheduler=pick(scheduler, rc.scheduler),
        batch_size=pick(batch_size, rc.batch_size),
        lora_scale=float(pick(lora_scale, rc.lora_scale)),
    )
    _validate(settings)
    _check_size(source, settings, width, height)
    problem = sampler_problem(settings.scheduler, source)
    if problem is not None:  # render.scheduler was checked with palp.toml: this is --scheduler
        raise UserError(f"--scheduler {settings.scheduler}: {problem}; use --scheduler "
                        f"{family_of(source.family).samplers[0]}, or leave it out")

    tokens = placeholder_tokens(cfg.project.name, cfg.subjects.keys())
    class_words = {key: subject.class_name for key, subject in cfg.subjects.items()}
    texts = {p: expand_placeholders(p, tokens) for p in prompts}  # raises on unknown [Vn]
    base_texts = {p: expand_placeholders(p, class_words) for p in prompts}

    # 2. Which weights: guard rails, then the model rows of the render.
    out_dir = run_out_dir(project, run)
    if base_only:  # the base model alone: no trained weights are read, so none are needed
        manifest, models = None, [ModelChoice("base", None, None)]
    else:
        manifest = read_manifest(out_dir)
        folder, label, found = locate_weights(project, out_dir, step)
        warnings += found
        warnings += check_trained_for(project, out_dir, manifest)
        if sweep:
            choices = [(snapshot_dir(out_dir, s), snapshot_name(s)) for s in snapshot_steps(out_dir)]
            if label == FINAL_NAME:
                choices.append((folder, label))
        else:
            choices = [(folder, label)]
        models = [ModelChoice("base", None, None)] if compare else []
        for path, name in choices:
            weights = load_weights(path)
            missing = sorted(set(tokens.values()) - set(weights.embeddings))
            if missing:
                raise UserError(
                    f"{path}: has no embedding for {', '.join(missing)}; palp.toml's subjects changed since "
                    f"training. Retrain with `{command_line('palpcompose', 'train', project.root)}`"
                )
            # weights written before their header said so: the guidance of the run in out/manifest.json
            guidance = weights.guidance or (manifest or {}).get("guidance") or "unknown"
            models.append(ModelChoice(name, weights, weights.step, guidance))
        if sweep and models[-1].label == FINAL_NAME:  # the snapshot of the last step holds the final weights again
            models = [m for m in models if m.label == FINAL_NAME or m.step != models[-1].step]
    return RenderPlan(
        project=project, settings=settings, prompts=prompts, seeds=seeds, texts=texts, base_texts=base_texts,
        source=source, out_dir=out_dir, manifest=manifest, models=models, warnings=warnings,
        out=None if out is None else Path(out), kind="sweep" if sweep else "compare" if compare else "base" if
        base_only else "", run=run, prompts_from_options=bool(prompt_options),
        negative_from_option=negative_prompt is not None,
    )


def render(
    project,
    *,
    prompts=None,
    seeds=None,
    step: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    negative_prompt: str | None = None,
    scheduler: str | None = None,
    batch_size: int | None = None,
    sweep: bool = False,
    compare: bool = False,
    out: str | Path | None = None,
    console=None,
    run: str | None = None,
    base_only: bool = False,
    lora_scale: float | None = None,
) -> RenderResult:
    """Render the project's prompts with its trained weights; arguments left None come from palp.toml's [render].

    `seeds` is a sequence of ints or a string such as "0-7". `step` picks a snapshot. `sweep` renders every snapshot
    and the final weights; `compare` adds the base model (class words instead of tokens). `run` picks a training
    run kept in out/runs/<run>/ (its renders go there too). `out` is the folder to write to (new or empty) instead of
    a new render folder. `base_only` renders the base model alone (class words, no trained weights needed): a
    prompt, or the clean prompt, tried before training. `lora_scale` (0 < S <= 2) scales the trained LoRA through
    peft's adapter scale (1: as trained); the learned tokens stay whole. Everything is validated before anything
    is written:
    `plan_render`, then the checks that need the loaded model (prompt lengths, whether the weights fit it).
    """
    from rich.markup import escape

    plan = plan_render(
        project, prompts=prompts, seeds=seeds, step=step, steps=steps, guidance_scale=guidance_scale, width=width,
        height=height, negative_prompt=negative_prompt, scheduler=scheduler, batch_size=batch_size, sweep=sweep,
        compare=compare, out=out, run=run, base_only=base_only, lora_scale=lora_scale,
    )
    for message in plan.warnings:
        if console is not None:
            console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
    cfg, settings, prompts, seeds, models = project.config, plan.settings, plan.prompts, plan.seeds, plan.models

    # 3. Base model and sampler.
    device, dtype = _pick_device()
    pipe = load_pipeline(plan.source, torch_dtype=dtype)
    _check_prompt_lengths(project, pipe.tokenizer, prompts, settings.negative_prompt,
                          from_options=plan.prompts_from_options, negative_from_option=plan.negative_from_option)
    flow = family_of(plan.source.family).flow  # Flux.1, SD 3: their own guidance and T5 prompt
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)  # one of the family's samplers
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if not base_only:
        attach_trained_weights(pipe, next(m.weights for m in models if m.weights is not None),  # fits? (before writing)
                               lora_scale=settings.lora_scale)

    # 4. Render every model x prompt x seed, batch by batch, writing each PNG as soon as it exists.
    if plan.out is None:
        run_dir, made = _new_run_dir(renders_dir(plan.out_dir), plan.kind), True
    else:
        run_dir, made = plan.out, not plan.out.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p_index, prompt, seed) for p_index, prompt in enumerate(prompts, 1) for seed in seeds]
    images: list[RenderedImage] = []
    started = time.perf_counter()
    progress = _progress(console)
    try:
        with progress:
            task = progress.add_task("rendering", total=len(models) * len(jobs))
            for model in models:
                if model.weights is None:
                    if getattr(denoiser(pipe), "peft_config", None):
                        denoiser(pipe).disable_adapters()
                else:
                    attach_trained_weights(pipe, model.weights, lora_scale=settings.lora_scale)
                # merged once per model (not per batch: in fp16 each merge/unmerge pair rounds the base weights)
                with merged_lora(denoiser(pipe)) if model.weights is not None else contextlib.nullcontext():
                    for start in range(0, len(jobs), settings.batch_size):
                        batch = jobs[start : start + settings.batch_size]
                        batch_texts = [
                            (plan.base_texts if model.weights is None else plan.texts)[prompt] for _, prompt, _ in batch
                        ]
                        extra = {} if flow is None else flow_render_kwargs(
                            pipe, flow, model.weights, [plan.base_texts[prompt] for _, prompt, _ in batch], settings)
                        pictures = generate(pipe, batch_texts, [seed for _, _, seed in batch], settings, extra)
                        for (p_index, prompt, seed), text, picture in zip(batch, batch_texts, pictures):
                            path = run_dir / f"{model.label}_p{p_index}_seed{seed}.png"
                            extra = {  # the image's own size: what the pipeline drew, whatever was asked
                                "Size": f"{picture.width}x{picture.height}",
                                "PALP weights": model.label if model.weights is not None else "none (base model)",
                            }
                            if model.step is not None:
                                extra["PALP step"] = str(model.step)
                                extra["PALP guidance"] = model.guidance
                                extra["PALP LoRA scale"] = f"{settings.lora_scale:g}"
                            params = a1111_parameters(text, settings, seed, cfg.project.base_model, extra)
                            _save_png(path, picture, params)
                            images.append(RenderedImage(path, model.label, model.step, prompt, text, seed,
                                                        model.guidance))
                            progress.advance(task)
    except KeyboardInterrupt:  # keep what was drawn; an empty run folder would only confuse
        if not images:
            if made:  # a folder this render created (an empty --out folder of the user's stays)
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            raise Interrupted("interrupted before the first image was drawn; nothing was written") from None
        raise Interrupted(f"interrupted after {len(images)} of {len(models) * len(jobs)} images; they are in "
                          f"{run_dir} (no contact sheet or render.json)") from None
    except BaseException:  # an error before the first image: no empty render folder left behind
        if not images and made:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    # 5. Contact sheet and the run's index.
    sheet_path = run_dir / CONTACT_SHEET_FILE
    atomic_save_image(sheet_path, contact_sheet(images, prompts, seeds, {m.label: m.caption for m in models}))
    atomic_write_json(
        run_dir / RENDER_INDEX_FILE,
        {
            "palpcompose_version": __version__,
            "project": cfg.project.name,
            "base_model": cfg.project.base_model,
            "settings": asdict(settings),
            "prompts": list(prompts),
            "seeds": list(seeds),
            "device": device,
            "wall_time_s": round(time.perf_counter() - started, 3),
            "warnings": plan.warnings,
            "training": _training_record(plan.manifest),
            "training_run": run,  # None: the current run in out/; else the id of a run kept in out/runs/
            "images": [{"file": i.path.name, "model": i.model, "step": i.step, "guidance": i.guidance,
                        "prompt": i.prompt, "text": i.text, "seed": i.seed} for i in images],
        },
    )
    return RenderResult(run_dir, tuple(images), sheet_path, settings, tuple(plan.warnings))


def _training_record(manifest: dict | None) -> dict | None:
    """The training run whose weights a render used, as render.json records it (from out/manifest.json)."""
    if manifest is None:
        return None
    keys = ("guidance", "status", "steps_done", "steps_target", "started_at", "finished_at", "training_hash")
    return {key: manifest.get(key) for key in keys}


def _validate(settings: RenderSettings) -> None:
    if settings.scheduler not in SCHEDULERS:
        raise UserError(
            f"scheduler {settings.scheduler!r} is not known; choose one of: {', '.join(SCHEDULERS)}"
        )
    if not 0 < settings.lora_scale <= MAX_LORA_SCALE:
        raise UserError(f"--lora-scale must be above 0 and at most {MAX_LORA_SCALE:g} (got {settings.lora_scale:g}): "
                        "1 renders the LoRA as trained, 0.5 at half strength; for the base model use --compare or "
                        "--base")
    # the options' ranges are those of the [render] keys they stand for (one check: project.check_option)
    for option, key, value in (("--sampling-steps", "render.steps", settings.steps),
                               ("--guidance-scale", "render.guidance_scale", settings.guidance_scale),
                               ("--batch-size", "render.batch_size", settings.batch_size),
                               ("--width", "render.width", settings.width),
                               ("--height", "render.height", settings.height)):
        check_option(option, key, value)


def _check_size(source, settings: RenderSettings, width: int | None, height: int | None) -> None:
    """Sides the base model cannot render (models.source_size_alignment: 16 for Flux.1 and SD 3), refused before any
    work: FluxPipeline would round them down, and the image would not be the size its PNG and render.json say."""
    alignment, why = source_size_alignment(source)
    for option, key, given, value in (("--width", "render.width", width, settings.width),
                                      ("--height", "render.height", height, settings.height)):
        if value % alignment:
            message, hint = size_problem(value, alignment, why)
            raise UserError(f"{option if given is not None else key} {value}: {message}; {hint}")


def generate(pipe, texts: list[str], seeds: list[int], settings: RenderSettings, extra: dict | None = None):
    """One batch through the pipeline. Each image gets its own CPU generator seeded with its seed, so an image is the
    same whatever batch it is in and on whatever device it is rendered. `extra`: a flow family's own keywords
    (flow_render_kwargs), which replace the guidance and negative prompt ones."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    kwargs = {
        "negative_prompt": [settings.negative_prompt] * len(texts) if settings.negative_prompt else None,
        "guidance_scale": settings.guidance_scale, **(extra or {}),
    }
    with torch.inference_mode():
        return pipe(
            prompt=texts,
            num_inference_steps=settings.steps,
            width=settings.width,
            height=settings.height,
            generator=generators,
            **kwargs,
        ).images


def flow_render_kwargs(pipe, flow, weights, class_texts: list[str], settings: RenderSettings) -> dict:
    """A flow family's guidance keywords (the guidance embedding's value for a distilled Flux.1, real CFG
    otherwise), and T5's prompt with class words when the weights hold no T5 token (train.t5_tokens = false) or
    the base model renders (`weights` None: its text is the class words already)."""
    extra = flow.render_kwargs(settings.guidance_scale, flow.distilled(dict(pipe.transformer.config)),
                               settings.negative_prompt)
    if isinstance(extra.get("negative_prompt"), str):  # one per prompt of the batch
        extra["negative_prompt"] = [extra["negative_prompt"]] * len(class_texts)
    if weights is not None and "t5" not in weights.encoder_keys:
        extra[flow.t5_prompt] = class_texts
    return extra


def _check_out_folder(folder: Path) -> None:
    """--out: a new or empty folder that can be created, so that a render never overwrites or mixes with files."""
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"--out {folder}: the folder is not empty; render writes a whole run (PNGs, contact sheet, "
                        "render.json) and never overwrites, so give a new or empty folder")
    check_folder_can_be_made(folder, "--out")


def _new_run_dir(renders: Path, kind: str) -> Path:
    """A fresh `out/renders/<YYYYmmdd-HHMMSS>[-kind][-n]/`; never reuses a folder."""
    renders.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"-{kind}" if kind else "")
    for n in range(1, 1000):
        run_dir = renders / (stem if n == 1 else f"{stem}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"{renders}: could not create a new run folder named {stem}-N")


def _save_png(path: Path, image, parameters: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    atomic_save_image(path, image, pnginfo=info)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
        transient=True,
    )


def summary_table(result: RenderResult):
    """A rich table saying where everything went (file names relative to the run folder named in the title)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"{len(result.images)} image(s) in {result.run_dir}"), title_justify="left")
    table.add_column("what")
    table.add_column("file", overflow="fold")
    for model in dict.fromkeys(i.model for i in result.images):  # in render order
        count = sum(1 for i in result.images if i.model == model)
        what = "base model" if model == "base" else f"{model} weights"
        table.add_row(f"{what}: {count} PNG(s)", f"{model}_p*_seed*.png")
    table.add_row("contact sheet", result.contact_sheet.name)
    table.add_row("index (prompts, seeds, settings)", RENDER_INDEX_FILE)
    s = result.settings
    table.add_row(
        "settings",
        f"{SCHEDULERS[s.scheduler][2]}, {s.steps} steps, CFG {s.guidance_scale:g}, {s.width}x{s.height}",
    )
    return table
