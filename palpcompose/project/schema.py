"""The `palp.toml` schema: its tables as frozen dataclasses, each key's documentation, default and allowed values.

Every fact about a key lives here once: validation (validation.py) checks values against these specs, the schema
reference (schema_doc.py, docs/schema.md) is generated from them, and the CLI and the training and render code read
the same tuples of allowed values. Defaults follow the paper (method.md); keys whose default the base model decides
are the native resolution and `models.TOY_DEFAULTS` (`model_dependent`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from palpcompose.choices import GUIDANCE_MODES, SCHEDULER_NAMES, SIZE_RULE
from palpcompose.models import ADAPTERS, ATTENTION_MODES, FLOW_DEFAULT_KEYS, LORA_TARGET_MODULES, TOY_DEFAULTS
from palpcompose.placeholders import default_prompt
from palpcompose.project.settings import ADDED_LATER, sha256_json, weight_settings
from palpcompose.quantize import FROZEN_WEIGHTS
from palpcompose.trackers import LOG_WITH

PROJECT_FILE = "palp.toml"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Allowed values, one tuple each (GUIDANCE_MODES and SCHEDULER_NAMES in choices.py, where the CLI reads them;
# ATTENTION_MODES and the LoRA targets with the model code that applies them).
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")  # train.mixed_precision
MAX_SEED = 2**32 - 1  # train.seed and render.seeds: the range other tools' seeds use

# Subjects whose pictures are not mirror-symmetric: flipping them would teach the model mirrored text and art.
NO_FLIP_CLASSES = frozenset({
    "painting", "paintings", "artwork", "art", "drawing", "illustration", "sketch", "poster", "logo", "text", "sign",
    "book", "cover", "page", "document", "calligraphy", "lettering", "map", "comic",
})


def _spec(doc: str, default: Any = dataclasses.MISSING, *, choices: tuple = (), ge: float | None = None,
          gt: float | None = None, le: float | None = None, multiple_of: int | None = None,
          extension: bool = False, paper: bool = False) -> Any:
    """A dataclass field with its documentation and constraints attached (read by validation and the schema doc).

    `choices`: the allowed values (a string key). `extension` marks keys palpcompose adds on top of the contract's
    schema. `paper`: the default is the paper's own value (the schema doc says so).
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "multiple_of": multiple_of,
            "extension": extension, "paper": paper}
    return field(default=default, metadata=meta)


def model_dependent(key: str) -> bool:
    """Whether the base model may decide the default of a dotted key (models.model_defaults): the resolution is
    the model's native size, and builtin:toy has its own settings (models.TOY_DEFAULTS). The dataclass default is
    the paper's Stable Diffusion value."""
    return key == "train.resolution" or key in TOY_DEFAULTS or key in FLOW_DEFAULT_KEYS


# ----------------------------------------------------------------------------------------------------------------
# The schema. Field order is the order in the docs. Defaults follow the paper (method.md), see docs/schema.md.


@dataclass(frozen=True)
class ProjectSection:
    name: str = _spec("Project name: ASCII letters (a-z, A-Z), digits, '-' and '_' (1-64 characters). Makes the "
                      "learned tokens unique: subject V1 of project `cat` is the token `<cat-v1>`.")
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
                               f"`A photo of [V1]`. Default: `{default_prompt('Vn')}`.", None)
    init_word: str | None = _spec("Word whose embedding initialises the subject's token. Default: `class_name`.",
                                  None)
    flip: bool | None = _spec("Random horizontal flips of the references during training. Default: on, except for "
                              "classes that are not mirror-symmetric (painting, drawing, poster, logo, text, ...).",
                              None, extension=True)


