"""Latents computed once (the v2 recipe): on a CPU, rendering the world costs more than the networks' step, so
training scenes are rendered and encoded once, in chunks, and reused with fresh noise, timesteps and prompt drops.

DIR/cache/chunk-NNNNN.safetensors: the VAE posterior's mean and std (fp16, (N, 4, 16, 16)) and the scene labels.
A chunk is one atomic file whose content depends only on its index and the recipe (seeded from both), so an
interrupted cache resumes exactly and chunks can be reused by a new run of the same recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from palpcompose.fsutil import atomic_save_safetensors
from palpcompose.toyworld import world
from palpcompose.toyworld.worlds import world_of_config

LABELS = ("cls", "color", "pattern", "color2", "style", "ambiance")


@dataclass(frozen=True)
class Labels:
    """Scene attributes without a layout (what the cache keeps), enough for world.prompts_for."""

    cls: torch.Tensor
    color: torch.Tensor
    pattern: torch.Tensor
    color2: torch.Tensor
    style: torch.Tensor
    ambiance: torch.Tensor


def chunk_path(out: Path, chunk: int) -> Path:
    return out / "cache" / f"chunk-{chunk:05d}.safetensors"


@torch.no_grad()
def build_chunk(out: Path, chunk: int, cfg, vae, device) -> dict | None:
    """Render and encode chunk `chunk` (cfg.cache_chunk scenes of the recipe's world) unless it exists; returns
    the seconds spent rendering and encoding, or None when the file was already there."""
    path = chunk_path(out, chunk)
    if path.is_file():
        return None
    t0 = time.time()
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 7919 * chunk + 5)
    s = world_of_config(cfg).scenes(cfg.cache_chunk, g, device, solid_fraction=cfg.solid_fraction)
    images = world.render(s, g)
    t1 = time.time()
    means, stds = [], []
    for k in range(0, len(images), 256):
        dist = vae.encode(images[k:k + 256] * 2 - 1).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    atomic_save_safetensors(path, {"mean": torch.cat(means).cpu(), "std": torch.cat(stds).cpu(),
                                   **{k: getattr(s, k).cpu() for k in LABELS}})
    return {"render_s": round(t1 - t0, 1), "encode_s": round(time.time() - t1, 1)}


def load(out: Path, wanted_chunks: int, max_items: int) -> dict:
    """Every chunk written so far (a prefix, up to `wanted_chunks`), concatenated; "n" items usable, "chunks"."""
    from safetensors.torch import load_file

    files = []
    while len(files) < wanted_chunks and chunk_path(out, len(files)).is_file():
        files.append(chunk_path(out, len(files)))
    parts = [load_file(str(f)) for f in files]
    cache = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    cache["n"] = min(cache["mean"].shape[0], max_items)
    cache["chunks"] = len(files)
    return cache


def draw(cache: dict, n: int, g: torch.Generator, scaling_factor: float) -> tuple[Labels, torch.Tensor]:
    """`n` random cached scenes: their labels and a fresh sample of each one's latent posterior, scaled."""
    idx = torch.randint(cache["n"], (n,), generator=g, device=g.device).cpu()
    mean, std = cache["mean"][idx].float(), cache["std"][idx].float()
    noise = torch.randn(mean.shape, generator=g, device=g.device).cpu()
    return Labels(**{k: cache[k][idx] for k in LABELS}), (mean + std * noise) * scaling_factor
