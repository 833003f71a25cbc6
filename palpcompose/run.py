"""A training run's lifecycle around the loop in train.py: the plan, the lock, and the record in `out/`.

    make_plan(project, ...) -> Plan   every check, nothing written: project, overrides, base model, images, the
                                      state of out/ (up to date, resumable, held by another run)
    TrainingLock(out/train.lock)      one `train` per project at a time (pid + host; a dead pid's lock is stale)
    RunRecord(out, writer=...)        the only writer of out/: manifest, train.jsonl, checkpoint, snapshots,
                                      previews, final weights, loss plot. writer=False (a non-main process of a
                                      multi-process run) makes every write a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from palpcompose import distributed, models
from palpcompose.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    checkpoint_processes,
    load_checkpoint,
    read_settings,
    save_checkpoint,
)
from palpcompose.errors import DamagedFile, UserError, command_line
from palpcompose.fsutil import atomic_save_image, atomic_write_json, atomic_write_text, sha256_file
from palpcompose.guidance import GUIDANCE_MODES
from palpcompose.project import changed_weight_settings, describe_changes, weight_settings
from palpcompose.weights import TrainedWeights, save_trained_weights

MANIFEST_FILE = "manifest.json"
LOCK_FILE = "train.lock"
RUN_FOLDERS = ("snapshots", "previews", "logs", "checkpoint", "weights")  # what one run writes besides the manifest


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """What `train` is about to do, decided before anything is written."""

    project: object
    config: object  # the project's configuration with --steps/--guidance applied
    file_hashes: dict  # palp.toml as written (manifest "palp_toml"): render compares the file with it later
    mode: str  # the guidance mode of this run
    steps_target: int
    out: Path
    source: models.BaseModelSource
    identity: str  # the base model's identity (hub revision or sha256)
    images: dict[str, str]  # relative path -> sha256 of every reference image
    previous: dict | None  # the manifest of the run in out/, if any
    settings: dict  # what a resume must share with the run it continues (the checkpoint's "settings")
    resume_from: Path | None = None  # the checkpoint folder to continue from; None: a fresh run
    checkpoint: Checkpoint | None = None  # the checkpoint in resume_from, read (and so checked) by the plan
    up_to_date: bool = False  # nothing to do: the weights in out/ were trained with exactly this
    num_processes: int = 1  # processes of this run (the launcher's WORLD_SIZE)
    archive: Path | None = None  # a fresh run moves the earlier run here (out/runs/<id>/) before it writes
    notice: str = ""  # what happens to the earlier run, and why (printed before anything is moved)
    resume_command: str = ""  # what interrupt messages print
    fresh_command: str = ""

    @property
    def final_dir(self) -> Path:
        return self.out / "weights" / "final"


def make_plan(project, *, steps: int | None = None, resume: bool = False, guidance: str | None = None,
              force: bool = False) -> Plan:
    """Validate everything `train` needs and decide fresh / resume / up to date. Writes nothing."""
    from palpcompose.project import load_project

    if not hasattr(project, "config"):
        project = load_project(project)
    config = project.config
    if guidance is not None and guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, not {guidance!r}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    mode = guidance or config.palp.guidance
    if mode != "none" and not (config.palp.target_prompt and config.palp.clean_prompt):
        raise UserError(f"{project.file}: guidance {mode!r} needs palp.target_prompt and palp.clean_prompt; set "
                        "both, or use --guidance none")
    file_hashes = {"config": config.to_dict(), "config_hash": config.hash(), "training_hash": config.training_hash()}
    config = replace(config, palp=replace(config.palp, guidance=mode),
                     train=replace(config.train, steps=steps or config.train.steps))
    steps_target = config.train.steps
    steps_option = f" --steps {steps_target}" if steps is not None else ""
    num_processes = distributed.launch().world_size
    launched = distributed.launcher_prefix()  # "torchrun --nproc_per_node 2 $(which palpcompose)" or ""
    out = project.root / "out"
    source = models.resolve_base_model(config.project.base_model, project.root, config.project.allow_pickle)
    if not source.available:
        raise UserError(f"project.base_model: {source.detail}")
    plan = Plan(
        project=project, config=config, file_hashes=file_hashes, mode=mode, steps_target=steps_target, out=out,
        source=source, identity=base_model_identity(source),
        images=image_hashes(project, project.images),
        previous=None, settings=resume_settings(config),
        num_processes=num_processes,  # the launcher's prefix stays unquoted: it holds $(which palpcompose)
        resume_command=(launched or "palpcompose") + " " + command_line("train", project.root, "--resume") + steps_option,
        fresh_command=(launched or "palpcompose") + " " + command_line("train", project.root) + steps_option,
    )
    try:
        plan.previous = read_json(out / MANIFEST_FILE, strict=True)
    except DamagedFile as exc:  # --resume rewrites it from the checkpoint; --force keeps it in out/runs/
        if not (resume or force):
            raise exc.with_options(_damaged_run_options(plan, resume=True)) from None
    if not force and not resume and _trained_with(plan, plan.previous):
        plan.up_to_date = True
        return plan
    TrainingLock(out / LOCK_FILE).check()
    if resume:
        plan.resume_from = _resumable_checkpoint(plan, steps)
    elif has_run(out):
        _continue_or_keep(plan, force)
    if plan.resume_from is not None:
        try:
            plan.checkpoint = load_checkpoint(plan.resume_from)
            read_jsonl(out / "logs" / "train.jsonl")
        except DamagedFile as exc:
            raise exc.with_options(_damaged_run_options(plan, resume=False)) from None
    return plan


def _damaged_run_options(plan: Plan, *, resume: bool) -> str:
    """What a user can do when a file of the run in out/ is damaged."""
    from palpcompose.render import snapshot_steps

    options = []
    if resume and checkpoint_folder(plan.out / "checkpoint") is not None:
        options.append(f"`{plan.resume_command}` continues from the checkpoint (and rewrites the file)")
    snapshots = snapshot_steps(plan.out)
    if snapshots:
        options.append(f"`palpcompose render {plan.project.root} --snapshot {snapshots[-1]}` (or export "
                       "--snapshot) uses the last snapshot")
    options.append(f"`{plan.fresh_command} --force` starts over, keeping this run in out/runs/")
    return "Options: " + "; ".join(options)


def has_run(out: Path) -> bool:
    """out/ holds a training run (its manifest or anything it trained)."""
    return (out / MANIFEST_FILE).exists() or any((out / name).exists() for name in RUN_FOLDERS)


def _continue_or_keep(plan: Plan, force: bool) -> None:
    """A run without --resume where out/ already holds one: continue it when only train.steps grew, else keep it
    by moving it to out/runs/<id>/. Sets plan.resume_from or plan.archive, and plan.notice."""
    previous, now_config = plan.previous, plan.config.to_dict()
    why = _differences(plan, previous)
    if previous is None:
        why.insert(0, f"{plan.out / MANIFEST_FILE} is missing or unreadable")
    elif previous.get("status") != "completed":
        # resumed with as many processes as that run had (another number is refused), not this run's
        here = distributed.launcher_prefix() or "palpcompose"
        there = distributed.launcher_prefix(int(previous.get("num_processes", 1))) or "palpcompose"
        resume = there + plan.resume_command.removeprefix(here)
        why.insert(0, f"it was {_status_words(previous.get('status'))} at step {previous.get('steps_done', 0)} of "
                      f"{previous.get('steps_target', '?')}; to continue it instead, press Ctrl-C now (nothing has moved "
                      f"yet) and run `{resume}`")
    only_steps_grew = (previous is not None and previous.get("status") == "completed"
                       and len(why) == 1 and isinstance(previous.get("config"), dict)
                       and [k for k, _, _ in changed_weight_settings(previous["config"], now_config)] == ["train.steps"]
                       and plan.steps_target > int(previous.get("steps_done", 0)))
    if only_steps_grew and not force:
        checkpoint = checkpoint_folder(plan.out / "checkpoint")
        if checkpoint is not None and _checkpoint_matches(plan, checkpoint, int(previous.get("steps_done", 0))):
            plan.resume_from = checkpoint
            plan.notice = (f"train.steps {previous['steps_done']} -> {plan.steps_target}: continuing the completed "
                           f"run from its checkpoint at step "
                           f"{previous['steps_done']} (--force starts a new run instead, keeping this one)")
            return
    if force:
        why.append("--force")
    plan.archive = _archive_folder(plan.out, previous)
    plan.notice = (f"starting a new run; the earlier one is kept in {plan.archive} "
                   f"(`--run {plan.archive.name}` renders or exports it): {'; '.join(why) or 'no change found'}")


def _differences(plan: Plan, previous: dict | None) -> list[str]:
    """What differs between the run recorded in `previous` and this plan: settings, images, base model."""
    if previous is None:
        return []
    why = []
    if isinstance(previous.get("config"), dict):
        changed = changed_weight_settings(previous["config"], plan.config.to_dict())
        if changed:
            why.append("settings changed: " + describe_changes(changed))
    images = image_changes(previous.get("images"), plan.images)
    if images:
        why.append("reference images changed: " + images)
    if (previous.get("base_model") or {}).get("identity") != plan.identity:
        why.append("the base model changed")
    if previous.get("num_processes", 1) != plan.num_processes:
        ran = previous.get("num_processes", 1)
        why.append(f"it ran on {ran} process{'es' if ran != 1 else ''}, this run on {plan.num_processes} "
                   "(another effective batch)")
    return why


def image_hashes(project, images: dict[str, tuple[Path, ...]]) -> dict[str, str]:
    """{path relative to the project: sha256} of every reference image (manifest.json's "images")."""
    return {p.relative_to(project.root).as_posix(): sha256_file(p) for paths in images.values() for p in paths}


def image_changes(before: dict | None, now: dict[str, str], most: int = 5) -> str:
    """'refs/V1/3.png is new, refs/V1/0.png changed, refs/V1/2.png is gone' ("" when the same)."""
    if not isinstance(before, dict) or not before or before == now:  # {}: no record (a run has images)
        return ""
    changes = ([f"{p} is new" for p in sorted(set(now) - set(before))]
               + [f"{p} changed" for p in sorted(set(now) & set(before)) if now[p] != before[p]]
               + [f"{p} is gone" for p in sorted(set(before) - set(now))])
    more = f", and {len(changes) - most} more" if len(changes) > most else ""
    return ", ".join(changes[:most]) + more


def _checkpoint_matches(plan: Plan, checkpoint: Path, step: int) -> bool:
    """The checkpoint is the completed run's last state, trained with this plan's settings."""
    try:
        state_json = read_settings(checkpoint)
    except DamagedFile as exc:
        raise exc.with_options(_damaged_run_options(plan, resume=False)) from None
    return (state_json.get("step") == step and state_json.get("settings") == plan.settings
            and checkpoint_processes(state_json) == plan.num_processes)


def _archive_folder(out: Path, previous: dict | None) -> Path:
    """out/runs/<id>/ for the earlier run: its start time and guidance ('2026-05-01T10-00-00-palp'), made unique."""
    started = str((previous or {}).get("started_at") or "unknown").split("+")[0].replace(":", "-")
    stem = f"{started}-{(previous or {}).get('guidance', 'unknown')}"
    for n in range(1, 1000):
        folder = out / "runs" / (stem if n == 1 else f"{stem}-{n}")
        if not folder.exists():
            return folder
    raise UserError(f"{out / 'runs'}: could not name a folder for the earlier run ({stem}-N)")


def _status_words(status) -> str:
    """A manifest status as a user reads it after "training was": "failed" is an exception that stopped it; a run
    still "running" without its process was interrupted."""
    return {"failed": "stopped by an error", "running": "interrupted"}.get(status, str(status))


def unfinished(project, out: Path) -> str | None:
    """Why `out` has no final weights although training started: "training in progress (pid P ...)" or "training
    was interrupted at step N: `palpcompose train DIR --resume`" (None when no training ever started there)."""
    live = TrainingLock(out / LOCK_FILE).holder()
    if live is not None:
        return (f"training in progress (pid {live.get('pid')} on {live.get('host')}, started {live.get('started_at')});"
                " wait for it to finish")
    kept = out != project.root / "out"  # a run kept in out/runs/: it cannot be resumed
    status = (read_json(out / MANIFEST_FILE) or {}).get("status") or "interrupted"
    if status in ("running", "completed"):  # no live lock: the process is gone
        status = "interrupted"
    checkpoint = checkpoint_folder(out / "checkpoint")
    if checkpoint is not None:
        state = read_json(checkpoint / "state.json") or {}
        # resumed with as many processes as wrote the checkpoint (another number is refused)
        launched = distributed.launcher_prefix(checkpoint_processes(state)) or "palpcompose"
        how = "" if kept else f": `{launched} {command_line('train', project.root, '--resume')}`"
        step = state.get("step", "?")
        return f"training was {_status_words(status)} at step {step}{how}"
    if has_run(out) and not (out / "snapshots").is_dir():  # snapshots come with a checkpoint
        how = "" if kept else f": `{command_line('palpcompose', 'train', project.root)}` starts it again"
        return f"training was {_status_words(status)} before its first checkpoint{how}"
    return None


def run_out_dir(project, run: str | None) -> Path:
    """The folder holding the trained run that render/export/eval use: out/, or out/runs/<run>/ (--run)."""
    out = project.root / "out"
    if run is None:
        return out
    folder = out / "runs" / str(run)
    if not str(run).strip() or Path(str(run)).name != str(run) or not folder.is_dir():
        runs = sorted(p.name for p in (out / "runs").glob("*") if p.is_dir()) if (out / "runs").is_dir() else []
        raise UserError(f"--run {run}: no such run in {out / 'runs'}; runs kept there: {', '.join(runs) or 'none'}")
    return folder


def resume_settings(config) -> dict:
    """What a resumed run must share with the run it continues: every weight-changing setting but train.steps."""
    return weight_settings(config.to_dict(), steps=False)


def _trained_with(plan: Plan, previous: dict | None) -> bool:
    """The run recorded in `previous` completed with this plan's weight settings, images and base model."""
    return bool(
        previous and previous.get("status") == "completed" and isinstance(previous.get("config"), dict)
        and not changed_weight_settings(previous["config"], plan.config.to_dict())
        and previous.get("images") == plan.images
        and (previous.get("base_model") or {}).get("identity") == plan.identity
        and previous.get("num_processes", 1) == plan.num_processes  # another effective batch, other weights
        and (plan.final_dir / "lora.safetensors").is_file()
    )


def _resumable_checkpoint(plan: Plan, steps: int | None) -> Path:
    """The checkpoint `--resume` continues from, after checking it was trained with this plan's settings."""
    checkpoint = plan.out / "checkpoint"
    resume_from = checkpoint_folder(checkpoint)
    if resume_from is None:
        raise UserError(f"{checkpoint}: nothing to resume; run `palpcompose train` without --resume")
    try:
        state_json = read_settings(resume_from)
    except DamagedFile as exc:
        raise exc.with_options(_damaged_run_options(plan, resume=False)) from None
    written_by = checkpoint_processes(state_json)
    if written_by != plan.num_processes:
        command = command_line("train", plan.project.root, "--resume")
        launch = (f"{distributed.launcher_prefix(written_by)} {command}" if written_by > 1
                  else f"palpcompose {command}, without a launcher")
        raise UserError(
            f"{resume_from}: the checkpoint was written by a run of {written_by} process{'es' if written_by > 1 else ''}"
            f", this one has {plan.num_processes}: the effective batch and every process's random draws would "
            f"change, so it would not continue that run. Resume with {written_by} (e.g. {launch}), or train "
            "without --resume to start over")
    # the checkpoint's settings read by today's rule (weight_settings), so a key that stopped mattering does not count
    changed = changed_weight_settings(state_json["settings"], plan.settings, steps=False)
    if changed:
        listed = "; ".join(f"{key} was {then!r}, now {now!r}" for key, then, now in changed)
        old_guidance = state_json["settings"].get("palp", {}).get("guidance")
        how = (f"pass --guidance {old_guidance} again" if any(k == "palp.guidance" for k, _, _ in changed)
               and len(changed) == 1 else "restore them in palp.toml (or the --guidance of that run)")
        raise UserError(f"{plan.project.file}: the checkpoint was trained with other settings ({listed}); {how} to "
                        "resume, or train without --resume to start over")
    changed = image_changes((plan.previous or {}).get("images"), plan.images)
    if changed:
        raise UserError(f"{plan.project.file}: the reference images changed since the checkpoint ({changed}), so "
                        f"--resume would continue on images the run never saw; `{plan.fresh_command}` starts a new "
                        "run with them (keeping this one in out/runs/), or restore the images to resume")
    if plan.steps_target < state_json["step"]:
        asked = (f"--steps {plan.steps_target}" if steps is not None
                 else f"{plan.project.file}: train.steps = {plan.steps_target}")
        raise UserError(f"{asked}: the checkpoint is already at step {state_json['step']}; resume with --steps "
                        f"{state_json['step']} or more, or train without --resume to start over")
    return resume_from


# ---------------------------------------------------------------------------------------------------------------
# The lock


class TrainingLock:
    """out/train.lock: {pid, host, started_at} while a `train` runs. A lock whose process is gone (same host) is
    stale and taken over. Use as a context manager: acquired on entry, removed on exit."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def holder(self) -> dict | None:
        """The live lock's content, or None when there is no lock or it is stale."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
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

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _held(self, info: dict) -> UserError:
        return UserError(
            f"{self.path}: this project is already training (pid {info.get('pid')} on {info.get('host')}, started "
            f"{info.get('started_at')}); wait for it, or stop it. If no such run exists, delete the lock file"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------
# The record


@dataclass
class RunRecord:
    """Everything a run writes under out/. Until `begin` writes this run's manifest, the manifest on disk (if
    any) is the previous run's and `mark` leaves it be. With writer=False nothing is written at all."""

    out: Path
    manifest: dict
    writer: bool = True
    ours: bool = False  # out/manifest.json is this run's
    step: int = 0  # the optimizer steps done so far (resumed ones included)
    checkpoint_step: int | None = None  # the step of the last checkpoint this run wrote (or resumed from)
    last_snapshot: Path | None = None
    prior_wall: float = 0.0  # wall time of the runs this one continues
    log: list[dict] = field(default_factory=list)

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST_FILE

    @property
    def log_path(self) -> Path:
        return self.out / "logs" / "train.jsonl"

    def begin(self, resumed_step: int | None, archive: Path | None = None) -> None:
        """Start this run's record: continue the log and wall time of the run it resumes (`resumed_step`), or
        move the earlier run's outputs to `archive` (out/runs/<id>/) so nothing in out/ mixes two runs and nothing
        trained is lost. Writes this run's manifest."""
        if archive is not None and self.writer:
            archive.mkdir(parents=True)
            for name in (MANIFEST_FILE, *RUN_FOLDERS):
                if (self.out / name).exists():
                    os.replace(self.out / name, archive / name)
        if resumed_step is not None:
            old = read_json(self.manifest_path) or {}
            self.manifest["started_at"] = old.get("started_at", self.manifest["started_at"])
            self.prior_wall = float(old.get("wall_time_s", 0.0))
            self.log = [e for e in read_jsonl(self.log_path) if e["step"] <= resumed_step]
            self.checkpoint_step = resumed_step
        self.step = self.manifest["steps_done"] = resumed_step or 0
        self._write_manifest()
        self.ours = True

    def mark(self, **fields) -> None:
        """Update this run's manifest (status, steps_done, finished_at, ...); the previous run's is left alone."""
        if self.ours:
            self.manifest.update(**fields)
            self._write_manifest()

    def wall_time(self, elapsed: float) -> float:
        return round(self.prior_wall + elapsed, 3)

    def checkpoint(self, ckpt: Checkpoint, status: str, elapsed: float) -> None:
        """The checkpoint, the log so far and the manifest: what a resume continues from."""
        if self.writer:
            save_checkpoint(self.out / "checkpoint", ckpt)
            atomic_write_text(self.log_path, "".join(json.dumps(e) + "\n" for e in self.log))
        self.checkpoint_step = ckpt.step
        self.mark(status=status, steps_done=ckpt.step, wall_time_s=self.wall_time(elapsed))

    def snapshot(self, step: int, weights: TrainedWeights) -> Path:
        folder = self.out / "snapshots" / f"step-{step:06d}"
        if self.writer:
            save_trained_weights(folder, weights)
        self.last_snapshot = folder
        return folder

    def final(self, weights: TrainedWeights) -> Path:
        folder = self.out / "weights" / "final"
        if self.writer:
            save_trained_weights(folder, weights)
        return folder

    def preview(self, step: int, grid, legend: dict) -> Path:
        """out/previews/step-NNNNNN.png (the grid, a PIL image) and .json (its legend)."""
        path = self.out / "previews" / f"step-{step:06d}.png"
        if self.writer:
            atomic_save_image(path, grid)
            atomic_write_json(path.with_suffix(".json"), legend)
        return path

    def plot(self, plot_losses) -> None:
        if self.writer and self.log:
            plot_losses(self.log, self.out / "logs" / "loss.png")

    def _write_manifest(self) -> None:
        if self.writer:
            atomic_write_json(self.manifest_path, self.manifest)


# ---------------------------------------------------------------------------------------------------------------
# Identity and small readers


def base_model_identity(source: models.BaseModelSource) -> str:
    """Hub revision, sha256 of a single file, or sha256 over a folder's weight files (path + file hash)."""
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source.location, "model_index.json")
        return f"revision:{Path(hit).parent.name}" if isinstance(hit, str) else "revision:unknown"
    if source.kind == "single_file":
        return f"sha256:{sha256_file(source.location)}"
    import hashlib

    folder = Path(source.location)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")):
        h.update(f"{path.relative_to(folder).as_posix()}:{sha256_file(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def git_state(root: Path) -> dict | None:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."], check=False,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
