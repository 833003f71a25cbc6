"""The ablation driver end to end on the tiny pipeline: runs, scores, report, plots, and skipping finished work."""

from __future__ import annotations

import json

import pytest
import torch

from experiments import ablation
from palpcompose.toyworld import oracle as toy_oracle


@pytest.fixture
def oracle(monkeypatch):
    if toy_oracle.ORACLE_PATH.is_file():
        return
    torch.manual_seed(0)
    model = toy_oracle.Oracle().eval()
    monkeypatch.setattr(toy_oracle, "load_oracle", lambda *a, **k: model)


def test_findings_verdicts_follow_the_numbers():
    def row(text, fidelity, se=0.01):
        return {"text": (text, se), "fidelity": (fidelity, se), "n": 10}

    table = {"none": {0: row(0.5, 0.2), 100: row(0.6, 0.5), 200: row(0.4, 0.8)},
             "sds": {200: row(0.7, 0.6)}, "palp": {200: row(0.8, 0.79)}, "palp-indep": {200: row(0.79, 0.7)},
             "palp-norescale": {200: row(0.9, 0.8)}}
    verdicts = {f["finding"]: f["verdict"] for f in ablation.findings(table)}
    assert verdicts == {1: "reproduced", 2: "reproduced", 3: "reproduced",
                        4: "same direction, within noise (2 SE)", 5: "not reproduced"}


def test_ablation_runs_scores_reports_and_skips_finished_runs(tmp_path, tiny_pipeline_dir, oracle, capsys,
                                                              monkeypatch):
    args = ["--work", str(tmp_path / "abl"), "--subjects", "3", "--prompts", "1", "--seeds", "2", "--steps", "2",
            "--every", "1", "--variants", "none,palp", "--base-model", str(tiny_pipeline_dir), "--resolution", "16"]
    ablation.main(args)
    first = capsys.readouterr().out
    assert "train completed" in first
    results = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert set(results["table"]) == {"none", "palp"}
    assert set(results["table"]["palp"]) == {"0", "1", "2"}  # step 0 (base model) and both snapshots
    for steps in results["table"].values():
        for v in steps.values():
            assert 0 <= v["text"][0] <= 1 and 0 <= v["fidelity"][0] <= 1 and v["n"] == 2
    assert results["table"]["none"]["0"] == results["table"]["palp"]["0"]  # step 0: the same base-model renders
    assert [f["finding"] for f in results["findings"]] == [1, 3]
    report = (tmp_path / "abl" / "report.md").read_text()
    assert "| palp | 2 | 2 |" in report and "| 3. PALP raises" in report
    for name in ("ablation-curves.png", "ablation-tradeoff.png"):
        assert (tmp_path / "abl" / name).stat().st_size > 1000
    ablation.main(args)
    second = capsys.readouterr().out
    assert "train completed" not in second and second.count("train up_to_date") == 2
    assert json.loads((tmp_path / "abl" / "results.json").read_text())["table"] == results["table"]
    # --report-only: the same table from the cached scores, with nothing trained or rendered
    (tmp_path / "abl" / "results.json").unlink()
    monkeypatch.setattr(ablation, "train_run", lambda *a: pytest.fail("--report-only trained"))
    monkeypatch.setattr(ablation, "Renderer", lambda *a: pytest.fail("--report-only rendered"))
    ablation.main(args + ["--report-only"])
    assert json.loads((tmp_path / "abl" / "results.json").read_text())["table"] == results["table"]


def test_described_clean_prompt_names_the_whole_subject_for_the_guided_variants_only(tmp_path):
    import tomllib
    from pathlib import Path

    s = ablation.Settings(work=Path(tmp_path), subjects=(1,), prompts=1, seeds=1, steps=2, every=1,
                          variants=("none", "palp"), device="cpu", clean="described")
    palp = tomllib.loads((ablation.write_run(s, 1, "palp", 0) / "palp.toml").read_text())["palp"]
    assert palp["clean_prompt"] == "a sketch of a blue star with white dots at night"
    assert palp["target_prompt"] == "a sketch of [V1] at night"
    # the baseline's project is the one a class-word study writes, so its runs serve both
    none = (ablation.write_run(s, 1, "none", None) / "palp.toml").read_text()
    s_class = ablation.Settings(**{**s.__dict__, "work": Path(tmp_path) / "class", "clean": "class"})
    assert none == (ablation.write_run(s_class, 1, "none", None) / "palp.toml").read_text()
    assert 'clean_prompt = "a sketch of a star at night"' in none


def test_bad_options_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--work", str(tmp_path / "abl"), "--variants", "palp,dds"])
    assert exc.value.code == 2 and "dds" in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()
    for option in ("--learning-rate", "--embedding-learning-rate"):
        with pytest.raises(SystemExit) as exc:
            ablation.main(["--work", str(tmp_path / "abl"), option, "-1"])
        assert exc.value.code == 2 and option in capsys.readouterr().err
        assert not (tmp_path / "abl").exists()
