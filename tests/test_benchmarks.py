"""The benchmark harness (benchmarks/): its JSON report, its variants, the peer reference step, bad arguments."""

from __future__ import annotations

import contextlib
import functools
import io
import json

import pytest
import torch

from benchmarks import accel, archs, train_step
from benchmarks.reference import ReferenceStep
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

    assert ((count(ours.unet), count(ours.vae), count(ours.text_encoder))
            == (count(unet), count(vae), count(text_encoder)))
    assert ours.unet.config.sample_size * archs.TOY.vae_scale_factor == archs.TOY.default_resolution


# --- flow-model memory estimate (benchmarks/flow_memory.py, issue 21 item 5) --------------------------------------


def test_saved_activation_count_on_a_known_graph():
    """Saved-tensor counting against hand-counted bytes: parameters excluded, a storage saved twice counted once,
    bytes attributed to the block running, checkpointing keeps the block inputs plus the largest block."""
    from benchmarks.flow_memory import count_saved

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
                                  for _ in range(2)])
    head = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleList([*blocks, head])
    model.requires_grad_(False)
    head.weight.requires_grad_(True)  # a trained weight needs its input saved; a frozen one does not
    x = torch.randn(3, 4, requires_grad=True)  # fp32: 4 bytes a value

    def forward():
        h = x
        for b in blocks:
            h = b(h)
        return head(h) + head(h)  # the same input saved twice: one storage

    saved = count_saved(model, list(blocks), forward, autocast=False)
    # per block only GELU's input (3 x 8) is saved: the frozen Linears need their weights (parameters), not inputs
    assert saved.blocks == [3 * 8 * 4] * 2
    assert saved.block_inputs == 2 * 3 * 4 * 4 and saved.inputs_saved == 0
    assert saved.outside == 3 * 4 * 4  # the head's input, once
    assert saved.full == 3 * 4 * 4 + 2 * 3 * 8 * 4
    assert saved.checkpointed == 3 * 4 * 4 + 2 * 3 * 4 * 4 + 3 * 8 * 4
    # under the emulated bf16 autocast the Linears run in bf16: each block keeps GELU's bf16 input and the bf16
    # casts of its frozen fp32 weights (recast at every call); the head's trained weight is cast once (autocast
    # caches casts of leaves that require grad) although it is used twice, and its input is already bf16
    saved = count_saved(model, list(blocks), forward)
    assert saved.blocks == [3 * 8 * 2 + 2 * 4 * 8 * 2] * 2
    assert saved.outside == 3 * 4 * 2 + 4 * 4 * 2


def test_live_bytes_follow_python_frees():
    from benchmarks.flow_memory import LiveBytes

    live = LiveBytes()
    with torch.no_grad(), live:
        a = torch.ones(1024)  # 4 KiB
        b = a * 2  # 8 KiB live
        del a
        c = b * 2  # 8 KiB live again, not 12
        view = c.view(32, 32)  # a view adds nothing
        del b, c, view
    assert live.peak == 2 * 4096 and live.live == 0


@functools.cache
def _flow_report(name: str) -> dict:
    """`python -m benchmarks.memory_estimate --arch NAME --json` (meta device, ~10-20 s per model), parsed."""
    from benchmarks import memory_estimate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory_estimate.main(["--arch", name, "--json"]) == 0
    lines = out.getvalue().strip().splitlines()
    assert any(line.lstrip().startswith("512") for line in lines[:-1])  # the table came first
    return json.loads(lines[-1])


# transformer, CLIP(s), T5 v1.1 XXL encoder. Counts reported for the released checkpoints by their users (read
# through search): FLUX.1-dev's transformer 11,901,408,320; SD 3.5 Medium's 2,243,171,520 with CLIP-G 694,659,840 and
# T5 4,762,310,656; CLIP-L 123,060,480 (plus its 768 x 768 projection in SD 3). SD 3.5 Large's count is what diffusers
# builds from its published config (the "8 B" of its model card): a regression guard, not an outside fact.
PUBLISHED_PARAMS = {
    "flux1-dev": (11_901_408_320, [123_060_480], 4_762_310_656),
    "sd35-medium": (2_243_171_520, [123_650_304, 694_659_840], 4_762_310_656),
    "sd35-large": (8_056_627_520, [123_650_304, 694_659_840], 4_762_310_656),
}