@dataclass(frozen=True)
class PalpConfig:
    """The `[palp]` table, the one home of PALP's settings and their defaults (guidance.GuidanceConfig is built
    from it)."""

    target_prompt: str | None = _spec("The prompt you want to render, with placeholders: `An oil painting of [V1] "
                                      "inspired by [V2] painting`. Required unless guidance = `none`; the default "
                                      "render prompt.", None)
    clean_prompt: str | None = _spec("y_c, the target prompt without placeholders, naming the classes and the "
                                     "scene: `An oil painting of a cat sitting on a rock`. Required unless "
                                     "guidance = `none`.", None)
    guidance: str = _spec(
        "Prompt-alignment guidance: `palp` (paper Eq. 6, default), `sds` (Eq. 4, ablation) or `none` (plain TI+DB "
        "personalization, the baseline).", "palp", choices=GUIDANCE_MODES)
    alpha: float = _spec("Classifier-free guidance scale of the frozen base model on the clean prompt (Eq. 6). "
                         "Default: 7.5; 3.5 for a guidance-distilled Flux.1, where it is the value fed to the "
                         "model's guidance embedding (docs/flux-sd3.md).", 7.5, ge=0.0, le=100.0)
    beta: float = _spec("Classifier-free guidance scale of the personalized model on y_P (Eq. 6); alpha > beta works "
                        "better. Default: 1.0 (for a guidance-distilled Flux.1 its guidance embedding's value).", 1.0,
                        ge=0.0, le=100.0)
    weight: float = _spec("lambda, the weight of the alignment loss next to the personalization loss.", 1.0, ge=0.0,
                          le=1000.0)
    same_noise: bool = _spec("Re-noise x0-hat with the same noise and timestep as the personalization branch "
                             "(better in the paper) instead of fresh noise.", True)
    rescale: bool = _spec("Scale the guidance by sqrt(abar_t)/sqrt(1-abar_t) (Eq. 7), so it reuses the "
                          "personalization branch's backward pass.", True)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _spec("Optimizer steps.", 500, ge=1, le=1_000_000, paper=True)
    batch_size: int = _spec("Images per step (each picks a subject at random).", 1, ge=1, le=1024)
    learning_rate: float = _spec("Learning rate of the LoRA weights.", 5e-5, gt=0.0, le=1.0, paper=True)
    embedding_learning_rate: float = _spec("Learning rate of the subjects' token embeddings (0 freezes them).", 5e-4,
                                           ge=0.0, le=1.0)
    lora_rank: int = _spec(f"LoRA rank on the UNet attention projections ({', '.join(LORA_TARGET_MODULES)}).", 32,
                           ge=1, le=1024)
    lora_alpha: float | None = _spec("LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank). "
                                     "Default: equal to lora_rank.", None, gt=0.0, extension=True)
    resolution: int = _spec("Training resolution in pixels (square center crops; non-square images train at about "
                            f"its area with `buckets`); {SIZE_RULE}. Default: the "
                            "base model's native size, read from its UNet and VAE configs (64 for builtin:toy, 512 "
                            "for SD 1.x, 768 for SD 2 768-v, 1024 for SDXL); 512 when they cannot be read offline.",
                            512, ge=8, le=4096, multiple_of=8)
    seed: int = _spec("Seed of every random choice in training.", 0, ge=0, le=MAX_SEED)
    mixed_precision: str = _spec(
        "Precision of the frozen weights: `no` (fp32), `fp16` or `bf16`. Trainable weights stay fp32.", "bf16",
        choices=MIXED_PRECISION_MODES)
    attention: str = _spec(
        "Attention kernel: `auto` (xformers if installed, else PyTorch SDPA), `sdpa` or `xformers`.", "auto",
        choices=ATTENTION_MODES)
    save_every: int = _spec("Snapshot period in steps (0: only the final weights).", 100, ge=0)
    preview_every: int = _spec("Preview-grid period in steps (0: none).", 100, ge=0)
    gradient_accumulation_steps: int = _spec("Steps whose gradients are summed before one optimizer update.", 1,
                                             ge=1, le=1024, extension=True)
    gradient_checkpointing: bool = _spec(
        "Recompute activations in the backward pass to save memory: the UNet's (Flux.1 and SD 3: the transformer's, "
        "and T5's when it trains a token). Same results, slower steps.", False, extension=True)
    max_grad_norm: float = _spec("Gradient clipping norm (0: no clipping).", 1.0, ge=0.0, extension=True)
    buckets: bool = _spec(
        "Aspect-ratio buckets: a non-square reference trains at the size nearest its aspect ratio (up to 2:1, about "
        "resolution's area, sides multiples of 64 for Stable Diffusion) instead of a centre square crop; each "
        "micro-batch holds one size. Square references train exactly as with `false` (square centre crops for "
        "every image). `check` lists the sizes used.", True, extension=True)
    captions: bool = _spec(
        "Read per-image captions: a `name.txt` beside a reference `name.png` holds that image's personalization "
        "prompt (with the subject's placeholder, put in front when missing); images without one use "
        "`subjects.Vn.prompt`. `false` ignores the .txt files.", True, extension=True)
    t5_tokens: bool = _spec(
        "Flux.1 and SD 3: each subject's token is learned in T5 as well as in the CLIP encoders. `false`: T5 reads "
        "the class word instead (no backward pass through T5: less memory, weaker binding; docs/flux-sd3.md). "
        "Ignored by other models.", True, extension=True)
    frozen_weights: str = _spec(
        "Storage of the transformer's / UNet's frozen linear weights (and T5's, when it trains a token: "
        "`t5_tokens`) while training: `mixed_precision` (as train.mixed_precision says), or 8 bits, `int8` or "
        "`fp8` (torchao weight-only: half the memory of bf16 for "
        "those weights, slightly different results; the LoRA, the tokens and the computation keep their precision). "
        "For Flux.1-dev on a 24 GB GPU (docs/flow-memory.md). Only training uses it: exports and render are as "
        "usual. Needs `pip install 'palpcompose[quant]'`.", "mixed_precision", choices=FROZEN_WEIGHTS,
        extension=True)
    low_memory: bool = _spec(
        "Low-memory preset for 8 GB GPUs: gradient checkpointing on, and the VAE kept off the GPU once the reference "
        "images are encoded (it comes back only to draw previews). Same results, slower steps.", False,
        extension=True)
    adapter: str = _spec(
        "The adapter trained on the UNet's attention projections: `lora`, or `dora` (DoRA, weight-decomposed LoRA: "
        "each projection also learns a magnitude vector; peft's `use_dora`). DoRA costs more per step "
        "(docs/performance.md); its exports carry the magnitudes (docs/render-export.md).", "lora",
        choices=ADAPTERS, extension=True)
    log_with: str = _spec(
        "Experiment tracker fed during training: `none`, `tensorboard` or `wandb` (offline unless WANDB_MODE is set). "
        "Writes under out/logs/ (`tensorboard --logdir DIR/out/logs`); needs `pip install 'palpcompose[NAME]'`. "
        "out/logs/train.jsonl is written either way.", "none", choices=LOG_WITH, extension=True)

    @property
    def recomputes_activations(self) -> bool:
        """Gradient checkpointing is on: asked for directly, or through the low-memory preset."""
        return self.gradient_checkpointing or self.low_memory


