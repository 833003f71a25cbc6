"""Flux.1 and Stable Diffusion 3 through the family layer (issue 21), on the tiny offline pipelines of
tests/tiny_flow_pipeline.py: detection and refusals, `check`, training with palp guidance (manifest, resume,
SIGINT), render and export round trips."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import to_toml, write_test_image
from rich.console import Console
from tiny_flow_pipeline import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

from palpcompose.errors import UserError
from palpcompose.models import detect_family, resolve_base_model


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "pipe", guidance_embeds=True)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


def quiet():
    return Console(file=io.StringIO(), width=120)


def flow_project(root, base_model, **train):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_test_image(root / "refs" / f"{i}.png", seed=i, size=32)
    config = {
        "project": {"name": "fx", "base_model": str(base_model)},
        "subjects": {"V1": {"class_name": "cat", "images": ["refs/*.png"]}},
        "palp": {"target_prompt": "An oil painting of [V1]", "clean_prompt": "An oil painting of a cat"},
        "train": {"resolution": 32, "steps": 2, "save_every": 1, "preview_every": 0, "lora_rank": 4,
                  "learning_rate": 1e-2, "embedding_learning_rate": 1e-2, **train},
        "render": {"seeds": [0], "steps": 2},
    }
    config["train"] = {k: v for k, v in config["train"].items() if v is not None}  # None: the model's default
    (root / "palp.toml").write_text(to_toml(config))
    return root


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- detection and refusals ---------------------------------------------------------------------------------------


def test_flux_and_sd3_folders_are_detected(flux_dir, sd3_dir, tmp_path):
    assert resolve_base_model(str(flux_dir)).family == "flux"
    assert resolve_base_model(str(sd3_dir)).family == "sd3"
    cfg = make_tiny_flux_pipeline(tmp_path / "cfg", guidance_embeds=False)  # de-distilled: real CFG, trained
    assert resolve_base_model(str(cfg)).family == "flux"


@pytest.mark.parametrize("change,kind", [
    ({"_class_name": "FluxFillPipeline"}, "Fill"),
    ({"_class_name": "FluxKontextPipeline"}, "Kontext"),
    ({"_class_name": "FluxPriorReduxPipeline"}, "Redux"),
    ({"_class_name": "FluxControlNetPipeline"}, "ControlNet"),
    ({"_class_name": "FluxInpaintPipeline"}, "inpainting"),
    ({"_class_name": "StableDiffusion3ControlNetPipeline"}, "StableDiffusion3ControlNetPipeline"),
    ({"_class_name": "StableDiffusion3InpaintPipeline"}, "inpainting"),
])
def test_other_flow_pipelines_are_refused_naming_the_kind(flux_dir, tmp_path, change, kind):
    folder = tmp_path / "m"
    shutil.copytree(flux_dir, folder)
    _edit_json(folder / "model_index.json", **change)
    with pytest.raises(UserError, match=kind):
        resolve_base_model(str(folder))


def test_schnell_and_turbo_are_refused(flux_dir, sd3_dir, tmp_path):
    schnell = tmp_path / "schnell"
    shutil.copytree(flux_dir, schnell)  # schnell: no guidance embedding, no resolution-dependent shift
    _edit_json(schnell / "transformer" / "config.json", guidance_embeds=False)
    _edit_json(schnell / "scheduler" / "scheduler_config.json", use_dynamic_shifting=False, shift=1.0)
    with pytest.raises(UserError, match="schnell"):
        resolve_base_model(str(schnell))
    turbo = tmp_path / "turbo"
    shutil.copytree(sd3_dir, turbo)
    _edit_json(turbo / "scheduler" / "scheduler_config.json",
               _name_or_path="stabilityai/stable-diffusion-3.5-large-turbo")
    with pytest.raises(UserError, match="Turbo"):
        resolve_base_model(str(turbo))
    fill = tmp_path / "fill"
    shutil.copytree(flux_dir, fill)
    _edit_json(fill / "transformer" / "config.json", in_channels=384)
    with pytest.raises(UserError, match="384 input channels"):
        resolve_base_model(str(fill))


def test_single_files_are_recognised_and_refused_with_the_fix(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, key, words in (("flux.safetensors", "double_blocks.0.img_attn.qkv.weight", "schnell"),
                             ("flux-dev.safetensors", "guidance_in.in_layer.weight", "Flux.1 single-file"),
                             ("sd3.safetensors", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                              "Stable Diffusion 3")):
        keys = {key: torch.zeros(1), "double_blocks.0.x.weight": torch.zeros(1)} if "guidance" in key else \
            {key: torch.zeros(1)}
        save_file(keys, tmp_path / name)
        with pytest.raises(UserError, match=words):
            detect_family("single_file", str(tmp_path / name))


def test_check_shows_the_family_the_defaults_and_what_alpha_beta_mean(flux_dir, sd3_dir, tmp_path, run_cli):
    flux = run_cli("check", str(flow_project(tmp_path / "f", flux_dir)))
    assert flux.code == 0, flux.out + flux.err
    text = "".join((flux.out + flux.err).replace("│", "").split())  # table cells wrap anywhere
    assert "(Flux.1)" in text and "guidanceembedding" in text and "palp.alpha=3.5" in text
    assert "train.learning_rate=0.0001" not in text  # palp.toml sets it: not a model default
    sd3 = run_cli("check", str(flow_project(tmp_path / "s", sd3_dir, learning_rate=None)))
    assert sd3.code == 0, sd3.out + sd3.err
    text = "".join((sd3.out + sd3.err).replace("│", "").split())
    assert "(StableDiffusion3)" in text and "train.learning_rate=0.0004" in text and "README_sd3" in text
    assert "palp.alpha=7.5" in text and "realclassifier-freeguidance" in text
