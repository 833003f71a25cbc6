"""A project's out/ folder: its layout, its readers, which trained weights a command uses, and whether they are stale.

The one home of the out/ layout (docs/architecture.md draws it); no other module spells these names:

    out/manifest.json                the run: version, base model identity, resolved config + hash, image hashes, ...
    out/train.lock                   present while a `train` runs (`TrainingLock`)
    out/checkpoint/                  the last full training state (checkpoint.py's format)
    out/weights/final/               the final weights (weights.py's format)
    out/snapshots/step-NNNNNN/       the same two files every `train.save_every` steps
    out/previews/step-NNNNNN.png     preview grids (+ .json legends)
    out/logs/train.jsonl, loss.png   the training log and its plot
    out/renders/<render>/            a render: PNGs, contact-sheet.png, render.json (and that render's eval.json)
    out/runs/<id>/                   earlier runs, kept when a new run starts (a folder laid out as out/)
    out/eval.json                    the latest `eval`

Every function taking `out` takes the folder of one run: `project.root / "out"` (`out_dir`), or a kept run
`out/runs/<id>/` (`run_out_dir`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

from palpcompose import distributed
from palpcompose.captions import caption_path
from palpcompose.checkpoint import STATE_FILE, checkpoint_folder, checkpoint_processes
from palpcompose.errors import DamagedFile, UserError, command_line
from palpcompose.fsutil import sha256_file
from palpcompose.project import (
    ADDED_LATER,
    changed_weight_settings,
    describe_changes,
    flat_settings,
    listed_images,
)
from palpcompose.weights import LORA_FILE, TrainedWeights, load_trained_weights

OUT_DIR = "out"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "train.lock"
CHECKPOINT_DIR = "checkpoint"
WEIGHTS_DIR = "weights"
FINAL_NAME = "final"  # out/weights/final/, and the label of those weights in renders and exports
SNAPSHOTS_DIR = "snapshots"
PREVIEWS_DIR = "previews"
LOGS_DIR = "logs"
RENDERS_DIR = "renders"
RUNS_DIR = "runs"
EVAL_FILE = "eval.json"
RENDER_INDEX_FILE = "render.json"  # in a render folder: every image with its prompt, seed, weights and settings
CONTACT_SHEET_FILE = "contact-sheet.png"  # in a render folder
RUN_FOLDERS = (SNAPSHOTS_DIR, PREVIEWS_DIR, LOGS_DIR, CHECKPOINT_DIR, WEIGHTS_DIR)  # one run's, besides its manifest


# ---------------------------------------------------------------------------------------------------------------
# The layout


def out_dir(root: Path) -> Path:
    """The project's out/ folder (the current run)."""
    return Path(root) / OUT_DIR


def manifest_path(out: Path) -> Path:
    return out / MANIFEST_FILE


def lock_path(out: Path) -> Path:
    return out / LOCK_FILE


def checkpoint_dir(out: Path) -> Path:
    return out / CHECKPOINT_DIR


def final_dir(out: Path) -> Path:
    return out / WEIGHTS_DIR / FINAL_NAME


def snapshot_name(step: int) -> str:
    """'step-000100': a snapshot's folder name, and the label of its weights in renders and exports."""
    return f"step-{step:06d}"


def step_of(name: str) -> int | None:
    """100 from 'step-000100' (a snapshot folder's name, a preview's stem): snapshot_name's inverse; None for any
    other name."""
    m = re.fullmatch(r"step-(\d+)", name)
    return int(m.group(1)) if m else None


def snapshots_dir(out: Path) -> Path:
    return out / SNAPSHOTS_DIR


def snapshot_dir(out: Path, step: int) -> Path:
    return snapshots_dir(out) / snapshot_name(step)


def previews_dir(out: Path) -> Path:
    return out / PREVIEWS_DIR


def preview_path(out: Path, step: int) -> Path:
    """out/previews/step-NNNNNN.png (its legend: the same name with .json)."""
    return previews_dir(out) / f"{snapshot_name(step)}.png"


def logs_dir(out: Path) -> Path:
    """out/logs/: train.jsonl, loss.png, and the tracker's files (train.log_with: `tensorboard --logdir` it)."""
    return out / LOGS_DIR


def train_log_path(out: Path) -> Path:
    return out / LOGS_DIR / "train.jsonl"


def loss_plot_path(out: Path) -> Path:
    return out / LOGS_DIR / "loss.png"


def renders_dir(out: Path) -> Path:
    return out / RENDERS_DIR


