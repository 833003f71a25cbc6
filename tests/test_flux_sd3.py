"""Flux.1 and Stable Diffusion 3 through the family layer (issue 21), on the tiny offline pipelines of
tests/tiny_flow_pipeline.py: detection and refusals, `check`, training with palp guidance (manifest, resume,
SIGINT), render and export round trips."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from conftest import write_test_image
from rich.console import Console
from tiny_flow_pipeline import flow_project, make_tiny_flux_pipeline, make_tiny_sd3_pipeline

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
    with pytest.raises(UserError, match="schnell") as err:
        resolve_base_model(str(schnell))
    # "cannot train" is said of schnell, not of the advice (it read "use Flux.1-dev ..., which palpcompose cannot
    # train")
    assert "shifting), which palpcompose cannot train; use Flux.1-dev" in str(err.value)
    turbo = tmp_path / "turbo"
    shutil.copytree(sd3_dir, turbo)
    _edit_json(turbo / "scheduler" / "scheduler_config.json",
               _name_or_path="stabilityai/stable-diffusion-3.5-large-turbo")
    with pytest.raises(UserError, match="Turbo"):
        resolve_base_model(str(turbo))
    # SD 3.5 Large Turbo has SD 3.5 Large's configs, and save_pretrained writes no _name_or_path: its name tells it
    for where, folder, change in (("folder", "stable-diffusion-3.5-large-turbo", None),
                                  ("model_index.json", "sd35", {"_name_or_path": "org/SD3.5-Large-Turbo"})):
        turbo = tmp_path / where / folder
        shutil.copytree(sd3_dir, turbo)
        if change:
            _edit_json(turbo / "model_index.json", **change)
        with pytest.raises(UserError, match="SD 3.5 Large Turbo"):
            resolve_base_model(str(turbo))
    from palpcompose.models import config_reader
    from palpcompose.models.families import model_names

    assert model_names("hub", "stabilityai/stable-diffusion-3.5-large-turbo", {}, lambda name: None) == (
        "stabilityai/stable-diffusion-3.5-large-turbo",)
    # Flux.1 schnell by its name, unless the configs are clearly Flux.1-dev's (then the weights are dev's)
    named = tmp_path / "named" / "FLUX.1-schnell"
    shutil.copytree(flux_dir, named)
    assert resolve_base_model(str(named)).family == "flux"  # a guidance embedding and resolution-dependent shift
    _edit_json(named / "transformer" / "config.json", guidance_embeds=False)
    with pytest.raises(UserError, match="Flux.1 schnell \\(named 'FLUX.1-schnell'.*no guidance embedding"):
        resolve_base_model(str(named))
    assert model_names("folder", str(named), {}, config_reader("folder", str(named))) == ("FLUX.1-schnell",)
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
        with pytest.raises(UserError, match=words) as err:
            detect_family("single_file", str(tmp_path / name))
        assert re.search(r"(layout|\)), which palpcompose cannot train; ", str(err.value))  # then what to use
        assert "(black-forest-labs/FLUX.1-dev)" in str(err.value) or "stable-diffusion-3.5" in str(err.value)


@pytest.mark.parametrize("family,component,what", [("flux", "transformer", "Flux.1's transformer"),
                                                   ("sd3", "transformer", "Stable Diffusion 3's transformer"),
                                                   ("sd", "unet", "a Stable Diffusion UNet")])
def test_a_pipeline_component_given_as_base_model_says_what_it_is_and_the_folder_to_give(
        family, component, what, flux_dir, sd3_dir, tiny_pipeline_dir):
    """The diffusers-layout transformer of a Flux folder was said to hold 'no Stable Diffusion UNet (66 tensors,
    none named model.diffusion_model.*)'."""
    folder = {"flux": flux_dir, "sd3": sd3_dir, "sd": tiny_pipeline_dir}[family]
    file = folder / component / "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError) as err:
        resolve_base_model(str(file))
    assert f"this file is {what} in the diffusers layout" in str(err.value)
    assert f"give base_model the folder that holds it, {folder}" in str(err.value)


