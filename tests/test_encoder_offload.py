"""Flux.1 and SD 3 with `train.t5_tokens = false` (issue 21 item 3): T5 has nothing to train, so it encodes the run's
prompts once at setup and leaves the device (palpcompose.encoder_offload, models.flow.CachedEncoder); the VAE
leaves once the latents are cached. The trained weights are those of a run that keeps both on the device, bit for
bit, and so are previews and a resumed run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import to_toml, write_test_image
from PIL import Image
from rich.console import Console
from tiny_flow_pipeline import make_tiny_flux_pipeline, make_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"flux": make_tiny_flux_pipeline(root / "flux", guidance_embeds=True),
            "sd3": make_tiny_sd3_pipeline(root / "sd3")}


def project(root, base, **train):
    """Two subjects (so the preview grid has a "together" row), one image with its own caption."""
    root.mkdir(parents=True)
    for key in ("V1", "V2"):
        for i in range(2):
            write_test_image(root / "refs" / key / f"{i}.png", seed=i + (key == "V2") * 10, size=32)
    (root / "refs" / "V1" / "1.txt").write_text("A photo of [V1] on a beach")
    config = {
        "project": {"name": "fx", "base_model": str(base)},
        "subjects": {"V1": {"class_name": "cat", "images": ["refs/V1/*.png"]},
                     "V2": {"class_name": "dog", "images": ["refs/V2/*.png"]}},
        "palp": {"target_prompt": "An oil painting of [V1] and [V2]", "clean_prompt": "An oil painting"},
        "train": {"resolution": 32, "steps": 3, "save_every": 0, "preview_every": 3, "lora_rank": 4,
                  "learning_rate": 1e-2, "embedding_learning_rate": 1e-2, "t5_tokens": False, **train},
        "render": {"seeds": [0], "steps": 2},
    }
    (root / "palp.toml").write_text(to_toml(config))
    return root


def run(root, **kwargs):
    from palpcompose.train import train

    return train(root, console=Console(file=io.StringIO(), width=120), **kwargs)


def outputs(root) -> dict:
    """The final LoRA and token rows, and the pixels of the last preview grid."""
    from safetensors.torch import load_file

    final = root / "out" / "weights" / "final"
    found = {f"lora/{k}": v for k, v in load_file(str(final / "lora.safetensors")).items()}
    found.update({f"tokens/{k}": v for k, v in load_file(str(final / "embeddings.safetensors")).items()})
    grids = sorted((root / "out" / "previews").glob("*.png"))
    if grids:
        found["preview"] = torch.from_numpy(np.asarray(Image.open(grids[-1])).copy())
    return found


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_t5_off_the_device_trains_the_same_weights_bit_for_bit(family, bases, tmp_path, monkeypatch):
    """With the offload, without it (the private switch), and offloaded with a resume in the middle: the same LoRA,
    token rows and preview grid. Batch 2: a step's T5 encodings are served row by row from the cache."""
    from palpcompose import encoder_offload

    kept = project(tmp_path / "kept", bases[family], batch_size=2)
    monkeypatch.setattr(encoder_offload, "OFFLOAD_IDLE_ENCODERS", False)
    run(kept)
    monkeypatch.setattr(encoder_offload, "OFFLOAD_IDLE_ENCODERS", True)
    offloaded = project(tmp_path / "offloaded", bases[family], batch_size=2)
    run(offloaded)
    resumed = project(tmp_path / "resumed", bases[family], batch_size=2, save_every=1)
    run(resumed, steps=2)
    assert run(resumed, steps=3, resume=True).steps_done == 3

    reference = outputs(kept)
    assert "preview" in reference and any(k.startswith("lora/") for k in reference)
    assert [k for k in reference if k.startswith("tokens/")]  # the CLIP rows (no T5 row: t5_tokens = false)
    assert_bit_identical(outputs(offloaded), reference)
    assert_bit_identical({k: v for k, v in outputs(resumed).items() if k != "preview"},
                         {k: v for k, v in reference.items() if k != "preview"})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_after_setup_t5_never_runs_and_waits_on_the_cpu_with_the_vae(family, bases, tmp_path, monkeypatch):
    """The setup encodes the run's prompts with T5, then asks T5 and the VAE to go to the CPU; the steps and the
    preview grid never call T5's forward. With the switch off, T5 runs in every step (the hook does count)."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from palpcompose import encoder_offload
    from palpcompose import train as train_mod

    moves, calls = [], {}
    real_to = torch.nn.Module.to

    def spy_to(self, *args, **kwargs):
        if isinstance(self, (T5EncoderModel, AutoencoderKL)):
            moves.append((type(self).__name__, str(args[0]) if args else str(kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    real_offload = encoder_offload.offload_idle_modules

    def offload_then_count(state, *args):
        moved = real_offload(state, *args)
        encoders = state.accelerator.unwrap_model(state.text_encoder)
        t5 = encoders.encoders[-1]
        calls["t5"] = []
        t5.register_forward_hook(lambda module, inputs, output: calls["t5"].append(inputs[0].shape[0]))
        calls["t5_device"] = next(t5.parameters()).device
        calls["moved"] = moved
        return moved

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    monkeypatch.setattr(train_mod, "offload_idle_modules", offload_then_count)
    run(project(tmp_path / "on", bases[family], steps=2, preview_every=2))
    assert calls["moved"] == ["t5"] and calls["t5_device"] == torch.device("cpu")
    assert ("T5EncoderModel", "cpu") in moves and ("AutoencoderKL", "cpu") in moves
    assert calls["t5"] == [], "T5 ran after setup"
    assert (tmp_path / "on" / "out" / "previews").is_dir()  # the preview drew through the cache

    monkeypatch.setattr(encoder_offload, "OFFLOAD_IDLE_ENCODERS", False)
    moves.clear()
    run(project(tmp_path / "off", bases[family], steps=2, preview_every=0))
    assert calls["moved"] == [] and ("T5EncoderModel", "cpu") not in moves
    assert len(calls["t5"]) == 2  # one batch per step


def test_cached_encoder_serves_what_the_encoder_returns_and_encodes_unseen_prompts(bases):
    """models.flow.CachedEncoder: recorded prompts come back as the encoder's own output (one prompt or a batch, in
    any order) without running it; an unseen prompt is encoded by the encoder where it is, with the same result."""
    from transformers import T5EncoderModel

    from palpcompose import models

    c = models.load_components(models.resolve_base_model(str(bases["flux"])))
    encoders = c.text_encoder
    t5 = encoders.encoders[1]
    encoders.with_tokens = [True, False]
    ids = encoders.tokenize(["a photo of a cat", "a dog", "a photo of a cat"])
    assert encoders.cache_idle(ids, torch.autocast("cpu", enabled=False)) == ["t5"]
    assert encoders.in_use[1] is encoders.caches[1] and encoders.in_use[0] is encoders.encoders[0]
    runs = []
    t5.register_forward_hook(lambda module, inputs, output: runs.append(inputs[0].shape[0]))
    parts = ids.split(encoders.lengths, dim=-1)[1]
    with torch.no_grad():
        own = torch.cat([t5(row[None], output_hidden_states=False)[0] for row in parts[[1, 0]]])
        runs.clear()
        served = encoders.caches[1](parts[[1, 0]], output_hidden_states=False)
        assert runs == [] and torch.equal(served[0], own) and served[0].device == torch.device("cpu")
        assert torch.equal(encoders(ids[[1]]).embeds, c.text_encoder.encode(
            [encoders.encoders[0], t5], list(ids[[1]].split(encoders.lengths, dim=-1))).embeds)
        runs.clear()
        unseen = encoders.tokenize(["a photo of a dog"]).split(encoders.lengths, dim=-1)[1]
        assert torch.equal(encoders.caches[1](unseen)[0], t5(unseen)[0]) and len(runs) == 2
    assert isinstance(t5, T5EncoderModel) and not list(encoders.caches[1].parameters())


def test_two_processes_train_with_t5_off_the_device(bases, tmp_path):
    """torchrun, 2 CPU processes (gloo): the text encoders are one DDP module whose T5 leaves the device after the
    module is wrapped; each process makes the same cache, the run completes, with its preview."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = project(tmp_path / "two", bases["flux"], steps=2, preview_every=2)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "palpcompose.cli", "train", str(root)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "t5: holds no learned token" in done.stdout
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["num_processes"] == 2
    assert list((root / "out" / "previews").glob("*.png"))


