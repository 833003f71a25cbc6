"""`python -m palpcompose.toyworld COMMAND`: the toy world's command line.

  vocab                                   the exact phrases prompts use (JSON)
  subject --seed S --count N --out DIR    N photo-like reference PNGs of personal subject S, and its description (JSON)
  ceiling [--model M] [--subjects N] [--seeds S..] [--json FILE] [--oracle FILE]   the base-model gate
  oracle-accuracy [--images N] [--oracle FILE]   held-out accuracy of the shipped oracle per head and style

Making the base model (train-base, export-base, eval-base, speed, diagnose) is tooling, not product:
`python -m tools.toyworld` (docs/toyworld.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from palpcompose.errors import PalpcomposeError, UserError


def cmd_vocab(args) -> None:
    from palpcompose.toyworld import world

    print(json.dumps(world.vocab(), indent=2))


def cmd_subject(args) -> None:
    import torch

    from palpcompose.fsutil import atomic_save_image
    from palpcompose.toyworld import world

    if args.count < 1:
        raise UserError(f"--count must be at least 1 (got {args.count})")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more (got {args.seed}); seeds 0-63 are the held-out subjects")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose a folder path")
    subject = world.subject_from_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = world.render(world.subject_scenes(subject, args.count, g), g)
    files = []
    for i, img in enumerate(images):
        path = out / f"subject-{args.seed}-{i:02d}.png"
        atomic_save_image(path, world.to_pil(img))
        files.append(str(path))
    print(json.dumps({**subject.describe(), "files": files}, indent=2))


def cmd_ceiling(args) -> None:
    """The gate of a base model (palpcompose/toyworld/ceiling.py): table on stdout, full report with --json."""
    import torch

    from palpcompose.fsutil import atomic_write_text
    from palpcompose.models import load_pipeline, resolve_base_model
    from palpcompose.toyworld import ceiling
    from palpcompose.toyworld.oracle import load_oracle, model_oracle_path

    if not 1 <= args.subjects <= len(ceiling.CEILING_SUBJECT_SEEDS):
        raise UserError(f"--subjects must be 1-{len(ceiling.CEILING_SUBJECT_SEEDS)} (got {args.subjects})")
    if args.steps < 1 or args.guidance_scale < 1:
        raise UserError("--steps must be at least 1 and --guidance-scale at least 1")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a folder; give a file path")
    _check_oracle_file(args.oracle)
    torch.set_num_threads(args.threads)
    source = resolve_base_model(args.model)
    pipe = load_pipeline(source, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if source.kind not in ("builtin", "folder"):
        raise UserError(f"--model {args.model}: the ceiling needs a diffusers folder or builtin:toy")
    choices = ceiling.model_world(source.location).color2_choices
    oracle_path = Path(args.oracle) if args.oracle else model_oracle_path(source.location)
    report = ceiling.run_ceiling(pipe, load_oracle(oracle_path), args.subjects, tuple(args.seeds), args.steps,
                                 args.guidance_scale, old_bar_prompts=args.old_bar_prompts, color2_choices=choices)
    report["model"] = args.model
    report["oracle"] = str(oracle_path)
    print(f"oracle: {oracle_path}")
    print(ceiling.format_table(report))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")


def _check_oracle_file(path: str | None) -> None:
    if path and not Path(path).is_file():
        raise UserError(f"--oracle {path}: no such file; pass an oracle .safetensors file (export-base writes one "
                        "into a candidate model folder as oracle.safetensors)")


def cmd_oracle_accuracy(args) -> None:
    """Held-out accuracy of the shipped oracle (or --oracle FILE) per head, overall and per style, on freshly rendered
    scenes."""
    import torch

    from palpcompose.toyworld import world
    from palpcompose.toyworld.oracle import ORACLE_PATH, accuracy_by_style, load_oracle

    _check_oracle_file(args.oracle)
    g = torch.Generator().manual_seed(args.seed)
    s = world.sample_scenes(args.images, g, styles=world.ALL_STYLES, exclude_held_out_subjects=False)
    report = accuracy_by_style(load_oracle(args.oracle or ORACLE_PATH), world.render(s, g), s)
    print(json.dumps({"images": args.images, "seed": args.seed, "accuracy": report}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m palpcompose.toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("vocab", help="print the phrases prompts use").set_defaults(func=cmd_vocab)
    p = sub.add_parser("subject", help="write reference images of a personal subject")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_subject)
    p = sub.add_parser("ceiling",
                       help="the base-model gate: described subjects vs the class word, per style x ambiance")
    p.add_argument("--model", default="builtin:toy", help="a diffusers folder or builtin:toy")
    p.add_argument("--subjects", type=int, default=6, help="ceiling subjects (seeds 1,000,000 + i)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="render seeds per subject")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--old-bar-prompts", type=int, default=200, help="prompts for the old bar at guidance 5 (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the full report (every render's record) here")
    p.add_argument("--oracle", default=None,
                   help="oracle weights (default: the model folder's oracle.safetensors if any, else the shipped one)")
    p.set_defaults(func=cmd_ceiling)
    p = sub.add_parser("oracle-accuracy", help="held-out accuracy of the shipped oracle, per head and style")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--oracle", default=None, help="oracle weights to measure (default: the shipped oracle)")
    p.set_defaults(func=cmd_oracle_accuracy)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PalpcomposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
