"""The base-model gate (palpcompose/toyworld/ceiling.py): its thresholds, its summary, a tiny real run, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from palpcompose.toyworld import ceiling, world
from palpcompose.toyworld.__main__ import main as toyworld_main


def _summary(described=0.95, cell=0.85, class_word=0.30):
    styles = {s: described for s in world.STYLES}
    cells = {f"{s}/{a}": described for s, a in ceiling.cells()}
    cells["sketch/night"] = cell
    return {"described": {"by_style": styles, "cells": cells},
            "class_word": {"mean": class_word}}


OLD_BAR_OK = {"cls": 0.94, "color": 0.99, "style": 0.99, "ambiance": 1.0, "all_four": 0.92}


def test_gate_passes_when_every_threshold_is_met():
    v = ceiling.verdict(_summary(), OLD_BAR_OK)
    assert v["passed"] and all(c["ok"] for c in v["checks"].values())
    assert set(v["checks"]) == {"described_min_style_mean", "described_min_cell", "class_word_mean",
                                "old_bar_cls", "old_bar_style", "old_bar_ambiance"}


@pytest.mark.parametrize("summary,old_bar,failing", [
    (_summary(described=0.89), OLD_BAR_OK, "described_min_style_mean"),
    (_summary(cell=0.79), OLD_BAR_OK, "described_min_cell"),
    (_summary(class_word=0.46), OLD_BAR_OK, "class_word_mean"),
    (_summary(), {**OLD_BAR_OK, "cls": 0.89}, "old_bar_cls"),
    (_summary(), {**OLD_BAR_OK, "style": 0.5}, "old_bar_style"),
    (_summary(), {**OLD_BAR_OK, "ambiance": 0.899}, "old_bar_ambiance"),
])
def test_gate_fails_on_each_threshold(summary, old_bar, failing):
    v = ceiling.verdict(summary, old_bar)
    assert not v["passed"]
    assert [k for k, c in v["checks"].items() if not c["ok"]] == [failing]


def test_gate_thresholds_are_inclusive():
    v = ceiling.verdict(_summary(described=0.90, cell=0.80, class_word=0.45), {**OLD_BAR_OK, "cls": 0.90})
    assert v["passed"]


def test_one_style_below_the_bar_fails_even_when_the_average_is_high():
    s = _summary(described=0.99)
    s["described"]["by_style"]["pop art"] = 0.85
    assert not ceiling.verdict(s, OLD_BAR_OK)["checks"]["described_min_style_mean"]["ok"]


def test_summarise_means_per_style_cell_and_head():
    rows = []
    for kind, base in (("described", 0.8), ("class_word", 0.2)):
        for style, ambiance in ceiling.cells():
            bump = 0.1 if style == "photo" else 0.0
            rows.append({"kind": kind, "style": style, "ambiance": ambiance, "cls": 1.0, "color": base + bump,
                         "pattern": base, "color2": base, "fidelity": (1.0 + 3 * base + bump) / 4})
    s = ceiling.summarise(rows)
    assert s["described"]["by_style"]["photo"] == pytest.approx((1.0 + 2.5) / 4, abs=1e-4)
    assert s["described"]["by_style"]["sketch"] == pytest.approx((1.0 + 2.4) / 4, abs=1e-4)
    assert s["class_word"]["heads"]["cls"] == 1.0
    assert s["class_word"]["heads_by_style"]["photo"]["color"] == pytest.approx(0.3)
    assert len(s["described"]["cells"]) == len(world.STYLES) * len(world.AMBIANCES)


def test_prompts_name_the_subject_or_only_its_class():
    subject = world.subject_from_seed(ceiling.CEILING_SEED_START, ("white", "black"))
    described, class_word = ceiling.subject_prompts(subject, "watercolor", "night")
    assert described.startswith("a watercolor painting of ") and described.endswith(" at night")
    assert world.COLORS[subject.color] in described and world.COLORS2[subject.color2] in described
    assert class_word == f"a watercolor painting of {world._article(subject.class_name)} {subject.class_name} at night"


def test_ceiling_subjects_are_outside_every_other_seed_range():
    assert not set(ceiling.CEILING_SUBJECT_SEEDS) & set(world.HELD_OUT_SUBJECT_SEEDS)
    assert min(ceiling.CEILING_SUBJECT_SEEDS) >= 1_000_000


def test_model_world_reads_training_json(tmp_path):
    from palpcompose.toyworld.worlds import WORLDS

    assert ceiling.model_world(tmp_path) is WORLDS["v1"]
    (tmp_path / "training.json").write_text(json.dumps({"world": {"color2_choices": ["white", "black"]}}))
    assert ceiling.model_world(tmp_path) is WORLDS["v2"]
    (tmp_path / "training.json").write_text(json.dumps({"world": {
        "color2_choices": ["white", "black"], "object_scale": [0.5, 0.7], "pattern_freq": [2.2, 2.2],
        "pattern_angle": [0.3, 0.3]}}))
    assert ceiling.model_world(tmp_path) is WORLDS["v2c"]


def test_identity_probs_are_high_on_the_subjects_own_renders_and_low_on_another():
    from palpcompose.toyworld.oracle import load_oracle

    oracle = load_oracle()
    a, b = world.subject_from_seed(1_000_000), world.subject_from_seed(1_000_003)
    assert (a.cls, a.color) != (b.cls, b.color)
    g = torch.Generator().manual_seed(0)
    imgs = world.render(world.subject_scenes(a, 4, g), g)
    own = ceiling.identity_probs(oracle, imgs, a)[0].mean()
    other = ceiling.identity_probs(oracle, imgs, b)[0].mean()
    assert own > 0.9 and other < 0.6


def test_tiny_real_run_of_the_cli(tmp_path, capsys):
    """builtin:toy, one subject, 2 sampling steps, no old bar: every cell measured, table and JSON written."""
    out = tmp_path / "ceiling.json"
    toyworld_main(["ceiling", "--subjects", "1", "--steps", "2", "--old-bar-prompts", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert "gate: NOT PASSED" in text or "gate: PASSED" in text
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 2 * len(world.STYLES) * len(world.AMBIANCES)
    assert all(0.0 <= r["fidelity"] <= 1.0 for r in report["rows"])
    assert report["subjects"][0]["seed"] == ceiling.CEILING_SEED_START
    assert report["old_bar"] is None and "old_bar_cls" not in report["verdict"]["checks"]


def test_cli_rejects_bad_subject_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        toyworld_main(["ceiling", "--subjects", "0", "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "--subjects" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