def test_check_shows_the_family_the_defaults_and_what_alpha_beta_mean(flux_dir, sd3_dir, tmp_path, run_cli):
    flux = run_cli("check", str(flow_project(tmp_path / "f", flux_dir)))
    assert flux.code == 0, flux.out + flux.err
    text = "".join((flux.out + flux.err).replace("│", "").split())  # table cells wrap anywhere
    assert "(Flux.1)" in text and "guidanceembedding" in text and "palp.alpha=3.5" in text
    assert "train.learning_rate=0.0001" not in text  # palp.toml sets it: not a model default
    assert "tokenlimits:CLIP77,T5512" in text and "T5tokens" in text  # T5 reads FluxPipeline's 512 tokens
    sd3 = run_cli("check", str(flow_project(tmp_path / "s", sd3_dir, learning_rate=None)))
    assert sd3.code == 0, sd3.out + sd3.err
    text = "".join((sd3.out + sd3.err).replace("│", "").split())
    assert "(StableDiffusion3)" in text and "train.learning_rate=0.0004" in text and "README_sd3" in text
    assert "palp.alpha=7.5" in text and "realclassifier-freeguidance" in text
    assert "tokenlimits:CLIP77,T5256" in text  # StableDiffusion3Pipeline's max_sequence_length


def _with_8x_vae(base, folder):
    """A copy of the tiny pipeline whose VAE config says 4 blocks (an 8x VAE, as every released model): the image
    sides it takes are then multiples of 16, as Flux.1's and SD 3's. Only the configs are read by the refusals."""
    shutil.copytree(base, folder)
    _edit_json(folder / "vae" / "config.json", block_out_channels=[8, 8, 16, 16])
    return folder


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sizes_the_model_cannot_take_are_refused_with_the_nearest_ones(family, flux_dir, sd3_dir, tmp_path, run_cli):
    """Flux.1 packs 2x2 latent patches and SD 3's transformer cuts patch_size ones: with an 8x VAE each image side
    is a multiple of 16. train.resolution = 24 passed check and crashed train (exit 1, out/ left behind); render
    --width 72 was a diffusers ValueError (SD 3) or rounded to 64 while the PNG said 72 (Flux)."""
    name = {"flux": "Flux.1", "sd3": "Stable Diffusion 3"}[family]
    base = _with_8x_vae(flux_dir if family == "flux" else sd3_dir, tmp_path / "model")
    root = flow_project(tmp_path / "p", base, resolution=24)
    for command in ("check", "train"):
        result = run_cli(command, root)
        assert result.code == 2, result.out + result.err
        assert "train.resolution: must be a multiple of 16 for " + name in result.err
        assert "use 16 or 32" in result.err and "Traceback" not in result.err
        assert not (root / "out").exists()
    (root / "palp.toml").write_text((root / "palp.toml").read_text().replace("resolution = 24", "resolution = 32"))
    assert run_cli("check", root).code == 0
    result = run_cli("render", root, "--base", "--width", "72")
    assert result.code == 2 and "--width 72: must be a multiple of 16" in result.err and "use 64 or 80" in result.err
    assert not (root / "out").exists()
    result = run_cli("render", "--help")
    assert "of 16 for Flux.1 and SD 3" in " ".join(result.out.split())


