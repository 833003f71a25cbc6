"""scripts/demo's comparison: the baseline project differs from the demo project only in its
guidance, and the compare sheet shows each run's final renders under its own eval caption. Tiny pipeline, fast."""

from __future__ import annotations

import json

import pytest
from conftest import set_in_toml
from test_render_fixtures import make_project, random_weights, write_manifest

from palpcompose.project import load_project
from palpcompose.toyworld import demo_compare as demo
from palpcompose.weights import save_trained_weights


def test_baseline_project_differs_only_in_guidance(tmp_path, tiny_pipeline_dir):
    root = make_project(tmp_path / "demo", tiny_pipeline_dir)
    baseline = demo.make_baseline(root)
    assert baseline == root / "out" / "baseline"
    mine, theirs = load_project(root).config, load_project(baseline).config
    assert mine.palp.guidance == "palp" and theirs.palp.guidance == "none"
    assert theirs.to_dict() == {**mine.to_dict(), "palp": {**mine.to_dict()["palp"], "guidance": "none"}}
    assert (baseline / "refs" / "cat.png").read_bytes() == (root / "refs" / "cat.png").read_bytes()
    # an explicit guidance line is replaced, not duplicated
    set_in_toml(root, "[palp]\n", '[palp]\nguidance = "sds"\n')
    assert load_project(demo.make_baseline(root)).config.palp.guidance == "none"


def scored_run(root, tiny_pipeline_dir, guidance: str, seed: int):
    """Render `root` (random trained weights, manifest naming `guidance`) and score the run with the oracle."""
    from palpcompose.evaluate import evaluate
    from palpcompose.render import render

    tokens = {"V1": "<duo-v1>", "V2": "<duo-v2>"}
    save_trained_weights(root / "out/weights/final", random_weights(tiny_pipeline_dir, tokens, seed=seed, step=4))
    project = load_project(root)
    write_manifest(root, project, guidance=guidance)
    run = render(project).run_dir
    evaluate(project, renders=run, oracle=True)
    return run


@pytest.mark.skipif(not demo.Path(__file__).parent.parent.joinpath("palpcompose/toyworld/oracle.safetensors")
                    .is_file(), reason="needs the shipped toy-world oracle")
def test_compare_sheet_puts_each_runs_renders_under_its_guidance(tmp_path, tiny_pipeline_dir, one_thread):
    from PIL import Image

    root = make_project(tmp_path / "demo", tiny_pipeline_dir)
    set_in_toml(root, 'class_name = "cat"', 'class_name = "star"')
    set_in_toml(root, 'target_prompt = "an oil painting of', 'target_prompt = "a sketch of')  # words the oracle reads
    baseline = demo.make_baseline(root)
    runs = [scored_run(root, tiny_pipeline_dir, "palp", 2), scored_run(baseline, tiny_pipeline_dir, "none", 3)]
    assert demo.latest_run(root) == runs[0] and demo.latest_run(baseline) == runs[1]
    for run, guidance in zip(runs, ("palp", "none")):
        data = json.loads((run / "eval.json").read_text())
        assert data["guidance"] == guidance
        assert demo._caption(data).startswith(f"{guidance}: text {data['text_alignment']:.2f} | [V1] ")
    path = demo.write_compare_sheet(root, runs)
    assert path == root / "out" / "compare-palp-vs-none.png" and "compare" in path.name
    sheet = Image.open(path).convert("RGB")
    cell, pad, head, caption = 128, 4, 20, 18  # 16 px renders enlarged 8x; the layout of compare_sheet
    assert sheet.size == (2 * (cell + pad) + pad, head + 2 * (caption + cell + pad))
    for r, run in enumerate(runs):
        for c, seed in enumerate((0, 1)):
            expected = Image.open(run / f"final_p1_seed{seed}.png").convert("RGB").resize((cell, cell), Image.NEAREST)
            x, y = pad + c * (cell + pad), head + r * (caption + cell + pad) + caption
            assert sheet.crop((x, y, x + cell, y + cell)).tobytes() == expected.tobytes(), (r, seed)
    assert runs[0].joinpath("final_p1_seed0.png").read_bytes() != runs[1].joinpath("final_p1_seed0.png").read_bytes()
