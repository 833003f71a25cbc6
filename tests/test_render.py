"""`render`: determinism, PNG parameters, contact sheets, sweeps, comparisons, and guard rails."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tree_snapshot
from PIL import Image
from test_render_fixtures import make_project, write_manifest
from tiny_pipeline import make_tiny_pipeline

from palpcompose.cli import main
from palpcompose.errors import UserError
from palpcompose.project import load_project
from palpcompose.render import generate, make_scheduler, parse_seeds, render


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def sd2_scheduler_config(tmp_path_factory):
    from diffusers import DDPMScheduler

    folder = make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd2", prediction_type="v_prediction")
    return DDPMScheduler.from_pretrained(folder, subfolder="scheduler").config


@pytest.fixture
def project_dir(tmp_path, base):
    return make_project(tmp_path / "proj", base)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_parse_seeds_ranges_lists_and_mixes():
    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("1,5,9") == (1, 5, 9)
    assert parse_seeds("0-2, 10,1") == (0, 1, 2, 10)
    for bad in ("", "a", "3-1", "1,,2", "-1"):
        with pytest.raises(UserError):
            parse_seeds(bad)


@pytest.mark.parametrize(
    "name,cls",
    [
        ("dpm++", "DPMSolverMultistepScheduler"),
        ("ddim", "DDIMScheduler"),
        ("euler-a", "EulerAncestralDiscreteScheduler"),
    ],
)
def test_schedulers_keep_the_base_models_prediction_type(sd2_scheduler_config, name, cls):
    base_config = sd2_scheduler_config
    scheduler = make_scheduler(name, base_config)
    assert type(scheduler).__name__ == cls
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    if name == "dpm++":
        assert scheduler.config.algorithm_type == "dpmsolver++"


def test_render_writes_pngs_with_a1111_parameters_and_a_contact_sheet(project_dir):
    result = render(load_project(project_dir, check_images=False), seeds="0-2", negative_prompt="blurry")
    run = result.run_dir
    assert run.parent == project_dir / "out" / "renders"
    assert sorted(p.name for p in run.glob("*.png")) == sorted(
        [f"final_p1_seed{s}.png" for s in range(3)] + ["contact-sheet.png"]
    )
    with Image.open(run / "final_p1_seed2.png") as im:
        assert im.size == (16, 16)  # train.resolution
        params = im.text["parameters"]
    prompt, negative, fields = params.split("\n")
    assert prompt == "an oil painting of <duo-v1> inspired by <duo-v2> painting"
    assert negative == "Negative prompt: blurry"
    assert fields.startswith("Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 2, Size: 16x16, Model: ")
    assert "PALP weights: final" in fields
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.width > 3 * 128 and sheet.height >= 128  # 3 seed columns of enlarged cells + captions
    index = json.loads((run / "render.json").read_text())
    assert [i["seed"] for i in index["images"]] == [0, 1, 2]
    assert index["settings"]["scheduler"] == "dpm++"


def test_same_seed_same_image_whatever_the_batch(project_dir):
    project = load_project(project_dir, check_images=False)
    one = render(project, seeds="0-2", scheduler="euler-a", batch_size=1)
    batched = render(project, seeds="2,0,1", scheduler="euler-a", batch_size=3)
    assert one.run_dir != batched.run_dir
    for seed in range(3):
        a = pixels(one.run_dir / f"final_p1_seed{seed}.png")
        b = pixels(batched.run_dir / f"final_p1_seed{seed}.png")
        assert np.abs(a - b).max() <= 1, seed
    assert (
        np.abs(pixels(one.run_dir / "final_p1_seed0.png") - pixels(one.run_dir / "final_p1_seed1.png")).max()
        > 10
    )


def test_sweep_renders_every_snapshot_and_the_final_weights(project_dir):
    # The engine also snapshots the last step: that row would repeat the final weights, so it is left out.
    shutil.copytree(project_dir / "out/weights/final", project_dir / "out/snapshots/step-000004")
    result = render(load_project(project_dir, check_images=False), seeds=[3], sweep=True, compare=True)
    assert [(i.model, i.step) for i in result.images] == [("base", None), ("step-000002", 2), ("final", 4)]
    base_image, snapshot, final = (pixels(i.path) for i in result.images)
    assert np.abs(snapshot - final).max() > 10  # different weights, different images
    assert np.abs(base_image - final).max() > 10
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.height >= 3 * 128  # one row per model
    assert result.run_dir.name.endswith("-sweep")


def test_plan_render_decides_the_rows_and_texts_and_writes_nothing(project_dir, monkeypatch):
    """plan_render: every check that needs no model, then what render will draw; it loads no pipeline and writes
    nothing, and a bad option is refused there, before render would load the base model."""
    from palpcompose import render as render_mod
    from palpcompose.render import plan_render

    shutil.copytree(project_dir / "out/weights/final", project_dir / "out/snapshots/step-000004")
    monkeypatch.setattr(render_mod, "load_pipeline", lambda *a, **k: pytest.fail("the plan loaded the model"))
    project = load_project(project_dir, check_images=False)
    before = tree_snapshot(project_dir)
    plan = plan_render(project, seeds="0-1", sweep=True, compare=True)
    assert tree_snapshot(project_dir) == before
    assert [(m.label, m.step) for m in plan.models] == [("base", None), ("step-000002", 2), ("final", 4)]
    assert plan.seeds == (0, 1) and plan.kind == "sweep" and plan.out_dir == project_dir / "out"
    [prompt] = plan.prompts
    assert plan.base_texts[prompt] == "an oil painting of cat inspired by painting painting"
    assert "<duo-v1>" in plan.texts[prompt]
    with pytest.raises(UserError, match="--sweep renders every snapshot"):
        render(project, seeds=[0], sweep=True, step=2)
    assert tree_snapshot(project_dir) == before


def test_step_renders_that_snapshot(project_dir):
    project = load_project(project_dir, check_images=False)
    snap = render(project, seeds=[3], step=2)
    sweep = render(project, seeds=[3], sweep=True)
    assert snap.images[0].path.name == "step-000002_p1_seed3.png"
    assert np.abs(pixels(snap.images[0].path) - pixels(sweep.images[0].path)).max() <= 1


def test_compare_renders_the_base_model_with_class_words(project_dir, base):
    from diffusers import StableDiffusionPipeline

    result = render(load_project(project_dir, check_images=False), seeds=[0], compare=True, scheduler="ddim")
    base_image, personal = result.images
    assert base_image.model == "base" and personal.model == "final"
    assert base_image.text == "an oil painting of cat inspired by painting painting"
    assert np.abs(pixels(base_image.path) - pixels(personal.path)).max() > 10
    # The base row is exactly the untouched base model: render it with plain diffusers.
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe, [base_image.text], [0], result.settings)[0]
    assert np.abs(np.asarray(plain).astype(np.int16) - pixels(base_image.path)).max() <= 1


def test_base_renders_the_untouched_base_model_before_any_training(tmp_path, base):
    """`render --base`: the base model alone, class words for placeholders, in a project that was never trained;
    each image equals plain diffusers' render of the same text and seed."""
    from diffusers import StableDiffusionPipeline

    project = load_project(make_project(tmp_path / "untrained", base, trained=False), check_images=False)
    clean = "an oil painting of a cat"
    result = render(project, prompts=[clean, "an oil painting of [V1]"], seeds=[0], base_only=True, scheduler="ddim")
    assert [(i.model, i.text) for i in result.images] == [("base", clean), ("base", "an oil painting of cat")]
    assert result.run_dir.name.endswith("-base") and not result.warnings  # no "has no placeholder" for y_c here
    index = json.loads((result.run_dir / "render.json").read_text())
    assert index["training"] is None and [e["model"] for e in index["images"]] == ["base", "base"]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plain = generate(pipe, [clean], [0], result.settings)[0]
    assert np.abs(np.asarray(plain).astype(np.int16) - pixels(result.images[0].path)).max() <= 1
    with pytest.raises(UserError, match="--base renders the base model alone"):
        render(project, seeds=[0], base_only=True, compare=True)
    assert not (tmp_path / "untrained" / "out" / "weights").exists()  # nothing trained appeared