@pytest.mark.parametrize("name", archs.FLOW_ARCHS)
def test_flow_memory_estimate_levers_move_the_right_way(name):
    report = _flow_report(name)
    p = report["params"]
    assert (p["transformer"], p["clips"], p["t5"]) == PUBLISHED_PARAMS[name]
    assert report["guidance"] == ("embedded" if name == "flux1-dev" else "cfg")
    assert len(report["rows"]) == 2 * 2 * 2 * 2 * 2 * 2  # resolution, rank, weights, checkpointing, tokens, offload
    base = {"resolution": 512, "rank": 32, "weights": "bf16", "checkpointing": False, "tokens": "clip",
            "offload_encoders": True}

    def row(**changes):
        want = {**base, **changes}
        (found,) = [r for r in report["rows"] if all(r[k] == v for k, v in want.items())]
        return found

    for start in (base, {**base, "weights": "8bit", "checkpointing": True}):
        base = start
        assert row(resolution=1024)["personalization_gib"] > 2.5 * row()["personalization_gib"]  # ~4x the tokens
        assert row(resolution=1024)["total_gib"] > row()["total_gib"]
        assert row(tokens="clip+t5")["total_gib"] > row()["total_gib"] + 1  # T5 on the GPU, with grad through it
        assert row(tokens="clip+t5")["text_grad_gib"] > row()["text_grad_gib"]
        assert row(offload_encoders=False)["encoders_vae_gib"] > row()["encoders_vae_gib"] + 1
        assert row(rank=16)["trained_gib"] == pytest.approx(row()["trained_gib"] / 2, rel=0.02)
    base = {**base, "weights": "bf16", "checkpointing": False}
    eight = row(weights="8bit")
    assert 0.45 < eight["transformer_gib"] / row()["transformer_gib"] < 0.55  # ~all values are Linear weights
    assert eight["total_gib"] < row()["total_gib"]
    assert row(checkpointing=True)["personalization_gib"] < row()["personalization_gib"] / 5
    assert row(checkpointing=True)["total_gib"] < row()["total_gib"]
    # the personalization pass grows with the image tokens: between linear and quadratic would be attention
    # probabilities leaking in (flash-like SDPA keeps none)
    ratio = row(resolution=1024)["personalization_gib"] / row()["personalization_gib"]
    assert ratio < 4.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flux1-dev", "sd35-large"])
def test_flow_activation_count_matches_cuda_allocations(name):
    """What CUDA really keeps after a forward with grad (bf16 autocast, fp32 LoRA, flash SDPA) against the meta count,
    on the real widths with 2 + 2 blocks (Flux) or 3 blocks (SD 3.5 Large) at 512 px: the GPU check of
    docs/flow-memory.md, item 1. Without and with gradient checkpointing (then the count minus the recomputed block)."""
    import dataclasses

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig

    from benchmarks import flow_memory

    spec = archs.flow_arch_spec(name)
    depth = {"num_layers": 2, "num_single_layers": 2} if name == "flux1-dev" else {"num_layers": 3}
    spec = dataclasses.replace(spec, transformer={**spec.transformer, **depth})
    meta = flow_memory.measure_transformer(flow_memory.build_meta(spec, 32), 512)[0]

    cls = FluxTransformer2DModel if name == "flux1-dev" else SD3Transformer2DModel
    with torch.device("cuda"):
        model = cls(**spec.transformer).to(torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                 target_modules=flow_memory.FLOW_LORA_TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    inputs = {k: torch.randn(v.shape, dtype=v.dtype, device="cuda")
              for k, v in flow_memory.transformer_inputs(spec, 512, 1).items()}
    if name == "flux1-dev":
        inputs["timestep"] = torch.full_like(inputs["timestep"], 0.5)
        inputs["guidance"] = torch.full_like(inputs["guidance"], 3.5)
    else:
        inputs["timestep"] = torch.full_like(inputs["timestep"], 500.0)

    def kept_by_forward() -> int:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs, return_dict=False)[0]
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        del out
        return kept

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # cuBLAS workspaces: allocated once, here
        model(**inputs, return_dict=False)
    full = kept_by_forward()
    model.enable_gradient_checkpointing()
    checkpointed = kept_by_forward()
    print(f"{name}: forward keeps {full / 2**20:.0f} MiB (meta count {meta.full / 2**20:.0f}); checkpointed "
          f"{checkpointed / 2**20:.0f} MiB (meta {(meta.checkpointed - max(meta.blocks)) / 2**20:.0f})")
    assert full == pytest.approx(meta.full, rel=0.15)
    assert checkpointed == pytest.approx(meta.checkpointed - max(meta.blocks), rel=0.25)


def test_train_step_times_dora_against_lora_in_one_process(capsys):
    code = train_step.main(["--arch", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--resolution", "16",
                            "--variants", "none,none+dora", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ratio = report["dora_vs_lora"]["none+dora"]
    v = report["variants"]
    assert ratio["median"] == pytest.approx(v["none+dora"]["median_ms"] / v["none"]["median_ms"], abs=1e-3)
    assert ratio["cpu_time"] > 0
    assert (train_step.parse_variant("palp+dora").adapter == "dora"
            and train_step.parse_variant("palp").adapter == "lora")
