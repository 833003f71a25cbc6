"""Base models: resolve what `project.base_model` names, load it, and prepare it for PALP.

`base_model` may be
- `builtin:toy`: the project's own tiny model, shipped in `palpcompose/builtin/toy/` (a diffusers folder);
- a local diffusers folder (holds `model_index.json`);
- a single checkpoint file (`.safetensors`; `.ckpt`/`.pt`/`.bin` only with `project.allow_pickle = true`, since
  loading them runs pickled code);
- a hub id (`org/name`), used from the local Hugging Face cache (the commands never download).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from palpcompose.errors import UserError, command_line
from palpcompose.tokens import add_placeholder_tokens  # noqa: F401 - re-exported: models.add_placeholder_tokens

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"builtin:toy": BUILTIN_DIR / "toy"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLED_SUFFIXES = (".ckpt", ".pt", ".bin")
_BASE_MODEL_HINT = "base_model must be builtin:toy, a hub id (org/name), a diffusers folder or a .safetensors file"


@dataclass(frozen=True)
class BaseModelSource:
    spec: str  # what the user wrote
    kind: str  # "builtin" | "folder" | "single_file" | "hub"
    location: str  # a folder, a file, or a hub id
    available: bool  # can be loaded without the network
    detail: str  # one line for `check`: what was found, or why it cannot be verified
    allow_pickle: bool = False  # project.allow_pickle: pickled weight files may be loaded
    family: str = "unknown"  # detect_family's answer: "toy" | "sd1" | "sd2" | "sd2-v" | "sdxl" | "unknown"


def resolve_base_model(spec: str, project_dir: Path | None = None, allow_pickle: bool = False) -> BaseModelSource:
    """Say what `spec` refers to without loading its weights (a folder's model_index.json and a .safetensors file's
    header are read). Raises UserError when it cannot be a base model, or is a pickled file and `allow_pickle` is
    off (`project.allow_pickle`)."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        folder = BUILTIN_MODELS.get(spec)
        if folder is None:
            raise UserError(f"unknown built-in model {spec!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        ok = (folder / "model_index.json").is_file()
        detail = f"built-in model at {folder}" if ok else f"{spec} is not installed in this copy of palpcompose ({folder})"
        return BaseModelSource(spec, "builtin", str(folder), ok, detail, family="toy")

    path = Path(spec).expanduser()
    if not path.is_absolute() and project_dir is not None and (
            (project_dir / path).exists() or (project_dir / path).is_symlink()):
        path = project_dir / path
    if path.is_dir():
        family = _check_pipeline_folder(path, allow_pickle)
        return BaseModelSource(spec, "folder", str(path), True, f"diffusers folder {path} ({FAMILY_NAMES[family]})",
                               allow_pickle, family)
    if path.is_file():
        if path.suffix in PICKLED_SUFFIXES:
            if not allow_pickle:
                raise UserError(
                    f"{path}: a {path.suffix} checkpoint runs pickled code when it is loaded, so palpcompose does not "
                    "open it; use a .safetensors copy of the model, or set `allow_pickle = true` under [project] if "
                    "you trust where the file comes from")
            family = "unknown"  # its keys cannot be read without running it
        elif path.suffix == ".safetensors":
            family = _check_single_file(path)
        else:
            raise UserError(f"{path}: unsupported checkpoint type {path.suffix!r}; use a .safetensors file")
        return BaseModelSource(spec, "single_file", str(path), True, f"single checkpoint file {path}",
                               family=family)
    if path.is_symlink():
        raise UserError(f"base model {spec!r} is a broken symbolic link (to {path.readlink()})")
    if path.suffix in (".safetensors", *PICKLED_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise UserError(f"base model file {spec!r} not found (relative paths are relative to the project folder)")
    if _HUB_ID.match(spec):
        cached = _hub_cached(spec)
        if cached:
            family = detect_family("hub", spec)
            return BaseModelSource(spec, "hub", spec, True, f"hub model {spec} found in the local cache "
                                   f"({FAMILY_NAMES[family]})", allow_pickle, family)
        return BaseModelSource(spec, "hub", spec, False, uncached_hub_message(spec), allow_pickle)
    raise UserError(
        f"base_model {spec!r} is neither builtin:toy, an existing folder or .safetensors file, nor a hub id (org/name)"
    )


def uncached_hub_message(repo_id: str) -> str:
    """What `check`, `train` and `render` say about a hub id missing from the local cache: palpcompose never
    downloads, so the model has to be fetched once, on a machine with network, or replaced by the toy model."""
    folder = f"models/{repo_id.split('/')[-1]}"
    download = command_line("hf", "download", repo_id, "--local-dir", folder)
    return (f"hub model {repo_id} is not in this machine's Hugging Face cache, and palpcompose never downloads; "
            f"download it once: `{command_line('hf', 'download', repo_id)}` fills this machine's cache (base_model "
            f"then works as it is), or `{download}` in the project folder (anywhere with network, then copy the "
            f"folder over) and set base_model = \"{folder}\"; or use base_model = \"builtin:toy\" to try the toy "
            "model first")


def _check_pipeline_folder(path: Path, allow_pickle: bool = False) -> str:
    """A diffusers pipeline folder of a supported family, with every component it needs. Returns the family."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: folder has no model_index.json; {_BASE_MODEL_HINT} (a folder as saved by "
                        "`pipeline.save_pretrained`)")
    family = detect_family("folder", str(path))  # refuses SD 3, Flux, refiners, inpainting models
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if family == "sdxl":
        needed += ["text_encoder_2", "tokenizer_2"]
    data = json.loads(index.read_text(encoding="utf-8"))  # readable: detect_family read it
    missing = [name for name in needed if not isinstance(data, dict) or name not in data]
    if missing:
        raise UserError(f"{index}: names no {', '.join(missing)}; palpcompose needs a Stable Diffusion text-to-image "
                        "pipeline folder")
    for name in needed:
        if not (path / name).is_dir():
            raise UserError(f"{path / name}: missing; the pipeline folder is incomplete (copy it again, or save it "
                            "with `pipeline.save_pretrained`)")
    for name in [n for n in needed if n in ("unet", "vae") or n.startswith("text_encoder")]:
        files = [f for f in (path / name).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        if any(f.suffix in PICKLED_SUFFIXES for f in files):
            if not allow_pickle:
                raise UserError(f"{path / name}: its weights are a pickled file, which runs code when it is loaded; "
                                "save the pipeline again with safetensors (`save_pretrained(..., "
                                "safe_serialization=True)`), or set `allow_pickle = true` under [project] if you "
                                "trust where it comes from")
            continue
        raise UserError(f"{path / name}: no weights file; the pipeline folder is incomplete")
    return family


def _check_single_file(path: Path) -> str:
    """Read a .safetensors file's header (no weights, no code) and make sure it holds a Stable Diffusion UNet of a
    supported family, so a LoRA or an embedding given as base_model gets a clear message instead of a failed
    download of configs. Returns the family."""
    keys = _safetensors_keys(path)
    # a UNet in the original layout, or a Flux / SD 3 transformer (refused by name)
    if any(k.startswith(("model.diffusion_model.", "double_blocks.", "joint_blocks.")) for k in keys):
        return detect_family("single_file", str(path))
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k or "lora_A" in k
           for k in keys):
        what = "is a LoRA, not a base model"
    elif any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        what = "is a textual-inversion embedding, not a base model"
    else:
        what = f"holds no Stable Diffusion UNet ({len(keys)} tensors, none named model.diffusion_model.*)"
    raise UserError(f"{path}: this file {what}; {_BASE_MODEL_HINT} holding a whole model")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "model_index.json")
        return isinstance(hit, str)
    except Exception:  # noqa: BLE001 - a cache we cannot read counts as no cache (the load then says what to do)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Model families: what kind of model base_model names, read from its configs or its keys (no weights loaded)

FAMILY_NAMES = {
    "toy": "the built-in toy model",
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sd2-v": "Stable Diffusion 2.x (v-prediction)",
    "sdxl": "Stable Diffusion XL",
    "unknown": "family not verifiable offline",
}
SUPPORTED_FAMILIES = ("Stable Diffusion 1.x and 2.x (epsilon and v-prediction) and Stable Diffusion XL base "
                      "text-to-image models")
SDXL_RESOLUTION = 1024  # SDXL's native image side; train.resolution's default for an SDXL base_model
NATIVE_RESOLUTION = {"toy": 64, "sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": SDXL_RESOLUTION}


def detect_family(kind: str, location: str) -> str:
    """The family of the model at `location` ("builtin" | "folder" | "hub" | "single_file", as BaseModelSource):
    "toy", "sd1", "sd2", "sd2-v" or "sdxl", or "unknown" when nothing can be read offline. Reads configs or a
    .safetensors header only. Raises UserError naming the kind found for a model palpcompose cannot train: Stable
    Diffusion 3, Flux, an SDXL refiner alone, an inpainting model, any other pipeline class."""
    if kind == "builtin":
        return "toy"
    if kind == "single_file":
        kind_found, family = _family_from_keys(_safetensors_keys(Path(location)), Path(location))
    else:
        read = config_reader(kind, location)
        index = read("model_index.json")
        if index is None:
            return "unknown"
        kind_found, family = _family_from_index(index, read)
    if family is None:
        raise UserError(f"base model {location!r} is {kind_found}, which palpcompose cannot train; it supports "
                        f"{SUPPORTED_FAMILIES}: point base_model at one of those")
    return family


def config_reader(kind: str, location: str):
    """read(name) -> the JSON object in `name` of a pipeline folder or cached hub model, or None."""

    def read(name: str):
        if kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            try:
                hit = try_to_load_from_cache(location, name)
            except Exception:  # noqa: BLE001 - a cache we cannot read is no cache
                return None
            file = Path(hit) if isinstance(hit, str) else None
        else:
            file = Path(location) / name
        if file is None or not file.is_file():
            return None
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: unreadable ({exc}); the folder is not a complete diffusers pipeline (copy it "
                            "again, or save it with `pipeline.save_pretrained`)") from exc
        return data if isinstance(data, dict) else None

    return read


def _family_from_index(index: dict, read) -> tuple[str, str | None]:
    """(what the pipeline is, in words; its family or None when unsupported) from model_index.json and the UNet's
    and scheduler's configs."""
    name = str(index.get("_class_name", ""))
    unet = read("unet/config.json") or {}
    if "Flux" in name:
        return f"a Flux model ({name})", None
    if name.startswith("StableDiffusion3"):
        return f"a Stable Diffusion 3 model ({name})", None
    if "Inpaint" in name or unet.get("in_channels", 4) != 4:
        return (f"an inpainting model ({name}, a UNet with {unet.get('in_channels', '?')} input channels; "
                "palpcompose needs the 4-channel text-to-image UNet)"), None
    if name.startswith("StableDiffusionXL"):
        encoders = [index.get(k) for k in ("text_encoder", "text_encoder_2")]
        if not all(isinstance(e, list) and e and e[0] for e in encoders) or index.get("requires_aesthetics_score"):
            return (f"an SDXL refiner ({name}: no first text encoder, aesthetic-score conditioning; it only "
                    "post-processes an SDXL base model's images: use the base model)"), None
        return "SDXL", "sdxl"
    if name == "StableDiffusionPipeline":
        scheduler = read("scheduler/scheduler_config.json") or {}
        if scheduler.get("prediction_type") == "v_prediction":
            return "SD 2.x (v-prediction)", "sd2-v"
        return ("SD 2.x", "sd2") if unet.get("cross_attention_dim") == 1024 else ("SD 1.x", "sd1")
    return (f"a {name} pipeline" if name else "a pipeline whose model_index.json names no _class_name"), None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for every kind of bad header
        raise UserError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); download it "
                        "again") from exc


