"""The v2 study's design facts and arithmetic (docs/evaluation.md, "The v2 study (issue 19)"): subjects, regimes,
prompts, variants and knob candidates as fixed before any run; the baseline's trade-off curve, PALP's margin above
it, means with standard errors clustered by subject, and the two rules fixed before any run (PALP's
knobs, builtin:toy's default step count). Pure functions on plain numbers: experiments/study_v2.py feeds them,
tests/test_study_v2.py checks them on hand-made points.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

# ----------------------------------------------------------------------------------------------------------------
# The design's fixed facts (docs/evaluation.md, "The v2 study (issue 19)")

REGIMES = ("R-context", "R-style", "R-nothing")
CONTEXTS = ("sunset", "underwater", "snow")  # R-context: subject k's shared ambiance, k mod 3
REFERENCE_STYLES = ("sketch", "watercolor", "pop art")  # R-style: subject k's shared style, k mod 3
NOTHING_AMBIANCES = ("day", "night", "sunset", "snow", "underwater")  # R-nothing: one each
PERSONALIZATION = {"R-context": "a photo of [V1]", "R-style": "a picture of [V1]", "R-nothing": "a photo of [V1]"}
TARGETS = (("sketch", "night"), ("watercolor", "snow"), ("pop art", "underwater"), ("photo", "sunset"),
           ("pop art", "night"))
TUNING_SUBJECTS = (20, 21, 22, 23)
HELD_OUT = tuple(range(32, 48))  # in this order; 32-39 the core, 40-47 the extension
TRAIN_SEEDS = (0, 1)
RENDER_SEEDS = (0, 1, 2, 3)
SNAPSHOT_EVERY = 25
LORA_SCALES = (0.25, 0.5, 0.75)
REFERENCES = 5
VARIANTS = {  # name -> [palp] settings
    "none": {"guidance": "none"},
    "sds": {"guidance": "sds"},
    "palp": {"guidance": "palp", "same_noise": True, "rescale": True},
    "palp-indep": {"guidance": "palp", "same_noise": False, "rescale": True},
    "palp-norescale": {"guidance": "palp", "same_noise": True, "rescale": False},
}
OTHER_VARIANTS = ("sds", "palp-indep", "palp-norescale")
KNOB_CANDIDATES = {  # (lambda = palp.weight, alpha); beta stays 1.0
    "w1-a7.5": {"weight": 1.0, "alpha": 7.5}, "w3-a7.5": {"weight": 3.0, "alpha": 7.5},
    "w10-a7.5": {"weight": 10.0, "alpha": 7.5}, "w3-a5": {"weight": 3.0, "alpha": 5.0},
    "w3-a15": {"weight": 3.0, "alpha": 15.0},
    "w3-a7.5-t500": {"weight": 3.0, "alpha": 7.5, "t_min": 500},  # run only if the code offers the knob
}
T_MIN_KEY = "guidance_t_min"  # the [palp] key the t >= 500 candidate needs; absent today, so it is not run
KNOB_LETTERS = {"weight": "w", "alpha": "a", "t_min": "m"}  # in run names
HEADS = ("cls", "color", "pattern", "color2")
ID_HEADS = ("color", "pattern", "color2")  # F-id: identity without the class

# ----------------------------------------------------------------------------------------------------------------
# The rules' constants and the arithmetic

# PALP's knobs: the paper's defaults (the tie-break of the knob rule measures distance to them)
PAPER_KNOBS = {"weight": 1.0, "alpha": 7.5}
TEXT_BAR = 0.75  # the knob rule's floor on mean T_palp (and the bar on T_palp)
TIE = 0.01  # margins within this of the best are tied (the knob rule)
STEP_FRACTION = 0.9  # the default-steps rule: 90% of the baseline's maximum mean F
STEP_GRID = 50  # ... at the smallest multiple of 50
MAX_STEPS = 400  # ... up to 400


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (T, F) points, sorted by T ascending (so F descending): every point that no other
    point matches or beats on both T and F. Of points with equal T only the highest F stays; of equal F only the
    highest T."""
    if not points:
        raise ValueError("the baseline's curve needs at least one point")
    kept: list[tuple[float, float]] = []
    for t, f in sorted(points, key=lambda p: (-p[0], -p[1])):  # highest T first; at equal T highest F first
        if not kept or f > kept[-1][1]:  # strictly more F than every point with at least this T
            kept.append((t, f))
    return kept[::-1]


