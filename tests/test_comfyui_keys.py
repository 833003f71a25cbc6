"""The Flux.1 / SD 3 single-file LoRA (`export --format webui`) against ComfyUI's LoRA key map (issue 21 item 4):
every key must be read by ComfyUI, none left unloaded, and every trained module must reach a ComfyUI weight.

What ComfyUI accepts is restated below in our own code, from reading its sources; docs/flux-sd3.md ("The single
file in ComfyUI") names the files, commits and lines. In short:
- comfy/lora.py, `model_lora_keys_unet`: for a Flux model, each weight `<name>.weight` that comfy/utils.py's
  `flux_to_diffusers(unet_config)` lists (diffusers' names) is accepted as the LoRA prefix `transformer.<name>`; for
  an SD 3 model the same through `mmdit_to_diffusers(unet_config)`.
- `flux_to_diffusers`: diffusers' separate q, k, v projections land in row slices of the original model's fused
  weights: a double block's `attn.to_q/k/v` in `img_attn.qkv`, `attn.add_q/k/v_proj` in `txt_attn.qkv`; a single
  block's `attn.to_q/k/v` and `proj_mlp` in `linear1` (rows [0, h), [h, 2h), [2h, 3h), [3h, 7h), h = hidden_size).
- `mmdit_to_diffusers`: for block i < num_blocks (ComfyUI's detection sets depth = hidden // 64 and no num_blocks,
  so num_blocks = depth), `attn.to_q/k/v` in `x_block.attn.qkv`, `attn.add_q/k/v_proj` in `context_block.attn.qkv`,
  `attn2.to_q/k/v` (SD 3.5 Medium's second attention) in `x_block.attn2.qkv`, each slice 64 * depth rows.
- comfy/lora.py, `load_lora`, and comfy/weight_adapter/lora.py, `LoRAAdapter.load`: for an accepted prefix x the
  file's `x.alpha` and `x.dora_scale` are read, and one (up, down) pair among the spellings listed in
  LORA_PAIR_SPELLINGS; any other key is logged as "lora key not loaded". The scale is alpha / rank.

The tests build that map for the tiny test transformers and for the published Flux.1-dev, SD 3.5 Medium and SD 3.5
Large configs (on the meta device: no weights are made), and check our exports against it. An optional last test runs
ComfyUI's own code on the tiny exports when PALP_COMFYUI names a ComfyUI checkout.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import to_toml, write_test_image
from rich.console import Console
from tiny_flow_pipeline import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

# ComfyUI's (up, down) key spellings for a LoRA prefix x, in the order LoRAAdapter.load tries them
LORA_PAIR_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
READ_BESIDE_THE_PAIR = (".alpha", ".dora_scale")  # load_lora reads these for every accepted prefix


# --- ComfyUI's key map, restated ---------------------------------------------------------------------------------
# Each map: accepted LoRA prefix -> (ComfyUI model weight, (first row, rows) of it, or None for the whole weight).
# Only the linear layers of the blocks (attention and MLP), which is where LoRAs go; the embedders and modulation
# layers, also in ComfyUI's map, are left out, so a LoRA on them would fail these tests (none of ours has one).


def _qkv(prefix: str, names: tuple[str, str, str], weight: str, rows: int) -> dict:
    return {f"{prefix}.{name}": (weight, (i * rows, rows)) for i, name in enumerate(names)}


def comfy_flux_map(double_blocks: int, single_blocks: int, hidden: int) -> dict:
    """What comfy/utils.py's flux_to_diffusers gives comfy/lora.py's model_lora_keys_unet for a Flux.1 model."""
    out = {}
    for i in range(double_blocks):
        src, dst = f"transformer.transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        out.update(_qkv(src, ("attn.to_q", "attn.to_k", "attn.to_v"), f"{dst}.img_attn.qkv.weight", hidden))
        out.update(_qkv(src, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), f"{dst}.txt_attn.qkv.weight",
                        hidden))
        for name, weight in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            out[f"{src}.{name}"] = (f"{dst}.{weight}.weight", None)
    for i in range(single_blocks):
        src, dst = f"transformer.single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        out.update(_qkv(src, ("attn.to_q", "attn.to_k", "attn.to_v"), f"{dst}.linear1.weight", hidden))
        out[f"{src}.proj_mlp"] = (f"{dst}.linear1.weight", (3 * hidden, 4 * hidden))
        out[f"{src}.proj_out"] = (f"{dst}.linear2.weight", None)
    return out


def comfy_sd3_map(depth: int, num_blocks: int | None = None) -> dict:
    """What comfy/utils.py's mmdit_to_diffusers gives model_lora_keys_unet for an SD 3 model (depth = hidden // 64)."""
    out, rows = {}, 64 * depth
    for i in range(depth if num_blocks is None else num_blocks):
        src, dst = f"transformer.transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        out.update(_qkv(src, ("attn.to_q", "attn.to_k", "attn.to_v"), f"{dst}.x_block.attn.qkv.weight", rows))
        out.update(_qkv(src, ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                        f"{dst}.context_block.attn.qkv.weight", rows))
        out.update(_qkv(src, ("attn2.to_q", "attn2.to_k", "attn2.to_v"), f"{dst}.x_block.attn2.qkv.weight", rows))
        for name, weight in (("attn.to_out.0", "x_block.attn.proj"), ("attn.to_add_out", "context_block.attn.proj"),
                             ("attn2.to_out.0", "x_block.attn2.proj"), ("ff.net.0.proj", "x_block.mlp.fc1"),
                             ("ff.net.2", "x_block.mlp.fc2"), ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                             ("ff_context.net.2", "context_block.mlp.fc2")):
            out[f"{src}.{name}"] = (f"{dst}.{weight}.weight", None)
    return out


