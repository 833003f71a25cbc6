"""Tiny random Stable-Diffusion-shaped pipelines built from configs, saved as ordinary diffusers folders: SD-1-like
(epsilon), SD-2-like (v_prediction) and SDXL-like (two CLIP text encoders, the second with a projection; pooled text
and size conditioning in the UNet).

No network: the tokenizer's vocabulary is written here (every printable ASCII character as a byte-level token, plus
the words our test prompts use), so CLIPTokenizer loads from files. Seeded, so every build is identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from palpcompose.toyworld.tokenizer import byte_level_vocab

WORDS = (
    "a", "an", "the", "of", "photo", "painting", "oil", "sketch", "cat", "dog", "rock", "sitting", "on", "in",
    "inspired", "by", "watercolor", "style", "picture", "toy", "cube", "ball", "at", "night", "snow", "sunset", "red",
    "blue", "green",
)


def write_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary: bytes as tokens (so any text encodes), a few whole words, start/end tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    merges: list[str] = []
    for word in WORDS:
        # merge left to right: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tiny_pipeline(folder: str | Path, prediction_type: str = "epsilon", sample_size: int = 8) -> Path:
    """Build and save a tiny SD-1-like (epsilon) or SD-2-like (v_prediction) pipeline. Returns the folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tok"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        num_train_timesteps=1000, steps_offset=1, clip_sample=False,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir)
    return folder


def make_tiny_sdxl_pipeline(folder: str | Path, sample_size: int = 8) -> Path:
    """Build and save a tiny SDXL-architecture pipeline (StableDiffusionXLPipeline). Returns the folder.

    As SDXL base: the UNet reads both encoders' penultimate hidden states side by side (16 + 16 = 32 features) and,
    through `addition_embed_type="text_time"`, the second encoder's projected pooled embedding (16) with the six
    size values (original size, crop, target size) embedded in 8 features each: 16 + 6 * 8 = 64 inputs."""
    import shutil

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "_tok"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    # SDXL's second tokenizer pads with "!" instead of the end token: keep that difference
    tokenizer_2 = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77,
                                pad_token="!")

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=64,
        cross_attention_dim=32, norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=4,
        sample_size=sample_size * 2, scaling_factor=0.13025,
    )
    text_config = {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "hidden_size": 16,
        "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 3, "vocab_size": len(tokenizer),
        "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 16,
    }
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(pad_token_id=tokenizer.pad_token_id, **text_config))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=tokenizer_2.pad_token_id, **text_config))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return folder
