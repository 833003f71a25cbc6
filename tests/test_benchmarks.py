"""The benchmark harness (benchmarks/): its JSON report, its variants, the peer reference step, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import archs, train_step
from benchmarks.reference import ReferenceStep
from palpcompose import accel
from palpcompose.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one intra-op thread


def test_train_step_json_report(capsys):
    code = train_step.main(["--arch", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--resolution", "16",
                            "--variants", "reference,none,palp+fused+lowmem", "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["device"].startswith("cpu") and report["arch"] == "tiny" and report["resolution"] == 16
    assert set(report["variants"]) == {"reference", "none", "palp+fused+lowmem"}
    assert report["reference_ms"] == report["variants"]["reference"]["median_ms"] > 0
    assert report["none_ms"] == report["variants"]["none"]["median_ms"] > 0
    assert "palp_ms" not in report  # only plain `palp` fills the headline key
    assert report["peak_mem_gib"] > 0
    for name, v in report["variants"].items():
        assert len(v["warmup_ms"]) == 1 and v["steps_timed"] == 2
        assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"]
        # 500-step total = setup + warm-up + 499 steps at the median, extrapolated
        expected = v["setup_s"] + v["warmup_ms"][0] / 1000 + 499 * v["median_ms"] / 1000
        assert v["total_500_steps_s_extrapolated"] == pytest.approx(expected, abs=0.02)
        assert report["ratios_vs_reference"][name] == pytest.approx(v["median_ms"] / report["reference_ms"], abs=1e-3)
    assert any(line.startswith("palp+fused+lowmem") for line in lines[:-1])  # the human-readable table came first


@pytest.mark.parametrize("name, mode, flags, label, low_memory", [
    ("palp", "palp", {}, "eager", False),
    ("palp+graphs+fused", "palp", {"cuda_graphs": True, "fused_adamw": True}, "graphs+fused", False),
    ("none+channels_last+sdpa=flash", "none", {"channels_last": True, "sdpa_backend": "flash"},
     "channels_last+sdpa=flash", False),
    ("sds+compile+lowmem", "sds", {"compile_blocks": True}, "compile", True),
])
def test_variant_names(name, mode, flags, label, low_memory):
    variant = train_step.parse_variant(name)
    assert variant.mode == mode and variant.low_memory == low_memory
    assert variant.opts == accel.AccelOptions(**flags)
    assert variant.opts.label() == label


@pytest.mark.parametrize("name, message", [
    ("palp+turbo", "unknown lever 'turbo'"),
    ("fast", "must start with reference"),
    ("reference+fused", "takes no levers"),
    ("palp+sdpa=magic", "sdpa_backend must be one of"),
])
def test_bad_variants_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        train_step.parse_variant(name)


def test_sdxl_thin_runs_the_reference_and_the_engine_step(capsys):
    """SDXL's module structure end to end: both text encoders, pooled and size conditioning, both steps."""
    code = train_step.main(["--arch", "sdxl-thin", "--steps", "1", "--warmup", "1", "--variants", "reference,palp",
                            "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["arch"] == "sdxl-thin" and report["palp_ms"] > 0 and report["reference_ms"] > 0


def test_sdxl_shapes_match_the_real_model():
    """The sdxl configs against SDXL base 1.0's published parameter counts, on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = archs.arch_spec("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=128, **spec.unet)
        te1 = CLIPTextModel(CLIPTextConfig(**spec.text))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_2))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in te1.parameters()) == 123_060_480
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840


def test_bad_resolution_exits_2(capsys):
    assert train_step.main(["--arch", "tiny", "--resolution", "20"]) == 2
    assert "--resolution 20" in capsys.readouterr().err


def test_sd15_shapes_match_the_real_model():
    """Spot-check the sd15 configs against SD-1.5's published shapes without building 1.1 B parameters."""
    from diffusers import UNet2DConditionModel

    spec = archs.arch_spec("sd15")
    assert spec.unet["block_out_channels"] == (320, 640, 1280, 1280) and spec.unet["cross_attention_dim"] == 768
    assert spec.vae["block_out_channels"] == (128, 256, 512, 512)
    assert (spec.text["hidden_size"], spec.text["num_hidden_layers"], spec.text["vocab_size"]) == (768, 12, 49408)
    with torch.device("meta"):  # shapes only, no memory: the UNet has SD-1.5's 859.5 M parameters
        unet = UNet2DConditionModel(sample_size=64, **spec.unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_engine_step_with_several_subjects_trains_each_subjects_row(tmp_path):
    """--subjects N: N placeholder rows; the balanced sampling reaches every subject, and each trains its own row."""
    from benchmarks.ours import make_engine_step

    spec = archs.arch_spec("tiny")
    m = archs.build(spec, torch.device("cpu"))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    state, step = make_engine_step(m, archs.make_tokenizer(spec, tmp_path), "palp", accel.AccelOptions(), pixels,
                                   num_subjects=3)
    rows = state.token_embedding.rows
    assert rows.shape[0] == 3 and sorted(state.token_ids) == ["V1", "V2", "V3"]
    before = rows.detach().clone()
    for _ in range(6):  # 12 samples drawn from 3 subjects
        step()
    moved = (rows.detach() - before).abs().amax(dim=1)
    assert bool((moved > 0).all()), moved


def test_reference_step_trains_only_the_lora():
    m = archs.build(archs.TINY, "cpu")
    step = ReferenceStep(m, torch.float32)
    frozen = {k: v.clone() for k, v in m.unet.state_dict().items() if "lora" not in k}
    lora_before = [p.detach().clone() for p in step.params]
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    ids = archs.random_prompt_ids(archs.TINY, 1, seed=0, device="cpu")
    with torch.no_grad():
        for p in step.params:  # non-zero B so every LoRA matrix gets a gradient
            p.add_(0.05)
    losses = [float(step(pixels, ids)["loss"]) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in step.params) and len(step.params) > 0
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, step.params))
    for k, v in m.unet.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, frozen[k]), k