@dataclass(frozen=True)
class RenderConfig:
    prompts: tuple[str, ...] = _spec("Prompts `render` draws. Default: `[palp.target_prompt]`.", ())
    seeds: tuple[int, ...] = _spec("One image per seed and prompt.", (0, 1, 2, 3), ge=0, le=MAX_SEED)
    steps: int = _spec("Sampling steps.", 30, ge=1, le=1000)
    guidance_scale: float = _spec("Classifier-free guidance scale at render time.", 7.5, ge=0.0, le=100.0)
    negative_prompt: str = _spec("Negative prompt.", "", extension=True)
    scheduler: str = _spec(
        "Sampler: `dpm++` (DPM-Solver++ 2M), `ddim` or `euler-a` (Euler ancestral) for Stable Diffusion; `euler` "
        "(flow-matching Euler) for Flux.1 and SD 3, their only sampler. Default: `dpm++`; `euler` for Flux.1 and "
        "SD 3.", "dpm++",
        choices=SCHEDULER_NAMES, extension=True)
    width: int | None = _spec(f"Image width in pixels, {SIZE_RULE}. Default: train.resolution (SDXL: the "
                              "pipeline's own size, 1024 for SDXL base).", None, ge=8, le=4096, multiple_of=8,
                              extension=True)
    height: int | None = _spec(f"Image height in pixels, {SIZE_RULE}. Default: train.resolution (SDXL: the "
                               "pipeline's own size, 1024 for SDXL base).", None, ge=8, le=4096, multiple_of=8,
                               extension=True)
    batch_size: int = _spec("Images generated per forward pass (does not change the images).", 1, ge=1, le=256,
                            extension=True)
    lora_scale: float = _spec("Strength of the trained LoRA at render time (peft's adapter scale; the learned tokens "
                              "stay whole): 1 as trained, 0.5 at half strength, up to 2.", 1.0, gt=0.0,
                              le=2.0, extension=True)


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
        return sha256_json(self._hashed())

    def training_hash(self) -> str:
        """Hash of the settings that change the trained weights (weight_settings). A record in manifest.json: what
        is up to date is decided by comparing the settings themselves (changed_weight_settings)."""
        return sha256_json(weight_settings(self._hashed()))

    def _hashed(self) -> dict:
        """to_dict() without the keys added after projects were first trained while they hold their default, so
        that adding a key does not make every earlier manifest look out of date."""
        data = self.to_dict()
        for (section, key), default in ADDED_LATER.items():
            if data[section].get(key) == default:
                del data[section][key]
        return data


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
    # Per-image captions (train.captions): image path -> its prompt with the subject's placeholder; images without
    # a caption file are not listed (they use subjects.Vn.prompt)
    captions: dict[Path, str] = field(default_factory=dict)
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # image -> (width, height) (buckets)


