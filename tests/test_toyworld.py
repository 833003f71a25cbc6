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
    import numpy as np

    a, b = (np.asarray(Image.open(f)) for f in files[:2])
    assert not np.array_equal(a, b)  # varied placements


def test_subject_command_rejects_bad_count_and_writes_nothing(tmp_path):
    out = tmp_path / "refs"
    proc = subprocess.run([sys.executable, "-m", "palpcompose.toyworld", "subject", "--seed", "1", "--count", "0",
                           "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--count" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_generator_is_deterministic_from_a_seed():
    s1, g1 = _scenes(6, seed=3, styles=world.ALL_STYLES)
    s2, g2 = _scenes(6, seed=3, styles=world.ALL_STYLES)
    assert torch.equal(world.render(s1, g1), world.render(s2, g2))
    s3, _ = _scenes(6, seed=4, styles=world.ALL_STYLES)
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
    s = _replace(s, style=0, ambiance=0, pattern=1, color=0, color2=7, scale=0.5)
    renders = [world.render_seeded(_replace(s, **{field: v}), 0) for v in values]
    for i in range(len(renders)):
        for j in range(i + 1, len(renders)):
            changed = ((renders[i] - renders[j]).abs().amax(1) > 0.1).float().mean()
            assert changed > 0.015, f"{field} {i} vs {j} look the same ({changed:.3f} of the pixels change)"


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


# ------------------------------------------------------------------------------------------------------------------
# The oracle and its metrics
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    from palpcompose.toyworld.oracle import load_oracle

    return load_oracle()


def test_oracle_recognises_fresh_renders(oracle):
    from palpcompose.toyworld.oracle import accuracy

    s, g = _scenes(48, seed=123)
    acc = accuracy(oracle, world.render(s, g), s)
    for head in ("cls", "color", "style", "ambiance"):
        assert acc[head] >= 0.9, (head, acc)


def test_text_alignment_counts_named_elements(oracle):
    from palpcompose.toyworld.oracle import parse_prompt, score_text_alignment

    s, g = _scenes(1, seed=5)
    s = _replace(s, style=1, ambiance=1, cls=3, color=0, pattern=0)  # a sketch of a red star at night
    images = world.render(s, g)
    assert parse_prompt("a sketch of a red star at night").named() == {"style": 1, "ambiance": 1, "cls": 3, "color": 0}
    assert score_text_alignment(images, "a sketch of a red star at night", oracle) == [1.0]
    # wrong style and ambiance: two of the four named elements are missing
    assert score_text_alignment(images, "a photo of a red star underwater", oracle) == [0.5]
    # only what is named counts: a placeholder subject names no class
    assert parse_prompt("a sketch of <demo-v1> at night").named() == {"style": 1, "ambiance": 1}


def test_text_alignment_rejects_prompt_naming_nothing(oracle):
    from palpcompose.errors import UserError
    from palpcompose.toyworld.oracle import score_text_alignment

    with pytest.raises(UserError, match="names no toy-world element"):
        score_text_alignment(torch.zeros(1, 3, 64, 64), "a portrait of my dog", oracle)


def test_subject_fidelity_prefers_the_same_subject(oracle, tmp_path):
    from PIL import Image

    from palpcompose.toyworld.oracle import score_subject_fidelity

    a, b = world.subject_from_seed(0), world.subject_from_seed(1)
    assert (a.cls, a.color, a.pattern, a.color2) != (b.cls, b.color, b.pattern, b.color2)
    g = torch.Generator().manual_seed(0)
    refs_a = world.render(world.subject_scenes(a, 4, g), g)
    refs_pil = [Image.fromarray((r.permute(1, 2, 0) * 255).byte().numpy()) for r in refs_a]  # PIL input works too
    new_a = world.render(world.subject_scenes(a, 4, g, style="watercolor", ambiance="snow"), g)
    new_b = world.render(world.subject_scenes(b, 4, g), g)
    same = score_subject_fidelity(new_a, refs_pil, oracle)
    other = score_subject_fidelity(new_b, refs_pil, oracle)
    assert all(0.0 <= x <= 1.0 for x in same + other)
    assert sum(same) / 4 > 0.75 and sum(same) / 4 > sum(other) / 4 + 0.3


# ------------------------------------------------------------------------------------------------------------------
# builtin:toy
# ------------------------------------------------------------------------------------------------------------------


def test_shipped_weights_are_fp16_and_within_25_mb():
    from safetensors import safe_open

    files = [*(PACKAGE / "builtin" / "toy").rglob("*.safetensors"), *(PACKAGE / "toyworld").glob("*.safetensors")]
    assert len(files) >= 4
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {st.get_slice(k).get_dtype() for k in st.keys()}  # noqa: SIM118 (safe_open is not a dict)
        assert "F32" not in dtypes, f


def test_builtin_toy_loads_offline_and_renders(monkeypatch):
    from palpcompose.models import load_pipeline, resolve_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(resolve_base_model("builtin:toy"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.__class__.__name__ == "DPMSolverMultistepScheduler"
    out = pipe("a pop art painting of a blue heart at sunset", num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all() and out.std() > 0.05


def test_second_colours_can_be_limited_to_white_and_black():
    choices = ("white", "black")
    s, _ = _scenes(5000, seed=2, color2_choices=choices)
    assert {world.COLORS2[i] for i in s.color2.tolist()} == set(choices)
    subjects = [world.subject_from_seed(seed, choices) for seed in range(200)]
    assert {world.COLORS2[x.color2] for x in subjects} == set(choices)
    # held-out subjects are excluded under the same choices
    seen = set(zip(s.cls.tolist(), s.color.tolist(), s.pattern.tolist(), s.color2.tolist()))
    for seed in world.HELD_OUT_SUBJECT_SEEDS:
        sub = world.subject_from_seed(seed, choices)
        assert (sub.cls, sub.color, sub.pattern, sub.color2) not in seen
    # the default world is still v1's: the toy demo's subject (seed 1) is a blue star with white dots
    s1 = world.subject_from_seed(1)
    assert (world.CLASSES[s1.cls], world.COLORS[s1.color], world.PATTERNS[s1.pattern],
            world.COLORS2[s1.color2]) == ("star", "blue", "dots", "white")


def test_second_colour_choices_must_not_be_main_colours():
    with pytest.raises(ValueError, match="color2_choices"):
        world.check_color2_choices(("white", "red"))
    with pytest.raises(ValueError):
        world.check_color2_choices(())
