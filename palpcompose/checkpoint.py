"""The full training state for `train --resume`, in `out/checkpoint/`, without pickles.

    lora.safetensors, embeddings.safetensors   the trained weights (palpcompose/weights.py format)
    optimizer.safetensors                      AdamW moments, keyed "<param index>.<name>"
    rng.safetensors                            every process's torch CPU / CUDA RNG states and data generator's
                                               state, keyed "<rank>.torch", "<rank>.data", "<rank>.cuda.<device>"
    state.json                                 step, num_processes, optimizer param groups, LR scheduler state,
                                               python RNG of every process, and the settings the run was started
                                               with (a resume must match them)

The optimizer state and the weights are the same on every process (data parallel: one averaged gradient, one
update), so they are stored once; the RNG states differ per process and are all kept, so a resume under the same
number of processes continues exactly. A checkpoint from before several processes existed (no "num_processes",
keys "torch", "data", "cuda.<device>") reads as one process's.

Only the placeholder tokens' rows train (tokens.py's PlaceholderEmbedding), so the optimizer state is the LoRA's and
those rows' moments: a 49408 x 768 table never bloats a checkpoint. The folder is written next to the old one and
swapped in with renames, so a crash or an interrupt leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from palpcompose.errors import DamagedFile
from palpcompose.fsutil import atomic_save_safetensors, atomic_write_json
from palpcompose.weights import TrainedWeights, load_trained_weights, read_safetensors, save_trained_weights

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


@dataclass
class Checkpoint:
    step: int
    weights: TrainedWeights
    optimizer: dict  # torch optimizer state_dict (LoRA weights, then the placeholder rows)
    lr_scheduler: dict
    # per process, in rank order: {"torch": ByteTensor, "cuda": [ByteTensor...], "data": ..., "python": ...}
    rng: list[dict]
    settings: dict  # what the run was started with; train.py compares it on resume

    @property
    def num_processes(self) -> int:
        return len(self.rng)


def rng_state(data_generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(rng: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    data_generator.set_state(rng["data"])
    random.setstate(rng["python"])


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> None:
    """Write the checkpoint into a temporary sibling folder, then swap it in with renames."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-new-", dir=folder.parent))
    try:
        save_trained_weights(tmp, ckpt.weights)
        tensors = {
            f"{index}.{name}": value.reshape(1) if value.dim() == 0 else value
            for index, entry in ckpt.optimizer["state"].items()
            for name, value in entry.items()
        }
        scalar_keys = [f"{index}.{name}" for index, entry in ckpt.optimizer["state"].items()
                       for name, value in entry.items() if value.dim() == 0]
        atomic_save_safetensors(tmp / OPTIMIZER_FILE, tensors)
        rng = {}
        for rank, state in enumerate(ckpt.rng):
            rng.update({f"{rank}.torch": state["torch"], f"{rank}.data": state["data"]})
            rng.update({f"{rank}.cuda.{i}": s for i, s in enumerate(state["cuda"])})
        atomic_save_safetensors(tmp / RNG_FILE, rng)
        atomic_write_json(tmp / STATE_FILE, {
            "step": ckpt.step,
            "optimizer_param_groups": ckpt.optimizer["param_groups"],
            "optimizer_scalar_keys": scalar_keys,
            "lr_scheduler": ckpt.lr_scheduler,
            "num_processes": ckpt.num_processes,
            "python_rng": [state["python"] for state in ckpt.rng],
            "cuda_rng_devices": [len(state["cuda"]) for state in ckpt.rng],
            "settings": ckpt.settings,
        })
        old = folder.parent / f".{folder.name}-old"
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_folder(folder: str | Path) -> Path | None:
    """The checkpoint to resume from: `folder`, or its previous version if a swap was cut short."""
    folder = Path(folder)
    for candidate in (folder, folder.parent / f".{folder.name}-old"):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def read_settings(folder: str | Path) -> dict:
    """The checkpoint's state.json; DamagedFile when it is not the JSON object a checkpoint writes."""
    path = Path(folder) / STATE_FILE
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "settings" not in meta:
            raise ValueError("no step or settings in it")
    except (OSError, ValueError) as exc:
        raise DamagedFile(path, str(exc)) from None
    return meta


def checkpoint_processes(meta: dict) -> int:
    """How many processes wrote the checkpoint whose state.json is `meta` (1 for one older than the key)."""
    return int(meta.get("num_processes", 1))


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """The whole checkpoint; DamagedFile names the first damaged file (truncated, bad header, bad JSON), never a
    KeyError. A checkpoint without "num_processes" (before several processes) reads as one process's."""
    folder = Path(folder)
    meta = read_settings(folder)
    flat, _ = read_safetensors(folder / OPTIMIZER_FILE)
    rng_t, _ = read_safetensors(folder / RNG_FILE)
    try:
        scalar_keys = set(meta["optimizer_scalar_keys"])
        state: dict[int, dict] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value.reshape(()) if key in scalar_keys else value
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["optimizer_param_groups"]]
        if "num_processes" in meta:
            rng = [{"torch": rng_t[f"{rank}.torch"], "data": rng_t[f"{rank}.data"],
                    "cuda": [rng_t[f"{rank}.cuda.{i}"] for i in range(devices)], "python": _python_state(python)}
                   for rank, (python, devices) in enumerate(zip(meta["python_rng"], meta["cuda_rng_devices"],
                                                                strict=True))]
            if len(rng) != meta["num_processes"]:
                raise ValueError(f"{len(rng)} RNG states for num_processes {meta['num_processes']}")
        else:  # one process, before per-process states
            rng = [{"torch": rng_t["torch"], "data": rng_t["data"],
                    "cuda": [rng_t[f"cuda.{i}"] for i in range(meta["cuda_rng_devices"])],
                    "python": _python_state(meta["python_rng"])}]
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise DamagedFile(folder / STATE_FILE, f"incomplete: {type(exc).__name__}: {exc}") from None
    return Checkpoint(
        step=int(meta["step"]), weights=load_trained_weights(folder),
        optimizer={"state": state, "param_groups": groups},
        lr_scheduler=meta["lr_scheduler"], rng=rng, settings=meta["settings"],
    )


def _python_state(saved: list):
    """random.getstate() back from its JSON form (lists for tuples)."""
    return (saved[0], tuple(saved[1]), saved[2])
