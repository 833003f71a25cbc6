"""SDXL: family detection and refusals, the tiny SDXL pipeline through train, render and export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import interrupt_in_step, prepared_state, tree_snapshot

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
    # Flux.1 and SD 3 text-to-image models train (tests/test_flux_sd3.py); these kinds of them do not
    "sd3-controlnet": ({"_class_name": "StableDiffusion3ControlNetPipeline",
                        "transformer": ["diffusers", "SD3Transformer2DModel"]}, None,
                       "a StableDiffusion3ControlNetPipeline pipeline"),
    "flux-fill": ({"_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}, None,
                  "Flux.1 Fill (an inpainting/outpainting model) (FluxFillPipeline)"),
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
    # "cannot train" is said of the kind found, not of the advice ("use the SDXL base model, which ... cannot train")
    assert "), which palpcompose cannot train" in message, message


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
    "sd3": ({f"{UNET}joint_blocks.0.x_block.attn.qkv.weight": (2, 2)}, "a Stable Diffusion 3 single-file checkpoint"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (2, 2)}, "Flux.1 schnell"),
}


@pytest.mark.parametrize("kind", SINGLE_FILES)
def test_single_file_family_from_its_keys(kind, tmp_path):
    names, expected = SINGLE_FILES[kind]
    path = _single_file(tmp_path / f"{kind}.safetensors", names)
    if expected in ("sd1", "sd2", "sdxl"):
        assert models.resolve_base_model(str(path)).family == expected
    else:
        with pytest.raises(UserError, match=re.escape(expected)) as err:
            models.resolve_base_model(str(path))
        assert "), which palpcompose cannot train" in str(err.value), err.value


def test_hub_cache_family(tmp_path, monkeypatch):
    """A cached hub id is read from the cache's model_index.json, as a folder is."""
    import huggingface_hub

    cache = _pipeline_folder(tmp_path / "cache", UNSUPPORTED_FOLDERS["flux-fill"][0])
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **kw: str(cache / name) if (cache / name).is_file() else None)
    with pytest.raises(UserError, match="Flux.1 Fill"):
        models.resolve_base_model("black-forest-labs/FLUX.1-Fill-dev")
    (cache / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert models.resolve_base_model("black-forest-labs/FLUX.1-dev").family == "flux"


def test_tiny_pipelines_families(tiny_pipeline_dir, tiny_vpred_pipeline_dir):
    assert models.resolve_base_model(str(tiny_pipeline_dir)).family == "sd1"
    assert models.resolve_base_model(str(tiny_vpred_pipeline_dir)).family == "sd2-v"
    assert models.resolve_base_model("builtin:toy").family == "toy"


@pytest.mark.parametrize("command", ["check", "train", "render", "export"])
def test_every_command_refuses_an_unsupported_model_with_exit_2(command, make_project, run_cli, tmp_path):
    _pipeline_folder(tmp_path / "sd3", *UNSUPPORTED_FOLDERS["sd3-controlnet"][:2])
    root = make_project({"project": {"base_model": str(tmp_path / "sd3")}})
    before = tree_snapshot(root)
    args = {"export": ["--format", "webui", "--out", tmp_path / "exported"]}.get(command, [])
    result = run_cli(command, root, *args)
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert "StableDiffusion3ControlNetPipeline" in result.err and "Stable Diffusion XL" in result.err
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


# --------------------------------------------------------------------------------------------------------------
# (c) training: a token per subject in both encoders, pooled + size conditioning on every UNet pass

TWO_SUBJECTS = {
    "subjects": {"V2": {"class_name": "painting", "images": ["refs/V2/*.png"], "prompt": "An oil painting of [V2]"}},
    "palp": {"target_prompt": "An oil painting of [V1] inspired by [V2] painting"},
}


@pytest.fixture
def make_sdxl_project(make_project, tiny_sdxl_pipeline_dir):
    def factory(overrides: dict | None = None, **kwargs):
        overrides = dict(overrides or {})
        overrides["project"] = {"base_model": str(tiny_sdxl_pipeline_dir), **overrides.get("project", {})}
        return make_project(overrides, **kwargs)

    return factory


def test_a_token_per_subject_in_both_encoders(make_sdxl_project, one_thread):
    from palpcompose.train import sample_batch, training_step

    state, subjects = prepared_state(make_sdxl_project(TWO_SUBJECTS), "palp")
    c = state.components
    assert c.family == "sdxl" and len(c.text_encoders) == 2
    tables = [enc.get_input_embeddings() for enc in c.text_encoders]
    width = tables[0].table.weight.shape[1]
    assert all(t.rows is state.token_embedding.rows for t in tables)  # one trained parameter, both encoders
    for tokenizer, table, columns in zip(c.tokenizers, tables, (slice(0, width), slice(width, None))):
        for i, (key, word) in enumerate((("V1", "cat"), ("V2", "painting"))):
            token = f"<tiny-{key.lower()}>"
            assert tokenizer.convert_tokens_to_ids(token) == table.first_id + i
            word_ids = tokenizer.encode(word, add_special_tokens=False)
            expected = table.table.weight[word_ids].mean(0)  # from the class word, in this encoder's own table
            assert torch.equal(state.token_embedding.rows[i, columns].detach(), expected)
    before = [t.full_table().detach().clone() for t in tables]
    g = torch.Generator().manual_seed(0)
    training_step(state, sample_batch(subjects, g, 2, 1000))
    for table, old in zip(tables, before):
        new = table.full_table().detach()
        assert torch.equal(new[: table.first_id], old[: table.first_id])  # every other row bit-identical
        assert (new[table.first_id:] - old[table.first_id:]).abs().max() > 0  # both encoders' tokens trained


@pytest.mark.parametrize("guidance,beta,passes", [("none", 1.0, 1), ("sds", 1.0, 2), ("palp", 2.0, 3)])
def test_every_unet_pass_gets_pooled_and_size_conditioning(make_sdxl_project, guidance, beta, passes, one_thread):
    from palpcompose.train import sample_batch, training_step

    state, subjects = prepared_state(make_sdxl_project({"palp": {"beta": beta}}), guidance)
    assert state.null_cond.pooled is not None and torch.count_nonzero(state.null_cond.embeds) == 0  # force zeros
    if guidance != "none":
        assert state.clean_cond.pooled is not None and state.clean_cond.pooled.abs().sum() > 0  # cached, pooled too
    seen = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((args[0].shape[0], added.get("text_embeds"), added.get("time_ids")))

    handle = state.components.unet.register_forward_pre_hook(hook, with_kwargs=True)
    training_step(state, sample_batch(subjects, torch.Generator().manual_seed(0), 1, 1000))
    handle.remove()
    assert len(seen) == passes  # personalization; frozen cond+uncond (batched); personalized beta pass (batched)
    for batch, pooled, time_ids in seen:
        assert pooled is not None and pooled.shape == (batch, 16)
        assert time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch  # original, crop, target size


def test_sd1_passes_get_nothing_added(make_project, one_thread):
    from palpcompose.train import sample_batch, training_step

    state, subjects = prepared_state(make_project({"palp": {"beta": 2.0}}), "palp")
    assert state.time_ids is None and state.null_cond.pooled is None
    kwargs_seen = []
    handle = state.components.unet.register_forward_pre_hook(lambda m, a, kw: kwargs_seen.append(dict(kw)),
                                                             with_kwargs=True)
    training_step(state, sample_batch(subjects, torch.Generator().manual_seed(0), 1, 1000))
    handle.remove()
    assert len(kwargs_seen) == 3 and all("added_cond_kwargs" not in kw for kw in kwargs_seen)


def quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=120)


