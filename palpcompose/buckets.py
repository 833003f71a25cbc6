"""Aspect-ratio buckets: the training sizes of non-square reference images (docs/training.md, "Aspect-ratio buckets").

A non-square reference trains at the bucket whose aspect ratio is nearest its own, instead of a centre square crop
that can cut the subject out. Buckets keep about train.resolution's area (never more, so a run that fits in memory
square fits in every bucket), have sides that are multiples of the model's alignment (`alignment`) and aspect
ratios up to MAX_ASPECT. The square bucket is train.resolution itself, and an image whose nearest bucket is the
square one gets exactly the centre crop it always got, so square references train as before, bit for bit.
"""

from __future__ import annotations

import math

from PIL import Image

MAX_ASPECT = 2.0  # the most elongated bucket: 2:1 (landscape) or 1:2 (portrait)
REAL_MODEL_ALIGNMENT = 64  # bucket sides of models with an 8x VAE (SD 1/2, SDXL), as kohya and diffusers bucket


def alignment(vae_factor: int, unet_downsamples: int) -> int:
    """Pixels each bucket side is a multiple of: the smallest size every UNet level halves evenly (the VAE's factor
    times 2 ** the UNet's downsamplings), a multiple of 8 (diffusers' pipelines, which draw the previews, take no
    other sizes), and at least 64 for models with an 8x VAE (SD 1/2, SDXL): 16 for builtin:toy (4 x 2**2), 64 for
    Stable Diffusion."""
    step = math.lcm(vae_factor * 2 ** unet_downsamples, 8)
    return max(step, REAL_MODEL_ALIGNMENT) if vae_factor >= 8 else step


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """Every bucket (width, height) for train.resolution and the alignment `step`: the square (resolution,
    resolution) first, then for each width a multiple of `step` the tallest height, a multiple of `step`, whose
    area stays within resolution**2, kept when its aspect ratio is at most MAX_ASPECT. Sorted by aspect ratio."""
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    width = step
    while width <= resolution * MAX_ASPECT:
        height = area // width // step * step
        if height >= step and width != height and max(width, height) <= MAX_ASPECT * min(width, height):
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def choose_bucket(size: tuple[int, int], resolution: int, step: int, enabled: bool = True) -> tuple[int, int]:
    """The bucket (width, height) of an image of `size` (width, height): the one whose aspect ratio is nearest the
    image's (in log ratio; the square bucket wins ties). `enabled` False (train.buckets = false): always square."""
    square = (resolution, resolution)
    if not enabled:
        return square
    ratio = math.log(size[0] / size[1])
    return min(bucket_sizes(resolution, step), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), wh != square))


def fit_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The image scaled to cover `bucket` (width, height), aspect ratio kept, then centre-cropped to it; and the
    crop's (top, left) in the scaled image (SDXL's crop coordinates)."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - bw) // 2, (new_h - bh) // 2
    return image.crop((left, top, left + bw, top + bh)), (top, left)


def describe(bucket: tuple[int, int]) -> str:
    """'768x448' (width x height)."""
    return f"{bucket[0]}x{bucket[1]}"
