"""Training data: reference images cropped to the training resolution, encoded ONCE by the VAE, sampled per step.

Each reference image (and, for subjects with `flip`, its mirror image) is encoded once; the latent distribution's
mean and std are cached and every step draws a fresh latent from them, as if the VAE had run again. Subjects are
sampled uniformly, then one of the chosen subject's images, so a subject with 20 images is not trained 20 times as
often as one with a single artwork. Every random choice comes from one seeded `torch.Generator`.

Aspect-ratio buckets (buckets.py): a non-square reference is encoded at its bucket's size, so references may have
latents of several shapes. A micro-batch then holds one bucket: `sample_batch` first draws a bucket (with the
probability that the subject-then-image draw above lands in it), then subject and image within it, so each image
is drawn as often as without buckets. With one bucket (square references) no bucket is drawn and the draws are
exactly the earlier ones. Per-image captions give an image its own prompt (`SubjectData.image_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from palpcompose import buckets
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
    # (N, 4, h, w) scaled latents of the N references (N = 2 * images when flipped), or with buckets a list of N
    # (4, h_i, w_i); reference i and its mirror i + num_images have the same shape
    latent_mean: torch.Tensor | list[torch.Tensor]
    latent_std: torch.Tensor | list[torch.Tensor]
    num_images: int
    flip: bool
    image_ids: list[torch.Tensor] | None = None  # per image, its caption's ids (or input_ids); None: no captions
    size_ids: list[torch.Tensor | None] | None = None  # per reference, SDXL's (6,) size values (None: square)

    def shape(self, index: int) -> tuple[int, ...]:
        """The latent shape (h, w) of reference `index`: its bucket."""
        return tuple(self.latent_mean[index].shape[-2:])


@dataclass
class EncodedReferences:
    """encode_references' result: per reference (mirrors after the images), the cached latent distribution and,
    for a bucketed one, SDXL's size values (original height, width, crop top, left, bucket height, width)."""

    means: list[torch.Tensor]  # (4, h, w) each, scaled
    stds: list[torch.Tensor]
    size_ids: list[torch.Tensor | None]  # None: a square centre crop (train.resolution's size values)


@dataclass
class Batch:
    latents: torch.Tensor  # (B, 4, h, w) x, scaled by the VAE's scaling factor
    noise: torch.Tensor  # (B, 4, h, w) eps
    fresh_noise: torch.Tensor  # (B, 4, h, w) eps2, for the independent-noise ablation
    timesteps: torch.Tensor  # (B,) int64 in [0, T)
    input_ids: torch.Tensor  # (B, 77) y_P of each sample's subject (or its image's caption)
    subjects: list[str]  # subject key of each sample
    size_ids: torch.Tensor | None = None  # (B, 6) SDXL's size values of bucketed samples; None: train.resolution's
    captions: bool = False  # a sample has its image's own prompt: training_step encodes each distinct prompt once


@torch.no_grad()
def encode_references(vae, paths: list[Path], resolution: int, flip: bool, device, dtype, *, alignment: int,
                      bucketed: bool = True) -> EncodedReferences:
    """Encode each reference (and its mirror when `flip`) once, at its aspect-ratio bucket (buckets.choose_bucket;
    `alignment` from models.bucket_alignment; `bucketed` False: all square), the mirror at the same size. A
    reference whose bucket is the square one gets the centre crop (resize_center_crop) and the latents it always
    got, bit for bit. Returns the cached distributions, scaled, fp32, CPU."""
    images, size_ids = [], []
    for path in paths:
        image = load_reference_image(path)
        bucket = buckets.choose_bucket(image.size, resolution, alignment, bucketed)
        if bucket == (resolution, resolution):
            images.append(resize_center_crop(image, resolution))
            size_ids.append(None)
        else:
            fitted, (top, left) = buckets.fit_bucket(image, bucket)
            images.append(fitted)
            size_ids.append(torch.tensor([image.height, image.width, top, left, bucket[1], bucket[0]],
                                         dtype=torch.float32))
    if flip:
        images += [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
        size_ids += [_mirrored(s) for s in size_ids]
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)  # Flux.1, SD 3: latents = (z - shift) * scale
    means, stds = [], []
    for image in images:  # one at a time: peak memory stays that of one image
        pixels = to_pixel_tensor(image).unsqueeze(0).to(device=device, dtype=dtype)
        dist = vae.encode(pixels).latent_dist
        mean = dist.mean.float().cpu()[0]
        means.append(((mean - shift) if shift else mean) * scale)
        stds.append(dist.std.float().cpu()[0] * scale)
    return EncodedReferences(means, stds, size_ids)


def _mirrored(size_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The size values of a reference's mirror image: the crop's left edge seen from the other side."""
    if size_ids is None:
        return None
    orig_h, orig_w, top, left, height, width = size_ids.tolist()
    scaled_w = round(orig_w * max(width / orig_w, height / orig_h))  # the width buckets.fit_bucket scaled to
    return torch.tensor([orig_h, orig_w, top, max(scaled_w, width) - width - left, height, width])


def sample_batch(subjects: list[SubjectData], generator: torch.Generator, batch_size: int,
                 num_train_timesteps: int) -> Batch:
    """One batch on the CPU: per sample a subject (uniform), one of its images, a flip, t ~ U[0, T), eps, eps2.
    With references of several buckets, a bucket first (see the module's doc); every sample is of that bucket."""
    shapes = sorted({s.shape(i) for s in subjects for i in range(s.num_images)})
    shape = None
    if len(shapes) > 1:
        # P(bucket) = sum over subjects of P(subject) * (its images in the bucket / its images)
        weights = torch.tensor([sum(len(_in_bucket(s, b)) / s.num_images for s in subjects) for b in shapes],
                               dtype=torch.float64)
        shape = shapes[int(torch.multinomial(weights, 1, generator=generator))]
    latents, keys, ids, sizes = [], [], [], []
    for _ in range(batch_size):
        if shape is None:  # one bucket: exactly the draws of before buckets
            subject = subjects[int(torch.randint(len(subjects), (1,), generator=generator))]
            index = int(torch.randint(subject.num_images, (1,), generator=generator))
        else:  # a subject with images in the bucket (as likely as the draw above lands there), then one of them
            share = torch.tensor([len(_in_bucket(s, shape)) / s.num_images for s in subjects], dtype=torch.float64)
            subject = subjects[int(torch.multinomial(share, 1, generator=generator))]
            choices = _in_bucket(subject, shape)
            index = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        image = index
        if subject.flip and int(torch.randint(2, (1,), generator=generator)):
            index += subject.num_images  # the mirrored copy
        mean, std = subject.latent_mean[index], subject.latent_std[index]
        latents.append(mean + std * torch.randn(mean.shape, generator=generator))  # a sample of the cached q(z|x)
        keys.append(subject.key)
        ids.append(subject.input_ids if subject.image_ids is None else subject.image_ids[image])
        sizes.append(None if subject.size_ids is None else subject.size_ids[index])
    latents = torch.stack(latents)
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    fresh_noise = torch.randn(latents.shape, generator=generator)
    size_ids = torch.stack(sizes) if all(s is not None for s in sizes) else None
    captions = any(s.image_ids is not None for s in subjects)
    return Batch(latents, noise, fresh_noise, timesteps, torch.stack(ids), keys, size_ids, captions)


def _in_bucket(subject: SubjectData, shape: tuple[int, ...]) -> list[int]:
    """The subject's images (indices below num_images) whose latents have `shape`."""
    return [i for i in range(subject.num_images) if subject.shape(i) == shape]
