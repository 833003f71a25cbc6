"""Flux.1 (FluxPipeline): a rectified-flow MMDiT transformer that reads CLIP-L's pooled output and T5's hidden
states, 2x2-packed latents with position ids, and for Flux.1-dev a guidance embedding instead of real CFG
(docs/method.md "Guidance-distilled models"). Refused: schnell (few-step distilled), Fill, Kontext, Redux,
ControlNet and inpainting pipelines."""

from __future__ import annotations

import torch

from palpcompose.choices import FLOW_SCHEDULER_NAMES
from palpcompose.conditioning import Conditioning
from palpcompose.models.family import EncoderSlot, Family, FlowSpec, refused
from palpcompose.models.flow import latent_image_ids, pack_latents, unpack_latents

# The attention projections of both streams (double blocks) and of the single blocks (attn.to_q/k/v): what
# diffusers' Flux LoRA script targets by default, and what FluxPipeline.load_lora_weights and ComfyUI load.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ENCODERS = (
    EncoderSlot("text_encoder", "tokenizer", "clip_l", "clip", 77),
    EncoderSlot("text_encoder_2", "tokenizer_2", "t5", "t5", 512),  # FluxPipeline's max_sequence_length
)
USE_INSTEAD = "use Flux.1-dev (black-forest-labs/FLUX.1-dev) or a de-distilled Flux, as a diffusers folder or hub id"
# Kinds of Flux pipelines that are not the text-to-image model, in words (refused with exit 2)
REFUSED_CLASSES = {"Fill": "Flux.1 Fill (an inpainting/outpainting model)", "Kontext": "Flux.1 Kontext (an "
                   "image-editing model)", "Redux": "Flux.1 Redux (an image-variation adapter)", "ControlNet":
                   "a Flux ControlNet pipeline", "Inpaint": "a Flux inpainting pipeline", "Img2Img": "a Flux "
                   "image-to-image pipeline"}


def from_index(name: str, index: dict, unet: dict, read, names: tuple[str, ...]) -> tuple[str, str | None] | None:
    if "Flux" not in name:
        return None
    for part, what in REFUSED_CLASSES.items():
        if part in name:
            return refused(f"{what} ({name})", "palpcompose trains the FluxPipeline text-to-image model")
    if name != "FluxPipeline":
        return refused(f"a {name} pipeline (not FluxPipeline, the text-to-image model)")
    transformer = read("transformer/config.json") or {}
    scheduler = read("scheduler/scheduler_config.json") or {}
    if transformer.get("in_channels", 64) != 64:
        return refused(f"a Flux transformer with {transformer.get('in_channels')} input channels (Fill or "
                       "inpainting)", "palpcompose trains the 64-channel text-to-image model")
    guidance, shifting = transformer.get("guidance_embeds", True), scheduler.get("use_dynamic_shifting", True)
    if not guidance and not shifting:
        return refused("Flux.1 schnell or another few-step distilled Flux (no guidance embedding, a scheduler without "
                       "resolution-dependent shifting)", USE_INSTEAD)
    # A name that says schnell is believed unless the configs are clearly Flux.1-dev's (a guidance embedding and
    # resolution-dependent shifting, neither of which schnell has): then the weights are dev's, whatever the folder
    # is called (docs/flux-sd3.md)
    schnell = next((n for n in names if "schnell" in n.lower()), None)
    if schnell is not None and not (guidance and shifting):
        return refused(f"Flux.1 schnell (named {schnell!r}, and its configs are not Flux.1-dev's: "
                       f"{'no guidance embedding' if not guidance else 'no resolution-dependent shifting'})",
                       USE_INSTEAD)
    return "Flux.1", "flux"


def from_keys(keys: list[str]) -> tuple[str, str | None] | None:
    """An original-layout Flux checkpoint (black-forest-labs' flux1-dev.safetensors): refused for now, with the fix."""
    if not any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return None
    if not any("guidance_in." in k for k in keys):
        return refused("a Flux.1 single-file checkpoint (original layout, no guidance embedding: Flux.1 schnell)",
                       USE_INSTEAD)
    return refused("a Flux.1 single-file checkpoint (original layout)", "give base_model the diffusers folder "
                   "or the cached hub id instead (black-forest-labs/FLUX.1-dev)")


