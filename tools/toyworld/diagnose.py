"""Why a base model misses the ceiling: measured, per identity head (docs/toyworld.md, "v2 diagnosis").

    python -m tools.toyworld diagnose --out DIR [--model builtin:toy] [--subjects 8] [--color2 any|white,black]

(a) legibility: the oracle on clean world renders of the ceiling subjects, per style x ambiance;
(b) the VAE: the oracle on the model's VAE reconstructions of the same renders;
(c) binding: in the model's renders of described subjects, how often the oracle reads the two colours swapped, the
    pattern changed, the second colour replaced by another colour;
(d) the training prompts (world.prompts_for with the recipe's drop rates): how often they name the pattern and the
    second colour of a patterned object;
(e) the class word alone, per head, and what the oracle's second-colour head says on solid objects.
Writes DIR/diagnosis.json, DIR/ceiling.json and figures (PNG) into DIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from palpcompose.fsutil import atomic_save_image, atomic_write_text
from palpcompose.models import load_pipeline, resolve_base_model
from palpcompose.toyworld import ceiling, world
from palpcompose.toyworld import oracle as oracle_mod
from tools.toyworld import figures

HEADS = oracle_mod.IDENTITY_HEADS


def _head_means(p: torch.Tensor) -> dict:
    return {h: round(float(p[:, j].mean()), 4) for j, h in enumerate(HEADS)} | {"fidelity": round(float(p.mean()), 4)}


@torch.no_grad()
def legibility(pipe, oracle, subjects, per_cell: int = 2, object_scale=world.OBJECT_SCALE) -> dict:
    """(a) and (b): per style, the oracle's per-head probability of the truth on clean renders and on VAE
    reconstructions (posterior mean and a sample); the subjects drawn at `object_scale` (world.sample_layout)."""
    out = {"clean": {}, "vae_mean": {}, "vae_sample": {}}
    grid_rows = []
    for style in world.STYLES:
        clean_p, mean_p, sample_p = [], [], []
        for subject in subjects:
            imgs = []
            for ambiance in world.AMBIANCES:
                g = torch.Generator().manual_seed(subject.seed + 31 * world.AMBIANCES.index(ambiance))
                imgs.append(world.render(world.subject_scenes(subject, per_cell, g, style, ambiance,
                                                              object_scale=object_scale), g))
            imgs = torch.cat(imgs)
            dist = pipe.vae.encode(imgs * 2 - 1).latent_dist
            rec_mean = ((pipe.vae.decode(dist.mean).sample + 1) / 2).clamp(0, 1)
            g = torch.Generator().manual_seed(subject.seed)
            rec_sample = ((pipe.vae.decode(dist.sample(generator=g)).sample + 1) / 2).clamp(0, 1)
            for store, batch in ((clean_p, imgs), (mean_p, rec_mean), (sample_p, rec_sample)):
                store.append(ceiling.identity_probs(oracle, batch, subject)[0])
            if style == "photo" or subject is subjects[0]:
                grid_rows.append((imgs[:: per_cell][:5], rec_mean[:: per_cell][:5]))
        out["clean"][style] = _head_means(torch.cat(clean_p))
        out["vae_mean"][style] = _head_means(torch.cat(mean_p))
        out["vae_sample"][style] = _head_means(torch.cat(sample_p))
    return out, grid_rows


def binding(report: dict, subjects) -> dict:
    """(c): among described renders, per subject kind (second colour chromatic / white or black)."""
    by_seed = {s.seed: s for s in subjects}
    counts = {}
    for row in report["rows"]:
        if row["kind"] != "described":
            continue
        s = by_seed[row["subject"]]
        kind = "color2_white_black" if world.COLORS2[s.color2] in ("white", "black") else "color2_chromatic"
        c = counts.setdefault(kind, {"renders": 0, "all_four_right": 0, "colors_swapped": 0, "color_is_color2": 0,
                                     "pattern_wrong": 0, "pattern_read_solid": 0, "color2_wrong": 0, "color_wrong": 0,
                                     "class_wrong": 0})
        r = row["read"]
        c["renders"] += 1
        c["all_four_right"] += int(r["cls"] == s.cls and r["color"] == s.color and r["pattern"] == s.pattern
                                   and r["color2"] == s.color2)
        c["colors_swapped"] += int(world.COLORS2[s.color2] == (world.COLORS[r["color"]])
                                   and world.COLORS2[r["color2"]] == world.COLORS[s.color])
        c["color_is_color2"] += int(world.COLORS[r["color"]] == world.COLORS2[s.color2])
        c["pattern_wrong"] += int(r["pattern"] != s.pattern)
        c["pattern_read_solid"] += int(r["pattern"] == 0)
        c["color2_wrong"] += int(r["color2"] != s.color2)
        c["color_wrong"] += int(r["color"] != s.color)
        c["class_wrong"] += int(r["cls"] != s.cls)
    for kind, c in counts.items():
        sel = [r for r in report["rows"] if r["kind"] == "described"
               and ((world.COLORS2[by_seed[r["subject"]].color2] in ("white", "black"))
                    == (kind == "color2_white_black"))]
        c["fidelity"] = round(sum(r["fidelity"] for r in sel) / len(sel), 4)
        c["heads"] = {h: round(sum(r[h] for r in sel) / len(sel), 4) for h in HEADS}
    return counts


def prompt_stats(n: int = 20_000, drop_color: float = 0.1, drop_pattern: float = 0.3, color2_choices=None,
                 solid_fraction: float = 0.4) -> dict:
    """(d): what the training prompts name, with the given drop rates."""
    g = torch.Generator().manual_seed(123)
    s = world.sample_scenes(n, g, color2_choices=color2_choices, solid_fraction=solid_fraction)
    prompts = world.prompts_for(s, g, drop_color, drop_pattern)
    patterned = (s.pattern > 0).tolist()
    names = [" with " in p for p in prompts]
    n_pat = sum(patterned)
    n_named = sum(1 for p, k in zip(patterned, names) if p and k)
    lengths = [len(p.split()) for p in prompts]
    return {"scenes": n, "patterned": round(n_pat / n, 4),
            "patterned_with_pattern_and_color2_named": round(n_named / max(n_pat, 1), 4),
            "share_of_all_prompts_naming_a_pattern": round(sum(names) / n, 4),
            "solid_share_of_prompts_without_pattern": round(
                sum(1 for p, k in zip(patterned, names) if not p and not k) / max(n - sum(names), 1), 4),
            "max_words": max(lengths)}


@torch.no_grad()
def oracle_on_solid(oracle, n: int = 400) -> dict:
    """(e): what the second-colour head says on solid objects (it was never trained on them)."""
    g = torch.Generator().manual_seed(7)
    s = world.sample_scenes(n, g, solid_fraction=1.0)
    probs = oracle_mod.predict(oracle, world.render(s, g))["color2"].mean(0)
    return {c: round(float(p), 4) for c, p in zip(world.COLORS2, probs)}


def main(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    choices = None if args.color2 == "any" else tuple(args.color2.split(","))
    source = resolve_base_model(args.model)
    pipe = load_pipeline(source, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    oracle = oracle_mod.load_oracle()
    subjects = ceiling.ceiling_subjects(args.subjects, choices)
    result = {"model": args.model, "color2_choices": choices, "subjects": [s.describe() for s in subjects]}
    leg, grid_rows = legibility(pipe, oracle, subjects)
    result["legibility"] = leg
    report = ceiling.run_ceiling(pipe, oracle, args.subjects, (0,), args.steps, 5.0, old_bar_prompts=args.old_bar,
                                 color2_choices=choices)
    atomic_write_text(out / "ceiling.json", json.dumps(report, indent=1) + "\n")
    result["ceiling_summary"] = report["summary"]
    result["old_bar"] = report["old_bar"]
    result["verdict"] = report["verdict"]
    result["binding"] = binding(report, subjects)
    result["prompts_v1_recipe"] = prompt_stats(color2_choices=choices)
    result["oracle_color2_on_solid"] = oracle_on_solid(oracle)
    atomic_write_text(out / "diagnosis.json", json.dumps(result, indent=1) + "\n")
    # figures: world vs VAE; the model's described and class-word renders
    atomic_save_image(out / "legibility.png", figures.pairs_grid(grid_rows))
    atomic_save_image(out / "renders.png", figures.ceiling_grid(pipe, subjects[:6], args.steps))
    atomic_save_image(out / "heads.png", figures.head_bars(result))
    print(ceiling.format_table(report))
    print(json.dumps({k: result[k] for k in ("legibility", "binding", "prompts_v1_recipe",
                                              "oracle_color2_on_solid")}, indent=1))
