"""The v2 study's analysis and report (experiments/study_v2.py runs the study, study_v2_stats.py holds the design
and the arithmetic): per cell PALP's margin above the baseline's curve, per regime and overall the estimates clustered
by subject, the knob choice and the default step count by the pre-registered rules, and WORK/report.md."""

from __future__ import annotations

from experiments import study_v2_stats as st
from experiments.study_v2_stats import HEADS, KNOB_CANDIDATES, REGIMES, VARIANTS


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summary(point: dict) -> dict:
    """A point's means over its render seeds."""
    out = {"T": _mean(point["text"]), "F": _mean(point["fidelity"]), "F_id": _mean(point["fid_id"]),
           "saturation": _mean(point["saturation"]), "diversity": point["diversity"]}
    out.update({f"head_{h}": _mean(v) for h, v in point["heads"].items()})
    return out


def baseline_curve(points: dict) -> list[tuple[float, float]]:
    """The baseline's (T, F) points of one cell: the base model, every snapshot and the scaled final LoRA."""
    return [(summary(p)["T"], summary(p)["F"]) for p in points.values()]


def cells(records: list[dict]) -> list[dict]:
    """One row per (guided run, its prompt): PALP's (or a variant's) final point, its margin above the `none` curve
    of the same subject, regime and training seed, and the `none` run's final point."""
    nones = {(r["run"].phase, r["run"].subject, r["run"].regime, r["run"].seed): r for r in records
             if r["run"].variant == "none"}
    rows = []
    for r in records:
        run = r["run"]
        base = nones.get((run.phase, run.subject, run.regime, run.seed))
        if run.variant == "none" or base is None:
            continue
        for target, points in r["points"].items():
            final = points.get(f"{r['final']}@1")
            curve = base["points"].get(target)
            if final is None or not curve or f"{base['final']}@1" not in curve:
                continue
            me, none_final = summary(final), summary(curve[f"{base['final']}@1"])
            snapshots = {int(k.split("@")[0]): summary(v) for k, v in points.items() if k.endswith("@1")}
            rows.append({"subject": run.subject, "regime": run.regime, "seed": run.seed, "variant": run.variant,
                         "knobs": dict(run.knobs), "target": target, **me,
                         "margin": st.margin(baseline_curve(curve), me["T"], me["F"]),
                         "none": none_final, "base": summary(curve["base"]), "cos": r["cos"],
                         "snapshots": snapshots})
    return rows


def estimate(rows: list[dict], value) -> dict:
    return st.clustered_mean([(row["subject"], value(row)) for row in rows])


def analyse(records: list[dict], phase: str) -> dict:
    """The phase's results: per regime and overall estimates (held-out), the knob choice (tune), the default step
    count (steps)."""
    if phase == "steps":
        by_step: dict[int, list[tuple[int, float]]] = {}
        for r in records:
            (points,) = r["points"].values()
            for name, point in points.items():
                step = 0 if name == "base" else int(name.split("@")[0])
                if name == "base" or name.endswith("@1"):
                    by_step.setdefault(step, []).append((r["run"].subject, summary(point)["F"]))
        curve = {step: st.clustered_mean(v) for step, v in sorted(by_step.items())}
        try:
            chosen = st.default_steps_rule({step: e["mean"] for step, e in curve.items()})
        except ValueError as exc:
            chosen = f"undetermined: {exc}"
        return {"curve": curve, "default_steps": chosen}
    rows = cells(records)
    if phase == "tune":
        table = {}
        for name, knobs in KNOB_CANDIDATES.items():
            mine = [row for row in rows if row["knobs"] == knobs]
            if mine:
                table[name] = {"knobs": knobs, "margin": estimate(mine, lambda r: r["margin"])["mean"],
                               "text": estimate(mine, lambda r: r["T"])["mean"],
                               "fidelity": estimate(mine, lambda r: r["F"])["mean"], "subjects": len(mine)}
        return {"candidates": table, "chosen": st.knob_rule(table) if table else None}
    out = {}
    for regime in (*REGIMES, "all"):
        for variant in VARIANTS:
            mine = [row for row in rows if row["variant"] == variant and regime in (row["regime"], "all")]
            if not mine:
                continue
            out[f"{regime}|{variant}"] = {
                "margin": estimate(mine, lambda r: r["margin"]), "T": estimate(mine, lambda r: r["T"]),
                "F": estimate(mine, lambda r: r["F"]), "F_id": estimate(mine, lambda r: r["F_id"]),
                "T - none": estimate(mine, lambda r: r["T"] - r["none"]["T"]),
                "F - none": estimate(mine, lambda r: r["F"] - r["none"]["F"]),
                "F_id - none": estimate(mine, lambda r: r["F_id"] - r["none"]["F_id"]),
                "cos_palp_sds": estimate([r for r in mine if r["cos"] is not None], lambda r: r["cos"]),
                "per_head": {h: estimate(mine, lambda r, h=h: r[f"head_{h}"]) for h in HEADS},
                "saturation": estimate(mine, lambda r: r["saturation"]),
                "diversity": estimate(mine, lambda r: r["diversity"]),
                "none_final": {k: estimate(mine, lambda r, k=k: r["none"][k]) for k in
                               ("T", "F", "F_id", "saturation", "diversity")},
                "base": {k: estimate(mine, lambda r, k=k: r["base"][k]) for k in ("T", "F", "F_id", "saturation")},
                "snapshots": {step: {k: estimate([r for r in mine if step in r["snapshots"]],
                                                 lambda r, k=k, step=step: r["snapshots"][step][k]) for k in ("T", "F")}
                              for step in sorted({s for r in mine for s in r["snapshots"]})},
            }
    return {"estimates": out, "cells": len(rows)}