def component_file(keys: list[str]) -> str | None:
    """What a .safetensors file of FluxTransformer2DModel's weights alone is (transformer/ of a diffusers folder,
    recognised by its single-stream blocks), or None."""
    return "Flux.1's transformer" if any(k.startswith("single_transformer_blocks.") for k in keys) else None


def encode(encoders, ids) -> Conditioning:
    """FluxPipeline.encode_prompt: CLIP-L's pooled output (B, 768) and T5's last hidden state (B, 512, 4096)."""
    clip, t5 = encoders
    pooled = clip(ids[0], output_hidden_states=False).pooler_output
    embeds = t5(ids[1], output_hidden_states=False)[0]
    return Conditioning(embeds, pooled)


def forward(transformer, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance):
    """FluxTransformer2DModel on unpacked latents (B, C, h, w): pack 2x2 patches, `timestep = s` (the model
    multiplies by 1000 itself, its guidance input too), text ids zeros, unpack the velocity."""
    b, _, h, w = latents.shape
    dtype = latents.dtype
    out = transformer(
        hidden_states=pack_latents(latents), timestep=sigma.reshape(b).to(dtype),
        guidance=None if guidance is None else torch.full((b,), float(guidance), device=latents.device, dtype=dtype),
        pooled_projections=cond.pooled.to(dtype), encoder_hidden_states=cond.embeds.to(dtype),
        txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=dtype),
        img_ids=latent_image_ids(h, w, latents.device, dtype), return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def components(pipe) -> dict:
    return {"tokenizer_2": pipe.tokenizer_2}


def notes(read) -> list[str]:
    transformer = read("transformer/config.json") or {}
    if transformer.get("guidance_embeds", True):
        return [("guidance-distilled (Flux.1-dev): palp.alpha and palp.beta are the values fed to the model's "
                "guidance embedding, one pass each, no unconditional pass: alpha for the frozen model on the clean "
                "prompt, beta for the personalized model (and its training branch). The embedding was distilled on "
                "about 1 to 5 (FluxPipeline renders at 3.5), so SD's alpha 7.5 would be out of range: the defaults "
                "are alpha 3.5, beta 1.0 (docs/method.md \"Guidance-distilled models\")")]
    return [("real classifier-free guidance (no guidance embedding): alpha and beta are CFG scales, two passes each "
            "as for Stable Diffusion")]


def render_kwargs(scale: float, distilled: bool, negative: str) -> dict:
    """FluxPipeline's guidance keywords: the guidance embedding's value for a distilled model; real CFG
    (`true_cfg_scale`, which needs a negative prompt, "" by default) for a de-distilled one."""
    if distilled:
        return {"guidance_scale": scale, "negative_prompt": None}
    return {"true_cfg_scale": scale, "negative_prompt": negative}


FLOW = FlowSpec(forward=forward, encode=encode, distilled=lambda config: bool(config.get("guidance_embeds", False)),
                default_alpha_beta={"distilled": (3.5, 1.0), "cfg": (7.5, 1.0)}, render_kwargs=render_kwargs,
                t5_prompt="prompt_2")

FAMILY = Family(
    names={"flux": "Flux.1"},
    native_size={"flux": 1024},
    from_index=from_index,
    from_keys=from_keys,
    pipeline_class="FluxPipeline",
    pipeline_kwargs={},
    single_file_kwargs={},
    folders=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    components=components,
    prediction_types=("flow",),
    lora_targets=LORA_TARGETS,
    objective="flow",
    encoders=ENCODERS,
    flow=FLOW,
    defaults={
        "train.learning_rate": (1e-4, ("the AdamW learning rate of ai-toolkit's Flux.1-dev LoRA example "
                                "(config/examples/train_lora_flux_24gb.yaml)")),
        "train.mixed_precision": ("bf16", "Flux.1 is trained and run in bf16 (fp16 overflows in its activations)"),
        "render.steps": (28, "FluxPipeline's default num_inference_steps"),
        "render.scheduler": (FLOW_SCHEDULER_NAMES[0], ("FluxPipeline's flow-matching Euler sampler, the one Flux.1 "
                             "renders with")),
        "render.guidance_scale": (3.5, "FluxPipeline's default guidance_scale (the guidance embedding's value)"),
    },
    notes=notes,
    samplers=FLOW_SCHEDULER_NAMES,
    latent_multiple=lambda config: 2,  # 2x2 latent patches packed into tokens (pack_latents), whatever patch_size says
)
