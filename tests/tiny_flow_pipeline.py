"""Tiny random flow-matching pipelines built from configs and saved as ordinary diffusers folders: a Flux.1-like
`FluxPipeline` (guidance-distilled like Flux.1-dev, or with real CFG like a de-distilled Flux) and a Stable-Diffusion-3
-like `StableDiffusion3Pipeline`.

No network: the CLIP vocabulary comes from tests/tiny_pipeline.py, and the T5 tokenizer is made here with the
`tokenizers` library (a Unigram model over printable ASCII characters plus the words our test prompts use, with T5's
`<pad>`=0, `</s>`=1, `<unk>`=2 and the Metaspace pre-tokenizer) and wrapped as a transformers `T5TokenizerFast`.
Seeded, so every build is identical.

Shapes, as in the real models but tiny:
- the VAE has 16 latent channels (as Flux.1 and SD 3) and two blocks, so it downsamples by 2: 32 px images are 16x16
  latents. Flux packs 2x2 latent patches into tokens (64 features, 8x8 = 64 image tokens); SD 3 patchifies in its
  transformer (`patch_size=2`).
- the CLIP encoders have 16 features, T5 has 32 (= the transformers' `joint_attention_dim`). SD 3 puts CLIP-L and
  CLIP-G's hidden states side by side (16 + 16 = 32 features, zero-padded to T5's width) and concatenates its pooled
  projections (16 + 16 = 32 = `pooled_projection_dim`); Flux reads CLIP-L's pooled output (16) and T5's hidden states.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tiny_pipeline import WORDS, write_tokenizer_files

T5_WIDTH = 32  # T5 d_model = the transformers' joint_attention_dim
CLIP_WIDTH = 16


def make_t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast over a Unigram vocabulary built in code: special tokens, one piece per printable ASCII
    character (so any text encodes) and `▁word` pieces for our test words, which win over spelling them out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(chr(c), -5.0) for c in range(33, 127)]
    vocab += [("▁" + word, -1.0) for word in WORDS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=model_max_length,
    )


def _t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1, is_encoder_decoder=False, feed_forward_proj="gated-gelu",
        )
    )


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=CLIP_WIDTH, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu", projection_dim=CLIP_WIDTH, **extra,
    )


def _vae(shift_factor: float, scaling_factor: float, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=16, norm_num_groups=4,
        sample_size=32, shift_factor=shift_factor, scaling_factor=scaling_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def make_tiny_flux_pipeline(folder: str | Path, guidance_embeds: bool = True) -> Path:
    """Build and save a tiny Flux.1-architecture pipeline (FluxPipeline). Returns the folder.

    `guidance_embeds=True` is Flux.1-dev's guidance distillation (the guidance value is an input of the transformer,
    no unconditional pass); False is a model with real classifier-free guidance (a de-distilled Flux; render it with
    `true_cfg_scale` and a negative prompt). The scheduler is Flux.1-dev's: shift 3, resolution-dependent shifting
    between 0.5 at 256 image tokens and 1.15 at 4096."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tok"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    tokenizer_2 = make_t5_tokenizer()

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = _t5_encoder(len(tokenizer_2), seed=1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return folder


def make_tiny_sd3_pipeline(folder: str | Path) -> Path:
    """Build and save a tiny Stable-Diffusion-3-architecture pipeline (StableDiffusion3Pipeline). Returns the folder.

    Three text encoders as SD 3: CLIP-L and CLIP-G (both CLIPTextModelWithProjection; SD 3 reads their penultimate
    hidden states and their projected pooled outputs) and T5. Real classifier-free guidance; the scheduler is SD 3's
    (a static shift of 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tok"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    # SD 3's CLIP-G tokenizer pads with "!" as SDXL's second one does: keep that difference
    tokenizer_2 = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                                pad_token="!")
    tokenizer_3 = make_t5_tokenizer()

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16, pos_embed_max_size=32,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2))
    text_encoder_3 = _t5_encoder(len(tokenizer_3), seed=2)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return folder


def flow_project(root, base_model, **train):
    """A one-subject project on a tiny flow pipeline: two 32-px references, 2 steps, a snapshot every step, rank 4;
    `train` overrides the [train] table (None: leave the key out, so the model's default applies)."""
    from conftest import to_toml, write_test_image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_test_image(root / "refs" / f"{i}.png", seed=i, size=32)
    config = {
        "project": {"name": "fx", "base_model": str(base_model)},
        "subjects": {"V1": {"class_name": "cat", "images": ["refs/*.png"]}},
        "palp": {"target_prompt": "An oil painting of [V1]", "clean_prompt": "An oil painting of a cat"},
        "train": {"resolution": 32, "steps": 2, "save_every": 1, "preview_every": 0, "lora_rank": 4,
                  "learning_rate": 1e-2, "embedding_learning_rate": 1e-2, **train},
        "render": {"seeds": [0], "steps": 2},
    }
    config["train"] = {k: v for k, v in config["train"].items() if v is not None}  # None: the model's default
    (root / "palp.toml").write_text(to_toml(config))
    return root
