"""What `palpcompose report` shows, read from a project's out/ (nothing is written): the runs (the current one and
those kept in out/runs/<id>/) with their manifests, logs, previews and snapshots; the render folders with their
eval scores; the settings that differ between runs. report.py builds the page from it.

    gather(root) -> Report   UserError when DIR is no project or holds nothing to show; a damaged
                             out/manifest.json of the current run stops it (DamagedFile), as for render and export

Any other damaged file (not JSON, wrong field types, a FIFO or folder in a file's place) is listed in
`Report.damaged` and skipped; a FIFO is never opened.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from palpcompose.errors import DamagedFile, UserError, command_line
from palpcompose.fsutil import os_error_text
from palpcompose.outputs import (
    CONTACT_SHEET_FILE,
    MANIFEST_FIELDS,
    RENDER_INDEX_FILE,
    RENDERS_DIR,
    TrainingLock,
    eval_path,
    field_problem,
    final_dir,
    lock_path,
    manifest_path,
    out_dir,
    previews_dir,
    read_json,
    read_jsonl,
    renders_dir,
    runs_dir,
    snapshots_dir,
    step_of,
    train_log_path,
)
from palpcompose.project import PROJECT_FILE
from palpcompose.weights import LORA_FILE


@dataclass
class Preview:
    step: int
    path: Path
    legend: dict | None


@dataclass
class RunView:
    """One training run: the current one in out/, or a kept one in out/runs/<id>/."""

    id: str  # "current" or the kept folder's name
    folder: Path
    manifest: dict = field(default_factory=dict)  # only the fields of the expected types
    log: list[dict] = field(default_factory=list)
    previews: list[Preview] = field(default_factory=list)
    snapshots: list[tuple[int, Path]] = field(default_factory=list)
    final: Path | None = None
    live: dict | None = None  # the training lock's holder while a train runs

    @property
    def title(self) -> str:
        return "current run (out/)" if self.id == "current" else f"kept run {self.id}"


@dataclass
class RenderView:
    name: str
    folder: Path
    info: dict  # render.json
    eval: dict | None  # the folder's eval.json
    sheet: Path | None
    images: list[Path]


@dataclass
class Report:
    root: Path
    out: Path
    runs: list[RunView]
    renders: list[RenderView]
    latest_eval: dict | None  # out/eval.json when its render folder is not one of `renders`
    damaged: list[tuple[Path, str]]


# ---------------------------------------------------------------------------------------------------------------
# Reading out/ (nothing is written)


def gather(root: Path) -> Report:
    """Everything the page shows, read from DIR/out/. UserError when DIR is no project or holds nothing to show."""
    root = Path(root)
    _check_project_folder(root)
    out = out_dir(root)
    train_first = f"train first: `{command_line('palpcompose', 'train', root)}`"
    if not out.is_dir():
        what = "is not a folder" if out.exists() else "does not exist yet"
        raise UserError(f"{out} {what}: there is nothing to report; {train_first}")
    damaged: list[tuple[Path, str]] = []
    runs: list[RunView] = []
    if manifest_path(out).exists() or manifest_path(out).is_symlink():
        if _not_a_file(manifest_path(out), damaged):
            path, reason = damaged.pop()
            raise DamagedFile(path, reason, f"move it away; `{command_line('palpcompose', 'train', root, '--resume')}`"
                              " rewrites it from the checkpoint")
        try:
            manifest = read_json(manifest_path(out), strict=True)
        except DamagedFile as exc:
            raise exc.with_options(
                f"`{command_line('palpcompose', 'train', root, '--resume')}` rewrites it from the checkpoint, or "
                f"`{command_line('palpcompose', 'train', root, '--force')}` starts a new run (this one is kept in "
                "out/runs/)") from None
        runs.append(_read_run("current", out, manifest, damaged))
    kept = sorted((p for p in runs_dir(out).iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True) \
        if runs_dir(out).is_dir() else []
    for folder in kept:
        runs.append(_read_run(folder.name, folder, _read_json(manifest_path(folder), damaged), damaged))
    renders = [_read_render(out, folder, damaged) for folder in _render_folders(out)]
    if not runs and not renders:
        raise UserError(f"{out} holds no training run and no renders: there is nothing to report; {train_first}")
    latest = _read_json(eval_path(out), damaged)
    # shown with its render folder (matched by its place in out/: the project may have been moved since)
    scored = str((latest or {}).get("renders")).rpartition("/out/")[2]
    if latest is not None and any(r.folder.relative_to(out).as_posix() == scored for r in renders):
        latest = None
    return Report(root, out, runs, renders, latest, damaged)


def _check_project_folder(root: Path) -> None:
    init = f"create a project with `{command_line('palpcompose', 'init', root)}`"
    if not root.exists():
        raise UserError(f"{root}: no such folder; give a project folder (the one holding palp.toml)")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a project folder; give the folder holding palp.toml")
    toml = root / PROJECT_FILE
    if not toml.exists() and not toml.is_symlink():
        raise UserError(f"{root} is not a palpcompose project (it has no palp.toml); {init}, or give the folder "
                        "holding palp.toml")
    if not toml.is_file():
        kind = "a folder" if toml.is_dir() else "a broken link" if not toml.exists() else "not a regular file"
        raise UserError(f"{toml} is {kind}; a project's palp.toml must be a regular file")


def _read_json(path: Path, damaged: list) -> dict | None:
    """A JSON object, or None when missing; a damaged file is recorded in `damaged` (and None). A FIFO or folder
    in its place is damaged too, and never opened (reading a FIFO would block)."""
    if _not_a_file(path, damaged):
        return None
    try:
        return read_json(path, strict=True)
    except DamagedFile as exc:
        damaged.append((path, exc.reason))
        return None


def _not_a_file(path: Path, damaged: list) -> bool:
    """True (and recorded as damaged) when something that is not a regular file stands at `path`."""
    if path.is_symlink() and not path.exists():
        damaged.append((path, "a broken link"))
        return True
    if path.exists() and not path.is_file():
        damaged.append((path, "a folder, not a file" if path.is_dir() else "not a regular file (a FIFO or device)"))
        return True
    return False


def _read_run(run_id: str, folder: Path, manifest: dict | None, damaged: list) -> RunView:
    run = RunView(run_id, folder)
    path = manifest_path(folder)
    if manifest is None and not path.exists():
        damaged.append((path, "missing: the run's settings are unknown"))
    for key, value in (manifest or {}).items():
        problem = field_problem(key, value, MANIFEST_FIELDS[key]) if key in MANIFEST_FIELDS else None
        if problem is None:
            run.manifest[key] = value
        else:  # the field named as damaged in the page (the types: outputs.MANIFEST_FIELDS, checked by every reader)
            damaged.append((path, f"field {problem}; not shown"))
    try:
        if not _not_a_file(train_log_path(folder), damaged):
            run.log = read_jsonl(train_log_path(folder))
    except DamagedFile as exc:
        damaged.append((exc.path, exc.reason + "; the curves are not shown"))
    except OSError as exc:
        damaged.append((train_log_path(folder), os_error_text(exc)))
    for png in sorted(previews_dir(folder).glob("*.png")):
        step = step_of(png.stem)
        if step is not None:
            legend = _read_json(png.with_suffix(".json"), damaged)
            run.previews.append(Preview(step, png, legend))
    for snap in sorted(snapshots_dir(folder).glob("*")):
        step = step_of(snap.name)
        if step is not None and snap.is_dir():
            run.snapshots.append((step, snap))
    final = final_dir(folder)
    run.final = final if (final / LORA_FILE).is_file() else None
    if run_id == "current" and lock_path(folder).exists():
        try:
            run.live = TrainingLock(lock_path(folder)).holder()
        except (TypeError, ValueError, AttributeError):
            damaged.append((lock_path(folder), "not a lock of palpcompose (pid, host, started_at)"))
    return run


def _render_folders(out: Path) -> list[Path]:
    folders = [p for p in sorted(renders_dir(out).glob("*")) if p.is_dir()]
    for kept in sorted(runs_dir(out).glob(f"*/{RENDERS_DIR}")):
        folders += [p for p in sorted(kept.glob("*")) if p.is_dir()]
    return folders


def _read_render(out: Path, folder: Path, damaged: list) -> RenderView:
    info = _read_json(folder / RENDER_INDEX_FILE, damaged) or {}
    evaluation = _read_json(eval_path(folder), damaged)
    sheet = folder / CONTACT_SHEET_FILE
    images = sorted(p for p in folder.glob("*.png") if p.name != sheet.name)
    name = folder.relative_to(out).as_posix().removeprefix(f"{RENDERS_DIR}/")
    return RenderView(name, folder, info, evaluation, sheet if sheet.is_file() else None, images)


# ---------------------------------------------------------------------------------------------------------------
# The settings that differ between runs


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{"train": {"steps": 2}} -> {"train.steps": 2}."""
    if isinstance(value, dict):
        flat = {}
        for key, sub in value.items():
            flat.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def run_settings(run: RunView) -> dict[str, object]:
    """The settings of a run as flat `table.key` names: the resolved config and what else decides its weights."""
    m = run.manifest
    flat = flatten(m.get("config", {}))
    flat["guidance (run)"] = m.get("guidance")
    flat["base model identity"] = (m.get("base_model") or {}).get("identity")
    flat["processes"] = m.get("num_processes")
    images = m.get("images")
    if isinstance(images, dict):
        digest = json.dumps(sorted(images.items()), default=str)
        flat["reference images"] = f"{len(images)} images, sha256 {hashlib.sha256(digest.encode()).hexdigest()[:12]}"
    return flat


def differing_settings(runs: list[RunView]) -> list[tuple[str, list[object]]]:
    """(name, [value per run]) for each setting whose value is not the same in every run with a manifest."""
    known = [r for r in runs if r.manifest]
    if len(known) < 2:
        return []
    settings = [run_settings(r) for r in runs]
    names = sorted({name for s, r in zip(settings, runs, strict=True) if r.manifest for name in s})
    rows = []
    for name in names:
        values = [s.get(name, MISSING) if r.manifest else UNKNOWN for s, r in zip(settings, runs, strict=True)]
        seen = {json.dumps(v, sort_keys=True, default=str) for v, r in zip(values, runs, strict=True) if r.manifest}
        if len(seen) > 1:
            rows.append((name, values))
    return rows


class Marker:
    """A table cell's placeholder for a value a run does not have: MISSING (not set) or UNKNOWN (no manifest)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


MISSING = Marker("(not set)")
UNKNOWN = Marker("(unknown)")
