"""`palpcompose init DIR`: a new project folder from a template (palp.toml, refs/, README, .gitignore).

The templates live in the top-level templates/ folder and ship inside the package as `palpcompose.templates`.
"""

from __future__ import annotations

import contextlib
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from palpcompose.choices import DEFAULT_TEMPLATE, TEMPLATES
from palpcompose.errors import UserError, command_line
from palpcompose.fsutil import atomic_write_bytes, atomic_write_text, check_folder_can_be_made, os_error_text
from palpcompose.models import resolve_base_model
from palpcompose.project.schema import PROJECT_FILE, ascii_name, sanitize_name
from palpcompose.project.validation import did_you_mean
from palpcompose.toyworld import demo as toy_demo

_NAME_MARK = "__PROJECT_NAME__"


@dataclass(frozen=True)
class InitResult:
    root: Path
    name: str
    written: tuple[Path, ...]  # files created or updated
    kept: tuple[Path, ...]  # files that already existed and were left alone
    notes: tuple[str, ...] = ()  # what the user should know before `check` (the base model is not here yet, ...)


def init_project(project_dir: str | Path, template: str = DEFAULT_TEMPLATE) -> InitResult:
    """Create a project folder from a template. Refuses (UserError, nothing written) if palp.toml already exists.

    The project name comes from the folder's name, made valid. Existing files other than palp.toml are kept;
    an existing .gitignore gets an `out/` line if it lacks one.
    """
    root = Path(project_dir)
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; templates: {', '.join(TEMPLATES)}"
                        + (f" ({did_you_mean(template, TEMPLATES)})" if did_you_mean(template, TEMPLATES) else ""))
    if root.name.lower() == PROJECT_FILE:
        raise UserError(f"{root}: give the folder the project goes in, not its palp.toml: "
                        f"`{command_line('palpcompose', 'init', root.parent)}`")
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder; choose another project folder")
    if (root / PROJECT_FILE).exists() or (root / PROJECT_FILE).is_symlink():
        raise UserError(f"{root / PROJECT_FILE}: already exists; palpcompose init never overwrites a project "
                        "(edit it, or init a new folder)")
    folder_name = root.resolve().name
    name = sanitize_name(folder_name)
    source = files("palpcompose.templates") / template
    texts = {rel: (source / rel).read_text(encoding="utf-8").replace(_NAME_MARK, name)
             for rel in ("palp.toml", "README.md", "refs/README.md")}
    # One empty folder per subject folder the template names, so the user sees where the pictures go.
    folders = [root / entry for sub in tomllib.loads(texts["palp.toml"])["subjects"].values()
               for entry in sub["images"] if not any(ch in entry for ch in "*?[")]
    gitignore = root / ".gitignore"
    _init_preflight(root, [root / rel for rel in texts] + [gitignore], folders)

    # Write; on a failure (disk full, permissions), remove what this call created. .gitignore, the one file that
    # may already exist and be changed, comes last.
    needed = [*folders, *((root / rel).parent for rel in texts)]
    new_dirs = sorted({d for folder in needed for d in (folder, *folder.parents) if not d.exists()},
                      key=lambda d: len(d.parts), reverse=True)  # deepest first, for the clean-up
    written, kept = [], []
    try:
        for rel, text in texts.items():
            target = root / rel
            if target.exists() and rel != PROJECT_FILE:
                kept.append(target)
                continue
            atomic_write_text(target, text)
            written.append(target)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        if template == "toy-demo":  # the toy world draws this template's references (palpcompose/toyworld/demo.py)
            toy_demo.write_references(root, written)
        # Bytes, not text: a .gitignore in another encoding is kept as it is, with one line added.
        data = gitignore.read_bytes() if gitignore.is_file() else b""
        if not {b"out/", b"out", b"/out/", b"/out"} & {line.strip() for line in data.splitlines()}:
            atomic_write_bytes(gitignore, data + (b"\n" if data and not data.endswith(b"\n") else b"") + b"out/\n")
            written.append(gitignore)
        else:
            kept.append(gitignore)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in new_dirs:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never removes anything the user had
        raise UserError(f"{root}: could not create the project ({os_error_text(exc)}); nothing was left behind; "
                        "choose a folder you can write to") from exc
    return InitResult(root, name, tuple(written), tuple(kept), tuple(_init_notes(texts["palp.toml"], folder_name)))


def _init_notes(toml_text: str, folder_name: str) -> list[str]:
    """What `init` chose without being told: a project name other than the folder's, and a template's base model
    that this machine does not have (a hub id not in the cache, which `check` refuses), each with the way out."""
    notes = []
    name = tomllib.loads(toml_text)["project"]["name"]
    if name != folder_name:
        how = (f"the folder name {folder_name!r} has no ASCII letters or digits to make one of" if not
               ascii_name(folder_name) else f"made from the folder name {folder_name!r}")
        notes.append(f"palp.toml: project.name is {name!r} ({how}: a project name may contain only ASCII letters, "
                     f"digits, '-' and '_'); edit project.name to choose another, it names the learned tokens "
                     f"(<{name.lower()}-v1>)")
    spec = tomllib.loads(toml_text)["project"]["base_model"]
    source = resolve_base_model(spec)
    if not source.available:
        notes.append(f"palp.toml: project.base_model: {source.detail}")
    return notes


def _init_preflight(root: Path, files: list[Path], folders: list[Path]) -> None:
    """Before `init` writes anything: every file and folder it will create can be created (no file where a folder
    goes, or the other way round), and the nearest existing folder is writable."""
    check_folder_can_be_made(root, "init")
    for path, is_folder in [(f, False) for f in files] + [(d, True) for d in folders]:
        for parent in reversed(path.relative_to(root).parents[:-1]):  # refs/, refs/subject/, ... (root checked)
            if (root / parent).exists() and not (root / parent).is_dir():
                raise UserError(f"{root / parent}: is a file where the project needs a folder; move it away, or "
                                "init another folder")
        if path.exists() and path.is_dir() != is_folder:
            what = "a folder where the project needs a file" if not is_folder else \
                "a file where the project needs a folder"
            raise UserError(f"{path}: is {what}; move it away, or init another folder")
