"""What palp.toml points at: the base model and the reference images, checked for `load_project` and `check`.

Each `images` entry (a file, a folder or a glob, relative to the project folder) is expanded and every image is
opened in full (palpcompose.images); problems (missing, outside the folder, duplicated, unreadable, HEIC) are
recorded on the Validator with the entry's key, and conversions and small images become notes. Each image's size
is recorded (aspect-ratio buckets), and its caption file, if any, read and checked (`_check_caption`).
"""

from __future__ import annotations

import difflib
import glob
import hashlib
from pathlib import Path
from typing import Any

from palpcompose.captions import CaptionError, caption_path, read_caption
from palpcompose.errors import Problem, UserError
from palpcompose.images import heic_fix, is_heic_name, is_image_name, open_reference_image
from palpcompose.models import FAMILY_NAMES, family_of, model_defaults, resolve_base_model, source_size_alignment
from palpcompose.placeholders import PLACEHOLDER, placeholder_problems
from palpcompose.project.schema import Project, SubjectConfig
from palpcompose.project.validation import Validator


def listed_images(project: Project) -> dict[str, tuple[Path, ...]]:
    """Every subject's image files: project.images, or, for a project loaded without checking its images (render,
    export), the files its `images` entries name now, not opened (what render compares with the manifest)."""
    if project.images:
        return project.images
    v = Validator(project.file, b"")  # problems are `check`'s and `train`'s to report
    return {key: tuple(sorted({path for entry in subject.images
                               for path in _expand_entry(v, project.root, f"subjects.{key}.images", entry)}))
            for key, subject in project.config.subjects.items()}


def check_base_model(v: Validator, spec: str, allow_pickle: bool):
    """The base model's BaseModelSource, or None (with a problem recorded) when it cannot be one."""
    try:
        source = resolve_base_model(spec, v.file.parent, allow_pickle)
    except UserError as exc:
        v.problem("project.base_model", str(exc))  # its message says what base_model may be
        return None
    v.base_model = source
    if source.kind == "builtin" and not source.available:  # a broken installation, not a network question
        v.problem("project.base_model", source.detail, "reinstall palpcompose (pip install -e . in a clone)")
        return None
    return source


def check_sizes(v: Validator, source) -> None:
    """The image sides palp.toml gives (train.resolution, render.width, render.height) that the base model cannot
    take: each must be a multiple of its family's step (models.source_size_alignment: 16 for Flux.1 and SD 3),
    which the schema's multiple of 8 does not make sure of. A side that failed the schema's check is said again
    with the model's step, so the values suggested are ones it takes."""
    alignment, why = source_size_alignment(source)
    for key, value in v.sizes.items():
        if value % alignment == 0 or alignment == 8:  # 8: the schema's own check said it
            continue
        v.problems = [p for p in v.problems if p.key != key]
        message, hint = size_problem(value, alignment, why)
        v.problem(key, message, hint)


def size_problem(value: int, alignment: int, why: str) -> tuple[str, str]:
    """(message, hint) for an image side that is not a multiple of `alignment`: the nearest sides that are."""
    lower = value // alignment * alignment
    near = " or ".join(str(n) for n in (lower, lower + alignment) if n > 0)
    return f"must be a multiple of {alignment} for {why}, got {value}", f"use {near}"


def check_sampler(v: Validator, source, scheduler: str) -> None:
    """render.scheduler must be a sampler the base model's family renders with (sampler_problem)."""
    problem = sampler_problem(scheduler, source)
    if problem is not None:
        v.problem("render.scheduler", problem, f'set render.scheduler = "{family_of(source.family).samplers[0]}", '
                  "or leave it out for the model's default")


def sampler_problem(scheduler: str, source) -> str | None:
    """What is wrong when the base model's family does not render with the sampler `scheduler`
    (models.family.Family.samplers: Flux.1 and SD 3 only with their flow-matching `euler`), else None."""
    samplers = family_of(source.family).samplers
    if scheduler in samplers or source.family == "unknown":  # unknown: loads as SD, whose samplers the schema has
        return None
    return (f"{scheduler!r} is not a sampler {FAMILY_NAMES[source.family]} renders with (it renders with "
            f"{', '.join(samplers)})")


def unset_model_defaults(v: Validator, source) -> dict[str, tuple[Any, str]]:
    """The model-dependent defaults (models.model_defaults) of the keys palp.toml leaves out."""
    return {key: value for key, value in model_defaults(source).items() if key not in v.given}


