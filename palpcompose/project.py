"""The project file `palp.toml`: its schema as frozen dataclasses, and validation that reports every problem at once.

A project folder holds `palp.toml`, reference images (relative paths only, so the folder can live in git) and `out/`.
`load_project(dir)` parses the file, checks every key (type, range, choices, unknown names with a did-you-mean), the
placeholders in all prompts, the base model and the images, and raises one `ProjectError` listing every problem with
its file, line, key and a hint. Nothing is written.

The schema reference, docs/schema.md, is generated from the dataclasses below: `python -m palpcompose.project
--schema-md > docs/schema.md` (a test fails when the two differ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from palpcompose.errors import Problem, ProjectError, UserError, command_line

PROJECT_FILE = "palp.toml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SUBJECT_KEY = re.compile(r"^V[1-9][0-9]*$")
PLACEHOLDER = re.compile(r"\[(V[1-9][0-9]*)\]")
# Things that look like a placeholder but are not one: [v1], [V 1], [V01], [ V1 ].
NEAR_PLACEHOLDER = re.compile(r"\[\s*[vV]\s*0*(\d+)\s*\]")

# Subjects whose pictures are not mirror-symmetric: flipping them would teach the model mirrored text and art.
NO_FLIP_CLASSES = frozenset({
    "painting", "paintings", "artwork", "art", "drawing", "illustration", "sketch", "poster", "logo", "text", "sign",
    "book", "cover", "page", "document", "calligraphy", "lettering", "map", "comic",
})


def _spec(doc: str, default: Any = dataclasses.MISSING, *, choices: tuple = (), ge: float | None = None,
          gt: float | None = None, le: float | None = None, multiple_of: int | None = None,
          extension: bool = False, model_dependent: bool = False) -> Any:
    """A dataclass field with its documentation and constraints attached (read by validation and the schema doc).

    `extension` marks keys palpcompose adds on top of the contract's schema. `model_dependent` marks keys whose
    default the base model may decide (models.model_defaults); the dataclass default is the paper's SD value.
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "multiple_of": multiple_of,
            "extension": extension, "model_dependent": model_dependent}
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------------
# The schema. Field order is the order in the docs. Defaults follow the paper (method.md), see docs/schema.md.


@dataclass(frozen=True)
class ProjectSection:
    name: str = _spec("Project name: ASCII letters (a-z, A-Z), digits, '-' and '_' (1-64 characters). Makes the learned tokens "
                      "unique: subject V1 of project `cat` is the token `<cat-v1>`.")
    base_model: str = _spec("The pre-trained text-to-image model: `builtin:toy`, a hub id (`org/name`, used from the "
                            "local Hugging Face cache), a local diffusers folder, or a single `.safetensors` file. "
                            "Relative paths are relative to the project folder.")
    allow_pickle: bool = _spec("Let base_model be a pickled checkpoint (`.ckpt`, `.pt`, `.bin`). Loading one runs "
                               "code stored in the file: turn this on only for files whose origin you trust; prefer "
                               "a `.safetensors` copy.", False, extension=True)


@dataclass(frozen=True)
class SubjectConfig:
    class_name: str = _spec("The subject's class word (`cat`, `painting`): used in clean prompts and, by default, "
                            "to initialise the subject's token embedding.")
    images: tuple[str, ...] = _spec("Reference images: files, folders (all images inside) or globs, relative to the "
                                    "project folder. A single string is accepted for one entry.")
    prompt: str | None = _spec("Personalization prompt y_P; must contain the subject's own placeholder, e.g. "
                               "`A photo of [V1]`. Default: `A photo of [Vn]`.", None)
    init_word: str | None = _spec("Word whose embedding initialises the subject's token. Default: `class_name`.",
                                  None)
    flip: bool | None = _spec("Random horizontal flips of the references during training. Default: on, except for "
                              "classes that are not mirror-symmetric (painting, drawing, poster, logo, text, ...).",
                              None, extension=True)


@dataclass(frozen=True)
class PalpConfig:
    target_prompt: str | None = _spec("The prompt you want to render, with placeholders: `An oil painting of [V1] "
                                      "inspired by [V2] painting`. Required unless guidance = `none`; the default "
                                      "render prompt.", None)
    clean_prompt: str | None = _spec("y_c, the target prompt without placeholders, naming the classes and the "
                                     "scene: `An oil painting of a cat sitting on a rock`. Required unless "
                                     "guidance = `none`.", None)
    guidance: Literal["palp", "sds", "none"] = _spec(
        "Prompt-alignment guidance: `palp` (paper Eq. 6, default), `sds` (Eq. 4, ablation) or `none` (plain TI+DB "
        "personalization, the baseline).", "palp", choices=("palp", "sds", "none"))
    alpha: float = _spec("Classifier-free guidance scale of the frozen base model on the clean prompt (Eq. 6).", 7.5,
                         ge=0.0, le=100.0)
    beta: float = _spec("Classifier-free guidance scale of the personalized model on y_P (Eq. 6); alpha > beta works "
                        "better.", 1.0, ge=0.0, le=100.0)
    weight: float = _spec("lambda, the weight of the alignment loss next to the personalization loss. Default: 1, "
                          "3 for builtin:toy.", 1.0, ge=0.0, le=1000.0, model_dependent=True)
    same_noise: bool = _spec("Re-noise x0-hat with the same noise and timestep as the personalization branch "
                             "(better in the paper) instead of fresh noise.", True)
    rescale: bool = _spec("Scale the guidance by sqrt(abar_t)/sqrt(1-abar_t) (Eq. 7), so it reuses the "
                          "personalization branch's backward pass.", True)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _spec("Optimizer steps. Default: 500 (the paper's), 200 for builtin:toy.", 500, ge=1, le=1_000_000,
                       model_dependent=True)
    batch_size: int = _spec("Images per step (each picks a subject at random). Default: 1, 4 for builtin:toy.", 1,
                            ge=1, le=1024, model_dependent=True)
    learning_rate: float = _spec("Learning rate of the LoRA weights. Default: 5e-5 (the paper's), 1e-3 for "
                                 "builtin:toy.", 5e-5, gt=0.0, le=1.0, model_dependent=True)
    embedding_learning_rate: float = _spec("Learning rate of the subjects' token embeddings (0 freezes them). "
                                           "Default: 5e-4, 5e-3 for builtin:toy.", 5e-4, ge=0.0, le=1.0,
                                           model_dependent=True)
    lora_rank: int = _spec("LoRA rank on the UNet attention projections (to_q, to_k, to_v, to_out.0).", 32, ge=1,
                           le=1024)
    lora_alpha: float | None = _spec("LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank). "
                                     "Default: equal to lora_rank.", None, gt=0.0, extension=True)
    resolution: int = _spec("Training resolution in pixels (square center crops); a multiple of 8. Default: the "
                            "base model's native size, read from its UNet and VAE configs (64 for builtin:toy, 512 "
                            "for SD 1.x, 768 for SD 2 768-v, 1024 for SDXL); 512 when they cannot be read offline.",
                            512, ge=8, le=4096, multiple_of=8, model_dependent=True)
    seed: int = _spec("Seed of every random choice in training.", 0, ge=0, le=2**32 - 1)
    mixed_precision: Literal["no", "fp16", "bf16"] = _spec(
        "Precision of the frozen weights: `no` (fp32), `fp16` or `bf16`. Trainable weights stay fp32. Default: "
        "`bf16`, `no` for builtin:toy.", "bf16", choices=("no", "fp16", "bf16"), model_dependent=True)
    attention: Literal["auto", "sdpa", "xformers"] = _spec(
        "Attention kernel: `auto` (xformers if installed, else PyTorch SDPA), `sdpa` or `xformers`.", "auto",
        choices=("auto", "sdpa", "xformers"))
    save_every: int = _spec("Snapshot period in steps (0: only the final weights).", 100, ge=0)
    preview_every: int = _spec("Preview-grid period in steps (0: none).", 100, ge=0)
    gradient_accumulation_steps: int = _spec("Steps whose gradients are summed before one optimizer update.", 1,
                                             ge=1, le=1024, extension=True)
    gradient_checkpointing: bool = _spec("Recompute UNet activations in the backward pass to save memory.", False,
                                         extension=True)
    max_grad_norm: float = _spec("Gradient clipping norm (0: no clipping).", 1.0, ge=0.0, extension=True)
    low_memory: bool = _spec(
        "Low-memory preset for 8 GB GPUs: gradient checkpointing on, and the VAE kept off the GPU once the reference "
        "images are encoded (it comes back only to draw previews). Same results, slower steps.", False,
        extension=True)

    @property
    def recomputes_activations(self) -> bool:
        """Gradient checkpointing is on: asked for directly, or through the low-memory preset."""
        return self.gradient_checkpointing or self.low_memory