def runs_dir(out: Path) -> Path:
    """out/runs/: the earlier runs kept there."""
    return out / RUNS_DIR


def is_kept_run(out: Path) -> bool:
    """`out` is a run kept in out/runs/<id>/ (not the current run in out/)."""
    return out.parent.name == RUNS_DIR


def eval_path(folder: Path) -> Path:
    """eval.json in `folder`: out/ (the latest eval) or a render folder (that render's)."""
    return folder / EVAL_FILE


def has_run(out: Path) -> bool:
    """out/ holds a training run (its manifest or anything it trained)."""
    return manifest_path(out).exists() or any((out / name).exists() for name in RUN_FOLDERS)


def now() -> str:
    """A manifest's and the lock's timestamps."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# Readers


def read_json(path: Path, strict: bool = False) -> dict | None:
    """A JSON object from `path`; None when it is missing, or (unless `strict`: DamagedFile) unreadable."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return data
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        if strict:
            raise DamagedFile(path, str(exc)) from None
        return None


def read_jsonl(path: Path) -> list[dict]:
    """out/logs/train.jsonl: one JSON object per line; DamagedFile names the first line that is not one."""
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                    raise TypeError("not a log entry with a step")
            except (ValueError, TypeError) as exc:
                raise DamagedFile(path, f"line {n}: {exc}") from None
            entries.append(entry)
    return entries


# The manifest's fields and their JSON types, checked by every reader (`load_manifest`): a manifest edited by hand
# or damaged names its field instead of failing later inside int() or a comparison. "status" is required.
MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "guidance": (str,), "steps_done": (int,), "steps_target": (int,), "started_at": (str,),
    "finished_at": (str, type(None)), "wall_time_s": (int, float), "device": (str,), "config": (dict,),
    "base_model": (dict,), "palpcompose_version": (str,), "num_processes": (int,), "effective_batch_size": (int,),
    "images": (dict,), "tokens": (dict,), "git": (dict, type(None)), "palp_toml": (dict,), "config_hash": (str,),
    "training_hash": (str,), "model_defaults": (dict,),
}
_BASE_MODEL_FIELDS = {"spec": (str,), "identity": (str,), "kind": (str,)}  # manifest["base_model"]
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object", type(None): "null"}