def _final(root):
    from palpcompose.weights import load_trained_weights

    return load_trained_weights(root / "out" / "weights" / "final")


@pytest.mark.parametrize("guidance", ["palp", "sds", "none"])
def test_train_each_guidance_mode(make_sdxl_project, guidance, one_thread):
    from palpcompose.train import train

    root = make_sdxl_project({"train": {"steps": 2, "preview_every": 2 if guidance == "palp" else 0},
                              **(TWO_SUBJECTS if guidance == "palp" else {})})
    result = train(root, guidance=guidance, console=quiet())
    assert result.status == "completed" and result.steps_done == 2
    weights = _final(root)
    assert weights.text_encoder_dims == (16, 16)
    for token in weights.placeholders.values():
        clip_l, clip_g = weights.per_encoder(token)
        assert clip_l.shape == clip_g.shape == (16,)
    assert any(".lora_A." in k for k in weights.lora)
    if guidance == "palp":  # the preview grid rendered through StableDiffusionXLPipeline and the x0-hat rows
        assert (root / "out" / "previews" / "step-000002.png").is_file()


def test_resume_equals_an_uninterrupted_run(make_sdxl_project, one_thread):
    from palpcompose.train import train

    settings = {"train": {"steps": 2, "save_every": 1}}
    straight = make_sdxl_project(settings, dirname="straight")
    train(straight, console=quiet())
    resumed = make_sdxl_project(settings, dirname="resumed")
    train(resumed, steps=1, console=quiet())
    train(resumed, steps=2, resume=True, console=quiet())
    a, b = _final(straight), _final(resumed)
    for mine, theirs in ((a.lora, b.lora), (a.embeddings, b.embeddings)):
        assert mine.keys() == theirs.keys()
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) <= 1e-5