# ----------------------------------------------------------------------------------------------------------------
# Defaults that depend on other keys, resolved at load time so that every consumer sees the same values.


def resolve_defaults(project: ProjectSection, subjects: dict[str, SubjectConfig], palp: PalpConfig,
                     train: TrainConfig, render: RenderConfig) -> ProjectConfig:
    """The configuration with the documented "Default: X" values filled in: a subject's prompt, init word and flip,
    train.lora_alpha and render.prompts."""
    subjects = {key: dataclasses.replace(s, prompt=default_prompt(key) if s.prompt is None else s.prompt,
                                         init_word=s.init_word or s.class_name,
                                         flip=auto_flip(s.class_name) if s.flip is None else s.flip)
                for key, s in subjects.items()}
    train = dataclasses.replace(train, lora_alpha=float(train.lora_rank) if train.lora_alpha is None
                                else train.lora_alpha)
    if not render.prompts and palp.target_prompt:
        render = dataclasses.replace(render, prompts=(palp.target_prompt,))
    return ProjectConfig(project, subjects, palp, train, render)


def apply_model_defaults(config: ProjectConfig, resolved: dict[str, tuple[Any, str]]) -> ProjectConfig:
    """`config` with the resolved model-dependent defaults (dotted key -> (value, why)) filled in."""
    changes: dict[str, dict[str, Any]] = {}
    for key, (value, _) in resolved.items():
        section, name = key.split(".")
        changes.setdefault(section, {})[name] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)
                                          for section, values in changes.items()})


def auto_flip(class_name: str) -> bool:
    """Flip a subject's references unless its class is not mirror-symmetric (NO_FLIP_CLASSES)."""
    return not (set(re.findall(r"[a-z]+", class_name.lower())) & NO_FLIP_CLASSES)


def sanitize_name(text: str) -> str:
    """A valid project name made from `text` (a folder name, say): accents are dropped (`café` -> `cafe`), other
    characters become '-'; "my-project" when nothing is left (a folder named `猫`)."""
    return ascii_name(text) or "my-project"


def ascii_name(text: str) -> str:
    """`text` made a project name (NAME_PATTERN), possibly empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_-]", "-", ascii_text)).strip("-_")[:64]
