"""An outside sweep of hostile inputs over every command (issue 22, item 6): run the CLI as a user would, on a
builtin:toy project made from scratch and on tiny-pipeline projects, and record for each case the exit code, the
first line of the message, whether a traceback showed, and what was written or lost in the project folder.

Not part of the product or the test suite; the record is docs/hostile-inputs.md. Run from the repository root:

    PYTHONPATH=$PWD python experiments/hostile_sweep.py WORKDIR [--only TEXT]... [--no-toy] > sweep.jsonl

Each case gets a fresh copy of a prepared project (untrained, or trained 2 steps) in WORKDIR. Cases run one at a
time, each with a timeout; a case that outlives it is killed and recorded as `timeout`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from palpcompose import outputs
from palpcompose.checkpoint import STATE_FILE
from palpcompose.weights import EMBEDDINGS_FILE, LORA_FILE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
PY = sys.executable
SMALL: Path = Path("/nonexistent")  # a 3 MB tmpfs the sweep mounts in its work folder (main() sets it)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
# The out/ files the cases damage, relative to the project folder (outputs.py spells the layout)
OUT = Path(outputs.OUT_DIR)
MANIFEST = outputs.manifest_path(OUT).as_posix()
LOCK = outputs.lock_path(OUT).as_posix()
CHECKPOINT_STATE = (outputs.checkpoint_dir(OUT) / STATE_FILE).as_posix()
TRAIN_LOG = outputs.train_log_path(OUT).as_posix()
FINAL_LORA = (outputs.final_dir(OUT) / LORA_FILE).as_posix()
FINAL_EMBEDDINGS = (outputs.final_dir(OUT) / EMBEDDINGS_FILE).as_posix()
FIRST_SNAPSHOT = outputs.snapshot_dir(OUT, 1).as_posix()  # printed by train when it is written
FIRST_PREVIEW = outputs.preview_path(OUT, 1).as_posix()


def cli(*args) -> list[str]:
    return [PY, "-m", "palpcompose.cli", *map(str, args)]


def snapshot(root: Path) -> dict[str, tuple]:
    """path -> (kind, size, sha256 of regular files up to 64 MB) for everything under root (links not followed)."""
    snap = {}
    if not root.exists():
        return snap
    for path in sorted(root.rglob("*")):
        try:
            st = path.lstat()
        except OSError:
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            snap[rel] = ("link", os.readlink(path), None)
        elif path.is_dir():
            snap[rel] = ("dir", 0, None)
        elif path.is_file():
            digest = None
            if st.st_size <= 64 << 20:
                try:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    digest = "unreadable"
            snap[rel] = ("file", st.st_size, digest)
        else:
            snap[rel] = ("special", 0, None)
    return snap


def diff(before: dict, after: dict) -> tuple[list[str], list[str], list[str]]:
    new = [p for p in after if p not in before]
    gone = [p for p in before if p not in after]
    changed = [p for p in before if p in after and before[p] != after[p] and before[p][0] == "file"]
    return new, gone, changed


def first_message(err: str, out: str) -> str:
    lines = [line.strip() for line in (err + "\n" + out).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("error:", "Error", "internal error", "Usage:", "Traceback", "interrupted", "warning")):
            return line[:220]
    noise = ("[transformers]", "Writing model", "Loading weights", "note:")
    useful = [line for line in lines if not line.startswith(noise)]
    return (useful[0] if useful else "")[:220]


@dataclass
class Case:
    group: str
    name: str
    args: list  # CLI args after `palpcompose`; "{p}" is replaced by the project folder
    base: str = "trained"  # trained | untrained | toy | toy-trained | none
    setup: object = None  # fn(project: Path, work: Path) -> None
    expect: str = "2"  # what should happen, for the record
    timeout: float = 90
    cwd: str | None = None  # "{p}" or "{w}" allowed
    signal_after: tuple | None = None  # (wait for this text in stdout/stderr or a float seconds, signal, count)
    parallel: list | None = None  # args of a command started first, in the background
    after: list | None = None  # args of a follow-up command (e.g. train --resume after SIGINT)
    limit_as: int | None = None  # RLIMIT_AS in bytes
    notes: list = field(default_factory=list)


def run_case(case: Case, project: Path, work: Path) -> dict:
    def fill(args):
        return [str(a).replace("{p}", str(project)).replace("{w}", str(work)) for a in args]

    cwd = fill([case.cwd])[0] if case.cwd else str(work)
    before = snapshot(project)
    background = None
    if case.parallel:
        background = subprocess.Popen(cli(*fill(case.parallel)), cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (project / LOCK).exists():
            time.sleep(0.2)
    def preexec():
        # A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: give the command the default disposition a terminal's Ctrl-C meets.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if case.limit_as:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (case.limit_as, case.limit_as))

    start = time.time()
    proc = subprocess.Popen(cli(*fill(case.args)), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=preexec, start_new_session=True)  # noqa: PLW1509 (no threads here)
    outcome = None
    if case.signal_after:
        trigger, sig, count = case.signal_after
        if isinstance(trigger, (int, float)):
            time.sleep(trigger)
        else:  # wait for a file to appear in the project (a stage reached)
            deadline = time.time() + case.timeout
            while time.time() < deadline and proc.poll() is None and not (project / trigger).exists():
                time.sleep(0.1)
        for n in range(count):
            if proc.poll() is None:
                proc.send_signal(sig)
                time.sleep(0.3)
    try:
        out, err = proc.communicate(timeout=case.timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code, outcome = "timeout", f"killed after {case.timeout:.0f} s"
    wall = time.time() - start
    bg = None
    if background is not None:
        try:
            bout, berr = background.communicate(timeout=180)
            bg = {"code": background.returncode, "message": first_message(berr, bout)}
        except subprocess.TimeoutExpired:
            background.kill()
            bg = {"code": "timeout"}
    after = None
    if case.after:
        a = subprocess.run(cli(*fill(case.after)), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
                           check=False)
        after = {"args": case.after, "code": a.returncode, "message": first_message(a.stderr, a.stdout),
                 "traceback": "Traceback" in a.stderr}
    new, gone, changed = diff(before, snapshot(project))
    return {
        "group": case.group, "case": case.name, "args": case.args, "base": case.base, "expect": case.expect,
        "code": code, "message": first_message(err, out), "traceback": "Traceback" in err, "wall_s": round(wall, 1),
        "written": new[:8], "n_written": len(new), "lost": gone[:8], "changed": changed[:8], "outcome": outcome,
        "background": bg, "after": after, "stderr_tail": err[-600:],
    }


# ---------------------------------------------------------------------------------------------------------------
# Setup helpers


def edit_toml(old: str, new: str):
    def setup(project: Path, work: Path):
        path = project / "palp.toml"
        text = path.read_text()
        assert old in text, (old, text)
        path.write_text(text.replace(old, new, 1))
    return setup


def append_toml(table: str, line: str):
    """Add `line` to [table] (the table is created when missing)."""
    def setup(project: Path, work: Path):
        path = project / "palp.toml"
        text = path.read_text()
        head = f"[{table}]\n"
        text = text.replace(head, head + line + "\n", 1) if head in text else text + f"\n{head}{line}\n"
        path.write_text(text)
    return setup


def replace_toml_with(content: bytes | None = None, kind: str = "file"):
    def setup(project: Path, work: Path):
        path = project / "palp.toml"
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "link-out":
            path.symlink_to("/etc/passwd")
        elif kind == "dangling":
            path.symlink_to(work / "nowhere.toml")
        else:
            path.write_bytes(content)
    return setup


def image_setup(kind: str):
    def setup(project: Path, work: Path):
        from PIL import Image

        target = project / "refs" / "V1" / "0.png"
        if kind != "fifo":
            target.unlink()
        if kind == "empty":
            target.write_bytes(b"")
        elif kind == "text":
            target.write_text("this is not an image\n")
        elif kind == "truncated":
            src = project / "refs" / "V1" / "1.png"
            target.write_bytes(src.read_bytes()[:60])
        elif kind == "bomb":  # 30000 x 30000 px, a few hundred KB on disk
            Image.new("1", (30000, 30000)).save(target)
        elif kind == "huge-file":  # a 16x16 PNG followed by 200 MB of zeros
            src = project / "refs" / "V1" / "1.png"
            with open(target, "wb") as f:
                f.write(src.read_bytes())
                f.truncate(200 << 20)
        elif kind == "link-out":
            outside = work / "outside.png"
            Image.new("RGB", (16, 16), "red").save(outside)
            target.symlink_to(outside)
        elif kind == "fifo":
            target.unlink()
            os.mkfifo(target)
        elif kind == "dir":
            target.mkdir()
        elif kind == "cmyk-jpeg-as-png":
            Image.new("CMYK", (16, 16)).save(target, format="JPEG")
        elif kind == "one-pixel":
            Image.new("RGB", (1, 1)).save(target)
        elif kind == "16bit":
            Image.new("I;16", (16, 16)).save(target)
    return setup


def images_key(value: str):
    return edit_toml('images = ["refs/V1/*.png"]', f"images = {value}")


def manifest_field(key: str, value):
    def setup(project: Path, work: Path):
        path = project / MANIFEST
        data = json.loads(path.read_text())
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
        path.write_text(json.dumps(data))
    return setup


_DELETE = object()


def write_file(rel: str, content: bytes):
    def setup(project: Path, work: Path):
        path = project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.rmtree(path)
        path.write_bytes(content)
    return setup


def chain(*setups):
    def setup(project: Path, work: Path):
        for s in setups:
            s(project, work)
    return setup


def relative_base_model(project: Path, work: Path):
    """base_model = "pipe": a folder named like that exists in the caller's cwd (work/) but not in the project."""
    text = (project / "palp.toml").read_text()
    start = text.index('base_model = "') + len('base_model = "')
    end = text.index('"', start)
    pipe = Path(text[start:end])
    if not (work / "pipe").exists():
        (work / "pipe").symlink_to(pipe)
    (project / "palp.toml").write_text(text[:start] + "pipe" + text[end:])


