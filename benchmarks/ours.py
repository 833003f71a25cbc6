"""Our training step (method.md "One training step"), built on random-weight components for benchmarking.

The math is palpcompose.guidance's; what this file adds is the engine's caching, at benchmark scale:
- the reference images' latent distributions are encoded ONCE (mean, std); each step samples from them;
- the empty prompt and the clean prompt y_c are encoded ONCE (the frozen text encoder never changes them);
- the personalization prompt y_P is encoded every step, because its placeholder embedding row trains;
- the guidance's no-grad UNet passes go through accel.GuidancePasses (batched CFG, optional CUDA graphs).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.archs import Components, empty_prompt_ids, lora_parameters, random_prompt_ids
from palpcompose import accel
from palpcompose.guidance import GuidanceConfig, PalpGuidance, check_finite, predict_x0


class OurStep:
    def __init__(
        self, c: Components, guidance: GuidanceConfig, opts: accel.AccelOptions, pixel_values: torch.Tensor,
        lr: float = 5e-5, embedding_lr: float = 5e-4, seed: int = 0,
    ):
        self.c, self.guidance, self.opts = c, PalpGuidance(guidance), opts
        batch = pixel_values.shape[0]
        accel.prepare_unet(c.unet, opts)
        # Cache: the VAE runs once per reference image, never in the loop.
        with torch.no_grad():
            dist = c.vae.encode(pixel_values.to(c.dtype)).latent_dist
        self.latent_mean, self.latent_std = dist.mean, dist.std

        # Cache: the frozen prompts. y_P gets a placeholder token whose embedding row is the only trained one.
        spec = c.spec
        self.placeholder_id = spec.text["vocab_size"] - 3
        self.personal_ids = random_prompt_ids(spec, batch, seed=1, device=c.device)
        self.personal_ids[:, 4] = self.placeholder_id
        with torch.no_grad():
            self.null_embeds = c.text_encoder(empty_prompt_ids(spec, 1, device=c.device))[0]
            clean_embeds = c.text_encoder(random_prompt_ids(spec, 1, seed=3, device=c.device))[0]
        self.passes = accel.GuidancePasses(c.unet, self.null_embeds, clean_embeds, opts, c.scheduler.config.prediction_type)

        # Trainable: the LoRA weights (fp32) and the token embedding table (fp32; all rows but the placeholder's are
        # restored after each step, as diffusers' textual_inversion.py does).
        embedding = c.text_encoder.get_input_embeddings()
        embedding.weight.data = embedding.weight.data.float()
        embedding.weight.requires_grad_(True)
        self.frozen_rows = embedding.weight.detach().clone()
        self.keep = torch.ones(embedding.weight.shape[0], dtype=torch.bool, device=c.device)
        self.keep[self.placeholder_id] = False
        self.embedding = embedding
        self.lora_params = lora_parameters(c.unet)
        self.optimizer = accel.make_adamw(
            [{"params": self.lora_params, "lr": lr}, {"params": [embedding.weight], "lr": embedding_lr}], opts,
            weight_decay=1e-2,
        )
        self.alphas_cumprod = c.scheduler.alphas_cumprod.to(c.device, torch.float32)
        self.generator = torch.Generator(c.device).manual_seed(seed)

    def autocast(self):
        if self.c.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.c.device.type, dtype=self.c.dtype)

    def draw(self) -> dict[str, torch.Tensor]:
        """The step's randomness: latents from the cached distribution, noise, timesteps."""
        g, c = self.generator, self.c
        latents = self.latent_mean + self.latent_std * torch.randn(
            self.latent_mean.shape, generator=g, device=c.device, dtype=self.latent_mean.dtype)
        latents = latents.float() * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g, device=c.device)
        timesteps = torch.randint(0, c.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g,
                                  device=c.device)
        return {"latents": latents, "noise": noise, "timesteps": timesteps}

    def __call__(self, draw: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        losses = self.losses(draw or self.draw())
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.lora_params + [self.embedding.weight], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # every embedding row but the placeholder's stays bit-identical
            self.embedding.weight[self.keep] = self.frozen_rows[self.keep]
        return {k: v.detach() for k, v in losses.items()}

    def losses(self, draw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward only: loss_pers + weight * loss_align, with the graph kept for backward."""
        c = self.c
        latents, noise, timesteps = draw["latents"], draw["noise"], draw["timesteps"]
        abar_t = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy_latents = abar_t.sqrt() * latents + (1 - abar_t).sqrt() * noise  # x_t
        with self.autocast(), accel.sdpa_context(self.opts):
            personal_embeds = c.text_encoder(self.personal_ids)[0]
            eps_hat = c.unet(accel.to_memory_format(noisy_latents, self.opts), timesteps, personal_embeds).sample
        eps_hat = eps_hat.float()
        loss_pers = F.mse_loss(eps_hat, noise)  # method.md step 2
        check_finite("loss_pers", loss_pers)
        x0_hat = predict_x0(noisy_latents, eps_hat, abar_t)  # Eq. 2, keeps the graph
        terms = self.guidance(
            x0_hat=x0_hat, noise=noise, abar_t=abar_t,
            denoise=self.passes.bind(timesteps, abar_t, personal_embeds.to(c.dtype)),
        )
        loss = loss_pers
        if "loss_align" in terms:
            loss = loss + self.guidance.config.weight * terms["loss_align"]
        return {"loss": loss, "loss_pers": loss_pers, **terms}
