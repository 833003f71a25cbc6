"""The `palpcompose` command line: thin Typer commands that parse, call the library, and print with rich.

Errors: `UserError` -> message on stderr, exit 2; `Interrupted` -> exit 130; anything else -> exit 1.
A traceback is shown only with `--debug` (or PALP_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from palpcompose import __version__
from palpcompose.errors import PalpcomposeError

app = typer.Typer(
    name="palpcompose",
    help="Personalize text-to-image diffusion models with PALP and compose several subjects in one scene.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ProjectDir = Annotated[Path, typer.Argument(help="The project folder (holds palp.toml).")]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"palpcompose {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    if debug:
        os.environ["PALP_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the Typer app and map errors to exit codes."""
    try:
        app(args=argv, standalone_mode=False)
    except PalpcomposeError as exc:
        if os.environ.get("PALP_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click/Typer usage errors: bad options or arguments
            exc.show()
            sys.exit(2)
        if os.environ.get("PALP_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}", highlight=False)
        err_console.print("rerun with --debug for a traceback, and please report it.")
        sys.exit(1)


if __name__ == "__main__":
    main()