# --- guard rails, through the command line --------------------------------------------------------------------


def run_cli(*args) -> int:
    try:
        main(list(map(str, args)))
    except SystemExit as exc:
        return exc.code
    return 0


def test_cli_render_succeeds_and_says_where_everything_went(project_dir, capsys):
    assert (
        run_cli("render", project_dir, "--seeds", "1", "--prompt", "a photo of [V1] at night", "--sampling-steps", "1")
        == 0
    )
    out = capsys.readouterr().out
    (run_dir,) = (project_dir / "out" / "renders").iterdir()
    assert run_dir.name in out and "contact-sheet.png" in out and "final_p*_seed*.png" in out
    assert (run_dir / "final_p1_seed1.png").is_file()


def test_cli_refuses_without_trained_weights(tmp_path, base, capsys):
    project_dir = make_project(tmp_path / "untrained", base, trained=False)
    assert run_cli("render", project_dir) == 2
    err = capsys.readouterr().err
    assert "palpcompose train" in err and "Traceback" not in err
    assert not (project_dir / "out").exists()


def test_cli_missing_step_lists_the_available_steps(project_dir, capsys):
    assert run_cli("render", project_dir, "--step", "3") == 2
    assert "available steps: 2" in capsys.readouterr().err
    assert not (project_dir / "out" / "renders").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "5-1"],
        ["--scheduler", "plms"],
        ["--width", "20"],
        ["--sweep", "--step", "2"],
        ["--prompt", "a photo of [V3]"],
        ["--sampling-steps", "0"],
        ["--steps", "0"],
        ["--prompt", ""],
        ["--prompt", "   "],
        ["--prompt", "a photo of [v1]"],
        ["--seeds", "4294967296"],
        ["--negative-prompt", "[V3]"],
        ["--prompt", "a photo of [V1]", "--prompt", " "],
        ["--prompt", "a photo of [V1] " + "red " * 80],
        ["--negative-prompt", "blurry " * 80],
    ],
)
def test_cli_bad_options_exit_2_and_write_nothing(project_dir, args, capsys):
    assert run_cli("render", project_dir, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if args[0] != "--seeds" and len(args[-1]) > 200:  # the too-long prompts name their option and the overflow
        assert f"{args[0]} " in err and "the text encoder reads at most 77" in err and "shorten it by" in err
    if args[0] == "--negative-prompt" and args[1] == "[V3]":
        assert "uses [V3], which is not a subject of this project" in err
    if args[0] == "--prompt" and not args[-1].strip():
        assert "--prompt is empty" in err
    if args[1] == "a photo of [v1]":
        assert "'[v1]' is not a placeholder; placeholders are written exactly [V1]" in err
    if args[1] == "4294967296":
        assert "seeds go from 0 to 4294967295" in err
    assert not (project_dir / "out" / "renders").exists()


def test_cli_refuses_when_the_base_model_differs(project_dir, tmp_path, capsys):
    project = load_project(project_dir, check_images=False)
    write_manifest(project_dir, project, base_model={"spec": "other/model", "kind": "hub", "identity": "x"})
    assert run_cli("render", project_dir) == 2
    assert "other/model" in capsys.readouterr().err
    assert not (project_dir / "out" / "renders").exists()


def test_cli_warns_when_training_settings_changed(project_dir, capsys):
    toml = project_dir / "palp.toml"
    toml.write_text(toml.read_text().replace("steps = 4", "steps = 6"))
    assert run_cli("render", project_dir, "--seeds", "0", "--sampling-steps", "1") == 0
    err = capsys.readouterr().err
    assert "changed since training" in err and "retrain" in err


def test_unfinished_training_renders_the_latest_snapshot_with_a_warning(project_dir):
    shutil.rmtree(project_dir / "out" / "weights")
    result = render(load_project(project_dir, check_images=False), seeds=[0])
    assert result.images[0].model == "step-000002"
    assert any("--resume" in w for w in result.warnings)


def test_cli_refuses_weights_that_do_not_fit_the_base_model(project_dir, capsys):
    from palpcompose.weights import load_trained_weights, save_trained_weights

    final = project_dir / "out/weights/final"
    weights = load_trained_weights(final)
    key = next(iter(weights.lora))
    weights.lora["down_blocks.7." + key] = weights.lora.pop(key)
    save_trained_weights(final, weights)
    assert run_cli("render", project_dir) == 2
    assert "does not fit this base model" in capsys.readouterr().err
    assert not (project_dir / "out" / "renders").exists()


def test_render_merges_the_lora_and_draws_what_the_unmerged_adapter_draws(project_dir, base, monkeypatch):
    """The speed lever on by default: the LoRA is merged into the base weights for the render (no per-step low-rank
    matmuls), and the images are those of the adapter applied unmerged, as diffusers + peft would draw them."""
    from diffusers import StableDiffusionPipeline

    from palpcompose import render as render_mod
    from palpcompose.weights import load_trained_weights

    merged_layers = []
    real = render_mod.merged_lora

    def spy(unet):
        merged_layers.append(sum(1 for m in unet.modules() if hasattr(m, "merged_adapters")))
        return real(unet)

    monkeypatch.setattr(render_mod, "merged_lora", spy)
    result = render(load_project(project_dir, check_images=False), seeds=[0, 1], scheduler="ddim")
    assert merged_layers and merged_layers[0] > 0
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    render_mod.attach_trained_weights(pipe, load_trained_weights(project_dir / "out/weights/final"))
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = generate(pipe, [result.images[0].text] * 2, [0, 1], result.settings)
    for image, expected in zip(result.images, plain, strict=True):
        assert np.abs(np.asarray(expected).astype(np.int16) - pixels(image.path)).max() <= 1
    with render_mod.merged_lora(pipe.unet):  # merged: other base weights, the same images
        merged = generate(pipe, [result.images[0].text], [0], result.settings)[0]
        assert any(not torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert np.abs(np.asarray(merged).astype(np.int16) - np.asarray(plain[0]).astype(np.int16)).max() <= 1
    for k, v in pipe.unet.state_dict().items():  # unmerged after: the base weights are back (to fp32 rounding)
        torch.testing.assert_close(v, unet_before[k], rtol=1e-5, atol=1e-6)


def test_cli_interrupted_render_exits_130_and_leaves_no_empty_folder(project_dir, monkeypatch, capsys):
    from palpcompose import render as render_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render_mod, "generate", interrupted)
    assert run_cli("render", project_dir, "--seeds", "0", "--sampling-steps", "1") == 130
    assert "interrupted before the first image was drawn" in capsys.readouterr().err
    assert list((project_dir / "out" / "renders").iterdir()) == []


def test_render_records_the_guidance_that_trained_the_weights(project_dir):
    # final/ says in its header it was trained with sds; the snapshot is older (no such key): out/manifest.json's
    # run guidance stands in for it. The base model's rows are "base".
    from palpcompose.weights import load_trained_weights, save_trained_weights

    final = load_trained_weights(project_dir / "out/weights/final")
    final.guidance = "sds"
    save_trained_weights(project_dir / "out/weights/final", final)
    project = load_project(project_dir, check_images=False)
    result = render(project, seeds=[0], sweep=True, compare=True)
    guidance = {i.model: i.guidance for i in result.images}
    assert guidance == {"base": "base", "step-000002": "palp", "final": "sds"}
    with Image.open(result.run_dir / "final_p1_seed0.png") as im:
        assert "PALP step: 4, PALP guidance: sds," in im.text["parameters"]
    with Image.open(result.run_dir / "step-000002_p1_seed0.png") as im:
        assert "PALP guidance: palp" in im.text["parameters"]
    index = json.loads((result.run_dir / "render.json").read_text())
    assert {i["model"]: i["guidance"] for i in index["images"]} == guidance
    assert index["training"]["guidance"] == "palp" and index["training"]["steps_done"] == 4
    assert index["training"]["started_at"] == "2025-01-01T00:00:00"


def test_render_warns_about_a_prompt_without_placeholders(project_dir, capsys):
    from rich.console import Console

    project = load_project(project_dir, check_images=False)
    result = render(project, prompts=["a photo of a cat", "a photo of [V1]"], seeds=[0], console=Console(stderr=True))
    err = capsys.readouterr().err
    assert "'a photo of a cat' has no placeholder ([V1], [V2])" in err
    assert "'a photo of [V1]'" not in err
    assert any("has no placeholder" in w for w in result.warnings)
    index = json.loads((result.run_dir / "render.json").read_text())
    assert any("'a photo of a cat' has no placeholder" in w for w in index["warnings"])