@dataclass(frozen=True)
class RenderConfig:
    prompts: tuple[str, ...] = _spec("Prompts `render` draws. Default: `[palp.target_prompt]`.", ())
    seeds: tuple[int, ...] = _spec("One image per seed and prompt.", (0, 1, 2, 3), ge=0, le=2**32 - 1)
    steps: int = _spec("Sampling steps. Default: 30, 20 for builtin:toy.", 30, ge=1, le=1000, model_dependent=True)
    guidance_scale: float = _spec("Classifier-free guidance scale at render time. Default: 7.5, 5 for builtin:toy.",
                                  7.5, ge=0.0, le=100.0, model_dependent=True)
    negative_prompt: str = _spec("Negative prompt.", "", extension=True)
    scheduler: Literal["dpm++", "ddim", "euler-a"] = _spec(
        "Sampler: `dpm++` (DPM-Solver++ 2M), `ddim` or `euler-a` (Euler ancestral).", "dpm++",
        choices=("dpm++", "ddim", "euler-a"), extension=True)
    width: int | None = _spec("Image width in pixels, a multiple of 8. Default: train.resolution (SDXL: the "
                              "pipeline's own size, 1024 for SDXL base).", None, ge=8, le=4096, multiple_of=8,
                              extension=True)
    height: int | None = _spec("Image height in pixels, a multiple of 8. Default: train.resolution (SDXL: the "
                               "pipeline's own size, 1024 for SDXL base).", None, ge=8, le=4096, multiple_of=8,
                               extension=True)
    batch_size: int = _spec("Images generated per forward pass (does not change the images).", 1, ge=1, le=256,
                            extension=True)


