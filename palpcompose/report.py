"""`palpcompose report DIR`: one self-contained page, DIR/out/report.html, to look at a project's training runs.

The page holds the current run and the runs kept in out/runs/<id>/ side by side (the settings that differ between
them, their loss terms and gradient balance per step as inline SVG plots), each run's preview and x0-hat grids per
step and its snapshots, and every render folder with its contact sheet and eval scores per subject. Images are
embedded as data: URIs (large ones downscaled) and link to the full-size file by a relative path; there is no script
and nothing is fetched (a Content-Security-Policy forbids it), so the page opens in any browser, offline, from a
copied folder.

    gather(root) -> Report        read out/ (nothing written); UserError when there is nothing to report
    write_report(root) -> Result  gather + the HTML, written atomically to out/report.html
    report_parts.py               the generic pieces: SVG plots, data: URI images, style sheet, CSP

Damaged files (not JSON, wrong field types, unreadable images) are named in the page and skipped; only a damaged
out/manifest.json of the current run stops the command (exit 2), as it does for render and export.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from palpcompose import __version__
from palpcompose.errors import DamagedFile, UserError, command_line
from palpcompose.fsutil import atomic_write_text, os_error_text

# The readers of out/ (one import line: they are moving to palpcompose.outputs).
from palpcompose.outputs import (
    LOCK_FILE,
    MANIFEST_FIELDS,
    MANIFEST_FILE,
    RENDER_INDEX_FILE,
    RENDERS_DIR,
    TrainingLock,
    eval_path,
    field_problem,
    final_dir,
    previews_dir,
    read_json,
    read_jsonl,
    renders_dir,
    runs_dir,
    snapshots_dir,
    train_log_path,
)
from palpcompose.report_parts import CSP, STYLE, finite, fmt, image_data_uri, svg_plot

REPORT_FILE = "report.html"
MAX_PREVIEW_PX = 1024  # longest side of an embedded preview grid or contact sheet; larger ones are downscaled
MAX_IMAGE_PX = 512  # longest side of an embedded single render
MAX_LOOSE_IMAGES = 24  # a render folder without a contact sheet shows at most this many of its images

LOG_TERMS = (  # (key or (numerator, denominator), title, what it is)
    ("loss_pers", "loss_pers", "personalization loss (denoising the reference images)"),
    ("loss_align", "loss_align", "PALP alignment term (score sampling towards the clean prompt)"),
    ("grad_pers", "grad_pers", "||d loss_pers / d prediction||"),
    ("grad_align", "grad_align", "||d (weight x loss_align) / d prediction||"),
    (("grad_align", "grad_pers"), "gradient balance", "grad_align / grad_pers (1: the two terms pull equally hard)"),
    ("guidance_norm", "guidance_norm", "RMS of the guidance direction r"),
    ("lr", "learning rate", "LoRA learning rate"),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


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


@dataclass
class ReportResult:
    path: Path
    runs: int
    renders: int
    images: int
    size: int
    damaged: list[tuple[Path, str]]


# ---------------------------------------------------------------------------------------------------------------
# Reading out/ (nothing is written)


def gather(root: Path) -> Report:
    """Everything the page shows, read from DIR/out/. UserError when DIR is no project or holds nothing to show."""
    root = Path(root)
    _check_project_folder(root)
    out = root / "out"
    train_first = f"train first: `{command_line('palpcompose', 'train', root)}`"
    if not out.is_dir():
        what = "is not a folder" if out.exists() else "does not exist yet"
        raise UserError(f"{out} {what}: there is nothing to report; {train_first}")
    damaged: list[tuple[Path, str]] = []
    runs: list[RunView] = []
    if (out / MANIFEST_FILE).exists() or (out / MANIFEST_FILE).is_symlink():
        if _not_a_file(out / MANIFEST_FILE, damaged):
            path, reason = damaged.pop()
            raise DamagedFile(path, reason, f"move it away; `{command_line('palpcompose', 'train', root, '--resume')}`"
                              " rewrites it from the checkpoint")
        try:
            manifest = read_json(out / MANIFEST_FILE, strict=True)
        except DamagedFile as exc:
            raise exc.with_options(
                f"`{command_line('palpcompose', 'train', root, '--resume')}` rewrites it from the checkpoint, or "
                f"`{command_line('palpcompose', 'train', root, '--force')}` starts a new run (this one is kept in "
                "out/runs/)") from None
        runs.append(_read_run("current", out, manifest, damaged))
    kept = sorted((p for p in runs_dir(out).iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True) \
        if runs_dir(out).is_dir() else []
    for folder in kept:
        runs.append(_read_run(folder.name, folder, _read_json(folder / MANIFEST_FILE, damaged), damaged))
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
    toml = root / "palp.toml"
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
    path = folder / MANIFEST_FILE
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
    for png in sorted(previews_dir(folder).glob("step-*.png")):
        step = _step_of(png.stem)
        if step is not None:
            legend = _read_json(png.with_suffix(".json"), damaged)
            run.previews.append(Preview(step, png, legend))
    for snap in sorted(snapshots_dir(folder).glob("step-*")):
        step = _step_of(snap.name)
        if step is not None and snap.is_dir():
            run.snapshots.append((step, snap))
    final = final_dir(folder)
    run.final = final if (final / "lora.safetensors").is_file() else None
    if run_id == "current" and (folder / LOCK_FILE).exists():
        try:
            run.live = TrainingLock(folder / LOCK_FILE).holder()
        except UserError as exc:  # a folder, or a pid that is no process id: the page names it
            damaged.append((folder / LOCK_FILE, str(exc)))
    return run


def _step_of(name: str) -> int | None:
    digits = name.removeprefix("step-")
    return int(digits) if digits.isdigit() else None


def _render_folders(out: Path) -> list[Path]:
    folders = [p for p in sorted(renders_dir(out).glob("*")) if p.is_dir()]
    for kept in sorted(runs_dir(out).glob(f"*/{RENDERS_DIR}")):
        folders += [p for p in sorted(kept.glob("*")) if p.is_dir()]
    return folders


def _read_render(out: Path, folder: Path, damaged: list) -> RenderView:
    info = _read_json(folder / RENDER_INDEX_FILE, damaged) or {}
    evaluation = _read_json(eval_path(folder), damaged)
    sheet = folder / "contact-sheet.png"
    images = sorted(p for p in folder.glob("*.png") if p.name != sheet.name)
    name = folder.relative_to(out).as_posix().removeprefix("renders/")
    return RenderView(name, folder, info, evaluation, sheet if sheet.is_file() else None, images)


# ---------------------------------------------------------------------------------------------------------------
# The settings that differ between runs


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat = {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def run_settings(run: RunView) -> dict[str, object]:
    """The settings of a run as flat `table.key` names: the resolved config and what else decides its weights."""
    m = run.manifest
    flat = _flatten(m.get("config", {}))
    flat["guidance (run)"] = m.get("guidance")
    flat["base model identity"] = (m.get("base_model") or {}).get("identity")
    flat["processes"] = m.get("num_processes")
    images = m.get("images")
    if isinstance(images, dict):
        digest = json.dumps(sorted(images.items()), default=str)
        import hashlib

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
        values = [s.get(name, _MISSING) if r.manifest else _UNKNOWN for s, r in zip(settings, runs, strict=True)]
        seen = {json.dumps(v, sort_keys=True, default=str) for v, r in zip(values, runs, strict=True) if r.manifest}
        if len(seen) > 1:
            rows.append((name, values))
    return rows


class _Marker:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


_MISSING = _Marker("(not set)")
_UNKNOWN = _Marker("(unknown)")


# ---------------------------------------------------------------------------------------------------------------
# Plots (inline SVG) and images (data: URIs)


def series_of(log: list[dict], term) -> list[tuple[int, float | None]]:
    """(step, value) per log entry; a ratio term is (numerator, denominator). Missing or non-finite: None."""
    points = []
    for entry in log:
        if isinstance(term, tuple):
            num, den = finite(entry.get(term[0])), finite(entry.get(term[1]))
            value = num / den if num is not None and den else None
        else:
            value = finite(entry.get(term))
        points.append((entry["step"], value))
    return points


# ---------------------------------------------------------------------------------------------------------------
# The page


class _Page:
    """Collects the HTML and counts the embedded images."""

    def __init__(self, report: Report):
        self.report = report
        self.parts: list[str] = []
        self.images = 0

    def add(self, *text: str) -> None:
        self.parts.extend(text)

    def link(self, path: Path) -> str:
        """A relative link from out/report.html to `path` (an absolute-free href that works from a copied folder)."""
        try:
            return html.escape(path.relative_to(self.report.out).as_posix(), quote=True)
        except ValueError:
            return ""

    def image(self, path: Path, caption: str, max_px: int, alt: str = "") -> str:
        from PIL import Image

        try:
            if not path.is_file():  # a FIFO would block the read
                raise ValueError("not a regular file")
            uri, w, h = image_data_uri(path, max_px)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            # an unreadable image (truncated, not an image, a decompression bomb): named in the page, not fatal
            self.report.damaged.append((path, f"not a readable image ({type(exc).__name__}: {str(exc)[:80]})"))
            return (f'<figure><div class="damaged">{html.escape(path.name)}: not a readable image</div>'
                    f'<figcaption>{caption}</figcaption></figure>')
        self.images += 1
        pixelated = ' class="px"' if max(w, h) < 256 else ""
        shown = f' style="width:{min(4 * w, 256)}px"' if max(w, h) < 128 else ""
        href = self.link(path)
        img = (f'<img src="{uri}" width="{w}" height="{h}"{pixelated}{shown} '
               f'alt="{html.escape(alt or path.name, quote=True)}">')
        if href:
            img = f'<a href="{href}" title="open the full-size file">{img}</a>'
        return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _value(value) -> str:
    if isinstance(value, _Marker):
        return f'<span class="muted">{html.escape(value.text)}</span>'
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return html.escape(text)


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def _status(run: RunView) -> str:
    status = run.manifest.get("status", "unknown")
    if run.live is not None:
        status = "running"
    elif status == "running":
        status = "interrupted"
    return f'<span class="badge {html.escape(status)}">{html.escape(status)}</span>'


def _steps(run: RunView) -> str:
    done, target = run.manifest.get("steps_done"), run.manifest.get("steps_target")
    return f"{'?' if done is None else done} / {'?' if target is None else target}"


def _last_mean(run: RunView, key: str) -> str:
    values = [v for _, v in series_of(run.log, key) if v is not None]
    if not values:
        return ""
    n = max(1, min(50, len(values) // 4))
    return f"{fmt(sum(values[-n:]) / n)} (last {n})"


def _runs_section(page: _Page, runs: list[RunView], colors: dict[str, str]) -> None:
    page.add("<h2>Runs side by side</h2>")
    rows = [
        ("status", lambda r: _status(r)),
        ("guidance", lambda r: _value(r.manifest.get("guidance", _UNKNOWN))),
        ("steps done / target", lambda r: html.escape(_steps(r))),
        ("started", lambda r: _value(r.manifest.get("started_at", _UNKNOWN))),
        ("finished", lambda r: _value(r.manifest.get("finished_at") or _MISSING)),
        ("wall time", lambda r: _value(f"{r.manifest['wall_time_s']:.1f} s" if "wall_time_s" in r.manifest
                                       else _UNKNOWN)),
        ("device", lambda r: _value(r.manifest.get("device", _UNKNOWN))),
        ("base model", lambda r: _value((r.manifest.get("base_model") or {}).get("spec", _UNKNOWN))),
        ("loss_pers", lambda r: html.escape(_last_mean(r, "loss_pers"))),
        ("loss_align", lambda r: html.escape(_last_mean(r, "loss_align"))),
        ("previews / snapshots", lambda r: f"{len(r.previews)} / {len(r.snapshots)}"),
        ("final weights", lambda r: "yes" if r.final else '<span class="muted">no</span>'),
    ]
    page.add("<table><tr><th></th>")
    for run in runs:
        page.add(f'<th>{_swatch(colors[run.id])}<a href="#run-{html.escape(run.id, quote=True)}">'
                 f"{html.escape(run.title)}</a></th>")
    page.add("</tr>")
    for name, cell in rows:
        page.add(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{cell(r)}</td>" for r in runs) + "</tr>")
    page.add("</table>")

    differing = differing_settings(runs)
    if len(runs) > 1:
        page.add("<h3>Settings that differ</h3>")
        if differing:
            page.add("<table><tr><th>setting</th>" + "".join(
                f"<th>{_swatch(colors[r.id])}{html.escape(r.id)}</th>" for r in runs) + "</tr>")
            for name, values in differing:
                page.add(f"<tr><th><code>{html.escape(name)}</code></th>" +
                         "".join(f"<td>{_value(v)}</td>" for v in values) + "</tr>")
            page.add("</table>")
        else:
            page.add('<p class="muted">The runs were trained with the same settings.</p>')
    for run in runs:
        if run.manifest.get("config"):
            page.add(f"<details><summary>resolved settings of {html.escape(run.title)}</summary><table>")
            for name, value in _flatten(run.manifest["config"]).items():
                page.add(f"<tr><th><code>{html.escape(name)}</code></th><td>{_value(value)}</td></tr>")
            page.add("</table></details>")

    page.add("<h3>Loss terms and gradient balance per step</h3>")
    logged = [r for r in runs if r.log]
    if not logged:
        page.add('<p class="muted">No training log yet (logs/train.jsonl).</p>')
        return
    page.add('<div class="plots">')
    for term, title, note in LOG_TERMS:
        series = [(r.title, colors[r.id], series_of(r.log, term)) for r in logged]
        if any(v is not None for _, _, pts in series for _, v in pts):
            page.add(svg_plot(title, note, series, reference=1.0 if isinstance(term, tuple) else None))
    page.add("</div>")


def _run_section(page: _Page, run: RunView, color: str) -> None:
    page.add(f'<section class="run" id="run-{html.escape(run.id, quote=True)}" style="border-color:{color}">'
             f"<h2>{html.escape(run.title)} {_status(run)}</h2>")
    if run.live is not None:
        page.add(f"<p>Training in progress: pid {_value(run.live.get('pid'))} on {_value(run.live.get('host'))}, "
                 f"started {_value(run.live.get('started_at'))}. This page shows the state when it was written.</p>")
    tokens = run.manifest.get("tokens") or {}
    if tokens:
        page.add("<p>Tokens: " + ", ".join(f"<code>[{html.escape(str(k))}]</code> = <code>{html.escape(str(v))}"
                                           "</code>" for k, v in tokens.items()) + "</p>")
    page.add("<h3>Previews and the x0-hat diagnostic per step</h3>")
    if run.previews:
        legend = next((p.legend for p in reversed(run.previews) if p.legend), None)
        rows = legend.get("rows") if isinstance(legend, dict) else None
        if isinstance(rows, list):
            page.add('<p class="muted">Rows, top to bottom:</p><ol class="legend">' + "".join(
                f"<li><b>{html.escape(str(row[0]))}</b>: {html.escape(str(row[1]))}</li>" for row in rows
                if isinstance(row, list) and len(row) == 2) + "</ol>")
            seeds = legend.get("seeds")
            if isinstance(seeds, list):
                page.add(f'<p class="muted">Columns: seeds {html.escape(", ".join(map(str, seeds)))}</p>')
        page.add('<div class="strip">')
        for preview in run.previews:
            page.add(page.image(preview.path, f"step {preview.step}", MAX_PREVIEW_PX, f"preview at step {preview.step}"))
        page.add("</div>")
    else:
        page.add('<p class="muted">No previews (train.preview_every = 0, or none written yet).</p>')
    page.add("<h3>Snapshots</h3>")
    if run.snapshots:
        page.add("<table><tr><th>step</th><th>folder</th><th>size</th></tr>")
        for step, folder in run.snapshots:
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())
            page.add(f'<tr><td class="num">{step}</td><td><a href="{page.link(folder)}">'
                     f"{html.escape(page.link(folder))}</a></td><td class=\"num\">{size / 1e6:.2f} MB</td></tr>")
        page.add("</table>")
    else:
        page.add('<p class="muted">No snapshots.</p>')
    if run.final:
        page.add(f'<p>Final weights: <a href="{page.link(run.final)}">{html.escape(page.link(run.final))}</a></p>')
    page.add("</section>")


def _eval_table(data: dict) -> str:
    models = data.get("models")
    subjects = data.get("subjects") if isinstance(data.get("subjects"), dict) else {}
    if not isinstance(models, dict) or not models:
        return '<p class="damaged">eval.json has no scores per set of weights</p>'
    keys = list(subjects)
    head = "".join(f"<th>[{html.escape(str(k))}] {html.escape(str((subjects[k] or {}).get('class_name', '')))}"
                   "</th>" for k in keys)
    out = [(f"<table><tr><th>weights</th><th>guidance</th><th>images</th><th>text alignment</th>"
            f"<th>subject fidelity</th>{head}</tr>")]
    for label, row in models.items():
        if not isinstance(row, dict):
            continue
        per_subject = row.get("subjects") if isinstance(row.get("subjects"), dict) else {}
        cells = [_num(row.get("text_alignment")), _num(row.get("subject_fidelity"))]
        cells += [_num(per_subject.get(k)) for k in keys]
        out.append(f"<tr><th>{html.escape(str(label))}</th><td>{_value(row.get('guidance') or 'base')}</td>"
                   f'<td class="num">{_value(row.get("images", ""))}</td>' +
                   "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>")
    out.append("</table>")
    metric = data.get("metric")
    how = "; ".join(f"[{k}] {v.get('scored_as')}" for k, v in subjects.items() if isinstance(v, dict))
    out.append(f'<p class="muted">metric: {html.escape(str(metric))}' + (f"; {html.escape(how)}" if how else "") +
               "</p>")
    return "".join(out)


def _num(value) -> str:
    value = finite(value)
    return "" if value is None else f"{value:.3f}"


def _render_section(page: _Page, renders: list[RenderView], runs: list[RunView], latest: dict | None) -> None:
    page.add("<h2>Renders and eval scores</h2>")
    if not renders:
        page.add(f'<p class="muted">No renders yet: `{html.escape(command_line("palpcompose", "render", page.report.root))}`'
                 "</p>")
    started = {r.manifest.get("started_at"): r for r in runs if r.manifest.get("started_at")}
    for view in renders:
        info = view.info
        training = info.get("training") if isinstance(info.get("training"), dict) else {}
        source = started.get(training.get("started_at"))
        labels = list(dict.fromkeys(str(i.get("model")) for i in info.get("images", []) if isinstance(i, dict)))
        kind = "sweep" if sum(label != "base" for label in labels) > 1 else \
            "comparison with the base model" if "base" in labels and len(labels) > 1 else \
            "base model" if labels == ["base"] else "render"
        if source is not None:
            weights = html.escape(source.title)
        elif labels == ["base"]:
            weights = "the base model"
        else:
            weights = f"a run started {_value(training.get('started_at', _UNKNOWN))} (no longer in out/)"
        page.add(f'<h3 id="render-{html.escape(view.name, quote=True)}">{html.escape(view.name)} '
                 f'<span class="badge">{html.escape(kind)}</span></h3>')
        settings = info.get("settings") if isinstance(info.get("settings"), dict) else {}
        prompts = info.get("prompts") if isinstance(info.get("prompts"), list) else []
        page.add(f"<p>Weights: {weights}" + (f", {html.escape(', '.join(labels))}" if labels else "") +
                 (f"; {html.escape(str(training.get('guidance')))} guidance, {_value(training.get('steps_done'))} "
                  "steps" if training else "") + "</p>")
        if prompts:
            page.add("<ol class=\"legend\">" + "".join(f"<li>{html.escape(str(p))}</li>" for p in prompts) + "</ol>")
        if settings:
            page.add('<p class="muted">' + html.escape(", ".join(f"{k} {v}" for k, v in settings.items())) + "</p>")
        page.add('<div class="renders">')
        if view.sheet:
            page.add(page.image(view.sheet, "contact sheet", MAX_PREVIEW_PX, f"contact sheet of {view.name}"))
        else:
            page.add('<div class="strip">')
            for path in view.images[:MAX_LOOSE_IMAGES]:
                page.add(page.image(path, html.escape(path.stem), MAX_IMAGE_PX))
            page.add("</div>")
            if len(view.images) > MAX_LOOSE_IMAGES:
                page.add(f'<p class="muted">and {len(view.images) - MAX_LOOSE_IMAGES} more in '
                         f'<a href="{page.link(view.folder)}">{html.escape(page.link(view.folder))}</a></p>')
        page.add("</div>")
        if view.eval is not None:
            page.add("<p><b>eval</b> (eval.json)</p>" + _eval_table(view.eval))
    if latest is not None:
        page.add(f"<h3>Latest eval (out/eval.json) of {html.escape(str(latest.get('renders')))}</h3>"
                 + _eval_table(latest))


def build_html(report: Report) -> tuple[str, int]:
    """The page and the number of images it embeds."""
    page = _Page(report)
    colors = {run.id: COLORS[n % len(COLORS)] for n, run in enumerate(report.runs)}
    name = next((r.manifest["config"].get("project", {}).get("name") for r in report.runs
                 if isinstance(r.manifest.get("config", {}).get("project"), dict)), None) or report.root.name
    written = datetime.now(UTC).isoformat(timespec="seconds")
    page.add("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(str(name))}: palpcompose report</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(str(name))}</h1>",
             f'<p class="muted">{html.escape(str(report.root.resolve()))}: {len(report.runs)} training run(s), '
             f"{len(report.renders)} render folder(s). Written {html.escape(written)} by palpcompose {__version__}; "
             f"rewrite it with <code>{html.escape(command_line('palpcompose', 'report', report.root))}</code>.</p>")
    body_start = len(page.parts)
    if report.runs:
        _runs_section(page, report.runs, colors)
        for run in report.runs:
            _run_section(page, run, colors[run.id])
    else:
        page.add('<p class="muted">No training run yet.</p>')
    _render_section(page, report.renders, report.runs, report.latest_eval)
    if report.damaged:  # also collects the images found unreadable while the page was built
        notes = [("<h2 class=\"damaged\">Damaged files</h2><p>These files could not be read (or hold fields of "
                  "the wrong type); what they hold is not shown:</p><ul>")]
        notes += [f"<li class=\"damaged\"><code>{html.escape(page.link(path) or str(path))}</code>: "
                  f"{html.escape(reason)}</li>" for path, reason in report.damaged]
        notes.append("</ul>")
        page.parts[body_start:body_start] = notes
    page.add("</body></html>\n")
    return "".join(page.parts), page.images


def write_report(root: Path) -> ReportResult:
    """Read DIR/out/ and write DIR/out/report.html atomically (the only file written)."""
    report = gather(Path(root))
    text, images = build_html(report)
    path = report.out / REPORT_FILE
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise UserError(f"{path}: could not write the report ({os_error_text(exc)}); make {report.out} writable "
                        "or free some space") from None
    return ReportResult(path, len(report.runs), len(report.renders), images, len(text.encode()), report.damaged)
