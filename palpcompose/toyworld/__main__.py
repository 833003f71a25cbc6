"""`python -m palpcompose.toyworld COMMAND`: the toy world's command line.

  vocab                                   the exact phrases prompts use (JSON)
  subject --seed S --count N --out DIR    N photo-like reference PNGs of personal subject S, and its description (JSON)
  train-base --out DIR --device D --minutes M [--resume CKPT]   train builtin:toy (VAE, oracle, latent diffusion)
  export-base --ckpt DIR [--dest FOLDER]  write the shipped diffusers folder and oracle from a checkpoint
  eval-base [--model FOLDER] [--prompts N] [--steps K] [--guidance-scale G]   the bar: oracle on N rendered prompts
  oracle-accuracy [--images N]            held-out accuracy of the shipped oracle per head and style
  speed [--threads T]                     CPU timing of the shipped UNet (batch-1 forward, PALP-like step)
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
        atomic_save_image(path, _to_pil(img))
        files.append(str(path))
    print(json.dumps({**subject.describe(), "files": files}, indent=2))


def _to_pil(img):
    from PIL import Image

    return Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def cmd_train_base(args) -> None:
    from dataclasses import replace

    from palpcompose.toyworld.train_base import TrainConfig, train_base

    resume = Path(args.resume) if args.resume else None
    if resume is not None and not (resume if resume.is_dir() else resume.parent).joinpath("state.json").is_file():
        raise UserError(f"--resume {resume}: no state.json there; pass the folder a previous train-base wrote")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu (slow)")
    cfg = TrainConfig()
    if args.smoke:  # tiny batches and evaluations: checks the whole script end to end in a minute on a CPU
        cfg = replace(cfg, batch=8, vae_batch=8, oracle_batch=8, eval_prompts=4, oracle_eval_images=32,
                      eval_every_s=15, sample_steps=4)
    result = train_base(Path(args.out), args.device, args.minutes, resume, cfg=cfg, final_eval=args.final_eval,
                        more_oracle_minutes=args.more_oracle_minutes)
    print(json.dumps(result, indent=2))


def cmd_export_base(args) -> None:
    from palpcompose.toyworld.oracle import ORACLE_PATH
    from palpcompose.toyworld.train_base import export_pipeline

    ckpt = Path(args.ckpt)
    if not (ckpt / "state.json").is_file():
        raise UserError(f"--ckpt {ckpt}: no state.json there; pass the folder train-base wrote")
    export_pipeline(ckpt, Path(args.dest), Path(args.oracle) if args.oracle else ORACLE_PATH)


def cmd_eval_base(args) -> None:
    import torch

    from palpcompose.models import load_pipeline, resolve_base_model
    from palpcompose.toyworld.oracle import load_oracle
    from palpcompose.toyworld.train_base import evaluate_pipeline

    pipe = load_pipeline(resolve_base_model(args.model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    acc = evaluate_pipeline(pipe, load_oracle(), args.prompts, args.guidance_scale, args.steps, seed=1, device="cpu",
                            batch=50)
    print(json.dumps({"prompts": args.prompts, "steps": args.steps, "guidance_scale": args.guidance_scale, **acc}))


def cmd_speed(args) -> None:
    """CPU cost of the shipped UNet: one forward at batch 1, and one PALP-like step (forward + backward at batch 1,
    plus a no-grad forward at batch 2). Prints figures; timings are for reading, never for asserting."""
    import time

    import torch

    from palpcompose.models import load_pipeline, resolve_base_model

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_base_model(args.model), torch_dtype=torch.float32)
    unet = pipe.unet
    x = torch.randn(1, 4, unet.config.sample_size, unet.config.sample_size)
    ids = pipe.tokenizer(["a photo of a red star"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        cond = pipe.text_encoder(ids.input_ids)[0]
        for _ in range(3):
            unet(x, 500, cond)
        start = time.perf_counter()
        for _ in range(args.repeats):
            unet(x, 500, cond)
        forward = (time.perf_counter() - start) / args.repeats
    unet.requires_grad_(True)
    start = time.perf_counter()
    for _ in range(args.repeats):
        unet(x, 500, cond).sample.square().mean().backward()
        with torch.no_grad():
            unet(x.repeat(2, 1, 1, 1), 500, cond.repeat(2, 1, 1))
    step = (time.perf_counter() - start) / args.repeats
    print(json.dumps({"threads": args.threads, "unet_forward_batch1_ms": round(forward * 1000, 1),
                      "palp_like_step_ms": round(step * 1000, 1), "300_steps_s": round(300 * step, 1)}))


def cmd_oracle_accuracy(args) -> None:
    """Held-out accuracy of the shipped oracle per head, overall and per style, on freshly rendered scenes."""
    import torch

    from palpcompose.toyworld import world
    from palpcompose.toyworld.oracle import load_oracle, oracle_targets, predict

    g = torch.Generator().manual_seed(args.seed)
    s = world.sample_scenes(args.images, g, styles=world.ALL_STYLES, exclude_held_out_subjects=False)
    probs = predict(load_oracle(), world.render(s, g))
    report = {}
    for head, target in oracle_targets(s).items():
        ok, keep = probs[head].argmax(-1) == target, target >= 0
        report[head] = {"all_styles": round(float(ok[keep].float().mean()), 4)}
        for i, style in enumerate(world.ALL_STYLES):
            sel = keep & (s.style == i)
            report[head][style] = round(float(ok[sel].float().mean()), 4)
    print(json.dumps({"images": args.images, "seed": args.seed, "accuracy": report}, indent=2))


def main(argv: list[str] | None = None) -> None:
    from palpcompose.models import BUILTIN_MODELS

    parser = argparse.ArgumentParser(prog="python -m palpcompose.toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("vocab", help="print the phrases prompts use").set_defaults(func=cmd_vocab)
    p = sub.add_parser("subject", help="write reference images of a personal subject")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_subject)
    p = sub.add_parser("train-base", help="train builtin:toy")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--resume", default=None)
    p.add_argument("--final-eval", type=int, default=200, help="prompts in the final evaluation (0: none)")
    p.add_argument("--more-oracle-minutes", type=float, default=0.0,
                   help="with --resume: train the already trained oracle this much longer")
    p.add_argument("--smoke", action="store_true", help="tiny batches: a quick end-to-end check of the script")
    p.set_defaults(func=cmd_train_base)
    p = sub.add_parser("export-base", help="write the shipped diffusers folder from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dest", default=str(BUILTIN_MODELS["builtin:toy"]))
    p.add_argument("--oracle", default=None, help="where to write the oracle weights (default: the package's)")
    p.set_defaults(func=cmd_export_base)
    p = sub.add_parser("eval-base", help="oracle recognition rates of a base model on fixed prompts")
    p.add_argument("--model", default="builtin:toy")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.set_defaults(func=cmd_eval_base)
    p = sub.add_parser("speed", help="CPU timing of the shipped UNet (forward, PALP-like step)")
    p.add_argument("--model", default="builtin:toy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(func=cmd_speed)
    p = sub.add_parser("oracle-accuracy", help="held-out accuracy of the shipped oracle, per head and style")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=4242)
    p.set_defaults(func=cmd_oracle_accuracy)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PalpcomposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
