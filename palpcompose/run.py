"""A training run's lifecycle around the loop in train.py: the plan, the lock, and the record in `out/`.

    make_plan(project, ...) -> Plan   every check, nothing written: project, overrides, base model, images, the
                                      state of out/ (up to date, resumable, held by another run)
    TrainingLock(out/train.lock)      one `train` per project at a time (pid + host; a dead pid's lock is stale);
                                      outputs.py's, like every name in out/, re-exported here
    RunRecord(out, writer=...)        the only writer of out/: manifest, train.jsonl, checkpoint, snapshots,
                                      previews, final weights, loss plot. writer=False (a non-main process of a
                                      multi-process run) makes every write a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from palpcompose import distributed, models, quantize, trackers
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
from palpcompose.outputs import (  # noqa: F401 - also re-exported: palpcompose.run's names before outputs.py
    LOCK_FILE,
    MANIFEST_FILE,
    RUN_FOLDERS,
    TrainingLock,
    checkpoint_dir,
    final_dir,
    has_run,
    image_changes,
    image_hashes,
    load_manifest,
    lock_path,
    loss_plot_path,
    manifest_path,
    now,
    out_dir,
    preview_path,
    read_json,
    read_jsonl,
    run_out_dir,
    runs_dir,
    snapshot_dir,
    snapshot_steps,
    status_words,
    train_log_path,
    trained_with,
    unfinished,
)
from palpcompose.project import (
    changed_weight_settings,
    check_option,
    describe_changes,
    load_project,
    weight_settings,
)
from palpcompose.weights import TrainedWeights, save_trained_weights

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
        return final_dir(self.out)


def make_plan(project, *, steps: int | None = None, resume: bool = False, guidance: str | None = None,
              force: bool = False) -> Plan:
    """Validate everything `train` needs and decide fresh / resume / up to date. Writes nothing."""
    if not hasattr(project, "config"):
        project = load_project(project)
    config = project.config
    if guidance is not None and guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, not {guidance!r}")
    check_option("--steps", "train.steps", steps)  # the range of train.steps in palp.toml
    mode = guidance or config.palp.guidance
    trackers.check_installed(config.train.log_with, project.file)  # before any work: the pip extra it needs
    quantize.check_installed(config.train.frozen_weights, project.file)  # 8 bits: torchao (the quant extra)
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
    out = out_dir(project.root)
    source = models.resolve_base_model(config.project.base_model, project.root, config.project.allow_pickle)
    if not source.available:
        raise UserError(f"project.base_model: {source.detail}")
    plan = Plan(
        project=project, config=config, file_hashes=file_hashes, mode=mode, steps_target=steps_target, out=out,
        source=source, identity=base_model_identity(source),
        images=image_hashes(project, project.images),
        previous=None, settings=resume_settings(config),
        num_processes=num_processes,  # the launcher's prefix stays unquoted: it holds $(which palpcompose)
        resume_command=(launched or "palpcompose") + " " + command_line("train", project.root, "--resume")
        + steps_option,
        fresh_command=(launched or "palpcompose") + " " + command_line("train", project.root) + steps_option,
    )
    try:
        plan.previous = load_manifest(out)
    except DamagedFile as exc:  # --resume rewrites it from the checkpoint; --force keeps it in out/runs/
        if not (resume or force):
            raise exc.with_options(_damaged_run_options(plan, resume=True)) from None
        plan.notice = (f"note: {exc.path} is damaged ({exc.reason}); " + (
            "--resume rewrites it from the checkpoint" if resume else "--force keeps it as it is in out/runs/"))
    if not force and not resume and trained_with(plan.previous, out, config=plan.config.to_dict(), images=plan.images,
                                                 identity=plan.identity, num_processes=plan.num_processes):
        plan.up_to_date = True
        return plan
    TrainingLock(lock_path(out)).check()
    damaged, plan.notice = plan.notice, ""
    if resume:
        plan.resume_from = _resumable_checkpoint(plan, steps)
    elif has_run(out):
        _continue_or_keep(plan, force)
    plan.notice = "\n".join(text for text in (damaged, plan.notice) if text)
    if plan.resume_from is not None:
        try:
            plan.checkpoint = load_checkpoint(plan.resume_from)
            read_jsonl(train_log_path(out))
        except DamagedFile as exc:
            raise exc.with_options(_damaged_run_options(plan, resume=False)) from None
    return plan


def _damaged_run_options(plan: Plan, *, resume: bool) -> str:
    """What a user can do when a file of the run in out/ is damaged."""
    options = []
    if resume and checkpoint_folder(checkpoint_dir(plan.out)) is not None:
        options.append(f"`{plan.resume_command}` continues from the checkpoint (and rewrites the file)")
    snapshots = snapshot_steps(plan.out)
    if snapshots:
        options.append(f"`palpcompose render {plan.project.root} --snapshot {snapshots[-1]}` (or export "
                       "--snapshot) uses the last snapshot")
    options.append(f"`{plan.fresh_command} --force` starts over, keeping this run in out/runs/")
    return "Options: " + "; ".join(options)


def _continue_or_keep(plan: Plan, force: bool) -> None:
    """A run without --resume where out/ already holds one: continue it when only train.steps grew, else keep it
    by moving it to out/runs/<id>/. Sets plan.resume_from or plan.archive, and plan.notice."""
    previous, now_config = plan.previous, plan.config.to_dict()
    why = _differences(plan, previous)
    if previous is None:
        why.insert(0, f"{manifest_path(plan.out)} is missing or unreadable")
    elif previous.get("status") != "completed":
        # resumed with as many processes as that run had (another number is refused), not this run's
        here = distributed.launcher_prefix() or "palpcompose"
        there = distributed.launcher_prefix(int(previous.get("num_processes", 1))) or "palpcompose"
        resume = there + plan.resume_command.removeprefix(here)
        why.insert(0, f"it was {status_words(previous.get('status'))} at step {previous.get('steps_done', 0)} of "
                      f"{previous.get('steps_target', '?')}; to continue it instead, press Ctrl-C now (nothing has "
                      f"moved yet) and run `{resume}`")
    only_steps_grew = (previous is not None and previous.get("status") == "completed"
                       and len(why) == 1 and isinstance(previous.get("config"), dict)
                       and [k for k, _, _ in changed_weight_settings(previous["config"], now_config)] == ["train.steps"]
                       and plan.steps_target > int(previous.get("steps_done", 0)))
    if only_steps_grew and not force:
        checkpoint = checkpoint_folder(checkpoint_dir(plan.out))
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
        folder = runs_dir(out) / (stem if n == 1 else f"{stem}-{n}")
        if not folder.exists():
            return folder
    raise UserError(f"{runs_dir(out)}: could not name a folder for the earlier run ({stem}-N)")


def resume_settings(config) -> dict:
    """What a resumed run must share with the run it continues: every weight-changing setting but train.steps."""
    return weight_settings(config.to_dict(), steps=False)


def _resumable_checkpoint(plan: Plan, steps: int | None) -> Path:
    """The checkpoint `--resume` continues from, after checking it was trained with this plan's settings."""
    checkpoint = checkpoint_dir(plan.out)
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
            f"{resume_from}: the checkpoint was written by a run of {written_by} "
            f"process{'es' if written_by > 1 else ''}"
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
# The record


