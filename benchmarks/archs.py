"""Stable-Diffusion-shaped models with random weights, built from configs: no download, same FLOPs as the real thing.

`tiny` is the size of tests/tiny_pipeline.py (for tests); `toy` the size of `builtin:toy` (the shapes of
tools/toyworld/train_base.py, for CPU figures); `sd15` has the real SD-1.5 UNet, VAE and CLIP-L text encoder
shapes; `sdxl` the real SDXL base shapes (UNet with pooled-text and size conditioning, VAE, CLIP-L and OpenCLIP-bigG
text encoders); `sd15-thin` and `sdxl-thin` their module structure with narrow layers (CPU proxies and smoke tests).
Weights are random, so loss values mean nothing; time and memory are what we measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palpcompose.errors import UserError
from palpcompose.models import LORA_TARGET_MODULES

ARCHS = ("tiny", "toy", "sd15", "sd15-thin", "sdxl", "sdxl-thin")

# The paper's LoRA (method.md, "What is trained"): rank 32 on the attention projections, not on the text encoder.
LORA_TARGETS = LORA_TARGET_MODULES  # the product's list (palpcompose.models)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    unet: dict
    vae: dict
    text: dict
    vae_scale_factor: int  # pixels per latent pixel
    default_resolution: int
    text_2: dict | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection), else None


TINY = ArchSpec(
    name="tiny",
    unet={
        "block_out_channels": (8, 16), "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 16, "attention_head_dim": (2, 4), "norm_num_groups": 4,
    },
    vae={
        "block_out_channels": (8, 16), "in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    },
    text={
        "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 1000,
    },
    vae_scale_factor=2,
    default_resolution=32,
)

TOY = ArchSpec(  # tools/toyworld/train_base.py: build_models (64 px images, 16x16 latents)
    name="toy",
    unet={
        "block_out_channels": (32, 64, 128), "layers_per_block": 1, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 128, "attention_head_dim": 4, "norm_num_groups": 32,
    },
    vae={
        "block_out_channels": (32, 64, 64), "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
    },
    text={
        "hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 3,
        "vocab_size": 683,
    },
    vae_scale_factor=4,
    default_resolution=64,
)

SD15 = ArchSpec(
    name="sd15",
    unet={
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    vae={
        "block_out_channels": (128, 256, 512, 512), "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
    },
    text={
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
    },
    vae_scale_factor=8,
    default_resolution=512,
)


# The CPU proxy for launch overhead: SD-1.5's exact module structure (same blocks, layers, heads, attention layers,
# 12 text layers, 49408-token table), every width divided by 10 or so. Each op does almost no arithmetic, so CPU time
# per step is Python + PyTorch dispatch for the same op sequence a GPU step issues: what a launch-bound GPU step costs.
SD15_THIN = ArchSpec(
    name="sd15-thin",
    unet={**SD15.unet, "block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 64},
    vae={**SD15.vae, "block_out_channels": (32, 32, 64, 64)},
    text={**SD15.text, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "projection_dim": 64},
    vae_scale_factor=8,
    default_resolution=64,
)


# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs): 2.57 B UNet parameters, 128x128 latents at 1024 px;
# cross-attention reads CLIP-L's 768 + bigG's 1280 features, the added embedding bigG's pooled 1280 + 6 x 256 sizes.
SDXL = ArchSpec(
    name="sdxl",
    unet={
        "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
        "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
    },
    vae={**SD15.vae, "scaling_factor": 0.13025},
    text={**SD15.text},
    text_2={
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
        "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu",
    },
    vae_scale_factor=8,
    default_resolution=1024,
)

# SDXL's module structure (blocks, layers, 1/2/10 transformer layers, 12 and 32 text layers) with narrow widths.
SDXL_THIN = ArchSpec(
    name="sdxl-thin",
    unet={**SDXL.unet, "block_out_channels": (16, 32, 64), "attention_head_dim": (2, 4, 8), "cross_attention_dim": 64,
          "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "norm_num_groups": 16},
    vae={**SD15_THIN.vae, "scaling_factor": 0.13025},
    text={**SD15_THIN.text, "hidden_size": 32, "projection_dim": 32, "num_attention_heads": 2},
    text_2={**SDXL.text_2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32},
    vae_scale_factor=8,
    default_resolution=64,
)


def arch_spec(name: str) -> ArchSpec:
    specs = {"tiny": TINY, "toy": TOY, "sd15": SD15, "sd15-thin": SD15_THIN, "sdxl": SDXL, "sdxl-thin": SDXL_THIN}
    if name not in specs:
        raise UserError(f"--arch {name!r}: unknown architecture; choose one of {', '.join(ARCHS)}")
    return specs[name]


WORDS = ["a", "an", "the", "of", "photo", "painting", "oil", "cat", "sitting", "on", "rock", "inspired", "by"]


def make_tokenizer(spec: ArchSpec, folder):
    """A CLIP BPE tokenizer whose vocabulary has exactly the text encoder's size (49408 for SD-1.5): the byte-level
    alphabet, a few whole words, filler entries, then BOS and EOS, as CLIP's. Written to `folder`, no download."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    alphabet = [chr(i) for i in range(ord("!"), ord("~") + 1)]
    for ch in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in WORDS:  # merge left to right: c a t</w> -> ca t</w> -> cat</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    size = spec.text["vocab_size"]
    for i in range(len(vocab), size - 2):
        vocab[f"<filler{i}>"] = i
    vocab["<|startoftext|>"] = size - 2
    vocab["<|endoftext|>"] = size - 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@dataclass
