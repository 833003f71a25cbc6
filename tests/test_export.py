"""`export`: every exported file loads in plain diffusers and renders what palpcompose renders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_render_fixtures import ALPHA, RANK, make_project

from palpcompose.cli import main
from palpcompose.errors import UserError
from palpcompose.export import export
from palpcompose.project import load_project
from palpcompose.render import generate, make_scheduler, render
from palpcompose.weights import load_trained_weights

TOKENS = {"V1": "<duo-v1>", "V2": "<duo-v2>"}
PROMPT = "an oil painting of [V1] inspired by [V2] painting"
TEXT = "an oil painting of <duo-v1> inspired by <duo-v2> painting"


@pytest.fixture(scope="module")
def base(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def project(tmp_path_factory, base):
    return load_project(make_project(tmp_path_factory.mktemp("export") / "proj", base), check_images=False)


@pytest.fixture(scope="module")
def reference(project):
    """palpcompose's own render of the target prompt, seed 3, with the stochastic sampler (its noise must match)."""
    result = render(project, prompts=[PROMPT], seeds=[3], scheduler="euler-a")
    with Image.open(result.images[0].path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16), result.settings


class DiffusersWarnings(logging.Handler):
    """Collects what diffusers logs at WARNING and above (unmatched LoRA keys are reported that way)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def plain_pipeline(base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("euler-a", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_plain(pipe, settings) -> np.ndarray:
    return np.asarray(generate(pipe, [TEXT], [3], settings)[0]).astype(np.int16)


def loaded_lora(pipe) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    (adapter,) = pipe.unet.peft_config
    assert pipe.unet.peft_config[adapter].lora_alpha == ALPHA and pipe.unet.peft_config[adapter].r == RANK
    return get_peft_model_state_dict(pipe.unet, adapter_name=adapter)


def assert_same_lora(loaded, trained):
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)


def assert_loads_in_plain_diffusers_and_renders_the_same(base, folder, weight_name, project, reference):
    """Plain diffusers loads the exported LoRA (every key matched) and each embedding; the LoRA is the trained one,
    and the image is the one palpcompose renders (`reference`)."""
    pipe = plain_pipeline(base)
    warnings = DiffusersWarnings()
    logging.getLogger("diffusers").addHandler(warnings)
    try:
        pipe.load_lora_weights(folder, **({"weight_name": weight_name} if weight_name else {}))
        for token in TOKENS.values():
            pipe.load_textual_inversion(folder / f"{token.strip('<>')}.safetensors", token=token)
    finally:
        logging.getLogger("diffusers").removeHandler(warnings)
    assert not [m for m in warnings.messages if "unexpected keys" in m or "missing keys" in m], (
        warnings.messages
    )
    assert_same_lora(loaded_lora(pipe), load_trained_weights(project.root / "out/weights/final").lora)
    image, settings = reference
    assert np.abs(render_plain(pipe, settings) - image).max() <= 2


def test_diffusers_export_loads_in_plain_diffusers_and_renders_the_same(project, base, reference, tmp_path):
    result = export(project, "diffusers", tmp_path / "exp")
    names = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert names == ["duo-v1.safetensors", "duo-v2.safetensors", "pytorch_lora_weights.safetensors"]
    assert len(result.files) == 3

    assert_loads_in_plain_diffusers_and_renders_the_same(base, tmp_path / "exp", None, project, reference)


def test_webui_export_is_kohya_and_renders_the_same_as_the_diffusers_export(
    project, base, reference, tmp_path
):
    export(project, "webui", tmp_path / "webui")
    lora = load_file(tmp_path / "webui" / "duo.safetensors")
    assert all(k.startswith("lora_unet_") for k in lora)
    alphas = [k for k in lora if k.endswith(".alpha")]
    assert len(alphas) == len(lora) // 3 and all(float(lora[k]) == ALPHA for k in alphas)
    assert any(k.endswith("_attn2_to_out_0.lora_up.weight") for k in lora)
    for token in TOKENS.values():
        embedding = load_file(tmp_path / "webui" / f"{token.strip('<>')}.safetensors")
        assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (1, 16)

    # Back through diffusers' kohya reader: every key matched, the very same weights, the same image.
    assert_loads_in_plain_diffusers_and_renders_the_same(base, tmp_path / "webui", "duo.safetensors", project,
                                                         reference)


@pytest.mark.parametrize("fmt", ["diffusers", "webui"])
def test_every_exported_file_says_what_it_is_in_its_header(project, tmp_path, fmt):
    result = export(project, fmt, tmp_path / fmt)
    for f in result.files:
        with safe_open(str(f.path), framework="pt") as handle:
            meta = handle.metadata()
        assert meta["palpcompose_version"] == "0.1.0"
        assert meta["base_model"] == project.config.project.base_model
        assert '"V1": "<duo-v1>"' in meta["tokens"]
        if f.kind == "embedding":
            assert meta["token"] == f.token and meta["trigger_word"] == f.path.stem


def test_export_of_a_snapshot_uses_its_weights(project, tmp_path):
    export(project, "diffusers", tmp_path / "snap", step=2)
    got = load_file(tmp_path / "snap" / "duo-v1.safetensors")["<duo-v1>"]
    torch.testing.assert_close(
        got, load_trained_weights(project.root / "out/snapshots/step-000002").embeddings["<duo-v1>"]
    )


def test_export_never_overwrites_without_force(project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export(project, "webui", out)  # other files in the folder are fine
    before = (out / "duo.safetensors").read_bytes()
    with pytest.raises(UserError, match="--force"):
        export(project, "webui", out, step=2)
    assert (out / "duo.safetensors").read_bytes() == before
    export(project, "webui", out, step=2, force=True)
    assert (out / "duo.safetensors").read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args", [["--format", "onnx"], ["--format", "webui", "--step", "7"],
                                  ["--format", "webui", "--out", " "]])
def test_cli_export_bad_input_exits_2_and_writes_nothing(project, tmp_path, args, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(project.root), "--out", str(out), *args])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()


def test_cli_export_to_a_folder_that_cannot_be_made_exits_2(project, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(project.root), "--format", "diffusers", "--out", str(tmp_path / "afile" / "sub")])
    assert exc.value.code == 2 and "afile is a file, so the folder cannot be created" in capsys.readouterr().err
    # a disk that fills up half way: nothing changes in --out, with --force over an earlier export too
    import os

    from palpcompose import fsutil

    main(["export", str(project.root), "--format", "diffusers", "--out", str(tmp_path / "full")])
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "full").iterdir()}
    real_fsync, calls = os.fsync, []

    def disk_full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fsutil.os, "fsync", disk_full_on_the_second_file)
    for out in (tmp_path / "full", tmp_path / "new" / "deeper"):
        calls.clear()
        with pytest.raises(SystemExit) as exc:
            main(["export", str(project.root), "--format", "diffusers", "--out", str(out), "--step", "2", "--force"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "(No space left on device); nothing was changed" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "full").iterdir()} == before  # no temp files either
    assert not (tmp_path / "new").exists()


def test_cli_export_prints_the_files(project, tmp_path, capsys):
    main(["export", str(project.root), "--format", "webui", "--out", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert "duo-v1" in out and "<lora:duo:1>" in out
