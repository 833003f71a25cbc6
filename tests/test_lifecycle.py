"""A run's lifecycle from the outside: nothing trained is lost, and no command reports a state that is
not true. Driven through the CLI (cli.main, in-process) on the tiny pipelines of tests/tiny_pipeline.py."""

from __future__ import annotations

import json
import os

import pytest
from conftest import interrupt_in_step, set_in_toml

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


def kept_runs(root):
    runs = root / "out" / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


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


def test_a_baseline_is_not_made_stale_by_the_palp_settings_it_never_reads(make_project, run_cli):
    root = make_project({"palp": {"guidance": "none", "weight": 1.0}, "train": {"steps": 2, "save_every": 1}})
    assert run_cli("train", root).code == 0
    before = (root / "out" / "weights" / "final" / "lora.safetensors").read_bytes()
    set_in_toml(root, "weight = 1.0", "weight = 3.0")  # lambda: only a guided run reads it
    result = run_cli("train", root)
    assert result.code == 0 and "up to date" in result.out, result.out
    assert kept_runs(root) == [] and (root / "out" / "weights" / "final" / "lora.safetensors").read_bytes() == before
    set_in_toml(root, "steps = 2", "steps = 3")
    resumed = run_cli("train", root)  # continues; the changed weight is not named as a change
    assert resumed.code == 0 and "continuing the completed run" in resumed.out and "palp.weight" not in resumed.out
    set_in_toml(root, 'guidance = "none"', 'guidance = "palp"')  # now it does change the weights
    guided = run_cli("train", root)
    assert guided.code == 0 and 'palp.guidance "none" -> "palp"' in guided.out and len(kept_runs(root)) == 1


def test_resume_refuses_a_changed_setting_by_name_and_ignores_one_the_run_never_read(make_project, run_cli,
                                                                                      monkeypatch):
    root = make_project({"palp": {"guidance": "none", "weight": 1.0}, "train": {"steps": 4, "save_every": 0}})
    real_step = interrupt_in_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(root, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    set_in_toml(root, "lora_rank = 4", "lora_rank = 8")
    refused = run_cli("train", root, "--resume")
    assert refused.code == 2 and "train.lora_rank was 4, now 8" in refused.err, refused.err
    assert json.loads((root / "out" / "checkpoint" / "state.json").read_text())["step"] == 2  # kept as it was
    set_in_toml(root, "lora_rank = 8", "lora_rank = 4")
    # a checkpoint written before the baseline's [palp] keys stopped counting lists them all, lambda 1 included
    state_path = root / "out" / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["settings"]["palp"].update({"weight": 1.0, "alpha": 7.5, "clean_prompt": "an old clean prompt"})
    state_path.write_text(json.dumps(state))
    set_in_toml(root, "weight = 1.0", "weight = 3.0")  # the baseline never reads lambda
    resumed = run_cli("train", root, "--resume")
    assert resumed.code == 0, resumed.err
    assert steps_logged(root / "out") == [1, 2, 3, 4] and manifest(root)["status"] == "completed"


def test_train_after_ctrl_c_without_resume_keeps_the_checkpoint(make_project, run_cli, monkeypatch):
    root = make_project({"train": {"steps": 4, "save_every": 0}})
    real_step = interrupt_in_step(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train(root, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    result = run_cli("train", root)
    assert result.code == 0, result.err
    assert "interrupted at step 2 of 4; to continue it instead, press Ctrl-C now" in result.out
    assert f"`palpcompose train {root} --resume`" in result.out
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


def test_render_after_an_interrupted_continuation_does_not_use_the_earlier_final_weights(make_project, run_cli,
                                                                                          monkeypatch):
    """A completed run at step 2 continued to 6 and interrupted at step 4: out/weights/final is still step 2's.
    Render says the training was interrupted and uses the newer snapshot, not step 2's weights silently."""
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    assert run_cli("train", root).code == 0
    real_step = interrupt_in_step(monkeypatch, 2)
    result = run_cli("train", root, "--steps", "6")
    assert result.code == 130, result.err
    monkeypatch.setattr(train_mod, "training_step", real_step)
    rendered = run_cli("render", root)
    err = " ".join(rendered.err.split())
    assert rendered.code == 0 and "training was interrupted at step 4" in err, err
    [render_json] = list((root / "out" / "renders").glob("*/render.json"))
    assert {image["step"] for image in json.loads(render_json.read_text())["images"]} == {4}


def test_render_after_an_interrupted_continuation_without_a_newer_snapshot_says_so(make_project, run_cli,
                                                                                  monkeypatch):
    root = make_project({"train": {"steps": 2, "save_every": 0}})
    assert run_cli("train", root).code == 0
    real_step = interrupt_in_step(monkeypatch, 2)
    assert run_cli("train", root, "--steps", "6").code == 130
    monkeypatch.setattr(train_mod, "training_step", real_step)
    rendered = run_cli("render", root)
    err = " ".join(rendered.err.split())
    assert rendered.code == 0 and "training was interrupted at step 4" in err and "(step 2)" in err, err


def test_a_run_that_stopped_on_an_error_is_said_so_in_plain_words(make_project, run_cli, monkeypatch):
    """manifest status "failed" (an exception mid-training) reads "stopped by an error", not "it was failed"."""
    root = make_project({"train": {"steps": 4, "save_every": 1}})
    real_step = interrupt_in_step(monkeypatch, 2)
    assert run_cli("train", root).code == 130
    monkeypatch.setattr(train_mod, "training_step", real_step)
    data = manifest(root)
    (root / "out" / "manifest.json").write_text(json.dumps({**data, "status": "failed"}))
    rendered = " ".join(run_cli("render", root).err.split())
    assert "training was stopped by an error at step 2" in rendered and "was failed" not in rendered, rendered
    set_in_toml(root, "lora_rank = 4", "lora_rank = 8")
    retrained = " ".join(run_cli("train", root).out.split())
    assert "it was stopped by an error at step 2 of 4" in retrained and "was failed" not in retrained, retrained


def test_render_gives_the_launcher_resume_command_for_a_run_of_several_processes(make_project, run_cli,
                                                                                  monkeypatch):
    """A run of 2 processes interrupted before its final weights: render's advice resumes it with 2 processes
    (a plain `palpcompose train DIR --resume` is refused: the checkpoint was written by 2)."""
    root = make_project({"train": {"steps": 4, "save_every": 0}})
    real_step = interrupt_in_step(monkeypatch, 2)
    assert run_cli("train", root).code == 130
    monkeypatch.setattr(train_mod, "training_step", real_step)
    state = root / "out" / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "num_processes": 2}))  # as torchrun's run writes it
    err = " ".join(run_cli("render", root).err.split())
    assert f"`torchrun --nproc_per_node 2 $(which palpcompose) train {root} --resume`" in err, err


