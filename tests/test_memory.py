"""Memory: the estimate printed before training, the out-of-memory message, gradient checkpointing, low_memory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import prepared_state, step_runner

from palpcompose import memory, models
from palpcompose import train as train_mod
from palpcompose.cli import main


def tiny_components(pipeline_dir) -> models.Components:
    """The tiny SD-1-like pipeline (block widths 8, 16), loaded as `train` loads a base model."""
    return models.load_components(models.resolve_base_model(str(pipeline_dir)))


def test_estimate_counts_weights_and_trained_values_and_scales_activations(tiny_pipeline_dir):
    m = tiny_components(tiny_pipeline_dir)
    models.freeze(m.unet, m.vae, m.text_encoder)
    lora = models.add_lora(m.unet, rank=4, lora_alpha=4)
    m.unet.to(torch.bfloat16)

    def estimate(**kw):
        settings = {"resolution": 512, "batch_size": 1, "half_precision": True, "gradient_checkpointing": False, **kw}
        return memory.estimate_training_memory(m.unet, m.vae, m.text_encoder, lora, **settings)

    base = estimate()
    frozen = sum(p.numel() * p.element_size() for mod in (m.unet, m.vae, m.text_encoder)
                 for p in mod.parameters() if not p.requires_grad)
    assert base.weights_gib == pytest.approx(frozen / 2**30, rel=1e-6)
    assert any(p.dtype == torch.bfloat16 for p in m.unet.parameters() if not p.requires_grad)  # dtypes are read
    assert base.trainable_gib == pytest.approx(sum(p.numel() for p in lora) * 16 / 2**30, rel=1e-6)
    assert base.total_gib == pytest.approx(base.weights_gib + base.trainable_gib + base.activations_gib, rel=1e-6)
    # tiny's top-level width is 8 of SD-1.5's 320: the measured 1.5 GiB per sample at 512 px, scaled
    assert base.activations_gib == pytest.approx(1.5 * 8 / 320, rel=1e-6)
    assert estimate(resolution=1024).activations_gib == pytest.approx(4 * base.activations_gib, rel=1e-6)
    assert estimate(batch_size=4).activations_gib == pytest.approx(4 * base.activations_gib, rel=1e-6)
    assert estimate(half_precision=False).activations_gib == pytest.approx(2 * base.activations_gib, rel=1e-6)
    assert estimate(gradient_checkpointing=True).activations_gib < base.activations_gib
    vae_bytes = sum(p.numel() * p.element_size() for p in m.vae.parameters())
    assert base.weights_gib - estimate(vae_on_device=False).weights_gib == pytest.approx(vae_bytes / 2**30, rel=1e-6)
    assert "estimate" in base.describe() and f"{base.total_gib:.1f} GiB" in base.describe()


def test_a_flow_transformer_gets_no_unet_estimate_instead_of_a_crash(tmp_path):
    """train's CUDA setup asks for the estimate before the first step: for a Flux.1 / SD 3 transformer (no UNet
    block widths) it says there is none, where it used to raise AttributeError and stop the run."""
    from tiny_flow_pipeline import make_tiny_flux_pipeline

    c = models.load_components(models.resolve_base_model(str(make_tiny_flux_pipeline(tmp_path / "flux"))))
    assert memory.estimate_training_memory(c.unet, c.vae, c.text_encoder, [], resolution=32, batch_size=1,
                                           half_precision=True, gradient_checkpointing=False) is None


def test_out_of_memory_exits_1_names_the_fixes_and_keeps_the_checkpoint(make_project, monkeypatch, capsys):
    root = make_project({"train": {"steps": 2, "save_every": 1}})
    real_step, calls = train_mod.training_step, []

    def oom_at_step_2(state, batch):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", oom_at_step_2)
    with pytest.raises(SystemExit) as exc:
        main(["train", str(root)])
    assert exc.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "ran out of memory" in err and "at step 2" in err and "Traceback" not in err
    for fix in ("train.resolution (now 16)", "train.batch_size (now 1)", "train.low_memory = true",
                'train.frozen_weights = "int8"', 'train.mixed_precision = "bf16"', "checkpoint of step 1"):
        assert fix in err, fix
    out = root / "out"
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (out / "train.lock").exists()
    # The advice holds: with the low-memory preset switched on, the run resumes from that checkpoint.
    monkeypatch.setattr(train_mod, "training_step", real_step)
    toml = root / "palp.toml"
    text = re.sub(r"^\[train\]\n", "[train]\nlow_memory = true\n", toml.read_text(), flags=re.MULTILINE)
    toml.write_text(text)
    main(["train", str(root), "--resume"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps_done"] == 2
    assert "resuming at step 1" in capsys.readouterr().out


def test_gradient_checkpointing_recomputes_the_lora_pass(make_project, monkeypatch):
    """train.gradient_checkpointing really checkpoints the UNet's blocks in the personalization pass (only there:
    the guidance passes run without gradients)."""
    from torch.utils import checkpoint

    calls = []
    real = checkpoint.checkpoint
    monkeypatch.setattr(checkpoint, "checkpoint", lambda fn, *a, **kw: calls.append(1) or real(fn, *a, **kw))
    state, subjects = prepared_state(make_project({"train": {"low_memory": True}}), "palp")
    step = step_runner(state, subjects, batch_size=1)
    step()
    assert calls  # the engine's gradient checkpointing (train.gradient_checkpointing) is on
    state.components.unet.disable_gradient_checkpointing()
    del calls[:]
    step()
    assert not calls  # and the count above came from it


def test_low_memory_preset_changes_no_result_and_keeps_the_vae_off_the_device(make_project, monkeypatch):
    """train.low_memory: gradient checkpointing on, the VAE offloaded once the latents are cached and brought back
    only for previews; the losses are those of the same run without the preset."""
    logs = {}
    offloads, preview_vae_devices = [], []
    real_offload, real_preview = train_mod.offload_vae, train_mod.render_preview

    def spy_offload(state):
        offloads.append(state.components.unet.is_gradient_checkpointing)
        real_offload(state)

    def spy_preview(state, *a, **kw):
        with train_mod.vae_on_device(state):
            preview_vae_devices.append(next(state.components.vae.parameters()).device)
        return real_preview(state, *a, **kw)

    monkeypatch.setattr(train_mod, "offload_vae", spy_offload)
    monkeypatch.setattr(train_mod, "render_preview", spy_preview)
    for low in (False, True):
        root = make_project({"train": {"steps": 3, "preview_every": 3, "low_memory": low}}, dirname=f"low-{low}")
        main(["train", str(root)])
        logs[low] = [json.loads(line) for line in (root / "out" / "logs" / "train.jsonl").read_text().splitlines()]
    assert offloads == [True]  # only with the preset, and with gradient checkpointing on
    assert len(preview_vae_devices) == 2 and all(d.type == "cpu" for d in preview_vae_devices)
    for a, b in zip(logs[False], logs[True], strict=True):
        for key in ("loss_pers", "loss_align"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vae_on_device_brings_the_offloaded_vae_back_and_returns_it(tiny_pipeline_dir):
    m = tiny_components(tiny_pipeline_dir)
    m.vae.to("cuda")

    class State:
        components = m
        accelerator = type("A", (), {"device": torch.device("cuda")})()

    train_mod.offload_vae(State)
    assert next(m.vae.parameters()).device.type == "cpu"
    with train_mod.vae_on_device(State):
        assert next(m.vae.parameters()).device.type == "cuda"
    assert next(m.vae.parameters()).device.type == "cpu"
