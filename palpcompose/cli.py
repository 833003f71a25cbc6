"""The `palpcompose` command line: thin Typer commands that parse, call the library, and print with rich.

Errors: `UserError` -> message on stderr, exit 2; `Interrupted` -> exit 130; anything else -> exit 1.
A traceback is shown only with `--debug` (or PALP_DEBUG=1).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from palpcompose import __version__, torchao_gate
from palpcompose.choices import (
    DEFAULT_TEMPLATE,
    FLOW_SCHEDULER_NAMES,
    GUIDANCE_MODES,
    SD_SCHEDULER_NAMES,
    SIZE_RULE,
    TEMPLATES,
)
from palpcompose.errors import PalpcomposeError, command_line

app = typer.Typer(
    name="palpcompose",
    help="Personalize text-to-image diffusion models with PALP and compose several subjects in one scene.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    # click's plain help: Typer's rich panels print every flag as `--resume <bool>`, as if it took a value
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)


def _one_of(choices: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c': an option's allowed values in its help."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


ProjectDir = Annotated[
    Path, typer.Argument(metavar="DIR", help="The project folder (holds palp.toml).", show_default=False)
]
# `--step` is the contract's spelling; `--snapshot` says what it picks, next to train's `--steps` (how many to train)
SnapshotOpt = Annotated[int | None, typer.Option("--snapshot", "--step", metavar="N", help="Use the snapshot saved at "
                        "training step N instead of the final weights.")]


def _renamed(command: str, old: str, old_value, new: str, new_value):
    """The value of an option that was renamed: the new spelling, else the old one with a note saying so."""
    from palpcompose.errors import UserError

    if old_value is None:
        return new_value
    if new_value is not None:
        raise UserError(f"{command}: {old} is the old name of {new}; give only {new}")
    err_console.print(f"[yellow]note:[/] {command} {old} is now {new} (same meaning); {old} will be removed",
                      highlight=False, soft_wrap=True)
    return old_value


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"palpcompose {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors (also after the command: "
                                        "`palpcompose train DIR --debug`).")] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    if debug:
        os.environ["PALP_DEBUG"] = "1"


@app.command()
def init(
    project_dir: Annotated[
        Path, typer.Argument(metavar="DIR", help="The folder to create the project in (created if missing).")
    ],
    template: Annotated[
        str, typer.Option("--template", metavar="NAME", help=f"{_one_of(TEMPLATES)} (default: {DEFAULT_TEMPLATE}); "
                          "docs/user-guide.md says what each is for.", show_default=False)
    ] = DEFAULT_TEMPLATE,
) -> None:
    """Create a project: a commented palp.toml, refs/ for the reference images, .gitignore and a README."""
    from palpcompose.distributed import refuse_launcher
    from palpcompose.project import init_project

    refuse_launcher("init")
    result = init_project(project_dir, template)
    for path in result.written:
        console.print(f"[green]created[/] {escape(str(path))}", highlight=False)
    for path in result.kept:
        console.print(f"[dim]kept[/] {escape(str(path))} (already there)", highlight=False)
    for note in result.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    first = ("the reference images are drawn; try" if template == "toy-demo" else
             f"put the reference images in {project_dir / 'refs'}/, edit {project_dir / 'palp.toml'}, then run")
    check = command_line("palpcompose", "check", project_dir)
    console.print(f"\nProject {result.name} ({template}). Next: {first} `{check}`.",
                  highlight=False, markup=False)


@app.command()
def check(project_dir: ProjectDir) -> None:
    """Validate a project (TOML, images, placeholders, base model, prompt lengths) without training or writing."""
    from rich.table import Table
    from rich.text import Text

    from palpcompose.models import placeholder_tokens
    from palpcompose.project import check_project

    report = check_project(project_dir)
    config = report.project.config
    tokens = placeholder_tokens(config.project.name, config.subjects)

    subjects = Table(title=Text(f"{report.project.file}: valid"), title_justify="left")
    for column in ("subject", "token", "class", "images", "prompt (y_P)"):
        subjects.add_column(column)
    for key, subject in config.subjects.items():
        cells = (f"[{key}]", tokens[key], subject.class_name, str(len(report.project.images[key])), subject.prompt)
        subjects.add_row(*map(Text, cells))
    console.print(subjects, highlight=False)

    if report.t5 is None:
        limits = f"token limit {report.token_limit}"
    else:  # Flux.1, SD 3: CLIP's limit and T5's (the pipeline's max_sequence_length)
        limits = f"token limits: CLIP {report.token_limit}, T5 {report.t5[0]}"
    prompts = Table(title=Text(f"prompts ({limits}, {report.token_limit_source})"), title_justify="left")
    prompts.add_column("key")
    prompts.add_column("prompt")
    prompts.add_column("tokens" if report.t5 is None else "CLIP tokens", justify="right")
    if report.t5 is not None:
        prompts.add_column("T5 tokens", justify="right")
    t5_counts = report.t5[1] if report.t5 is not None else [None] * len(report.prompt_tokens)
    for (key, prompt, count), t5_count in zip(report.prompt_tokens, t5_counts, strict=True):
        cells = [Text(key), Text(prompt), "?" if count is None else str(count)]
        prompts.add_row(*cells, *([] if report.t5 is None else ["?" if t5_count is None else str(t5_count)]))
    console.print(prompts, highlight=False)

    palp = config.palp
    settings = Table(show_header=False, title="settings", title_justify="left")
    settings.add_row("base model", Text(f"{config.project.base_model} ({report.base_model.detail})"))
    settings.add_row("guidance", f"{palp.guidance}" + ("" if palp.guidance == "none" else
                     f" (alpha {palp.alpha:g}, beta {palp.beta:g}, weight {palp.weight:g})"))
    settings.add_row("training", f"{config.train.steps} steps at {config.train.resolution} px, batch "
                     f"{config.train.batch_size}, LoRA rank {config.train.lora_rank}, mixed precision "
                     f"{config.train.mixed_precision}" + ("" if config.train.frozen_weights == "mixed_precision"
                                                          else f", frozen weights {config.train.frozen_weights}"))
    rc = config.render
    settings.add_row("training rates", f"LoRA {config.train.learning_rate:g}, embeddings "
                     f"{config.train.embedding_learning_rate:g}")
    settings.add_row("rendering", f"{rc.steps} {rc.scheduler} steps at CFG {rc.guidance_scale:g}, "
                     f"{len(rc.seeds)} seed(s)")
    if config.train.captions:
        settings.add_row("captions", Text("; ".join(
            f"[{key}] {n} of {total} image(s)" + (f": {', '.join(first)}{', ...' if n > len(first) else ''}"
                                                  if n else "")
            for key, n, total, first in report.captions) + " (a name.txt beside name.png)"))
    else:
        settings.add_row("captions", "off (train.captions = false): every image uses its subject's prompt")
    settings.add_row("training sizes", Text(", ".join(
        f"{w}x{h} -> {n} image{'s' if n != 1 else ''}" for (w, h), n in report.buckets)
        + ("" if config.train.buckets else " (train.buckets = false: square centre crops)")))
    if report.project.model_defaults:
        chosen = ", ".join(f"{key} = {value!r}" for key, (value, _) in report.project.model_defaults.items())
        reasons = "; ".join(dict.fromkeys(why for _, why in report.project.model_defaults.values()))
        settings.add_row("from the base model", Text(f"{chosen} ({reasons})"))
    console.print(settings, highlight=False)
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


@app.command()
def train(
    project_dir: ProjectDir,
    steps: Annotated[
        int | None, typer.Option("--steps", metavar="N", help="Train to N steps in total (default: train.steps).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from out/checkpoint (an interrupted or finished run).")
    ] = False,
    guidance: Annotated[
        str | None,
        typer.Option("--guidance", metavar="MODE", help=f"{_one_of(GUIDANCE_MODES)} (default: palp.guidance)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Start a new run even when the weights are up to date or the "
                     "run could be continued; the earlier run is kept in out/runs/<id>/.")] = False,
) -> None:
    """Train the project's subjects with PALP: progress bar, previews, snapshots, out/weights/final/."""
    from palpcompose.project import check_option, load_project
    from palpcompose.train import train as train_project

    check_option("--steps", "train.steps", steps)  # before any work: the range train.steps has in palp.toml
    project = load_project(project_dir)
    for note in project.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    train_project(project, steps=steps, resume=resume, guidance=guidance, force=force, console=console)


