"""DoRA (`train.adapter = "dora"`): it trains, resumes bit-exactly, renders, and exports for diffusers and ComfyUI."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import DiffusersWarnings, plain_pipeline, render_plain
from test_render_fixtures import ALPHA, RANK, TARGETS, write_manifest
from test_render_fixtures import make_project as make_rendered_project

from palpcompose.export import DORA_MAGNITUDE, export
from palpcompose.project import load_project
from palpcompose.render import render
from palpcompose.train import train
from palpcompose.weights import TrainedWeights, load_trained_weights, save_trained_weights

PROMPT = "an oil painting of [V1] inspired by [V2] painting"
TOKENS = {"V1": "<duo-v1>", "V2": "<duo-v2>"}


def quiet():
    return Console(file=io.StringIO(), width=120)


def lora_file(root, folder="out/weights/final"):
    return load_file(str(root / folder / "lora.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_dora_trains_its_magnitudes_and_resumes_bit_exactly(make_project, one_thread):
    settings = {"train": {"steps": 4, "save_every": 2, "adapter": "dora"}}
    straight = make_project(settings, dirname="straight")
    train(straight, console=quiet())
    lora = lora_file(straight)
    magnitudes = [k for k in lora if k.endswith(DORA_MAGNITUDE)]
    assert magnitudes and len(magnitudes) == len([k for k in lora if k.endswith("lora_A.weight")])
    assert load_trained_weights(straight / "out/weights/final").adapter == "dora"
    # the magnitudes are trained: they moved from where peft starts them (the frozen rows' norms)
    first = make_project({"train": {**settings["train"], "steps": 1}}, dirname="one-step")
    train(first, console=quiet())
    assert any(not torch.equal(lora[k], lora_file(first)[k]) for k in magnitudes)

    resumed = make_project(settings, dirname="resumed")
    train(resumed, steps=2, console=quiet())
    train(resumed, steps=4, resume=True, console=quiet())
    again = lora_file(resumed)
    assert again.keys() == lora.keys()
    assert all(torch.equal(again[k], lora[k]) for k in lora), "a resumed DoRA run differs from a straight one"


def test_dora_and_lora_differ_and_switching_retrains(make_project, one_thread):
    root = make_project({"train": {"steps": 1}})
    train(root, console=quiet())
    plain = lora_file(root)
    assert not any(k.endswith(DORA_MAGNITUDE) for k in plain)
    toml = root / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nadapter = \"dora\"\n", 1))
    result = train(root, console=quiet())
    assert result.status == "completed"  # a weight setting: the LoRA run is not up to date for it
    assert any(k.endswith(DORA_MAGNITUDE) for k in lora_file(root))


# ---------------------------------------------------------------------------------------------------------------
# Render and export


def random_dora(base_dir, seed: int, step: int) -> TrainedWeights:
    """A DoRA with random A and B and magnitudes 0.5-1.5 times peft's initial ones (the frozen rows' norms), so
    that both parts change the images."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for key, value in get_peft_model_state_dict(unet).items():
        noise = torch.rand(value.shape, generator=g)
        lora[key] = value * (0.5 + noise) if key.endswith(DORA_MAGNITUDE) else (noise - 0.5)
    embeddings = {token: torch.randn(16, generator=g) for token in TOKENS.values()}
    return TrainedWeights(lora, embeddings, dict(TOKENS), RANK, ALPHA, list(TARGETS), str(base_dir), step,
                          adapter="dora")


@pytest.fixture(scope="module")
def dora_project(tmp_path_factory, tiny_pipeline_dir):
    root = make_rendered_project(tmp_path_factory.mktemp("dora") / "proj", tiny_pipeline_dir)
    toml = root / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nadapter = \"dora\"\n", 1))
    save_trained_weights(root / "out/weights/final", random_dora(tiny_pipeline_dir, seed=5, step=4))
    project = load_project(root, check_images=False)
    write_manifest(root, project)
    return project


@pytest.fixture(scope="module")
def dora_reference(dora_project):
    """palpcompose's render of the DoRA (attach_trained_weights with use_dora, merged for the render)."""
    result = render(dora_project, prompts=[PROMPT], seeds=[3], scheduler="euler-a")
    with Image.open(result.images[0].path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16), result.settings


