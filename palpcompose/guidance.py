"""PALP guidance: the prompt-alignment term of "PALP: Prompt Aligned Personalization of Text-to-Image Models"
(Arar et al., arXiv:2401.06105), and its SDS ablation, as pure fp32 tensor functions.

The training loop owns the models and the total loss; this module only turns predictions into loss terms. The
notation follows docs/method.md: `abar_t` is the cumulative product of alphas of the base model's own schedule,
`eps_hat` the personalized model's noise prediction, `x0_hat` the clean latent it implies.

`PalpGuidance` is steps 4 to 6 for any model: what depends on how the model writes its noise path and its prediction
is a `Parameterisation`, three formulas. `EPSILON` here is the paper's (a DDPM path at `abar_t`, eps predictions);
flow_guidance.VELOCITY is the rectified-flow one (Flux.1, SD 3.x: a straight path at `sigma`, velocity predictions).

Shapes: latents and predictions are (B, C, H, W); `abar_t` is (B, 1, 1, 1) so it broadcasts per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from palpcompose.choices import GUIDANCE_MODES
from palpcompose.errors import PalpcomposeError


class NonFiniteError(PalpcomposeError):
    """A loss or guidance direction became NaN/inf: training diverged. Exit code 1."""


def predict_x0(noisy_latents: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Eq. 2: x0_hat = (x_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t). Differentiable in eps_hat."""
    return (noisy_latents - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()


def add_noise(latents: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: x_t = sqrt(abar_t) * x + sqrt(1 - abar_t) * eps."""
    return abar_t.sqrt() * latents + (1 - abar_t).sqrt() * noise


def renoise(x0_hat: torch.Tensor, abar_t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Method step 4: re-noise the predicted clean latent at the same t, without gradients.

    With the same `noise` as the personalization branch (the paper's better variant) this equals
    `x_t + sqrt(1 - abar_t) * (eps - eps_hat)`; with a fresh draw it is the independent-noise ablation.
    """
    return add_noise(x0_hat.detach(), noise, abar_t)


def v_to_eps(v_pred: torch.Tensor, noisy_latents: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """v-prediction (Salimans & Ho 2022) to eps: eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t."""
    return abar_t.sqrt() * v_pred + (1 - abar_t).sqrt() * noisy_latents


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance G^s = G(x, t, null) + s * (G(x, t, y) - G(x, t, null))."""
    return uncond + scale * (cond - uncond)


def noise_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What an eps model predicts at x_t = add_noise(latents, noise, abar_t) if it is exact: the noise itself. Eq. 4
    (sds) subtracts it from the frozen model's prediction at the re-noised x0_hat."""
    return noise


def eq7_rescale(g: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Step 6's rescale (Eq. 7): g * sqrt(abar_t) / sqrt(1 - abar_t), the inverse size of d x0_hat / d eps_hat =
    -sqrt(1 - abar_t) / sqrt(abar_t) (Eq. 2), so that the gradient reaching eps_hat is -w r at every t."""
    return g * abar_t.sqrt() / (1 - abar_t).sqrt()


@dataclass(frozen=True)
class Parameterisation:
    """How a model writes its noise path and its prediction: the three formulas steps 4 to 6 take from it.
    `level` is where one step's samples are on the path, (B, 1, ..., 1): `abar_t` for EPSILON, `sigma` for
    flow_guidance.VELOCITY. Each field is a plain function of its module (named there, tested there)."""

    renoise: Callable[..., torch.Tensor]  # (x0_hat, level, eps) -> x0_hat_t, step 4 (no gradient)
    sds_target: Callable[..., torch.Tensor]  # (x0_hat, eps) -> what an exact model predicts at x0_hat_t (Eq. 4)
    rescale: Callable[..., torch.Tensor]  # (g, level) -> g times Eq. 7's factor, step 6 (it multiplies rather
    # than returning the factor: g * sqrt(abar_t) / sqrt(1 - abar_t) rounds as trained weights always have)


# The paper's: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, predictions as eps (SD 2's v predictions are converted
# to eps by the step's denoiser, docs/method.md)
EPSILON = Parameterisation(renoise=renoise, sds_target=noise_target, rescale=eq7_rescale)


def guidance_direction(
    mode: str,
    base: torch.Tensor,
    lora: torch.Tensor | None = None,
    sds_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """The direction r that pulls the personalized prediction towards the target prompt (in the model's own
    parameterisation: eps, or velocity for flow models).

    palp (Eq. 6, DDS-like): r = G_base^alpha(x0_hat_t, t, y_c) - G_lora^beta(x0_hat_t, t, y_P)
    sds  (Eq. 4):           r = G_base^alpha(x0_hat_t, t, y_c) - eps   (eps: the noise used to re-noise;
                            `sds_target` in general, Parameterisation.sds_target: eps - x0_hat for velocity)
    """
    if mode == "palp":
        if lora is None:
            raise ValueError("palp guidance needs the personalized model's prediction")
        return base - lora
    if mode == "sds":
        if sds_target is None:
            raise ValueError("sds guidance needs the re-noising noise (its target, eps - x0_hat for a flow model)")
        return base - sds_target
    raise ValueError(f"no guidance direction for mode {mode!r}")


def alignment_loss(
    x0_hat: torch.Tensor, r: torch.Tensor, level: torch.Tensor, parameterisation: Parameterisation, *,
    rescale: bool = True, w: float = 1.0,
) -> torch.Tensor:
    """Eq. 7 as a surrogate loss whose gradient w.r.t. x0_hat is g / numel, per element.

    g = w(t) * sqrt(abar_t) / sqrt(1 - abar_t) * r   (rescale on, EPSILON; flow: w r / s; g = w(t) * r with it off)
    L_align = sum(g.detach() * x0_hat) / numel

    Since d x0_hat / d eps_hat = -sqrt(1 - abar_t) / sqrt(abar_t) (Eq. 2), with the rescale on the gradient
    w.r.t. eps_hat is -w * r / numel (flow: d x0_hat / d v_hat = -s, the same -w r / numel on v_hat): the
    alignment gradient rides on the personalization branch's backward pass and never back-propagates through the
    frozen model.
    """
    g = w * r
    if rescale:
        g = parameterisation.rescale(g, level)
    return (g.detach().float() * x0_hat.float()).sum() / x0_hat.numel()


def direction_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of the per-sample cosine between two guidance directions (B, ...): logged as
    `cos_palp_sds` for palp runs, PALP's r against SDS's r = G_base^alpha(x0_hat_t, t, y_c) - eps (flow models:
    - (eps - x0_hat)) at the same x0_hat, t and noise (1: PALP pushes exactly where SDS would; docs/evaluation.md,
    the v2 study). A zero direction counts as cosine 0."""
    a, b = a.detach().float().flatten(1), b.detach().float().flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()


def check_finite(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(
            f"{name} is not finite (NaN or inf): training diverged. Try a lower learning rate "
            "(train.learning_rate / train.embedding_learning_rate), mixed_precision = \"no\", a smaller palp.alpha "
            "or palp.weight, or train.max_grad_norm = 1.0"
        )


@dataclass(frozen=True)
class GuidanceConfig:
    """The guidance settings of one run. No defaults here: their one home is the project's `[palp]` schema
    (project.PalpConfig); build it with `guidance_config(config)`."""

    mode: str  # palp | sds | none
    alpha: float  # CFG scale of the frozen model on the clean prompt y_c
    beta: float  # CFG scale of the personalized model on y_P (1: no unconditional pass)
    weight: float  # lambda: weight of loss_align in the total loss
    same_noise: bool  # re-noise x0_hat with the personalization branch's eps (else a fresh eps2)
    rescale: bool  # multiply by sqrt(abar_t) / sqrt(1 - abar_t) (Eq. 7)

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, not {self.mode!r}")


def guidance_config(config) -> GuidanceConfig:
    """The guidance of a run, from the project's resolved configuration (project.ProjectConfig). Its
    `palp.guidance` is the run's mode: run.make_plan puts a --guidance override there."""
    palp = config.palp
    return GuidanceConfig(
        mode=palp.guidance, alpha=float(palp.alpha), beta=float(palp.beta), weight=float(palp.weight),
        same_noise=bool(palp.same_noise), rescale=bool(palp.rescale),
    )


# denoise(latents, adapter=..., prompt="clean"|"personal", scale=...) -> the model's fp32 prediction with guidance at
# that scale applied (eps with CFG; a flow model's velocity, flow_guidance.guided_velocity)
Denoiser = Callable[..., torch.Tensor]


class PalpGuidance:
    """The alignment term, method steps 4 to 6, in the parameterisation given (EPSILON for SD 1/2 and SDXL,
    flow_guidance.VELOCITY for Flux.1 and SD 3.x). Has no parameters: the caller passes a `denoise` callable that
    runs the model (adapter on or off, on the clean or the personalization prompt, at guidance scale s) and returns
    its fp32 prediction, and the step's noise level (`abar_t`, or the flow's `sigma`)."""

    def __init__(self, config: GuidanceConfig, parameterisation: Parameterisation):
        self.config = config
        self.parameterisation = parameterisation

    def __call__(
        self,
        *,
        x0_hat: torch.Tensor,
        noise: torch.Tensor,
        level: torch.Tensor,
        denoise: Denoiser,
        fresh_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg_, param = self.config, self.parameterisation
        if cfg_.mode == "none":  # the TI+DB baseline: no term and no extra passes
            return {}
        with torch.no_grad():
            # Step 4: re-noise x0_hat at the same t or s (same eps by default, a fresh eps2 for the ablation)
            renoise_eps = noise if cfg_.same_noise else fresh_noise
            if renoise_eps is None:
                raise ValueError("independent-noise guidance needs fresh_noise")
            x0_hat32, renoise_eps = x0_hat.detach().float(), renoise_eps.float()
            x0_hat_t = param.renoise(x0_hat32, level, renoise_eps)  # shaped as x0_hat
            # Step 5: guidance direction; the frozen model runs with the adapter disabled
            base = denoise(x0_hat_t, adapter=False, prompt="clean", scale=cfg_.alpha).float()  # G_base^alpha(., y_c)
            lora = None
            if cfg_.mode == "palp":
                lora = denoise(x0_hat_t, adapter=True, prompt="personal", scale=cfg_.beta)  # G_lora^beta(., y_P)
            sds_target = param.sds_target(x0_hat32, renoise_eps)  # Eq. 4's eps (velocity: eps - x0_hat)
            r = guidance_direction(cfg_.mode, base, lora, sds_target)
            check_finite("the guidance direction", r)
        # Step 6: Eq. 7 surrogate, gradient flows into x0_hat (and so into the prediction) only
        loss_align = alignment_loss(x0_hat, r, level, param, rescale=cfg_.rescale)
        terms = {"loss_align": loss_align, "guidance_norm": r.detach().pow(2).mean().sqrt()}
        if cfg_.mode == "palp":  # the diagnostic is free: SDS's direction reuses the frozen pass just made
            terms["cos_palp_sds"] = direction_cosine(r, guidance_direction("sds", base, sds_target=sds_target))
        return terms
