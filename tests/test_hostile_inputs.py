"""Hostile inputs (issue 22, item 6; docs/hostile-inputs.md F1-F19, S1-S5): each gets exit 2, a message naming the
file, key or option and the fix, and nothing written or lost. Each test fails without its fix."""

from __future__ import annotations

import errno
import json
import os
import socket
import time

import pytest
from conftest import tree_snapshot
from test_render_fixtures import make_project as make_trained_project

from palpcompose.errors import DamagedFile, UserError


@pytest.fixture
def trained(tmp_path, tiny_pipeline_dir):
    """A trained-looking project (final weights, a snapshot, a manifest), built without training."""
    return make_trained_project(tmp_path / "proj", tiny_pipeline_dir)


def _manifest(root):
    return json.loads((root / "out" / "manifest.json").read_text())


def _damage_manifest(root, **fields):
    data = _manifest(root)
    data.update(fields)
    (root / "out" / "manifest.json").write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------------------------
# F1-F4: options take the ranges of their palp.toml keys, before any work


@pytest.mark.parametrize("args,option,key", [
    (["train", "--steps", str(10**20)], "--steps", "train.steps"),
    (["train", "--steps", str(2**62)], "--steps", "train.steps"),
    (["render", "--sampling-steps", "100000000"], "--sampling-steps", "render.steps"),
    (["render", "--width", "100000"], "--width", "render.width"),
    (["render", "--height", "4104"], "--height", "render.height"),
    (["render", "--guidance-scale", "nan"], "--guidance-scale", "render.guidance_scale"),
    (["render", "--guidance-scale", "inf"], "--guidance-scale", "render.guidance_scale"),
    (["render", "--guidance-scale", "1000"], "--guidance-scale", "render.guidance_scale"),
    (["render", "--batch-size", "100000"], "--batch-size", "render.batch_size"),
])
def test_options_take_the_range_of_their_key_before_any_work(trained, run_cli, args, option, key):
    before = tree_snapshot(trained)
    started = time.monotonic()
    result = run_cli(args[0], trained, *args[1:])
    assert result.code == 2, result.err
    assert option in result.err and key in result.err
    assert "Traceback" not in result.err
    assert tree_snapshot(trained) == before  # no run, no empty render folder
    assert time.monotonic() - started < 30


def test_check_option_reads_the_bounds_from_the_schema():
    import dataclasses

    from palpcompose.project import RenderConfig, TrainConfig, check_option

    top = next(f for f in dataclasses.fields(TrainConfig) if f.name == "steps").metadata["le"]
    assert check_option("--steps", "train.steps", top) == top
    with pytest.raises(UserError, match=r"--steps .*train\.steps"):
        check_option("--steps", "train.steps", top + 1)
    width = next(f for f in dataclasses.fields(RenderConfig) if f.name == "width").metadata
    with pytest.raises(UserError, match="multiple of 8"):
        check_option("--width", "render.width", width["ge"] + 1)
    assert check_option("--width", "render.width", None) is None


# ----------------------------------------------------------------------------------------------------------------
# F5-F13: damaged manifests and locks, a file named out


@pytest.mark.parametrize("fields,named", [
    ({"steps_done": "x"}, "steps_done"),
    ({"status": 123}, "status"),
    ({"config": []}, "config"),
    ({"images": "x"}, "images"),
    ({"base_model": None}, "base_model"),
    ({"num_processes": "2"}, "num_processes"),
])
def test_train_refuses_a_manifest_with_fields_of_the_wrong_type(trained, run_cli, fields, named):
    _damage_manifest(trained, **fields)
    before = tree_snapshot(trained)
    result = run_cli("train", trained, "--steps", "3")
    assert result.code == 2, result.err
    assert "manifest.json is damaged" in result.err and named in result.err
    assert "--force" in result.err  # the options
    assert tree_snapshot(trained) == before  # nothing moved to out/runs/


def test_train_refuses_a_manifest_without_status(trained, run_cli):
    data = _manifest(trained)
    del data["status"]
    (trained / "out" / "manifest.json").write_text(json.dumps(data))
    result = run_cli("train", trained, "--steps", "3")
    assert result.code == 2 and "status is missing" in result.err


def test_force_over_a_damaged_manifest_says_which_field(trained):
    from palpcompose.run import make_plan

    _damage_manifest(trained, steps_done="x")
    plan = make_plan(trained, steps=3, force=True)
    assert "manifest.json is damaged" in plan.notice and "steps_done" in plan.notice


def test_render_refuses_a_manifest_with_a_damaged_status(trained, run_cli):
    _damage_manifest(trained, status=123)
    before = tree_snapshot(trained)
    result = run_cli("render", trained)
    assert result.code == 2, result.err
    assert "manifest.json is damaged" in result.err and "status is 123" in result.err
    assert tree_snapshot(trained) == before