def f_base(points: list[tuple[float, float]], t: float) -> float:
    """F_base(t): the largest fidelity the baseline reaches with text >= t, linear between neighbouring frontier
    points (the frontier joined by straight lines). Below the frontier's lowest T: its highest F (that point has
    text >= t). Above every point's text: the fidelity of the point with the highest text (of those tied on T, the
    highest F)."""
    front = frontier(points)
    if t <= front[0][0]:
        return front[0][1]
    if t >= front[-1][0]:
        return front[-1][1]
    for (t0, f0), (t1, f1) in itertools.pairwise(front):
        if t0 <= t <= t1:
            return f0 + (f1 - f0) * (t - t0) / (t1 - t0)
    raise AssertionError("unreachable: t lies between the frontier's ends")


def margin(points: list[tuple[float, float]], t_palp: float, f_palp: float) -> float:
    """PALP's margin in a cell: F_palp - F_base(T_palp)."""
    return f_palp - f_base(points, t_palp)


def subject_means(values: list[tuple[object, float]]) -> dict[object, float]:
    """(subject, value) pairs (one per cell: prompts x training seeds) -> each subject's mean: the unit of
    replication."""
    groups: dict[object, list[float]] = defaultdict(list)
    for subject, value in values:
        groups[subject].append(value)
    return {subject: sum(v) / len(v) for subject, v in groups.items()}


def clustered_mean(values: list[tuple[object, float]]) -> dict:
    """The study's estimate from (subject, value) pairs: the mean over subjects of each subject's mean, with its
    standard error over subjects (clustered by subject: a subject's cells are not independent). One subject: the
    SE is unknown (nan), never 0."""
    means = list(subject_means(values).values())
    n = len(means)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "subjects": 0, "cells": 0}
    mean = sum(means) / n
    se = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1) / n) if n > 1 else math.nan
    return {"mean": mean, "se": se, "subjects": n, "cells": len(values)}


def fmt_estimate(estimate: dict, digits: int = 3) -> str:
    """'+0.042 ± 0.031 (8 subjects)': the mean and 2 SE."""
    if estimate["subjects"] == 0:
        return "-"
    se = "n/a" if math.isnan(estimate["se"]) else f"{2 * estimate['se']:.{digits}f}"
    return f"{estimate['mean']:+.{digits}f} ± {se} ({estimate['subjects']} subject(s))"


def paper_distance(knobs: dict) -> tuple[int, float]:
    """How far a candidate is from the paper's defaults: (number of knobs that differ, counting a restricted
    timestep range as one; sum of |log ratio| of weight and alpha). Compared as a tuple: fewer changed knobs first."""
    changed = sum(1 for key, value in PAPER_KNOBS.items() if knobs.get(key, value) != value)
    changed += 1 if knobs.get("t_min") else 0
    spread = sum(abs(math.log(knobs.get(key, value) / value)) for key, value in PAPER_KNOBS.items())
    return changed, spread


def knob_rule(candidates: dict[str, dict]) -> str:
    """The pre-registered choice of PALP's knobs. `candidates`: name -> {"knobs": {"weight", "alpha"[, "t_min"]},
    "margin": mean margin, "text": mean T_palp, "fidelity": mean F_palp} over the tuning cells. The candidate with the
    largest mean margin among those with mean T_palp >= 0.75; margins within 0.01 of that best are tied and the one
    closest to the paper's defaults wins (paper_distance; then the larger margin, then the name). If none reaches
    T 0.75: the largest T + F."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    eligible = {name: c for name, c in candidates.items() if c["text"] >= TEXT_BAR}
    if not eligible:
        return max(sorted(candidates), key=lambda n: candidates[n]["text"] + candidates[n]["fidelity"])
    best = max(c["margin"] for c in eligible.values())
    tied = [name for name, c in eligible.items() if c["margin"] >= best - TIE - 1e-12]
    return min(sorted(tied), key=lambda n: (paper_distance(eligible[n]["knobs"]), -eligible[n]["margin"]))


def default_steps_rule(mean_fidelity: dict[int, float]) -> int:
    """The pre-registered default step count: the smallest multiple of 50 (50 ... 400) at which the baseline's mean F
    on its own personalization prompt reaches 90% of its maximum over steps 0-400. `mean_fidelity`: step -> mean F
    over the tuning subjects (every scored step; steps above 400 are ignored)."""
    scored = {step: f for step, f in mean_fidelity.items() if 0 <= step <= MAX_STEPS}
    if not scored:
        raise ValueError("no baseline fidelity scored at steps 0-400")
    target = STEP_FRACTION * max(scored.values())
    for step in range(STEP_GRID, MAX_STEPS + 1, STEP_GRID):
        if step in scored and scored[step] >= target - 1e-12:
            return step
    missing = [s for s in range(STEP_GRID, MAX_STEPS + 1, STEP_GRID) if s not in scored]
    raise ValueError(f"no multiple of {STEP_GRID} reaches {STEP_FRACTION:.0%} of the maximum"
                     + (f" (steps not scored: {missing})" if missing else ""))
