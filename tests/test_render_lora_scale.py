"""`render --lora-scale S` / render.lora_scale: the trained LoRA at S times its strength (peft's adapter scale), the
learned tokens whole (issue 19, item 3: the baseline's curve includes its final LoRA scaled down)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_render_fixtures import make_project

from palpcompose import attach as attach_mod
from palpcompose.cli import main
from palpcompose.project import load_project
from palpcompose.render import generate, make_scheduler, render


@pytest.fixture
def project_dir(tmp_path, tiny_pipeline_dir):
    return make_project(tmp_path / "proj", tiny_pipeline_dir)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _render(project_dir, **options):
    return render(load_project(project_dir, check_images=False), seeds=[0, 1], scheduler="ddim", **options)


def _distance(a, b) -> float:
    return float(np.abs(a - b).mean())


def test_scale_one_draws_todays_images_bit_for_bit(project_dir, monkeypatch):
    scaled = _render(project_dir, lora_scale=1.0)
    monkeypatch.setattr(attach_mod, "set_lora_scale", lambda *a, **k: None)  # today's render: no scale set at all
    today = _render(project_dir)
    for a, b in zip(scaled.images, today.images, strict=True):
        assert np.array_equal(pixels(a.path), pixels(b.path))


def test_scale_moves_from_the_base_model_with_tokens_to_the_trained_lora(project_dir, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from palpcompose.weights import load_trained_weights

    full = _render(project_dir)
    half = _render(project_dir, lora_scale=0.5)
    tiny = _render(project_dir, lora_scale=1e-6)
    # the base model reading the learned tokens (LoRA off), drawn without the render command
    weights = load_trained_weights(project_dir / "out/weights/final")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    attach_mod.attach_trained_tokens(pipe, weights)
    tokens_only = [np.asarray(im).astype(np.int16)
                   for im in generate(pipe, [full.images[0].text] * 2, [0, 1], full.settings)]
    for i in range(2):
        f, h, t = pixels(full.images[i].path), pixels(half.images[i].path), pixels(tiny.images[i].path)
        assert np.abs(t - tokens_only[i]).max() <= 1  # scale -> 0: the base model with the tokens
        apart = _distance(f, tokens_only[i])
        assert apart > 1  # the LoRA matters in this fixture, so "in between" means something
        assert _distance(h, f) > 1 and _distance(h, tokens_only[i]) > 1  # 0.5 is neither end
    # In between, exactly where the LoRA acts: every adapted layer's output at 0.5 is the midpoint of the base
    # layer's and the full LoRA's; and the trained LoRA weights were not touched, only peft's scaling changed.
    attach_mod.attach_trained_weights(pipe, weights, lora_scale=0.5)
    layers = [m for m in pipe.unet.modules() if hasattr(m, "scaling") and "palp" in getattr(m, "scaling", {})]
    assert layers and all(m.scaling["palp"] == pytest.approx(0.5 * weights.lora_alpha / weights.rank) for m in layers)
    x = torch.randn(3, layers[0].get_base_layer().in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_half = layers[0](x)
        attach_mod.set_lora_scale(pipe.unet, 1.0)
        at_full, at_base = layers[0](x), layers[0].get_base_layer()(x)
    assert not torch.allclose(at_full, at_base, atol=1e-3)
    torch.testing.assert_close(at_half, (at_full + at_base) / 2, rtol=1e-5, atol=1e-6)
    state = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    for key, value in weights.lora.items():
        match = [v for k, v in state.items() if k.replace(".palp", "").endswith(key.replace("unet.", ""))]
        assert len(match) == 1 and torch.equal(match[0], value)


def test_scale_is_recorded_in_render_json_and_png_and_works_with_compare_and_sweep(project_dir):
    result = _render(project_dir, lora_scale=0.5, compare=True, sweep=True)
    index = json.loads((result.run_dir / "render.json").read_text())
    assert index["settings"]["lora_scale"] == 0.5
    assert {i.model for i in result.images} == {"base", "step-000002", "final"}
    with Image.open(result.run_dir / "final_p1_seed0.png") as im:
        assert "PALP LoRA scale: 0.5," in im.text["parameters"]
    with Image.open(result.run_dir / "step-000002_p1_seed0.png") as im:
        assert "PALP LoRA scale: 0.5," in im.text["parameters"]
    with Image.open(result.run_dir / "base_p1_seed0.png") as im:  # the base row has no LoRA to scale
        assert "LoRA scale" not in im.text["parameters"]
    plain = _render(project_dir, compare=True, sweep=True)
    by_file = {i.path.name: i.path for i in plain.images}
    for image in result.images:
        same = np.array_equal(pixels(image.path), pixels(by_file[image.path.name]))
        assert same == (image.model == "base")  # the base rows are untouched, every LoRA row is scaled


def test_render_lora_scale_key_is_read_from_palp_toml(project_dir):
    toml = project_dir / "palp.toml"
    toml.write_text(toml.read_text().replace("[render]\n", "[render]\nlora_scale = 0.25\n"))
    result = _render(project_dir)
    assert result.settings.lora_scale == 0.25
    assert _render(project_dir, lora_scale=1.0).settings.lora_scale == 1.0  # the option wins


def run_cli(*args) -> int:
    try:
        main(list(map(str, args)))
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("value", ["0", "-0.5", "2.01", "nan"])
def test_cli_refuses_scales_out_of_bounds_with_exit_2_and_writes_nothing(project_dir, value, capsys):
    assert run_cli("render", project_dir, "--lora-scale", value) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--lora-scale must be above 0 and at most 2" in err
    assert not (project_dir / "out" / "renders").exists()


@pytest.mark.parametrize("value", ["0", "3"])
def test_palp_toml_refuses_lora_scale_out_of_bounds(project_dir, value, capsys):
    toml = project_dir / "palp.toml"
    toml.write_text(toml.read_text().replace("[render]\n", f"[render]\nlora_scale = {value}\n"))
    assert run_cli("render", project_dir) == 2
    assert "render.lora_scale" in capsys.readouterr().err
    assert not (project_dir / "out" / "renders").exists()


def test_cli_scale_renders_and_says_so(project_dir, capsys):
    assert run_cli("render", project_dir, "--lora-scale", "1.5", "--seeds", "0") == 0
    (run,) = (project_dir / "out" / "renders").iterdir()
    assert json.loads((run / "render.json").read_text())["settings"]["lora_scale"] == 1.5