def bar(entry: dict) -> str:
    """The issue's bar on one estimate: margin >= 0.05, T_palp >= 0.75, F_palp >= 0.5 (means)."""
    checks = [("margin", entry["margin"]["mean"], 0.05), ("T", entry["T"]["mean"], 0.75),
              ("F", entry["F"]["mean"], 0.5)]
    missed = [f"{name} {value:.3f} < {goal}" for name, value, goal in checks if not value >= goal]
    return "met" if not missed else "missed: " + ", ".join(missed)


def _f(estimate: dict) -> str:
    return st.fmt_estimate(estimate)


def markdown(phase: str, result: dict, header: list[str], smoke: bool = False) -> str:
    """The phase's report.md section (`smoke`: a pipeline check, so the issue's bar is not judged)."""
    lines = [f"## Phase {phase}", ""]
    if phase == "steps":
        lines += [("The baseline (`none`, R-context) on its own personalization prompt `a photo of [V1]`: mean F over "
                  "the tuning subjects per training step (step 0: the base model with the class word)."), "",
                  "| step | F (mean ± 2 SE over subjects) |", "| ---: | ---: |"]
        lines += [f"| {step} | {_f(e)} |" for step, e in result["curve"].items()]
        lines += ["", (f"**Default step count by the pre-registered rule** (smallest multiple of {st.STEP_GRID} up to "
                  f"{st.MAX_STEPS} reaching {st.STEP_FRACTION:.0%} of the maximum): {result['default_steps']}")]
    elif phase == "tune":
        lines += ["Tuning cells: subjects 20-23, R-context, first prompt, training seed 0. Mean over subjects.", "",
                  "| candidate | subjects | margin | T_palp | F_palp |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {c['subjects']} | {c['margin']:+.3f} | {c['text']:.3f} | {c['fidelity']:.3f} |"
                  for name, c in result["candidates"].items()]
        lines += ["", f"**Chosen by the pre-registered rule**: {result['chosen']}"]
    else:
        est = result["estimates"]
        lines += [(f"{result['cells']} cell(s) scored. Every figure: mean over subjects ± 2 SE over subjects "
                  "(clustered by subject)."), "",
                  "| regime | variant | margin above the baseline's curve | T | F | F-id | bar (issue 19) |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        for key, e in est.items():
            regime, variant = key.split("|")
            lines.append(f"| {regime} | {variant} | {_f(e['margin'])} | {_f(e['T'])} | {_f(e['F'])} | "
                         f"{_f(e['F_id'])} | "
                         f"{('not judged (smoke)' if smoke else bar(e)) if variant == 'palp' else ''} |")
        lines += ["", "Against the baseline at its final step (paired by cell):", "",
                  "| regime | variant | T - none | F - none | F-id - none | cos(PALP, SDS) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {k.split('|')[0]} | {k.split('|')[1]} | {_f(e['T - none'])} | {_f(e['F - none'])} | "
                  f"{_f(e['F_id - none'])} | {_f(e['cos_palp_sds'])} |" for k, e in est.items()]
        lines += ["", ("Identity heads, saturation and diversity at the final step (the base model and the baseline "
                  "for reference):"), "",
                  "| regime | variant | " + " | ".join(HEADS) + " | saturation | diversity | none: saturation | "
                  "none: diversity | base: saturation |", "| --- | --- |" + " ---: |" * (len(HEADS) + 5)]
        for key, e in est.items():
            heads = " | ".join(_f(e["per_head"][h]) for h in HEADS)
            lines.append(f"| {key.split('|')[0]} | {key.split('|')[1]} | {heads} | {_f(e['saturation'])} | "
                         f"{_f(e['diversity'])} | {_f(e['none_final']['saturation'])} | "
                         f"{_f(e['none_final']['diversity'])} | {_f(e['base']['saturation'])} |")
        lines += ["", ("Each guided variant's own snapshots (a curve of its own; the margin uses the final weights "
                  "only):"), "", "| regime | variant | step | T | F |", "| --- | --- | ---: | ---: | ---: |"]
        for key, e in est.items():
            lines += [f"| {key.split('|')[0]} | {key.split('|')[1]} | {step} | {_f(v['T'])} | {_f(v['F'])} |"
                      for step, v in e["snapshots"].items()]
    return "\n".join(header + lines) + "\n"