@app.command()
def render(
    project_dir: ProjectDir,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", metavar="TEXT", help="Prompt to render, with [V1]-style placeholders (repeatable; "
                     "default: render.prompts, else palp.target_prompt)."),
    ] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", metavar="SEEDS", help="Seeds: 0-7, 1,5,9 or mixes (0-3,10) "
                     "(default: render.seeds, [0, 1, 2, 3] unless set).")] = None,
    snapshot: SnapshotOpt = None,
    sampling_steps: Annotated[
        int | None,
        typer.Option("--sampling-steps", metavar="N", help="Denoising steps per image (default: render.steps)."),
    ] = None,
    old_steps: Annotated[int | None, typer.Option("--steps", hidden=True)] = None,  # before --sampling-steps
    guidance_scale: Annotated[
        float | None,
        typer.Option("--guidance-scale", metavar="FLOAT",
                     help="Classifier-free guidance scale (default: render.guidance_scale)."),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option("--width", metavar="PX",
                     help=f"Image width in pixels, {SIZE_RULE}; default: render.width, else train.resolution."),
    ] = None,
    height: Annotated[
        int | None,
        typer.Option("--height", metavar="PX",
                     help=f"Image height in pixels, {SIZE_RULE}; default: render.height, else train.resolution."),
    ] = None,
    negative_prompt: Annotated[
        str | None,
        typer.Option("--negative-prompt", metavar="TEXT", help="Negative prompt (default: render.negative_prompt)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", metavar="NAME",
                     help=f"Sampler: {_one_of(SD_SCHEDULER_NAMES)} for Stable Diffusion; "
                     f"{_one_of(FLOW_SCHEDULER_NAMES)} for Flux.1 and SD 3 (default: render.scheduler)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", metavar="N",
                     help="Images per forward pass; the images do not change (default: render.batch_size)."),
    ] = None,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Render every snapshot and the final weights in one grid.")
    ] = False,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="Render the base model (class words, no LoRA) beside the personalized one."),
    ] = False,
    base: Annotated[bool, typer.Option("--base", help="Render the base model alone (class words; no training needed): "
                    "try a prompt, or palp.clean_prompt, before training.")] = False,
    run: Annotated[str | None, typer.Option("--run", metavar="ID", help="Use the earlier training run kept in "
                   "out/runs/ID/ instead of the current one.")] = None,
    out: Annotated[Path | None, typer.Option("--out", metavar="PATH", help="Write the images to this new or empty "
                   "folder (default: a new folder in DIR/out/renders/).")] = None,
    lora_scale: Annotated[float | None, typer.Option("--lora-scale", metavar="S", help="Strength of the trained LoRA, "
                          "0 < S <= 2: 1 as trained, 0.5 at half strength; the learned tokens stay whole "
                          "(default: render.lora_scale, 1).")] = None,
) -> None:
    """Render prompts with the trained weights: PNGs and a contact sheet under DIR/out/renders/<run>/ (or --out)."""
    from palpcompose.distributed import refuse_launcher
    from palpcompose.project import check_option, load_project
    from palpcompose.render import render as render_project
    from palpcompose.render import summary_table

    refuse_launcher("render")
    steps = _renamed("render", "--steps", old_steps, "--sampling-steps", sampling_steps)
    for option, key, value in (("--sampling-steps", "render.steps", steps), ("--width", "render.width", width),
                               ("--height", "render.height", height), ("--batch-size", "render.batch_size", batch_size),
                               ("--guidance-scale", "render.guidance_scale", guidance_scale)):
        check_option(option, key, value)  # before any work: the ranges of the same keys in palp.toml
    project = load_project(project_dir, check_images=False)
    result = render_project(
        project, prompts=prompt, seeds=seeds, step=snapshot, steps=steps, guidance_scale=guidance_scale, width=width,
        height=height, negative_prompt=negative_prompt, scheduler=scheduler, batch_size=batch_size, sweep=sweep,
        compare=compare, out=out, console=err_console, run=run, base_only=base, lora_scale=lora_scale,
    )
    console.print(summary_table(result))


