"""The toy world: CLI formats, determinism, attributes that change pixels, the oracle, and builtin:toy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palpcompose.toyworld import world
from palpcompose.toyworld.__main__ import main as toyworld_main

PACKAGE = Path(__file__).resolve().parents[1] / "palpcompose"


def _scenes(n=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return world.sample_scenes(n, g, **kw), g


def test_vocab_json_shape(capsys):
    toyworld_main(["vocab"])
    data = json.loads(capsys.readouterr().out)
    assert len(data["styles"]) >= 4 and len(data["ambiances"]) >= 4
    assert len(data["classes"]) >= 5 and len(data["colors"]) >= 5
    assert "a sketch of" in data["styles"] and "at night" in data["ambiances"]
    assert all(isinstance(x, str) and x for key in ("styles", "ambiances", "classes", "colors") for x in data[key])


def test_prompt_order_style_before_object_ambiance_after():
    obj = world.object_phrase("star", "red")
    assert world.compose_prompt("watercolor", obj, "sunset") == "a watercolor painting of a red star at sunset"
    assert world.compose_prompt("photo", world.object_phrase("heart", "orange", "dots", "white")) == (
        "a photo of an orange heart with white dots")


def test_subject_command_writes_pngs_and_json(tmp_path, capsys):
    from PIL import Image

    toyworld_main(["subject", "--seed", "5", "--count", "3", "--out", str(tmp_path / "refs")])
    info = json.loads(capsys.readouterr().out)
    files = sorted((tmp_path / "refs").glob("*.png"))
    assert len(files) == 3 and [str(f) for f in files] == info["files"]
    assert info["class_name"] in world.CLASSES and info["held_out"] is True
    assert info["pattern"] != "solid"
    with Image.open(files[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    a, b = (torch.tensor(list(Image.open(f).getdata())) for f in files[:2])
    assert not torch.equal(a, b)  # varied placements


def test_subject_command_rejects_bad_count_and_writes_nothing(tmp_path):
    out = tmp_path / "refs"
    proc = subprocess.run([sys.executable, "-m", "palpcompose.toyworld", "subject", "--seed", "1", "--count", "0",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--count" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_generator_is_deterministic_from_a_seed():
    s1, g1 = _scenes(6, seed=3, styles=world.ALL_STYLES)
    s2, g2 = _scenes(6, seed=3, styles=world.ALL_STYLES)
    assert torch.equal(world.render(s1, g1), world.render(s2, g2))
    s3, g3 = _scenes(6, seed=4, styles=world.ALL_STYLES)
    assert not torch.equal(world.render(s1, torch.Generator().manual_seed(0)),
                           world.render(s3, torch.Generator().manual_seed(0)))


def _replace(s: world.Scenes, **fields) -> world.Scenes:
    d = dict(s.__dict__)
    d.update({k: torch.full_like(d[k], v) for k, v in fields.items()})
    return world.Scenes(**d)


def _background_mask(s: world.Scenes) -> torch.Tensor:
    """Pixels well away from the object (and its outline/shadow)."""
    x, y = world._grid("cpu")
    scale = s.scale[:, None, None]
    u, v = world._rotate((x - s.center[:, 0, None, None]) / scale, (y - s.center[:, 1, None, None]) / scale, s.angle)
    return (world.shape_sdf(s.cls, u, v) * scale * 32 > 6)[:, None].expand(-1, 3, -1, -1)


@pytest.mark.parametrize("field,values", [
    ("style", range(len(world.ALL_STYLES))),
    ("ambiance", range(len(world.AMBIANCES))),
])
def test_style_and_ambiance_change_the_background(field, values):
    s, _ = _scenes(4, seed=7)
    s = _replace(s, style=0, ambiance=0)
    bg = _background_mask(s)
    renders = [world.render_seeded(_replace(s, **{field: v}), 0) for v in values]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            diff = (renders[i] - renders[j]).abs()[bg].mean()
            assert diff > 0.04, f"{field} {i} vs {j}: background barely changes ({diff:.3f})"


@pytest.mark.parametrize("field,values", [
    ("cls", range(len(world.CLASSES))),
    ("color", range(len(world.COLORS))),
    ("pattern", range(len(world.PATTERNS))),
])
def test_object_attributes_change_pixels(field, values):
    s, _ = _scenes(4, seed=8)
    s = _replace(s, style=0, ambiance=0, pattern=1, color=0, color2=4)
    renders = [world.render_seeded(_replace(s, **{field: v}), 0) for v in values]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            assert (renders[i] - renders[j]).abs().mean() > 0.005, f"{field} {i} vs {j} look the same"


def test_training_scenes_never_contain_held_out_subjects():
    s, _ = _scenes(20000, seed=1)
    seen = set(zip(s.cls.tolist(), s.color.tolist(), s.pattern.tolist(), s.color2.tolist()))
    for seed in world.HELD_OUT_SUBJECT_SEEDS:
        sub = world.subject_from_seed(seed)
        assert (sub.cls, sub.color, sub.pattern, sub.color2) not in seen
    # without the exclusion the same draw does contain some of them
    s2, _ = _scenes(20000, seed=1, exclude_held_out_subjects=False)
    seen2 = set(zip(s2.cls.tolist(), s2.color.tolist(), s2.pattern.tolist(), s2.color2.tolist()))
    assert any((sub.cls, sub.color, sub.pattern, sub.color2) in seen2
               for sub in map(world.subject_from_seed, world.HELD_OUT_SUBJECT_SEEDS))


def test_tokenizer_encodes_world_words_as_single_tokens_and_any_text(tmp_path):
    from palpcompose.toyworld import tokenizer

    tok = tokenizer.make_tokenizer(tmp_path)
    for word in tokenizer.words():
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a photo of <toy-v1> ünïcode ✓").input_ids
    assert tok.unk_token_id not in ids[1:-1]