def test_the_sampler_is_the_familys_and_others_are_refused(flux_dir, tiny_pipeline_dir, tmp_path, run_cli):
    """Flux.1 and SD 3 render with their flow-matching Euler sampler only (Family.samplers): check said '4 dpm++
    steps' and render.json 'dpm++' while the image was drawn with Euler, and --scheduler ddim was silently
    ignored. Now the default is euler, and another sampler is exit 2 in palp.toml and as an option."""
    root = flow_project(tmp_path / "p", flux_dir)
    result = run_cli("check", root)
    assert result.code == 0
    text = " ".join(result.out.replace("│", " ").split())
    assert "2 euler steps" in text and "dpm++" not in text
    result = run_cli("render", root, "--base", "--scheduler", "ddim")
    assert result.code == 2 and "--scheduler ddim: 'ddim' is not a sampler Flux.1 renders with" in result.err
    assert "use --scheduler euler" in result.err and not (root / "out").exists()
    toml = root / "palp.toml"
    toml.write_text(toml.read_text().replace("[render]", '[render]\nscheduler = "dpm++"'))
    result = run_cli("check", root)
    assert result.code == 2 and "render.scheduler: 'dpm++' is not a sampler Flux.1 renders with" in result.err
    sd = flow_project(tmp_path / "sd", tiny_pipeline_dir)  # Stable Diffusion: its own samplers, not euler
    result = run_cli("render", sd, "--base", "--scheduler", "euler")
    assert result.code == 2 and "(it renders with dpm++, ddim, euler-a)" in result.err


def _cut(file, keep):
    """Truncate `file` to `keep` of its bytes (a download or copy cut short)."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("family,weights,keep", [
    ("flux", "transformer/diffusion_pytorch_model.safetensors", 0.5),
    ("flux", "vae/diffusion_pytorch_model.safetensors", 0.0),
    ("sd3", "text_encoder_3/model.safetensors", 0.5),
    ("sd", "unet/diffusion_pytorch_model.safetensors", 0.9),
])
def test_a_damaged_weights_file_is_named_by_check_and_train(family, weights, keep, flux_dir, sd3_dir,
                                                            tiny_pipeline_dir, tmp_path, run_cli):
    """A truncated or empty .safetensors in the model folder passed `check` (exit 0); train then said a generic
    'could not be loaded' (for SD 3's text_encoder_3 without naming the file). The headers are read, not the
    weights: the file is named, with what is wrong and how to get it again."""
    base = tmp_path / "model"
    shutil.copytree({"flux": flux_dir, "sd3": sd3_dir, "sd": tiny_pipeline_dir}[family], base)
    _cut(base / weights, keep)
    root = flow_project(tmp_path / "p", base)
    for command in ("check", "train"):
        result = run_cli(command, root)
        assert result.code == 2, result.out + result.err
        text = " ".join(result.err.split())
        assert f"{base / weights}: damaged or incomplete weights file" in text, text
        assert ("it is empty" if keep == 0 else "but its header declares") in text
        assert "download the model again" in text and "Traceback" not in text
        assert not (root / "out").exists()


def test_a_damaged_single_file_and_a_missing_shard_are_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from palpcompose.models.weight_files import check_weight_files, safetensors_problem

    single = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, single)
    assert safetensors_problem(single) is None
    _cut(single, 0.8)
    with pytest.raises(UserError, match="model.safetensors: damaged or incomplete weights file .*download or copy it"):
        resolve_base_model(str(single))
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="names diffusion_pytorch_model-00001-of-00002.safetensors, missing"):
        check_weight_files(tmp_path / "pipe", ["unet"], "fix")


# --- training ------------------------------------------------------------------------------------------------------


def final_weights(root):
    from safetensors.torch import load_file

    folder = root / "out" / "weights" / "final"
    return load_file(str(folder / "lora.safetensors")), load_file(str(folder / "embeddings.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _count_passes(monkeypatch):
    """Every transformer forward of a training step, as (batch size, guidance value or None)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    passes = []
    for cls in (FluxTransformer2DModel, SD3Transformer2DModel):
        real = cls.forward

        def forward(self, *args, _real=real, **kwargs):
            g = kwargs.get("guidance")
            passes.append((kwargs["hidden_states"].shape[0], None if g is None else round(float(g[0]), 3)))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)
    return passes


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_palp_training_completes_and_records_the_family(family, flux_dir, sd3_dir, tmp_path, monkeypatch):
    from palpcompose.train import train
    from palpcompose.weights import load_trained_weights

    base = flux_dir if family == "flux" else sd3_dir
    root = flow_project(tmp_path / family, base, steps=1, save_every=0)
    passes = _count_passes(monkeypatch)
    assert train(root, console=quiet()).status == "completed"
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == family and manifest["guidance"] == "palp"
    log = json.loads((root / "out" / "logs" / "train.jsonl").read_text().splitlines()[0])
    assert log["loss_align"] != 0 and log["grad_align"] > 0
    assert -1 <= log["cos_palp_sds"] <= 1  # the SD diagnostic, for flow runs too (guidance.PalpGuidance)
    if family == "flux":  # distilled: one pass each, at beta (personalization), alpha (frozen), beta (LoRA)
        assert passes == [(1, 1.0), (1, 3.5), (1, 1.0)]
    else:  # real CFG: the personalization pass, the frozen model's two (alpha 7.5), the LoRA's one (beta 1)
        assert passes == [(1, None)] * 4
    weights = load_trained_weights(root / "out" / "weights" / "final")
    keys = ("clip_l", "t5") if family == "flux" else ("clip_l", "clip_g", "t5")
    assert weights.encoder_keys == keys and len(weights.text_encoder_dims) == len(keys)
    assert any(".add_q_proj." in k for k in weights.lora) and set(weights.target_modules) >= {"to_q", "to_add_out"}


