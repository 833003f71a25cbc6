"""The guidance terms with tiny tensors and a toy network (the LoRA's fp32 and frozen branch: test_models.py)."""

import math
from dataclasses import fields, replace
from types import SimpleNamespace

import pytest
import torch

from palpcompose.guidance import (
    EPSILON,
    GuidanceConfig,
    NonFiniteError,
    PalpGuidance,
    add_noise,
    alignment_loss,
    cfg,
    guidance_config,
    guidance_direction,
    predict_x0,
    renoise,
    v_to_eps,
)
from palpcompose.project import PalpConfig


def _guidance(**palp) -> GuidanceConfig:
    """The guidance of a project whose [palp] section sets `palp` and leaves the rest at the schema's defaults."""
    return guidance_config(SimpleNamespace(palp=replace(PalpConfig(), **palp)))


def test_guidance_config_reads_every_setting_from_the_project():
    palp = PalpConfig(guidance="sds", alpha=3.0, beta=2.0, weight=0.25, same_noise=False, rescale=False)
    config = guidance_config(SimpleNamespace(palp=palp))
    assert {f.name: getattr(config, f.name) for f in fields(GuidanceConfig)} == {
        "mode": "sds", "alpha": 3.0, "beta": 2.0, "weight": 0.25, "same_noise": False, "rescale": False}
    with pytest.raises(TypeError):  # no defaults of its own: the project's schema is their one home
        GuidanceConfig(mode="palp")


def _abar(b=2):
    return torch.tensor([0.3, 0.8][:b]).view(b, 1, 1, 1)


def test_predict_x0_inverts_forward_diffusion():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    abar = _abar()
    assert torch.allclose(predict_x0(add_noise(x, eps, abar), eps, abar), x, atol=1e-5)


def test_same_noise_renoising_equals_closed_form():  # (d)
    g = torch.Generator().manual_seed(1)
    x, eps, eps_hat = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    abar = _abar()
    x_t = add_noise(x, eps, abar)
    x0_hat = predict_x0(x_t, eps_hat, abar)
    expected = x_t + (1 - abar).sqrt() * (eps - eps_hat)
    assert torch.allclose(renoise(x0_hat, abar, eps), expected, atol=1e-5)
    # and an independent draw gives something else
    assert not torch.allclose(renoise(x0_hat, abar, torch.randn_like(eps)), expected, atol=1e-3)


@pytest.mark.parametrize("rescale", [True, False])
def test_alignment_gradient_matches_eq7(rescale):  # (a)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 4, 3, 3, generator=g)
    eps_hat = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    r = torch.randn(2, 4, 3, 3, generator=g)
    abar = _abar()
    loss = alignment_loss(predict_x0(x_t, eps_hat, abar), r, abar, EPSILON, rescale=rescale, w=0.5)
    (grad,) = torch.autograd.grad(loss, eps_hat)
    n = eps_hat.numel()
    # hand-computed: g = w * [sqrt(abar)/sqrt(1-abar)] * r, times d x0_hat / d eps_hat = -sqrt(1-abar)/sqrt(abar)
    dx0_deps = -(1 - abar).sqrt() / abar.sqrt()
    scale = abar.sqrt() / (1 - abar).sqrt() if rescale else torch.ones_like(abar)
    expected = 0.5 * scale * r * dx0_deps / n
    assert torch.allclose(grad, expected, atol=1e-7)
    if rescale:  # Eq. 7: the rescale cancels the Jacobian, the gradient is -w r / numel
        assert torch.allclose(grad, -0.5 * r / n, atol=1e-7)


def test_directions_and_cfg():
    u, c = torch.zeros(1, 2), torch.ones(1, 2)
    assert torch.equal(cfg(u, c, 7.5), torch.full((1, 2), 7.5))
    assert torch.equal(cfg(u, c, 1.0), c)
    base, lora, eps = torch.full((1, 2), 3.0), torch.ones(1, 2), torch.full((1, 2), 2.0)
    assert torch.equal(guidance_direction("palp", base, lora=lora), torch.full((1, 2), 2.0))
    assert torch.equal(guidance_direction("sds", base, sds_target=eps), torch.ones(1, 2))


def test_v_to_eps_matches_definition():
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    abar = _abar()
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    assert torch.allclose(v_to_eps(v, add_noise(x, eps, abar), abar), eps, atol=1e-5)