def field_problem(name: str, value, types: tuple[type, ...]) -> str | None:
    """'steps_done is "x", not an integer' when `value` is none of `types` (a bool is no number); else None."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return None
    if int in types and isinstance(value, int) and not isinstance(value, bool):
        return None
    expected = " or ".join(dict.fromkeys(_JSON_NAMES.get(t, t.__name__) for t in types))
    return f"{name} is {json.dumps(value, default=str)[:40]}, not {expected}"


def manifest_problems(data: dict) -> list[str]:
    """What is wrong with the fields of a manifest (MANIFEST_FIELDS): [] when every field palpcompose reads has its
    type. Unknown fields pass (a newer version may add some)."""
    problems = [] if "status" in data else ["status is missing"]
    for name, types in MANIFEST_FIELDS.items():
        if name in data and (problem := field_problem(name, data[name], types)):
            problems.append(problem)
    if isinstance(data.get("base_model"), dict):
        problems += [problem for name, types in _BASE_MODEL_FIELDS.items() if name in data["base_model"]
                     and (problem := field_problem(f"base_model.{name}", data["base_model"][name], types))]
    return problems


def load_manifest(out: Path) -> dict | None:
    """out/manifest.json, each field it holds of its type (MANIFEST_FIELDS); None when missing. DamagedFile names
    the file and the damaged field (no options: `read_manifest` and `train` add theirs)."""
    path = manifest_path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; palpcompose keeps a project's outputs in {out}/: move the "
                        "file away (or rename it)")
    if path.is_dir():
        raise DamagedFile(path, "a folder, not a file")
    data = read_json(path, strict=True)
    if data is not None:
        problems = manifest_problems(data)
        if problems:
            raise DamagedFile(path, "; ".join(problems))
    return data


def read_manifest(out: Path) -> dict | None:
    """out/manifest.json (None when missing); DamagedFile when unreadable or a field has the wrong type, with what
    to do about it."""
    try:
        return load_manifest(out)
    except DamagedFile as exc:
        if is_kept_run(out):  # a kept run: --resume and --force act on the current run, not this one
            raise exc.with_options("Options: restore the file, or render or export another run (without --run, "
                                   "the current one)") from None
        root = out.parent
        raise exc.with_options(f"Options: `{command_line('palpcompose', 'train', root, '--resume')}` rewrites it "
                               f"from the checkpoint; `{command_line('palpcompose', 'train', root, '--force')}` starts "
                               "over, keeping this run in out/runs/") from None


def load_weights(folder: Path) -> TrainedWeights:
    """weights.load_trained_weights of a folder in out/; DamagedFile says, for the final weights and snapshots, what
    to use instead."""
    folder = Path(folder)
    try:
        return load_trained_weights(folder)
    except DamagedFile as exc:
        raise exc.with_options(_instead_of_damaged(folder)) from None


def _instead_of_damaged(folder: Path) -> str:
    """What to use when the weights in `folder` are damaged: another snapshot, or a new run."""
    if folder.parent.name not in (SNAPSHOTS_DIR, WEIGHTS_DIR):
        return ""
    out = folder.parent.parent
    others = sorted(p.name for p in snapshots_dir(out).glob("step-*") if p != folder and (p / LORA_FILE).is_file())
    use = f"use a snapshot with --snapshot N ({', '.join(others[-3:])} exist)" if others else ""
    if is_kept_run(out):  # a kept run (out/runs/<id>/): training again makes a new run, not this one
        return f"Options: {use or 'render or export another run'}"
    use = f"{use}, or " if use else ""
    return (f"Options: {use}train again with `{command_line('palpcompose', 'train', out.parent, '--force')}` (the "
            "damaged run is kept in out/runs/)")


# ---------------------------------------------------------------------------------------------------------------
# The lock


class TrainingLock:
    """out/train.lock: {pid, host, started_at} while a `train` runs. A lock whose process is gone (same host) is
    stale and taken over. `acquire` takes it, `release` removes it (train: the main process, train._held_by_main)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def holder(self) -> dict | None:
        """The live lock's content, or None when there is no lock or it is stale (its process is gone, or it holds
        bytes no `train` wrote: a lock palpcompose cannot read is no live run). UserError when the lock is a folder,
        or names this host with a pid that is no process id (-1 or 0 would make os.kill signal a whole group)."""
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder, not a training lock; remove it (`rm -r {self.path}`) if no "
                            "`train` of this project is running")
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        if info.get("host") == socket.gethostname():
            pid = info.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise UserError(f"{self.path} is damaged (pid {json.dumps(pid, default=str)[:40]}, not a process "
                                "id); if no `train` of this project is running, delete the file")
            if not _pid_alive(pid):
                return None
        return info

    def check(self) -> None:
        """Raise UserError when another run holds the lock."""
        live = self.holder()
        if live is not None:
            raise self._held(live)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.check()
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return
        raise UserError(f"{self.path}: could not take the training lock; delete the file if no run is active")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def _held(self, info: dict) -> UserError:
        return UserError(
            f"{self.path}: this project is already training (pid {info.get('pid')} on {info.get('host')}, started "
            f"{info.get('started_at')}); wait for it, or stop it. If no such run exists, delete the lock file"
        )


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) signals a process group or every process: never "alive"
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# Finding a run and its weights


def run_out_dir(project, run: str | None) -> Path:
    """The folder holding the trained run that render/export/eval use: out/, or out/runs/<run>/ (--run)."""
    out = out_dir(project.root)
    if run is None:
        return out
    folder = runs_dir(out) / str(run)
    if not str(run).strip() or Path(str(run)).name != str(run) or not folder.is_dir():
        kept = runs_dir(out)
        runs = sorted(p.name for p in kept.glob("*") if p.is_dir()) if kept.is_dir() else []
        raise UserError(f"--run {run}: no such run in {kept}; runs kept there: {', '.join(runs) or 'none'}")
    return folder


def status_words(status) -> str:
    """A manifest status as a user reads it after "training was": "failed" is an exception that stopped it; a run
    still "running" without its process was interrupted."""
    return {"failed": "stopped by an error", "running": "interrupted"}.get(status, str(status))