@dataclass(frozen=True)
class ProjectConfig:
    project: ProjectSection
    subjects: dict[str, SubjectConfig]
    palp: PalpConfig
    train: TrainConfig
    render: RenderConfig

    def to_dict(self) -> dict:
        """The resolved configuration as plain JSON types (tuples become lists), for manifest.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self) -> str:
        return _sha256_json(self._hashed())

    def training_hash(self) -> str:
        """Hash of the settings that change the trained weights (weight_settings). A record in manifest.json: what
        is up to date is decided by comparing the settings themselves (changed_weight_settings)."""
        return _sha256_json(weight_settings(self._hashed()))

    def _hashed(self) -> dict:
        """to_dict() without the keys added after projects were first trained while they hold their default, so
        that adding a key does not make every earlier manifest look out of date."""
        data = self.to_dict()
        for (section, key), default in ADDED_LATER.items():
            if data[section].get(key) == default:
                del data[section][key]
        return data


# (section, key) -> default: keys left out of both hashes while at their default (ProjectConfig._hashed).
ADDED_LATER = {("project", "allow_pickle"): False}

# The one list of settings that never change the trained weights (with all of [render]): snapshot and preview
# periods, the memory savers (gradient checkpointing and the low-memory preset recompute the same values), and
# project.allow_pickle (a permission). Everything else changes the weights; train.steps only by training longer.
WEIGHT_NEUTRAL = (("train", "save_every"), ("train", "preview_every"), ("train", "gradient_checkpointing"),
                  ("train", "low_memory"), ("project", "allow_pickle"))


def weight_settings(config: dict, *, steps: bool = True) -> dict:
    """The part of a resolved configuration (ProjectConfig.to_dict(), or manifest.json's "config") that changes the
    trained weights: all but [render] and WEIGHT_NEUTRAL, and for guidance "none" no [palp] key but the guidance;
    without train.steps when `steps` is false (what a resume must share with the run it continues). Keys added
    since `config` was written count at their default."""
    data = json.loads(json.dumps(config))
    data.pop("render", None)
    for (section, key), default in ADDED_LATER.items():
        data.setdefault(section, {}).setdefault(key, default)
    for section, key in WEIGHT_NEUTRAL + (() if steps else (("train", "steps"),)):
        data.get(section, {}).pop(key, None)
    if data.get("palp", {}).get("guidance") == "none":  # the baseline reads no other [palp] key (method.md, step 5)
        data["palp"] = {"guidance": "none"}
    return data


def flat_settings(data: dict, prefix: str = "") -> dict:
    """A nested configuration as {dotted key: value}: {"train": {"steps": 2}} -> {"train.steps": 2}."""
    out = {}
    for key, value in data.items():
        out.update(flat_settings(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def describe_changes(changes: list[tuple[str, object, object]], most: int | None = None) -> str:
    """'train.steps 200 -> 40, palp.weight 1.0 -> 3.0, and 2 more' from (dotted key, old, new) triples; all of them
    unless `most` is given."""
    shown = changes if most is None else changes[:most]
    more = f", and {len(changes) - len(shown)} more" if len(changes) > len(shown) else ""
    return ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in shown) + more


def changed_weight_settings(before: dict, now: dict, *, steps: bool = True) -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)] of the weight-changing settings that differ between two resolved
    configurations, in key order (subjects.V1.images, palp.guidance, train.steps, ...)."""
    old = flat_settings(weight_settings(before, steps=steps))
    new = flat_settings(weight_settings(now, steps=steps))
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _sha256_json(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


SECTIONS: dict[str, type] = {"project": ProjectSection, "palp": PalpConfig, "train": TrainConfig,
                             "render": RenderConfig}
TABLE_ORDER = ("project", "subjects", "palp", "train", "render")


@dataclass(frozen=True)
class Project:
    root: Path  # the project folder (absolute)
    file: Path  # root / "palp.toml"
    config: ProjectConfig
    images: dict[str, tuple[Path, ...]]  # subject key -> resolved absolute image paths, sorted, deduplicated
    notes: tuple[str, ...]  # warnings and notes for the user (mode conversions, small images, ...)
    # Keys palp.toml leaves out whose default the base model decided: dotted key -> (value, why)
    model_defaults: dict[str, tuple[Any, str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_project(project_dir: str | Path, *, check_images: bool = True) -> Project:
    """Read and validate DIR/palp.toml. Raises ProjectError listing ALL problems (UserError when there is no file).

    With `check_images`, every reference image is opened and checked (missing, unreadable, truncated, huge,
    duplicated), and conversions and small images are reported in `Project.notes`.
    """
    v, project = _validate(Path(project_dir), check_images)
    if project is None or v.problems:
        raise v.error()
    return project


def listed_images(project: Project) -> dict[str, tuple[Path, ...]]:
    """Every subject's image files: project.images, or, for a project loaded without checking its images (render,
    export), the files its `images` entries name now, not opened (what render compares with the manifest)."""
    if project.images:
        return project.images
    from palpcompose.images import is_image_name

    v = _Validator(project.file, b"")  # problems are `check`'s and `train`'s to report
    return {key: tuple(sorted({path for entry in subject.images
                               for path in _expand_entry(v, project.root, f"subjects.{key}.images", entry,
                                                         is_image_name)}))
            for key, subject in project.config.subjects.items()}


def _validate(project_dir: Path, check_images: bool) -> tuple[_Validator, Project | None]:
    """Everything load_project checks, without raising for the problems it collects (`check` adds more)."""
    file = project_dir / PROJECT_FILE
    if project_dir.name.lower() == PROJECT_FILE and not project_dir.is_dir():
        raise UserError(f"{project_dir}: give the project folder, not its palp.toml: {project_dir.parent}")
    if project_dir.is_file():
        raise UserError(f"{project_dir}: is a file, not a project folder; give the folder that holds palp.toml")
    if not project_dir.is_dir():
        raise UserError(f"{project_dir}: no such project folder; create one with "
                        f"`{command_line('palpcompose', 'init', project_dir)}`")
    if file.is_dir():
        raise UserError(f"{file}: is a folder; the project file must be a file named palp.toml")
    if file.is_symlink() and not file.exists():
        raise UserError(f"{file}: is a broken symbolic link (to {file.readlink()}); replace it with the file")
    if not file.is_file():
        raise UserError(f"{file}: not found; create a project with `{command_line('palpcompose', 'init', project_dir)}`")
    v = _Validator(file, file.read_bytes())
    config = v.parse()
    root = project_dir.resolve()
    images: dict[str, tuple[Path, ...]] = {}
    resolved: dict[str, tuple[Any, str]] = {}
    if v.checkable is not None:
        section, subjects, resolution = v.checkable
        source = _check_base_model(v, section.base_model, section.allow_pickle) if section is not None else None
        if source is not None:
            resolved = _model_defaults(v, source)
            resolution = resolved.get("train.resolution", (resolution,))[0]
        if check_images:
            images = _check_images(v, root, subjects, resolution)
    project = None
    if config is not None:
        config = _apply_defaults(config, resolved)
        project = Project(root, root / PROJECT_FILE, config, images, tuple(v.notes), resolved)
    return v, project


def _model_defaults(v: _Validator, source) -> dict[str, tuple[Any, str]]:
    """The model-dependent defaults (models.model_defaults) of the keys palp.toml leaves out."""
    from palpcompose.models import model_defaults

    return {key: value for key, value in model_defaults(source).items() if key not in v.given}


def _apply_defaults(config: ProjectConfig, resolved: dict[str, tuple[Any, str]]) -> ProjectConfig:
    """`config` with the resolved model-dependent defaults filled in."""
    changes: dict[str, dict[str, Any]] = {}
    for key, (value, _) in resolved.items():
        section, name = key.split(".")
        changes.setdefault(section, {})[name] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)
                                          for section, values in changes.items()})


class _Validator:
    """Collects every problem of one palp.toml. `lines` maps dotted key paths to line numbers (tomllib has none)."""

    def __init__(self, file: Path, data: bytes):
        self.file = file
        self.data = data
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.text = ""
        self.lines: dict[tuple[str, ...], int] = {}
        self.checkable: tuple[ProjectSection | None, dict[str, SubjectConfig], int] | None = None
        self.base_model = None  # the models.BaseModelSource project.base_model names, once resolved
        self.given: set[str] = set()  # dotted keys palp.toml sets (the others get defaults)

    def error(self) -> ProjectError:
        return ProjectError(sorted(self.problems, key=lambda p: (p.line is None, p.line or 0)))

    def problem(self, key: str | None, message: str, hint: str | None = None, line: int | None = None) -> None:
        if line is None and key is not None:
            line = self.line_of(key)
        self.problems.append(Problem(str(self.file), message, key=key, line=line, hint=hint))

    def line_of(self, key: str) -> int | None:
        """Line of a dotted key (`train.steps`, `render.seeds[2]`), else of its closest enclosing table."""
        parts = tuple(re.sub(r"\[\d+\]$", "", key).split("."))
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None

    # -- parsing ---------------------------------------------------------------------------------------------------

    def parse(self) -> ProjectConfig | None:
        try:
            self.text = self.data.decode("utf-8").removeprefix("\ufeff")  # Notepad's "UTF-8 with BOM" is UTF-8
        except UnicodeDecodeError as exc:
            line = self.data[: exc.start].count(b"\n") + 1
            self.problem(None, "the file is not UTF-8 text", "save it as UTF-8", line=line)
            return None
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            # Python < 3.14 puts the position only in the message: "Invalid value (at line 6, column 14)".
            where = re.search(r"\(at line (\d+), column (\d+)\)$", str(exc))
            message = str(exc)[: where.start()].rstrip() if where else str(exc)
            line = int(where.group(1)) if where else getattr(exc, "lineno", None)
            twice = _defined_twice(self.text, line) if message.startswith("Cannot") and line else None
            if twice:  # tomllib names neither the key nor where it was first set
                key, hint, first = twice
                self.problem(key, f"is defined twice{f' (first on line {first})' if first else ''}", hint, line=line)
                return None
            if where:
                message += f" (column {where.group(2)})"
            self.problem(None, f"TOML syntax error: {message}", _syntax_hint(exc, self.text), line=line)
            return None
        self.lines = _key_lines(self.text)

        for name in doc:
            if name not in TABLE_ORDER:
                self.problem(name, "unknown table" if isinstance(doc[name], dict) else "unknown key",
                             _did_you_mean(name, TABLE_ORDER, f"allowed tables: {', '.join(TABLE_ORDER)}"))
        sections: dict[str, Any] = {}
        for name, cls in SECTIONS.items():
            table = doc.get(name, {})
            if name == "project" and "project" not in doc:
                self.problem("project", "missing [project] table",
                             'add:\n[project]\nname = "my-project"\nbase_model = "builtin:toy"', line=1)
                sections[name] = None
            elif not isinstance(table, dict):
                self.problem(name, f"must be a table ([{name}]), got {_describe(table)}")
                sections[name] = None
            else:
                sections[name] = self.section(cls, table, name)
        subjects, declared, subjects_ok = self.subjects(doc.get("subjects"))
        subjects = {key: dataclasses.replace(s, prompt=f"A photo of [{key}]" if s.prompt is None else s.prompt)
                    for key, s in subjects.items()}
        palp, train, render = sections["palp"], sections["train"], sections["render"]
        self.cross_checks(doc, declared)
        name_ok = self.check_name(doc)
        # What the base-model and image checks can still look at when other parts are broken.
        self.checkable = (sections["project"], subjects, train.resolution if train else TrainConfig.resolution)
        if not (subjects_ok and name_ok) or any(section is None for section in sections.values()):
            return None
        # Resolve the documented "default: X" values, so every consumer sees the same numbers.
        subjects = {key: dataclasses.replace(s, init_word=s.init_word or s.class_name,
                                             flip=_auto_flip(s.class_name) if s.flip is None else s.flip)
                    for key, s in subjects.items()}
        train = dataclasses.replace(train, lora_alpha=float(train.lora_rank) if train.lora_alpha is None
                                    else train.lora_alpha)
        if not render.prompts and palp.target_prompt:
            render = dataclasses.replace(render, prompts=(palp.target_prompt,))
        return ProjectConfig(sections["project"], subjects, palp, train, render)

    def section(self, cls: type, table: dict, prefix: str) -> Any:
        """Build one dataclass from a TOML table; None when it has problems (they are recorded)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values, ok = {}, True
        for key, value in table.items():
            self.given.add(f"{prefix}.{key}")
            if key not in fields:
                extra = f"keys of [{prefix}]: {', '.join(fields)}"
                self.problem(f"{prefix}.{key}", "unknown key", _did_you_mean(key, fields, extra))
                ok = False
                continue
            converted = self.value(f"{prefix}.{key}", value, hints[key], fields[key].metadata)
            if converted is _INVALID:
                ok = False
            elif fields[key].default is dataclasses.MISSING and isinstance(converted, str) and not converted.strip():
                self.problem(f"{prefix}.{key}", "must not be empty", fields[key].metadata["doc"])
                ok = False
            else:
                values[key] = converted
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in values and (name not in table):
                self.problem(f"{prefix}.{name}", "required key is missing", f"add `{name} = ...` ({f.metadata['doc']})",
                             line=self.line_of(prefix))
                ok = False
        return cls(**values) if ok else None

    def subjects(self, table: Any) -> tuple[dict[str, SubjectConfig], set[str], bool]:
        """(the subjects that parsed, every declared subject key, whether all of them parsed)."""
        example = 'add a subject:\n[subjects.V1]\nclass_name = "cat"\nimages = ["refs/cat/*.jpg"]\nprompt = "A photo of [V1]"'
        if not isinstance(table, dict) or not table:
            self.problem("subjects", "no subjects: a project needs at least one", example,
                         line=self.line_of("subjects") or 1)
            return {}, set(), False
        subjects, ok = {}, True
        declared = {key for key in table if SUBJECT_KEY.match(key)}
        for key, sub in table.items():
            if not SUBJECT_KEY.match(key):
                fixed = re.sub(r"^[vV]\s*0*", "V", key)
                hint = f"did you mean [subjects.{fixed}]?" if SUBJECT_KEY.match(fixed) else \
                    "subjects are named V1, V2, ... and used as [V1], [V2], ... in prompts"
                self.problem(f"subjects.{key}", "subject keys must be V followed by a number (V1, V2, ...)", hint)
                ok = False
                continue
            if not isinstance(sub, dict):
                self.problem(f"subjects.{key}", f"must be a table ([subjects.{key}]), got {_describe(sub)}")
                ok = False
                continue
            parsed = self.section(SubjectConfig, sub, f"subjects.{key}")
            if parsed is None:
                ok = False
            elif not parsed.images:
                self.problem(f"subjects.{key}.images", "no images listed", 'e.g. images = ["refs/cat/*.jpg"]')
                ok = False
            else:
                subjects[key] = parsed
        return dict(sorted(subjects.items(), key=lambda kv: int(kv[0][1:]))), declared, ok

    def value(self, key: str, value: Any, hint: Any, meta: dict) -> Any:
        """Check one value against its type and constraints. Returns the converted value or _INVALID."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so just X
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is tuple:
            item_type = args[0]
            if isinstance(value, str) and item_type is str:
                value = [value]
            if not isinstance(value, list):
                self.problem(key, f"must be a list of {_type_name(item_type)}s, got {_describe(value)}",
                             f"e.g. {key.split('.')[-1]} = [{_example(item_type)}]")
                return _INVALID
            items = [self.value(f"{key}[{i}]", item, item_type, meta) for i, item in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        if origin is Literal:
            choices = meta["choices"]
            if value not in choices:
                self.problem(key, f"must be one of {', '.join(map(repr, choices))}, got {_describe(value)}",
                             _did_you_mean(str(value), choices))
                return _INVALID
            return value
        expected = hint
        ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            fix = None
            if isinstance(value, str) and expected in (int, float) and _is_number(value):
                fix = f"remove the quotes: {key.split('.')[-1].split('[')[0]} = {value.strip()}"
            elif isinstance(value, str) and expected is bool and value.lower() in ("true", "false"):
                fix = f"write {value.lower()} without quotes"
            elif isinstance(value, float) and expected is int and value.is_integer():
                fix = f"write {int(value)}"
            self.problem(key, f"must be {_a(_type_name(expected))}, got {_describe(value)}", fix)
            return _INVALID
        if expected is float:
            value = float(value)
            if not math.isfinite(value):  # TOML allows inf and nan
                self.problem(key, f"must be a finite number, got {value}")
                return _INVALID
        if expected in (int, float) and not self.in_range(key, value, meta):
            return _INVALID
        return value

    def in_range(self, key: str, value: float, meta: dict) -> bool:
        ge, gt, le, multiple = meta["ge"], meta["gt"], meta["le"], meta["multiple_of"]
        if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
            bounds = [f">= {_num(ge)}" if ge is not None else None, f"> {_num(gt)}" if gt is not None else None,
                      f"<= {_num(le)}" if le is not None else None]
            self.problem(key, f"must be {' and '.join(b for b in bounds if b)}, got {_num(value)}")
            return False
        if multiple is not None and value % multiple:
            lower = int(value) // multiple * multiple
            near = " or ".join(str(n) for n in (lower, lower + multiple) if n >= (ge or 0) and n > 0)
            self.problem(key, f"must be a multiple of {multiple}, got {_num(value)}", f"use {near}")
            return False
        return True

    # -- checks across keys ----------------------------------------------------------------------------------------

    def cross_checks(self, doc: dict, declared: set[str]) -> None:
        """Placeholders and required prompts. Reads the raw TOML, so it runs even when other keys are broken."""
        palp = doc.get("palp") if isinstance(doc.get("palp"), dict) else {}
        render = doc.get("render") if isinstance(doc.get("render"), dict) else {}
        subjects = doc.get("subjects") if isinstance(doc.get("subjects"), dict) else {}
        # A subject without a prompt gets "A photo of [Vn]", which passes every check below.
        prompts = [(f"subjects.{k}.prompt", sub.get("prompt", f"A photo of [{k}]")) for k, sub in subjects.items()
                   if k in declared and isinstance(sub, dict)]
        prompts += [("palp.target_prompt", palp.get("target_prompt")), ("palp.clean_prompt", palp.get("clean_prompt")),
                    ("render.negative_prompt", render.get("negative_prompt"))]
        if isinstance(render.get("prompts"), list):
            prompts += [(f"render.prompts[{i}]", p) for i, p in enumerate(render["prompts"])]
            for i, p in enumerate(render["prompts"]):
                if isinstance(p, str) and not p.strip():
                    self.problem(f"render.prompts[{i}]", "is empty", "remove it, or write the prompt to render")

        for key, prompt in prompts:
            if not isinstance(prompt, str):
                continue  # missing, or a wrong type reported by the key's own check
            used = list(dict.fromkeys(PLACEHOLDER.findall(prompt)))
            if key == "palp.clean_prompt":
                for message, hint in placeholder_problems(prompt, None):
                    self.problem(key, message, hint)
                if used:
                    self.problem(key, f"the clean prompt must not contain placeholders, found "
                                      f"{', '.join(f'[{u}]' for u in used)}",
                                 "name the classes instead, e.g. 'An oil painting of a cat sitting on a rock'")
                continue
            for message, hint in placeholder_problems(prompt, declared):
                self.problem(key, message, hint)
            subject = key.split(".")[1] if key.startswith("subjects.") else None
            if subject and f"[{subject}]" not in prompt:
                self.problem(key, f"must contain the subject's own placeholder [{subject}], got {prompt!r}",
                             f'e.g. prompt = "A photo of [{subject}]"')

        if render.get("seeds") == []:
            self.notes.append(f"{self.file}: render.seeds is empty: `render` will need --seeds (or list seeds, e.g. "
                              "seeds = [0, 1, 2, 3], or remove the key for that default)")

        guidance = palp.get("guidance", PalpConfig.guidance)
        if guidance in ("palp", "sds"):
            for name in ("target_prompt", "clean_prompt"):
                value = palp.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    self.problem(f"palp.{name}", f"required when palp.guidance = {guidance!r}",
                                 'set it (see docs/schema.md), or set guidance = "none" to train without '
                                 "prompt-alignment guidance", line=self.line_of(f"palp.{name}") or 1)
        target = palp.get("target_prompt")
        if guidance == "none" and not target and not render.get("prompts"):
            self.notes.append(f"{self.file}: no palp.target_prompt and no render.prompts: `render` will need "
                              "--prompt")
        if isinstance(target, str) and target.strip() and not PLACEHOLDER.search(target):
            self.notes.append(f"{self.file}: palp.target_prompt has no placeholder, so renders will not show any "
                              "subject")
        alpha, beta = palp.get("alpha", PalpConfig.alpha), palp.get("beta", PalpConfig.beta)
        if guidance != "none" and isinstance(alpha, (int, float)) and isinstance(beta, (int, float)) and alpha <= beta:
            self.notes.append(f"{self.file}: palp.alpha ({alpha}) <= palp.beta ({beta}); the paper finds alpha > beta "
                              "aligns better")

    def check_name(self, doc: dict) -> bool:
        name = doc.get("project", {}).get("name") if isinstance(doc.get("project"), dict) else None
        if not isinstance(name, str) or not name.strip() or NAME_PATTERN.match(name):  # "" is reported as empty
            return True
        self.problem("project.name", f"{name!r} may contain only ASCII letters (a-z, A-Z), digits, '-' and '_' "
                     "(1-64 characters): it becomes part of the learned tokens, <name-v1>",
                     f"e.g. name = {sanitize_name(name)!r}")
        return False


def placeholder_problems(prompt: str, declared) -> list[tuple[str, str]]:
    """(message, hint) for each near-miss placeholder in `prompt` ([v1], [V 1], [V0]) and, unless `declared` is
    None, each [Vn] that is not one of the `declared` subject keys. Shared by palp.toml's checks and render's."""
    problems = []
    for m in NEAR_PLACEHOLDER.finditer(prompt):
        if not PLACEHOLDER.fullmatch(m.group(0)):
            number = int(m.group(1))
            problems.append((f"{m.group(0)!r} is not a placeholder", f"placeholders are written exactly [V{number}]"
                             if number else "subjects are numbered from 1: use [V1] (and a [subjects.V1] table)"))
    if declared is not None:
        listed = ", ".join(f"[{k}]" for k in sorted(declared, key=lambda k: int(k[1:]))) or "none"
        for u in dict.fromkeys(PLACEHOLDER.findall(prompt)):
            if u not in declared:
                problems.append((f"uses [{u}], which is not a subject of this project (subjects: {listed})",
                                 f"add a [subjects.{u}] table or fix the placeholder"))
    return problems


def sanitize_name(text: str) -> str:
    """A valid project name made from `text` (a folder name, say): accents are dropped (`café` -> `cafe`), other
    characters become '-'; "my-project" when nothing is left (a folder named `猫`)."""
    return _ascii_name(text) or "my-project"


def _ascii_name(text: str) -> str:
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_-]", "-", ascii_text)).strip("-_")[:64]


_INVALID = object()


# ----------------------------------------------------------------------------------------------------------------
# Base model and images


def _check_base_model(v: _Validator, spec: str, allow_pickle: bool):
    """The base model's BaseModelSource, or None (with a problem recorded) when it cannot be one."""
    from palpcompose.models import resolve_base_model

    try:
        source = resolve_base_model(spec, v.file.parent, allow_pickle)
    except UserError as exc:
        v.problem("project.base_model", str(exc))  # its message says what base_model may be
        return None
    v.base_model = source
    if source.kind == "builtin" and not source.available:  # a broken installation, not a network question
        v.problem("project.base_model", source.detail, "reinstall palpcompose (pip install -e . in a clone)")
        return None
    return source


def _check_images(v: _Validator, root: Path, subjects: dict[str, SubjectConfig],
                  resolution: int) -> dict[str, tuple[Path, ...]]:
    """Expand every subject's `images` entries and open each image. Records problems and notes on `v`."""
    from palpcompose.images import is_image_name, open_reference_image

    owner: dict[Path, str] = {}  # image -> subject that uses it
    by_content: dict[str, tuple[str, Path]] = {}
    result: dict[str, tuple[Path, ...]] = {}
    for key, subject in subjects.items():
        skey = f"subjects.{key}.images"
        found: set[Path] = set()
        for i, entry in enumerate(subject.images):
            if entry in subject.images[:i]:
                v.problem(skey, f"{entry!r} is listed twice", "remove the repeated entry")
                continue
            for path in _expand_entry(v, root, skey, entry, is_image_name):
                found.add(path)
        for path in sorted(found):
            shown = _shown(root, path)
            if path in owner and owner[path] != key:
                v.problem(skey, f"{shown} is also an image of {owner[path]}",
                          "each subject needs its own pictures; remove it from one of them")
                continue
            owner[path] = key
            try:
                _, notes = open_reference_image(path, resolution)
            except UserError as exc:
                v.problem(skey, str(exc).replace(str(path), shown, 1))
                continue
            v.notes.extend(n.replace(str(path), shown, 1) for n in notes)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in by_content:
                other_key, other = by_content[digest]
                where = "" if other_key == key else f" (of {other_key})"
                v.problem(skey, f"{shown} is a duplicate of {_shown(root, other)}{where} (identical bytes)",
                          "delete one of the two files: duplicates over-weight an image")
                continue
            by_content[digest] = (key, path)
        result[key] = tuple(sorted(p for p in found if owner.get(p) == key))
    return result


def _expand_entry(v: _Validator, root: Path, skey: str, entry: str, is_image_name) -> list[Path]:
    """The image files one `images` entry names: a file, a folder (its images) or a glob."""
    if not entry.strip():
        v.problem(skey, "empty entry \"\"", "remove it, or name a file, folder or glob such as refs/cat/*.jpg")
        return []
    parts = Path(entry).parts
    if Path(entry).is_absolute() or entry.startswith("~") or ".." in parts:
        v.problem(skey, f"{entry!r} points outside the project folder",
                  "copy the images into the project (e.g. refs/) and use a relative path, so the project stays "
                  "self-contained")
        return []
    if "\\" in entry and not (root / entry).exists():  # a Windows path: read it the way Windows would
        v.notes.append(f"{v.file}: {skey}: {entry!r} read as {entry.replace(chr(92), '/')!r}; write forward slashes "
                       "so the project works on every system")
        entry = entry.replace("\\", "/")
    if any(ch in entry for ch in "*?[") and not (root / entry).exists():  # a file may be called img[1].png
        import glob

        parent, name = Path(entry).parent, Path(entry).name
        # a folder may be called c[1]: only the file-name part is a pattern then
        pattern = f"{glob.escape(parent.as_posix())}/{name}" if (root / parent).is_dir() else entry
        matches = [p for p in root.glob(pattern) if p.is_file()]
        images = [p for p in matches if is_image_name(p)]
        if not matches:
            folder = root / parent  # refs/V1/*.png over a folder of iPhone photos: say why, not "matches nothing"
            others = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            if any(is_image_name(p) for p in others) or not _heic_problem(
                    v, root, skey, f"{entry!r} matches nothing: its folder holds", others, []):
                v.problem(skey, f"{entry!r} matches no files", _missing_hint(root, entry))
        elif not _heic_problem(v, root, skey, f"{entry!r} matches", matches, images) and not images:
            v.problem(skey, f"{entry!r} matches {len(matches)} file(s) but no images",
                      "use image files (.png, .jpg, .webp, ...)")
        return _inside(v, root, skey, images)
    path = root / entry
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        images = [p for p in files if is_image_name(p)]
        if not _heic_problem(v, root, skey, f"folder {entry!r} holds", files, images) and not images:
            v.problem(skey, f"folder {entry!r} contains no images",
                      "put pictures of the subject (.png, .jpg, .webp; 3-5 of an object, one is enough for an "
                      f"artwork) in {_shown(root, path)}/")
        return _inside(v, root, skey, images)
    if path.is_symlink() and not path.exists():
        v.problem(skey, f"{entry!r} is a broken symbolic link (to {path.readlink()})",
                  "replace the link with the image file")
        return []
    if not path.exists():
        v.problem(skey, f"{entry!r} not found", _missing_hint(root, entry))
        return []
    if not path.is_file():
        v.problem(skey, f"{entry!r} is not a regular file", "name an image file, a folder of images or a glob")
        return []
    return _inside(v, root, skey, [path])


def _heic_problem(v: _Validator, root: Path, skey: str, what: str, files: list[Path], images: list[Path]) -> bool:
    """HEIC/HEIF photos among `files`, which no glob or folder picks up: a problem when they are all there is, a
    note saying they are skipped otherwise. True when there were any."""
    from palpcompose.images import heic_fix, is_heic_name

    heic = sorted(p for p in files if is_heic_name(p))
    if not heic:
        return False
    names = ", ".join(_shown(root, p) for p in heic[:3]) + (f" and {len(heic) - 3} more" if len(heic) > 3 else "")
    if images:
        v.notes.append(f"{v.file}: {skey}: {names}: skipped, HEIC/HEIF photos are not supported; "
                       f"{heic_fix(heic[0])}")
    else:
        v.problem(skey, f"{what} {len(heic)} HEIC/HEIF photo(s) ({names}) and no other images: HEIC is not "
                        "supported (Pillow cannot read it)", heic_fix(heic[0]))
    return True


def _inside(v: _Validator, root: Path, skey: str, paths: list[Path]) -> list[Path]:
    """Resolve symlinks and drop (with a problem) anything that lands outside the project folder."""
    kept = []
    for path in paths:
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            v.problem(skey, f"{_shown(root, path)} links outside the project folder (to {resolved})",
                      "copy the image into the project instead of linking it")
        else:
            kept.append(resolved)
    return kept


def _missing_hint(root: Path, entry: str) -> str:
    if any(ch in entry for ch in "*?["):  # a glob: matching is case-sensitive, folder entries are not
        folder, pattern = (root / entry).parent, Path(entry).name.lower()
        other_case = next((f.name for f in sorted(folder.iterdir()) if Path(f.name.lower()).match(pattern)), None) \
            if folder.is_dir() else None
        if other_case:
            return (f"glob patterns are case-sensitive: {Path(entry).name!r} does not match {other_case!r}; fix the "
                    f"case, or list the folder {_shown(root, folder)!r} itself (folders match any case)")
    parent = (root / entry).parent
    while not parent.is_dir() and parent != root:
        parent = parent.parent
    near = difflib.get_close_matches(Path(entry).name, [p.name for p in parent.iterdir()], n=1) if parent.is_dir() \
        else []
    if near:
        return f"did you mean {_shown(root, parent / near[0])!r}?"
    return f"put the subject's pictures in {_shown(root, (root / entry).parent)}/ (paths are relative to the project " \
           "folder)"


def _shown(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------
# `palpcompose init`

TEMPLATES = ("single-subject", "multi-subject", "art-inspired", "toy-demo")
DEFAULT_TEMPLATE = "art-inspired"
_NAME_MARK = "__PROJECT_NAME__"


@dataclass(frozen=True)
class InitResult:
    root: Path
    name: str
    written: tuple[Path, ...]  # files created or updated
    kept: tuple[Path, ...]  # files that already existed and were left alone
    notes: tuple[str, ...] = ()  # what the user should know before `check` (the base model is not here yet, ...)


def init_project(project_dir: str | Path, template: str = DEFAULT_TEMPLATE) -> InitResult:
    """Create a project folder from a template. Refuses (UserError, nothing written) if palp.toml already exists.

    The project name comes from the folder's name, made valid. Existing files other than palp.toml are kept;
    an existing .gitignore gets an `out/` line if it lacks one.
    """
    from importlib.resources import files

    from palpcompose.fsutil import atomic_write_bytes, atomic_write_text, os_error_text

    root = Path(project_dir)
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}"
                        + (f" ({_did_you_mean(template, TEMPLATES)})" if _did_you_mean(template, TEMPLATES) else ""))
    if root.name.lower() == PROJECT_FILE:
        raise UserError(f"{root}: give the folder the project goes in, not its palp.toml: "
                        f"`{command_line('palpcompose', 'init', root.parent)}`")
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder; choose another project folder")
    if (root / PROJECT_FILE).exists() or (root / PROJECT_FILE).is_symlink():
        raise UserError(f"{root / PROJECT_FILE}: already exists; palpcompose init never overwrites a project "
                        "(edit it, or init a new folder)")
    folder_name = root.resolve().name
    name = sanitize_name(folder_name)
    source = files("palpcompose.templates") / template
    texts = {rel: (source / rel).read_text(encoding="utf-8").replace(_NAME_MARK, name)
             for rel in ("palp.toml", "README.md", "refs/README.md")}
    # One empty folder per subject folder the template names, so the user sees where the pictures go.
    folders = [root / entry for sub in tomllib.loads(texts["palp.toml"])["subjects"].values()
               for entry in sub["images"] if not any(ch in entry for ch in "*?[")]
    gitignore = root / ".gitignore"
    _init_preflight(root, [root / rel for rel in texts] + [gitignore], folders)

    # Write; on a failure (disk full, permissions), remove what this call created. .gitignore, the one file that
    # may already exist and be changed, comes last.
    needed = [*folders, *((root / rel).parent for rel in texts)]
    new_dirs = sorted({d for folder in needed for d in (folder, *folder.parents) if not d.exists()},
                      key=lambda d: len(d.parts), reverse=True)  # deepest first, for the clean-up
    written, kept = [], []
    try:
        for rel, text in texts.items():
            target = root / rel
            if target.exists() and rel != PROJECT_FILE:
                kept.append(target)
                continue
            atomic_write_text(target, text)
            written.append(target)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        if template == "toy-demo":  # the toy world draws this template's references (palpcompose/toyworld/demo.py)
            from palpcompose.toyworld.demo import write_references

            write_references(root, written)
        # Bytes, not text: a .gitignore in another encoding is kept as it is, with one line added.
        data = gitignore.read_bytes() if gitignore.is_file() else b""
        if not {b"out/", b"out", b"/out/", b"/out"} & {line.strip() for line in data.splitlines()}:
            atomic_write_bytes(gitignore, data + (b"\n" if data and not data.endswith(b"\n") else b"") + b"out/\n")
            written.append(gitignore)
        else:
            kept.append(gitignore)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in new_dirs:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never removes anything the user had
        raise UserError(f"{root}: could not create the project ({os_error_text(exc)}); nothing was left behind; "
                        "choose a folder you can write to") from exc
    return InitResult(root, name, tuple(written), tuple(kept), tuple(_init_notes(texts["palp.toml"], folder_name)))