def _family_from_keys(keys: list[str], path: Path) -> tuple[str, str | None]:
    """(what an original-format single-file checkpoint is; its family or None) from its tensor names, and the
    shape of the UNet's first convolution (9 input channels: inpainting)."""
    unet = "model.diffusion_model."
    if any(k.startswith((f"{unet}joint_blocks.", "joint_blocks.")) for k in keys):
        return "a Stable Diffusion 3 checkpoint (MMDiT joint_blocks)", None
    if any(k.startswith((f"{unet}double_blocks.", "double_blocks.")) for k in keys):
        return "a Flux checkpoint (double_blocks)", None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        conv_in = f"{unet}input_blocks.0.0.weight"
        channels = f.get_slice(conv_in).get_shape()[1] if conv_in in keys else 4
    if channels != 4:
        return f"an inpainting checkpoint (a UNet with {channels} input channels)", None
    if any(k.startswith(f"{unet}label_emb.") for k in keys):  # SDXL's added (pooled text + size) conditioning
        if not any(k.startswith("conditioner.embedders.1.") for k in keys) and any(
                k.startswith("conditioner.embedders.0.model.") for k in keys):
            return "an SDXL refiner checkpoint (one OpenCLIP text encoder; use the SDXL base model)", None
        return "SDXL", "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP ViT-H: SD 2.x
        return "SD 2.x", "sd2"
    return "SD 1.x", "sd1"


