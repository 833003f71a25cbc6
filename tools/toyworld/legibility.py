"""Is a world legible to an oracle? (docs/toyworld.md, "v2c": the legibility rule of the v2 instrument.)

    python -m tools.toyworld legibility --world v2c --oracle READOUT_DIR [--images 2000] [--json FILE]

Clean accuracy per head on the world's held-out set (readout.EVAL_SEEDS, all five styles), the accuracy on
builtin:toy's VAE reconstructions of it (a posterior sample), and (b): the per-head probability of the truth on the
VAE's posterior-mean reconstructions of the six ceiling subjects drawn in the world, per style. Read with the
read-out's oracle and, for comparison, with the shipped one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from palpcompose.fsutil import atomic_write_text
from palpcompose.toyworld import ceiling, world
from palpcompose.toyworld import oracle as oracle_mod
from palpcompose.toyworld.worlds import WORLDS
from tools.toyworld import diagnose, readout
from tools.toyworld.checkpoint import load_sharded
from tools.toyworld.probe import load_toy_pipeline

RULE = 0.95  # every identity head, clean; (b) per style


@torch.no_grad()
def measure(world_name: str, oracle_dir: Path, images: int = 2000) -> dict:
    w = WORLDS[world_name]
    pipe = load_toy_pipeline()
    tuned = oracle_mod.Oracle()
    tuned.load_state_dict(load_sharded(oracle_dir, "oracle"))
    oracles = {"readout": tuned.eval(), "shipped": oracle_mod.load_oracle().eval()}
    g = torch.Generator().manual_seed(readout.EVAL_SEEDS[world_name])
    s = w.scenes(images, g, styles=world.ALL_STYLES, exclude_held_out_subjects=False)
    clean = world.render(s, g)
    rec = readout.reconstruct(pipe.vae, clean, torch.Generator().manual_seed(77))
    subjects = [w.subject(seed) for seed in ceiling.CEILING_SUBJECT_SEEDS[:6]]
    out = {"world": world_name, "oracle": str(oracle_dir), "images": images}
    for name, o in oracles.items():
        b, _ = diagnose.legibility(SimpleNamespace(vae=pipe.vae), o, subjects, per_cell=2,
                                   object_scale=w.object_scale)
        out[name] = {"clean": oracle_mod.accuracy_by_style(o, clean, s),
                     "reconstructed": oracle_mod.accuracy_by_style(o, rec, s),
                     "b": {style: v["fidelity"] for style, v in b["vae_mean"].items()}}
    r = out["readout"]
    out["rule"] = {"need": RULE,
                   "clean_heads": {h: r["clean"][h]["all_styles"] for h in oracle_mod.IDENTITY_HEADS},
                   "b_by_style": r["b"]}
    out["rule"]["met"] = (all(v >= RULE for v in out["rule"]["clean_heads"].values())
                          and all(v >= RULE for v in r["b"].values()))
    return out


def main(world_name: str, oracle_dir: Path, images: int, json_path: Path | None, threads: int) -> None:
    torch.set_num_threads(threads)
    report = measure(world_name, oracle_dir, images)
    for name in ("readout", "shipped"):
        m = report[name]
        heads = " ".join(f"{h} {m['clean'][h]['all_styles']:.3f}/{m['reconstructed'][h]['all_styles']:.3f}"
                         for h in oracle_mod.IDENTITY_HEADS)
        b = " ".join(f"{k} {v:.3f}" for k, v in m["b"].items())
        print(f"{name:8} clean/reconstructed: {heads} | (b) {b}")
    print(f"rule (every identity head clean >= {RULE}, (b) >= {RULE} per style): "
          f"{'met' if report['rule']['met'] else 'NOT met'}")
    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=1))
