"""A run's lifecycle from the outside (issue 12): nothing trained is lost, and no command reports a state that is
not true. Driven through the CLI (cli.main, in-process) on the tiny pipelines of tests/tiny_pipeline.py."""

from __future__ import annotations

import json
import os
import signal

import pytest

from palpcompose import train as train_mod
from palpcompose.errors import Interrupted
from palpcompose.train import train


def quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=120)


def manifest(root):
    return json.loads((root / "out" / "manifest.json").read_text())


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "logs" / "train.jsonl").read_text().splitlines()]


def set_in_toml(root, old, new):
    toml = root / "palp.toml"
    text = toml.read_text()
    assert old in text
    toml.write_text(text.replace(old, new, 1))


def kept_runs(root):
    runs = root / "out" / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def interrupt_in_step(monkeypatch, n):
    """SIGINT while step `n` runs: the step finishes, a checkpoint is written, train raises Interrupted."""
    real_step, calls = train_mod.training_step, []

    def step_then_signal(state, batch):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", step_then_signal)
    return real_step


# ---------------------------------------------------------------------------------------------------------------
# 1. Retraining never deletes the previous run


def test_more_steps_continue_from_the_checkpoint(make_project, run_cli):
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    assert run_cli("train", root).code == 0
    set_in_toml(root, "steps = 2", "steps = 3")
    result = run_cli("train", root)
    assert result.code == 0, result.err
    assert "continuing the completed run from its checkpoint at step 2" in result.out
    out = root / "out"
    assert steps_logged(out) == [1, 2, 3]  # steps 1-2 were not trained again
    assert manifest(root)["steps_done"] == 3 and kept_runs(root) == []


def test_another_setting_keeps_the_earlier_run_and_says_why(make_project, run_cli, tmp_path):
    root = make_project()
    assert run_cli("train", root).code == 0
    out = root / "out"
    before = (out / "weights" / "final" / "lora.safetensors").read_bytes()
    started = manifest(root)["started_at"]
    set_in_toml(root, "lora_rank = 4", "lora_rank = 8")
    result = run_cli("train", root)
    assert result.code == 0, result.err
    assert "train.lora_rank 4 -> 8" in result.out
    [run_id] = kept_runs(root)
    assert run_id == started.split("+")[0].replace(":", "-") + "-palp"
    kept = out / "runs" / run_id
    assert (kept / "weights" / "final" / "lora.safetensors").read_bytes() == before
    assert (kept / "checkpoint" / "state.json").is_file() and (kept / "manifest.json").is_file()
    assert steps_logged(out) == [1, 2] and manifest(root)["config"]["train"]["lora_rank"] == 8
    # the kept run is still usable
    assert run_cli("export", root, "--run", run_id, "--format", "diffusers", "--out", tmp_path / "exp").code == 0
    rendered = run_cli("render", root, "--run", run_id)
    assert rendered.code == 0, rendered.err
    assert list((kept / "renders").glob("*/render.json"))
    missing = run_cli("render", root, "--run", "nope")
    assert missing.code == 2 and run_id in missing.err


def test_a_guidance_change_and_force_keep_the_earlier_runs(make_project, run_cli):
    root = make_project()
    assert run_cli("train", root).code == 0
    result = run_cli("train", root, "--guidance", "none")
    assert result.code == 0 and 'palp.guidance "palp" -> "none"' in result.out
    assert len(kept_runs(root)) == 1
    result = run_cli("train", root, "--guidance", "none", "--force")
    assert result.code == 0 and "--force" in result.out
    assert len(kept_runs(root)) == 2
    assert all((root / "out" / "runs" / r / "weights" / "final" / "lora.safetensors").is_file()
               for r in kept_runs(root))


def test_train_after_ctrl_c_without_resume_keeps_the_checkpoint(make_project, run_cli, monkeypatch):
    root = make_project({"train": {"steps": 4, "save_every": 0}})
    real_step = interrupt_in_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(root, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    result = run_cli("train", root)
    assert result.code == 0, result.err
    assert "interrupted at step 2 of 4" in result.out and "--resume` continues it" in result.out
    [run_id] = kept_runs(root)
    kept = root / "out" / "runs" / run_id
    assert json.loads((kept / "checkpoint" / "state.json").read_text())["step"] == 2


def test_the_earlier_run_moves_only_once_the_new_one_starts(make_project, run_cli, monkeypatch):
    from conftest import tree_snapshot

    root = make_project()
    assert run_cli("train", root).code == 0
    set_in_toml(root, "lora_rank = 4", "lora_rank = 8")
    before = tree_snapshot(root / "out")

    def ctrl_c(*args, **kwargs):  # a second Ctrl-C while the references are encoded
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "prepare_subjects", ctrl_c)
    result = run_cli("train", root)
    assert result.code == 130 and "nothing was changed" in result.err
    assert "train.lora_rank 4 -> 8" in result.out  # said before anything moved
    assert tree_snapshot(root / "out") == before


# ---------------------------------------------------------------------------------------------------------------
# 2. Render, export and eval say why there are no final weights


@pytest.mark.parametrize("command", ["render", "export", "eval"])
def test_no_final_weights_says_interrupted_or_in_progress(make_project, run_cli, monkeypatch, tmp_path, command):
    root = make_project({"train": {"steps": 4, "save_every": 0},
                         "palp": {"target_prompt": "a sketch of [V1] at night"}})
    args = {"render": [], "export": ["--format", "diffusers", "--out", tmp_path / "exp"], "eval": ["--oracle"]}[command]
    real_step = interrupt_in_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(root, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    result = run_cli(command, root, *args)
    assert result.code == 2, result.err
    assert f"training was interrupted at step 2: `palpcompose train {root} --resume`" in " ".join(result.err.split())
    lock = root / "out" / "train.lock"  # another `train` holds the project
    lock.write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(), "started_at": "now"}))
    result = run_cli(command, root, *args)
    assert result.code == 2 and f"training in progress (pid {os.getpid()}" in " ".join(result.err.split())