def load_pipeline(source: BaseModelSource, torch_dtype=None, allow_download: bool = False):
    """Load the base text-to-image pipeline that `source` names, offline unless `allow_download`. A pickled single
    file is loaded only because `resolve_base_model` let it through (`project.allow_pickle`).

    Returns a diffusers `StableDiffusionPipeline` (SD 1.x / 2.x). The caller moves it to a device and sets dtypes.
    """
    import torch

    # Always name the dtype: without one, diffusers keeps the stored dtype (builtin:toy ships fp16). `dtype` is the
    # keyword diffusers 0.42 wants (`torch_dtype` prints a deprecation notice).
    dtype_kw = {"dtype": torch_dtype or torch.float32}
    if source.kind == "hub" and allow_download:  # a download: its progress bars are the only sign of life
        return _load(source, dtype_kw, allow_download)
    with _library_progress_bars_off():
        return _load(source, dtype_kw, allow_download)


@contextlib.contextmanager
def _library_progress_bars_off():
    """diffusers' and transformers' per-component loading bars off (our commands draw their own progress); their
    previous state is restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _load(source: BaseModelSource, dtype_kw: dict, allow_download: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if source.family == "sdxl":  # no safety checker in SDXL; no invisible watermark on our renders
        pipeline_class, extra = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        pipeline_class, extra = StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    weights_kw = {"use_safetensors": None if source.allow_pickle else True}
    if source.kind in ("builtin", "folder"):
        if not source.available:
            raise UserError(source.detail)
        return pipeline_class.from_pretrained(source.location, **dtype_kw, local_files_only=True, **extra,
                                              **weights_kw)
    if source.kind == "single_file":
        try:
            return pipeline_class.from_single_file(
                source.location, **dtype_kw, local_files_only=not allow_download,
                **({"add_watermarker": False} if source.family == "sdxl" else {}),
            )
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError and friends
            if allow_download:
                raise
            raise UserError(
                f"{source.location}: diffusers reads a single-file checkpoint with the configuration files of its "
                f"model family ({FAMILY_NAMES.get(source.family, source.family)}) from the Hugging Face cache, and "
                "they are not cached here; on a machine with network, load it once (or convert it to a diffusers "
                "folder with diffusers' conversion scripts) and point base_model at the folder "
                f"({exc})"
            ) from exc
    if source.kind == "hub":
        try:
            return pipeline_class.from_pretrained(source.location, **dtype_kw, local_files_only=not allow_download,
                                                  **extra, **weights_kw)
        except OSError as exc:
            raise UserError(
                f"hub model {source.location!r} is not in the local Hugging Face cache and downloading is off: "
                f"download it first (`hf download {source.location}`) or point base_model at a local folder ({exc})"
            ) from exc
    raise ValueError(f"unknown base model kind {source.kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Defaults that depend on the base model (docs/schema.md marks those keys "model-dependent").

# builtin:toy's own training and render settings (docs/evaluation.md, "The PALP study"). The training regime was
# chosen on the TI+LoRA baseline (guidance none) alone, never on PALP's scores: LoRA 1e-3 / embedding 5e-3 is where
# the baseline learns the subject best (3e-3 collapses, 1e-4 barely moves); with references that share a context
# their prompt does not name, batch 4 at 200 steps is where it loses the most of the target prompt (stage A).
# palp.weight (lambda) 3 is PALP's own setting: chosen on PALP's scores on two tuning subjects (stage T) and judged
# on seven others it never saw (stage B: text +0.23 +- 0.08 over the baseline at 0.91x its fidelity); at lambda 1
# the tuning subjects kept only 0.62x the baseline's fidelity. fp32: a 64 px model on a CPU.
TOY_DEFAULTS = {
    "train.steps": 200,
    "train.batch_size": 4,
    "train.learning_rate": 1e-3,
    "train.embedding_learning_rate": 5e-3,
    "train.mixed_precision": "no",
    "palp.weight": 3.0,
    "render.steps": 20,  # the toy model's recommended sampling (docs/toyworld.md)
    "render.guidance_scale": 5.0,
}


def native_resolution(source: BaseModelSource) -> int | None:
    """The image size the base model was trained at, from its own configs: the UNet's latent `sample_size` times
    the VAE's downsampling factor (2 ** (len(block_out_channels) - 1)): 64 for builtin:toy, 512 for SD 1.x and
    SD 2 base, 768 for SD 2 768-v, 1024 for SDXL. None when the configs cannot be read offline (a single-file
    checkpoint, a hub id that is not cached)."""
    if source.kind not in ("builtin", "folder", "hub"):
        return None
    read = config_reader(source.kind, source.location)  # the reader family detection uses
    unet, vae = read("unet/config.json"), read("vae/config.json")
    try:
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (TypeError, KeyError, ValueError):
        return None


def model_defaults(source: BaseModelSource) -> dict[str, tuple[object, str]]:
    """The defaults that `source` decides: dotted palp.toml key -> (value, why). Keys not listed keep the schema's
    defaults (the paper's Stable Diffusion values)."""
    defaults: dict[str, tuple[object, str]] = {}
    size = native_resolution(source)
    if size is not None:
        defaults["train.resolution"] = (size, f"the native size of {source.spec} (its UNet and VAE configs)")
    if source.spec == "builtin:toy":
        for key, value in TOY_DEFAULTS.items():
            defaults[key] = (value, "builtin:toy's own default")
    return defaults


def placeholder_tokens(project_name: str, subject_keys) -> dict[str, str]:
    """The learned token of each subject: {"V1": "<name-v1>"}. Lower case, because CLIP's tokenizer lowercases text."""
    return {key: f"<{project_name}-{key}>".lower() for key in subject_keys}


_PLACEHOLDER = re.compile(r"\[(V\d+)\]")


def expand_placeholders(prompt: str, tokens: dict[str, str]) -> str:
    """Replace `[V1]` with subject V1's token. Unknown placeholders raise UserError."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in tokens:
            raise UserError(f"prompt {prompt!r} uses [{key}], which is not a subject of this project")
        return tokens[key]

    return _PLACEHOLDER.sub(sub, prompt)


# ---------------------------------------------------------------------------------------------------------------
# Preparing a base model for PALP training: components, frozen weights, placeholder tokens, LoRA, attention.

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Components:
    """The separately wired parts of a Stable Diffusion model (diffusers' component names).

    `prediction_type` ("epsilon" | "v_prediction") and `alphas_cumprod` come from the model's own scheduler config.
    SDXL (`family` "sdxl"): `text_encoder` is conditioning.SDXLTextEncoders (both encoders as one module) and
    `tokenizer_2` the second tokenizer; the loop only calls `tokenize`, `encode_prompt` and `unet_forward`.
    """

    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object  # a DDPMScheduler built from the model's scheduler config (training-time schedule)
    inference_scheduler_config: dict
    prediction_type: str
    alphas_cumprod: object  # (T,) float32 tensor
    family: str = "sd1"  # detect_family's answer
    tokenizer_2: object = None  # SDXL's second tokenizer, else None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the empty prompt is encoded as zeros (its pipeline config)

    @property
    def text_encoders(self) -> list:
        """The CLIP text encoder(s) themselves: [text_encoder] or SDXL's [text_encoder, text_encoder_2]."""
        if self.tokenizer_2 is None:
            return [self.text_encoder]
        return [self.text_encoder.text_encoder, self.text_encoder.text_encoder_2]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] if self.tokenizer_2 is None else [self.tokenizer, self.tokenizer_2]


def load_components(source: BaseModelSource) -> Components:
    """Load the pipeline `source` names (offline) and split it into its components, all fp32 on the CPU."""
    from diffusers import DDPMScheduler

    from palpcompose.conditioning import SDXLTextEncoders

    pipe = load_pipeline(source)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"base model {source.spec!r}: scheduler prediction_type {prediction_type!r} is not supported "
            "(palpcompose trains epsilon and v_prediction models)"
        )
    sdxl = source.family == "sdxl"
    return Components(
        unet=pipe.unet, vae=pipe.vae, tokenizer=pipe.tokenizer,
        text_encoder=SDXLTextEncoders(pipe.text_encoder, pipe.text_encoder_2) if sdxl else pipe.text_encoder,
        noise_scheduler=noise_scheduler, inference_scheduler_config=dict(pipe.scheduler.config),
        prediction_type=prediction_type, alphas_cumprod=noise_scheduler.alphas_cumprod.float().clone(),
        family=source.family, tokenizer_2=pipe.tokenizer_2 if sdxl else None,
        force_zeros_for_empty_prompt=sdxl and bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    )