@app.command()
def export(
    project_dir: ProjectDir,
    fmt: Annotated[
        str, typer.Option("--format", metavar="FORMAT", help="diffusers or webui (AUTOMATIC1111, ComfyUI).")
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="PATH", help="Folder to write the files to (created if missing).")
    ],
    snapshot: SnapshotOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite files of the same name in the --out folder.")
    ] = False,
    run: Annotated[str | None, typer.Option("--run", metavar="ID", help="Use the earlier training run kept in "
                   "out/runs/ID/ instead of the current one.")] = None,
) -> None:
    """Write the trained weights in another tool's format (diffusers, or webui for AUTOMATIC1111 and ComfyUI)."""
    from palpcompose.distributed import refuse_launcher
    from palpcompose.export import export as export_project
    from palpcompose.export import summary_table
    from palpcompose.project import load_project

    refuse_launcher("export")
    project = load_project(project_dir, check_images=False)
    result = export_project(project, fmt, out, step=snapshot, force=force, run=run)
    for message in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)
    console.print(summary_table(result))



@app.command(name="eval")
def eval_command(
    project_dir: ProjectDir,
    clip: Annotated[Path | None, typer.Option("--clip", metavar="PATH", help="A local CLIP model folder "
                    "(transformers format): the paper's CLIP metrics. Needed for models other than "
                    "builtin:toy.")] = None,
    oracle: Annotated[bool, typer.Option("--oracle", help="Judge with the toy world's oracle (automatic for "
                      "builtin:toy; for your own models trained on the toy world).")] = False,
    renders: Annotated[Path | None, typer.Option("--renders", metavar="PATH", help="Score this render folder (or run "
                       "name under out/renders/) instead of rendering the target prompt.")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", metavar="SEEDS", help="Seeds to render: 0-7, 1,5,9 or mixes "
                     "(default: render.seeds).")] = None,
    snapshot: SnapshotOpt = None,
    run: Annotated[str | None, typer.Option("--run", metavar="ID", help="Use the earlier training run kept in "
                   "out/runs/ID/ instead of the current one.")] = None,
) -> None:
    """Measure text alignment and subject fidelity of renders: a table and out/eval.json (docs/evaluation.md)."""
    from palpcompose.distributed import refuse_launcher
    from palpcompose.evaluate import evaluate, summary_table
    from palpcompose.project import load_project

    refuse_launcher("eval")
    project = load_project(project_dir)
    result = evaluate(project, clip=clip, oracle=oracle, renders=renders, seeds=seeds, step=snapshot,
                      console=err_console, run=run)
    console.print(summary_table(result))
    for key, info in result.subjects.items():
        console.print(f"[{key}] {info['class_name']}: scored on {info['scored_as']}", highlight=False, markup=False)
    console.print(f"wrote {result.eval_json}", highlight=False, markup=False)