def test_keeping_an_interrupted_run_of_several_processes_says_how_to_resume_it_with_them(make_project, run_cli,
                                                                                         monkeypatch):
    root = make_project({"train": {"steps": 4, "save_every": 0}})
    real_step = interrupt_in_step(monkeypatch, 2)
    assert run_cli("train", root).code == 130
    monkeypatch.setattr(train_mod, "training_step", real_step)
    (root / "out" / "manifest.json").write_text(json.dumps({**manifest(root), "num_processes": 2}))
    set_in_toml(root, "lora_rank = 4", "lora_rank = 8")
    out = " ".join(run_cli("train", root).out.split())
    assert f"run `torchrun --nproc_per_node 2 $(which palpcompose) train {root} --resume`" in out, out
    assert "it ran on 2 processes, this run on 1" in out


# ---------------------------------------------------------------------------------------------------------------
# 3. A damaged file we wrote is the user's to fix (exit 2, which file, the options), never an internal error


def truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def bad_json(path):
    path.write_text("{not json")


def test_damaged_files_exit_2_naming_the_file_and_the_options(make_project, run_cli):
    from conftest import tree_snapshot

    root = make_project({"train": {"steps": 2, "save_every": 1},
                         "palp": {"target_prompt": "a sketch of [V1] at night"}})
    assert run_cli("train", root).code == 0
    assert run_cli("render", root).code == 0
    out = root / "out"
    [render_json] = list((out / "renders").glob("*/render.json"))
    resume = ["train", root, "--resume", "--steps", "3"]
    cases = [  # (file, how it is damaged, command, an option the message must name)
        ("checkpoint/optimizer.safetensors", truncate, resume, "--force"),
        ("checkpoint/rng.safetensors", truncate, resume, "--snapshot 2"),
        ("checkpoint/lora.safetensors", truncate, resume, "--force"),
        ("checkpoint/embeddings.safetensors", truncate, ["train", root, "--steps", "3"], "--force"),
        ("checkpoint/state.json", bad_json, resume, "--force"),
        ("logs/train.jsonl", bad_json, resume, "--force"),
        ("manifest.json", bad_json, ["train", root], "--resume"),
        ("manifest.json", truncate, ["render", root], "--force"),
        ("weights/final/lora.safetensors", truncate, ["render", root], "--snapshot N"),
        ("weights/final/embeddings.safetensors", truncate, ["export", root, "--format", "webui", "--out",
                                                            root / "exp"], "--force"),
        ("snapshots/step-000001/lora.safetensors", truncate, ["render", root, "--snapshot", "1"], "step-000002"),
        (render_json.relative_to(out).as_posix(), bad_json,
         ["eval", root, "--oracle", "--renders", render_json.parent.name], "render again"),
    ]
    for name, damage, command, option in cases:
        path = out / name
        intact = path.read_bytes()
        damage(path)
        before = tree_snapshot(root)
        result = run_cli(*command)
        err = " ".join(result.err.split())
        assert result.code == 2, (name, result.err)
        assert "internal error" not in err and str(path) in err and option in err, (name, err)
        assert tree_snapshot(root) == before, name  # nothing written or moved
        path.write_bytes(intact)
    assert run_cli(*resume).code == 0  # all repaired: the run continues