def freeze(*modules) -> None:
    """No gradients anywhere; the trainable parts (LoRA, placeholder rows) are switched back on explicitly."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()  # no dropout: training is deterministic given the seed


def lora_layers(unet) -> list:
    """The UNet's peft LoRA layers, collected once so that switching the adapter off and on (train.adapters) touches
    only them: diffusers' `unet.disable_adapters()` walks every module of the UNet on each call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def add_lora(unet, rank: int, lora_alpha: float) -> list:
    """Attach a peft LoRA adapter to the UNet's attention projections; returns its parameters, in fp32."""
    import torch
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(torch.float32)  # trainable weights stay fp32 under bf16/fp16 autocast
    return params


def lora_state_dict(unet) -> dict:
    """The adapter's weights in peft's key format (see weights.py), detached fp32 copies on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict) -> None:
    """Copy saved LoRA weights (peft key format) into the adapter that `add_lora` attached."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA weights do not fit this UNet: unexpected keys {unexpected[:3]}")


def set_attention(unet, mode: str, device_type: str) -> str:
    """Pick the attention kernel: "sdpa" (PyTorch scaled-dot-product, the default path), "xformers", or "auto"
    (xformers when it imports and runs on this CUDA device, else SDPA). Returns a one-line notice, or ""."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if mode not in ("auto", "sdpa", "xformers"):
        raise UserError(f"train.attention must be auto, sdpa or xformers, not {mode!r}")
    if mode in ("auto", "xformers"):
        import importlib.util

        installed = importlib.util.find_spec("xformers") is not None
        reason = ("xformers is not installed" if not installed
                  else "xformers needs a CUDA device" if device_type != "cuda" else "")
        if not reason:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return ""
            except Exception as exc:  # noqa: BLE001 - built for another torch/CUDA (measured: 0.35 on torch 2.11 + CUDA 13)
                reason = f"xformers is installed but does not run here ({type(exc).__name__})"
        if mode == "xformers":
            raise UserError(f"train.attention = \"xformers\": {reason}; use \"auto\" or \"sdpa\"")
        unet.set_attn_processor(AttnProcessor2_0())
        # "auto" without xformers, or on a CPU, is the normal case: say something only when xformers is there and fails
        return f"attention: {reason}, using PyTorch SDPA" if installed and device_type == "cuda" else ""
    unet.set_attn_processor(AttnProcessor2_0())
    return ""


def tokenize(tokenizer, prompts: list[str], tokenizer_2=None):
    """Token ids (B, model_max_length), padded and truncated as Stable Diffusion does; with SDXL's second tokenizer
    (B, 2, model_max_length), one row per tokenizer (what conditioning.SDXLTextEncoders reads)."""

    def ids(tok):
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    if tokenizer_2 is None:
        return ids(tokenizer)
    import torch

    return torch.stack([ids(tokenizer), ids(tokenizer_2)], dim=1)


def encode_prompt(text_encoder, input_ids):
    """The prompts' conditioning.Conditioning: SD 1.x / 2.x, the text encoder's last hidden state (B, 77, D); SDXL
    (SDXLTextEncoders), both penultimate states and the pooled embedding."""
    from palpcompose.conditioning import Conditioning

    out = text_encoder(input_ids.to(text_encoder.device))
    return out if isinstance(out, Conditioning) else Conditioning(out[0])


def unet_forward(unet, latents, timesteps, cond, time_ids=None):
    """`unet(x, t, y).sample`. SDXL (cond.pooled set): the pooled embedding and the size values `time_ids` (1, 6)
    go in `added_cond_kwargs`; SD 1.x / 2.x get nothing added, the call of the UNet as before."""
    if cond.pooled is None:
        return unet(latents, timesteps, cond.embeds).sample
    added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(latents.device).expand(latents.shape[0], -1)}
    return unet(latents, timesteps, cond.embeds, added_cond_kwargs=added).sample
