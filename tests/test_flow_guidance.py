"""The flow-matching guidance terms with tiny tensors and a toy network, each against a brute-force definition
(docs/method.md "PALP for rectified flow"; issue 21 item 2)."""

import math
from typing import ClassVar

import pytest
import torch

from palpcompose.flow_guidance import (
    VELOCITY,
    add_noise,
    expand_sigma,
    flow_loss,
    flux_mu,
    guided_velocity,
    logit_normal,
    packed_seq_len,
    predict_x0,
    renoise,
    sample_sigmas,
    shift_sigmas,
    time_shift,
    velocity_target,
    velocity_to_eps,
)
from palpcompose.guidance import (
    GuidanceConfig,
    NonFiniteError,
    PalpGuidance,
    alignment_loss,
    cfg,
    guidance_direction,
)


def _config(**overrides) -> GuidanceConfig:
    """A GuidanceConfig with every field given (it has no defaults): the method's PALP settings, then overrides."""
    fields = {"mode": "palp", "alpha": 7.5, "beta": 1.0, "weight": 1.0, "same_noise": True, "rescale": True}
    return GuidanceConfig(**{**fields, **overrides})


def _sigma(b=2, ndim=4):
    return expand_sigma(torch.tensor([0.3, 0.8][:b]), ndim)