def test_render_attaches_the_dora_magnitudes(dora_project, dora_reference, tiny_pipeline_dir, tmp_path):
    """The same A and B with peft's initial magnitudes render another image: the magnitudes take part."""
    from dataclasses import replace

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    weights = load_trained_weights(dora_project.root / "out/weights/final")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    initial = get_peft_model_state_dict(unet)
    root = make_rendered_project(tmp_path / "initial-magnitudes", tiny_pipeline_dir)
    toml = root / "palp.toml"
    toml.write_text(toml.read_text().replace("[train]\n", "[train]\nadapter = \"dora\"\n", 1))
    lora = {k: initial[k] if k.endswith(DORA_MAGNITUDE) else v for k, v in weights.lora.items()}
    save_trained_weights(root / "out/weights/final", replace(weights, lora=lora))
    project = load_project(root, check_images=False)
    write_manifest(root, project)
    other = render(project, prompts=[PROMPT], seeds=[3], scheduler="euler-a")
    with Image.open(other.images[0].path) as im:
        assert np.abs(np.asarray(im.convert("RGB")).astype(np.int16) - dora_reference[0]).max() > 8


def test_diffusers_export_of_a_dora_loads_with_load_lora_weights_and_renders_the_same(
        dora_project, dora_reference, tiny_pipeline_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    export(dora_project, "diffusers", tmp_path / "exp")
    saved = load_file(str(tmp_path / "exp" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(DORA_MAGNITUDE) for k in saved)
    pipe = plain_pipeline(tiny_pipeline_dir)
    warnings = DiffusersWarnings()
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        pipe.load_lora_weights(tmp_path / "exp")
        for token in TOKENS.values():
            pipe.load_textual_inversion(tmp_path / "exp" / f"{token.strip('<>')}.safetensors", token=token)
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
    assert not [m for m in warnings.messages if "unexpected keys" in m or "missing keys" in m], warnings.messages
    (adapter,) = pipe.unet.peft_config
    assert pipe.unet.peft_config[adapter].use_dora
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    trained = load_trained_weights(dora_project.root / "out/weights/final").lora
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)
    image, settings = dora_reference
    assert np.abs(render_plain(pipe, settings) - image).max() <= 2


def test_webui_export_of_a_dora_carries_comfyui_dora_scale_keys(dora_project, tiny_pipeline_dir, tmp_path):
    """Each layer gets `<kohya module>.dora_scale` of shape (out, 1) beside its lora_down/lora_up/alpha, and those
    values rebuild peft's DoRA weight by the output-axis decomposition (LyCORIS wd_on_out):
    W' = dora_scale / ||W + (alpha / rank) up @ down||_row * (W + (alpha / rank) up @ down)."""
    from diffusers import UNet2DConditionModel

    export(dora_project, "webui", tmp_path / "webui")
    lora = load_file(str(tmp_path / "webui" / "duo.safetensors"))
    with safe_open(str(tmp_path / "webui" / "duo.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"algo": "lora", "dora_wd": True, "wd_on_output": True}
    modules = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    scales = {k.removesuffix(".dora_scale") for k in lora if k.endswith(".dora_scale")}
    assert modules and scales == modules
    assert not [k for k in lora if "magnitude" in k]
    assert set(lora) == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha",
                                                                      "dora_scale")}

    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    weights = load_trained_weights(dora_project.root / "out/weights/final")
    base = dict(UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").named_modules())
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    set_peft_model_state_dict(unet, weights.lora)  # peft's own merge of the trained DoRA is the reference
    named = dict(unet.named_modules())
    checked = 0
    for key in weights.lora:
        if not key.endswith(DORA_MAGNITUDE):
            continue
        path = key.removesuffix(DORA_MAGNITUDE)
        module = f"lora_unet_{path.replace('.', '_')}"
        w0 = base[path].weight.detach().float()
        scale = lora[f"{module}.dora_scale"]
        assert scale.shape == (w0.shape[0], 1)
        merged = w0 + float(lora[f"{module}.alpha"]) / RANK * (lora[f"{module}.lora_up.weight"]
                                                                @ lora[f"{module}.lora_down.weight"])
        rebuilt = merged * (scale / merged.norm(dim=1, keepdim=True))
        layer = named[path]
        layer.merge()
        torch.testing.assert_close(rebuilt, layer.get_base_layer().weight.detach().float(), rtol=1e-5, atol=1e-5)
        layer.unmerge()
        checked += 1
    assert checked == len(modules)
