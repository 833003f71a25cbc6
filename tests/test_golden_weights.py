"""Trained weights stay bit-identical across refactors: short runs hashed against tests/golden/weights.json.

Each case trains a short run through the CLI (two subjects, PALP guidance) and hashes every tensor of the final
LoRA and embeddings (names, dtypes, shapes and bytes). The golden hashes were first recorded by this same test on
commit 98c3332 (before the restructure) with the PyTorch version and CPU capability stored beside them. Floating-point
results legitimately differ with the PyTorch version and with the machine (the same code, torch 2.13.0 and AVX512
gave other bytes on an AMD EPYC than on the machine of the first record; setting peft, diffusers, transformers and
accelerate back one release each did not bring the old bytes back; oneDNN and MKL pick kernels by CPU), so the
file holds one record per environment (PyTorch, CPU capability, CPU model) and the test compares with the record of
its own environment, or skips and says why. A new environment's record is added by running the test there with
PALP_RECORD_GOLDEN=1 on a commit whose weights are known unchanged (the AMD EPYC record: commit 7bcf4b5, whose weights
had matched the first record on its machine).

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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _environment() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": _cpu_model()}


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
    records = json.loads(GOLDEN.read_text())["records"] if GOLDEN.is_file() else []
    here = next((r for r in records if r["environment"] == _environment()), None)
    if os.environ.get("PALP_RECORD_GOLDEN") == "1":
        if here is None:
            here = {"environment": _environment(), "cases": {}}
            records.append(here)
        here["cases"][case] = got
        GOLDEN.write_text(json.dumps({"records": records}, indent=2, sort_keys=True) + "\n")
        return
    if here is None:
        pytest.skip(f"no golden hashes recorded on {_environment()} (recorded on: "
                    f"{[r['environment'] for r in records]}); add them with PALP_RECORD_GOLDEN=1 on a commit whose "
                    "weights are known unchanged")
    assert case in here["cases"], f"no golden hash for {case!r}: record it with PALP_RECORD_GOLDEN=1"
    assert got == here["cases"][case], f"{case}: trained weights changed (hash {got[:16]}...)"


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
