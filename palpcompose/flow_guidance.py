"""PALP guidance for rectified-flow models (Flux.1, Stable Diffusion 3.x): the flow analogues of guidance.py's terms,
as pure fp32 tensor functions, with the training timestep distributions of those families.

docs/method.md "PALP for rectified flow" derives every formula here; the step numbers ("flow step 4") refer to it.
Notation: `sigma` (s in the docs) is the noise level in [0, 1]; `x_t = (1 - s) x0 + s eps`; the model predicts the
velocity `v = d x_t / d s = eps - x0` (diffusers' `FlowMatchEulerDiscreteScheduler` convention: its `scale_noise` is
`sigma * noise + (1 - sigma) * sample`, and its Euler step moves by `(sigma_next - sigma) * v`).

Shapes: latents and predictions are (B, ...) (unpacked (B, C, H, W), or Flux's packed (B, tokens, features));
`sigma` is (B, 1, ..., 1) with the latents' number of dimensions (`expand_sigma`), so it broadcasts per sample.
The family decides what the transformer's `timestep` argument is (Flux: `sigma`, it multiplies by 1000 itself;
SD 3: `sigma * 1000`); nothing here calls a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from palpcompose.guidance import GuidanceConfig, cfg, check_finite

SIGMA_SAMPLINGS = ("logit_normal", "uniform")


# --- Timestep sampling (flow step 1) ----------------------------------------------------------------------------


def logit_normal(batch: int, *, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """u = sigmoid(n), n ~ N(mean, std^2): the SD 3 paper's logit-normal density (diffusers'
    `compute_density_for_timestep_sampling("logit_normal", ...)`). Shape (B,), values in (0, 1)."""
    n = torch.randn(batch, generator=generator, device=device) * std + mean
    return torch.sigmoid(n)


def logit_normal_from_uniform(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """The logit-normal density by its inverse CDF: u in (0, 1) uniform -> sigmoid(mean + std * Phi^-1(u)), the same
    distribution as `logit_normal`. The training step draws u from the batch's integer timestep ((t + 0.5) / T, as
    the SD 3 script indexes its table with u * T), so no random draw is added to the data generator's stream."""
    n = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    return torch.sigmoid(n * std + mean)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static shift (SD 3; Flux without dynamic shifting): s' = shift s / (1 + (shift - 1) s).

    The formula of FlowMatchEulerDiscreteScheduler when `use_dynamic_shifting` is off; shift > 1 moves mass to high
    noise, which large images need (their pixels are more correlated, so the same s destroys less information)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: torch.Tensor, mu: float, exponent: float = 1.0) -> torch.Tensor:
    """Resolution-dependent ("dynamic") shift (Flux): s' = e^mu / (e^mu + (1 / s - 1)^exponent).

    FlowMatchEulerDiscreteScheduler's exponential `time_shift(mu, sigma=exponent, t)`. With exponent 1 it is the
    static shift with shift = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** exponent)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """mu for `time_shift`, linear in the number of image tokens: base_shift at base_seq_len tokens, max_shift at
    max_seq_len (diffusers' `pipelines.flux.pipeline_flux.calculate_shift`; the four numbers come from the scheduler
    config's base_image_seq_len, max_image_seq_len, base_shift, max_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def packed_seq_len(latent_height: int, latent_width: int, patch: int = 2) -> int:
    """Image tokens of a latent of that size once patchified into patch x patch tokens (Flux packs 2x2)."""
    return (latent_height // patch) * (latent_width // patch)


def sample_sigmas(
    batch: int,
    *,
    generator: torch.Generator | None = None,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels, shape (B,): u from the density (logit-normal or uniform), then the family's shift
    (`time_shift(u, mu)` when `mu` is given, as Flux; else `shift_sigmas(u, shift)`, as SD 3 with shift 3).

    Clamped to [1 / num_train_timesteps, 1], the range of the scheduler's own sigma table, so that the rescale 1 / s
    (flow step 6) stays finite even where fp32's sigmoid rounds to 0."""
    if sampling == "logit_normal":
        u = logit_normal(batch, generator=generator, mean=logit_mean, std=logit_std, device=device)
    elif sampling == "uniform":
        u = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"sigma sampling must be one of {SIGMA_SAMPLINGS}, not {sampling!r}")
    sigmas = time_shift(u, mu) if mu is not None else shift_sigmas(u, shift)
    return sigmas.clamp(1.0 / num_train_timesteps, 1.0)


def expand_sigma(sigmas: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions, to broadcast over one sample's latent."""
    return sigmas.reshape(-1, *([1] * (ndim - 1)))


# --- The path and its parameterisation (flow steps 1 to 3) -------------------------------------------------------


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow path: x_t = (1 - s) x0 + s eps."""
    return (1 - sigma) * latents + sigma * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: v = d x_t / d s = eps - x0 (diffusers' `target = noise - model_input`)."""
    return noise - latents


def predict_x0(noisy_latents: torch.Tensor, v_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow step 3, the analogue of Eq. 2: x0_hat = x_t - s v_hat. Differentiable in v_hat; d x0_hat / d v_hat = -s."""
    return noisy_latents - sigma * v_hat


def velocity_to_eps(v: torch.Tensor, noisy_latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise a velocity implies at x_t: eps = x_t + (1 - s) v (affine in v, with prompt-independent
    coefficients, so classifier-free guidance gives the same result in either parameterisation)."""
    return noisy_latents + (1 - sigma) * v


def flow_loss(v_hat: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow step 2: loss_pers = mean((v_hat - (eps - x0))^2), in fp32."""
    return (v_hat.float() - velocity_target(latents.float(), noise.float())).pow(2).mean()


def renoise(x0_hat: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow step 4: re-noise the predicted clean latent at the same s, without gradients.

    With the personalization branch's own eps this equals x_t - s (1 - s) (v_hat - v), v = eps - x0 the true
    velocity; with a fresh draw it is the independent-noise ablation."""
    return add_noise(x0_hat.detach(), noise, sigma)


# --- Guidance (flow steps 5 and 6) -------------------------------------------------------------------------------

# predict(latents, prompt=..., guidance=...) -> velocity: one transformer pass; `guidance` is the value fed to a
# guidance-distilled model's embedding (None for a model without one).
Predictor = Callable[..., torch.Tensor]


def guided_velocity(predict: Predictor, latents: torch.Tensor, *, prompt: str, scale: float,
                    distilled: bool) -> torch.Tensor:
    """G^scale(x, s, prompt) in the model's own parameterisation (velocity).

    distilled (Flux.1-dev's guidance embedding): one pass, G(x, s, prompt; guidance=scale), no unconditional pass.
    real CFG (SD 3.x, de-distilled Flux): G(x, null) + scale (G(x, prompt) - G(x, null)); scale 1 is one pass."""
    if distilled:
        return predict(latents, prompt=prompt, guidance=scale)
    cond = predict(latents, prompt=prompt, guidance=None)
    if scale == 1.0:
        return cond
    return cfg(predict(latents, prompt="empty", guidance=None), cond, scale)


def guidance_direction(
    mode: str,
    base_v: torch.Tensor,
    lora_v: torch.Tensor | None = None,
    renoise_velocity: torch.Tensor | None = None,
) -> torch.Tensor:
    """The velocity residual r that pulls the personalized prediction towards the target prompt.

    palp (Eq. 6 in velocity): r = G_base^alpha(x0_hat_t, s, y_c) - G_lora^beta(x0_hat_t, s, y_P)
    sds  (Eq. 4 in velocity): r = G_base^alpha(x0_hat_t, s, y_c) - (eps - x0_hat), the velocity of the re-noising
    """
    if mode == "palp":
        if lora_v is None:
            raise ValueError("palp guidance needs the personalized model's prediction")
        return base_v - lora_v
    if mode == "sds":
        if renoise_velocity is None:
            raise ValueError("sds guidance needs the re-noising velocity eps - x0_hat")
        return base_v - renoise_velocity
    raise ValueError(f"no guidance direction for mode {mode!r}")


def alignment_loss(
    x0_hat: torch.Tensor, r: torch.Tensor, sigma: torch.Tensor, rescale: bool = True, w: float = 1.0
) -> torch.Tensor:
    """Flow step 6, Eq. 7 for flow: a surrogate loss whose gradient w.r.t. x0_hat is g / numel, per element.

    g = w r / s   (rescale on; g = w r with it off)
    L_align = sum(g.detach() * x0_hat) / numel

    Since d x0_hat / d v_hat = -s, with the rescale on the gradient w.r.t. v_hat is -w r / numel: exactly what SD's
    sqrt(abar_t) / sqrt(1 - abar_t) achieves for eps_hat. It rides on the personalization branch's backward pass.
    """
    g = w * r
    if rescale:
        g = g / sigma
    return (g.detach().float() * x0_hat.float()).sum() / x0_hat.numel()


# denoise(latents, adapter=..., prompt="clean"|"personal", scale=...) -> fp32 velocity with guidance applied
# (build it from `guided_velocity`, so a distilled model makes one pass per call)
Denoiser = Callable[..., torch.Tensor]


class FlowPalpGuidance:
    """The alignment term for flow models: guidance.PalpGuidance with velocities and noise levels. Has no parameters;
    the caller passes a `denoise` callable that runs the transformer (adapter on or off, on the clean or the
    personalization prompt, at guidance scale s: two passes for real CFG, one with the guidance embedding)."""

    def __init__(self, config: GuidanceConfig):
        self.config = config

    def __call__(
        self,
        *,
        x0_hat: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        denoise: Denoiser,
        fresh_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg_ = self.config
        if cfg_.mode == "none":  # the TI+DB baseline: no term and no extra transformer passes
            return {}
        with torch.no_grad():
            # Flow step 4: re-noise x0_hat at the same s (same eps by default, a fresh eps2 for the ablation)
            renoise_eps = noise if cfg_.same_noise else fresh_noise
            if renoise_eps is None:
                raise ValueError("independent-noise guidance needs fresh_noise")
            x0_hat32 = x0_hat.detach().float()
            x0_hat_t = renoise(x0_hat32, sigma, renoise_eps.float())
            # Flow step 5: velocity residual; the frozen model runs with the adapter disabled
            base_v = denoise(x0_hat_t, adapter=False, prompt="clean", scale=cfg_.alpha)
            lora_v = None
            if cfg_.mode == "palp":
                lora_v = denoise(x0_hat_t, adapter=True, prompt="personal", scale=cfg_.beta)
            r = guidance_direction(cfg_.mode, base_v.float(), lora_v,
                                   velocity_target(x0_hat32, renoise_eps.float()))
            check_finite("the guidance direction", r)
        # Flow step 6: the surrogate; the gradient flows into x0_hat (and so into v_hat) only
        loss_align = alignment_loss(x0_hat, r, sigma, rescale=cfg_.rescale)
        return {"loss_align": loss_align, "guidance_norm": r.detach().pow(2).mean().sqrt()}