def test_render_json_report(capsys):
    from benchmarks import render

    code = render.main(["--arch", "tiny", "--batches", "1", "--steps", "2", "--resolution", "16", "--batch", "2",
                        "--variants", "diffusers,ours,ours+fuse", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["scheduler"] == "dpm++" and report["batch"] == 2 and report["steps"] == 2
    for name in ("diffusers", "ours", "ours+fuse"):
        v = report["variants"][name]
        assert v["images_per_s"] == pytest.approx(2 / v["median_batch_s"], rel=1e-2)
    assert report["ours_images_per_s"] == report["variants"]["ours"]["images_per_s"]
    assert report["speedup_vs_diffusers"]["diffusers"] == 1.0


def render_images(pipe, levers, steps=2):
    import numpy as np

    from benchmarks.render import levers_applied
    from palpcompose.render import RenderSettings, generate

    settings = RenderSettings(steps=steps, guidance_scale=7.5, width=16, height=16, negative_prompt="",
                              scheduler="dpm++", batch_size=1)
    with levers_applied(pipe, levers):
        return np.stack([np.asarray(im, dtype=np.int16) for im in generate(pipe, ["a cat"], [0], settings)])


def test_render_levers_keep_the_images(tmp_path):
    """Fusing the LoRA and channels-last give the same pixels (within rounding), and are undone afterwards."""
    from benchmarks.render import build_pipeline

    pipe = build_pipeline(archs.TINY, "cpu", torch.float32, tmp_path / "tok")
    eager = render_images(pipe, set())
    fast = render_images(pipe, {"fuse", "channels_last"})
    assert abs(fast - eager).max() <= 1
    pipe.unet.disable_adapters()
    base = render_images(pipe, set())
    pipe.unet.enable_adapters()
    assert abs(base - eager).max() > 1  # the LoRA changes the images, so the comparison above is sharp
    assert abs(render_images(pipe, set()) - eager).max() == 0  # levers undone: weights unmerged, formats restored


@pytest.mark.gpu
def test_graphed_render_matches_eager_on_gpu(tmp_path):
    from benchmarks.render import build_pipeline

    pipe = build_pipeline(archs.TINY, "cuda", torch.float32, tmp_path / "tok")
    eager = render_images(pipe, set(), steps=4)
    graphed = render_images(pipe, {"graphs"}, steps=4)
    assert abs(graphed - eager).max() <= 1


def test_toy_arch_has_the_builtin_toy_shapes():
    """`--arch toy` must time the model `builtin:toy` really is (tools/toyworld/train_base.py)."""
    from palpcompose.toyworld.tokenizer import build_vocab
    from tools.toyworld.train_base import build_models

    class VocabOnly:  # build_models reads only the size and the special ids
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

        def __len__(self):
            return len(build_vocab()[0])

    with torch.device("meta"):
        vae, text_encoder, unet = build_models(VocabOnly())
        ours = archs.build(archs.TOY, "meta")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(ours.unet), count(ours.vae), count(ours.text_encoder)) == (count(unet), count(vae), count(text_encoder))
    assert ours.unet.config.sample_size * archs.TOY.vae_scale_factor == archs.TOY.default_resolution
