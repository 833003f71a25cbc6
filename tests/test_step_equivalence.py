"""The training step's equivalences: what a setting or an implementation choice must not change.

The low-memory preset (gradient checkpointing, the VAE off the device) gives the same step; the frozen-model pass
batched as (uncond, cond) equals two separate passes combined by CFG; training the placeholder rows as their own
parameter is the same math as the masked update of the whole table. Tiny projects on the tiny pipeline
(tests/tiny_pipeline.py), from identical seeds. (benchmarks/accel.py's levers: tests/test_benchmarks_accel.py.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import capture_grads, prepared_state, step_runner

from palpcompose import train
from palpcompose.conditioning import Conditioning
from palpcompose.guidance import cfg

RESOLUTION = 16  # tiny VAE: 8x8 latents
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
             "vocab_size": 1000}  # a tiny CLIP text encoder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one intra-op thread


def engine(make_project, name, mode="palp", batch=1, low_memory=False):
    """A fresh tiny project's state and its step; LoRA weights randomised so the adapter changes the output."""
    root = make_project({"train": {"batch_size": batch, "low_memory": low_memory}}, dirname=name)
    state, subjects = prepared_state(root, mode)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in state.lora_params:  # peft's gaussian init leaves B = 0, i.e. G_lora == G_base
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return state, step_runner(state, subjects, batch)


def test_palp_step_has_an_alignment_gradient(make_project):
    """Guard for the tests below: the alignment term reaches the LoRA gradients, so comparing them means something."""
    with_palp, palp_step = engine(make_project, "a", mode="palp")
    without, none_step = engine(make_project, "b", mode="none")
    grads_palp, grads_none = capture_grads(with_palp), capture_grads(without)
    losses = palp_step()
    none_step()
    assert losses["loss_align"] != 0
    assert not torch.allclose(grads_palp[0][0], grads_none[0][0])  # a LoRA weight's first gradient


def test_low_memory_setup_matches_eager(make_project):
    """Gradient checkpointing recomputes activations in backward; the VAE leaves the device: same step."""
    plain, plain_step = engine(make_project, "a")
    fast, fast_step = engine(make_project, "b", low_memory=True)
    plain_grads, fast_grads = capture_grads(plain), capture_grads(fast)
    losses_plain, losses_fast = plain_step(), fast_step()
    assert losses_plain.keys() == losses_fast.keys()
    for key in losses_plain:
        assert losses_fast[key] == pytest.approx(losses_plain[key], rel=1e-4, abs=1e-6), key
    assert len(plain_grads) == len(fast_grads) == len(plain.lora_params) + 1
    for a, b in zip(plain_grads, fast_grads, strict=True):
        assert len(a) == len(b) == 1
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-6)
    assert fast.components.unet.is_gradient_checkpointing
    assert not plain.components.unet.is_gradient_checkpointing


def test_batched_cfg_pass_matches_separate_passes(make_project):
    """make_denoiser's single batched (uncond, cond) pass equals two separate UNet passes combined by CFG."""
    state, _ = engine(make_project, "cfg", batch=2)
    unet = state.components.unet
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g)
    timesteps = torch.tensor([10, 900])
    abar_t = state.components.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    personal = torch.randn(2, 77, state.null_embeds.shape[-1], generator=g)
    denoise = train.make_denoiser(state, timesteps, abar_t, Conditioning(personal))
    for adapter, prompt, scale in [(False, "clean", 7.5), (True, "personal", 3.0), (True, "personal", 1.0)]:
        with torch.no_grad():
            batched = denoise(latents, adapter=adapter, prompt=prompt, scale=scale)
            cond_embeds = state.clean_embeds.expand(2, -1, -1) if prompt == "clean" else personal
            with train.adapters(unet, adapter):
                cond = unet(latents, timesteps, cond_embeds).sample
                uncond = unet(latents, timesteps, state.null_embeds.expand(2, -1, -1)).sample
            with train.adapters(unet, not adapter):
                other = unet(latents, timesteps, cond_embeds).sample
        expected = cond if scale == 1.0 else cfg(uncond, cond, scale)
        torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(other, cond, atol=1e-4)  # the adapter state matters, so the check above is sharp


def test_placeholder_rows_match_the_masked_full_table_update(tmp_path):
    """Training the placeholder rows as their own parameter (train.PlaceholderEmbedding) is the same math as the
    earlier update of the whole table with every other row's gradient masked and restored: same text embeddings,
    same row gradients, same clipped AdamW steps, and the other rows untouched."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from palpcompose import models

    def text_encoder():
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **TINY_TEXT)).eval()
        models.freeze(model)
        model.resize_token_embeddings(1002, mean_resizing=False)  # two placeholder tokens appended
        return model

    ids = torch.tensor([[998, 1000, 5, 1001, 999] + [999] * 72, [998, 7, 1001, 1001, 999] + [999] * 72])
    target = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(0))
    lora = [torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(1))) for _ in range(2)]

    def loss_of(model, lora_now):  # a LoRA-like term so clipping sees both parameter groups
        return (model(ids)[0] - target).pow(2).mean() + sum(p.pow(2).sum() for p in lora_now) * 10

    dense = text_encoder()
    table = dense.get_input_embeddings().weight
    table.requires_grad_(True)
    original = table.detach().clone()
    frozen = torch.ones(1002, dtype=torch.bool)
    frozen[[1000, 1001]] = False
    dense_lora = [torch.nn.Parameter(p.detach().clone()) for p in lora]
    dense_opt = torch.optim.AdamW([{"params": dense_lora}, {"params": [table], "lr": 1e-2, "weight_decay": 0.0}])

    spliced = text_encoder()
    rows = train.train_placeholder_rows(spliced, {"V1": 1000, "V2": 1001})
    rows_lora = [torch.nn.Parameter(p.detach().clone()) for p in lora]
    rows_opt = torch.optim.AdamW([{"params": rows_lora}, {"params": [rows.rows], "lr": 1e-2, "weight_decay": 0.0}])

    for _ in range(3):
        loss_dense, loss_rows = loss_of(dense, dense_lora), loss_of(spliced, rows_lora)
        torch.testing.assert_close(loss_rows, loss_dense, rtol=1e-6, atol=0)
        loss_dense.backward()
        loss_rows.backward()
        table.grad[frozen] = 0  # the old update: mask every other row's gradient...
        torch.testing.assert_close(rows.rows.grad, table.grad[1000:], rtol=1e-6, atol=1e-9)
        norm_dense = torch.nn.utils.clip_grad_norm_(dense_lora + [table], 0.01)
        norm_rows = torch.nn.utils.clip_grad_norm_(rows_lora + [rows.rows], 0.01)
        torch.testing.assert_close(norm_rows, norm_dense, rtol=1e-6, atol=0)
        assert norm_rows > 0.01  # the clip is active, so the norms' agreement matters
        for opt in (dense_opt, rows_opt):
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # ...and restore the other rows after the step
            table[frozen] = original[frozen]
        torch.testing.assert_close(rows.full_table(), table.detach(), rtol=1e-6, atol=1e-8)
    assert not torch.equal(rows.rows.detach(), original[1000:])  # the rows did move
    assert torch.equal(rows.table.weight, original)  # the spliced model's table was never written
