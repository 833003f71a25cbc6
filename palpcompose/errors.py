"""Errors that reach the user.

`UserError` and its subclasses mean "your input is wrong": the CLI prints the message (no traceback) and exits 2,
having written nothing. Anything else is a bug or an environment failure and exits 1.

Errors that belong to one layer's job stay beside it: `guidance.NonFiniteError` (training diverged),
`memory.OutOfMemory`, and `distributed.FailedOnMain` / `ProcessLost` (several processes); each subclasses
`PalpcomposeError` from here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


def command_line(*words) -> str:
    """A command for a message to suggest, quoted for the shell so that it can be copied as it is (a project folder
    may be called `mon chat é`): command_line("palpcompose", "train", root, "--resume")."""
    return " ".join(shlex.quote(str(word)) for word in words)


class PalpcomposeError(Exception):
    """Base class of every error palpcompose raises on purpose. Exit code 1 unless a subclass says otherwise.

    `quiet`: another process reports this error (under a launcher of N processes, the main one says it once and
    the others only exit with its code)."""

    exit_code = 1

    def __init__(self, *args, quiet: bool = False):
        super().__init__(*args)
        self.quiet = quiet


class UserError(PalpcomposeError):
    """The user's input (project file, images, command-line options) is wrong. Exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One located problem in a project: where, what is wrong, and how to fix it."""

    file: str
    message: str
    key: str | None = None
    line: int | None = None
    hint: str | None = None

    def format(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class ProjectError(UserError):
    """A project has one or more problems; all of them are listed at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found:"
        super().__init__("\n".join([head] + ["  - " + p.format() for p in self.problems]))


class WeightsDoNotFit(UserError):
    """Trained weights (the LoRA or a token embedding) do not fit the base model they are loaded into: they were
    trained on another model (another family, or other layer shapes). Exit 2; the message names the base model to
    use. The one type for this, wherever weights are attached (render, export, resume)."""


class Interrupted(PalpcomposeError):
    """A command was interrupted (SIGINT/SIGTERM); the message says what was kept (training: the checkpoint to
    resume from). Exit code 130."""

    exit_code = 130


class DamagedFile(UserError):
    """A file palpcompose wrote and reads back (checkpoint, snapshot, final weights, manifest, log, render.json) is
    damaged: truncated, not JSON, a bad safetensors header. Exit 2 with the file and what the user can do."""

    def __init__(self, path, reason: str, options: str = ""):
        self.path, self.reason, self.options = path, reason, options
        text = f"{path} is damaged ({reason}); nothing was changed"
        super().__init__(text + (f". {options}" if options else ""))

    def with_options(self, options: str) -> DamagedFile:
        return DamagedFile(self.path, self.reason, options)
