"""Everyday friction a new user meets on the command line: what `init` says, option names, --help,
quoted paths in hints, and messages that name what is wrong."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import tree_snapshot


def test_init_with_a_hub_template_says_the_model_must_be_downloaded(tmp_path, run_cli, monkeypatch):
    from palpcompose.models import resolve

    monkeypatch.setattr(resolve, "_hub_cached", lambda repo_id: False)
    result = run_cli("init", tmp_path / "cat", "--template", "single-subject")
    assert result.code == 0, result.err
    assert "note:" in result.err and "not in this machine's Hugging Face cache" in result.err
    assert "hf download stabilityai/stable-diffusion-2-1-base" in result.err and "builtin:toy" in result.err
    toy = run_cli("init", tmp_path / "toy", "--template", "toy-demo")
    assert toy.code == 0 and "Hugging Face" not in toy.err


@pytest.fixture
def trained(tmp_path, tiny_pipeline_dir):
    """A project with final weights and a snapshot at step 2 (test_render_fixtures), without training."""
    from test_render_fixtures import make_project

    return make_project(tmp_path / "proj", tiny_pipeline_dir)


def _only_render(root):
    (run,) = (root / "out" / "renders").iterdir()
    return json.loads((run / "render.json").read_text())


def test_render_sampling_steps_and_snapshot_are_named_for_what_they_do(trained, run_cli):
    result = run_cli("render", trained, "--seeds", "0", "--sampling-steps", "1", "--snapshot", "2")
    assert result.code == 0, result.err
    assert "note:" not in result.err
    index = _only_render(trained)
    assert index["settings"]["steps"] == 1 and {i["model"] for i in index["images"]} == {"step-000002"}
    help_text = run_cli("render", "--help").out
    assert "--sampling-steps" in help_text and "--snapshot" in help_text
    assert "--steps " not in help_text  # the old name is hidden, train's --steps is the only one shown


def test_render_old_steps_spelling_still_works_with_a_note(trained, run_cli):
    result = run_cli("render", trained, "--seeds", "0", "--steps", "1", "--step", "2")  # --step: the contract's
    assert result.code == 0, result.err
    assert "note: render --steps is now --sampling-steps" in result.err
    assert "--step is" not in result.err  # --step, the contract's spelling of --snapshot, is not deprecated
    index = _only_render(trained)
    assert index["settings"]["steps"] == 1 and index["images"][0]["model"] == "step-000002"
    both = run_cli("render", trained, "--steps", "1", "--sampling-steps", "2")
    assert both.code == 2 and "give only --sampling-steps" in both.err


def test_export_and_eval_take_snapshot_too(trained, run_cli, tmp_path):
    result = run_cli("export", trained, "--format", "diffusers", "--out", tmp_path / "exp", "--snapshot", "2")
    assert result.code == 0, result.err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exp" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["palpcompose_step"] == "2"
    assert "--snapshot" in run_cli("eval", "--help").out


COMMANDS = ("init", "check", "train", "render", "export", "eval")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_as_flags_and_h_is_help(run_cli, command):
    long, short = run_cli(command, "--help"), run_cli(command, "-h")
    assert long.code == short.code == 0 and long.out == short.out
    assert "<bool>" not in long.out and "-h, --help" in long.out
    if command == "train":
        assert "--resume " in long.out and "--resume <" not in long.out


def test_root_help_lists_debug_and_h(run_cli):
    result = run_cli("-h")
    assert result.code == 0 and "--debug" in result.out and "<bool>" not in result.out


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_shows_the_traceback_and_keeps_exit_2(tmp_path, run_cli, monkeypatch, where):
    monkeypatch.setenv("PALP_DEBUG", "")  # restored after the test: --debug sets it
    missing = tmp_path / "nowhere"
    args = ["--debug", "check", missing] if where == "before" else ["check", missing, "--debug"]
    result = run_cli(*args)
    assert result.code == 2, result.err
    assert "Traceback" in result.err and "UserError" in result.err
    assert "error:" in result.err and "no such project folder" in result.err


def test_without_debug_no_traceback(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("PALP_DEBUG", raising=False)
    result = run_cli("check", tmp_path / "nowhere")
    assert result.code == 2 and "Traceback" not in result.err


def test_render_help_gives_every_default(run_cli):
    out = " ".join(run_cli("render", "--help").out.split())  # unwrapped
    for default in ("default: render.seeds", "default: render.steps", "default: render.guidance_scale",
                    "default: render.prompts, else palp.target_prompt", "default: a new folder in DIR/out/renders/"):
        assert default in out, default


def test_render_out_writes_the_run_where_asked(trained, run_cli, tmp_path):
    target = tmp_path / "picked" / "here"
    result = run_cli("render", trained, "--seeds", "0", "--sampling-steps", "1", "--out", target)
    assert result.code == 0, result.err
    assert sorted(p.name for p in target.iterdir()) == ["contact-sheet.png", "final_p1_seed0.png", "render.json"]
    assert not (trained / "out" / "renders").exists()
    assert str(target) in "".join(result.out.split())  # the table names the folder (wrapped)


def test_render_out_refuses_a_folder_with_files(trained, run_cli, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine.png").write_bytes(b"not yours")
    before = tree_snapshot(tmp_path)
    result = run_cli("render", trained, "--seeds", "0", "--out", target)
    assert result.code == 2 and "--out" in result.err and "not empty" in result.err, result.err
    assert tree_snapshot(tmp_path) == before


def test_hints_quote_paths_for_the_shell(tmp_path, run_cli, trained):
    root = tmp_path / "mon chat é"
    result = run_cli("init", root, "--template", "toy-demo")
    assert result.code == 0, result.err
    assert f"`palpcompose check {shlex.quote(str(root))}`" in " ".join(result.out.split())
    missing = run_cli("check", tmp_path / "no such")
    assert f"`palpcompose init '{tmp_path / 'no such'}'`" in missing.err
    # render's advice names the project folder the way a shell reads it
    moved = trained.rename(tmp_path / "trained é")
    for weights in ("weights", "snapshots"):
        shutil.rmtree(moved / "out" / weights)
    untrained = run_cli("render", moved)
    assert untrained.code == 2 and f"`palpcompose train '{moved}'`" in untrained.err, untrained.err


@pytest.mark.parametrize("folder, name, says", [
    ("猫", "my-project", "the folder name '猫' has no ASCII letters or digits"),
    ("café au lait", "cafe-au-lait", "made from the folder name 'café au lait'"),
])
def test_init_says_how_it_named_the_project(tmp_path, run_cli, folder, name, says):
    import tomllib

    result = run_cli("init", tmp_path / folder, "--template", "toy-demo")
    assert result.code == 0, result.err
    assert tomllib.loads((tmp_path / folder / "palp.toml").read_text())["project"]["name"] == name
    err = " ".join(result.err.split())
    assert f"project.name is '{name}' ({says}" in err and "only ASCII letters" in err
    assert f"Project {name} " in result.out


def test_init_with_a_valid_folder_name_says_nothing_about_it(tmp_path, run_cli):
    result = run_cli("init", tmp_path / "cat_2", "--template", "toy-demo")
    assert result.code == 0 and "project.name" not in result.err


def test_name_rule_says_ascii_letters(make_project, run_cli):
    root = make_project({"project": {"name": "café"}})
    result = run_cli("check", root)
    assert result.code == 2 and "'café' may contain only ASCII letters (a-z, A-Z), digits" in result.err
    assert "e.g. name = 'cafe'" in result.err


REPO = Path(__file__).resolve().parent.parent


def test_toy_sampling_defaults_are_the_ones_toyworld_md_recommends():
    # builtin:toy's render defaults come from the model (models.TOY_DEFAULTS), whose comment cites toyworld.md; a
    # template that still sets a guidance scale must cite that page too
    from palpcompose.models import TOY_DEFAULTS

    found = re.search(r"Recommended sampling: (\d+) steps, guidance scale ([\d.]+)",
                      (REPO / "docs/toyworld.md").read_text())
    assert (TOY_DEFAULTS["render.steps"], TOY_DEFAULTS["render.guidance_scale"]) == (int(found[1]), float(found[2]))
    defaults = (REPO / "palpcompose/models/defaults.py").read_text()
    assert "docs/toyworld.md" in defaults.split("TOY_DEFAULTS = {", 1)[1][:600]
    for line in (REPO / "templates/toy-demo/palp.toml").read_text().splitlines():
        if line.startswith("guidance_scale"):
            assert "docs/toyworld.md" in line


def test_toyworld_and_evaluation_count_a_placeholder_prompt_the_same_way():
    # both pages: "a sketch of [V1] at night" with [V1] a star names three elements
    for page in ("toyworld.md", "evaluation.md"):
        text = " ".join((REPO / "docs" / page).read_text().split())
        assert re.search(r"a sketch of \[V1\] at night[`\"]? with `?\[V1\]`? a star (names|has) three elements",
                         text), page


def test_refs_readmes_do_not_ask_to_create_the_folders_init_made():
    for readme in (REPO / "templates").glob("*/refs/README.md"):
        assert "Create the" not in readme.read_text(), readme


def test_render_export_doc_covers_toy_exports_and_sd2_in_a1111():
    text = " ".join((REPO / "docs/render-export.md").read_text().split())
    assert 'StableDiffusionPipeline.from_pretrained(BUILTIN_MODELS["builtin:toy"]' in text
    assert "`builtin:toy` projects cannot be used there." in text
    assert "v2-inference.yaml" in text and "v2-inference-v.yaml" in text