def _init_notes(toml_text: str, folder_name: str) -> list[str]:
    """What `init` chose without being told: a project name other than the folder's, and a template's base model
    that this machine does not have (a hub id not in the cache, which `check` refuses), each with the way out."""
    from palpcompose.models import resolve_base_model

    notes = []
    name = tomllib.loads(toml_text)["project"]["name"]
    if name != folder_name:
        how = (f"the folder name {folder_name!r} has no ASCII letters or digits to make one of" if not
               _ascii_name(folder_name) else f"made from the folder name {folder_name!r}")
        notes.append(f"palp.toml: project.name is {name!r} ({how}: a project name may contain only ASCII letters, "
                     f"digits, '-' and '_'); edit project.name to choose another, it names the learned tokens "
                     f"(<{name.lower()}-v1>)")
    spec = tomllib.loads(toml_text)["project"]["base_model"]
    source = resolve_base_model(spec)
    if not source.available:
        notes.append(f"palp.toml: project.base_model: {source.detail}")
    return notes


def _init_preflight(root: Path, files: list[Path], folders: list[Path]) -> None:
    """Before `init` writes anything: every file and folder it will create can be created (no file where a folder
    goes, or the other way round), and the nearest existing folder is writable."""
    from palpcompose.fsutil import check_folder_can_be_made

    check_folder_can_be_made(root, "init")
    for path, is_folder in [(f, False) for f in files] + [(d, True) for d in folders]:
        for parent in reversed(path.relative_to(root).parents[:-1]):  # refs/, refs/subject/, ... (root checked)
            if (root / parent).exists() and not (root / parent).is_dir():
                raise UserError(f"{root / parent}: is a file where the project needs a folder; move it away, or "
                                "init another folder")
        if path.exists() and path.is_dir() != is_folder:
            what = "a folder where the project needs a file" if not is_folder else \
                "a file where the project needs a folder"
            raise UserError(f"{path}: is {what}; move it away, or init another folder")