@pytest.mark.parametrize("t5_tokens", [False, True])
def test_under_mixed_precision_an_idle_t5_is_cast_like_the_transformer_and_a_training_one_stays_fp32(
        bases, tmp_path, t5_tokens):
    """What a bf16 GPU run does, on the CPU (tiny Flux): T5 without a learned token joins the transformer in bf16
    (cast in host memory before it moves, so the device never holds its fp32 copy: 17.7 GiB for T5-XXL); with
    t5_tokens it trains a row and stays fp32, as the CLIP encoder does."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from palpcompose import models
    from palpcompose.flow_step import prepare_flow_state
    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project

    config = load_project(project(tmp_path / "p", bases["flux"], t5_tokens=t5_tokens)).config
    c = models.load_components(models.resolve_base_model(config.project.base_model))
    tokens = models.placeholder_tokens(config.project.name, config.subjects)
    AcceleratorState._reset_state()
    try:
        state = prepare_flow_state(config, c, Accelerator(mixed_precision="bf16", cpu=True), guidance_config(config),
                                   tokens)
        kinds = {slot.kind: encoder for slot, encoder in zip(c.text_encoder.slots, c.text_encoder.encoders)}
        frozen_dtypes = {kind: {p.dtype for p in e.parameters() if not p.requires_grad} for kind, e in kinds.items()}
        assert frozen_dtypes["t5"] == ({torch.float32} if t5_tokens else {torch.bfloat16})
        assert frozen_dtypes["clip"] == {torch.float32}
        assert state.token_embedding.rows.dtype == torch.float32
        assert {p.dtype for p in c.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    finally:
        AcceleratorState._reset_state()
