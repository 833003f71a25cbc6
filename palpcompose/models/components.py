"""A base model's components and the helpers that prepare and call them: loading the pipeline a source names,
freezing, LoRA, the attention kernel, tokenizing and encoding prompts, the UNet call. What differs between families
comes from the family's module (families.family_of(source.family)); the UNet-family calls below cover SD 1/2 and
SDXL (conditioning.Conditioning carries SDXL's pooled embedding).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch

from palpcompose.conditioning import Conditioning
from palpcompose.errors import UserError, WeightsDoNotFit
from palpcompose.models.families import FAMILY_NAMES, family_of
from palpcompose.models.flow import FlowTextEncoders
from palpcompose.models.resolve import BaseModelSource
from palpcompose.models.sd import LORA_TARGETS

LORA_TARGET_MODULES = list(LORA_TARGETS)  # the UNet's attention projections (models.sd; SDXL's are the same)
ATTENTION_MODES = ("auto", "sdpa", "xformers")  # train.attention's choices (set_attention)
ADAPTERS = ("lora", "dora")  # train.adapter's choices: peft LoRA, or DoRA (LoraConfig(use_dora=True); add_lora)


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
    lora_targets: tuple[str, ...] = LORA_TARGETS  # the family's LoRA target modules on the denoiser

    @property
    def flow(self) -> bool:
        """A rectified-flow family (Flux.1, SD 3): `unet` is its transformer, `text_encoder` a flow.FlowTextEncoders."""
        return self.prediction_type == "flow"

    @property
    def text_encoders(self) -> list:
        """The text encoders that hold a learned token per subject: [text_encoder], SDXL's [text_encoder,
        text_encoder_2], a flow family's encoders (those T5 included unless `train.t5_tokens = false`)."""
        if self.flow:
            return [e for e, holds in zip(self.text_encoder.encoders, self.text_encoder.with_tokens) if holds]
        if self.tokenizer_2 is None:
            return [self.text_encoder]
        return [self.text_encoder.text_encoder, self.text_encoder.text_encoder_2]

    @property
    def tokenizers(self) -> list:
        if self.flow:
            return [t for t, holds in zip(self.text_encoder.tokenizers, self.text_encoder.with_tokens) if holds]
        return [self.tokenizer] if self.tokenizer_2 is None else [self.tokenizer, self.tokenizer_2]

    @property
    def encoder_keys(self) -> tuple[str, ...]:
        """Flow families: the exported-embedding key of each encoder in `text_encoders` ("clip_l", "t5", ...)."""
        if not self.flow:
            return ()
        return tuple(s.key for s, holds in zip(self.text_encoder.slots, self.text_encoder.with_tokens) if holds)

    def tokenize(self, prompts: list[str]):
        """The prompts' token ids as `text_encoder` reads them (models.tokenize; a flow family's own layout)."""
        if self.flow:
            return self.text_encoder.tokenize(prompts)
        return tokenize(self.tokenizer, prompts, self.tokenizer_2)