# ----------------------------------------------------------------------------------------------------------------
# `palpcompose check`: everything load_project checks, plus the base model's reachability and prompt lengths.

DEFAULT_TOKEN_LIMIT = 77  # CLIP's text encoders (SD 1.x and 2.x) read 77 tokens, start and end tokens included


@dataclass(frozen=True)
class CheckReport:
    project: Project
    base_model: Any  # models.BaseModelSource
    token_limit: int
    token_limit_source: str  # where token_limit comes from ("the model's tokenizer" or why it is assumed)
    prompt_tokens: tuple[tuple[str, str, int | None], ...]  # (key, prompt, token count or None when not counted)
    notes: tuple[str, ...]  # the project's notes (converted images, small images, ...)


def check_project(project_dir: str | Path) -> CheckReport:
    """Validate a project as `palpcompose check` does. Raises ProjectError listing every problem; writes nothing."""
    v, project = _validate(Path(project_dir), check_images=True)
    source = v.base_model
    if source is not None and source.kind == "hub" and not source.available:
        v.problem("project.base_model", source.detail)  # train and render would refuse it: so does check
    if project is None or v.problems:
        raise v.error()
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
    if v.problems:
        raise v.error()
    notes = project.notes + tuple(_toy_class_notes(project))
    return CheckReport(project, source, limit, limit_source, tuple(counts), notes)


