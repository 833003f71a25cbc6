"""Training data: reference images cropped to the training resolution, encoded ONCE by the VAE, sampled per step.

Each reference image (and, for subjects with `flip`, its mirror image) is encoded once; the latent distribution's
mean and std are cached and every step draws a fresh latent from them, as if the VAE had run again. Subjects are
sampled uniformly, then one of the chosen subject's images, so a subject with 20 images is not trained 20 times as
often as one with a single artwork. Every random choice comes from one seeded `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from palpcompose.images import load_reference_image


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to `resolution` (aspect ratio kept, no distortion), then crop the center square."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixel_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class SubjectData:
    key: str  # "V1"
    input_ids: torch.Tensor  # (77,) the personalization prompt y_P, tokenized
    latent_mean: torch.Tensor  # (N, 4, h, w) scaled latents of the N references (N = 2 * images when flipped)
    latent_std: torch.Tensor  # (N, 4, h, w)
    num_images: int
    flip: bool


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, h, w) x, scaled by the VAE's scaling factor
    noise: torch.Tensor  # (B, 4, h, w) eps
    fresh_noise: torch.Tensor  # (B, 4, h, w) eps2, for the independent-noise ablation
    timesteps: torch.Tensor  # (B,) int64 in [0, T)
    input_ids: torch.Tensor  # (B, 77) y_P of each sample's subject
    subjects: list[str]  # subject key of each sample


@torch.no_grad()
def encode_subject(vae, paths: list[Path], resolution: int, flip: bool, device, dtype) -> tuple[torch.Tensor, ...]:
    """Encode each reference (and its mirror when `flip`) once; returns the cached (mean, std), scaled, fp32, CPU."""
    images = [resize_center_crop(load_reference_image(p), resolution) for p in paths]
    if flip:
        images += [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    means, stds = [], []
    for image in images:  # one at a time: peak memory stays that of one image
        pixels = to_pixel_tensor(image).unsqueeze(0).to(device=device, dtype=dtype)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)  # Flux.1, SD 3: latents = (z - shift) * scale
    if shift:
        return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale
    return torch.cat(means) * scale, torch.cat(stds) * scale


def sample_batch(subjects: list[SubjectData], generator: torch.Generator, batch_size: int,
                 num_train_timesteps: int) -> Batch:
    """One batch on the CPU: per sample a subject (uniform), one of its images, a flip, t ~ U[0, T), eps, eps2."""
    latents, keys, ids = [], [], []
    for _ in range(batch_size):
        subject = subjects[int(torch.randint(len(subjects), (1,), generator=generator))]
        index = int(torch.randint(subject.num_images, (1,), generator=generator))
        if subject.flip and int(torch.randint(2, (1,), generator=generator)):
            index += subject.num_images  # the mirrored copy
        mean, std = subject.latent_mean[index], subject.latent_std[index]
        latents.append(mean + std * torch.randn(mean.shape, generator=generator))  # a sample of the cached q(z|x)
        keys.append(subject.key)
        ids.append(subject.input_ids)
    latents = torch.stack(latents)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    fresh_noise = torch.randn(latents.shape, generator=generator)
    return Batch(latents, noise, fresh_noise, timesteps, torch.stack(ids), keys)