def load_components(source: BaseModelSource) -> Components:
    """Load the pipeline `source` names (offline) and split it into its components, all fp32 on the CPU."""
    from diffusers import DDPMScheduler

    family = family_of(source.family)
    pipe = load_pipeline(source)
    if family.flow is not None:
        return _flow_components(source, family, pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in family.prediction_types:
        raise UserError(
            f"base model {source.spec!r}: scheduler prediction_type {prediction_type!r} is not supported "
            f"(palpcompose trains {' and '.join(family.prediction_types)} models)"
        )
    return Components(
        unet=pipe.unet, vae=pipe.vae, tokenizer=pipe.tokenizer,
        noise_scheduler=noise_scheduler, inference_scheduler_config=dict(pipe.scheduler.config),
        prediction_type=prediction_type, alphas_cumprod=noise_scheduler.alphas_cumprod.float().clone(),
        family=source.family, **family.components(pipe),  # the text encoder(s) as one module, a second tokenizer
    )


def _flow_components(source: BaseModelSource, family, pipe) -> Components:
    """A rectified-flow pipeline's Components: the transformer as `unet`, every text encoder as one
    flow.FlowTextEncoders, the scheduler config for the noise levels (docs/method.md "PALP for rectified flow")."""
    encoders = FlowTextEncoders(family.encoders, [getattr(pipe, s.component) for s in family.encoders],
                                [getattr(pipe, s.tokenizer) for s in family.encoders], family.flow.encode)
    return Components(
        unet=pipe.transformer, vae=pipe.vae, text_encoder=encoders, tokenizer=pipe.tokenizer,
        noise_scheduler=pipe.scheduler, inference_scheduler_config=dict(pipe.scheduler.config),
        prediction_type="flow", alphas_cumprod=None, family=source.family, lora_targets=family.lora_targets,
        **family.components(pipe),
    )


def load_pipeline(source: BaseModelSource, torch_dtype=None, allow_download: bool = False):
    """Load the base text-to-image pipeline that `source` names, offline unless `allow_download`. A pickled single
    file is loaded only because `resolve_base_model` let it through (`project.allow_pickle`).

    Returns the family's diffusers pipeline (`StableDiffusionPipeline` for SD 1.x / 2.x, `StableDiffusionXLPipeline`
    for SDXL). The caller moves it to a device and sets dtypes.
    """
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
    import diffusers

    family = family_of(source.family)
    pipeline_class, extra = getattr(diffusers, family.pipeline_class), family.pipeline_kwargs
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
                **family.single_file_kwargs,
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


def add_lora(unet, rank: int, lora_alpha: float, targets: tuple[str, ...] = LORA_TARGETS,
             adapter: str = "lora") -> list:
    """Attach a peft LoRA adapter to the denoiser's attention projections (`targets`: the family's); returns its
    parameters, in fp32. `adapter` "dora" makes it DoRA (peft's `use_dora`): each projection also trains a magnitude
    vector (out_features,), initialised to the row norms of the frozen weight; the LoRA initialisation is the same
    draw either way."""
    from peft import LoraConfig

    if adapter not in ADAPTERS:
        raise UserError(f"train.adapter must be one of {', '.join(ADAPTERS)}, not {adapter!r}")
    dora = {"use_dora": True} if adapter == "dora" else {}  # LoRA's config exactly as before
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=list(targets),
                   **dora)
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
        raise WeightsDoNotFit(f"LoRA weights do not fit this UNet: unexpected keys {unexpected[:3]}")


def set_attention(unet, mode: str, device_type: str) -> str:
    """Pick the attention kernel: "sdpa" (PyTorch scaled-dot-product, the default path), "xformers", or "auto"
    (xformers when it imports and runs on this CUDA device, else SDPA). Returns a one-line notice, or ""."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if mode not in ATTENTION_MODES:
        raise UserError(f"train.attention must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
    if not hasattr(unet, "set_default_attn_processor"):  # a flow transformer: diffusers' own SDPA processors
        if mode == "xformers":
            raise UserError("train.attention = \"xformers\" applies to UNet models; use \"auto\" or \"sdpa\"")
        return ""
    if mode in ("auto", "xformers"):
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
    return torch.stack([ids(tokenizer), ids(tokenizer_2)], dim=1)


def encode_prompt(text_encoder, input_ids):
    """The prompts' conditioning.Conditioning: SD 1.x / 2.x, the text encoder's last hidden state (B, 77, D); SDXL
    (SDXLTextEncoders), both penultimate states and the pooled embedding."""
    out = text_encoder(input_ids.to(text_encoder.device))
    return out if isinstance(out, Conditioning) else Conditioning(out[0])


def unet_forward(unet, latents, timesteps, cond, time_ids=None):
    """`unet(x, t, y).sample`. SDXL (cond.pooled set): the pooled embedding and the size values `time_ids` (1, 6)
    go in `added_cond_kwargs`; SD 1.x / 2.x get nothing added, the call of the UNet as before."""
    if cond.pooled is None:
        return unet(latents, timesteps, cond.embeds).sample
    added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(latents.device).expand(latents.shape[0], -1)}
    return unet(latents, timesteps, cond.embeds, added_cond_kwargs=added).sample