class CountingDenoiser:
    """A toy 'network': eps = k * x (+1 with the adapter on), recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, *, adapter, prompt, scale):
        self.calls.append((adapter, prompt, scale))
        return 0.5 * latents + (1.0 if adapter else 0.0)


def _inputs():
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 4, 3, 3, generator=g)
    eps_hat = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    noise = torch.randn(2, 4, 3, 3, generator=g)
    return x_t, eps_hat, noise, _abar()


def test_palp_calls_frozen_branch_without_adapter_and_personal_with_it():
    x_t, eps_hat, noise, abar = _inputs()
    den = CountingDenoiser()
    terms = PalpGuidance(_guidance(guidance="palp", alpha=7.5, beta=1.0), EPSILON)(
        x0_hat=predict_x0(x_t, eps_hat, abar), noise=noise, level=abar, denoise=den
    )
    assert den.calls == [(False, "clean", 7.5), (True, "personal", 1.0)]
    # r = (0.5 z) - (0.5 z + 1) = -1 everywhere, so d loss / d eps_hat = +1 / numel
    terms["loss_align"].backward()
    assert torch.allclose(eps_hat.grad, torch.full_like(eps_hat, 1.0 / eps_hat.numel()), atol=1e-7)


def test_sds_uses_the_renoising_noise_and_one_pass():
    x_t, eps_hat, noise, abar = _inputs()
    den = CountingDenoiser()
    fresh = torch.randn_like(noise)
    guid = PalpGuidance(_guidance(guidance="sds", alpha=7.5, same_noise=False), EPSILON)
    terms = guid(x0_hat=predict_x0(x_t, eps_hat, abar), noise=noise, level=abar, denoise=den, fresh_noise=fresh)
    assert den.calls == [(False, "clean", 7.5)]
    x0_hat_t = renoise(predict_x0(x_t, eps_hat, abar), abar, fresh)
    r = 0.5 * x0_hat_t - fresh
    terms["loss_align"].backward()
    assert torch.allclose(eps_hat.grad, -r / eps_hat.numel(), atol=1e-6)


def test_none_makes_no_passes():  # (b), at the guidance level; the UNet count is in test_train.py
    x_t, eps_hat, noise, abar = _inputs()
    den = CountingDenoiser()
    assert PalpGuidance(_guidance(guidance="none"), EPSILON)(
        x0_hat=predict_x0(x_t, eps_hat, abar), noise=noise, level=abar, denoise=den
    ) == {}
    assert den.calls == []


def test_non_finite_direction_raises():
    x_t, eps_hat, noise, abar = _inputs()

    def nan_denoiser(latents, **_):
        return torch.full_like(latents, float("nan"))

    with pytest.raises(NonFiniteError, match="lower learning rate"):
        PalpGuidance(_guidance(guidance="palp"), EPSILON)(x0_hat=predict_x0(x_t, eps_hat, abar), noise=noise,
                                                          level=abar, denoise=nan_denoiser)


class SampleDenoiser:
    """A frozen branch and a personalized branch that disagree differently for every sample."""

    def __call__(self, latents, *, adapter, prompt, scale):
        weights = torch.arange(1, latents.shape[0] + 1, dtype=latents.dtype).view(-1, 1, 1, 1)
        return latents.sin() * scale + (weights * latents.cos() if adapter else 0.0)


def test_cos_palp_sds_is_the_mean_per_sample_cosine_of_the_two_directions():
    x_t, eps_hat, noise, abar = _inputs()
    x0_hat = predict_x0(x_t, eps_hat, abar)
    terms = PalpGuidance(_guidance(guidance="palp", alpha=7.5, beta=1.0), EPSILON)(
        x0_hat=x0_hat, noise=noise, level=abar, denoise=SampleDenoiser())
    # brute force: every number by hand, sample by sample, in float64
    x0_hat_t = renoise(x0_hat, abar, noise).double()
    cosines = []
    for i in range(x0_hat_t.shape[0]):
        z = x0_hat_t[i].flatten().tolist()
        base = [math.sin(v) * 7.5 for v in z]
        lora = [math.sin(v) * 1.0 + (i + 1) * math.cos(v) for v in z]
        r_palp = [b - p for b, p in zip(base, lora)]
        r_sds = [b - n for b, n in zip(base, noise[i].double().flatten().tolist())]
        dot = sum(a * b for a, b in zip(r_palp, r_sds))
        norm = (sum(a * a for a in r_palp) * sum(b * b for b in r_sds)) ** 0.5
        cosines.append(dot / norm)
    assert abs(cosines[0] - cosines[1]) > 0.01  # the samples differ: a mean over the batch is tested, not one value
    assert terms["cos_palp_sds"].item() == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)


def test_cos_palp_sds_changes_nothing_else_and_only_palp_logs_it():
    x_t, eps_hat, noise, abar = _inputs()
    guid = PalpGuidance(_guidance(guidance="palp"), EPSILON)
    terms = guid(x0_hat=predict_x0(x_t, eps_hat, abar), noise=noise, level=abar, denoise=SampleDenoiser())
    terms["loss_align"].backward()
    # the gradient is Eq. 7's with PALP's direction alone (rescale on: d L / d eps_hat = -r / numel)
    x0_hat_t = renoise(predict_x0(x_t, eps_hat, abar), abar, noise)
    den = SampleDenoiser()
    r = den(x0_hat_t, adapter=False, prompt="clean", scale=7.5) - den(x0_hat_t, adapter=True, prompt="personal",
                                                                       scale=1.0)
    assert torch.allclose(eps_hat.grad, -r / eps_hat.numel(), atol=1e-6)
    sds = PalpGuidance(_guidance(guidance="sds"), EPSILON)(x0_hat=predict_x0(x_t, eps_hat, abar).detach(),
                                                           noise=noise, level=abar, denoise=SampleDenoiser())
    assert "cos_palp_sds" not in sds
