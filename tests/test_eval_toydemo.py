"""The toy demo: `init --template toy-demo` draws its references, and projects/toy-demo/ is exactly such a project."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from palpcompose.evaluate import subjects_in
from palpcompose.toyworld import oracle, world

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "projects" / "toy-demo"


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "out" not in p.relative_to(root).parts}


def test_init_toy_demo_draws_the_references_and_matches_the_committed_project(tmp_path, run_cli):
    root = tmp_path / "toy-demo"
    result = run_cli("init", root, "--template", "toy-demo")
    assert result.code == 0, result.err
    fresh = files(root)
    assert len([k for k in fresh if k.startswith("refs/subject/")]) == 5
    assert [k for k in fresh if k.startswith("refs/artwork/")] == [f"refs/artwork/artwork-{i}.png" for i in range(3)]
    assert fresh == files(DEMO)  # same folder name, so the same project name: byte for byte


def test_init_keeps_existing_reference_images(tmp_path, run_cli):
    root = tmp_path / "demo"
    mine = root / "refs" / "subject" / "star-00.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own picture")
    assert run_cli("init", root, "--template", "toy-demo").code == 0
    assert mine.read_bytes() == b"my own picture"


def test_toy_demo_is_an_art_inspired_composition_the_oracle_can_read():
    cfg = tomllib.loads((DEMO / "palp.toml").read_text())  # validated in full by test_main_job_on_builtin_toy
    target, subjects = cfg["palp"]["target_prompt"], cfg["subjects"]
    assert subjects_in(target, subjects) == ["V1", "V2"]
    assert subjects["V1"]["class_name"] == world.subject_from_seed(1).class_name
    assert subjects["V2"]["class_name"] not in world.CLASSES  # an artwork: eval judges its style and ambiance
    assert oracle.prompt_elements(target.replace("[V1]", "star").replace("[V2]", "painting")) == [
        ("style", world.ALL_STYLES.index("watercolor")), ("cls", world.CLASSES.index("star"))]
    # what [V2] brings (the night) and what [V1]'s references share (the sunset) are named by no prompt
    for prompt in (target, cfg["palp"]["clean_prompt"], subjects["V1"]["prompt"], subjects["V2"]["prompt"]):
        assert oracle.parse_prompt(prompt).ambiance is None
    assert "train" not in cfg or not {"steps", "resolution", "learning_rate"} & set(cfg["train"])  # model defaults


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "palpcompose" / "builtin" / "toy" / "model_index.json").is_file(),
                    reason="builtin:toy is not installed in this checkout")
def test_main_job_on_builtin_toy(tmp_path, run_cli):
    """The README's main job, shortened (20 steps, 2 seeds): check -> train -> render -> eval on builtin:toy."""
    import json
    import shutil

    root = tmp_path / "toy-demo"
    shutil.copytree(DEMO, root, ignore=shutil.ignore_patterns("out"))
    assert run_cli("check", root).code == 0
    assert run_cli("train", root, "--steps", "20").code == 0
    assert run_cli("render", root, "--seeds", "0-1").code == 0
    run = next((root / "out" / "renders").iterdir())
    result = run_cli("eval", root, "--renders", run)
    assert result.code == 0, result.err
    data = json.loads((root / "out" / "eval.json").read_text())
    assert data["metric"] == "toy-oracle" and len(data["images"]) == 2
    assert 0 <= data["text_alignment"] <= 1 and 0 <= data["subject_fidelity"] <= 1