def unfinished(project, out: Path) -> str | None:
    """Why `out` has no final weights although training started: "training in progress (pid P ...)" or "training
    was interrupted at step N: `palpcompose train DIR --resume`" (None when no training ever started there)."""
    live = TrainingLock(lock_path(out)).holder()
    if live is not None:
        return (f"training in progress (pid {live.get('pid')} on {live.get('host')}, started {live.get('started_at')});"
                " wait for it to finish")
    kept = out != out_dir(project.root)  # a run kept in out/runs/: it cannot be resumed
    status = (read_json(manifest_path(out)) or {}).get("status")
    if not isinstance(status, str) or status in ("running", "completed"):  # no live lock: the process is gone
        status = "interrupted"
    checkpoint = checkpoint_folder(checkpoint_dir(out))
    if checkpoint is not None:
        state = read_json(checkpoint / STATE_FILE) or {}
        # resumed with as many processes as wrote the checkpoint (another number is refused)
        launched = distributed.launcher_prefix(checkpoint_processes(state)) or "palpcompose"
        how = "" if kept else f": `{launched} {command_line('train', project.root, '--resume')}`"
        step = state.get("step", "?")
        return f"training was {status_words(status)} at step {step}{how}"
    if has_run(out) and not snapshots_dir(out).is_dir():  # snapshots come with a checkpoint
        how = "" if kept else f": `{command_line('palpcompose', 'train', project.root)}` starts it again"
        return f"training was {status_words(status)} before its first checkpoint{how}"
    return None


def snapshot_steps(out: Path) -> list[int]:
    """The steps of every snapshot in `out/snapshots/step-NNNNNN/` that holds weights, ascending."""
    steps = []
    for folder in snapshots_dir(out).glob("step-*"):
        step = step_of(folder.name)
        if step is not None and (folder / LORA_FILE).is_file():
            steps.append(step)
    return sorted(steps)