def check_images(v: Validator, root: Path, subjects: dict[str, SubjectConfig],
                  resolution: int) -> dict[str, tuple[Path, ...]]:
    """Expand every subject's `images` entries and open each image. Records problems and notes on `v`."""
    owner: dict[Path, str] = {}  # image -> subject that uses it
    by_content: dict[str, tuple[str, Path]] = {}
    result: dict[str, tuple[Path, ...]] = {}
    for key, subject in subjects.items():
        skey = f"subjects.{key}.images"
        found: set[Path] = set()
        for i, entry in enumerate(subject.images):
            if entry in subject.images[:i]:
                v.problem(skey, f"{entry!r} is listed twice", "remove the repeated entry")
                continue
            for path in _expand_entry(v, root, skey, entry):
                found.add(path)
        for path in sorted(found):
            shown = _shown(root, path)
            if path in owner and owner[path] != key:
                v.problem(skey, f"{shown} is also an image of {owner[path]}",
                          "each subject needs its own pictures; remove it from one of them")
                continue
            owner[path] = key
            try:
                image, notes = open_reference_image(path, resolution)
            except UserError as exc:
                v.problem(skey, str(exc).replace(str(path), shown, 1))
                continue
            v.image_sizes[path] = image.size
            if v.read_captions:
                _check_caption(v, root, key, path, subjects)
            v.notes.extend(n.replace(str(path), shown, 1) for n in notes)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in by_content:
                other_key, other = by_content[digest]
                where = "" if other_key == key else f" (of {other_key})"
                v.problem(skey, f"{shown} is a duplicate of {_shown(root, other)}{where} (identical bytes)",
                          "delete one of the two files: duplicates over-weight an image")
                continue
            by_content[digest] = (key, path)
        result[key] = tuple(sorted(p for p in found if owner.get(p) == key))
    return result


def _check_caption(v: Validator, root: Path, key: str, image: Path, subjects: dict[str, SubjectConfig]) -> None:
    """The caption beside `image` (captions.caption_path), if any, read and checked: its placeholders must be the
    subject's own; a caption without one gets it in front, with a note. Records it in v.captions."""
    file = caption_path(image)
    if not (file.exists() or file.is_symlink()):
        return
    shown = _shown(root, file)
    if not file.resolve().is_relative_to(root):
        v.problems.append(Problem(str(file), f"links outside the project folder (to {file.resolve()})",
                                  hint="copy the caption into the project instead of linking it"))
        return
    try:
        text = read_caption(file)
    except CaptionError as exc:
        v.problems.append(Problem(str(file), exc.reason, line=exc.line))
        return
    problems = placeholder_problems(text, set(subjects))
    problems += [(f"names [{other}], the placeholder of another subject: a caption describes one image of [{key}]",
                  f"remove [{other}], or move {_shown(root, image)} to subject {other}'s images")
                 for other in dict.fromkeys(PLACEHOLDER.findall(text)) if other != key and other in subjects]
    for message, hint in problems:
        v.problems.append(Problem(str(file), f"caption of {_shown(root, image)} {message}", line=1, hint=hint))
    if problems:
        return
    if f"[{key}]" not in text:
        text = f"[{key}] {text}"
        v.notes.append(f"{shown}: the caption has no [{key}]; training reads it as {text!r} (write [{key}] where "
                       "the subject belongs in the sentence)")
    v.captions[image] = text