@pytest.mark.parametrize("pid", ["abc", -1, 0, None, 1.5])
def test_a_lock_with_no_process_id_is_damaged_never_alive(make_project, run_cli, pid):
    root = make_project()
    (root / "out").mkdir()
    (root / "out" / "train.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    before = tree_snapshot(root)
    result = run_cli("train", root)
    assert result.code == 2, result.err
    assert "train.lock is damaged" in result.err and "delete the file" in result.err
    assert "already training" not in result.err
    assert tree_snapshot(root) == before


def test_pid_alive_never_signals_a_group():
    from palpcompose.outputs import _pid_alive

    assert not _pid_alive(0) and not _pid_alive(-1)


def test_a_lock_that_is_a_folder(make_project, run_cli):
    root = make_project()
    (root / "out" / "train.lock").mkdir(parents=True)
    result = run_cli("train", root)
    assert result.code == 2, result.err
    assert "train.lock: is a folder" in result.err


def test_out_is_a_file(make_project, run_cli):
    root = make_project()
    (root / "out").write_text("not a folder")
    result = run_cli("train", root)
    assert result.code == 2, result.err
    assert "is a file, not a folder" in result.err and "manifest.json" not in result.err
    assert (root / "out").read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------------------------
# F14-F15: the file system refuses


def test_a_full_disk_while_saving_a_snapshot(tmp_path, monkeypatch):
    import torch

    from palpcompose import fsutil
    from palpcompose.run import DiskFull, RunRecord
    from palpcompose.weights import TrainedWeights

    weights = TrainedWeights({"a.lora_A.weight": torch.ones(4, 4)}, {"<t-v1>": torch.ones(8)}, {"V1": "<t-v1>"}, 4,
                             4.0, ["to_q"], "base", 1)
    out = tmp_path / "proj" / "out"
    out.mkdir(parents=True)
    record = RunRecord(out, {"steps_target": 30})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        record.snapshot(1, weights)
    message = str(caught.value)
    assert "no space left" in message and "step-000001" in message and "KB needed" in message
    assert "train" in message and "--steps 30` starts again (no checkpoint" in message
    assert not (out / "snapshots").exists()  # no empty snapshot folder
    assert caught.value.exit_code == 2


def test_render_out_where_no_folder_can_be_made(trained, run_cli):
    result = run_cli("render", trained, "--out", "/proc/palp-x")
    assert result.code == 2, result.err
    assert "/proc/palp-x" in result.err and "internal error" not in result.err
    assert not (trained / "out" / "renders").exists()


# ----------------------------------------------------------------------------------------------------------------
# F16, S5: eval's renders


def test_eval_names_a_png_that_is_no_image(tmp_path):
    from palpcompose.evaluate import _open_rgb

    bad = tmp_path / "a.png"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="a.png: not a readable image"):
        _open_rgb(bad)


def test_eval_renders_a_file(trained, run_cli):
    result = run_cli("eval", trained, "--renders", trained / "palp.toml", "--oracle")
    assert result.code == 2, result.err
    assert "is a file, not a folder" in result.err


# ----------------------------------------------------------------------------------------------------------------
# F17-F19: palp.toml and what it names


def test_a_relative_base_model_resolves_against_the_project_folder(make_project, run_cli, tmp_path, monkeypatch,
                                                                  tiny_pipeline_dir):
    root = make_project({"project": {"base_model": "pipe"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pipe").symlink_to(tiny_pipeline_dir)
    monkeypatch.chdir(elsewhere)  # the caller's folder holds pipe/, the project does not
    result = run_cli("check", root)
    assert result.code == 2, result.out
    assert "project.base_model" in result.err and "relative to the project folder" in result.err
    (root / "pipe").symlink_to(tiny_pipeline_dir)
    monkeypatch.chdir(tmp_path)
    assert run_cli("check", root).code == 0


def test_a_hub_id_stays_a_hub_id(tmp_path):
    from palpcompose.models import resolve_base_model

    assert resolve_base_model("some-org/some-model", tmp_path).kind == "hub"
    with pytest.raises(UserError, match="relative to the project folder"):
        resolve_base_model("sd1", tmp_path)


def test_palp_toml_that_is_a_fifo_is_named_and_never_read(tmp_path, run_cli):
    root = tmp_path / "proj"
    root.mkdir()
    os.mkfifo(root / "palp.toml")
    result = run_cli("check", root)
    assert result.code == 2
    assert "FIFO" in result.err and "not a regular file" in result.err


def test_a_huge_palp_toml_is_refused_at_once(make_project, run_cli):
    root = make_project()
    with open(root / "palp.toml", "a") as f:
        f.write(("# padding\n") * 200_000)  # 2 MB
    started = time.monotonic()
    result = run_cli("check", root)
    assert result.code == 2
    assert "palp.toml: is 2.0 MB" in result.err
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------------------------------------------------------
# S1, S3: what an images glob skips; export --out among palpcompose's files or the references


def test_a_glob_names_what_it_skipped(make_project, run_cli):
    root = make_project()
    (root / "refs" / "V1" / "9.png").mkdir()
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "refs/V1/9.png" in result.err and "not a regular file" in result.err


@pytest.mark.parametrize("where", ["out", "out/weights", "refs"])
def test_export_out_among_palpcompose_files_or_references_is_refused(trained, run_cli, where):
    before = tree_snapshot(trained)
    result = run_cli("export", trained, "--format", "webui", "--out", trained / where)
    assert result.code == 2, result.err
    assert "--out" in result.err
    assert tree_snapshot(trained) == before


def test_export_into_a_new_folder_of_out_is_fine(trained, run_cli):
    result = run_cli("export", trained, "--format", "webui", "--out", trained / "out" / "exports")
    assert result.code == 0, result.err
    assert any((trained / "out" / "exports").iterdir())


def test_damaged_file_names_the_field():
    from palpcompose.outputs import manifest_problems

    assert manifest_problems({"status": "completed", "steps_done": "x"}) == ['steps_done is "x", not an integer']
    assert manifest_problems({"status": "completed", "base_model": {"spec": 3}}) == [
        "base_model.spec is 3, not a string"]
    assert isinstance(DamagedFile("f", "r"), UserError)