def _draw(n, seed, shape=(2, 4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# --- the path ---------------------------------------------------------------------------------------------------


def test_path_and_velocity_match_the_ode_definition():
    x0, eps = _draw(2, 0)
    s = _sigma()
    x_t = add_noise(x0, eps, s)
    assert torch.allclose(x_t, (1 - s) * x0 + s * eps)
    assert torch.equal(add_noise(x0, eps, torch.zeros_like(s)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones_like(s)), eps)
    # v is d x_t / d s, by central differences along the path
    h = 1e-3
    numeric = (add_noise(x0, eps, s + h) - add_noise(x0, eps, s - h)) / (2 * h)
    assert torch.allclose(velocity_target(x0, eps), numeric, atol=1e-3)


def test_x0_hat_recovers_x0_from_the_true_velocity():
    x0, eps = _draw(2, 1)
    s = _sigma()
    assert torch.allclose(predict_x0(add_noise(x0, eps, s), velocity_target(x0, eps), s), x0, atol=1e-6)


def test_same_noise_renoising_equals_closed_form():
    x0, eps, v_hat = _draw(3, 2)
    s = _sigma()
    x_t = add_noise(x0, eps, s)
    x0_hat = predict_x0(x_t, v_hat, s)
    expected = x_t - s * (1 - s) * (v_hat - velocity_target(x0, eps))
    assert torch.allclose(renoise(x0_hat, s, eps), expected, atol=1e-5)
    assert not torch.allclose(renoise(x0_hat, s, torch.randn_like(eps)), expected, atol=1e-3)


def test_velocity_to_eps_inverts_the_path():
    x0, eps = _draw(2, 3)
    s = _sigma()
    assert torch.allclose(velocity_to_eps(velocity_target(x0, eps), add_noise(x0, eps, s), s), eps, atol=1e-6)


def test_cfg_in_velocity_equals_cfg_in_eps():
    """CFG is parameterisation-free: guiding velocities then converting equals converting then guiding."""
    x_t, v_u, v_c = _draw(3, 4)
    s = _sigma()
    eps_u, eps_c = velocity_to_eps(v_u, x_t, s), velocity_to_eps(v_c, x_t, s)
    assert torch.allclose(velocity_to_eps(cfg(v_u, v_c, 7.5), x_t, s), cfg(eps_u, eps_c, 7.5), atol=1e-5)


def test_flow_loss_is_the_velocity_mse():
    x0, eps, v_hat = _draw(3, 5)
    assert torch.allclose(flow_loss(v_hat, x0, eps), ((v_hat - (eps - x0)) ** 2).mean())
    assert flow_loss(eps - x0, x0, eps) == 0


# --- the rescale (Eq. 7 for flow) -------------------------------------------------------------------------------


def test_a_velocity_residual_maps_to_x0_space_by_minus_sigma():
    """At fixed x_t, two velocity predictions differing by r give clean latents differing by -s r; the rescale 1/s
    is the inverse of that map's size, as SD's sqrt(abar)/sqrt(1-abar) is the inverse of sqrt(1-abar)/sqrt(abar)."""
    x_t, v1, v2 = _draw(3, 6)
    s = _sigma()
    assert torch.allclose(predict_x0(x_t, v1, s) - predict_x0(x_t, v2, s), -s * (v1 - v2), atol=1e-6)


@pytest.mark.parametrize("rescale", [True, False])
def test_alignment_gradient_matches_eq7(rescale):
    x_t, r = _draw(2, 7)
    (v_hat,) = _draw(1, 8)
    v_hat.requires_grad_(True)
    s = _sigma()
    loss = alignment_loss(predict_x0(x_t, v_hat, s), r, s, VELOCITY, rescale=rescale, w=0.5)
    (grad,) = torch.autograd.grad(loss, v_hat)
    n = v_hat.numel()
    # hand-computed: g = w r (/ s), times d x0_hat / d v_hat = -s
    scale = 1 / s if rescale else torch.ones_like(s)
    assert torch.allclose(grad, 0.5 * scale * r * (-s) / n, atol=1e-7)
    if rescale:  # the rescale cancels the Jacobian: the gradient is -w r / numel at every s
        assert torch.allclose(grad, -0.5 * r / n, atol=1e-7)
    else:  # without it the gradient shrinks with s (bounded by 1, unlike SD's, which blows up at large t)
        assert torch.allclose(grad, -0.5 * s * r / n, atol=1e-7)


def test_palp_velocity_residual_is_the_eps_residual_over_one_minus_sigma():
    """The same two predictions as eps: eps_base - eps_lora = (1 - s) r, so the direction is the SD one, reweighted."""
    x_t, v_base, v_lora = _draw(3, 9)
    s = _sigma()
    r = guidance_direction("palp", v_base, lora=v_lora)
    r_eps = velocity_to_eps(v_base, x_t, s) - velocity_to_eps(v_lora, x_t, s)
    assert torch.allclose(r_eps, (1 - s) * r, atol=1e-6)


def test_directions_and_the_sds_target_is_the_renoising_velocity():
    base, lora, target = torch.full((1, 2), 3.0), torch.ones(1, 2), torch.full((1, 2), 2.0)
    assert torch.equal(guidance_direction("palp", base, lora=lora), torch.full((1, 2), 2.0))
    assert torch.equal(guidance_direction("sds", base, sds_target=target), torch.ones(1, 2))
    with pytest.raises(ValueError):
        guidance_direction("palp", base)
    x0_hat, eps = _draw(2, 13)
    assert torch.equal(VELOCITY.sds_target(x0_hat, eps), eps - x0_hat)  # flow step 5: the path's velocity


# --- guided predictions: real CFG and guidance distillation ------------------------------------------------------


class ToyPredictor:
    """v = 0.5 x + (prompt offset) + 0.1 * guidance, recording every pass."""

    OFFSET: ClassVar[dict[str, float]] = {"empty": 0.0, "clean": 1.0, "personal": 2.0}

    def __init__(self):
        self.calls = []

    def __call__(self, latents, *, prompt, guidance):
        self.calls.append((prompt, guidance))
        return 0.5 * latents + self.OFFSET[prompt] + (0.0 if guidance is None else 0.1 * guidance)


def test_guided_velocity_distilled_is_one_pass_at_the_guidance_value():
    x = torch.zeros(1, 2)
    pred = ToyPredictor()
    out = guided_velocity(pred, x, prompt="clean", scale=3.5, distilled=True)
    assert pred.calls == [("clean", 3.5)] and torch.allclose(out, torch.full((1, 2), 1.35))


def test_guided_velocity_real_cfg_is_two_passes_and_one_at_scale_one():
    x = torch.zeros(1, 2)
    pred = ToyPredictor()
    out = guided_velocity(pred, x, prompt="clean", scale=7.5, distilled=False)
    assert sorted(pred.calls) == [("clean", None), ("empty", None)]
    assert torch.allclose(out, cfg(pred(x, prompt="empty", guidance=None), pred(x, prompt="clean", guidance=None), 7.5))
    pred.calls.clear()
    assert torch.equal(guided_velocity(pred, x, prompt="personal", scale=1.0, distilled=False), torch.full((1, 2), 2.0))
    assert pred.calls == [("personal", None)]


# --- the whole term ---------------------------------------------------------------------------------------------


class CountingDenoiser:
    """A toy 'network': v = 0.5 x (+1 with the adapter on), recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, *, adapter, prompt, scale):
        self.calls.append((adapter, prompt, scale))
        return 0.5 * latents + (1.0 if adapter else 0.0)


def _inputs():
    x_t, noise = _draw(2, 10)
    (v_hat,) = _draw(1, 11)
    return x_t, v_hat.requires_grad_(True), noise, _sigma()


def test_palp_gradient_is_minus_the_direction():
    x_t, v_hat, noise, s = _inputs()
    den = CountingDenoiser()
    terms = PalpGuidance(_config(mode="palp", alpha=3.5, beta=1.0), VELOCITY)(
        x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=den
    )
    assert den.calls == [(False, "clean", 3.5), (True, "personal", 1.0)]
    # r = 0.5 z - (0.5 z + 1) = -1 everywhere, so d loss / d v_hat = +1 / numel at every s
    terms["loss_align"].backward()
    assert torch.allclose(v_hat.grad, torch.full_like(v_hat, 1.0 / v_hat.numel()), atol=1e-7)
    assert torch.allclose(terms["guidance_norm"], torch.tensor(1.0))


def test_palp_without_rescale_weights_the_gradient_by_sigma():
    x_t, v_hat, noise, s = _inputs()
    terms = PalpGuidance(_config(mode="palp", rescale=False), VELOCITY)(
        x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=CountingDenoiser()
    )
    terms["loss_align"].backward()
    assert torch.allclose(v_hat.grad, (s * torch.ones_like(v_hat)) / v_hat.numel(), atol=1e-7)


def test_sds_uses_the_renoising_velocity_and_one_pass():
    x_t, v_hat, noise, s = _inputs()
    den = CountingDenoiser()
    fresh = torch.randn_like(noise)
    guid = PalpGuidance(_config(mode="sds", same_noise=False), VELOCITY)
    terms = guid(x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=den, fresh_noise=fresh)
    assert den.calls == [(False, "clean", 7.5)]
    x0_hat = predict_x0(x_t, v_hat, s).detach()
    x0_hat_t = (1 - s) * x0_hat + s * fresh  # brute force: the path at s through x0_hat with the fresh noise
    r = 0.5 * x0_hat_t - (fresh - x0_hat)
    terms["loss_align"].backward()
    assert torch.allclose(v_hat.grad, -r / v_hat.numel(), atol=1e-6)


def test_same_noise_feeds_the_closed_form_latent_to_both_branches():
    x_t, v_hat, noise, s = _inputs()
    seen = []

    def recording(latents, **_):
        seen.append(latents.clone())
        return torch.zeros_like(latents)

    PalpGuidance(_config(), VELOCITY)(x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=recording)
    x0 = (x_t - s * noise) / (1 - s)  # the clean latent whose path passes through x_t with this noise
    expected = x_t - s * (1 - s) * (v_hat.detach() - velocity_target(x0, noise))
    assert len(seen) == 2 and all(torch.allclose(lat, expected, atol=1e-5) for lat in seen)


def test_none_makes_no_passes():
    x_t, v_hat, noise, s = _inputs()
    den = CountingDenoiser()
    assert PalpGuidance(_config(mode="none"), VELOCITY)(
        x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=den
    ) == {}
    assert den.calls == []


def test_independent_noise_needs_a_fresh_draw_and_non_finite_raises():
    x_t, v_hat, noise, s = _inputs()
    with pytest.raises(ValueError, match="fresh_noise"):
        PalpGuidance(_config(same_noise=False), VELOCITY)(x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s,
                                                          denoise=CountingDenoiser())
    with pytest.raises(NonFiniteError, match="lower learning rate"):
        PalpGuidance(_config(), VELOCITY)(x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s,
                                          denoise=lambda lat, **_: torch.full_like(lat, float("nan")))


class SampleDenoiser:
    """A frozen branch and a personalized branch that disagree differently for every sample."""

    def __call__(self, latents, *, adapter, prompt, scale):
        weights = torch.arange(1, latents.shape[0] + 1, dtype=latents.dtype).view(-1, 1, 1, 1)
        return latents.sin() * scale + (weights * latents.cos() if adapter else 0.0)


@pytest.mark.parametrize("same_noise", [True, False])
def test_cos_palp_sds_is_the_mean_per_sample_cosine_of_the_two_velocity_directions(same_noise):
    """The SD diagnostic for flow runs: PALP's r against SDS's r = G_base^alpha - (eps - x0_hat), at the same
    x0_hat_t; by hand, sample by sample, in float64. Only palp logs it, and it changes no gradient."""
    x_t, v_hat, noise, s = _inputs()
    (fresh,) = _draw(1, 14)
    x0_hat = predict_x0(x_t, v_hat, s)
    terms = PalpGuidance(_config(alpha=3.5, beta=1.0, same_noise=same_noise), VELOCITY)(
        x0_hat=x0_hat, noise=noise, level=s, denoise=SampleDenoiser(), fresh_noise=fresh)
    eps = (noise if same_noise else fresh).double()
    x0 = x0_hat.detach().double()
    x0_hat_t = (1 - s.double()) * x0 + s.double() * eps
    cosines, r = [], []
    for i in range(x0.shape[0]):
        z = x0_hat_t[i].flatten().tolist()
        base = [math.sin(v) * 3.5 for v in z]
        lora = [math.sin(v) + (i + 1) * math.cos(v) for v in z]
        velocity = [e - x for e, x in zip(eps[i].flatten().tolist(), x0[i].flatten().tolist(), strict=True)]
        r_palp = [b - p for b, p in zip(base, lora, strict=True)]
        r_sds = [b - v for b, v in zip(base, velocity, strict=True)]
        dot = sum(a * b for a, b in zip(r_palp, r_sds, strict=True))
        cosines.append(dot / (sum(a * a for a in r_palp) * sum(b * b for b in r_sds)) ** 0.5)
        r.append(r_palp)
    assert abs(cosines[0] - cosines[1]) > 0.01  # the samples differ: a mean over the batch is tested, not one value
    assert terms["cos_palp_sds"].item() == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    terms["loss_align"].backward()  # Eq. 7 with PALP's direction alone: d L / d v_hat = -r / numel
    r = torch.tensor(r, dtype=torch.float32).view_as(v_hat)
    assert torch.allclose(v_hat.grad, -r / v_hat.numel(), atol=1e-6)
    sds = PalpGuidance(_config(mode="sds"), VELOCITY)(x0_hat=x0_hat.detach(), noise=noise, level=s,
                                                      denoise=SampleDenoiser())
    assert "cos_palp_sds" not in sds


# --- timestep sampling against diffusers -------------------------------------------------------------------------


def test_static_shift_matches_flow_match_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the scheduler's own table before shifting
    assert torch.allclose(shift_sigmas(unshifted, 3.0), sched.sigmas.float(), atol=1e-6)
    assert torch.allclose(sched.timesteps, sched.sigmas * 1000)  # SD 3's transformer reads sigma * 1000
    assert torch.equal(shift_sigmas(unshifted, 1.0), unshifted)


def test_dynamic_shift_and_mu_match_the_flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (64, 256, 1024, 4096):
        assert math.isclose(flux_mu(seq_len), calculate_shift(seq_len, 256, 4096, 0.5, 1.15), rel_tol=1e-12)
    assert packed_seq_len(64, 64) == 1024  # 512 px: a 64x64 latent, 2x2 patches
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = flux_mu(1024)
    sigmas = torch.linspace(1.0, 1 / 8, 8)  # what FluxPipeline passes for 8 steps
    sched.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    assert torch.allclose(time_shift(sigmas, mu), sched.sigmas[:-1].float(), atol=1e-6)
    # with exponent 1 the dynamic shift is the static one with shift = e^mu
    assert torch.allclose(time_shift(sigmas, mu), shift_sigmas(sigmas, math.exp(mu)), atol=1e-6)


def test_logit_normal_samples_lie_in_the_open_unit_interval_with_the_right_median():
    u = logit_normal(20000, generator=torch.Generator().manual_seed(0), mean=0.5, std=1.0)
    assert u.shape == (20000,) and (u > 0).all() and (u < 1).all()
    assert abs(u.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01  # the median of sigmoid(N(m, .)) is sigmoid(m)
    again = logit_normal(20000, generator=torch.Generator().manual_seed(0), mean=0.5, std=1.0)
    assert torch.equal(u, again)  # seeded


def test_sample_sigmas_applies_the_family_shift_and_clamps():
    g = lambda: torch.Generator().manual_seed(1)
    u = logit_normal(64, generator=g())
    assert torch.allclose(sample_sigmas(64, generator=g(), shift=3.0), shift_sigmas(u, 3.0))  # SD 3
    assert torch.allclose(sample_sigmas(64, generator=g(), mu=0.8), time_shift(u, 0.8))  # Flux
    wide = sample_sigmas(4096, generator=g(), logit_std=40.0)  # fp32 sigmoid rounds to exactly 0 or 1 here
    assert wide.min() >= 1e-3 and wide.max() <= 1.0 and (wide == 1e-3).any()
    uniform = sample_sigmas(4096, generator=g(), sampling="uniform")
    assert abs(uniform.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="sigma sampling"):
        sample_sigmas(2, sampling="cosmap")
    # the mean of a shift-3 sample is above the unshifted one: mass moves to high noise
    assert sample_sigmas(4096, generator=g(), shift=3.0).mean() > sample_sigmas(4096, generator=g()).mean()


def test_velocity_sign_matches_the_scheduler_that_samples_these_models():
    """diffusers' FlowMatchEulerDiscreteScheduler adds noise as add_noise does, and one Euler step from s to 0 with
    the true velocity eps - x0 lands on x0: the sign the Flux and SD 3 transformers were trained with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, eps = _draw(2, 12, shape=(1, 4, 3, 3))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=[0.6])  # one step: 0.6 -> 0
    t = sched.timesteps[0]
    s = torch.full((1, 1, 1, 1), 0.6)
    assert torch.allclose(sched.scale_noise(x0, t.reshape(1), eps), add_noise(x0, eps, s), atol=1e-6)
    stepped = sched.step(velocity_target(x0, eps), t, add_noise(x0, eps, s), return_dict=False)[0]
    assert torch.allclose(stepped, x0, atol=1e-5)


def test_distilled_palp_makes_one_pass_per_branch_at_alpha_and_beta():
    """The whole term on a guidance-distilled model: the denoiser built from guided_velocity(distilled=True) runs the
    frozen model at guidance alpha and the LoRA at guidance beta, one pass each, never the empty prompt."""
    x_t, v_hat, noise, s = _inputs()
    passes = []

    def transformer(latents, *, adapter, prompt, guidance):
        passes.append((adapter, prompt, guidance))
        return 0.5 * latents + (1.0 if adapter else 0.0) + 0.1 * guidance

    def denoise(latents, *, adapter, prompt, scale):
        predict = lambda lat, **kw: transformer(lat, adapter=adapter, **kw)
        return guided_velocity(predict, latents, prompt=prompt, scale=scale, distilled=True)

    terms = PalpGuidance(_config(alpha=3.5, beta=1.0), VELOCITY)(
        x0_hat=predict_x0(x_t, v_hat, s), noise=noise, level=s, denoise=denoise
    )
    assert passes == [(False, "clean", 3.5), (True, "personal", 1.0)]
    # r = (0.5 z + 0.35) - (0.5 z + 1 + 0.1) = -0.75 everywhere; the gradient on v_hat is -r / numel
    terms["loss_align"].backward()
    assert torch.allclose(v_hat.grad, torch.full_like(v_hat, 0.75 / v_hat.numel()), atol=1e-7)