def weights_step(folder: Path) -> int:
    """The training step a weights folder was saved at (its header's metadata); 0 when it cannot be read (loading
    it later says what is wrong)."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / LORA_FILE), framework="pt") as f:
            return int((f.metadata() or {}).get("step", "0"))
    except Exception:  # noqa: BLE001 - a damaged header (SafetensorError, OSError, ValueError): loading it says why
        return 0


def locate_weights(project, out: Path, step: int | None) -> tuple[Path, str, list[str]]:
    """Which weights folder to use: snapshot `step`, else the final weights, else (an unfinished run) the latest
    snapshot. Returns (folder, label, warnings); UserError when there is nothing to use."""
    steps = snapshot_steps(out)
    available = ", ".join(str(s) for s in steps) or "none"
    if step is not None:
        if step not in steps:
            raise UserError(
                f"no snapshot at step {step} in {snapshots_dir(out)}; available steps: {available}"
            )
        return snapshot_dir(out, step), snapshot_name(step), []
    final = final_dir(out)
    if (final / LORA_FILE).is_file():
        newer = [s for s in steps if s > weights_step(final)]
        if (read_json(manifest_path(out)) or {}).get("status") in ("completed", None):
            return final, FINAL_NAME, []
        # a completed run continued (more train.steps) and stopped or still running: final is the earlier finish's
        state = unfinished(project, out) or "training has not finished"
        if not newer:
            return final, FINAL_NAME, [(f"{state}; using {final}, the earlier finish's weights (step "
                                        f"{weights_step(final)})")]
        warning = (f"{state} ({final} holds the earlier finish, step {weights_step(final)}); using the latest "
                   f"snapshot, step {newer[-1]}")
        return snapshot_dir(out, newer[-1]), snapshot_name(newer[-1]), [warning]
    state = unfinished(project, out)
    if steps:
        resume = command_line("palpcompose", "train", project.root, "--resume")
        state = state or f"training has not finished; `{resume}` finishes it"
        warning = f"{state} (no {final}); using the latest snapshot, step {steps[-1]}"
        return snapshot_dir(out, steps[-1]), snapshot_name(steps[-1]), [warning]
    if state is not None:
        raise UserError(f"no trained weights in {out} yet: {state}")
    raise UserError(f"no trained weights in {out}; run `{command_line('palpcompose', 'train', project.root)}` first")


# ---------------------------------------------------------------------------------------------------------------
# Staleness: were the weights in out/ trained with what the project says now?


def image_hashes(project, images: dict[str, tuple[Path, ...]]) -> dict[str, str]:
    """{path relative to the project: sha256} of every reference image and, with train.captions on, of every
    image's caption file (manifest.json's "images"): a changed caption makes the weights stale as an image does."""
    files = [p for paths in images.values() for p in paths]
    if project.config.train.captions:
        files += [caption_path(p) for p in files if caption_path(p).is_file()]
    return {p.relative_to(project.root).as_posix(): sha256_file(p) for p in files}


def image_changes(before: dict | None, now: dict[str, str], most: int = 5) -> str:
    """'refs/V1/3.png is new, refs/V1/0.png changed, refs/V1/2.png is gone' ("" when the same)."""
    if not isinstance(before, dict) or not before or before == now:  # {}: no record (a run has images)
        return ""
    changes = ([f"{p} is new" for p in sorted(set(now) - set(before))]
               + [f"{p} changed" for p in sorted(set(now) & set(before)) if now[p] != before[p]]
               + [f"{p} is gone" for p in sorted(set(before) - set(now))])
    more = f", and {len(changes) - most} more" if len(changes) > most else ""
    return ", ".join(changes[:most]) + more


def trained_with(manifest: dict | None, out: Path, *, config: dict, images: dict[str, str], identity: str,
                 num_processes: int) -> bool:
    """The run recorded in `manifest` completed, and its final weights are in `out`, trained with these weight
    settings (`config`, a resolved configuration as a dict), reference images, base model and number of processes:
    `train` has nothing to do."""
    return bool(
        manifest and manifest.get("status") == "completed" and isinstance(manifest.get("config"), dict)
        and not changed_weight_settings(manifest["config"], config)
        and manifest.get("images") == images
        and (manifest.get("base_model") or {}).get("identity") == identity
        and manifest.get("num_processes", 1) == num_processes  # another effective batch, other weights
        and (final_dir(out) / LORA_FILE).is_file()
    )


def check_trained_for(project, out: Path, manifest: dict | None) -> list[str]:
    """Guard rails shared by render and export: refuse when the trained weights belong to another base model, warn
    when palp.toml or the reference images changed since training. Returns the warnings."""
    warnings = []
    base_model = project.config.project.base_model
    if manifest is not None:
        trained_on = (manifest.get("base_model") or {}).get("spec")
        if trained_on is not None and trained_on.strip() != base_model.strip():
            raise UserError(
                f"{project.file}: project.base_model is {base_model!r} but the weights in {out} were trained on "
                f"{trained_on!r}; set base_model back to {trained_on!r}, or retrain with "
                f"`{command_line('palpcompose', 'train', project.root)}`"
            )
        # Training settings changed: the weights no longer match palp.toml. Only [render] or snapshot/preview
        # periods changed (same training hash): the weights are unaffected, so this is only a note.
        # Compared with palp.toml as it was when training started (`palp_toml`), not with the configuration the
        # run used, which also holds the --steps/--guidance overrides (older manifests have only the latter).
        trained = manifest.get("palp_toml") or manifest
        config_hash = trained.get("config_hash")
        # palp.toml edited to what the run was told on the command line (steps = N after --steps N) is no change
        config_changed = config_hash is not None and project.config.hash() not in (config_hash,
                                                                                   manifest.get("config_hash"))
        changes = _changed_keys(trained.get("config"), project.config.to_dict())
        what = f" ({changes})" if changes else (f" (configuration hash {project.config.hash()[:12]}, "
                                                f"{str(config_hash)[:12]} in out/manifest.json)")
        # the weights are stale when the file's weight settings match neither the file trained from nor the run
        weights_changed = all(changed_weight_settings(before, project.config.to_dict())
                              for before in (trained.get("config"), manifest.get("config")) if isinstance(before, dict))
        if config_changed and weights_changed and isinstance(trained.get("config"), dict):
            stale = changed_weight_settings(trained["config"], project.config.to_dict())  # what made them stale
            what = f" ({describe_changes(stale, most=4)})" if stale else what
            warnings.append(
                f"{project.file} changed since training{what}: the weights were trained with the old "
                f"settings; retrain with `{command_line('palpcompose', 'train', project.root)}` to apply the new ones"
            )
        elif config_changed:
            warnings.append(
                f"{project.file} changed since training{what}, but only in settings that do not affect the trained "
                "weights ([render], snapshot or preview periods, memory savers)"
            )
        try:
            images = image_changes(manifest.get("images"), image_hashes(project, listed_images(project)))
        except OSError:  # an unreadable image is train's and check's to report
            images = ""
        if images:
            warnings.append(f"the reference images changed since training ({images}): the weights never saw them; "
                            f"retrain with `{command_line('palpcompose', 'train', project.root)}`")
    return warnings


def _changed_keys(before: dict | None, now: dict, most: int = 4) -> str:
    """'train.steps 200 -> 40, subjects.V1.class_name ...': the keys whose values differ between two resolved
    configurations."""
    if not isinstance(before, dict):
        return ""
    old, new = flat_settings(before), flat_settings(now)
    for (section, key), default in ADDED_LATER.items():  # a key added since, at its default, is no change
        old.setdefault(f"{section}.{key}", default)
    return describe_changes([(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
                             if old.get(key) != new.get(key)], most)
