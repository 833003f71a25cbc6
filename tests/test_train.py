"""The training engine end to end on the tiny pipelines (16 px images, 8x8 latents, 2-4 steps)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import interrupt_in_step, prepared_state
from rich.console import Console
from safetensors.torch import load_file

from palpcompose import models
from palpcompose import train as train_mod
from palpcompose.cli import main
from palpcompose.errors import Interrupted, UserError
from palpcompose.guidance import NonFiniteError
from palpcompose.progress import print_summary
from palpcompose.project import load_project
from palpcompose.train import train, training_step
from palpcompose.weights import load_trained_weights

MANIFEST_KEYS = {
    "palpcompose_version", "status", "base_model", "config", "config_hash", "training_hash", "images", "tokens", "git",
    "steps_done", "steps_target", "guidance", "wall_time_s", "device", "started_at", "finished_at", "palp_toml",
    "model_defaults", "num_processes", "effective_batch_size",
}
TWO_SUBJECTS = {
    "subjects": {"V2": {"class_name": "painting", "images": ["refs/V2/*.png"], "prompt": "An oil painting of [V2]"}},
    "palp": {"target_prompt": "An oil painting of [V1] inspired by [V2] painting"},
}


def quiet():
    return Console(file=io.StringIO(), width=120)


def final_weights(root):
    folder = root / "out" / "weights" / "final"
    return load_file(str(folder / "lora.safetensors")), load_file(str(folder / "embeddings.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# The step in isolation


@pytest.mark.parametrize("guidance,beta,expected", [
    ("none", 1.0, [1]),  # no extra UNet pass at all
    ("sds", 1.0, [1, 2]),  # + the frozen model, cond and uncond batched in one pass
    ("palp", 1.0, [1, 2, 1]),  # + the personalized model, no unconditional pass when beta == 1
    ("palp", 2.0, [1, 2, 2]),
])
def test_unet_passes_per_step(make_project, guidance, beta, expected):
    state, subjects = prepared_state(make_project({"palp": {"beta": beta}}), guidance)
    batch_sizes = []
    handle = state.components.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    batch = train_mod.sample_batch(subjects, torch.Generator().manual_seed(0), 1, 1000)
    losses = training_step(state, batch)
    handle.remove()
    assert batch_sizes == expected
    assert ("loss_align" in losses) == (guidance != "none")


def test_only_placeholder_rows_change(make_project):
    state, subjects = prepared_state(make_project(TWO_SUBJECTS), "palp")
    before = state.token_embedding.full_table().detach().clone()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        training_step(state, train_mod.sample_batch(subjects, g, 2, 1000))
    after = state.token_embedding.full_table().detach()
    rows = list(state.token_ids.values())
    frozen = torch.ones(after.shape[0], dtype=torch.bool)
    frozen[rows] = False
    assert torch.equal(after[frozen], before[frozen])  # bit-identical
    assert (after[rows] - before[rows]).abs().max() > 0  # and the new tokens did train
    assert all(p.dtype == torch.float32 for p in state.lora_params)


# ---------------------------------------------------------------------------------------------------------------
# Full runs


@pytest.mark.parametrize("guidance,vpred", [("palp", False), ("sds", True), ("none", False)])
def test_full_run(make_project, tiny_vpred_pipeline_dir, guidance, vpred):
    overrides = {"train": {"steps": 2, "preview_every": 2 if guidance != "none" else 0, "save_every": 1,
                           "resolution": None}, **TWO_SUBJECTS}  # the resolution: the model's native size
    if vpred:
        overrides["project"] = {"base_model": str(tiny_vpred_pipeline_dir)}
    root = make_project(overrides)
    console = quiet()
    result = train(root, guidance=guidance, console=console)
    out = root / "out"
    assert result.status == "completed" and result.steps_done == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["status"] == "completed" and manifest["guidance"] == guidance
    assert manifest["steps_done"] == manifest["steps_target"] == 2
    assert manifest["tokens"] == {"V1": "<tiny-v1>", "V2": "<tiny-v2>"}
    assert set(manifest["images"]) == {f"refs/{k}/{i}.png" for k in ("V1", "V2") for i in range(3)}
    assert manifest["base_model"]["identity"].startswith("sha256:")
    assert manifest["config"]["palp"]["guidance"] == guidance
    assert manifest["model_defaults"] == {"train.resolution": 16} and manifest["config"]["train"]["resolution"] == 16
    assert manifest["num_processes"] == 1 and manifest["effective_batch_size"] == 1  # 1 process x batch 1 x 1
    assert not (out / "train.lock").exists()
    for name in ("snapshots/step-000001", "snapshots/step-000002", "weights/final"):
        assert (out / name / "lora.safetensors").is_file() and (out / name / "embeddings.safetensors").is_file()
        assert load_trained_weights(out / name).guidance == guidance  # what render records in every PNG
    text = console.file.getvalue()
    assert "training summary" in text and "loss_pers" in text
    assert "effective batch 1 = 1 process x batch_size 1 x gradient_accumulation_steps 1" in text
    lora, emb = final_weights(root)
    assert all(v.dtype == torch.float32 for v in lora.values()) and set(emb) == {"<tiny-v1>", "<tiny-v2>"}
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(("loss_align" in e) == (guidance != "none") for e in log)
    assert (out / "logs" / "loss.png").is_file()
    if guidance == "none":
        assert not (out / "previews").exists()
        return
    legend = json.loads((out / "previews" / "step-000002.json").read_text())
    assert [label for label, _ in legend["rows"]] == ["target", "V1", "V2", "together", "x0 base", "x0 now"]
    from PIL import Image

    assert Image.open(out / "previews" / "step-000002.png").size[1] == 6 * train_mod.PREVIEW_TILE


def test_palp_and_none_train_different_weights_and_up_to_date(make_project):
    a = make_project(dirname="a")
    b = make_project(dirname="b")
    train(a, guidance="palp", console=quiet())
    train(b, guidance="none", console=quiet())
    assert max_diff(final_weights(a)[0], final_weights(b)[0]) > 1e-6
    console = quiet()
    assert train(a, guidance="palp", console=console).status == "up_to_date"
    assert "weights are up to date" in console.file.getvalue()
    # the low-memory preset changes no result: switching it on keeps the weights up to date
    toml = a / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nlow_memory = true\n", 1))
    assert "low_memory = true" in toml.read_text()
    assert train(a, guidance="palp", console=quiet()).status == "up_to_date"
    assert train(a, guidance="none", console=quiet()).status == "completed"  # another setting: retrains
    # ... through an override: palp.toml itself did not change, so render has nothing to warn about
    from palpcompose.render import check_trained_for, read_manifest

    project = load_project(a)
    assert check_trained_for(project, a / "out", read_manifest(a / "out")) == []
    c = make_project(dirname="c")  # palp.toml edited to what an override said is no change either
    train(c, steps=3, console=quiet())
    (c / "palp.toml").write_text((c / "palp.toml").read_text().replace("steps = 2", "steps = 3", 1))
    assert check_trained_for(load_project(c), c / "out", read_manifest(c / "out")) == []
    # a key added later, written at its default, changes neither hash: still no warning
    toml.write_text(toml.read_text().replace("[project]\n", "[project]\nallow_pickle = false\n", 1))
    assert "allow_pickle = false" in toml.read_text()
    assert check_trained_for(load_project(a), a / "out", read_manifest(a / "out")) == []
    toml.write_text(toml.read_text().replace("steps = ", "steps = 1", 1))  # a real change is still reported
    assert "changed since training" in check_trained_for(load_project(a), a / "out", read_manifest(a / "out"))[0]
    # the warning names the settings that made the weights stale, not the weight-neutral ones changed beside them
    toml.write_text(re.sub(r"save_every = \d+", "save_every = 7", toml.read_text()))
    warning = check_trained_for(load_project(a), a / "out", read_manifest(a / "out"))[0]
    assert "train.steps" in warning and "save_every" not in warning and "low_memory" not in warning, warning
    before = (a / "out" / "manifest.json").read_text()
    assert train(a, guidance="none", force=True, console=quiet()).status == "completed"
    assert json.loads((a / "out" / "manifest.json").read_text())["started_at"] >= json.loads(before)["started_at"]


def test_resume_and_interrupt_equal_an_uninterrupted_run(make_project, monkeypatch):
    settings = {"train": {"steps": 4, "save_every": 1, "batch_size": 2}, **TWO_SUBJECTS}
    # previews in the uninterrupted run only: they must not disturb the training RNG
    straight = make_project({**settings, "train": {**settings["train"], "preview_every": 2}}, dirname="straight")
    train(straight, console=quiet())

    # a finished 2-step run, continued to 4 steps
    finished = make_project(settings, dirname="finished")
    train(finished, steps=2, console=quiet())
    train(finished, steps=4, resume=True, console=quiet())
    assert max_diff(final_weights(finished)[0], final_weights(straight)[0]) <= 1e-5
    assert max_diff(final_weights(finished)[1], final_weights(straight)[1]) <= 1e-5

    # SIGINT during step 2: the step finishes, a checkpoint is written, Interrupted is raised
    interrupted = make_project(settings, dirname="interrupted")
    real_step = interrupt_in_step(monkeypatch, 2)
    with pytest.raises(Interrupted, match="--resume"):
        train(interrupted, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    manifest = json.loads((interrupted / "out" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["steps_done"] == 2
    assert not (interrupted / "out" / "weights" / "final").exists()
    assert train(interrupted, resume=True, console=quiet()).steps_done == 4
    assert max_diff(final_weights(interrupted)[0], final_weights(straight)[0]) <= 1e-5
    log = [json.loads(x) for x in (interrupted / "out" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]


def test_resume_refuses_changed_settings_and_missing_checkpoint(make_project):
    root = make_project()
    with pytest.raises(UserError, match="nothing to resume"):
        train(root, resume=True, console=quiet())
    assert not (root / "out").exists()  # nothing written for bad input
    train(root, console=quiet())
    with pytest.raises(UserError, match=r"palp.guidance was 'palp', now 'sds'\); pass --guidance palp again"):
        train(root, resume=True, steps=3, guidance="sds", console=quiet())
    manifest = (root / "out" / "manifest.json").read_text()
    with pytest.raises(UserError, match="--steps 1: the checkpoint is already at step 2; resume with --steps 2"):
        train(root, resume=True, steps=1, console=quiet())
    toml = root / "palp.toml"
    toml.write_text(toml.read_text().replace("steps = 2", "steps = 1", 1))
    with pytest.raises(UserError, match=r"train.steps = 1: the checkpoint is already at step 2"):  # no --steps given
        train(root, resume=True, console=quiet())
    assert (root / "out" / "manifest.json").read_text() == manifest


def test_second_interrupt_stops_at_once_and_says_which_checkpoint_is_kept(make_project, monkeypatch):
    root = make_project({"train": {"steps": 4, "save_every": 1}})
    real_step, calls = train_mod.training_step, []

    def second_ctrl_c_in_step_3(state, batch):  # what the handler raises on a second SIGINT
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", second_ctrl_c_in_step_3)
    with pytest.raises(Interrupted, match="stopped at once at step 2 of 4.*last checkpoint is at step 2.*--resume"):
        train(root, console=quiet())
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["steps_done"] == 2
    assert not (root / "out" / "train.lock").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_second_interrupt_while_setting_up_leaves_the_previous_run_alone(make_project, monkeypatch, resume):
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    train(root, console=quiet())
    before = (root / "out" / "manifest.json").read_text()

    def interrupted(*args, **kwargs):  # a second Ctrl-C while the references are encoded
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "prepare_subjects", interrupted)
    with pytest.raises(Interrupted, match="before training started; nothing was changed") as info:
        train(root, steps=3, resume=resume, force=True, console=quiet())
    assert ("--resume" in str(info.value)) == resume
    assert (root / "out" / "manifest.json").read_text() == before
    assert train(root, console=quiet()).status == "up_to_date"


def test_ctrl_c_while_loading_exits_130_not_0(make_project, monkeypatch, capsys):
    root = make_project()

    def interrupted_load(source):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_components", interrupted_load)
    with pytest.raises(SystemExit) as info:
        main(["train", str(root)])
    assert info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_snapshot(make_project, monkeypatch):
    root = make_project({"train": {"steps": 4, "save_every": 1}})
    real_step, calls = train_mod.training_step, []

    def nan_from_step_3(state, batch):
        calls.append(1)
        if len(calls) == 3:
            unet = state.components.unet
            handle = unet.register_forward_hook(lambda m, a, out: type(out)(sample=out.sample * float("nan")))
            try:
                return real_step(state, batch)
            finally:
                handle.remove()
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", nan_from_step_3)
    with pytest.raises(NonFiniteError, match="step 3.*lower learning rate.*step-000002") as info:
        train(root, console=quiet())
    assert info.value.exit_code == 1
    out = root / "out"
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert (out / "snapshots" / "step-000002" / "lora.safetensors").is_file()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (out / "train.lock").exists()


def test_a_second_train_is_refused_while_the_lock_is_live(make_project):
    root = make_project()
    lock = root / "out" / "train.lock"
    lock.parent.mkdir()
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": "now"}))
    with pytest.raises(UserError, match="already training"):
        train(root, console=quiet())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started_at": "then"}))
    assert train(root, steps=1, console=quiet()).status == "completed"  # a stale lock is taken over
    assert not lock.exists()


def test_cli_bad_base_model_exits_2_and_writes_nothing(make_project, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    for base in (str(tmp_path / "missing.safetensors"), str(broken)):
        root = make_project({"project": {"base_model": base}}, dirname=f"p{len(base)}")
        with pytest.raises(SystemExit) as exc:
            main(["train", str(root), "--steps", "1"])
        assert exc.value.code == 2
        assert "base_model" in capsys.readouterr().err
        assert not (root / "out").exists()


def test_cli_trains(make_project, capsys):
    root = make_project()
    main(["train", str(root), "--steps", "1", "--guidance", "sds"])  # returns normally: exit 0
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["guidance"] == "sds" and manifest["steps_done"] == 1


def test_summary_shows_running_means_not_one_noisy_step(tmp_path):
    # 200 steps of loss_align around 0.12, the last one a noisy 3.82: the summary must not read as divergence
    log = [{"step": i, "loss_pers": 0.5, "loss_align": 0.10 if i % 2 else 0.14} for i in range(1, 201)]
    log[-1]["loss_align"] = 3.82
    result = train_mod.TrainResult("completed", 200, tmp_path, tmp_path / "weights" / "final", 1.0,
                                   {"loss_pers": 0.5, "loss_align": 3.82})
    console = quiet()
    print_summary(console, result, log, "palp")
    text = " ".join(console.file.getvalue().split())
    mean_last = (25 * 0.10 + 24 * 0.14 + 3.82) / 50  # steps 151-200, step 200 the noisy one
    assert f"loss_align │ {mean_last:.4f} (mean of the last 50 steps; first 50: 0.1200)" in text
    assert "3.8200" not in text
