"""`load_project(dir)`: read palp.toml, check everything, and return the resolved Project, or raise one
ProjectError listing every problem. Nothing is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from palpcompose.errors import UserError, command_line
from palpcompose.project.references import (
    check_base_model,
    check_images,
    check_sampler,
    check_sizes,
    unset_model_defaults,
)
from palpcompose.project.schema import PROJECT_FILE, Project, apply_model_defaults
from palpcompose.project.validation import Validator

MAX_PROJECT_FILE_BYTES = 1_000_000  # a palp.toml larger than this is refused at once, unread


def _file_kind(path: Path) -> str:
    """'a FIFO (named pipe)', 'a socket', 'a device': what stands where a regular file should be."""
    import stat

    mode = path.stat().st_mode
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def load_project(project_dir: str | Path, *, check_images: bool = True) -> Project:
    """Read and validate DIR/palp.toml. Raises ProjectError listing ALL problems (UserError when there is no file).

    With `check_images`, every reference image is opened and checked (missing, unreadable, truncated, huge,
    duplicated), and conversions and small images are reported in `Project.notes`.
    """
    v, project = validate(Path(project_dir), check_images)
    if project is None or v.problems:
        raise v.error()
    return project


def validate(project_dir: Path, with_images: bool) -> tuple[Validator, Project | None]:
    """Everything load_project checks, without raising for the problems it collects (`check` adds more)."""
    file = project_dir / PROJECT_FILE
    if project_dir.name.lower() == PROJECT_FILE and not project_dir.is_dir():
        raise UserError(f"{project_dir}: give the project folder, not its palp.toml: {project_dir.parent}")
    if project_dir.is_file():
        raise UserError(f"{project_dir}: is a file, not a project folder; give the folder that holds palp.toml")
    if not project_dir.is_dir():
        raise UserError(f"{project_dir}: no such project folder; create one with "
                        f"`{command_line('palpcompose', 'init', project_dir)}`")
    if file.is_dir():
        raise UserError(f"{file}: is a folder; the project file must be a file named palp.toml")
    if file.is_symlink() and not file.exists():
        raise UserError(f"{file}: is a broken symbolic link (to {file.readlink()}); replace it with the file")
    if file.exists() and not file.is_file():  # never opened: reading a FIFO would block
        raise UserError(f"{file}: is {_file_kind(file)}, not a regular file; replace it with the project file")
    if not file.is_file():
        raise UserError(f"{file}: not found; create a project with "
                        f"`{command_line('palpcompose', 'init', project_dir)}`")
    size = file.stat().st_size
    if size > MAX_PROJECT_FILE_BYTES:
        raise UserError(f"{file}: is {size / 1e6:.1f} MB; a project file is a few KB, and palpcompose reads at most "
                        f"{MAX_PROJECT_FILE_BYTES // 1_000_000} MB: is it the right file? (reference images go in "
                        "refs/, listed by name)")
    v = Validator(file, file.read_bytes())
    config = v.parse()
    root = project_dir.resolve()
    images: dict[str, tuple[Path, ...]] = {}
    resolved: dict[str, tuple[Any, str]] = {}
    if v.checkable is not None:
        section, subjects, resolution = v.checkable
        source = check_base_model(v, section.base_model, section.allow_pickle) if section is not None else None
        if source is not None:
            check_sizes(v, source)
            resolved = unset_model_defaults(v, source)
            resolution = resolved.get("train.resolution", (resolution,))[0]
        if with_images:
            images = check_images(v, root, subjects, resolution)
    project = None
    if config is not None:
        config = apply_model_defaults(config, resolved)
        if source is not None:
            check_sampler(v, source, config.render.scheduler)
        project = Project(root, root / PROJECT_FILE, config, images, tuple(v.notes), resolved,
                          captions=dict(v.captions), image_sizes=dict(v.image_sizes))
    return v, project
