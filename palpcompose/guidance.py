"""PALP guidance: the prompt-alignment term of "PALP: Prompt Aligned Personalization of Text-to-Image Models"
(Arar et al., arXiv:2401.06105), and its SDS ablation, as pure fp32 tensor functions.

The training loop owns the models and the total loss; this module only turns predictions into loss terms. The
notation follows docs/method.md: `abar_t` is the cumulative product of alphas of the base model's own schedule,
`eps_hat` the personalized model's noise prediction, `x0_hat` the clean latent it implies.

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


def guidance_direction(
    mode: str,
    base_eps: torch.Tensor,
    lora_eps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The direction r that pulls the personalized prediction towards the target prompt.

    palp (Eq. 6, DDS-like): r = G_base^alpha(x0_hat_t, t, y_c) - G_lora^beta(x0_hat_t, t, y_P)
    sds  (Eq. 4):           r = G_base^alpha(x0_hat_t, t, y_c) - eps   (eps: the noise used to re-noise)
    """
    if mode == "palp":
        if lora_eps is None:
            raise ValueError("palp guidance needs the personalized model's prediction")
        return base_eps - lora_eps
    if mode == "sds":
        if noise is None:
            raise ValueError("sds guidance needs the re-noising noise")
        return base_eps - noise
    raise ValueError(f"no guidance direction for mode {mode!r}")


def alignment_loss(
    x0_hat: torch.Tensor, r: torch.Tensor, abar_t: torch.Tensor, rescale: bool = True, w: float = 1.0
) -> torch.Tensor:
    """Eq. 7 as a surrogate loss whose gradient w.r.t. x0_hat is g / numel, per element.

    g = w(t) * sqrt(abar_t) / sqrt(1 - abar_t) * r   (rescale on; g = w(t) * r with it off)
    L_align = sum(g.detach() * x0_hat) / numel

    Since d x0_hat / d eps_hat = -sqrt(1 - abar_t) / sqrt(abar_t) (Eq. 2), with the rescale on the gradient
    w.r.t. eps_hat is -w * r / numel: the alignment gradient rides on the personalization branch's backward
    pass and never back-propagates through the frozen model.
    """
    g = w * r
    if rescale:
        g = g * abar_t.sqrt() / (1 - abar_t).sqrt()
    return (g.detach().float() * x0_hat.float()).sum() / x0_hat.numel()


def direction_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of the per-sample cosine between two guidance directions (B, C, H, W): logged as
    `cos_palp_sds` for palp runs, PALP's r against SDS's r = G_base^alpha(x0_hat_t, t, y_c) - eps at the same
    x0_hat, t and noise (1: PALP pushes exactly where SDS would; docs/evaluation.md, the v2 study). A zero direction
    counts as cosine 0."""
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


# denoise(latents, adapter=..., prompt="clean"|"personal", scale=...) -> eps prediction in fp32, with CFG applied
Denoiser = Callable[..., torch.Tensor]


class PalpGuidance:
    """The alignment term. Has no parameters: the caller passes a `denoise` callable that runs the UNet
    (adapter on or off, on the clean or the personalization prompt, with CFG scale s) and returns fp32 eps."""

    def __init__(self, config: GuidanceConfig):
        self.config = config

    def __call__(
        self,
        *,
        x0_hat: torch.Tensor,
        noise: torch.Tensor,
        abar_t: torch.Tensor,
        denoise: Denoiser,
        fresh_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg_ = self.config
        if cfg_.mode == "none":  # the TI+DB baseline: no term and no extra UNet passes
            return {}
        with torch.no_grad():
            # Step 4: re-noise x0_hat at the same t (same eps by default, a fresh eps2 for the ablation)
            renoise_eps = noise if cfg_.same_noise else fresh_noise
            if renoise_eps is None:
                raise ValueError("independent-noise guidance needs fresh_noise")
            x0_hat_t = renoise(x0_hat.float(), abar_t, renoise_eps.float())
            # Step 5: guidance direction; the frozen model runs with the adapter disabled
            base_eps = denoise(x0_hat_t, adapter=False, prompt="clean", scale=cfg_.alpha)
            lora_eps = None
            if cfg_.mode == "palp":
                lora_eps = denoise(x0_hat_t, adapter=True, prompt="personal", scale=cfg_.beta)
            r = guidance_direction(cfg_.mode, base_eps.float(), lora_eps, renoise_eps.float())
            check_finite("the guidance direction", r)
        # Step 6: Eq. 7 surrogate, gradient flows into x0_hat (and so into eps_hat) only
        loss_align = alignment_loss(x0_hat, r, abar_t, rescale=cfg_.rescale)
        terms = {"loss_align": loss_align, "guidance_norm": r.detach().pow(2).mean().sqrt()}
        if cfg_.mode == "palp":  # the diagnostic is free: SDS's direction reuses the frozen pass just made
            terms["cos_palp_sds"] = direction_cosine(r, guidance_direction("sds", base_eps.float(), None,
                                                                           renoise_eps.float()))
        return terms
