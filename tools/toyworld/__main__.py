"""`python -m tools.toyworld COMMAND`: the tooling that makes `builtin:toy` (not part of the product).

  train-base --out DIR --device D --minutes M [--resume CKPT] [--recipe v1|v2|...|v2e] [--oracle-from DIR]
             [--branch-from CKPT] [--stop-at-step N]                             train the base model
  export-base --ckpt DIR [--dest FOLDER] [--oracle FILE] [--readout DIR2] [--raw]   the diffusers folder and oracle
  readout --ckpt DIR --out DIR2 [--minutes M] [--threads N] [--resume]   fine-tune the VAE decoder, then the oracle
  eval-base [--model FOLDER] [--prompts N] [--steps K] [--guidance-scale G]   the old bar: oracle on N prompts
  speed [--threads T]                     CPU timing of the shipped UNet (batch-1 forward, PALP-like step)
  diagnose --out DIR [--model M] [--subjects N] [--color2 any|white,black]   why a model misses the ceiling
  loss-gap [--model M] [--world W] [--positions N]   what each prompt word is worth to the denoiser, per timestep
  legibility --world W --oracle DIR2   a world read by a read-out's oracle (the v2 instrument's rule)

The product-side measurements (vocab, subject, oracle-accuracy, ceiling) stay in `python -m palpcompose.toyworld`.
The product never imports this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from palpcompose.errors import PalpcomposeError, UserError


def cmd_train_base(args) -> None:
    from dataclasses import replace

    from tools.toyworld.recipes import RECIPES, branch_mismatch, config_from_state
    from tools.toyworld.train_base import train_base

    resume = Path(args.resume) if args.resume else None
    if resume is not None and not (resume if resume.is_dir() else resume.parent).joinpath("state.json").is_file():
        raise UserError(f"--resume {resume}: no state.json there; pass the folder a previous train-base wrote")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu (slow)")
    if resume is not None:  # a resumed run goes on with the recipe its checkpoint recorded
        saved = json.loads((resume if resume.is_dir() else resume.parent).joinpath("state.json").read_text())
        cfg = config_from_state(saved.get("config", {}))
    else:
        cfg = RECIPES[args.recipe]
        if args.oracle_from:
            if not cfg.init_from:
                raise UserError(f"--oracle-from: recipe {args.recipe} trains its own oracle; it is for warm starts")
            cfg = replace(cfg, oracle_from=str(Path(args.oracle_from).resolve()))
    if args.oracle_from and resume is not None:
        raise UserError("--oracle-from sets up a new run; a resumed run goes on with the oracle it recorded")
    branch = Path(args.branch_from) if args.branch_from else None
    if branch is not None:
        if args.oracle_from:
            raise UserError("--oracle-from with --branch-from: a branch reads the oracle its source recorded")
        if resume is not None:
            raise UserError("--branch-from starts a new run from a checkpoint; --resume goes on with one: pass one")
        if not (branch / "state.json").is_file():
            raise UserError(f"--branch-from {branch}: no state.json there; pass the folder a previous train-base wrote")
        if (Path(args.out) / "state.json").exists():
            raise UserError(f"--branch-from: --out {args.out} already holds a run; continue it with --resume "
                            f"{args.out}")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise UserError(f"--stop-at-step must be at least 1 (got {args.stop_at_step})")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.smoke:  # tiny batches and evaluations: checks the whole script end to end in a minute on a CPU
        cfg = replace(cfg, batch=8, vae_batch=8, oracle_batch=8, eval_prompts=4, oracle_eval_images=32,
                      eval_every_s=min(cfg.eval_every_s, 15), sample_steps=4,
                      latent_cache=min(cfg.latent_cache, 64), cache_chunk=32, cache_every_steps=2, gate_subjects=1,
                      gate_old_bar_prompts=4, gate_every_s=cfg.gate_every_s and 1e9,  # v2: the final gate only
                      ckpt_every_s=cfg.ckpt_every_s and 2.0, warmup_steps=5)
    if branch is not None:
        source = config_from_state(json.loads((branch / "state.json").read_text()).get("config", {}))
        cfg = replace(cfg, oracle_from=source.oracle_from)  # a branch reads the oracle its source read
        mismatch = branch_mismatch(source, cfg)
        if mismatch:
            raise UserError(f"--branch-from {branch} --recipe {args.recipe}: {mismatch}; pick a recipe of the same "
                            "world")
    result = train_base(Path(args.out), args.device, args.minutes, resume, cfg=cfg, final_eval=args.final_eval,
                        more_oracle_minutes=args.more_oracle_minutes, stop_at_step=args.stop_at_step,
                        branch_from=branch)
    print(json.dumps(result, indent=2))


def cmd_export_base(args) -> None:
    from palpcompose.toyworld.oracle import MODEL_ORACLE_FILE, ORACLE_PATH
    from tools.toyworld.train_base import export_pipeline

    ckpt = Path(args.ckpt)
    if not (ckpt / "state.json").is_file():
        raise UserError(f"--ckpt {ckpt}: no state.json there; pass the folder train-base wrote")
    readout = None
    if args.readout:  # a candidate: the read-out's decoder, and its oracle beside the model unless --oracle
        from tools.toyworld.readout import load_for_export

        readout = load_for_export(Path(args.readout), ckpt)
    default_oracle = Path(args.dest) / MODEL_ORACLE_FILE if readout is not None else ORACLE_PATH
    export_pipeline(ckpt, Path(args.dest), Path(args.oracle) if args.oracle else default_oracle, readout,
                    raw=args.raw)


def cmd_readout(args) -> None:
    from dataclasses import replace

    from tools.toyworld.readout import SMOKE, GuardFailed, ReadoutConfig, run_readout

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = replace(ReadoutConfig(), **SMOKE) if args.smoke else ReadoutConfig()
    sizes = {k: v for k, v in (("decoder_steps", args.decoder_steps), ("oracle_steps", args.oracle_steps),
                               ("eval_images", args.eval_images), ("oracle_batch", args.oracle_batch),
                               ("oracle_lr", args.oracle_lr)) if v is not None}
    if args.oracle_worlds:
        sizes["oracle_worlds"] = tuple(args.oracle_worlds.split(","))
    if args.oracle_lr is not None and not args.oracle_lr > 0:
        raise UserError(f"--oracle-lr must be above 0 (got {args.oracle_lr})")
    if any(v < (0 if k == "decoder_steps" else 1) for k, v in sizes.items() if k not in ("oracle_lr", "oracle_worlds")):
        raise UserError("--oracle-steps, --oracle-batch and --eval-images must be at least 1, --decoder-steps at "
                        "least 0 (0: keep the decoder, tune the oracle only)")
    if args.world and args.resume:
        raise UserError("--world sets up a new read-out; a resumed one goes on with the world it recorded")
    if sizes and args.resume:
        raise UserError("--decoder-steps/--oracle-steps/--eval-images/--oracle-batch/--oracle-lr/--oracle-worlds set "
                        "a new read-out; a resumed one goes on with the sizes it recorded (drop them, or start another "
                        "--out)")
    cfg = replace(cfg, **sizes)
    ckpt = args.ckpt if args.ckpt == "builtin:toy" else Path(args.ckpt)
    result = run_readout(ckpt, Path(args.out), args.minutes, args.resume, cfg,
                         stop_after_steps=args.stop_after_steps, world_name=args.world)
    print(json.dumps(result, indent=2))
    if result["done"] and not result["guard"]["passed"]:
        raise GuardFailed(f"the fine-tuned oracle reads clean renders worse than before: {result['guard']['dropped']}; "
                          "this read-out must not be used (export-base --readout refuses it)")


def cmd_eval_base(args) -> None:
    import torch

    from palpcompose.models import load_pipeline, resolve_base_model
    from palpcompose.toyworld.ceiling import evaluate_pipeline
    from palpcompose.toyworld.oracle import load_oracle

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
    ids = pipe.tokenizer(["a photo of a red star"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                        return_tensors="pt")
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


def cmd_diagnose(args) -> None:
    from tools.toyworld import diagnose

    diagnose.main(args)


def cmd_probe(args) -> None:
    import torch

    from tools.toyworld.probe import run_probe

    torch.set_num_threads(args.threads)
    freq = tuple(float(v) for v in args.pattern_freq.split(",")) if args.pattern_freq else None
    oracle_dir = Path(args.oracle) if args.oracle else None
    if oracle_dir is not None and not any(oracle_dir.glob("oracle-*.safetensors")):
        raise UserError(f"--oracle {oracle_dir}: no oracle-*.safetensors there; pass a read-out folder")
    if args.siblings and freq is not None:
        raise UserError("--siblings with --pattern-freq: the selection probe keeps the world's pattern geometry")
    if args.alone and not args.siblings:
        raise UserError("--alone is the selection probe's control: use it with --siblings")
    run_probe(Path(args.out), n_subjects=args.subjects, steps=args.steps, batch=args.batch, pattern_freq=freq,
              world_name=args.world, oracle_dir=oracle_dir, draw_only=args.draw_only, siblings=args.siblings,
              alone=args.alone)


def cmd_loss_gap(args) -> None:
    from tools.toyworld import loss_gap

    if args.model != "builtin:toy" and not (Path(args.model) / "model_index.json").is_file():
        raise UserError(f"--model {args.model}: not a diffusers folder (no model_index.json); pass builtin:toy or "
                        "a folder export-base wrote")

    loss_gap.main(args.model, args.world, args.scenes, Path(args.json) if args.json else None, args.threads,
                  args.positions)


def cmd_legibility(args) -> None:
    from tools.toyworld import legibility

    if not any(Path(args.oracle).glob("oracle-*.safetensors")):
        raise UserError(f"--oracle {args.oracle}: no oracle-*.safetensors there; pass a read-out folder")

    legibility.main(args.world, Path(args.oracle), args.images, Path(args.json) if args.json else None,
                    args.threads)


def main(argv: list[str] | None = None) -> None:
    from palpcompose.models import BUILTIN_MODELS
    from palpcompose.toyworld.worlds import WORLDS
    from tools.toyworld.recipes import RECIPES

    v2_worlds = [name for name, w in WORLDS.items() if w.color2_choices]  # the worlds after v1 (white/black)

    parser = argparse.ArgumentParser(prog="python -m tools.toyworld", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-base", help="train builtin:toy")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--resume", default=None)
    p.add_argument("--final-eval", type=int, default=200, help="prompts in the final evaluation (0: none)")
    p.add_argument("--more-oracle-minutes", type=float, default=0.0,
                   help="with --resume: train the already trained oracle this much longer")
    p.add_argument("--smoke", action="store_true", help="tiny batches: a quick end-to-end check of the script")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v1",
                   help="training recipe (ignored with --resume: the checkpoint's recipe goes on)")
    p.add_argument("--oracle-from", default=None, help="a finished read-out folder whose oracle the gates read "
                   "(warm-start recipes; default: the shipped oracle)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--branch-from", default=None, help="a checkpoint: start --recipe from its weights, EMA and step "
                   "count, with fresh AdamW moments (the lever probe's arms)")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop once the UNet has trained this many steps "
                   "(no final gate: the run is measured apart)")
    p.set_defaults(func=cmd_train_base)
    p = sub.add_parser("export-base", help="write the shipped diffusers folder from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dest", default=str(BUILTIN_MODELS["builtin:toy"]))
    p.add_argument("--oracle", default=None, help="where to write the oracle weights (default: the package's; "
                   "with --readout: DEST/oracle.safetensors)")
    p.add_argument("--readout", default=None, help="a finished read-out folder: its VAE decoder and oracle")
    p.add_argument("--raw", action="store_true", help="the trained weights instead of their EMA (diagnostics only)")
    p.set_defaults(func=cmd_export_base)
    p = sub.add_parser("readout", help="fine-tune the VAE decoder, then the oracle, on a checkpoint's world")
    p.add_argument("--ckpt", required=True, help="the train-base checkpoint (read only), or builtin:toy (its VAE "
                   "and the shipped oracle; needs --world)")
    p.add_argument("--world", default=None, choices=v2_worlds,
                   help="with --ckpt builtin:toy: the world to read it on (a checkpoint's own world otherwise)")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=600.0, help="stop (with a checkpoint) after this long")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="go on with the read-out in --out")
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop after this many training steps "
                   "(a speed measurement; resume goes on)")
    p.add_argument("--smoke", action="store_true", help="tiny batches, 3+3 steps: checks the tool end to end")
    p.add_argument("--decoder-steps", type=int, default=None, help="phase 1 steps (default 1,000; 0: the oracle "
                   "alone)")
    p.add_argument("--oracle-steps", type=int, default=None, help="phase 2 steps (default 1,000)")
    p.add_argument("--eval-images", type=int, default=None, help="held-out clean renders per world (default 2,000)")
    p.add_argument("--oracle-batch", type=int, default=None, help="phase 2 batch (default 64), split equally between "
                   "clean and reconstructed renders of each world the oracle trains on")
    p.add_argument("--oracle-lr", type=float, default=None, help="phase 2 peak learning rate (default 2e-4)")
    p.add_argument("--oracle-worlds", default=None, choices=["v1", "v1,v2"],
                   help="worlds the oracle trains on besides the source's (default v1)")
    p.set_defaults(func=cmd_readout)
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
    p = sub.add_parser("diagnose", help="why a base model misses the ceiling (legibility, VAE, binding, prompts)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="builtin:toy")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--color2", default="any", help="'any' (v1 world) or a comma list, e.g. white,black")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--old-bar", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_diagnose)
    p = sub.add_parser("probe", help="can the architecture draw one subject's pattern when trained on it alone")
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pattern-freq", default=None, help="LO,HI periods per object radius (default: the world's)")
    p.add_argument("--world", default="v2", choices=v2_worlds, help="the world the subjects are drawn in")
    p.add_argument("--oracle", default=None, help="a read-out folder whose oracle reads the renders "
                   "(default: the shipped oracle)")
    p.add_argument("--draw-only", action="store_true", help="draw (fine-tune and render) every subject and stop; "
                   "the same command without it later reads what was drawn (e.g. once --oracle has finished)")
    p.add_argument("--siblings", action="store_true", help="the selection probe: each subject's three pattern "
                   "siblings trained together, prompts differing in the pattern word only (selection.json)")
    p.add_argument("--alone", action="store_true", help="with --siblings: each sibling fine-tuned on its own "
                   "(--steps each), the control that separates drawing a pattern from selecting it")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("loss-gap", help="what each prompt word is worth to the denoiser, per timestep band")
    p.add_argument("--model", default="builtin:toy", help="builtin:toy or a diffusers folder (export-base)")
    p.add_argument("--world", default="v2b", choices=sorted(WORLDS))
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--positions", type=int, default=None, help="the UNet reads only the first N text positions")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_loss_gap)
    p = sub.add_parser("legibility", help="a world read by a read-out's oracle: clean, reconstructed, (b)")
    p.add_argument("--world", required=True, choices=sorted(WORLDS))
    p.add_argument("--oracle", required=True, help="a read-out folder")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_legibility)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PalpcomposeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
