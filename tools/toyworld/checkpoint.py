"""Checkpoints of the base-model training: a flat folder of safetensors shards (<= 12 MB each, so it travels
through narrow file transfers), AdamW's moments as tensors, and the git commit of the code that wrote them."""

from __future__ import annotations

from pathlib import Path

import torch

from palpcompose.fsutil import atomic_save_safetensors

SHARD_BYTES = 12 * 1024 * 1024


def save_sharded(folder: Path, name: str, tensors: dict[str, torch.Tensor], dtype=None) -> None:
    shard, size, index = {}, 0, 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu()
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if shard and size + t.numel() * t.element_size() > SHARD_BYTES:
            atomic_save_safetensors(folder / f"{name}-{index:02d}.safetensors", shard)
            shard, size, index = {}, 0, index + 1
        shard[key] = t
        size += t.numel() * t.element_size()
    atomic_save_safetensors(folder / f"{name}-{index:02d}.safetensors", shard)
    for stale in folder.glob(f"{name}-*.safetensors"):
        if int(stale.stem.rsplit("-", 1)[1]) > index:
            stale.unlink()


def load_sharded(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{name}-*.safetensors"))
    if not files:
        return None
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def git_commit() -> str | None:
    """The commit of the code running (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(Path(__file__).parent), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].float().numpy().tobytes())
    return h.hexdigest()[:16]


def flat_optim(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return flat


def restore_optim(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    sd["state"] = state
    opt.load_state_dict(sd)