# --------------------------------------------------------------------------------------------------------------
# (d) render through StableDiffusionXLPipeline at its own default size; sweeps and --compare


@pytest.fixture(scope="module")
def trained_sdxl(tmp_path_factory, tiny_sdxl_pipeline_dir):
    """One SDXL project trained for 2 steps (snapshots at 1 and 2), shared by the render and export tests."""
    from conftest import write_project

    from palpcompose.train import train

    root = write_project(tmp_path_factory.mktemp("xl") / "proj", tiny_sdxl_pipeline_dir,
                         # a learning rate at which 2 steps move the LoRA far enough to change a render clearly
                         {"train": {"resolution": 8, "lora_rank": 4, "learning_rate": 0.01},
                          "render": {"seeds": [0, 1]}}, n_images=2)
    train(root, console=quiet())
    return root


def test_render_sweep_and_compare_at_the_pipelines_default_size(trained_sdxl, one_thread):
    from PIL import Image

    from palpcompose.project import load_project
    from palpcompose.render import render

    project = load_project(trained_sdxl)
    result = render(project, compare=True, sweep=True, steps=2)
    labels = {i.model for i in result.images}
    assert labels == {"base", "step-000001", "final"}
    assert result.settings.width == result.settings.height == 16  # the pipeline's default (8 latents x 2), not 8
    by = {(i.model, i.seed): i.path for i in result.images}
    with Image.open(by[("base", 0)]) as image:
        assert image.size == (16, 16)
    texts = {i.model: i.text for i in result.images}
    assert "<tiny-v1>" in texts["final"] and "cat" in texts["base"]
    assert result.contact_sheet.is_file()
    base_only = render(project, base_only=True, steps=2)  # render --base: the same base-model images, alone
    assert {i.model for i in base_only.images} == {"base"} and base_only.settings.width == 16
    with Image.open(base_only.images[0].path) as alone, Image.open(by[("base", base_only.images[0].seed)]) as seen:
        assert alone.tobytes() == seen.tobytes()


# --------------------------------------------------------------------------------------------------------------
# (e) export: both formats reloaded by plain diffusers, as their users load them