def _expand_entry(v: Validator, root: Path, skey: str, entry: str) -> list[Path]:
    """The image files one `images` entry names: a file, a folder (its images) or a glob."""
    if not entry.strip():
        v.problem(skey, "empty entry \"\"", "remove it, or name a file, folder or glob such as refs/cat/*.jpg")
        return []
    parts = Path(entry).parts
    if Path(entry).is_absolute() or entry.startswith("~") or ".." in parts:
        v.problem(skey, f"{entry!r} points outside the project folder",
                  "copy the images into the project (e.g. refs/) and use a relative path, so the project stays "
                  "self-contained")
        return []
    if "\\" in entry and not (root / entry).exists():  # a Windows path: read it the way Windows would
        v.notes.append(f"{v.file}: {skey}: {entry!r} read as {entry.replace(chr(92), '/')!r}; write forward slashes "
                       "so the project works on every system")
        entry = entry.replace("\\", "/")
    if any(ch in entry for ch in "*?[") and not (root / entry).exists():  # a file may be called img[1].png
        parent, name = Path(entry).parent, Path(entry).name
        # a folder may be called c[1]: only the file-name part is a pattern then
        pattern = f"{glob.escape(parent.as_posix())}/{name}" if (root / parent).is_dir() else entry
        everything = list(root.glob(pattern))
        matches = [p for p in everything if p.is_file()]
        images = [p for p in matches if is_image_name(p)]
        _skipped_note(v, root, skey, f"{entry!r} matches", [p for p in everything if p not in matches])
        if not matches:
            folder = root / parent  # refs/V1/*.png over a folder of iPhone photos: say why, not "matches nothing"
            others = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            if any(is_image_name(p) for p in others) or not _heic_problem(
                    v, root, skey, f"{entry!r} matches nothing: its folder holds", others, []):
                v.problem(skey, f"{entry!r} matches no files", _missing_hint(root, entry))
        elif not _heic_problem(v, root, skey, f"{entry!r} matches", matches, images) and not images:
            v.problem(skey, f"{entry!r} matches {len(matches)} file(s) but no images",
                      "use image files (.png, .jpg, .webp, ...)")
        return _inside(v, root, skey, images)
    path = root / entry
    if path.is_dir():
        everything = sorted(path.iterdir())
        files = [p for p in everything if p.is_file()]
        images = [p for p in files if is_image_name(p)]
        _skipped_note(v, root, skey, f"folder {entry!r} holds", [p for p in everything if p not in files])
        if not _heic_problem(v, root, skey, f"folder {entry!r} holds", files, images) and not images:
            v.problem(skey, f"folder {entry!r} contains no images",
                      "put pictures of the subject (.png, .jpg, .webp; 3-5 of an object, one is enough for an "
                      f"artwork) in {_shown(root, path)}/")
        return _inside(v, root, skey, images)
    if path.is_symlink() and not path.exists():
        v.problem(skey, f"{entry!r} is a broken symbolic link (to {path.readlink()})",
                  "replace the link with the image file")
        return []
    if not path.exists():
        v.problem(skey, f"{entry!r} not found", _missing_hint(root, entry))
        return []
    if not path.is_file():
        v.problem(skey, f"{entry!r} is not a regular file", "name an image file, a folder of images or a glob")
        return []
    return _inside(v, root, skey, [path])


def _skipped_note(v: Validator, root: Path, skey: str, what: str, others: list[Path]) -> None:
    """A note naming what an entry matched that has an image's name but is no regular file (a folder `0.png`, a
    FIFO, a broken link): skipped, and said so rather than silently counted out."""
    named = sorted(p for p in others if is_image_name(p))
    if named:
        names = ", ".join(_shown(root, p) for p in named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3
                                                                  else "")
        v.notes.append(f"{v.file}: {skey}: {what} {names}, not a regular file (a folder, a FIFO or a broken link): "
                       "skipped; remove or rename it")


def _heic_problem(v: Validator, root: Path, skey: str, what: str, files: list[Path], images: list[Path]) -> bool:
    """HEIC/HEIF photos among `files`, which no glob or folder picks up: a problem when they are all there is, a
    note saying they are skipped otherwise. True when there were any."""
    heic = sorted(p for p in files if is_heic_name(p))
    if not heic:
        return False
    names = ", ".join(_shown(root, p) for p in heic[:3]) + (f" and {len(heic) - 3} more" if len(heic) > 3 else "")
    if images:
        v.notes.append(f"{v.file}: {skey}: {names}: skipped, HEIC/HEIF photos are not supported; "
                       f"{heic_fix(heic[0])}")
    else:
        v.problem(skey, f"{what} {len(heic)} HEIC/HEIF photo(s) ({names}) and no other images: HEIC is not "
                        "supported (Pillow cannot read it)", heic_fix(heic[0]))
    return True


def _inside(v: Validator, root: Path, skey: str, paths: list[Path]) -> list[Path]:
    """Resolve symlinks and drop (with a problem) anything that lands outside the project folder."""
    kept = []
    for path in paths:
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            v.problem(skey, f"{_shown(root, path)} links outside the project folder (to {resolved})",
                      "copy the image into the project instead of linking it")
        else:
            kept.append(resolved)
    return kept


def _missing_hint(root: Path, entry: str) -> str:
    if any(ch in entry for ch in "*?["):  # a glob: matching is case-sensitive, folder entries are not
        folder, pattern = (root / entry).parent, Path(entry).name.lower()
        other_case = next((f.name for f in sorted(folder.iterdir()) if Path(f.name.lower()).match(pattern)), None) \
            if folder.is_dir() else None
        if other_case:
            return (f"glob patterns are case-sensitive: {Path(entry).name!r} does not match {other_case!r}; fix the "
                    f"case, or list the folder {_shown(root, folder)!r} itself (folders match any case)")
    parent = (root / entry).parent
    while not parent.is_dir() and parent != root:
        parent = parent.parent
    near = difflib.get_close_matches(Path(entry).name, [p.name for p in parent.iterdir()], n=1) if parent.is_dir() \
        else []
    if near:
        return f"did you mean {_shown(root, parent / near[0])!r}?"
    return f"put the subject's pictures in {_shown(root, (root / entry).parent)}/ (paths are relative to the project " \
           "folder)"


def _shown(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