def _toy_class_notes(project: Project) -> list[str]:
    """builtin:toy subjects whose class_name is not a toy-world object class: eval judges them as artworks."""
    if project.config.project.base_model.strip() != "builtin:toy":
        return []
    from palpcompose.toyworld.world import CLASSES

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
    v = _Validator(file, b"")  # for its key -> line lookup
    v.lines = _key_lines(file.read_text(encoding="utf-8-sig")) if file.is_file() else {}
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


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _auto_flip(class_name: str) -> bool:
    return not (set(re.findall(r"[a-z]+", class_name.lower())) & NO_FLIP_CLASSES)


def _did_you_mean(word: str, choices, fallback: str | None = None) -> str | None:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not near:
        near = [c for c in choices if c.lower() == word.lower()]
    return f"did you mean {near[0]!r}?" if near else fallback


def _type_name(t: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean (true or false)"}.get(t, str(t))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _example(t: Any) -> str:
    return {str: '"..."', int: "0, 1", float: "1.0"}.get(t, "...")


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__)
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{shown if len(shown) <= 60 else shown[:57] + '...'} ({kind})"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _syntax_hint(exc: Exception, text: str) -> str | None:
    message = str(exc)
    if "Invalid value" in message or "Invalid initial character" in message:
        return 'strings need quotes, e.g. name = "my-project"'
    if "Cannot overwrite a value" in message or "Cannot declare" in message:
        return "each key and table may appear only once"
    if "Unclosed" in message or "Expected" in message:
        return "check for a missing quote, bracket or comma on this line"
    return None


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers of `[table]` headers and `key =` lines, by full dotted path. Skips multi-line strings."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = table + _split_key(key.group(1))
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], number)
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_string = quote
    return lines