def _plain_render(pipe, prompt: str):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def _load_sdxl_embedding(pipe, path: Path, token: str) -> None:
    """diffusers' documented way for SDXL pivotal tuning: clip_l into the first encoder, clip_g into the second."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def test_both_exports_reload_in_plain_diffusers(trained_sdxl, tiny_sdxl_pipeline_dir, tmp_path, one_thread):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from palpcompose.export import export
    from palpcompose.project import load_project

    project = load_project(trained_sdxl)
    weights = _final(trained_sdxl)
    token = weights.placeholders["V1"]
    prompt = f"a photo of {token}"
    clip_l, clip_g = weights.per_encoder(token)

    def plain():
        return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_pipeline_dir), add_watermarker=False)

    renders = {}
    for fmt in ("diffusers", "webui"):
        result = export(project, fmt, tmp_path / fmt)
        lora_file = next(f.path for f in result.files if f.kind == "lora")
        embedding = next(f.path for f in result.files if f.kind == "embedding")
        state = load_file(str(embedding))  # the SDXL embedding format: one (1, D) tensor per encoder
        assert set(state) == {"clip_l", "clip_g"}
        assert torch.equal(state["clip_l"][0], clip_l) and torch.equal(state["clip_g"][0], clip_g)
        lora = load_file(str(lora_file))
        if fmt == "webui":  # kohya's SDXL names: SGM blocks, UNet only (no text-encoder LoRA is trained)
            assert all(k.startswith("lora_unet_") for k in lora)
            assert {re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k)[1] for k in lora} == {
                "input_blocks", "middle_block", "output_blocks"}
            assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
        pipe = plain()
        _load_sdxl_embedding(pipe, embedding, token)
        rows = [enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(token)]
                for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))]
        assert torch.equal(rows[0], clip_l) and torch.equal(rows[1], clip_g)
        without = _plain_render(pipe, prompt)
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        renders[fmt] = _plain_render(pipe, prompt)
        assert np.abs(renders[fmt] - without).max() > 1e-3  # the LoRA is loaded and changes the render
    # both formats carry the same LoRA: the same render (to float rounding)
    assert np.abs(renders["diffusers"] - renders["webui"]).max() < 1e-4


def test_sgm_key_numbering_matches_diffusers_inverse():
    """sgm_key is the inverse of diffusers' own SGM -> diffusers mapping, for SDXL base's layers_per_block=2."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from palpcompose.export import sgm_key

    ours = [f"lora_unet_down_blocks_{i}_attentions_{j}_transformer_blocks_0_attn1_to_q" for i in (1, 2) for j in (0, 1)]
    ours += ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]
    ours += [f"lora_unet_up_blocks_{i}_attentions_{j}_transformer_blocks_0_attn1_to_v"
             for i in (0, 1) for j in (0, 1, 2)]
    sgm = {f"{sgm_key(k, 2)}.lora_down.weight": k for k in ours}
    assert "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm  # down 2, attn 0
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_v.lora_down.weight" in sgm  # up 1, attn 2
    back = _maybe_map_sgm_blocks_to_diffusers({k: torch.zeros(1) for k in sgm}, SimpleNamespace(layers_per_block=2))
    # diffusers renumbers to (block, attention) and renames the blocks in a later step of its kohya loader
    names = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    back = [re.sub("|".join(names), lambda m: names[m[0]], k.split(".")[0]) for k in back]
    assert sorted(back) == sorted(ours)


def test_export_cli_says_how_to_load_sdxl_embeddings(trained_sdxl, run_cli, tmp_path):
    result = run_cli("export", trained_sdxl, "--format", "diffusers", "--out", tmp_path / "out")
    assert result.code == 0, result.err
    text = " ".join(result.out.split())
    assert "clip_g" in text and "text_encoder_2" in text


# --------------------------------------------------------------------------------------------------------------
# (f) memory: the estimate counts both text encoders


