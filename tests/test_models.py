"""palpcompose.models: placeholder tokens, LoRA (fp32, adapter on/off), attention choice, on the tiny pipeline."""

import pytest
import torch

from palpcompose import models
from palpcompose.errors import UserError
from palpcompose.train import adapters


@pytest.fixture
def components(tiny_pipeline_dir):
    return models.load_components(models.resolve_base_model(str(tiny_pipeline_dir)))


def test_components_read_the_schedule_from_the_model(components, tiny_vpred_pipeline_dir):
    assert components.prediction_type == "epsilon"
    expected = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    assert torch.allclose(components.alphas_cumprod, expected, atol=1e-6)
    v = models.load_components(models.resolve_base_model(str(tiny_vpred_pipeline_dir)))
    assert v.prediction_type == "v_prediction"


def test_placeholder_tokens_initialised_from_class_word_and_multi_token_mean(components):
    c = components
    table_before = c.text_encoder.get_input_embeddings().weight.detach().clone()
    tokens = {"V1": "<p-v1>", "V2": "<p-v2>"}
    ids = models.add_placeholder_tokens(c.tokenizer, c.text_encoder, tokens, {"V1": "cat", "V2": "zq"})
    table = c.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == table_before.shape[0] + 2
    assert torch.equal(table[: table_before.shape[0]], table_before)  # nothing else moved
    cat_ids = c.tokenizer.encode("cat", add_special_tokens=False)
    assert len(cat_ids) == 1 and torch.equal(table[ids["V1"]], table_before[cat_ids[0]])
    zq_ids = c.tokenizer.encode("zq", add_special_tokens=False)
    assert len(zq_ids) == 2  # not a word of the tiny vocabulary: two byte tokens, so the mean is used
    assert torch.allclose(table[ids["V2"]], table_before[zq_ids].mean(0))
    # the tokenizer lowercases text, and the tokens it stores are lowercase: a prompt finds them
    assert c.tokenizer("a photo of <P-V1>", add_special_tokens=False).input_ids[-1] == ids["V1"]
    with pytest.raises(UserError, match="already exists"):
        models.add_placeholder_tokens(c.tokenizer, c.text_encoder, {"V1": "<p-v1>"}, {"V1": "cat"})


def test_lora_is_fp32_and_the_frozen_branch_runs_without_it(components):
    c = components
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    emb = torch.randn(1, 77, 16, generator=g)
    with torch.no_grad():
        base_out = c.unet(x, t, emb).sample
    models.freeze(c.unet)
    params = models.add_lora(c.unet, rank=4, lora_alpha=4)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in c.unet.named_parameters() if "lora" not in n)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=g)  # peft starts B at zero; make the adapter matter
        lora_out = c.unet(x, t, emb).sample
        with adapters(c.unet, enabled=False):
            frozen_out = c.unet(x, t, emb).sample
        back_on = c.unet(x, t, emb).sample
    assert (lora_out - base_out).abs().max() > 1e-3  # the adapter changes the output measurably
    assert torch.allclose(frozen_out, base_out, atol=1e-6)  # adapter off: the pre-trained model exactly
    assert torch.equal(back_on, lora_out)  # and it is back on afterwards
    state = models.lora_state_dict(c.unet)
    assert state and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in state)
    assert any(".to_out.0.lora_A" in k for k in state) and any(".attn2.to_k.lora_A" in k for k in state)


def test_attention_auto_falls_back_to_sdpa_quietly_unless_xformers_fails(components, monkeypatch):
    import importlib.util

    from diffusers.models.attention_processor import AttnProcessor2_0

    assert models.set_attention(components.unet, "auto", "cpu") == ""  # the normal case: nothing to say
    assert all(isinstance(p, AttnProcessor2_0) for p in components.unet.attn_processors.values())
    # xformers installed but unable to run on this CUDA setup (measured on the H100): SDPA, and a notice saying why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else None)

    def broken():
        raise RuntimeError("no kernels for this torch")

    monkeypatch.setattr(components.unet, "enable_xformers_memory_efficient_attention", broken)
    notice = models.set_attention(components.unet, "auto", "cuda")
    assert "xformers is installed but does not run here" in notice and "SDPA" in notice
    assert all(isinstance(p, AttnProcessor2_0) for p in components.unet.attn_processors.values())
    assert models.set_attention(components.unet, "sdpa", "cpu") == ""
    with pytest.raises(UserError, match="xformers"):
        models.set_attention(components.unet, "xformers", "cpu")
