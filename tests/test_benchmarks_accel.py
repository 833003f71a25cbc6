"""The speed levers (benchmarks/accel.py) must not change the math of the training step.

Each test runs the engine's `training_step` on the tiny random-weight model (benchmarks/ours.py) twice from identical
seeds, once plain and once with one lever, and compares losses and gradients (captured before the optimizer consumes
them) or the weights after a few steps. CUDA graphs cannot run on the CPU: their test is marked `gpu`. The product's
own equivalences (low_memory, the batched CFG pass, the placeholder rows) are in tests/test_step_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import capture_grads

from benchmarks import accel, archs
from benchmarks.ours import make_engine_step

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


def assert_same_step(tmp_path, opts: accel.AccelOptions, steps=1, rtol=1e-4, atol=1e-6):
    """`steps` steps plain and with `opts` from identical seeds: same losses, same gradients. Returns both states."""
    plain, plain_step = engine(tmp_path / "a")
    fast, fast_step = engine(tmp_path / "b", opts)
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


def test_rebuild_adamw_refuses_a_used_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="already stepped"):
        accel.rebuild_adamw(opt, fused=False)


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
