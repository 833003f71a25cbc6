"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): a rectified-flow MMDiT transformer reading CLIP-L and
CLIP-G (penultimate hidden states side by side, zero-padded to T5's width, and both projected pooled outputs) and
T5 (appended along the sequence); real classifier-free guidance; a static shift of its noise levels. Refused:
few-step distilled variants (SD 3.5 Large Turbo), ControlNet, inpainting and image-to-image pipelines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from palpcompose.choices import FLOW_SCHEDULER_NAMES
from palpcompose.conditioning import Conditioning
from palpcompose.models.family import EncoderSlot, Family, FlowSpec, refused
from palpcompose.models.flux import LORA_TARGETS

ENCODERS = (
    EncoderSlot("text_encoder", "tokenizer", "clip_l", "clip", 77),
    EncoderSlot("text_encoder_2", "tokenizer_2", "clip_g", "clip", 77),
    EncoderSlot("text_encoder_3", "tokenizer_3", "t5", "t5", 256),  # StableDiffusion3Pipeline's max_sequence_length
)


def from_index(name: str, index: dict, unet: dict, read, names: tuple[str, ...]) -> tuple[str, str | None] | None:
    if not name.startswith("StableDiffusion3"):
        return None
    if name != "StableDiffusion3Pipeline":
        return refused(f"a {name} pipeline (not StableDiffusion3Pipeline, the text-to-image model)")
    if any(not (isinstance(index.get(k), list) and index[k] and index[k][0]) for k in ("text_encoder_3",)):
        return refused("a Stable Diffusion 3 folder without its T5 text encoder (text_encoder_3)",
                       "palpcompose trains the three-encoder model")
    # SD 3.5 Large Turbo has SD 3.5 Large's configs: only its name tells it (the hub id, the folder, _name_or_path)
    turbo = next((n for n in names if "turbo" in n.lower()), None)
    if turbo is not None:
        return refused(f"SD 3.5 Large Turbo or another few-step distilled SD 3 (named {turbo!r})",
                       "use SD 3.5 Large or Medium")
    return "Stable Diffusion 3", "sd3"


def from_keys(keys: list[str]) -> tuple[str, str | None] | None:
    if not any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        return None
    return refused("a Stable Diffusion 3 single-file checkpoint (original MMDiT layout)", "give base_model the "
                   "diffusers folder or the cached hub id instead (stabilityai/stable-diffusion-3.5-medium)")


def component_file(keys: list[str]) -> str | None:
    """What a .safetensors file of SD3Transformer2DModel's weights alone is (transformer/ of a diffusers folder:
    joint blocks and a patch embedding, no single-stream blocks as Flux's), or None."""
    if any(k.startswith("transformer_blocks.") for k in keys) and any(k.startswith("pos_embed.") for k in keys) \
            and not any(k.startswith("single_transformer_blocks.") for k in keys):
        return "Stable Diffusion 3's transformer"
    return None


def encode(encoders, ids) -> Conditioning:
    """StableDiffusion3Pipeline.encode_prompt (clip_skip None): both CLIPs' penultimate hidden states side by side,
    zero-padded to T5's width, then T5's last hidden state along the sequence (B, 77 + 256, 4096); pooled: both
    projections side by side (B, 768 + 1280)."""
    clip_l, clip_g, t5 = encoders
    hidden, pooled = [], []
    for encoder, part in ((clip_l, ids[0]), (clip_g, ids[1])):
        out = encoder(part, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    t5_embeds = t5(ids[2])[0]
    clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return Conditioning(torch.cat([clip, t5_embeds], dim=-2), torch.cat(pooled, dim=-1))


def forward(transformer, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance):
    """SD3Transformer2DModel: `timestep = s * 1000` (the scheduler's timesteps); no guidance input (real CFG)."""
    b = latents.shape[0]
    dtype = latents.dtype
    return transformer(hidden_states=latents, timestep=(sigma.reshape(b) * 1000).to(dtype),
                       encoder_hidden_states=cond.embeds.to(dtype), pooled_projections=cond.pooled.to(dtype),
                       return_dict=False)[0]


def components(pipe) -> dict:
    return {"tokenizer_2": pipe.tokenizer_2}


def notes(read) -> list[str]:
    return [("real classifier-free guidance: palp.alpha and palp.beta are CFG scales (two passes each unless 1), as "
            "for Stable Diffusion; noise levels logit-normal with the scheduler's shift "
            f"({(read('scheduler/scheduler_config.json') or {}).get('shift', 1.0)})")]


FAMILY = Family(
    names={"sd3": "Stable Diffusion 3"},
    native_size={"sd3": 1024},
    from_index=from_index,
    from_keys=from_keys,
    pipeline_class="StableDiffusion3Pipeline",
    pipeline_kwargs={},
    single_file_kwargs={},
    folders=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3", "scheduler"),
    components=components,
    prediction_types=("flow",),
    lora_targets=LORA_TARGETS,
    objective="flow",
    encoders=ENCODERS,
    flow=FlowSpec(forward=forward, encode=encode, distilled=lambda config: False,
                  default_alpha_beta={"distilled": (3.5, 1.0), "cfg": (7.5, 1.0)},
                  render_kwargs=lambda scale, distilled, negative: {"guidance_scale": scale,
                                                                    "negative_prompt": negative or None},
                  t5_prompt="prompt_3"),
    defaults={
        "train.learning_rate": (4e-4, ("SD 3's LoRA learning rate in diffusers' train_dreambooth_lora_sd3.py README "
                                "example (README_sd3.md)")),
        "train.mixed_precision": ("bf16", "SD 3 runs in bf16 or fp16; bf16 keeps T5's range"),
        "render.steps": (28, "StableDiffusion3Pipeline's default num_inference_steps"),
        "render.scheduler": (FLOW_SCHEDULER_NAMES[0], ("StableDiffusion3Pipeline's flow-matching Euler sampler, "
                             "the one SD 3 renders with")),
        "render.guidance_scale": (7.0, "StableDiffusion3Pipeline's default guidance_scale"),
    },
    notes=notes,
    samplers=FLOW_SCHEDULER_NAMES,
    latent_multiple=lambda config: int(config.get("patch_size", 2)),  # the transformer cuts latents into patches
)
