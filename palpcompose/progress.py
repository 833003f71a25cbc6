"""The training loop's progress line and its closing summary table."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from palpcompose.outputs import previews_dir, train_log_path


class TrainingProgress:
    """The loop's progress. On a terminal, a rich bar that fits 80 columns: steps, bar, losses, elapsed, ETA (and the
    rate from 100 columns on). Otherwise (logs, CI, nohup) a plain line every max(10 steps, 5%) and at the last
    step, with the same facts."""

    def __init__(self, console: Console, total: int, completed: int):
        self.console, self.total, self.first = console, total, completed
        self.every = max(10, math.ceil(total * 0.05))
        self.t0 = time.monotonic()
        self.bar = None
        if console.is_terminal:
            columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=None),
                       TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn()]
            if console.width >= 100:
                columns.insert(3, TextColumn("{task.fields[rate]}"))
            self.bar = Progress(*columns, console=console, expand=True)
            self.task = self.bar.add_task("training", total=total, completed=completed, losses="", rate="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, losses: dict[str, float]) -> None:
        shown = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items() if k.startswith("loss_"))
        elapsed = time.monotonic() - self.t0
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, losses=shown, rate=f"{rate:.2f} steps/s")
        elif step % self.every == 0 or step == self.total:
            eta = _clock((self.total - step) / rate) if rate > 0 else "?"
            self.console.print(f"step {step}/{self.total} ({100 * step // self.total}%)  {shown}  elapsed "
                               f"{_clock(elapsed)}  ETA {eta}", highlight=False, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_summary(console: Console, result, log: list[dict], mode: str) -> None:
    """The table printed when training completes; `result` is the train.TrainResult, `log` the logged steps."""
    table = Table(title="training summary", show_header=False)
    table.add_row("guidance", mode)
    table.add_row("steps", str(result.steps_done))
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    # One step's loss is noise (t and the image are drawn at random each step): compare means over windows
    for key in (k for k in result.final_losses if k.startswith("loss_")):
        values = [e[key] for e in log if key in e]
        if not values:
            continue
        n = max(1, min(50, len(values) // 4))
        last, first = sum(values[-n:]) / n, sum(values[:n]) / n
        table.add_row(key, f"{last:.4f} (mean of the last {n} step{'s' if n > 1 else ''}; first {n}: {first:.4f})")
    table.add_row("weights", str(result.weights_dir))
    if previews_dir(result.out_dir).is_dir():
        table.add_row("previews", str(previews_dir(result.out_dir)))
    table.add_row("log", str(train_log_path(result.out_dir)))
    console.print(table)
