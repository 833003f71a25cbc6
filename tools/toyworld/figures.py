"""Small PNG figures for docs/toyworld.md, drawn with PIL only (no plotting library offline)."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from palpcompose.toyworld import ceiling, world

CELL = 64
PAD = 2


def image_grid(rows: list[list[torch.Tensor]], scale: int = 2) -> Image.Image:
    """Rows of (3, 64, 64) images in [0, 1] -> one PIL grid (upscaled `scale`x, nearest)."""
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * (CELL + PAD), len(rows) * (CELL + PAD)), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(world.to_pil(img), (j * (CELL + PAD), i * (CELL + PAD)))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def pairs_grid(grid_rows) -> Image.Image:
    """Each row: five clean world renders, then their VAE reconstructions."""
    return image_grid([list(clean) + list(rec) for clean, rec in grid_rows[:10]])


@torch.no_grad()
def ceiling_grid(pipe, subjects, steps: int = 20) -> Image.Image:
    """Per subject: its world render, then the model's described render in each known style (day), then the
    class-word render in each known style."""
    rows = []
    for subject in subjects:
        g = torch.Generator().manual_seed(subject.seed)
        row = [world.render(world.subject_scenes(subject, 1, g), g)[0]]
        prompts = [ceiling.subject_prompts(subject, s, "day")[0] for s in world.STYLES]
        prompts += [ceiling.subject_prompts(subject, s, "day")[1] for s in world.STYLES]
        row += list(ceiling.render_prompts(pipe, prompts, subject.seed, steps, 5.0))
        rows.append(row)
    return image_grid(rows)


def head_bars(result: dict, width: int = 520, height: int = 220) -> Image.Image:
    """Bars per identity head: world render, VAE reconstruction, the model described, the model class word."""
    series = {
        "world": _avg(result["legibility"]["clean"]),
        "VAE": _avg(result["legibility"]["vae_sample"]),
        "described": result["ceiling_summary"]["described"]["heads"],
        "class word": result["ceiling_summary"]["class_word"]["heads"],
    }
    colors = [(60, 120, 200), (90, 180, 120), (220, 120, 40), (150, 150, 150)]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    heads = ("cls", "color", "pattern", "color2")
    top, bottom, left = 20, height - 40, 30
    d.line((left, bottom, width - 10, bottom), fill="black")
    for v in (0.5, 0.9, 1.0):
        y = bottom - v * (bottom - top)
        d.line((left, y, width - 10, y), fill=(210, 210, 210))
        d.text((2, y - 6), f"{v:.1f}", fill="black")
    group = (width - left - 20) / len(heads)
    bar = group / (len(series) + 1)
    for i, h in enumerate(heads):
        for j, (name, vals) in enumerate(series.items()):
            x0 = left + 10 + i * group + j * bar
            y = bottom - vals[h] * (bottom - top)
            d.rectangle((x0, y, x0 + bar - 3, bottom), fill=colors[j])
        d.text((left + 10 + i * group + bar, bottom + 6), h, fill="black")
    for j, name in enumerate(series):
        d.rectangle((left + 10 + j * 120, height - 14, left + 20 + j * 120, height - 4), fill=colors[j])
        d.text((left + 24 + j * 120, height - 16), name, fill="black")
    return img


def _avg(by_style: dict) -> dict:
    return {h: sum(v[h] for v in by_style.values()) / len(by_style) for h in ("cls", "color", "pattern", "color2")}
