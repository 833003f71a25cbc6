"""Stage T's rule (docs/evaluation.md): of the (weight, alpha) work folders given, the highest mean text alignment at
STEP with subject fidelity >= 0.9 x the baseline's on the same cells; if none keeps it, the highest text + fidelity.
Prints the chosen folder's `--weight W --alpha A`.   python -m experiments.choose_tuning STEP NONE_WORK WORK...
"""

import json
import sys
from pathlib import Path

from palpcompose.outputs import out_dir


def means(work: Path, variant: str, step: int):
    text, fid = [], []
    for root in (work / "runs").glob(f"s*-{variant}*"):
        if root.name.split("-")[1] != variant:
            continue
        scores = json.loads((out_dir(root) / "ablation-scores.json").read_text())["steps"][str(step)]
        for v in scores.values():
            text += v["text"]
            fid += v["fidelity"]
    return sum(text) / len(text), sum(fid) / len(fid)


def main():
    step, none_work, works = int(sys.argv[1]), Path(sys.argv[2]), [Path(w) for w in sys.argv[3:]]
    _, none_fid = means(none_work, "none", step)
    rows = []
    for w in works:
        text, fid = means(w, "palp", step)
        settings = json.loads((w / "results.json").read_text())["settings"]
        rows.append((text, fid, settings["weight"], settings["alpha"]))
        print(f"{w}: weight {settings['weight']} alpha {settings['alpha']}: text {text:.3f} fidelity {fid:.3f} "
              f"(none {none_fid:.3f})", file=sys.stderr)
    keep = [r for r in rows if r[1] >= 0.9 * none_fid]
    best = max(keep, key=lambda r: r[0]) if keep else max(rows, key=lambda r: r[0] + r[1])
    print(f"--weight {best[2]:g} --alpha {best[3]:g}")


if __name__ == "__main__":
    main()
