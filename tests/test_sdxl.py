"""SDXL: family detection and refusals, the tiny SDXL pipeline through train, render and export (issue 13)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tree_snapshot

from palpcompose import models
from palpcompose.errors import UserError

# --------------------------------------------------------------------------------------------------------------
# (a) the family is detected from model_index.json, the hub cache or a single file's keys; unsupported kinds refused


def _pipeline_folder(root: Path, index: dict, unet: dict | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


UNSUPPORTED_FOLDERS = {
    "sd3": ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
            None, "a Stable Diffusion 3 model (StableDiffusion3Pipeline)"),
    "flux": ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, None,
             "a Flux model (FluxPipeline)"),
    "refiner": ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "requires_aesthetics_score": True}, {"in_channels": 4}, "an SDXL refiner"),
    "inpaint": ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
                {"in_channels": 9}, "an inpainting model (StableDiffusionPipeline, a UNet with 9 input channels"),
    "xl-inpaint": ({"_class_name": "StableDiffusionXLInpaintPipeline"}, {"in_channels": 9}, "an inpainting model"),
}


@pytest.mark.parametrize("kind", UNSUPPORTED_FOLDERS)
def test_unsupported_pipeline_folders_are_refused_by_name(kind, tmp_path):
    index, unet, found = UNSUPPORTED_FOLDERS[kind]
    folder = _pipeline_folder(tmp_path / kind, index, unet)
    with pytest.raises(UserError) as err:
        models.resolve_base_model(str(folder))
    message = str(err.value)
    assert found in message and "palpcompose cannot train" in message
    assert models.SUPPORTED_FAMILIES in message  # the kinds it does support


def _single_file(path: Path, names: dict[str, tuple]) -> Path:
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape) for name, shape in names.items()}, str(path))
    return path


UNET = "model.diffusion_model."
SINGLE_FILES = {
    "sd1": ({f"{UNET}input_blocks.0.0.weight": (2, 4, 1, 1),
             "cond_stage_model.transformer.text_model.final_layer_norm.weight": (2,)}, "sd1"),
    "sd2": ({f"{UNET}input_blocks.0.0.weight": (2, 4, 1, 1), "cond_stage_model.model.ln_final.weight": (2,)}, "sd2"),
    "sdxl": ({f"{UNET}input_blocks.0.0.weight": (2, 4, 1, 1), f"{UNET}label_emb.0.0.weight": (2, 3),
              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (2,),
              "conditioner.embedders.1.model.ln_final.weight": (2,)}, "sdxl"),
    "refiner": ({f"{UNET}input_blocks.0.0.weight": (2, 4, 1, 1), f"{UNET}label_emb.0.0.weight": (2, 3),
                 "conditioner.embedders.0.model.ln_final.weight": (2,)}, "an SDXL refiner checkpoint"),
    "inpaint": ({f"{UNET}input_blocks.0.0.weight": (2, 9, 1, 1)}, "an inpainting checkpoint (a UNet with 9 input"),
    "sd3": ({f"{UNET}joint_blocks.0.x_block.attn.qkv.weight": (2, 2)}, "a Stable Diffusion 3 checkpoint"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (2, 2)}, "a Flux checkpoint"),
}


@pytest.mark.parametrize("kind", SINGLE_FILES)
def test_single_file_family_from_its_keys(kind, tmp_path):
    names, expected = SINGLE_FILES[kind]
    path = _single_file(tmp_path / f"{kind}.safetensors", names)
    if expected in ("sd1", "sd2", "sdxl"):
        assert models.resolve_base_model(str(path)).family == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)):
            models.resolve_base_model(str(path))


def test_hub_cache_family(tmp_path, monkeypatch):
    """A cached hub id is read from the cache's model_index.json, as a folder is."""
    import huggingface_hub

    cache = _pipeline_folder(tmp_path / "cache", UNSUPPORTED_FOLDERS["flux"][0])
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **kw: str(cache / name) if (cache / name).is_file() else None)
    with pytest.raises(UserError, match="a Flux model"):
        models.resolve_base_model("black-forest-labs/FLUX.1-dev")


def test_tiny_pipelines_families(tiny_pipeline_dir, tiny_vpred_pipeline_dir):
    assert models.resolve_base_model(str(tiny_pipeline_dir)).family == "sd1"
    assert models.resolve_base_model(str(tiny_vpred_pipeline_dir)).family == "sd2-v"
    assert models.resolve_base_model("builtin:toy").family == "toy"


@pytest.mark.parametrize("command", ["check", "train", "render", "export"])
def test_every_command_refuses_an_unsupported_model_with_exit_2(command, make_project, run_cli, tmp_path):
    _pipeline_folder(tmp_path / "sd3", *UNSUPPORTED_FOLDERS["sd3"][:2])
    root = make_project({"project": {"base_model": str(tmp_path / "sd3")}})
    before = tree_snapshot(root)
    args = {"export": ["--format", "webui", "--out", tmp_path / "exported"]}.get(command, [])
    result = run_cli(command, root, *args)
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert "a Stable Diffusion 3 model" in result.err and "Stable Diffusion XL" in result.err
    assert tree_snapshot(root) == before


# --------------------------------------------------------------------------------------------------------------
# (b) the tiny SDXL pipeline: built from configs, seeded, loads and renders as SDXL


def test_tiny_sdxl_pipeline_is_sdxl_and_seeded(tiny_sdxl_pipeline_dir, tmp_path):
    from safetensors.torch import load_file
    from tiny_pipeline import make_tiny_sdxl_pipeline

    source = models.resolve_base_model(str(tiny_sdxl_pipeline_dir))
    assert source.family == "sdxl" and "Stable Diffusion XL" in source.detail
    pipe = models.load_pipeline(source)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.text_encoder_2.config.projection_dim == 16 and pipe.unet.config.addition_embed_type == "text_time"
    again = make_tiny_sdxl_pipeline(tmp_path / "again")
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        a = load_file(str(tiny_sdxl_pipeline_dir / f"{part}.safetensors"))
        b = load_file(str(again / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
