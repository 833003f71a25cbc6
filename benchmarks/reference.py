"""The peer stand-in: a plain eager DreamBooth-LoRA step, written the simplest way.

It follows diffusers' examples/dreambooth/train_dreambooth_lora.py: encode the images with the VAE and the prompt
with the text encoder on every step, draw noise and a timestep, forward diffusion with `add_noise`, predict the
noise with the LoRA UNet, MSE, backward, clip, AdamW. No caching, no guidance, no fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.archs import Components, lora_parameters


class ReferenceStep:
    def __init__(self, c: Components, lr: float = 5e-5, seed: int = 0):
        self.c = c
        self.params = lora_parameters(c.unet)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)  # torch's default implementation (foreach)
        self.generator = torch.Generator(c.device).manual_seed(seed)

    def __call__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.c
        # Images -> latents, every step (the peer does not cache them).
        latents = c.vae.encode(pixel_values.to(c.dtype)).latent_dist.sample(generator=self.generator)
        latents = latents * c.vae.config.scaling_factor
        # Forward diffusion: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps.
        noise = torch.randn(latents.shape, generator=self.generator, device=c.device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, c.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=c.device
        )
        noisy_latents = c.scheduler.add_noise(latents, noise, timesteps)
        # Prompt -> text embeddings, every step.
        encoder_hidden_states = c.text_encoder(input_ids)[0]
        model_pred = c.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}
