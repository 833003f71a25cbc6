"""PALP guidance for rectified-flow models (Flux.1, Stable Diffusion 3.x): the flow analogues of guidance.py's terms,
as pure fp32 tensor functions, with the training timestep distributions of those families.

docs/method.md "PALP for rectified flow" derives every formula here; the step numbers ("flow step 4") refer to it.
Notation: `sigma` (s in the docs) is the noise level in [0, 1]; `x_t = (1 - s) x0 + s eps`; the model predicts the
velocity `v = d x_t / d s = eps - x0` (diffusers' `FlowMatchEulerDiscreteScheduler` convention: its `scale_noise` is
`sigma * noise + (1 - sigma) * sample`, and its Euler step moves by `(sigma_next - sigma) * v`).

Shapes: latents and predictions are (B, ...) (unpacked (B, C, H, W), or Flux's packed (B, tokens, features));
`sigma` is (B, 1, ..., 1) with the latents' number of dimensions (`expand_sigma`), so it broadcasts per sample.
The family decides what the transformer's `timestep` argument is (Flux: `sigma`, it multiplies by 1000 itself;
SD 3: `sigma * 1000`); nothing here calls a model. The guidance term itself is guidance.PalpGuidance, given
`VELOCITY`: this module's path, velocity target and rescale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from palpcompose.guidance import Parameterisation, cfg

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


def eq7_rescale(g: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow step 6, Eq. 7 for flow: g / s, the inverse size of d x0_hat / d v_hat = -s (flow step 3).

    With it, guidance.alignment_loss's gradient w.r.t. v_hat is -w r / numel: exactly what SD's
    sqrt(abar_t) / sqrt(1 - abar_t) achieves for eps_hat. It rides on the personalization branch's backward pass.
    Without it (the ablation, g = w r) the gradient on v_hat is -w s r / numel."""
    return g / sigma


# The rectified flow's: x_t = (1 - s) x0 + s eps, predictions as velocity v = eps - x0; the guidance of flow steps 4
# to 6 is guidance.PalpGuidance with this (the SDS target is the velocity of the re-noising, eps - x0_hat)
VELOCITY = Parameterisation(renoise=renoise, sds_target=velocity_target, rescale=eq7_rescale)