def full_disk(project: Path, work: Path):
    """Move the project onto a 3 MB tmpfs (mounted by the sweep) and fill it to ~40 KB free."""
    small = SMALL
    moved = small / "proj"
    shutil.copytree(project, moved, symlinks=True)
    shutil.rmtree(project)
    project.symlink_to(moved)
    free = shutil.disk_usage(small).free
    (small / "filler").write_bytes(b"\0" * max(0, free - 40_000))


# ---------------------------------------------------------------------------------------------------------------
# The cases


def cases(toy: bool) -> list[Case]:
    c: list[Case] = []
    add = c.append
    big = "100000000000000000000"

    # init
    add(Case("init", "existing palp.toml", ["init", "{p}"], expect="2, palp.toml kept"))
    add(Case("init", "unknown template", ["init", "{w}/new", "--template", "nope"], base="none"))
    add(Case("init", "DIR is a file", ["init", "{w}/afile"], base="none",
             setup=lambda p, w: (w / "afile").write_text("x")))
    add(Case("init", "DIR under a file", ["init", "{w}/afile2/sub"], base="none",
             setup=lambda p, w: (w / "afile2").write_text("x")))
    add(Case("init", "DIR on a full disk", ["init", f"{SMALL}/newproj", "--template", "toy-demo"], base="none",
             setup=lambda p, w: (SMALL / "filler").write_bytes(b"\0" * max(0, shutil.disk_usage(SMALL).free - 20_000)),
             expect="exit 2 (or 1) with a disk-full message, no half-written project"))

    # check: palp.toml itself
    for name, setup, expect in [
        ("palp.toml empty", replace_toml_with(b""), "2"),
        ("palp.toml invalid UTF-8", replace_toml_with(b"\xff\xfe[project]\n"), "2"),
        ("palp.toml not TOML", replace_toml_with(b"[project\nname = \n"), "2, file:line"),
        ("palp.toml 60 MB of comments", replace_toml_with(b"# x\n" * 15_000_000), "2 or a refusal of the size"),
        ("palp.toml is a FIFO", replace_toml_with(kind="fifo"), "2 saying it is a FIFO, never blocks"),
        ("palp.toml is a folder", replace_toml_with(kind="dir"), "2 saying it is a folder"),
        ("palp.toml links to /etc/passwd", replace_toml_with(kind="link-out"), "2 (not TOML)"),
        ("palp.toml dangling link", replace_toml_with(kind="dangling"), "2 naming the link"),
    ]:
        add(Case("check: palp.toml", name, ["check", "{p}"], setup=setup, expect=expect,
                 timeout=150 if "60 MB" in name else 40))

    # check: wrong types and out-of-range numbers
    for name, setup in [
        ("train.steps = \"ten\"", edit_toml("steps = 2", 'steps = "ten"')),
        ("train.steps = -1", edit_toml("steps = 2", "steps = -1")),
        ("train.steps = 0", edit_toml("steps = 2", "steps = 0")),
        ("train.steps = 2**62", edit_toml("steps = 2", "steps = 4611686018427387904")),
        ("train.steps = 1e20 (out of TOML int range)", edit_toml("steps = 2", f"steps = {big}")),
        ("train.steps = 2.5", edit_toml("steps = 2", "steps = 2.5")),
        ("train.steps = true", edit_toml("steps = 2", "steps = true")),
        ("train.learning_rate = nan", append_toml("train", "learning_rate = nan")),
        ("train.learning_rate = inf", append_toml("train", "learning_rate = inf")),
        ("train.learning_rate = -1e-4", append_toml("train", "learning_rate = -1e-4")),
        ("train.resolution = 13", edit_toml("resolution = 16", "resolution = 13")),
        ("train.resolution = 1000000", edit_toml("resolution = 16", "resolution = 1000000")),
        ("train.lora_rank = 0", edit_toml("lora_rank = 4", "lora_rank = 0")),
        ("train.lora_rank = 100000", edit_toml("lora_rank = 4", "lora_rank = 100000")),
        ("train.batch_size = 0", append_toml("train", "batch_size = 0")),
        ("train.batch_size = 1000000", append_toml("train", "batch_size = 1000000")),
        ("train.seed = -1", append_toml("train", "seed = -1")),
        ("train.seed = 2**64", append_toml("train", "seed = 9223372036854775807")),
        ("train.save_every = -3", edit_toml("save_every = 1", "save_every = -3")),
        ("train.mixed_precision = \"fp8\"", edit_toml('mixed_precision = "no"', 'mixed_precision = "fp8"')),
        ("palp.alpha = nan", append_toml("palp", "alpha = nan")),
        ("palp.alpha = -7.5", append_toml("palp", "alpha = -7.5")),
        ("palp.weight = 1e308", append_toml("palp", "weight = 1e308")),
        ("palp.guidance = \"PALP\"", append_toml("palp", 'guidance = "PALP"')),
        ("render.seeds = [-1]", edit_toml("seeds = [0]", "seeds = [-1]")),
        ("render.seeds = [\"a\"]", edit_toml("seeds = [0]", 'seeds = ["a"]')),
        ("render.seeds = []", edit_toml("seeds = [0]", "seeds = []")),
        ("render.steps = 100000000", edit_toml("seeds = [0]\nsteps = 2", "seeds = [0]\nsteps = 100000000")),
        ("render.guidance_scale = inf", append_toml("render", "guidance_scale = inf")),
        ("render.width = 100000", append_toml("render", "width = 100000")),
        ("project.name = \"a b/c\"", edit_toml('name = "tiny"', 'name = "a b/c"')),
        ("project.name = \"\"", edit_toml('name = "tiny"', 'name = ""')),
        ("subjects.V1.prompt without [V1]", edit_toml('prompt = "A photo of [V1]"', 'prompt = "A photo"')),
        ("target_prompt names [V9]", edit_toml('target_prompt = "An oil painting of [V1]"',
                                               'target_prompt = "An oil painting of [V9]"')),
        ("prompt of 20000 characters", edit_toml('prompt = "A photo of [V1]"',
                                                 'prompt = "A photo of [V1] ' + "very " * 4000 + '"')),
        ("unknown key train.stepz", append_toml("train", "stepz = 3")),
        ("subjects = a string", lambda p, w: (p / "palp.toml").write_text(
            'subjects = "V1"\n' + (p / "palp.toml").read_text().replace("[subjects.V1]", "[other.V1]"))),
    ]:
        add(Case("check: values", name, ["check", "{p}"], base="untrained", setup=setup, timeout=60))

    # check: images
    for kind, expect in [("empty", "2"), ("text", "2"), ("truncated", "2"), ("bomb", "2 (decompression bomb)"),
                         ("huge-file", "2 or accepted, never slow"), ("link-out", "accepted or 2; documented"),
                         ("fifo", "2, never blocks"), ("dir", "2 or skipped"), ("cmyk-jpeg-as-png", "accepted"),
                         ("one-pixel", "2 (too small) or accepted with a note"), ("16bit", "accepted")]:
        add(Case("check: images", f"refs image: {kind}", ["check", "{p}"], base="untrained",
                 setup=image_setup(kind), expect=expect, timeout=60))
    for value, name in [('["refs/none/*.png"]', "glob matching nothing"),
                        ('["../outside/*.png"]', "images outside the project (../)"),
                        ('["/etc/*.conf"]', "absolute path outside the project"),
                        ('"refs/V1/*.png"', "images is a string, not a list"),
                        ("[1, 2]", "images = [1, 2]")]:
        def setup(p, w, value=value):
            (w / "outside").mkdir(exist_ok=True)
            shutil.copy(p / "refs" / "V1" / "1.png", w / "outside" / "o.png")
            images_key(value)(p, w)
        add(Case("check: images", name, ["check", "{p}"], base="untrained", setup=setup, timeout=60))

    # base model
    add(Case("base model", "relative base_model, run from the caller's cwd holding it", ["check", "{p}"],
             base="untrained", setup=relative_base_model, cwd="{w}",
             expect="2: resolved against the project folder, where no 'pipe' exists"))
    add(Case("base model", "relative base_model, run from the project folder", ["check", "."], base="untrained",
             setup=relative_base_model, cwd="{p}", expect="2 (same answer whatever the cwd)"))
    add(Case("base model", "base_model = missing folder", ["check", "{p}"], base="untrained",
             setup=edit_toml('base_model = "', 'base_model = "/nonexistent'), timeout=60))
    add(Case("base model", "base_model = a PNG file", ["check", "{p}"], base="untrained",
             setup=lambda p, w: edit_toml('base_model = "', f'base_model = "{p}/refs/V1/1.png" #')(p, w)))
    add(Case("base model", "base_model = empty .safetensors", ["check", "{p}"], base="untrained",
             setup=lambda p, w: ((w / "empty.safetensors").write_bytes(b""),
                                 edit_toml('base_model = "', f'base_model = "{w}/empty.safetensors" #')(p, w))))
    add(Case("base model", "base_model = .ckpt (pickle)", ["check", "{p}"], base="untrained",
             setup=lambda p, w: ((w / "m.ckpt").write_bytes(b"\x80\x04K\x01."),
                                 edit_toml('base_model = "', f'base_model = "{w}/m.ckpt" #')(p, w))))

    # train
    for name, args, expect, timeout in [
        ("--steps 1e20", ["train", "{p}", "--steps", big], "2 before any work", 60),
        ("--steps 2**62", ["train", "{p}", "--steps", "4611686018427387904"], "2 before any work", 60),
        ("--steps -5", ["train", "{p}", "--steps", "-5"], "2", 60),
        ("--steps 0", ["train", "{p}", "--steps", "0"], "2", 60),
        ("--steps abc", ["train", "{p}", "--steps", "abc"], "2 (usage)", 60),
        ("--guidance bogus", ["train", "{p}", "--guidance", "bogus"], "2", 60),
        ("--resume on an untrained project", ["train", "{p}", "--resume"], "2", 60),
    ]:
        add(Case("train: options", name, args, base="untrained", expect=expect, timeout=timeout))
    for name, setup in [
        ('manifest "status": 123', manifest_field("status", 123)),
        ('manifest "steps_done": "x"', manifest_field("steps_done", "x")),
        ('manifest "config": []', manifest_field("config", [])),
        ('manifest "images": "x"', manifest_field("images", "x")),
        ('manifest "base_model": null', manifest_field("base_model", None)),
        ("manifest without status", manifest_field("status", _DELETE)),
        ("manifest is a JSON list", write_file(MANIFEST, b"[]")),
        ("manifest truncated", write_file(MANIFEST, b'{"status": "comp')),
        ("checkpoint/state.json step = \"x\"", lambda p, w: (p / CHECKPOINT_STATE).write_text(
            json.dumps({**json.loads((p / CHECKPOINT_STATE).read_text()), "step": "x"}))),
        ("train.jsonl line not JSON", write_file(TRAIN_LOG, b"{oops\n")),
        ('train.lock {"pid": "abc"}', write_file(LOCK, b'{"pid": "abc", "host": "x"}')),
        ("train.lock is garbage", write_file(LOCK, b"\x00\x01garbage")),
        ('train.lock {"pid": "abc"} on this host', lambda p, w: write_file(
            LOCK, json.dumps({"pid": "abc", "host": __import__("socket").gethostname()}).encode())(p, w)),
        ('train.lock {"pid": -1} on this host', lambda p, w: write_file(
            LOCK, json.dumps({"pid": -1, "host": __import__("socket").gethostname()}).encode())(p, w)),
        ("train.lock is a folder", lambda p, w: (p / LOCK).mkdir()),
    ]:
        add(Case("train: damaged out/", name, ["train", "{p}", "--resume", "--steps", "3"], setup=setup,
                 expect="2 naming the file and field; weights untouched", timeout=90))
    for name, setup in [
        ('manifest "status": 123', manifest_field("status", 123)),
        ('manifest "steps_done": "x"', manifest_field("steps_done", "x")),
        ('manifest "config": []', manifest_field("config", [])),
        ("manifest is a JSON list", write_file(MANIFEST, b"[]")),
    ]:
        add(Case("train/render: damaged manifest, no --resume", f"train --steps 3, {name}",
                 ["train", "{p}", "--steps", "3"], setup=setup, expect="2 naming the file and field", timeout=90))
        add(Case("train/render: damaged manifest, no --resume", f"render, {name}", ["render", "{p}", "--seeds", "0"],
                 setup=setup, expect="2 naming the file and field, or renders with a warning", timeout=90))
    add(Case("train: damaged out/", "out is a file", ["train", "{p}"], base="untrained",
             setup=write_file(OUT.as_posix(), b"x"), expect="2"))
    add(Case("train: damaged out/", 'lock pid "abc", plain train (new steps)', ["train", "{p}", "--steps", "3"],
             setup=write_file(LOCK, b'{"pid": "abc", "host": "x"}'), expect="2 naming train.lock"))
    add(Case("train: concurrency", "two trains at once", ["train", "{p}", "--steps", "3"], base="untrained",
             parallel=["train", "{p}", "--steps", "40"], expect="2: already training; the first completes",
             timeout=120))
    add(Case("train: concurrency", "render while training", ["render", "{p}", "--seeds", "0"], base="trained",
             parallel=["train", "{p}", "--steps", "40", "--force"],
             expect="2 or renders the last completed weights; nothing mixed", timeout=120))
    add(Case("train: concurrency", "export while training", ["export", "{p}", "--format", "webui", "--out",
             "{w}/exp-conc"], base="trained", parallel=["train", "{p}", "--steps", "40", "--force"],
             expect="2 or exports the last completed weights", timeout=120))
    add(Case("train: signals", "SIGINT while loading (0.5 s)", ["train", "{p}"], base="untrained",
             signal_after=(0.5, signal.SIGINT, 1), expect="130, nothing written"))
    add(Case("train: signals", "SIGINT at the first snapshot", ["train", "{p}", "--steps", "30"], base="untrained",
             signal_after=(FIRST_SNAPSHOT, signal.SIGINT, 1),
             after=["train", "{p}", "--resume", "--steps", "30"], expect="130 with a checkpoint; resume completes",
             timeout=180))
    add(Case("train: signals", "SIGINT twice at the first snapshot", ["train", "{p}", "--steps", "30"],
             base="untrained", signal_after=(FIRST_SNAPSHOT, signal.SIGINT, 2),
             after=["train", "{p}", "--resume", "--steps", "30"], expect="130; resume from the last checkpoint",
             timeout=180))
    add(Case("train: signals", "SIGTERM at the first snapshot", ["train", "{p}", "--steps", "30"],
             base="untrained", signal_after=(FIRST_SNAPSHOT, signal.SIGTERM, 1),
             expect="130 with a checkpoint", timeout=180))
    add(Case("train: signals", "SIGKILL at the first snapshot, then train", ["train", "{p}", "--steps", "30"],
             base="untrained", signal_after=(FIRST_SNAPSHOT, signal.SIGKILL, 1),
             after=["train", "{p}", "--resume", "--steps", "30"],
             expect="-9; the stale lock is taken over and the resume completes", timeout=180))
    add(Case("train: disk", "full disk during training", ["train", "{p}", "--steps", "30"], base="untrained",
             setup=full_disk, after=["train", "{p}", "--resume", "--steps", "30"],
             expect="exit 1 or 2 with 'No space left', the last checkpoint valid", timeout=180))

    # render
    for name, args, expect in [
        ("--sampling-steps 100000000", ["--sampling-steps", "100000000"], "2 before any work"),
        ("--sampling-steps 0", ["--sampling-steps", "0"], "2"),
        ("--width 100000", ["--width", "100000"], "2 before any work"),
        ("--width 13", ["--width", "13"], "2 (multiple of 8)"),
        ("--width -8", ["--width", "-8"], "2"),
        ("--height 0", ["--height", "0"], "2"),
        ("--seeds abc", ["--seeds", "abc"], "2"),
        ("--seeds 5-1", ["--seeds", "5-1"], "2"),
        ("--seeds 0-100000000", ["--seeds", "0-100000000"], "2 (too many) before any work"),
        ("--seeds -3", ["--seeds", "-3"], "2"),
        ("--guidance-scale nan", ["--guidance-scale", "nan"], "2"),
        ("--guidance-scale inf", ["--guidance-scale", "inf"], "2"),
        ("--batch-size 0", ["--batch-size", "0"], "2"),
        ("--batch-size 100000", ["--batch-size", "100000"], "2 or clamped"),
        ("--snapshot 999", ["--snapshot", "999"], "2 listing the snapshots"),
        ("--snapshot -1", ["--snapshot", "-1"], "2"),
        ("--run ../..", ["--run", "../.."], "2"),
        ("--run ''", ["--run", ""], "2"),
        ("--prompt ''", ["--prompt", ""], "2"),
        ("--prompt [V9]", ["--prompt", "a [V9]"], "2 (undefined placeholder)"),
        ("--prompt of 20000 chars", ["--prompt", "a [V1] " + "very " * 4000], "2 or truncated with a note"),
        ("--scheduler bogus", ["--scheduler", "bogus"], "2"),
        ("--out is a file", ["--out", "{p}/palp.toml"], "2, palp.toml untouched"),
        ("--out non-empty folder", ["--out", "{p}/refs"], "2, refs untouched"),
        ("--out /proc/x", ["--out", "/proc/x"], "2"),
    ]:
        add(Case("render", name, ["render", "{p}", "--seeds", "0", *args] if "--seeds" not in args else
                 ["render", "{p}", *args], expect=expect, timeout=60))
    add(Case("render", "untrained project", ["render", "{p}"], base="untrained", expect="2 (train first)"))
    add(Case("render", "final lora.safetensors truncated", ["render", "{p}", "--seeds", "0"],
             setup=lambda p, w: (p / FINAL_LORA).write_bytes(
                 (p / FINAL_LORA).read_bytes()[:100]), expect="2 naming the file"))
    add(Case("render", "final lora.safetensors is a pickle", ["render", "{p}", "--seeds", "0"],
             setup=write_file(FINAL_LORA, b"\x80\x04K\x01."), expect="2, never unpickled"))
    add(Case("render", "palp.toml changed to a wrong type after training", ["render", "{p}", "--seeds", "0"],
             setup=edit_toml("steps = 2", 'steps = "x"'), expect="2 naming the key"))
    add(Case("render", "SIGINT while rendering", ["render", "{p}", "--seeds", "0-7", "--sampling-steps", "50"],
             signal_after=(6.0, signal.SIGINT, 1), expect="130; no half render folder", timeout=90))

    # export
    for name, args, expect in [
        ("--format bogus", ["--format", "bogus", "--out", "{w}/e1"], "2"),
        ("--out is a file", ["--format", "webui", "--out", "{p}/palp.toml"], "2"),
        ("--out under a file", ["--format", "webui", "--out", "{p}/palp.toml/x"], "2"),
        ("--out = the project's out/", ["--format", "webui", "--out", "{p}/out"], "2 or a separate folder"),
        ("--out = refs/V1 (would mix with references)", ["--format", "diffusers", "--out", "{p}/refs/V1"],
         "2 or only new files"),
        ("--snapshot 999", ["--format", "webui", "--out", "{w}/e2", "--snapshot", "999"], "2"),
        ("--run nope", ["--format", "webui", "--out", "{w}/e3", "--run", "nope"], "2"),
    ]:
        add(Case("export", name, ["export", "{p}", *args], expect=expect, timeout=60))
    add(Case("export", "twice to the same --out without --force", ["export", "{p}", "--format", "webui", "--out",
             "{w}/e4"], setup=lambda p, w: subprocess.run(
                 cli("export", p, "--format", "webui", "--out", w / "e4"), env=ENV, capture_output=True, check=False),
             expect="2, the first export untouched"))
    add(Case("export", "embeddings.safetensors has a wrong tensor shape", ["export", "{p}", "--format", "webui",
             "--out", "{w}/e5"], setup=lambda p, w: __import__("safetensors.torch").torch.save_file(
                 {"x": __import__("torch").zeros(3)}, str(p / FINAL_EMBEDDINGS)),
             expect="2 naming the file"))
    add(Case("export", "untrained", ["export", "{p}", "--format", "webui", "--out", "{w}/e6"], base="untrained"))

    # eval
    for name, args, expect, base in [
        ("tiny model without --clip", ["eval", "{p}"], "2 (needs --clip)", "trained"),
        ("--renders nonexistent", ["eval", "{p}", "--renders", "{w}/none"], "2", "trained"),
        ("--renders a file", ["eval", "{p}", "--renders", "{p}/palp.toml"], "2", "trained"),
        ("--renders an empty folder", ["eval", "{p}", "--renders", "{w}/emptyr"], "2", "trained"),
        ("--renders a folder of non-images", ["eval", "{p}", "--oracle", "--renders", "{w}/junk"], "2", "trained"),
        ("--clip a random folder", ["eval", "{p}", "--clip", "{w}"], "2", "trained"),
        ("--clip a file", ["eval", "{p}", "--clip", "{p}/palp.toml"], "2", "trained"),
        ("--seeds 0-100000000", ["eval", "{p}", "--oracle", "--seeds", "0-100000000"], "2 before any work",
         "trained"),
    ]:
        def setup(p, w):
            (w / "emptyr").mkdir(exist_ok=True)
            (w / "junk").mkdir(exist_ok=True)
            (w / "junk" / "a.png").write_text("no")
        add(Case("eval", name, args, base=base, setup=setup, expect=expect, timeout=60))

    # report (this branch's command)
    add(Case("report", "no out/ yet", ["report", "{p}"], base="untrained", expect="2 (train first)"))
    add(Case("report", "manifest truncated", ["report", "{p}"], setup=write_file(MANIFEST, b"{"),
             expect="2 naming the manifest"))
    add(Case("report", "manifest fields of wrong types", ["report", "{p}"],
             setup=chain(manifest_field("status", 123), manifest_field("config", "x")),
             expect="0, the fields named as damaged in the page"))
    add(Case("report", "preview PNG is a FIFO", ["report", "{p}"],
             setup=lambda p, w: ((p / FIRST_PREVIEW).unlink(),
                                 os.mkfifo(p / FIRST_PREVIEW)),
             expect="0 or 2, never blocks", timeout=40))
    add(Case("report", "preview PNG is a decompression bomb", ["report", "{p}"],
             setup=lambda p, w: __import__("PIL.Image").Image.new("1", (30000, 30000)).save(
                 p / FIRST_PREVIEW), expect="0, named as damaged"))

    if toy:
        add(Case("toy", "init toy-demo from scratch", ["init", "{w}/toy", "--template", "toy-demo"], base="none",
                 expect="0"))
        add(Case("toy", "check", ["check", "{p}"], base="toy", expect="0"))
        add(Case("toy", "train --steps 2", ["train", "{p}", "--steps", "2"], base="toy", expect="0", timeout=300))
        add(Case("toy", "train --steps 1e20", ["train", "{p}", "--steps", big], base="toy",
                 expect="2 before any work", timeout=120))
        add(Case("toy", "render --width 100000 (memory capped at 6 GB)", ["render", "{p}", "--seeds", "0",
                 "--width", "100000"], base="toy-trained", limit_as=6 << 30, expect="2 before any work",
                 timeout=90))
        add(Case("toy", "render 1 seed, 2 steps", ["render", "{p}", "--seeds", "0", "--sampling-steps", "2"],
                 base="toy-trained", expect="0", timeout=200))
        add(Case("toy", "export webui", ["export", "{p}", "--format", "webui", "--out", "{w}/toyexp"],
                 base="toy-trained", expect="0"))
        add(Case("toy", "eval --seeds 0", ["eval", "{p}", "--seeds", "0"], base="toy-trained", expect="0",
                 timeout=300))
        add(Case("toy", "eval --seeds abc", ["eval", "{p}", "--seeds", "abc"], base="toy-trained"))
        for name, args in [("--renders an empty folder", ["--renders", "{w}/emptyr"]),
                           ("--renders a folder of non-images", ["--renders", "{w}/junk"]),
                           ("--renders a file", ["--renders", "{p}/palp.toml"]),
                           ("--seeds 0-100000000", ["--seeds", "0-100000000"])]:
            def setup(p, w):
                (w / "emptyr").mkdir(exist_ok=True)
                (w / "junk").mkdir(exist_ok=True)
                (w / "junk" / "a.png").write_text("no")
            add(Case("toy", f"eval {name}", ["eval", "{p}", *args], base="toy-trained", setup=setup, timeout=120))
        add(Case("toy", "base_model = \"builtin:nope\"", ["check", "{p}"], base="toy",
                 setup=edit_toml('base_model = "builtin:toy"', 'base_model = "builtin:nope"')))
        add(Case("toy", "report", ["report", "{p}"], base="toy-trained", expect="0"))
    return c


