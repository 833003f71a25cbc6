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


def _config(**overrides):
    """A GuidanceConfig with every field given (it has no defaults): the method's PALP settings, then overrides."""
    fields = {"mode": "palp", "alpha": 7.5, "beta": 1.0, "weight": 1.0, "same_noise": True, "rescale": True}
    from palpcompose.guidance import GuidanceConfig

    return GuidanceConfig(**{**fields, **overrides})


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


# --- one PALP step on the real (tiny) transformers: how the training step calls flow_guidance --------------------


def _flux_velocity(transformer, latents, sigma, cond, guidance):
    """FluxTransformer2DModel on unpacked latents (B, C, H, W): pack 2x2 patches, give it `timestep = s` (it
    multiplies by 1000 itself) and the guidance value (distilled models only), unpack the velocity."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    embeds, pooled, text_ids = cond
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w), timestep=sigma.reshape(b),
        guidance=None if guidance is None else torch.full((b,), float(guidance)),
        pooled_projections=pooled.expand(b, -1), encoder_hidden_states=embeds.expand(b, -1, -1), txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 2, w * 2, vae_scale_factor=2)  # the tiny VAE downsamples by 2


def _sd3_velocity(transformer, latents, sigma, cond, guidance):
    """SD3Transformer2DModel: `timestep = s * 1000`; no guidance input (real CFG)."""
    embeds, pooled = cond
    b = latents.shape[0]
    return transformer(hidden_states=latents, timestep=sigma.reshape(b) * 1000,
                       encoder_hidden_states=embeds.expand(b, -1, -1), pooled_projections=pooled.expand(b, -1),
                       return_dict=False)[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_one_palp_step_on_the_tiny_transformer(family, flux_dir, sd3_dir):
    """Flow steps 1 to 7 with the real transformer and a LoRA: the alignment gradient on the LoRA equals the one of
    -mean(r * v_hat) (Eq. 7 through the personalization branch only), the frozen weights get none, and the frozen
    branch is the base model (adapter disabled)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig

    from palpcompose.flow_guidance import (
        VELOCITY,
        add_noise,
        expand_sigma,
        flow_loss,
        guided_velocity,
        predict_x0,
        renoise,
        sample_sigmas,
    )
    from palpcompose.guidance import PalpGuidance

    if family == "flux":
        pipe, velocity, distilled = _load(FluxPipeline, flux_dir), _flux_velocity, True
        encode = lambda p: pipe.encode_prompt(p, device="cpu", max_sequence_length=16)
        config = _config(alpha=3.5, beta=1.0)
    else:
        pipe, velocity, distilled = _load(StableDiffusion3Pipeline, sd3_dir), _sd3_velocity, False
        encode = lambda p: pipe.encode_prompt(p, p, p, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=16)[0::2]
        config = _config(alpha=7.5, beta=1.0)
    transformer = pipe.transformer
    prompts = {"personal": encode("a photo of a cat"), "clean": encode("an oil painting of a cat"), "empty": encode("")}
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    sigma = expand_sigma(sample_sigmas(2, generator=g, shift=3.0), 4)
    with torch.no_grad():
        base_before = velocity(transformer, x0, sigma, prompts["clean"], 3.5 if distilled else None)

    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = [p for p in transformer.parameters() if p.requires_grad]

    def predict(latents, *, adapter, prompt, guidance):
        (transformer.enable_adapters if adapter else transformer.disable_adapters)()
        try:
            return velocity(transformer, latents, sigma, prompts[prompt], guidance).float()
        finally:
            transformer.enable_adapters()

    def denoise(latents, *, adapter, prompt, scale):
        return guided_velocity(lambda lat, **kw: predict(lat, adapter=adapter, **kw), latents, prompt=prompt,
                               scale=scale, distilled=distilled)

    with torch.no_grad():  # the frozen branch is the base model
        assert torch.allclose(predict(x0, adapter=False, prompt="clean", guidance=3.5 if distilled else None),
                              base_before, atol=1e-6)

    x_t = add_noise(x0, eps, sigma)  # flow step 1
    v_hat = predict(x_t, adapter=True, prompt="personal", guidance=config.beta if distilled else None)  # step 2
    loss_pers = flow_loss(v_hat, x0, eps)
    x0_hat = predict_x0(x_t, v_hat, sigma)  # step 3
    terms = PalpGuidance(config, VELOCITY)(x0_hat=x0_hat, noise=eps, level=sigma, denoise=denoise)  # 4 to 6
    grad_align = torch.autograd.grad(terms["loss_align"], lora, retain_graph=True)

    with torch.no_grad():  # r again, by hand
        x0_hat_t = renoise(x0_hat, sigma, eps)
        r = denoise(x0_hat_t, adapter=False, prompt="clean", scale=config.alpha) - denoise(
            x0_hat_t, adapter=True, prompt="personal", scale=config.beta)
    expected = torch.autograd.grad(-(r * v_hat).mean(), lora, retain_graph=True)
    assert any(e.abs().max() > 0 for e in expected)
    for got, want in zip(grad_align, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)

    (loss_pers + terms["loss_align"]).backward()  # step 7's backward: LoRA only
    assert all(p.grad is not None for p in lora)
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)