def test_flux_resume_is_bit_exact_and_sigint_leaves_a_resumable_checkpoint(flux_dir, tmp_path, monkeypatch):
    import os
    import signal

    from palpcompose import train as train_mod
    from palpcompose.errors import Interrupted
    from palpcompose.train import train

    straight = flow_project(tmp_path / "straight", flux_dir, steps=3)
    train(straight, console=quiet())
    finished = flow_project(tmp_path / "finished", flux_dir, steps=3)
    train(finished, steps=2, console=quiet())
    train(finished, steps=3, resume=True, console=quiet())
    assert max_diff(final_weights(finished)[0], final_weights(straight)[0]) == 0
    assert max_diff(final_weights(finished)[1], final_weights(straight)[1]) == 0

    interrupted = flow_project(tmp_path / "interrupted", flux_dir, steps=3)
    real_step, calls = train_mod.training_step, []

    def step_then_signal(state, batch):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", step_then_signal)
    with pytest.raises(Interrupted, match="--resume"):
        train(interrupted, console=quiet())
    monkeypatch.setattr(train_mod, "training_step", real_step)
    assert json.loads((interrupted / "out" / "manifest.json").read_text())["steps_done"] == 1
    assert train(interrupted, resume=True, console=quiet()).steps_done == 3
    assert max_diff(final_weights(interrupted)[0], final_weights(straight)[0]) == 0


def test_t5_tokens_false_trains_clip_tokens_only_and_t5_reads_the_class_word(flux_dir, tmp_path):
    from palpcompose.train import train
    from palpcompose.weights import load_trained_weights

    root = flow_project(tmp_path / "no-t5", flux_dir, steps=1, save_every=0, t5_tokens=False)
    train(root, console=quiet())
    weights = load_trained_weights(root / "out" / "weights" / "final")
    assert weights.encoder_keys == ("clip_l",) and weights.embeddings["<fx-v1>"].shape == (16,)

    from accelerate import Accelerator

    from palpcompose import models
    from palpcompose.flow_step import prepare_flow_state
    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project

    config = load_project(root).config
    c = models.load_components(models.resolve_base_model(str(flux_dir)))
    tokens = models.placeholder_tokens("fx", config.subjects)
    prepare_flow_state(config, c, Accelerator(mixed_precision="no"), guidance_config(config), tokens)
    clip_ids, t5_ids = c.tokenize(["A photo of <fx-v1>"]).split([77, 512], dim=-1)
    t5 = c.text_encoder.tokenizers[1]
    assert "<fx-v1>" not in t5.get_vocab()  # no T5 token ...
    assert t5_ids.tolist() == t5(["A photo of cat"], padding="max_length", max_length=512).input_ids  # class word
    assert c.tokenizer.convert_tokens_to_ids("<fx-v1>") in clip_ids[0].tolist()  # CLIP reads the learned token