def prepare(work: Path, toy: bool) -> dict[str, Path]:
    from conftest import default_project_config, to_toml, write_test_image
    from tiny_pipeline import make_tiny_pipeline

    bases = {}
    pipe = work / "pipe-src"
    if not pipe.exists():
        make_tiny_pipeline(pipe)
    untrained = work / "base-untrained"
    if not untrained.exists():
        config = default_project_config(str(pipe))
        config["train"]["preview_every"] = 1
        untrained.mkdir()
        (untrained / "palp.toml").write_text(to_toml(config))
        for j in range(3):
            write_test_image(untrained / "refs" / "V1" / f"{j}.png", seed=j)
    bases["untrained"] = untrained
    trained = work / "base-trained"
    if not trained.exists():
        shutil.copytree(untrained, trained)
        subprocess.run(cli("train", trained), env=ENV, check=True, capture_output=True)
    bases["trained"] = trained
    if toy:
        toy_dir = work / "base-toy"
        if not toy_dir.exists():
            subprocess.run(cli("init", toy_dir, "--template", "toy-demo"), env=ENV, check=True, capture_output=True)
        bases["toy"] = toy_dir
        toy_trained = work / "base-toy-trained"
        if not toy_trained.exists():
            shutil.copytree(toy_dir, toy_trained)
            subprocess.run(cli("train", toy_trained, "--steps", "2"), env=ENV, check=True, capture_output=True)
        bases["toy-trained"] = toy_trained
    return bases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--only", action="append", default=[], help="run the cases whose group or name holds this "
                        "text (repeatable)")
    parser.add_argument("--no-toy", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    global SMALL
    small = SMALL = work / "small"
    small.mkdir(exist_ok=True)
    if not os.path.ismount(small):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(small)], check=False)
    bases = prepare(work, not args.no_toy)
    for n, case in enumerate(cases(not args.no_toy)):
        if args.only and not any(text in f"{case.group} {case.name}" for text in args.only):
            continue
        case_dir = work / f"case-{n:03d}"
        if case_dir.exists() or case_dir.is_symlink():
            shutil.rmtree(case_dir) if case_dir.is_dir() and not case_dir.is_symlink() else case_dir.unlink()
        project = case_dir / "proj"
        case_dir.mkdir()
        if case.base != "none":
            shutil.copytree(bases[case.base], project, symlinks=True)
        else:
            project.mkdir()
        for p in small.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        try:
            if case.setup is not None:
                case.setup(project, case_dir)
            result = run_case(case, project, case_dir)
        except Exception as exc:  # noqa: BLE001 (a setup that failed is recorded, and the sweep goes on)
            result = {"group": case.group, "case": case.name, "code": "setup failed", "message": repr(exc)[:200]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
