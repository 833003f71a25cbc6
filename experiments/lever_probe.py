"""The v2e lever probe's reading (docs/toyworld.md, "v2e: the lever probe"), applied to `loss-gap --json` files.

    python -m experiments.lever_probe START.json CONTROL.json ARM.json [ARM.json ...] [--names start,control,...]

Prints, per model, the pattern, colour and second-colour gaps averaged over t = 300-699 (with their standard
errors, the bands' combined as independent) and L(true) averaged over every band; then, per arm, each of the rule's
three conditions against the control and whether the arm helps. The rule was fixed before any arm ran.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BANDS = ((300, 399), (400, 499), (500, 599), (600, 699))
MIN_GAIN, SE_MULT, MAX_LOSS_RISE, KEEP_FRACTION = 0.0015, 2.0, 0.003, 0.8


def summary(report: dict) -> dict:
    rows = [r for r in report["bands"] if tuple(r["t"]) in BANDS]
    if len(rows) != len(BANDS):
        raise SystemExit(f"error: {report.get('model')}: the loss-gap report lacks the bands t = 300-699; write it "
                         "with tools.toyworld loss-gap (all ten bands)")
    out = {"loss_true": sum(r["loss_true"] for r in report["bands"]) / len(report["bands"])}
    for word in ("pattern", "color", "color2"):
        out[word] = sum(r[f"gap_{word}"] for r in rows) / len(rows)
        out[f"{word}_se"] = math.sqrt(sum(r[f"gap_{word}_se"] ** 2 for r in rows)) / len(rows)
    return out


def verdict(arm: dict, control: dict) -> dict:
    diff = arm["pattern"] - control["pattern"]
    se = math.hypot(arm["pattern_se"], control["pattern_se"])
    checks = {
        "pattern gain >= 0.0015 and >= 2 SE": diff >= MIN_GAIN and diff >= SE_MULT * se,
        "L(true) rise <= 0.003": arm["loss_true"] - control["loss_true"] <= MAX_LOSS_RISE,
        "colour and second colour kept >= 0.8": all(arm[w] >= KEEP_FRACTION * control[w] for w in ("color", "color2")),
    }
    return {"pattern_gain": diff, "se": se, "checks": checks, "helps": all(checks.values())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="START CONTROL ARM... loss-gap JSON files")
    parser.add_argument("--names", default=None, help="comma-separated names, one per report")
    args = parser.parse_args(argv)
    if len(args.reports) < 3:
        parser.error("give the start, the control and at least one arm")
    names = args.names.split(",") if args.names else [Path(p).stem for p in args.reports]
    if len(names) != len(args.reports):
        parser.error("--names needs one name per report")
    missing = [p for p in args.reports if not Path(p).is_file()]
    if missing:
        parser.error(f"no such loss-gap report: {', '.join(missing)} (write one with tools.toyworld loss-gap --json)")
    rows = {n: summary(json.loads(Path(p).read_text())) for n, p in zip(names, args.reports)}
    print(f"{'model':<10} {'pattern':>16} {'colour':>16} {'second colour':>16} {'L(true)':>8}")
    for n, r in rows.items():
        print(f"{n:<10} " + " ".join(f"{r[w]:>8.5f}±{r[w + '_se']:.5f}" for w in ("pattern", "color", "color2"))
              + f" {r['loss_true']:>8.4f}")
    control = rows[names[1]]
    helping = []
    for n in names[2:]:
        v = verdict(rows[n], control)
        print(f"\n{n} vs {names[1]}: pattern gain {v['pattern_gain']:+.5f} (SE {v['se']:.5f})")
        for what, ok in v["checks"].items():
            print(f"  {'yes' if ok else 'no ':<4}{what}")
        print(f"  -> {'helps' if v['helps'] else 'does not help'}")
        if v["helps"]:
            helping.append((rows[n]["pattern"], n))
    print(f"\nwinner: {max(helping)[1] if helping else 'none (the control goes on)'}")


if __name__ == "__main__":
    main()