# --- render and export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(flux_dir, sd3_dir, tmp_path_factory):
    """A Flux.1 (distilled) and an SD 3 project trained 2 steps with palp guidance, a snapshot per step and a
    preview at step 2 (the flow preview grid)."""
    from palpcompose.train import train

    roots = {}
    for family, base in (("flux", flux_dir), ("sd3", sd3_dir)):
        root = flow_project(tmp_path_factory.mktemp(f"trained-{family}") / "p", base, preview_every=2)
        train(root, console=quiet())
        roots[family] = root
    return roots


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_render_sweep_and_compare_with_trained_weights(family, trained):
    import numpy as np
    from PIL import Image

    from palpcompose.project import load_project
    from palpcompose.render import render

    root = trained[family]
    assert list((root / "out" / "previews").glob("step-000002*.png"))  # the flow preview grid was drawn
    project = load_project(root)
    result = render(project, sweep=True, compare=True, seeds="0", steps=2)
    labels = [i.model for i in result.images]
    assert labels == ["base", "step-000001", "final"]  # the snapshot of the last step is the final weights
    pixels = {i.model: np.asarray(Image.open(i.path), dtype=np.float32) for i in result.images}
    assert np.abs(pixels["final"] - pixels["base"]).max() > 0  # trained tokens and LoRA change the image
    assert np.abs(pixels["final"] - pixels["step-000001"]).max() > 0
    parameters = Image.open(result.images[0].path).text["parameters"]
    assert "Sampler: Euler," in parameters and "DPM++" not in parameters  # the flow sampler the family renders with
    assert "Size: 32x32," in parameters  # the image's own size
    index = json.loads((result.run_dir / "render.json").read_text())
    assert index["settings"]["scheduler"] == "euler"
    console = quiet()
    from palpcompose.render import summary_table

    console.print(summary_table(result))
    assert "Euler, 2 steps" in console.file.getvalue()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_export_loads_into_the_family_pipeline_and_changes_its_output(family, trained, flux_dir, sd3_dir,
                                                                                tmp_path):
    import numpy as np
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from palpcompose.export import export
    from palpcompose.project import load_project

    cls, folder = (FluxPipeline, flux_dir) if family == "flux" else (StableDiffusion3Pipeline, sd3_dir)
    project = load_project(trained[family])
    result = export(project, "diffusers", tmp_path / "out")
    lora = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    embedding = load_file(tmp_path / "out" / "fx-v1.safetensors")
    keys = ["clip_l", "t5"] if family == "flux" else ["clip_l", "clip_g", "t5"]
    assert sorted(embedding) == sorted(keys) and all(v.shape[0] == 1 for v in embedding.values())
    assert {f.kind for f in result.files} == {"lora", "embedding"}

    def run(pipe, prompt):
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 5.0}
        return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    base = run(cls.from_pretrained(folder, local_files_only=True), "A photo of a cat")
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "out")
    encoders = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                "t5": ("text_encoder_2", "tokenizer_2") if family == "flux" else ("text_encoder_3", "tokenizer_3")}
    for key in embedding:
        encoder, tokenizer = (getattr(pipe, name) for name in encoders[key])
        if family == "flux":  # FluxPipeline has diffusers' textual-inversion loader
            pipe.load_textual_inversion(embedding[key], token="<fx-v1>", text_encoder=encoder, tokenizer=tokenizer)
        else:  # StableDiffusion3Pipeline has none: what users do by hand (add the token, set its row)
            tokenizer.add_tokens(["<fx-v1>"])
            encoder.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                encoder.get_input_embeddings().weight[-1] = embedding[key][0]
    loaded = run(pipe, "A photo of <fx-v1>")
    assert np.abs(loaded - base).max() > 1e-4

    # the same as palpcompose's own attach (the trained weights into a pipeline), LoRA unmerged
    from palpcompose.attach import attach_trained_weights
    from palpcompose.weights import load_trained_weights

    ours = cls.from_pretrained(folder, local_files_only=True)
    attach_trained_weights(ours, load_trained_weights(trained[family] / "out" / "weights" / "final"))
    assert np.allclose(run(ours, "A photo of <fx-v1>"), loaded, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_webui_export_is_one_file_with_alphas_and_the_pivotal_embeddings(family, trained, tmp_path):
    from safetensors.torch import load_file

    from palpcompose.export import export
    from palpcompose.project import load_project

    result = export(load_project(trained[family]), "webui", tmp_path / "out")
    # the hint fits the family: ComfyUI's LoRA node, not AUTOMATIC1111's <lora:fx:1> (A1111 runs neither model)
    console = quiet()
    from palpcompose.export import summary_table

    console.print(summary_table(result))
    shown = " ".join(console.file.getvalue().replace("│", " ").split())
    assert "<lora:" not in shown and "LoraLoader" in shown and "AUTOMATIC1111 cannot run these models" in shown
    lora = load_file(tmp_path / "out" / "fx.safetensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    assert modules and all(m.startswith("transformer.") for m in modules)
    assert all(float(lora[f"{m}.alpha"]) == 4.0 for m in modules)  # lora_alpha = rank 4: scale 1
    assert all(f"{m}.lora_A.weight" in lora and f"{m}.lora_B.weight" in lora for m in modules)
    assert "t5" in load_file(tmp_path / "out" / "fx-v1.safetensors")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_init_template_on_the_tiny_model_checks_with_the_model_defaults(family, flux_dir, sd3_dir, tmp_path, run_cli):
    root = tmp_path / family
    assert run_cli("init", root, "--template", f"{family}-art-inspired").code == 0
    text = (root / "palp.toml").read_text()
    base = flux_dir if family == "flux" else sd3_dir
    hub = "black-forest-labs/FLUX.1-dev" if family == "flux" else "stabilityai/stable-diffusion-3.5-medium"
    assert f'base_model = "{hub}"' in text
    (root / "palp.toml").write_text(text.replace(hub, str(base)).replace("[train]", "[train]\nresolution = 32"))
    for seed, folder in enumerate(("subject", "artwork")):
        write_test_image(root / "refs" / folder / "0.png", seed=seed, size=32)
    result = run_cli("check", root)
    assert result.code == 0, result.err
    text = "".join((result.out + result.err).replace("│", "").split())
    lr = "0.0001" if family == "flux" else "0.0004"
    assert f"train.learning_rate={lr}" in text and "palp.alpha=" in text  # left out: the model decides


def test_a_flux_dora_diffusers_export_loads_its_magnitudes_into_flux_pipeline(flux_dir, tmp_path):
    """A DoRA's `lora_magnitude_vector` keys reach FluxPipeline.load_lora_weights only when the header's
    lora_adapter_metadata says `use_dora`: the loaded adapter then equals the trained one, magnitudes included."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from palpcompose.export import export
    from palpcompose.project import load_project
    from palpcompose.train import train
    from palpcompose.weights import load_trained_weights

    root = flow_project(tmp_path / "dora", flux_dir, steps=1, save_every=0, adapter="dora")
    train(root, console=quiet())
    export(load_project(root), "diffusers", tmp_path / "out")
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "out", adapter_name="fx")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="fx")
    trained = load_trained_weights(root / "out" / "weights" / "final").lora
    magnitudes = [k for k in trained if k.endswith("lora_magnitude_vector")]
    assert magnitudes and set(loaded) == set(trained)
    for key, value in trained.items():
        assert (loaded[key].float() - value.float()).abs().max() < 1e-6, key