class DiskFull(UserError):
    """The disk of out/ filled while a run wrote a file (ENOSPC, or a quota): exit 2 with what was being written,
    the space it needs, and how to go on. Every file is written atomically, so nothing earlier is lost."""


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
        return manifest_path(self.out)

    @property
    def log_path(self) -> Path:
        return train_log_path(self.out)

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
            try:  # the manifest of the run this one continues; a damaged one is rewritten (make_plan said so)
                old = load_manifest(self.out) or {}
            except DamagedFile:
                old = {}
            self.manifest["started_at"] = old.get("started_at", self.manifest["started_at"])
            self.prior_wall = float(old.get("wall_time_s", 0.0))
            self.log = [e for e in read_jsonl(self.log_path) if e["step"] <= resumed_step]
            self.checkpoint_step = resumed_step
        self.step = self.manifest["steps_done"] = resumed_step or 0
        self._write_manifest()
        self.ours = True

    def mark(self, **fields) -> None:
        """Update this run's manifest (status, steps_done, finished_at, ...); the previous run's is left alone.
        Recording a failure is best effort: on a full disk the error that stopped the run is the one to show."""
        if self.ours:
            self.manifest.update(**fields)
            failed = fields.get("status") == "failed"
            with contextlib.suppress(OSError, DiskFull) if failed else contextlib.nullcontext():
                self._write_manifest()

    @contextlib.contextmanager
    def _writing(self, what: Path, size: int = 0):
        """Writing `what` (`size` bytes, about): a full disk becomes DiskFull, saying how to go on."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            try:
                free = f", {_size(shutil.disk_usage(self.out).free)} free"
            except OSError:
                free = ""
            need = f"about {_size(size)} needed{free}" if size else free.removeprefix(", ")
            root = self.out.parent
            target = self.manifest.get("steps_target")
            steps = ("--steps", target) if isinstance(target, int) else ()
            if self.checkpoint_step:
                then = (f"`{command_line('palpcompose', 'train', root, '--resume', *steps)}` continues from the "
                        f"checkpoint at step {self.checkpoint_step}")
            else:
                then = f"`{command_line('palpcompose', 'train', root, *steps)}` starts again (no checkpoint was " \
                       "written yet)"
            raise DiskFull(f"no space left on the disk of {self.out} while writing {what} ({need}); free some "
                           f"space, then {then}") from None

    def _write(self, what: Path, write, size: int = 0) -> None:
        with self._writing(what, size):
            write()

    def wall_time(self, elapsed: float) -> float:
        return round(self.prior_wall + elapsed, 3)

    def checkpoint(self, ckpt: Checkpoint, status: str, elapsed: float) -> None:
        """The checkpoint, the log so far and the manifest: what a resume continues from."""
        if self.writer:
            size = _nbytes(ckpt.weights) + sum(v.numel() * v.element_size()
                                               for entry in ckpt.optimizer["state"].values() for v in entry.values())
            self._write(checkpoint_dir(self.out), lambda: save_checkpoint(checkpoint_dir(self.out), ckpt), size)
            self._write(self.log_path, lambda: atomic_write_text(self.log_path, "".join(json.dumps(e) + "\n"
                                                                                        for e in self.log)))
        self.checkpoint_step = ckpt.step
        self.mark(status=status, steps_done=ckpt.step, wall_time_s=self.wall_time(elapsed))

    def snapshot(self, step: int, weights: TrainedWeights) -> Path:
        folder = snapshot_dir(self.out, step)
        if self.writer:
            self._write(folder, lambda: save_trained_weights(folder, weights), _nbytes(weights))
        self.last_snapshot = folder
        return folder

    def final(self, weights: TrainedWeights) -> Path:
        folder = final_dir(self.out)
        if self.writer:
            self._write(folder, lambda: save_trained_weights(folder, weights), _nbytes(weights))
        return folder

    def preview(self, step: int, grid, legend: dict) -> Path:
        """out/previews/step-NNNNNN.png (the grid, a PIL image) and .json (its legend)."""
        path = preview_path(self.out, step)
        if self.writer:
            self._write(path, lambda: (atomic_save_image(path, grid), atomic_write_json(path.with_suffix(".json"),
                                                                                        legend)))
        return path

    def plot(self, plot_losses) -> None:
        if self.writer and self.log:
            self._write(loss_plot_path(self.out), lambda: plot_losses(self.log, loss_plot_path(self.out)))

    def _write_manifest(self) -> None:
        if self.writer:
            self._write(self.manifest_path, lambda: atomic_write_json(self.manifest_path, self.manifest))


def _size(n: int) -> str:
    """'3.2 MB', '41 KB'."""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{max(n, 1000) / 1e3:.0f} KB"


def _nbytes(weights: TrainedWeights) -> int:
    """The size of a weights folder's two files, about (fp32 tensors)."""
    return sum(v.numel() * 4 for part in (weights.lora, weights.embeddings) for v in part.values())


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
