"""The tiny flow-matching pipelines of tests/tiny_flow_pipeline.py are ordinary diffusers folders (issue 21): the real
pipeline classes load them offline and render, and a LoRA saved in the diffusers format loads back and changes the
output exactly as the in-memory adapter does."""

import json

import numpy as np
import pytest
import torch
from tiny_flow_pipeline import make_t5_tokenizer, make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe", guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_cfg_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux-cfg") / "pipe", guidance_embeds=False)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipe")


def _load(cls, folder):
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, **kwargs):
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


def test_t5_tokenizer_made_in_code_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = make_t5_tokenizer()
    ids = tok("a photo of xyz").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁photo", "▁of"]  # whole words, unknown words spelled out
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a photo of xyz").input_ids == ids


def test_flux_folder_loads_offline_and_renders(flux_dir, flux_cfg_dir):
    from diffusers import FluxPipeline

    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    distilled = _load(FluxPipeline, flux_dir)
    assert distilled.transformer.config.guidance_embeds and distilled.vae.config.latent_channels == 16
    a = _render(distilled, guidance_scale=3.5)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert not np.allclose(a, _render(distilled, guidance_scale=1.0))  # the guidance value is an input

    real_cfg = _load(FluxPipeline, flux_cfg_dir)
    assert not real_cfg.transformer.config.guidance_embeds
    plain = _render(real_cfg)
    guided = _render(real_cfg, negative_prompt="", true_cfg_scale=4.0)  # a second, unconditional pass
    assert plain.shape == guided.shape == (1, 32, 32, 3) and not np.allclose(plain, guided)


def test_sd3_folder_loads_offline_and_renders(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = _load(StableDiffusion3Pipeline, sd3_dir)
    assert pipe.transformer.config.pooled_projection_dim == 32 and pipe.scheduler.config.shift == 3.0
    images = _render(pipe, guidance_scale=5.0)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert not np.allclose(images, _render(pipe, guidance_scale=1.0))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_format_lora_loads_back_and_changes_the_output(family, flux_dir, sd3_dir, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    cls, folder = (FluxPipeline, flux_dir) if family == "flux" else (StableDiffusion3Pipeline, sd3_dir)
    pipe = _load(cls, folder)
    base = _render(pipe)
    torch.manual_seed(0)  # random B matrices, so the adapter is not a no-op
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapted = _render(pipe)
    cls.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)

    fresh = _load(cls, folder)
    fresh.load_lora_weights(tmp_path)
    loaded = _render(fresh)
    assert np.abs(loaded - base).max() > 1e-4  # the LoRA changes the output ...
    assert np.allclose(loaded, adapted, atol=1e-6)  # ... exactly as the adapter it was saved from
