"""The peer stand-in: a plain eager DreamBooth-LoRA step, written the simplest way.

It follows diffusers' examples/dreambooth/train_dreambooth_lora.py (train_dreambooth_lora_sdxl.py for SDXL: both text
encoders, pooled embedding and size time ids): encode the images with the VAE and the prompt with the text encoder on
every step, draw noise and a timestep, forward diffusion with `add_noise`, predict the
noise with the LoRA UNet, MSE, backward, clip, AdamW. No caching, no guidance, no fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.archs import Models, prepare_for_reference


class ReferenceStep:
    def __init__(self, m: Models, dtype: torch.dtype, lr: float = 5e-5, seed: int = 0):
        self.m, self.dtype = m, dtype
        self.device = m.unet.device
        self.params = prepare_for_reference(m, dtype, seed=seed)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)  # torch's default implementation (foreach)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        m, device = self.m, self.device
        # Images -> latents, every step (the peer does not cache them).
        latents = m.vae.encode(pixel_values.to(self.dtype)).latent_dist.sample(generator=self.generator)
        latents = latents * m.vae.config.scaling_factor
        # Forward diffusion: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps.
        noise = torch.randn(latents.shape, generator=self.generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, m.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=device
        )
        noisy_latents = m.scheduler.add_noise(latents, noise, timesteps)
        # Prompt -> text embeddings, every step.
        if m.text_encoder_2 is None:
            model_pred = m.unet(noisy_latents, timesteps, m.text_encoder(input_ids)[0]).sample
        else:  # SDXL: both encoders' penultimate states, the second's pooled projection, the size conditioning
            first = m.text_encoder(input_ids, output_hidden_states=True)
            second = m.text_encoder_2(input_ids, output_hidden_states=True)
            embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            side = pixel_values.shape[-1]
            time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=device).expand(latents.shape[0], -1)
            added = {"text_embeds": second.text_embeds, "time_ids": time_ids}
            model_pred = m.unet(noisy_latents, timesteps, embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}