def comfy_reads(keys, key_map: dict) -> tuple[set[str], dict[str, str]]:
    """load_lora's reading, restated: (the keys it leaves unloaded, {accepted prefix: the pair spelling it found})."""
    read, found = set(), {}
    for prefix in key_map:
        read.update(prefix + part for part in READ_BESIDE_THE_PAIR if prefix + part in keys)
        for up, down in LORA_PAIR_SPELLINGS:
            if prefix + up in keys:
                assert prefix + down in keys, f"{prefix}{up} without {prefix}{down}: ComfyUI fails on it"
                read.update((prefix + up, prefix + down))
                found[prefix] = up
                break
    return set(keys) - read, found


def test_the_restated_map_reads_only_what_comfyui_reads():
    """The checker is not vacuous: kohya's or peft's names, a half pair and a module ComfyUI lacks stay unloaded."""
    key_map = comfy_flux_map(1, 1, 32)
    good = "transformer.transformer_blocks.0.attn.to_q"
    unloaded, found = comfy_reads({f"{good}.lora_A.weight", f"{good}.lora_B.weight", f"{good}.alpha"}, key_map)
    assert unloaded == set() and found == {good: ".lora_B.weight"}
    for key in ("lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",  # kohya names: not Flux's in ComfyUI
                f"{good}.lora_magnitude_vector",  # peft's DoRA magnitude: ComfyUI reads .dora_scale
                "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight",  # not in the restated map
                "transformer.transformer_blocks.1.attn.to_q.alpha"):  # a block the model does not have
        assert comfy_reads({key}, key_map)[0] == {key}
    assert comfy_reads({f"{good}.lora_A.weight"}, key_map)[0] == {f"{good}.lora_A.weight"}  # down alone: unread


# --- our exports against it -------------------------------------------------------------------------------------


def check_single_file(lora: dict, key_map: dict, trained_modules: set[str], lora_alpha: float) -> None:
    """Every key read by ComfyUI, every trained module patched (with its alpha), shapes fitting ComfyUI's slices."""
    unloaded, found = comfy_reads(lora, key_map)
    assert unloaded == set(), f"ComfyUI would leave these unloaded: {sorted(unloaded)[:5]}"
    assert set(found) == {f"transformer.{m}" for m in trained_modules}  # none left out, none extra
    assert all(float(lora[f"{m}.alpha"]) == lora_alpha for m in found)
    for prefix in found:
        weight, rows = key_map[prefix]
        up, down = lora[f"{prefix}.lora_B.weight"], lora[f"{prefix}.lora_A.weight"]
        assert up.shape[1] == down.shape[0]
        if f"{prefix}.dora_scale" in lora:  # the output-axis layout ComfyUI tells by its first dimension
            assert tuple(lora[f"{prefix}.dora_scale"].shape) == (up.shape[0], 1)
        if rows is not None:
            assert up.shape[0] == rows[1], f"{prefix}: {up.shape[0]} rows for ComfyUI's slice of {rows[1]} in {weight}"