@app.command()
def report(project_dir: ProjectDir) -> None:
    """Write DIR/out/report.html: one self-contained page with the runs side by side, their differing settings,
    loss plots, previews, snapshots, renders and eval scores (opens offline in any browser)."""
    from palpcompose.distributed import refuse_launcher
    from palpcompose.report import write_report

    refuse_launcher("report")
    result = write_report(project_dir)
    for path, reason in result.damaged:
        err_console.print(f"[yellow]warning:[/] {escape(str(path))} is damaged ({escape(reason)})", highlight=False,
                          soft_wrap=True)
    console.print(f"wrote {result.path} ({result.runs} run(s), {result.renders} render folder(s), {result.images} "
                  f"image(s), {result.size / 1e6:.1f} MB)", highlight=False, markup=False, soft_wrap=True)


def _sigterm_is_ctrl_c() -> None:
    """SIGTERM (a scheduler stopping the job) interrupts like Ctrl-C: exit 130 with a message, not death by signal.
    `train` installs its own handlers for both while it trains. Signals arriving while we exit are ignored."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _stop_listening() -> None:
    """Once we are exiting after an interrupt, a further Ctrl-C must not cut the message or the exit code short."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _take_debug_flag(argv: list[str]) -> list[str]:
    """`--debug` wherever it is written (before or after the command, not after `--`): set PALP_DEBUG and drop it,
    so that every command accepts it without declaring it."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    os.environ["PALP_DEBUG"] = "1"
    return [a for a in argv[:end] if a != "--debug"] + argv[end:]


def _os_error_message(exc: OSError) -> str:
    """What the file system refused, and what to do: '/proc/x: could not write it (No such file or directory);
    choose another place'. The command's own checks come first; this is what they cannot foresee."""
    import errno

    fix = {errno.ENOSPC: "the disk is full: free some space and run the command again",
           errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
           errno.EACCES: "no permission: choose a place you can write to, or fix its permissions",
           errno.EPERM: "not permitted: choose a place you can write to",
           errno.EROFS: "a read-only file system: choose a place you can write to"}.get(exc.errno,
                                                                                      "choose another place")
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}could not read or write it ({exc.strerror or exc}); {fix}"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the Typer app and map errors to exit codes."""
    # transformers warns on every import that torchvision is missing (we never need it); keep its errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers and diffusers import torchao whenever it is installed, and it prints notices on stderr: only
    # train.frozen_weights' 8 bits need it (quantize.py lets it through then, and these loggers keep its notices,
    # torch's and diffusers' about it to errors only)
    torchao_gate.hold_back()
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        _run(argv)
    finally:
        torchao_gate.release()


def _run(argv: list[str] | None) -> None:
    """main's body: the command, its errors mapped to exit codes (sys.exit)."""
    _sigterm_is_ctrl_c()
    argv = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=argv, standalone_mode=False)
    except PalpcomposeError as exc:
        if exc.exit_code == 130:
            _stop_listening()
        if os.environ.get("PALP_DEBUG"):  # the traceback, then the same message and exit code as without --debug
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        if not exc.quiet:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _stop_listening()
        err_console.print("interrupted; nothing was written")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except OSError as exc:  # the file system refused: a full disk, a folder that cannot be made, no permission
        if os.environ.get("PALP_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(_os_error_message(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click/Typer usage errors: bad options or arguments
            exc.show()
            sys.exit(2)
        if os.environ.get("PALP_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False)
        err_console.print("rerun with --debug for a traceback, and please report it.")
        sys.exit(1)
    # Outside standalone mode Typer hands back, instead of raising, what it caught: Ctrl-C outside our own handlers
    # (loading a model, rendering) comes back as 130.
    if isinstance(code, int) and code != 0:
        if code == 130:
            _stop_listening()
            err_console.print("interrupted; nothing was written")
        sys.exit(code)


if __name__ == "__main__":
    main()
