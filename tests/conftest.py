"""Shared test fixtures: tiny pipelines, valid projects, and the `slow` / `gpu` switches.

- `@pytest.mark.slow` tests run only with PALP_RUN_SLOW=1; `@pytest.mark.gpu` tests only when CUDA is available.
- `tiny_pipeline_dir` / `tiny_vpred_pipeline_dir`: tiny SD-1-like (epsilon) and SD-2-like (v_prediction) diffusers
  folders, built once per session (tests/tiny_pipeline.py; 16 px images, 8x8 latents); `tiny_sdxl_pipeline_dir` the
  same for a tiny SDXL-architecture pipeline (two text encoders, pooled and size conditioning).
- `make_project(overrides=None, *, n_images=3, image_size=16, dirname="proj")`: writes a valid project folder whose
  base model is the tiny pipeline, with `n_images` distinct PNGs per subject in refs/<Vn>/, and returns its path.
  `overrides` is merged into the default palp.toml content table by table; a value of None deletes that key.
- `write_project(root, base_model, overrides, ...)`: the same, for any base model and folder (make_project calls it).
- `set_in_toml(root, old, new)`: edit a project's palp.toml in place (`old` must be there: a test cannot silently
  edit nothing).
- `run_cli("check", dir)`: runs the CLI in-process through `cli.main` and returns CliResult(code, out, err).
- `tree_snapshot(dir)`: a comparable picture of every file (size, mtime, hash), to assert nothing was written.
- `prepared_state(dir, guidance)`: a project's TrainState and subjects, ready for `training_step` (no out/ written).
- `interrupt_in_step(monkeypatch, n)`: SIGINT while training step `n` runs (the step finishes); returns the real step.
- `step_runner(state, subjects, batch_size)`: a no-argument callable running one `training_step` on a seeded batch.
- `capture_grads(state)`: the gradient each trainable tensor receives at each backward pass.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("PALP_RUN_SLOW") == "1"
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set PALP_RUN_SLOW=1 to run it"))
        if "gpu" in item.keywords:
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    from tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-eps") / "pipe", prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_vpred_pipeline_dir(tmp_path_factory) -> Path:
    from tiny_pipeline import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory) -> Path:
    from tiny_pipeline import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-xl") / "pipe")


def default_project_config(base_model: str) -> dict:
    """The palp.toml content `make_project` starts from: one subject, tiny and fast settings."""
    return {
        "project": {"name": "tiny", "base_model": base_model},
        "subjects": {"V1": {"class_name": "cat", "images": ["refs/V1/*.png"], "prompt": "A photo of [V1]"}},
        "palp": {"target_prompt": "An oil painting of [V1]", "clean_prompt": "An oil painting of a cat"},
        "train": {"steps": 2, "resolution": 16, "mixed_precision": "no", "save_every": 1, "preview_every": 0,
                  "lora_rank": 4},
        "render": {"seeds": [0], "steps": 2},
    }


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_toml(data: dict) -> str:
    """A small TOML writer for the value types palp.toml uses (tables, strings, numbers, booleans, lists)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []

    def table(name: str, content: dict):
        scalars = {k: v for k, v in content.items() if not isinstance(v, dict)}
        if scalars or not content:
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in content.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, content in data.items():
        table(name, content)
    return "\n".join(lines)


