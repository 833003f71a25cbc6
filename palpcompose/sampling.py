"""Seeds and samplers of a render: `--seeds` parsed into seeds, and the samplers `render.scheduler` offers, each
built from the base model's own scheduler config (so its noise schedule and prediction type carry over). Which
of them a base model renders with is its family's (models.family.Family.samplers)."""

from __future__ import annotations

import re

from palpcompose.errors import UserError
from palpcompose.project import MAX_SEED

# --scheduler name -> (diffusers class name, extra config, the sampler's name in AUTOMATIC1111's `parameters` text).
SCHEDULERS = {
    "dpm++": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),  # Flux.1 and SD 3 (flow matching): their only one
}


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"0-7"`, `"1,5,9"` or mixes such as `"0-3,10"` -> seeds in the order given, duplicates dropped."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(
                f"--seeds {text!r}: {part!r} is not a seed or a range; write e.g. 0-7, 1,5,9 or 0-3,10"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--seeds {text!r}: range {part!r} runs backwards; write {hi}-{lo}")
        if hi > MAX_SEED:
            raise UserError(f"--seeds {text!r}: {hi} is too large; seeds go from 0 to {MAX_SEED} (as render.seeds)")
        if hi - lo >= 10_000:
            raise UserError(f"--seeds {text!r}: range {part!r} has more than 10000 seeds")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    return tuple(seeds)


def make_scheduler(name: str, base_config):
    """Build the sampler `name` from the base model's scheduler config, so its noise schedule and prediction type
    (epsilon or v_prediction) carry over."""
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"--scheduler {name!r} is not known; choose one of: {', '.join(SCHEDULERS)}")
    class_name, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)
