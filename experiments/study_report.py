"""Tables for the PALP study (docs/evaluation.md): per work folder, the baseline's curve relative to step 0, and
per variant the final-step means, the per-prompt differences to `none`, and the logged gradient-norm balance.

    python -m experiments.study_report out/study/A1 out/study/B ...
    python -m experiments.study_report --pair out/study/D:palp out/study/B:palp   # one variant against another's
                                                                                  # runs in another folder, paired

Reads only what scripts/ablation cached (runs/*/out/ablation-scores.json, runs/*/out/logs/train.jsonl); renders
and trains nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from experiments.ablation import mean_se
from palpcompose.outputs import out_dir, train_log_path


def load(work: Path) -> dict:
    """{(subject, variant, run prompt or None): {"scores": {step: {prompt: {...}}}, "log": [...]}}"""
    runs = {}
    for root in sorted((work / "runs").iterdir()):
        scores = out_dir(root) / "ablation-scores.json"
        if not scores.is_file():
            continue
        name = root.name.split("-")
        is_prompt = [p.startswith("p") and p[1:].isdigit() for p in name]
        subject = int(name[0][1:])
        variant = "-".join(p for p, flag in zip(name[1:], is_prompt[1:]) if not flag)
        prompt = next((int(p[1:]) for p, flag in zip(name, is_prompt) if flag), None)
        log_path = train_log_path(out_dir(root))
        log = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.is_file() else []
        runs[(subject, variant, prompt)] = {"scores": json.loads(scores.read_text())["steps"], "log": log}
    return runs


def cells(runs: dict, variant: str, step: int) -> dict:
    """{(subject, prompt): {"text": [...], "fidelity": [...]}} of one variant at one step."""
    out = {}
    for (subject, v, _), run in runs.items():
        if v == variant and str(step) in run["scores"]:
            for prompt, values in run["scores"][str(step)].items():
                out[(subject, int(prompt))] = values
    return out


def fmt(values) -> str:
    m, se = mean_se(values)
    return f"{m:.3f} ± {2 * se:.3f}"


def paired(runs: dict, variants: list[str], reference: str, steps: list[int], reverse: bool = False) -> list[str]:
    """Table rows of `variant - reference` (or `reference - variant` with `reverse`), paired by cell and render
    seed, per step and prompt and over all prompts."""
    label = f"{reference} - variant" if reverse else f"variant - {reference}"
    rows = [f"| variant | step | prompt | images | text: {label} | fidelity: {label} |",
            "| --- | ---: | --- | ---: | ---: | ---: |"]
    for v in variants:
        for step in steps:
            a, b = cells(runs, v, step), cells(runs, reference, step)
            if reverse:
                a, b = b, a
            shared = sorted(set(a) & set(b))
            for prompt in sorted({p for _, p in shared}) + ["all"]:
                keys = [k for k in shared if prompt == "all" or k[1] == prompt]
                dt = [x - y for k in keys for x, y in zip(a[k]["text"], b[k]["text"])]
                df = [x - y for k in keys for x, y in zip(a[k]["fidelity"], b[k]["fidelity"])]
                if len(dt) > 1:
                    rows.append(f"| {v} | {step} | {prompt} | {len(dt)} | {fmt(dt)} | {fmt(df)} |")
    return rows


def report(work: Path) -> str:
    runs = load(work)
    lines = [f"### {work}", ""]
    variants = sorted({v for _, v, _ in runs}, key=lambda v: ["none", "sds", "palp"].index(v) if v in
                      ("none", "sds", "palp") else 9)
    steps = sorted({int(s) for r in runs.values() for s in r["scores"]})
    lines += ["| variant | step | cells | text | fidelity | text - step 0 (paired) | fidelity - step 0 (paired) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in variants:
        base = cells(runs, v, 0)
        for step in steps:
            now = cells(runs, v, step)
            if not now:
                continue
            text = [x for c in now.values() for x in c["text"]]
            fid = [x for c in now.values() for x in c["fidelity"]]
            dt = [a - b for k in now for a, b in zip(now[k]["text"], base[k]["text"])]
            df = [a - b for k in now for a, b in zip(now[k]["fidelity"], base[k]["fidelity"])]
            lines.append(f"| {v} | {step} | {len(now)} | {fmt(text)} | {fmt(fid)} | {fmt(dt)} | {fmt(df)} |")
    if "none" in variants and len(variants) > 1:
        lines += ["", "Paired differences to `none` (same cell, same render seed), per step and prompt:", ""]
        lines += paired(runs, [v for v in variants if v != "none"], "none", steps[1:])
    variants_of_palp = [v for v in variants if v.startswith("palp-")]
    if "palp" in variants and variants_of_palp:  # findings 4 and 5: palp against its own ablations
        lines += ["", "Paired differences of `palp` to its ablations (findings 4 and 5; the cells both ran):", ""]
        lines += paired(runs, variants_of_palp, "palp", steps[1:], reverse=True)
    lines += ["", "Gradient norms w.r.t. the UNet's prediction (train.jsonl; median over steps and runs):", "",
              "| variant | runs | grad_pers | grad_align | grad_align / grad_pers |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for v in variants:
        logs = [e for (_, vv, _), r in runs.items() if vv == v for e in r["log"] if "grad_pers" in e]
        if not logs:
            continue
        pers = statistics.median(e["grad_pers"] for e in logs)
        if "grad_align" in logs[0]:
            align = statistics.median(e["grad_align"] for e in logs)
            ratio = statistics.median(e["grad_align"] / e["grad_pers"] for e in logs if e["grad_pers"] > 0)
            lines.append(f"| {v} | {len({k for k in runs if k[1] == v})} | {pers:.4f} | {align:.4f} | {ratio:.2f} |")
        else:
            lines.append(f"| {v} | {len({k for k in runs if k[1] == v})} | {pers:.4f} | - | - |")
    return "\n".join(lines) + "\n"


def pair_report(first: str, second: str) -> str:
    """`FOLDER:VARIANT` against `FOLDER:VARIANT`, paired by cell and render seed on the cells both have (e.g. palp
    with a described clean prompt against palp with the class word, each in its own study folder)."""
    (work_a, variant_a), (work_b, variant_b) = (s.rsplit(":", 1) for s in (first, second))
    runs_a, runs_b = load(Path(work_a)), load(Path(work_b))
    merged = {(s, first, p): r for (s, v, p), r in runs_a.items() if v == variant_a}
    merged.update({(s, second, p): r for (s, v, p), r in runs_b.items() if v == variant_b})
    steps = sorted({int(s) for r in merged.values() for s in r["scores"]} - {0})
    lines = [f"### {first} against {second}", ""]
    return "\n".join(lines + paired(merged, [first], second, steps)) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--pair"]:
        print(pair_report(args[1], args[2]))
        return
    for work in args:
        print(report(Path(work)))


if __name__ == "__main__":
    main()