def _peft_modules(lora: dict) -> set[str]:
    return {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_A." in k}


def _quiet():
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Flux.1 and a tiny SD 3 project trained one step, exported in the webui format:
    {family: (single file, trained peft LoRA, lora_alpha, transformer config)}."""
    from safetensors.torch import load_file

    from palpcompose.export import export
    from palpcompose.project import load_project
    from palpcompose.train import train

    out = {}
    for family, make in (("flux", make_tiny_flux_pipeline), ("sd3", make_tiny_sd3_pipeline)):
        base = make(tmp_path_factory.mktemp(f"{family}-base") / "pipe")
        root = tmp_path_factory.mktemp(f"{family}-project") / "p"
        for i in range(2):
            write_test_image(root / "refs" / f"{i}.png", seed=i, size=32)
        (root / "palp.toml").write_text(to_toml({
            "project": {"name": "fx", "base_model": str(base)},
            "subjects": {"V1": {"class_name": "cat", "images": ["refs/*.png"]}},
            "palp": {"guidance": "none"},
            "train": {"resolution": 32, "steps": 1, "save_every": 1, "preview_every": 0, "lora_rank": 4,
                      "lora_alpha": 8.0, "learning_rate": 1e-2, "embedding_learning_rate": 1e-2},
        }))
        train(root, console=_quiet())
        export(load_project(root), "webui", root / "exported")
        trained = load_file(str(root / "out" / "weights" / "final" / "lora.safetensors"))
        config = (base / "transformer" / "config.json").read_text()
        out[family] = (load_file(str(root / "exported" / "fx.safetensors")), trained, 8.0, config)
    return out


def test_tiny_flux_single_file_is_all_read_by_comfyui_key_map(exported):
    import json

    lora, trained, alpha, config = exported["flux"]
    config = json.loads(config)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    key_map = comfy_flux_map(config["num_layers"], config["num_single_layers"], hidden)
    modules = _peft_modules(trained)
    assert any(m.startswith("single_transformer_blocks.") for m in modules)  # single blocks' q/k/v into linear1
    check_single_file(lora, key_map, modules, alpha)


def test_tiny_sd3_single_file_is_all_read_by_comfyui_key_map(exported):
    import json

    lora, trained, alpha, config = exported["sd3"]
    # the tiny SD 3 is 16 wide, so ComfyUI's depth = hidden // 64 would be 0: map its blocks as for a real SD 3,
    # whose hidden size is 64 per block (the slice rows then are not the tiny model's, hence rows are not compared)
    key_map = {k: (w, None) for k, (w, _) in comfy_sd3_map(json.loads(config)["num_layers"]).items()}
    check_single_file(lora, key_map, _peft_modules(trained), alpha)


# Published transformer configs (the models' transformer/config.json on the hub), shapes only
FLUX_1_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
              "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
              "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
              "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}


@pytest.mark.parametrize("name,adapter", [("flux-dev", "lora"), ("flux-dev", "dora"), ("sd3.5-medium", "lora"),
                                          ("sd3.5-large", "lora")])
def test_full_size_single_files_are_all_read_by_comfyui_key_map(name, adapter):
    """The real models' LoRA (our targets, on the meta device), through flow_single_file: SD 3.5 Medium's second
    attention (attn2) and the last SD 3 block without `to_add_out` included; slice sizes are the real ones."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft.utils import get_peft_model_state_dict

    from palpcompose.export import flow_single_file
    from palpcompose.models.components import add_lora
    from palpcompose.models.families import family_of
    from palpcompose.weights import TrainedWeights

    family = "flux" if name == "flux-dev" else "sd3"
    config = {"flux-dev": FLUX_1_DEV, "sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}[name]
    with torch.device("meta"):
        if family == "flux":
            model = FluxTransformer2DModel(**config)
        else:
            model = SD3Transformer2DModel(**config)
        add_lora(model, 4, 4.0, family_of(family).lora_targets, adapter=adapter)
    peft_lora = get_peft_model_state_dict(model)
    weights = TrainedWeights(lora=peft_lora, embeddings={}, placeholders={}, rank=4, lora_alpha=4.0,
                             encoder_keys=("clip_l", "t5"), adapter=adapter)
    lora = flow_single_file(weights)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if family == "flux":
        key_map = comfy_flux_map(config["num_layers"], config["num_single_layers"], hidden)
    else:
        key_map = comfy_sd3_map(hidden // 64)  # ComfyUI's detection: depth = x_embedder width // 64
        assert hidden // 64 == config["num_layers"]
    modules = _peft_modules(peft_lora)
    expected = {"flux-dev": 19 * 8 + 38 * 3, "sd3.5-medium": 24 * 8 - 1 + 13 * 4, "sd3.5-large": 38 * 8 - 1}[name]
    assert len(modules) == expected  # every targeted projection, nothing else
    check_single_file(lora, key_map, modules, 4.0)
    assert (adapter == "dora") == all(f"transformer.{m}.dora_scale" in lora for m in modules)


# --- ComfyUI's own code (optional) -----------------------------------------------------------------------------


class _Anything(types.ModuleType):
    """A stub module: any attribute is a do-nothing callable (what ComfyUI's import-time code touches)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _model_base_stub():
    module = types.ModuleType("comfy.model_base")
    classes = {}

    def __getattr__(name):  # every model class model_lora_keys_unet asks isinstance about
        if name.startswith("__"):
            raise AttributeError(name)
        return classes.setdefault(name, type(name, (), {}))

    module.__getattr__ = __getattr__
    return module


@pytest.fixture
def comfyui():
    """ComfyUI's comfy.lora, comfy.lora_convert and comfy.utils from the checkout named by PALP_COMFYUI, with the
    heavy modules they import (model management, the model classes, the command line) stubbed."""
    root = os.environ.get("PALP_COMFYUI")
    if not root:
        pytest.skip("set PALP_COMFYUI to a ComfyUI checkout to run ComfyUI's own key map on the exports")
    if not (Path(root) / "comfy" / "lora.py").is_file():
        pytest.fail(f"PALP_COMFYUI={root}: no comfy/lora.py there; give the folder of a ComfyUI checkout")
    import importlib.util

    before = set(sys.modules)
    sys.path.insert(0, root)
    try:
        for name in ("einops",):  # imported at the top of comfy/utils.py, used only by code we do not call
            if importlib.util.find_spec(name) is None:
                sys.modules[name] = _Anything(name)
        import comfy

        args = types.SimpleNamespace(mmap_torch_files=False, disable_mmap=False)
        stubs = {"cli_args": _Anything("comfy.cli_args"), "memory_management": _Anything("comfy.memory_management"),
                 "storage": _Anything("comfy.storage"), "model_management": _Anything("comfy.model_management"),
                 "model_base": _model_base_stub()}
        stubs["cli_args"].args = args
        stubs["model_management"].cast_to_device = (
            lambda t, device, dtype, non_blocking=False, copy=False: t.to(device=device, dtype=dtype, copy=copy))
        for name, module in stubs.items():
            sys.modules[f"comfy.{name}"] = module
            setattr(comfy, name, module)
        try:
            import comfy.lora
            import comfy.lora_convert
            import comfy.utils
        except ImportError as exc:
            pytest.fail(f"PALP_COMFYUI={root}: importing ComfyUI's comfy.lora failed ({exc}); install that module "
                        "or add it to the stubs of this fixture")
        yield comfy
    finally:
        sys.path.remove(root)
        for name in set(sys.modules) - before:
            del sys.modules[name]


def _comfy_model(comfy, kind: str, unet_config: dict):
    cls = getattr(comfy.model_base, kind)
    model = cls()
    model.model_config = types.SimpleNamespace(unet_config=unet_config)
    model.state_dict = dict  # the generic "diffusion_model.*" names are not ours: an empty model state
    return model


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfyui_own_key_map_loads_every_key(family, exported, comfyui, caplog):
    """ComfyUI's model_lora_keys_unet + convert_lora + load_lora on the tiny export: no "lora key not loaded"
    warning, one patch per trained module on the weight (and slice) the restated map says, and the patch ComfyUI
    computes is our alpha / rank * B A."""
    import json

    lora, trained, alpha, config = exported[family]
    config = json.loads(config)
    if family == "flux":
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        unet_config = {"depth": config["num_layers"], "depth_single_blocks": config["num_single_layers"],
                       "hidden_size": hidden}
        model, expected = _comfy_model(comfyui, "Flux", unet_config), comfy_flux_map(
            config["num_layers"], config["num_single_layers"], hidden)
    else:  # as for a real SD 3 (64 per block): the tiny one's depth // 64 would be 0
        model, expected = _comfy_model(comfyui, "SD3", {"depth": config["num_layers"]}), comfy_sd3_map(
            config["num_layers"])
    key_map = comfyui.lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfyui.lora.load_lora(comfyui.lora_convert.convert_lora(dict(lora)), key_map)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]
    modules = _peft_modules(trained)
    assert len(patches) == len(modules)
    for module in modules:
        weight, rows = expected[f"transformer.{module}"]
        target = (weight, (0, *rows)) if rows is not None else weight
        assert target in patches, f"{module}: ComfyUI patches {sorted(map(str, patches))[:3]}..., not {target}"
        up, down = lora[f"transformer.{module}.lora_B.weight"], lora[f"transformer.{module}.lora_A.weight"]
        zero = torch.zeros(up.shape[0], down.shape[1])
        patched = patches[target].calculate_weight(zero, weight, 1.0, 1.0, None, lambda a: a)
        assert torch.allclose(patched, alpha / down.shape[0] * up @ down, atol=1e-6)