def test_memory_estimate_counts_both_text_encoders(tiny_sdxl_pipeline_dir):
    from palpcompose import memory

    c = models.load_components(models.resolve_base_model(str(tiny_sdxl_pipeline_dir)))
    unet, vae, text_encoder = c.unet, c.vae, c.text_encoder
    models.freeze(unet, vae, text_encoder)
    lora = models.add_lora(unet, rank=4, lora_alpha=4)
    for module in (unet, vae):  # frozen UNet and VAE in bf16, the text encoders in fp32, as training keeps them
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    both = [text_encoder.text_encoder, text_encoder.text_encoder_2]

    def estimate(**kw):
        settings = {"resolution": 512, "batch_size": 1, "half_precision": True, "gradient_checkpointing": False, **kw}
        return memory.estimate_training_memory(unet, vae, text_encoder, lora, **settings)

    frozen = sum(p.numel() * p.element_size() for mod in (unet, vae, *both) for p in mod.parameters()
                 if not p.requires_grad)
    assert estimate().weights_gib == pytest.approx(frozen / 2**30, rel=1e-6)
    text_bytes = sum(p.numel() * 4 for enc in both for p in enc.parameters())  # fp32, as training keeps them
    assert estimate().weights_gib * 2**30 > text_bytes + sum(p.numel() * 2 for p in unet.parameters()
                                                            if not p.requires_grad)
    assert estimate(resolution=1024).activations_gib == pytest.approx(4 * estimate().activations_gib, rel=1e-6)


def test_check_passes_and_sigint_resumes(make_sdxl_project, run_cli, monkeypatch, one_thread):

    from palpcompose import train as train_mod
    from palpcompose.errors import Interrupted

    root = make_sdxl_project({"train": {"steps": 2, "save_every": 0}})
    result = run_cli("check", root)
    assert result.code == 0, result.err
    real_step = interrupt_in_step(monkeypatch, 1)
    with pytest.raises(Interrupted, match="--resume"):
        train_mod.train(root, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    assert json.loads((root / "out" / "manifest.json").read_text())["steps_done"] == 1
    assert train_mod.train(root, resume=True, console=quiet()).steps_done == 2


def test_clip_eval_of_an_sdxl_project(trained_sdxl, tiny_sdxl_pipeline_dir, tmp_path, run_cli, one_thread):
    from test_eval import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip", tiny_sdxl_pipeline_dir / "tokenizer")
    result = run_cli("eval", trained_sdxl, "--clip", clip, "--seeds", "0-1")
    assert result.code == 0, result.err
    data = json.loads((trained_sdxl / "out" / "eval.json").read_text())
    assert data["metric"] == "clip" and len(data["images"]) == 2
    assert 0 <= data["text_alignment"] <= 1 and 0 <= data["subject_fidelity"] <= 1


def test_fp16_keeps_the_sdxl_vae_in_fp32(make_sdxl_project, tiny_pipeline_dir, make_project, one_thread):
    """SDXL's VAE overflows in fp16 (force_upcast): under fp16 it stays fp32 and encodes the references in fp32;
    the UNet goes to fp16. An SD-1 VAE follows the UNet as before."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project
    from palpcompose.train import prepare_state, prepare_subjects

    for root, vae_dtype in ((make_sdxl_project(dirname="xl"), torch.float32),
                            (make_project(dirname="sd1"), torch.float16)):
        project = load_project(root)
        config = project.config
        c = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
        tokens = models.placeholder_tokens(config.project.name, config.subjects)
        AcceleratorState._reset_state()
        state = prepare_state(config, c, Accelerator(mixed_precision="fp16", cpu=True),
                              guidance_config(config), tokens)
        assert c.unet.dtype == torch.float16 and c.vae.dtype == vae_dtype
        if vae_dtype == torch.float32:
            subjects = prepare_subjects(project, config, state, tokens)
            means = subjects[0].latent_mean  # one tensor, or one per reference (aspect-ratio buckets)
            assert all(torch.isfinite(m).all() for m in (means if isinstance(means, list) else [means]))
    AcceleratorState._reset_state()