def test_a_damaged_file_in_a_kept_run_names_this_project_and_options_that_touch_that_run(make_project, run_cli):
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    assert run_cli("train", root).code == 0
    assert run_cli("train", root, "--force").code == 0
    [run_id] = kept_runs(root)
    kept = root / "out" / "runs" / run_id
    truncate(kept / "weights" / "final" / "lora.safetensors")
    result = run_cli("render", root, "--run", run_id)
    err = " ".join(result.err.split())
    assert result.code == 2 and str(kept / "weights" / "final" / "lora.safetensors") in err, err
    assert f"palpcompose train {root / 'out'}" not in err  # the project folder, not out/
    assert "--snapshot N (step-000001, step-000002 exist)" in err and "--force" not in err
    bad_json(kept / "manifest.json")
    result = run_cli("render", root, "--run", run_id, "--snapshot", "1")
    err = " ".join(result.err.split())
    assert result.code == 2 and str(kept / "manifest.json") in err, err
    assert "--resume" not in err  # resume continues out/checkpoint, the current run, not this one


# ---------------------------------------------------------------------------------------------------------------
# 4. New or changed images: no resume onto them, no "up to date", and render warns


def test_changed_images_refuse_resume_and_are_not_up_to_date(make_project, run_cli):
    from conftest import tree_snapshot, write_test_image

    root = make_project({"train": {"steps": 2, "save_every": 1}})
    assert run_cli("train", root).code == 0
    write_test_image(root / "refs" / "V1" / "3.png", seed=77)
    before = tree_snapshot(root)
    result = run_cli("train", root, "--resume", "--steps", "3")
    assert result.code == 2 and "refs/V1/3.png is new" in " ".join(result.err.split())
    assert tree_snapshot(root) == before
    rendered = run_cli("render", root)
    assert rendered.code == 0 and "refs/V1/3.png is new" in " ".join(rendered.err.split())
    write_test_image(root / "refs" / "V1" / "0.png", seed=78)  # an image edited in place
    retrained = run_cli("train", root)
    assert retrained.code == 0 and "up to date" not in retrained.out
    assert "reference images changed: refs/V1/3.png is new, refs/V1/0.png changed" in retrained.out
    assert len(kept_runs(root)) == 1 and "refs/V1/3.png" in manifest(root)["images"]
    assert run_cli("train", root).out.startswith("weights are up to date")


# ---------------------------------------------------------------------------------------------------------------
# 8. Progress: a bar that fits 80 columns, plain lines when not on a terminal


def test_the_progress_bar_fits_80_columns_with_elapsed_and_eta():
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    progress = train_mod.TrainingProgress(console, 100_000, 0)
    progress.update(54_321, {"loss_pers": 0.12345, "loss_align": 3.8211, "guidance_norm": 1.0})
    console.print(progress.bar.make_tasks_table(progress.bar.tasks))
    [line] = buffer.getvalue().splitlines()
    assert len(line) <= 80 and "…" not in line
    assert "54321/100000" in line and "align 3.8211" in line
    assert line.endswith("0:00:00 ETA -:--:--")  # elapsed, then the ETA (unknown after a single update)


def test_plain_progress_lines_when_not_on_a_terminal(make_project, run_cli):
    root = make_project({"train": {"steps": 25, "save_every": 0}})
    result = run_cli("train", root, "--guidance", "none")  # stdout captured: not a terminal
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]  # every max(10 steps, 5%), the last
    assert all("pers " in line and " elapsed " in line and " ETA " in line for line in lines)
