"""Is a world legible to an oracle? (docs/toyworld.md, "v2c": the legibility rule of the v2 instrument.)

    python -m tools.toyworld legibility --world v2c --oracle READOUT_DIR [--images 2000] [--json FILE]

readout.measure on the world alone, with builtin:toy's VAE: clean accuracy per head on the world's held-out set
(readout.EVAL_SEEDS, all five styles), the accuracy on the VAE's reconstructions of it (a posterior sample), and
(b): the per-head probability of the truth on the VAE's posterior-mean reconstructions of the six ceiling subjects
drawn in the world, per style. Read with the read-out's oracle and, for comparison, with the shipped one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from palpcompose.fsutil import atomic_write_text
from palpcompose.toyworld import oracle as oracle_mod
from tools.toyworld import readout
from tools.toyworld.checkpoint import load_sharded
from tools.toyworld.probe import load_toy_pipeline

RULE = 0.95  # every identity head, clean; (b) per style


@torch.no_grad()
def measure(world_name: str, oracle_dir: Path, images: int = 2000) -> dict:
    pipe = load_toy_pipeline()
    tuned = oracle_mod.Oracle()
    tuned.load_state_dict(load_sharded(oracle_dir, "oracle"))
    oracles = {"readout": tuned.eval(), "shipped": oracle_mod.load_oracle().eval()}
    cfg = readout.ReadoutConfig(world=world_name, eval_images=images)
    sets = {world_name: readout.eval_set(world_name, images)}
    out = {"world": world_name, "oracle": str(oracle_dir), "images": images}
    for name, o in oracles.items():
        m = readout.measure(pipe.vae, o, cfg, sets)  # the read-out's own measurement, on this world only
        out[name] = {"clean": m["clean"][world_name], "reconstructed": m["reconstructed"][world_name],
                     "b": {style: v["fidelity"] for style, v in m["b_v2"]["vae_mean"].items()}}
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