def write_test_image(path: Path, seed: int, size: int = 16, mode: str = "RGB") -> Path:
    """A deterministic noise image, different for every seed (so no two references are byte-identical)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def write_project(root: Path, base_model, overrides: dict | None = None, *, n_images: int = 3,
                  image_size: int = 16) -> Path:
    """A valid project in `root`: default_project_config(base_model) merged with `overrides`, and `n_images`
    distinct PNGs per subject in refs/<Vn>/ (image j of the i-th subject drawn with seed 1000 i + j)."""
    config = _merge(default_project_config(str(base_model)), overrides or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "palp.toml").write_text(to_toml(config))
    for i, key in enumerate(config.get("subjects", {})):
        for j in range(n_images):
            write_test_image(root / "refs" / key / f"{j}.png", seed=1000 * i + j, size=image_size)
    return root


def set_in_toml(root: Path, old: str, new: str) -> None:
    """Replace the first `old` in root/palp.toml with `new`; `old` must be there."""
    toml = root / "palp.toml"
    text = toml.read_text()
    assert old in text, f"{old!r} is not in {toml}"
    toml.write_text(text.replace(old, new, 1))


@pytest.fixture
def make_project(tmp_path, tiny_pipeline_dir):
    def factory(overrides: dict | None = None, *, n_images: int = 3, image_size: int = 16,
                dirname: str = "proj") -> Path:
        return write_project(tmp_path / dirname, tiny_pipeline_dir, overrides, n_images=n_images,
                             image_size=image_size)

    return factory


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread only spins on 2 cores (3x the CPU time); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(capsys):
    """Run `palpcompose ARGS...` in-process through `cli.main` (its error mapping included): CliResult."""
    from palpcompose.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root` with its size, mtime and content hash: compare two to prove nothing
    changed."""
    import hashlib

    snap = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        snap[path.relative_to(root).as_posix()] = (path.is_dir(), stat.st_size, stat.st_mtime_ns, digest)
    return snap


def prepared_state(project_dir: Path, guidance: str):
    """(TrainState, subjects) of the project in `project_dir` with `guidance` (as --guidance gives it), ready for
    `training_step`: the base model loaded, tokens and LoRA added, the subjects encoded. Nothing is written."""
    from accelerate import Accelerator

    from palpcompose import models
    from palpcompose.guidance import guidance_config
    from palpcompose.project import load_project
    from palpcompose.train import prepare_state, prepare_subjects

    project = load_project(project_dir)
    config = replace(project.config, palp=replace(project.config.palp, guidance=guidance))  # as --guidance does
    c = models.load_components(models.resolve_base_model(config.project.base_model, project.root))
    tokens = models.placeholder_tokens(config.project.name, config.subjects)
    state = prepare_state(config, c, Accelerator(mixed_precision="no"), guidance_config(config), tokens)
    return state, prepare_subjects(project, config, state, tokens)


def interrupt_in_step(monkeypatch, n: int):
    """SIGINT while training step `n` runs (train's training_step patched): the step finishes, a checkpoint is
    written, train raises Interrupted. Returns the real training_step, to put back with monkeypatch.setattr."""
    from palpcompose import train as train_mod

    real_step, calls = train_mod.training_step, []

    def step_then_signal(state, batch):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(state, batch)

    monkeypatch.setattr(train_mod, "training_step", step_then_signal)
    return real_step


def step_runner(state, subjects, batch_size: int, seed: int = 0):
    """A no-argument callable that runs one `training_step` of `state` on a batch of `subjects` drawn as train's
    loop draws it (data.sample_batch), from a generator seeded with `seed`; it returns the step's logged values."""
    import torch

    from palpcompose.data import sample_batch
    from palpcompose.train import training_step

    generator = torch.Generator("cpu").manual_seed(seed)
    num_timesteps = state.components.noise_scheduler.config.num_train_timesteps

    def step() -> dict[str, float]:
        return training_step(state, sample_batch(subjects, generator, batch_size, num_timesteps))

    return step


def capture_grads(state) -> list[list]:
    """Per trainable tensor (LoRA weights, then the placeholder rows), its gradient after each backward pass.
    Recorded by a hook, because the step zeroes gradients before it returns."""
    params = state.lora_params + [state.token_embedding.rows]
    grads: list[list] = [[] for _ in params]
    for p, record in zip(params, grads):
        p.register_post_accumulate_grad_hook(lambda p, record=record: record.append(p.grad.detach().clone()))
    return grads
