"""A trained-looking project for the render and export tests, built without the training engine.

A tiny SD-1-like pipeline (conftest's `tiny_pipeline_dir`) gets a peft LoRA with random non-zero weights
(lora_alpha != rank, so a lost alpha shows) and two random token embeddings; they are written with
palpcompose/weights.py into out/weights/final/ and out/snapshots/step-000002/, with out/manifest.json as the engine
writes it. No tests here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from palpcompose.project import load_project
from palpcompose.weights import TrainedWeights, save_trained_weights

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

PALP_TOML = """\
[project]
name = "duo"
base_model = "{base}"

[subjects.V1]
class_name = "cat"
images = ["refs/cat.png"]
prompt = "a photo of [V1]"

[subjects.V2]
class_name = "painting"
images = ["refs/art.png"]
prompt = "an oil painting of [V2]"

[palp]
target_prompt = "an oil painting of [V1] inspired by [V2] painting"
clean_prompt = "an oil painting of a cat sitting on a rock"

[train]
steps = 4
resolution = 16
save_every = 2
lora_rank = {rank}
lora_alpha = {alpha}

[render]
seeds = [0, 1]
steps = 2
"""


def random_weights(base_dir: Path, tokens: dict[str, str], seed: int, step: int) -> TrainedWeights:
    """A LoRA with random A and B (B is zero at peft's init, which would make the LoRA a no-op) and embeddings
    with the scale of the tiny text encoder's own rows."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    lora = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in get_peft_model_state_dict(unet).items()}
    embeddings = {token: torch.randn(16, generator=g) for token in tokens.values()}
    return TrainedWeights(lora, embeddings, dict(tokens), RANK, ALPHA, list(TARGETS), str(base_dir), step)


def make_project(root: Path, base_dir: Path, *, trained: bool = True) -> Path:
    """A project folder using the tiny pipeline at `base_dir`; with `trained`, final weights, one snapshot (step 2)
    and a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "palp.toml").write_text(PALP_TOML.format(base=base_dir, rank=RANK, alpha=ALPHA))
    from PIL import Image

    (root / "refs").mkdir(exist_ok=True)
    for name, colour in (("cat.png", "red"), ("art.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(root / "refs" / name)
    if trained:
        project = load_project(root, check_images=False)
        tokens = {"V1": "<duo-v1>", "V2": "<duo-v2>"}
        save_trained_weights(
            root / "out/snapshots/step-000002", random_weights(base_dir, tokens, seed=1, step=2)
        )
        save_trained_weights(root / "out/weights/final", random_weights(base_dir, tokens, seed=2, step=4))
        write_manifest(root, project)
    return root


def write_manifest(root: Path, project, **changes) -> None:
    cfg = project.config
    manifest = {
        "palpcompose_version": "0.1.0",
        "status": "completed",
        "base_model": {"spec": cfg.project.base_model, "kind": "folder", "identity": "tiny"},
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "training_hash": cfg.training_hash(),
        "images": {},
        "tokens": {"V1": "<duo-v1>", "V2": "<duo-v2>"},
        "git": None,
        "steps_done": 4,
        "steps_target": 4,
        "guidance": "palp",
        "wall_time_s": 1.0,
        "device": "cpu",
        "started_at": "2025-01-01T00:00:00",
        "finished_at": "2025-01-01T00:00:01",
        **changes,
    }
    (root / "out" / "manifest.json").write_text(json.dumps(manifest))
