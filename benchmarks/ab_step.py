"""Before/after of a change to the training step, in one process: train.py (and checkpoint.py) of a git revision
against the working tree's, on identically seeded models, steps interleaved, median CPU time per step each.

    OMP_NUM_THREADS=1 python -m benchmarks.ab_step --rev HEAD~1 --mode palp --steps 16 --arch sd15-thin

`--arch sd15-thin` at its 64 px is the CPU proxy for launch overhead (benchmarks/archs.py). The losses of the two
engines are compared step by step: a change that should keep results prints `losses bit-identical: True`.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import accel, archs
from palpcompose import train as train_now


def _module_from_revision(rev: str, name: str, module_name: str, replace: tuple = ()):
    """palpcompose/<name>.py as it was at `rev`, imported as `module_name` (imports rewritten by `replace`)."""
    source = subprocess.run(["git", "show", f"{rev}:palpcompose/{name}.py"], capture_output=True, text=True,
                            check=True).stdout
    for old, new in replace:
        source = source.replace(old, new)
    path = Path(tempfile.mkdtemp(prefix="palp-ab-")) / f"{module_name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _engine_step(train_module, spec, mode: str, pixels: torch.Tensor):
    """benchmarks.ours.make_engine_step, with its `train` bound to `train_module` (a private copy of ours.py)."""
    ours = importlib.util.module_from_spec(importlib.util.find_spec("benchmarks.ours"))
    ours.__spec__.loader.exec_module(ours)
    ours.train = train_module
    tokenizer = archs.make_tokenizer(spec, tempfile.mkdtemp(prefix="palp-ab-tok-"))
    return ours.make_engine_step(archs.build(spec, "cpu"), tokenizer, mode, accel.AccelOptions(), pixels)[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="git revision of the 'before' train.py")
    p.add_argument("--mode", choices=("none", "palp", "sds"), default="palp")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--arch", choices=("tiny", "toy", "sd15-thin", "sd15"), default="sd15-thin")
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    spec = archs.arch_spec(args.arch)
    _module_from_revision(args.rev, "checkpoint", "palp_ab_checkpoint")
    train_then = _module_from_revision(args.rev, "train", "palp_ab_train",
                                       (("from palpcompose.checkpoint import", "from palp_ab_checkpoint import"),))
    res = spec.default_resolution
    pixels = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    steps = {"before": _engine_step(train_then, spec, args.mode, pixels),
             "after": _engine_step(train_now, spec, args.mode, pixels)}
    cpu_ms: dict[str, list[float]] = {"before": [], "after": []}
    losses: dict[str, list[dict]] = {"before": [], "after": []}
    warmup = 2
    for i in range(warmup + args.steps):
        for name in ("before", "after") if i % 2 else ("after", "before"):  # alternate who goes first
            t = time.process_time()
            losses[name].append(steps[name]())
            if i >= warmup:
                cpu_ms[name].append((time.process_time() - t) * 1000)
    med = {name: statistics.median(v) for name, v in cpu_ms.items()}
    print(f"{args.arch} {args.mode}, {torch.get_num_threads()} thread(s), median CPU ms per step of {args.steps}: "
          f"before ({args.rev}) {med['before']:.1f}, after (working tree) {med['after']:.1f}, "
          f"saved {med['before'] - med['after']:.1f}")
    print(f"losses bit-identical: {losses['before'] == losses['after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