class Models:
    """Freshly initialised fp32 components on `device` (no adapter, nothing frozen yet)."""

    spec: ArchSpec
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: object  # a diffusers DDPMScheduler with SD's training schedule
    text_encoder_2: torch.nn.Module | None = None  # SDXL's CLIPTextModelWithProjection

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]


def build(spec: ArchSpec, device: str | torch.device, seed: int = 0) -> Models:
    """Random-weight UNet, VAE, text encoder and the SD noise schedule; identical for identical seeds."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Build directly on the device: initialising 1.1 B parameters on the CPU alone takes longer than the benchmark.
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=spec.default_resolution // spec.vae_scale_factor, **spec.unet)
        torch.manual_seed(seed)
        vae = AutoencoderKL(sample_size=spec.default_resolution, **spec.vae)
        torch.manual_seed(seed)
        vocab = spec.text["vocab_size"]  # CLIP's tokenizer: BOS and EOS are the last two ids, padding is EOS
        ids = {"max_position_embeddings": 77, "bos_token_id": vocab - 2, "eos_token_id": vocab - 1,
               "pad_token_id": vocab - 1}
        text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **spec.text))
        text_encoder_2 = None
        if spec.text_2 is not None:
            torch.manual_seed(seed + 1)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **spec.text_2))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    return Models(spec, unet, vae, text_encoder, scheduler, text_encoder_2)


def prepare_for_reference(m: Models, dtype: torch.dtype, lora_rank: int = 32,
                          seed: int = 0) -> list[torch.nn.Parameter]:
    """As diffusers' train_dreambooth_lora.py: freeze all, frozen weights in `dtype`, LoRA on the UNet in fp32.
    Returns the trainable parameters."""
    from peft import LoraConfig

    for module in (m.unet, m.vae, *m.text_encoders):
        module.requires_grad_(False)
        module.to(dtype=dtype)
        module.eval()
    torch.manual_seed(seed)
    m.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                  target_modules=LORA_TARGETS))
    params = [p for p in m.unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def random_prompt_ids(spec: ArchSpec, batch: int, seed: int, device) -> torch.Tensor:
    """Token ids of a seven-word prompt: BOS, words, EOS padding to 77, as CLIP's tokenizer pads: (B, 77)."""
    g = torch.Generator().manual_seed(seed)
    vocab = spec.text["vocab_size"]
    ids = torch.full((batch, 77), vocab - 1, dtype=torch.long)
    ids[:, 0] = vocab - 2
    ids[:, 1:8] = torch.randint(0, vocab - 2, (batch, 7), generator=g)
    return ids.to(device)


