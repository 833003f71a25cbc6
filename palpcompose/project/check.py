"""`palpcompose check DIR`: everything load_project checks, plus the base model's reachability and the length of
every prompt in tokens. Writes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palpcompose import buckets
from palpcompose.captions import caption_path
from palpcompose.errors import Problem
from palpcompose.models import family_of, model_notes, source_bucket_alignment
from palpcompose.placeholders import PLACEHOLDER
from palpcompose.project.load import validate
from palpcompose.project.schema import Project, ProjectConfig
from palpcompose.project.validation import Validator, key_lines
from palpcompose.quantize import check_installed
from palpcompose.toyworld.world import CLASSES

DEFAULT_TOKEN_LIMIT = 77  # CLIP's text encoders (SD 1.x and 2.x) read 77 tokens, start and end tokens included


@dataclass(frozen=True)
class CheckReport:
    project: Project
    base_model: Any  # models.BaseModelSource
    token_limit: int
    token_limit_source: str  # where token_limit comes from ("the model's tokenizer" or why it is assumed)
    prompt_tokens: tuple[tuple[str, str, int | None], ...]  # (key, prompt, token count or None when not counted)
    notes: tuple[str, ...]  # the project's notes (converted images, small images, ...)
    # (subject key, images with a caption, images, the first few captioned images relative to the project)
    captions: tuple[tuple[str, int, int, tuple[str, ...]], ...] = ()
    buckets: tuple[tuple[tuple[int, int], int], ...] = ()  # ((width, height), images) of each training size used
    # a flow family's T5 (Flux.1, SD 3): (the tokens it reads, the family's max_sequence_length; each prompt's
    # count in T5's tokens, in prompt_tokens' order, None when not counted); None for CLIP-only models
    t5: tuple[int, tuple[int | None, ...]] | None = None

CAPTIONS_SHOWN = 3  # captioned images `check` names per subject


def check_project(project_dir: str | Path) -> CheckReport:
    """Validate a project as `palpcompose check` does. Raises ProjectError listing every problem; writes nothing."""
    v, project = validate(Path(project_dir), with_images=True)
    source = v.base_model
    if source is not None and source.kind == "hub" and not source.available:
        v.problem("project.base_model", source.detail)  # train and render would refuse it: so does check
    if project is None or v.problems:
        raise v.error()
    check_installed(project.config.train.frozen_weights, project.file)  # 8 bits need torchao, as train says
    tokenizer, limit_source = _load_tokenizer(source)
    config = project.config
    prompts = config_prompts(config)
    if tokenizer is None:
        limit, counts = DEFAULT_TOKEN_LIMIT, [(key, prompt, None) for key, prompt in prompts]
    else:
        limit, counts = count_prompt_tokens(tokenizer, prompts)
        for key, prompt, n in counts:
            if n > limit:
                v.problem(key, *_too_long(n, limit))
        v.problems += caption_length_problems(tokenizer, project)
    if v.problems:
        raise v.error()
    notes = project.notes + tuple(_toy_class_notes(project)) + tuple(model_notes(source))
    return CheckReport(project, source, limit, limit_source, tuple(counts), notes, caption_summary(project),
                       bucket_summary(project, source_bucket_alignment(source)), _t5_counts(source, prompts))


def _t5_counts(source, prompts: list[tuple[str, str]]) -> tuple[int, tuple[int | None, ...]] | None:
    """A flow family's T5 limit (its EncoderSlot's max_length: FluxPipeline's 512, SD 3's 256) and each prompt's
    length in T5's tokens, when its tokenizer can be read offline (else None per prompt); None without a T5."""
    slot = next((s for s in family_of(source.family).encoders if s.kind == "t5"), None)
    if slot is None or source.family not in family_of(source.family).names:
        return None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.location, subfolder=slot.tokenizer, local_files_only=True)
    except (OSError, ValueError):
        return slot.max_length, tuple(None for _ in prompts)
    return slot.max_length, tuple(len(tokenizer(PLACEHOLDER.sub(" x ", prompt), truncation=False,
                                                verbose=False).input_ids) for _, prompt in prompts)


def caption_summary(project: Project) -> tuple[tuple[str, int, int, tuple[str, ...]], ...]:
    """Per subject: (key, images with a caption, images, the first CAPTIONS_SHOWN captioned images)."""
    rows = []
    for key, paths in project.images.items():
        captioned = [p.relative_to(project.root).as_posix() for p in paths if p in project.captions]
        rows.append((key, len(captioned), len(paths), tuple(captioned[:CAPTIONS_SHOWN])))
    return tuple(rows)


