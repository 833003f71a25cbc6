"""The speed levers (benchmarks/accel.py) must not change the math of the training step.

Each test runs the engine's `training_step` on the tiny random-weight model twice from identical seeds, once plain
and once with one lever, and compares losses and gradients (captured before the optimizer consumes them) or the
weights after a few steps. CUDA graphs cannot run on the CPU: their test is marked `gpu`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import accel, archs
from benchmarks.ours import make_engine_step
from palpcompose import train
from palpcompose.conditioning import Conditioning
from palpcompose.guidance import cfg

RESOLUTION = 16  # tiny VAE: 8x8 latents


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one intra-op thread


def engine(tmp_path, opts=None, mode="palp", alpha=7.5, beta=1.0, batch=1, device="cpu", low_memory=False,
           mixed_precision="no", lr=None):
    """A fresh tiny engine state and its step; LoRA B matrices randomised so the adapter changes the output."""
    opts = opts or accel.AccelOptions()
    m = archs.build(archs.TINY, device, seed=0)
    tokenizer = archs.make_tokenizer(archs.TINY, tmp_path / "tok")
    pixels = torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    state, step = make_engine_step(m, tokenizer, mode, opts, pixels.to(device), alpha=alpha, beta=beta,
                                   low_memory=low_memory, mixed_precision=mixed_precision)
    if lr is not None:  # large steps: a replay that read stale weights would show at once
        for group in state.optimizer.param_groups:
            group["lr"] = lr
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in state.lora_params:  # peft's gaussian init leaves B = 0, i.e. G_lora == G_base
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return state, step


def capture_grads(state) -> list[list[torch.Tensor]]:
    """Per trainable tensor (LoRA weights, then the placeholder rows), its gradient after each backward pass.
    Recorded by a hook, because the step zeroes gradients before it returns."""
    params = state.lora_params + [state.token_embedding.rows]
    grads: list[list[torch.Tensor]] = [[] for _ in params]
    for p, record in zip(params, grads):
        p.register_post_accumulate_grad_hook(lambda p, record=record: record.append(p.grad.detach().clone()))
    return grads


def assert_same_step(tmp_path, opts: accel.AccelOptions, steps=1, rtol=1e-4, atol=1e-6, low_memory=False):
    """`steps` steps plain and with `opts` from identical seeds: same losses, same gradients. Returns both states."""
    plain, plain_step = engine(tmp_path / "a")
    fast, fast_step = engine(tmp_path / "b", opts, low_memory=low_memory)
    plain_grads, fast_grads = capture_grads(plain), capture_grads(fast)
    for _ in range(steps):
        losses_plain, losses_fast = plain_step(), fast_step()
        assert losses_plain.keys() == losses_fast.keys()
        for key in losses_plain:
            assert losses_fast[key] == pytest.approx(losses_plain[key], rel=rtol, abs=atol), key
    assert len(plain_grads) == len(fast_grads) == len(plain.lora_params) + 1
    for per_step_plain, per_step_fast in zip(plain_grads, fast_grads):
        assert len(per_step_plain) == len(per_step_fast) == steps
        for a, b in zip(per_step_plain, per_step_fast):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    return plain, fast


def test_palp_step_has_an_alignment_gradient(tmp_path):
    """Guard for the tests below: the alignment term reaches the LoRA gradients, so comparing them means something."""
    with_palp, palp_step = engine(tmp_path / "a", mode="palp")
    without, none_step = engine(tmp_path / "b", mode="none")
    grads_palp, grads_none = capture_grads(with_palp), capture_grads(without)
    losses = palp_step()
    none_step()
    assert losses["loss_align"] != 0
    assert not torch.allclose(grads_palp[0][0], grads_none[0][0])  # a LoRA weight's first gradient


def test_channels_last_matches_eager(tmp_path):
    _, fast = assert_same_step(tmp_path, accel.AccelOptions(channels_last=True))
    conv = next(mod for mod in fast.components.unet.modules() if isinstance(mod, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_sdpa_math_backend_matches_default(tmp_path):
    assert_same_step(tmp_path, accel.AccelOptions(sdpa_backend="math"))


def test_fused_adamw_matches_foreach(tmp_path):
    plain, fast = assert_same_step(tmp_path, accel.AccelOptions(fused_adamw=True), steps=2)
    assert fast.optimizer.optimizer.defaults["fused"] and not plain.optimizer.optimizer.defaults["fused"]
    # The updates agree too: same LoRA weights and placeholder row after the two steps.
    for a, b in zip(plain.lora_params, fast.lora_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast.token_embedding.rows, plain.token_embedding.rows, rtol=1e-5, atol=1e-7)


def test_low_memory_setup_matches_eager(tmp_path):
    """Gradient checkpointing recomputes activations in backward; the VAE leaves the device: same step."""
    _, fast = assert_same_step(tmp_path, accel.AccelOptions(), low_memory=True)
    assert fast.components.unet.is_gradient_checkpointing


def test_rebuild_adamw_refuses_a_used_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="already stepped"):
        accel.rebuild_adamw(opt, fused=False)


def test_batched_cfg_pass_matches_separate_passes(tmp_path):
    """make_denoiser's single batched (uncond, cond) pass equals two separate UNet passes combined by CFG."""
    state, _ = engine(tmp_path, batch=2)
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


@pytest.mark.gpu
@pytest.mark.parametrize("mixed_precision, tol", [("no", 1e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("opts, graphs", [
    (accel.AccelOptions(cuda_graphs=True), 2),  # one frozen-model pass with CFG, one personalized pass without
    (accel.AccelOptions(graph_personalization=True), 0),
    (accel.AccelOptions(cuda_graphs=True, graph_personalization=True, fused_adamw=True), 2),
])
def test_cuda_graphs_match_eager_on_gpu(tmp_path, opts, graphs, mixed_precision, tol):
    """Graphed and eager steps agree over 4 steps with a large learning rate (the weights move a lot between
    replays), in fp32 and under bf16 autocast (where a stale cached cast would show)."""
    plain, plain_step = engine(tmp_path / "a", device="cuda", mixed_precision=mixed_precision, lr=1e-2)
    fast, fast_step = engine(tmp_path / "b", opts, device="cuda", mixed_precision=mixed_precision, lr=1e-2)
    plain_grads, fast_grads = capture_grads(plain), capture_grads(fast)
    for _ in range(4):  # the first step captures the graphs, the later ones replay them
        losses_plain, losses_fast = plain_step(), fast_step()
        for key in losses_plain:
            assert losses_fast[key] == pytest.approx(losses_plain[key], rel=tol, abs=tol * 1e-2), key
    graphed = fast.unet  # accel.GraphedTrainingUNet, installed by make_engine_step
    assert len(graphed.graphs.graphs if graphed.graphs else ()) == graphs
    assert len(graphed.graphed_pass.graphed if graphed.graphed_pass else ()) == int(opts.graph_personalization)
    for per_step_plain, per_step_fast in zip(plain_grads, fast_grads):
        assert len(per_step_fast) == 4
        for a, b in zip(per_step_plain, per_step_fast):  # cuDNN/cuBLAS kernels may differ in the last bits
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-2)


def test_placeholder_rows_match_the_masked_full_table_update(tmp_path):
    """Training the placeholder rows as their own parameter (train.PlaceholderEmbedding) is the same math as the
    earlier update of the whole table with every other row's gradient masked and restored: same text embeddings,
    same row gradients, same clipped AdamW steps, and the other rows untouched."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from palpcompose import models

    def text_encoder():
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **archs.TINY.text)).eval()
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