def _defined_twice(text: str, line: int) -> tuple[str, str, int | None] | None:
    """For tomllib's "Cannot overwrite a value" / "Cannot declare ... twice" at `line`: (the dotted key defined
    twice, a hint, the line of its first definition)."""
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return None
    before = _key_lines("\n".join(lines[: line - 1]))
    table: tuple[str, ...] = ()
    for earlier in lines[: line - 1]:  # the table the line is in
        header = _HEADER.match(earlier)
        if header:
            table = _split_key(header.group(1))
    header, key = _HEADER.match(lines[line - 1]), _KEY.match(lines[line - 1])
    if header:
        path = _split_key(header.group(1))
        hint = f"each table may appear only once: move the keys under this [{'.'.join(path)}] into the first one"
    elif key:
        path, hint = table + _split_key(key.group(1)), "each key may appear only once: delete one of the two lines"
    else:
        return None
    return ".".join(path), hint, before.get(path)


def _split_key(dotted: str) -> tuple[str, ...]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)
    return tuple(p.strip("\"'") for p in parts)


# ----------------------------------------------------------------------------------------------------------------
# The schema reference (docs/schema.md), generated from the dataclasses above.


def schema_markdown() -> str:
    out = [
        "# `palp.toml` reference",
        "",
        "<!-- Generated by `python -m palpcompose.project --schema-md > docs/schema.md`; do not edit by hand. -->",
        "",
        "A project is a folder with a `palp.toml`, reference images at relative paths (usually under `refs/`) and",
        "an `out/` folder for everything palpcompose generates. Unknown tables and keys are errors (with a",
        "did-you-mean hint); `palpcompose check DIR` lists every problem at once with its line. Keys marked",
        "*extension* are palpcompose's additions to the contract's schema. *required* keys have no default.",
        "",
        "Placeholders: subject `Vn` is written `[Vn]` in prompts and becomes the token `<name-vn>` (lower case,",
        "since CLIP lowercases text). Each subject's prompt must contain its own placeholder, every placeholder",
        "used anywhere must be a declared subject, and `palp.clean_prompt` must contain none.",
        "",
        "Images: each entry of `subjects.Vn.images` is a file, a folder (all its images) or a glob, relative to",
        "the project folder; absolute paths, `..` and symlinks that leave the folder are refused. Globs and",
        "folders pick up " + ", ".join(f"`{s}`" for s in _image_suffixes()) + " files. Files matched by several",
        "entries count once; the same entry twice, byte-identical files and one file in two subjects are errors.",
        "Unusual modes (RGBA, palette, CMYK, 16-bit) are converted to RGB with a note, EXIF orientation is",
        "applied, images above 100 megapixels are refused, and images whose short side is below half of",
        "`train.resolution` get a warning.",
        "",
        "Defaults marked *model-dependent* are decided by the base model when palp.toml leaves the key out: the",
        "resolution is the model's native size (read from its UNet and VAE configs), and `builtin:toy` has its own",
        "learning rates, steps, precision and render settings (each key's meaning gives both values).",
        "`palpcompose check` shows the values it resolved, and `out/manifest.json` records them",
        "(`model_defaults`, and the resolved `config`).",
        "",
    ]
    for table in TABLE_ORDER:
        cls = SubjectConfig if table == "subjects" else SECTIONS[table]
        title = "[subjects.Vn]" if table == "subjects" else f"[{table}]"
        out += [f"## `{title}`", ""]
        if table == "subjects":
            out += ["One table per subject, `[subjects.V1]`, `[subjects.V2]`, ...; at least one is required.", ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta["model_dependent"]:
                default = "model-dependent"
            elif f.default is dataclasses.MISSING:
                default = "*required*"
            elif f.default is None:
                default = "see meaning"
            else:
                default = f"`{_toml_value(f.default)}`"
            doc = meta["doc"] + _constraints(meta) + (" *extension*" if meta["extension"] else "")
            out.append(f"| `{f.name}` | {_schema_type(hints[f.name])} | {default} | {doc} |")
        out.append("")
    return "\n".join(out)


def _image_suffixes() -> tuple[str, ...]:
    from palpcompose.images import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def _constraints(meta: dict) -> str:
    rules = []
    if meta["ge"] is not None:
        rules.append(f">= {_num(meta['ge'])}")
    if meta["gt"] is not None:
        rules.append(f"> {_num(meta['gt'])}")
    if meta["le"] is not None:
        rules.append(f"<= {_num(meta['le'])}")
    if meta["multiple_of"]:
        rules.append(f"multiple of {meta['multiple_of']}")
    return f" Allowed: {', '.join(rules)}." if rules else ""


def _schema_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _schema_type(next(a for a in args if a is not type(None)))
    if origin is tuple:
        return f"list of {_schema_type(args[0])}"
    if origin is Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    return {str: "string", int: "integer", float: "float", bool: "boolean"}[hint]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _num(value)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m palpcompose.project")
    parser.add_argument("--schema-md", action="store_true", help="print the schema reference (docs/schema.md)")
    args = parser.parse_args(argv)
    if args.schema_md:
        sys.stdout.write(schema_markdown())
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