# --- Flow-matching models (issue 21): the published configs, as facts, for benchmarks/flow_memory.py --------------
#
# Built on the meta device only (shapes, no weights): these are 2.5-12 B parameter models. Each dict is the model's
# published diffusers `config.json` (the fields that set shapes), read through the project's search tool:
# - black-forest-labs/FLUX.1-dev: transformer/config.json (FluxTransformer2DModel: 19 double-stream + 38
#   single-stream blocks, 24 heads x 128 = 3072 wide, T5 features 4096, CLIP pooled 768, guidance_embeds true),
#   vae/config.json (AutoencoderKL, 16 latent channels, shift 0.1159, scale 0.3611, no quant convs),
#   text_encoder (CLIP ViT-L/14 text tower, CLIPTextModel) and text_encoder_2 (T5 v1.1 XXL encoder, T5EncoderModel:
#   24 layers, d_model 4096, d_ff 10240, 64 heads x 64, gated-gelu, vocabulary 32128); FluxPipeline's T5
#   max_sequence_length is 512.
# - stabilityai/stable-diffusion-3.5-large and -medium: transformer/config.json (SD3Transformer2DModel; large:
#   38 joint blocks, 38 heads x 64 = 2432 wide, no dual attention; medium: 24 blocks, 24 heads x 64 = 1536 wide,
#   MMDiT-X dual attention in blocks 0-12, positions up to 384), both with qk_norm rms_norm, joint_attention_dim 4096,
#   pooled 2048, patch 2; text_encoder CLIP-L and text_encoder_2 OpenCLIP bigG (both CLIPTextModelWithProjection),
#   text_encoder_3 T5 v1.1 XXL as Flux's; StableDiffusion3Pipeline's T5 max_sequence_length is 256 (77 CLIP + 256 T5
#   tokens reach the transformer). The VAE is Flux's shape with shift 0.0609, scale 1.5305.

FLOW_ARCHS = ("flux1-dev", "sd35-medium", "sd35-large")


@dataclass(frozen=True)
class FlowArchSpec:
    name: str
    transformer_class: str  # "FluxTransformer2DModel" | "SD3Transformer2DModel"
    transformer: dict
    vae: dict
    clip_l: dict  # CLIPTextConfig fields
    t5: dict  # T5Config fields (encoder only)
    t5_max_length: int  # the pipeline's max_sequence_length: T5 tokens the transformer reads
    guidance: str  # "embedded" (guidance-distilled: one frozen pass) | "cfg" (real CFG: cond + uncond)
    clip_g: dict | None = None  # SD 3's second CLIP (with projection)
    clip_with_projection: bool = False  # SD 3 reads CLIP-L's projected pooled output (CLIPTextModelWithProjection)
    vae_scale_factor: int = 8
    default_resolution: int = 1024

    @property
    def image_tokens_per_side(self) -> int:
        """Transformer tokens along one side per 16 pixels: Flux packs 2x2 latents, SD 3 patchifies by 2."""
        return 16


CLIP_L = {  # openai/clip-vit-large-patch14's text tower, as Flux.1 and SD 3 ship it
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu", "max_position_embeddings": 77,
}
CLIP_G = {  # OpenCLIP ViT-bigG/14's text tower (SDXL's text_encoder_2, SD 3's text_encoder_2)
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77,
}
T5_XXL = {  # google/t5-v1_1-xxl's encoder, as FLUX.1-dev text_encoder_2 and SD 3.5 text_encoder_3
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
}
FLOW_VAE = {  # FLUX.1-dev and SD 3.5 vae/config.json shapes (16 latent channels, 8x down)
    "block_out_channels": (128, 256, 512, 512), "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}

FLUX1_DEV = FlowArchSpec(
    name="flux1-dev",
    transformer_class="FluxTransformer2DModel",
    transformer={
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    vae={**FLOW_VAE, "shift_factor": 0.1159, "scaling_factor": 0.3611},
    clip_l=CLIP_L,
    t5=T5_XXL,
    t5_max_length=512,
    guidance="embedded",
)

_SD35 = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
    "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "qk_norm": "rms_norm",
}
SD35_LARGE = FlowArchSpec(
    name="sd35-large",
    transformer_class="SD3Transformer2DModel",
    transformer={**_SD35, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                 "pos_embed_max_size": 192, "dual_attention_layers": ()},
    vae={**FLOW_VAE, "shift_factor": 0.0609, "scaling_factor": 1.5305},
    clip_l=CLIP_L,
    clip_g=CLIP_G,
    clip_with_projection=True,
    t5=T5_XXL,
    t5_max_length=256,
    guidance="cfg",
)
SD35_MEDIUM = FlowArchSpec(
    name="sd35-medium",
    transformer_class="SD3Transformer2DModel",
    transformer={**_SD35, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                 "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13))},
    vae=SD35_LARGE.vae,
    clip_l=CLIP_L,
    clip_g=CLIP_G,
    clip_with_projection=True,
    t5=T5_XXL,
    t5_max_length=256,
    guidance="cfg",
)


def flow_arch_spec(name: str) -> FlowArchSpec:
    specs = {"flux1-dev": FLUX1_DEV, "sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE}
    if name not in specs:
        raise UserError(f"--arch {name!r}: unknown flow architecture; choose one of {', '.join(FLOW_ARCHS)}")
    return specs[name]
