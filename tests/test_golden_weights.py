"""Trained weights stay bit-identical across refactors: short runs hashed against tests/golden/weights.json.

Each case trains a short run through the CLI (two subjects, PALP guidance) and hashes every tensor of the final
LoRA and embeddings (names, dtypes, shapes and bytes). The golden hashes were recorded by this same test on commit
98c3332 (before the restructure) with the PyTorch version and CPU capability stored beside them; on another PyTorch
or CPU kernel family floating-point results may legitimately differ, so the test skips there and says why.

A change that is meant to change trained weights (a new builtin:toy, a new default) re-records them, in the same
commit, with `PALP_RECORD_GOLDEN=1 scripts/test tests/test_golden_weights.py`, and says so in its message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "golden" / "weights.json"
TWO_SUBJECTS = {
    "subjects": {"V2": {"class_name": "painting", "images": ["refs/V2/*.png"], "prompt": "An oil painting of [V2]"}},
    "palp": {"target_prompt": "An oil painting of [V1] inspired by [V2] painting", "guidance": "palp"},
    "train": {"steps": 3, "save_every": 0},
}


def _environment() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def weights_digest(folder: Path) -> str:
    """One sha256 over every tensor of lora.safetensors and embeddings.safetensors, in name order."""
    digest = hashlib.sha256()
    for name in ("lora.safetensors", "embeddings.safetensors"):
        tensors = load_file(str(folder / name))
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            digest.update(f"{name}:{key}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _check(case: str, folder: Path) -> None:
    got = weights_digest(folder)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"environment": _environment(), "cases": {}}
    if os.environ.get("PALP_RECORD_GOLDEN") == "1":
        golden["environment"] = _environment()
        golden["cases"][case] = got
        GOLDEN.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
        return
    if golden["environment"] != _environment():
        pytest.skip(f"golden hashes were recorded on {golden['environment']}, this is {_environment()}")
    assert case in golden["cases"], f"no golden hash for {case!r}: record it with PALP_RECORD_GOLDEN=1"
    assert got == golden["cases"][case], f"{case}: trained weights changed (hash {got[:16]}...)"


def test_tiny_sd_run_weights_are_unchanged(make_project, run_cli, one_thread):
    root = make_project(TWO_SUBJECTS)
    result = run_cli("train", root)
    assert result.code == 0, result.err
    _check("tiny-sd1-palp-3-steps", root / "out" / "weights" / "final")


def test_tiny_sdxl_run_weights_are_unchanged(tmp_path, tiny_sdxl_pipeline_dir, run_cli, one_thread):
    from conftest import write_project

    overrides = {**TWO_SUBJECTS, "train": {**TWO_SUBJECTS["train"], "resolution": 32}}
    root = write_project(tmp_path / "xl", tiny_sdxl_pipeline_dir, overrides, image_size=32)
    result = run_cli("train", root)
    assert result.code == 0, result.err
    _check("tiny-sdxl-palp-3-steps", root / "out" / "weights" / "final")


def test_builtin_toy_run_weights_are_unchanged(tmp_path, run_cli, one_thread):
    root = tmp_path / "toy"
    assert run_cli("init", root, "--template", "toy-demo").code == 0
    result = run_cli("train", root, "--steps", "2")
    assert result.code == 0, result.err
    _check("builtin-toy-demo-2-steps", root / "out" / "weights" / "final")