def bucket_summary(project: Project, alignment: int) -> tuple[tuple[tuple[int, int], int], ...]:
    """((width, height), number of images) of each training size the references use (buckets.choose_bucket)."""
    train = project.config.train
    counts: dict[tuple[int, int], int] = {}
    for paths in project.images.values():
        for path in paths:
            size = project.image_sizes.get(path, (train.resolution, train.resolution))
            bucket = buckets.choose_bucket(size, train.resolution, alignment, train.buckets)
            counts[bucket] = counts.get(bucket, 0) + 1
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def caption_prompts(project: Project) -> list[tuple[Path, str]]:
    """(caption file, prompt) of every image with a caption (Project.captions)."""
    return [(caption_path(image), prompt) for image, prompt in sorted(project.captions.items())]


def caption_length_problems(tokenizer, project: Project) -> list[Problem]:
    """A Problem naming the caption file for each caption longer than the text encoder reads (check and train)."""
    captions = caption_prompts(project)
    limit, counts = count_prompt_tokens(tokenizer, [(str(file), prompt) for file, prompt in captions])
    problems = []
    for file, _, n in counts:
        if n > limit:
            message, hint = _too_long(n, limit)
            problems.append(Problem(file, f"the caption {message}", line=1, hint=hint))
    return problems


def _toy_class_notes(project: Project) -> list[str]:
    """builtin:toy subjects whose class_name is not a toy-world object class: eval judges them as artworks."""
    if project.config.project.base_model.strip() != "builtin:toy":
        return []
    return [f"{project.file}: subjects.{key}.class_name {s.class_name!r} is not a toy-world object class "
            f"({', '.join(CLASSES)}): `palpcompose eval` judges [{key}] as an artwork (on its style and ambiance), "
            "not as an object; if it is an object, use the toy class it is drawn as"
            for key, s in project.config.subjects.items() if s.class_name.strip().lower() not in CLASSES]


def config_prompts(config: ProjectConfig) -> list[tuple[str, str]]:
    """(key, prompt) of every prompt in palp.toml: the subjects' y_P, the target and clean prompts, the render
    prompts and the negative prompt."""
    prompts = [(f"subjects.{k}.prompt", s.prompt) for k, s in config.subjects.items()]
    prompts += [(f"palp.{name}", getattr(config.palp, name)) for name in ("target_prompt", "clean_prompt")
                if getattr(config.palp, name)]
    prompts += [(f"render.prompts[{i}]", p) for i, p in enumerate(config.render.prompts)
                if p != config.palp.target_prompt]
    if config.render.negative_prompt:
        prompts.append(("render.negative_prompt", config.render.negative_prompt))
    return prompts


def count_prompt_tokens(tokenizer, prompts: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str, int]]]:
    """The text encoder's token limit and each prompt's length in tokens, start and end tokens included. A
    placeholder counts as the one token it becomes; the tokenizer is not changed."""
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else DEFAULT_TOKEN_LIMIT
    # " x " is one token in every byte-level BPE vocabulary, as each placeholder token is once added
    counts = [(key, prompt, len(tokenizer(PLACEHOLDER.sub(" x ", prompt), truncation=False, verbose=False).input_ids))
              for key, prompt in prompts]
    return limit, counts


def too_long_problems(file: Path, tokenizer, prompts: list[tuple[str, str]]) -> list[Problem]:
    """A Problem for each prompt longer than the text encoder reads (for train and render, as check does)."""
    limit, counts = count_prompt_tokens(tokenizer, prompts)
    v = Validator(file, b"")  # for its key -> line lookup
    v.lines = key_lines(file.read_text(encoding="utf-8-sig")) if file.is_file() else {}
    for key, _, n in counts:
        if n > limit:
            v.problem(key, *_too_long(n, limit))
    return v.problems


def _too_long(n: int, limit: int) -> tuple[str, str]:
    message = (f"is {n} tokens long, but the text encoder reads at most {limit} (start and end tokens included); "
               "the rest would be silently cut off")
    return message, f"shorten it by {n - limit} tokens"


def _load_tokenizer(source) -> tuple[Any, str]:
    """The base model's CLIP tokenizer when it can be read offline (check_project has made sure the model is
    there), else None and the reason."""
    if source.kind == "single_file":
        return None, "assumed: check does not open single-file checkpoints, prompts not counted"
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(source.location, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError) as exc:
        return None, f"assumed: could not read the model's tokenizer ({exc}), prompts not counted"
    return tokenizer, "from the model's tokenizer"
