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
import re
from dataclasses import dataclass
from pathlib import Path

from palpcompose.errors import UserError, command_line

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
        return BaseModelSource(spec, "builtin", str(folder), ok, detail)

    path = Path(spec).expanduser()
    if not path.is_absolute() and project_dir is not None and (
            (project_dir / path).exists() or (project_dir / path).is_symlink()):
        path = project_dir / path
    if path.is_dir():
        _check_pipeline_folder(path, allow_pickle)
        return BaseModelSource(spec, "folder", str(path), True, f"diffusers folder {path}", allow_pickle)
    if path.is_file():
        if path.suffix in PICKLED_SUFFIXES:
            if not allow_pickle:
                raise UserError(
                    f"{path}: a {path.suffix} checkpoint runs pickled code when it is loaded, so palpcompose does not "
                    "open it; use a .safetensors copy of the model, or set `allow_pickle = true` under [project] if "
                    "you trust where the file comes from")
        elif path.suffix == ".safetensors":
            _check_single_file(path)
        else:
            raise UserError(f"{path}: unsupported checkpoint type {path.suffix!r}; use a .safetensors file")
        return BaseModelSource(spec, "single_file", str(path), True, f"single checkpoint file {path}")
    if path.is_symlink():
        raise UserError(f"base model {spec!r} is a broken symbolic link (to {path.readlink()})")
    if path.suffix in (".safetensors", *PICKLED_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise UserError(f"base model file {spec!r} not found (relative paths are relative to the project folder)")
    if _HUB_ID.match(spec):
        cached = _hub_cached(spec)
        if cached:
            return BaseModelSource(spec, "hub", spec, True, f"hub model {spec} found in the local cache", allow_pickle)
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


def _check_pipeline_folder(path: Path, allow_pickle: bool = False) -> None:
    """A diffusers pipeline folder: a readable model_index.json that names a UNet, a VAE and a text encoder."""
    import json

    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: folder has no model_index.json; {_BASE_MODEL_HINT} (a folder as saved by "
                        "`pipeline.save_pretrained`)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{index}: unreadable ({exc}); the folder is not a complete diffusers pipeline (copy it "
                        "again, or save it with `pipeline.save_pretrained`)") from exc
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not isinstance(data, dict) or name not in data]
    if missing:
        raise UserError(f"{index}: names no {', '.join(missing)}; palpcompose needs a Stable Diffusion text-to-image "
                        "pipeline folder")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / name).is_dir():
            raise UserError(f"{path / name}: missing; the pipeline folder is incomplete (copy it again, or save it "
                            "with `pipeline.save_pretrained`)")
    for name in ("unet", "vae", "text_encoder"):
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


def _check_single_file(path: Path) -> None:
    """Read a .safetensors file's header (no weights, no code) and make sure it holds a Stable Diffusion UNet, so a
    LoRA or an embedding given as base_model gets a clear message instead of a failed download of configs."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for every kind of bad header
        raise UserError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); download it "
                        "again") from exc
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return
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
    from diffusers import StableDiffusionPipeline

    if source.kind in ("builtin", "folder"):
        if not source.available:
            raise UserError(source.detail)
        return StableDiffusionPipeline.from_pretrained(
            source.location, **dtype_kw, local_files_only=True, safety_checker=None,
            requires_safety_checker=False, use_safetensors=None if source.allow_pickle else True,
        )
    if source.kind == "single_file":
        try:
            return StableDiffusionPipeline.from_single_file(
                source.location, **dtype_kw, local_files_only=not allow_download,
            )
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError and friends
            if allow_download:
                raise
            raise UserError(
                f"{source.location}: diffusers reads a single-file checkpoint with the configuration files of its "
                "model family (SD 1.x or 2.x) from the Hugging Face cache, and they are not cached here; on a "
                "machine with network, load it once (or convert it to a diffusers folder with diffusers' "
                f"convert_original_stable_diffusion_to_diffusers.py) and point base_model at the folder ({exc})"
            ) from exc
    if source.kind == "hub":
        try:
            return StableDiffusionPipeline.from_pretrained(
                source.location, **dtype_kw, local_files_only=not allow_download, safety_checker=None,
                requires_safety_checker=False, use_safetensors=None if source.allow_pickle else True,
            )
        except OSError as exc:
            raise UserError(
                f"hub model {source.location!r} is not in the local Hugging Face cache and downloading is off: "
                f"download it first (`hf download {source.location}`) or point base_model at a local folder ({exc})"
            ) from exc
    raise ValueError(f"unknown base model kind {source.kind!r}")


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
    SDXL will add a second tokenizer/text encoder and added conditioning here; the loop only calls `encode_prompt`.
    """

    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object  # a DDPMScheduler built from the model's scheduler config (training-time schedule)
    inference_scheduler_config: dict
    prediction_type: str
    alphas_cumprod: object  # (T,) float32 tensor


def load_components(source: BaseModelSource) -> Components:
    """Load the pipeline `source` names (offline) and split it into its components, all fp32 on the CPU."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(source)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"base model {source.spec!r}: scheduler prediction_type {prediction_type!r} is not supported "
            "(palpcompose trains epsilon and v_prediction models)"
        )
    return Components(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        noise_scheduler=noise_scheduler, inference_scheduler_config=dict(pipe.scheduler.config),
        prediction_type=prediction_type, alphas_cumprod=noise_scheduler.alphas_cumprod.float().clone(),
    )


def freeze(*modules) -> None:
    """No gradients anywhere; the trainable parts (LoRA, placeholder rows) are switched back on explicitly."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()  # no dropout: training is deterministic given the seed


def add_placeholder_tokens(tokenizer, text_encoder, tokens: dict[str, str], init_words: dict[str, str]) -> dict[str, int]:
    """Add one new token per subject and initialise its embedding from its init word.

    `tokens`: {"V1": "<name-v1>"}; `init_words`: {"V1": "cat"}. A word that the tokenizer splits into several
    tokens is initialised with the mean of their embeddings. Returns {"V1": token_id}.
    """
    import torch

    for key, token in tokens.items():
        if token in tokenizer.get_vocab():
            raise UserError(f"subject {key}: the token {token!r} already exists in the base model's vocabulary")
    init_ids = {}
    for key, word in init_words.items():
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise UserError(f"subject {key}: init word {word!r} encodes to no token; set subjects.{key}.init_word")
        init_ids[key] = ids
    tokenizer.add_tokens(list(tokens.values()))
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in tokens.items()}
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for key, ids in init_ids.items():
            table[token_ids[key]] = table[ids].mean(dim=0)
    return token_ids


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


def tokenize(tokenizer, prompts: list[str]):
    """Token ids (B, model_max_length), padded and truncated as Stable Diffusion does."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompt(text_encoder, input_ids):
    """Text embeddings (B, 77, D) for the UNet's cross-attention: the text encoder's last hidden state."""
    return text_encoder(input_ids.to(text_encoder.device))[0]
