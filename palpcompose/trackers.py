"""Experiment trackers for `train` (`train.log_with`): TensorBoard or Weights & Biases, through accelerate's tracker
classes (accelerate.tracking). out/logs/train.jsonl stays the record of truth; a tracker shows the same values.

    check_installed(log_with, where)   before any work: a missing package is a UserError naming the pip extra
    open_tracker(log_with, logs, ...)  the main process's tracker (None for "none"); its files go under out/logs/

Per logged step: the loss terms, the gradient balance (grad_pers, grad_align) and each parameter group's learning
rate; per preview: the preview grid; `log_table` for a table of results. W&B runs offline (WANDB_MODE=offline unless
the environment sets it), so it needs no network and no account: `wandb sync out/logs/wandb/offline-run-*` uploads a
run later. The tracker never changes what is trained (train.log_with is weight-neutral, project.settings).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from palpcompose.errors import UserError

LOG_WITH = ("none", "tensorboard", "wandb")  # train.log_with's choices
# What each tracker imports, and the pip extra of palpcompose that installs it (pyproject.toml)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
TENSORBOARD_RUN = "tensorboard"  # out/logs/tensorboard/: the event files (`tensorboard --logdir DIR/out/logs`)


def check_installed(log_with: str, where) -> None:
    """UserError (exit 2) when the tracker `log_with` needs is not installed; nothing for "none"."""
    if log_with not in LOG_WITH:
        raise UserError(f"{where}: train.log_with must be one of {', '.join(LOG_WITH)}, not {log_with!r}")
    package = TRACKER_PACKAGES.get(log_with)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"{where}: train.log_with = \"{log_with}\" needs the {package} package, which is not "
                        f"installed: pip install 'palpcompose[{log_with}]' (or set train.log_with = \"none\")")


class Tracker:
    """One run's accelerate tracker. Values are plain floats; images PIL images."""

    def __init__(self, tracker, log_with: str):
        self.tracker, self.log_with = tracker, log_with

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.tracker.log({k: float(v) for k, v in values.items()}, step=step)

    def log_image(self, name: str, image, step: int) -> None:
        import numpy as np

        if self.log_with == "wandb":  # accelerate wraps each image in a wandb.Image
            self.tracker.log_images({name: [image]}, step=step)
        else:  # TensorBoard: (N, H, W, C) uint8
            self.tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")

    def log_image_file(self, name: str, path: Path, step: int) -> None:
        """An image written to disk (a preview grid) -> the tracker."""
        from PIL import Image

        with Image.open(path) as image:
            self.log_image(name, image.convert("RGB"), step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """A table of results (W&B: a table; TensorBoard: one markdown text entry)."""
        if self.log_with == "wandb":
            self.tracker.log_table(name, columns=columns, data=rows, step=step)
            return
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        self.tracker.writer.add_text(name, "\n".join(lines), global_step=step)
        self.tracker.writer.flush()

    def finish(self) -> None:
        self.tracker.finish()


def open_tracker(log_with: str, logs: Path, run_name: str, config: dict | None,
                 project: str = "palpcompose") -> Tracker | None:
    """The tracker `log_with` names, writing under `logs` (out/logs/), with the run's resolved configuration (if
    given) as its hyperparameters; None for "none". W&B files the run `run_name` under the project `project`. Call
    on the main process only."""
    if log_with == "none":
        return None
    check_installed(log_with, "train.log_with")
    logs.mkdir(parents=True, exist_ok=True)
    if log_with == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(TENSORBOARD_RUN, str(logs))
    else:
        from accelerate.tracking import WandBTracker

        os.environ.setdefault("WANDB_MODE", "offline")  # no network, no account; the user may set "online"
        tracker = WandBTracker(project, dir=str(logs), name=run_name)  # accelerate's run_name is W&B's project
    tracker.start()
    if config is not None:
        tracker.store_init_configuration(_flat(config))
    return Tracker(tracker, log_with)


def _flat(config: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 2}} -> {"train.steps": 2}, values the trackers accept (lists as strings)."""
    out: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
