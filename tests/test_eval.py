"""`eval`: oracle and CLIP metrics, out/eval.json, --renders, and bad input exiting 2 with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tree_snapshot
from test_render_fixtures import make_project

from palpcompose.evaluate import OracleScorer, class_word_prompt, subjects_in
from palpcompose.project import load_project
from palpcompose.toyworld import oracle as toy_oracle
from palpcompose.toyworld import world

SHIPPED_ORACLE = toy_oracle.ORACLE_PATH.is_file()
TARGET = "a sketch of [V1] inspired by [V2] painting at night"


@pytest.fixture
def oracle(monkeypatch):
    """The shipped oracle; while it is not shipped yet, a seeded freshly initialised one (same code path)."""
    if SHIPPED_ORACLE:
        return toy_oracle.load_oracle()
    torch.manual_seed(0)
    model = toy_oracle.Oracle().eval()
    monkeypatch.setattr(toy_oracle, "load_oracle", lambda *a, **k: model)
    return model


def toy_refs(folder, seed: int, count: int, style: str = "photo", ambiance: str = "day"):
    """`count` toy-world PNGs of held-out subject `seed` in `style` and `ambiance`."""
    from palpcompose.fsutil import atomic_save_image

    subject = world.subject_from_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images = world.render(world.subject_scenes(subject, count, g, style=style, ambiance=ambiance), g)
    for i, img in enumerate(images):
        atomic_save_image(folder / f"{seed}-{i}.png", world.to_pil(img))
    return subject


@pytest.fixture
def toy_project(tmp_path, tiny_pipeline_dir):
    """A trained-looking two-subject project (tiny pipeline) whose references are toy-world images: V1 a held-out
    subject (object), V2 one pixel-art picture (artwork), and a target prompt in toy-world words."""
    root = make_project(tmp_path / "proj", tiny_pipeline_dir)
    subject = toy_refs(root / "refs" / "obj", seed=7, count=3)
    toy_refs(root / "refs" / "art", seed=11, count=1, style="pixel art")
    text = (root / "palp.toml").read_text()
    text = text.replace('class_name = "cat"', f'class_name = "{subject.class_name}"')
    text = text.replace('images = ["refs/cat.png"]', 'images = ["refs/obj"]')
    text = text.replace('images = ["refs/art.png"]', 'images = ["refs/art"]')
    text = re.sub(r'target_prompt = ".*"', f'target_prompt = "{TARGET}"', text)
    (root / "palp.toml").write_text(text)
    return root


def test_placeholders_become_class_words_for_the_metrics():
    words = {"V1": "star", "V2": "painting"}
    assert class_word_prompt("a sketch of [V1] inspired by [V2] painting", words) == (
        "a sketch of star inspired by painting painting")
    assert subjects_in("[V2] and [V1] and [V2] and [V9]", words) == ["V2", "V1"]


def test_oracle_eval_writes_eval_json_with_means_in_range(toy_project, oracle, run_cli):
    result = run_cli("eval", toy_project, "--oracle")
    assert result.code == 0, result.err
    data = json.loads((toy_project / "out" / "eval.json").read_text())
    assert data["metric"] == "toy-oracle"
    assert 0 <= data["text_alignment"] <= 1 and 0 <= data["subject_fidelity"] <= 1
    assert len(data["images"]) == 2  # render.seeds = [0, 1], one target prompt
    for row in data["images"]:
        assert 0 <= row["text_alignment"] <= 1 and 0 <= row["subject_fidelity"] <= 1
        assert set(row["subjects"]) == {"V1", "V2"}
        # sketch, night and the class of [V1] are the named elements
        assert sorted(row["elements"]) == sorted(["style sketch", "ambiance night",
                                                  f"cls {world.subject_from_seed(7).class_name}"])
        assert row["text_alignment"] == pytest.approx(sum(row["elements"].values()) / 3)
    assert data["subjects"]["V1"]["scored_as"].startswith("object")
    assert data["subjects"]["V2"]["scored_as"] == "artwork (style pixel art, ambiance day)"
    flat = result.out.replace("\n", "")  # rich wraps long paths at the console width
    assert "mean" in result.out and "eval.json" in flat



def test_a_model_folders_own_oracle_is_its_instrument(tmp_path, toy_project, run_cli):
    """A toy-world model exported with its read-out carries FOLDER/oracle.safetensors: eval reads with it (and says
    so in eval.json); a model folder without one is read by the shipped oracle."""
    import shutil

    from safetensors.torch import save_file

    project = load_project(toy_project)
    base = Path(project.config.project.base_model)
    base = base if base.is_absolute() else toy_project / base
    assert OracleScorer(project).oracle_path == toy_oracle.ORACLE_PATH
    model = tmp_path / "model-with-oracle"
    shutil.copytree(base, model)
    torch.manual_seed(3)
    own = toy_oracle.Oracle()
    save_file({k: v.half().contiguous() for k, v in own.state_dict().items()},
              str(model / toy_oracle.MODEL_ORACLE_FILE))
    text = (toy_project / "palp.toml").read_text().replace(str(project.config.project.base_model), str(model))
    (toy_project / "palp.toml").write_text(text)
    scorer = OracleScorer(load_project(toy_project))
    assert scorer.oracle_path == model / toy_oracle.MODEL_ORACLE_FILE
    key = next(iter(own.state_dict()))
    assert torch.equal(scorer.oracle.state_dict()[key], own.state_dict()[key].half().float())
    run = toy_project / "out" / "renders" / "20260101-000000"  # toy-world pictures scored as a render folder
    toy_refs(run, seed=7, count=2, style="sketch")
    (run / "render.json").write_text(json.dumps({"images": [
        {"file": f"7-{i}.png", "model": "final", "step": 4, "prompt": TARGET, "text": "", "seed": i}
        for i in range(2)]}))
    result = run_cli("eval", toy_project, "--oracle", "--renders", run.name)
    assert result.code == 0, result.err
    assert json.loads((toy_project / "out" / "eval.json").read_text())["oracle"] == str(
        model / toy_oracle.MODEL_ORACLE_FILE)

def test_oracle_scores_match_the_oracle_module(toy_project, oracle):
    """eval's per-image numbers are the oracle module's definitions (text alignment, object fidelity)."""
    project = load_project(toy_project)
    refs = [toy_project / "refs" / "obj" / f"7-{i}.png" for i in range(3)]
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in sorted((toy_project / "refs" / "art").glob("*.png")) + refs]
    scores = OracleScorer(project, oracle).score(images, "a photo of [V1] at night")
    expected_text = toy_oracle.score_text_alignment(images, "a photo of star at night".replace(
        "star", project.config.subjects["V1"].class_name), oracle)
    assert scores.text_alignment == pytest.approx(expected_text)
    ref_images = [Image.open(p).convert("RGB") for p in refs]
    assert scores.subjects["V1"] == pytest.approx(toy_oracle.score_subject_fidelity(images, ref_images, oracle))
    assert set(scores.subjects) == {"V1"}


@pytest.mark.skipif(not SHIPPED_ORACLE, reason="needs the shipped toy-world oracle weights")
def test_fidelity_separates_the_subject_from_others(tmp_path, toy_project, oracle):
    """The subject's own (unseen) pictures score high, another subject's low; the artwork's style likewise."""
    project = load_project(toy_project)
    scorer = OracleScorer(project, oracle)
    own = toy_refs(tmp_path / "own", seed=7, count=4) and sorted((tmp_path / "own").glob("*.png"))
    other = toy_refs(tmp_path / "other", seed=3, count=4) and sorted((tmp_path / "other").glob("*.png"))
    from PIL import Image

    def fidelity(paths, prompt):
        return scorer.score([Image.open(p).convert("RGB") for p in paths], prompt).subjects

    assert min(fidelity(own, "a photo of [V1]")["V1"]) > 0.8
    assert max(fidelity(other, "a photo of [V1]")["V1"]) < 0.6
    pixel = toy_refs(tmp_path / "pix", seed=3, count=4, style="pixel art") and sorted((tmp_path / "pix").glob("*.png"))
    assert min(fidelity(pixel, "a photo of [V2] painting")["V2"]) > 0.8
    # the artwork (pixel art, day) is judged on its style and ambiance: half of it is a half score
    assert max(fidelity(other, "a photo of [V2] painting")["V2"]) < 0.6  # photo, day
    night = toy_refs(tmp_path / "night", seed=3, count=4, style="sketch", ambiance="night") and sorted(
        (tmp_path / "night").glob("*.png"))
    assert max(fidelity(night, "a photo of [V2] painting")["V2"]) < 0.1  # neither its style nor its ambiance


def test_renders_option_scores_an_existing_run_without_rendering(toy_project, oracle, run_cli):
    """A run folder as `render` writes it (render.json + PNGs); here its images are toy-world pictures."""
    run = toy_project / "out" / "renders" / "20260101-000000"
    toy_refs(run, seed=7, count=3, style="sketch")
    images = [{"file": f"7-{i}.png", "model": "final", "step": 4, "prompt": TARGET, "text": "", "seed": i}
              for i in range(3)]
    (run / "render.json").write_text(json.dumps({"images": images}))
    result = run_cli("eval", toy_project, "--oracle", "--renders", run.name)
    assert result.code == 0, result.err
    data = json.loads((toy_project / "out" / "eval.json").read_text())
    assert data["renders"] == str(run)
    assert [r["seed"] for r in data["images"]] == [0, 1, 2]
    assert len(list((toy_project / "out" / "renders").iterdir())) == 1  # nothing new rendered


def test_every_object_a_prompt_names_is_an_element():
    """Two object subjects in one prompt: both classes count (the toy world draws one object per scene, so a render
    can never match both), not only the last class word."""
    elements = toy_oracle.prompt_elements("a sketch of star and circle at night")
    assert elements == [("style", 1), ("ambiance", 1), ("cls", 3), ("cls", 0)]
    assert toy_oracle.prompt_elements("a sketch of a red star and a blue heart")[1:] == [
        ("cls", 3), ("color", 0), ("cls", 5), ("color", 4)]
    assert toy_oracle.prompt_elements("a photo of a star and a star") == [("style", 0), ("cls", 3)]


def test_two_object_subjects_are_both_scored(tmp_path, toy_project, oracle):
    """eval of "[V1] and [V2]" with two toy objects: both classes are elements and both subjects get a fidelity;
    one drawn object cannot score 1.0."""
    text = (toy_project / "palp.toml").read_text()
    toy_refs(toy_project / "refs" / "obj2", seed=3, count=2)  # a triangle; subject 7 is a square
    text = text.replace('class_name = "painting"', f'class_name = "{world.subject_from_seed(3).class_name}"')
    (toy_project / "palp.toml").write_text(text.replace('images = ["refs/art"]', 'images = ["refs/obj2"]'))
    project = load_project(toy_project)
    scorer = OracleScorer(project, oracle)
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in sorted((toy_project / "refs" / "obj").glob("*.png"))]
    scores = scorer.score(pictures, "a photo of [V1] and [V2]")
    assert set(scores.subjects) == {"V1", "V2"}
    names = [world.subject_from_seed(7).class_name, world.subject_from_seed(3).class_name]
    assert sorted(scores.details[0]["elements"]) == sorted(["style photo"] + [f"cls {n}" for n in names])
    assert max(scores.text_alignment) <= 2 / 3 + 1e-6  # photo and one class at most: one object per scene


def compare_run(root, name: str, own_seed: int = 7, other_seed: int = 3):
    """A `render --compare` folder: base-model images (another subject) and final-weights images (the subject)."""
    run = root / "out" / "renders" / name
    toy_refs(run / "b", seed=other_seed, count=2, style="sketch", ambiance="night")
    toy_refs(run / "f", seed=own_seed, count=2, style="sketch", ambiance="night")
    images = []
    for label, folder, step in (("base", "b", None), ("final", "f", 4)):
        for i, path in enumerate(sorted((run / folder).glob("*.png"))):
            path.rename(run / f"{label}_p1_seed{i}.png")
            images.append({"file": f"{label}_p1_seed{i}.png", "model": label, "step": step, "prompt": TARGET,
                           "text": "", "seed": i})
    (run / "render.json").write_text(json.dumps({"images": images}))
    return run


def test_compare_run_gets_one_mean_per_set_of_weights_and_names_their_guidance(toy_project, oracle):
    from palpcompose.evaluate import evaluate

    (toy_project / "out" / "manifest.json").write_text(json.dumps({"guidance": "sds", "status": "completed"}))
    run = compare_run(toy_project, "20260101-000000-compare")
    project = load_project(toy_project)
    result = evaluate(project, renders=run, scorer=OracleScorer(project, oracle))
    data = json.loads((toy_project / "out" / "eval.json").read_text())
    assert list(data["models"]) == ["base", "final"]
    assert data["models"]["base"]["guidance"] is None and data["models"]["final"]["guidance"] == "sds"
    assert data["means_of"] == "final" and data["guidance"] == "sds" == result.guidance
    finals = [r for r in data["images"] if r["model"] == "final"]
    assert data["text_alignment"] == pytest.approx(sum(r["text_alignment"] for r in finals) / len(finals))
    assert data["subjects"]["V1"]["subject_fidelity"] == pytest.approx(
        sum(r["subjects"]["V1"] for r in finals) / len(finals))
    base_v1 = data["models"]["base"]["subjects"]["V1"]
    assert data["models"]["final"]["subjects"]["V1"] > base_v1 + 0.3  # the subject's own images vs another's
    assert all(r["guidance"] == ("sds" if r["model"] == "final" else None) for r in data["images"])


def test_the_table_of_a_compare_run_shows_one_mean_row_per_set_of_weights(toy_project, oracle):
    """The printed table, like eval.json: a mean row for the base model and one for the final weights, each named,
    not one "mean" row holding the final weights' means under every image."""
    import io

    from rich.console import Console

    from palpcompose.evaluate import evaluate, summary_table

    project = load_project(toy_project)
    result = evaluate(project, renders=compare_run(toy_project, "20260101-000000-compare"),
                      scorer=OracleScorer(project, oracle))
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(summary_table(result))
    rows = {line.split("│")[1].strip(): line for line in buffer.getvalue().splitlines()
            if line.startswith("│") and "mean" in line}
    assert sorted(rows) == ["mean (base)", "mean (final)"], buffer.getvalue()
    for label, means in result.models.items():
        assert f"{means['text_alignment']:.3f}" in rows[f"mean ({label})"]
        assert f"{means['subjects']['V1']:.3f}" in rows[f"mean ({label})"]


def test_renders_by_name_finds_a_render_of_a_kept_run(toy_project, oracle):
    """`render --run ID` writes to out/runs/ID/renders/NAME; `eval --renders NAME` finds it there too."""
    from palpcompose.errors import UserError
    from palpcompose.evaluate import resolve_renders

    made = compare_run(toy_project, "20260101-000000-compare")
    kept = toy_project / "out" / "runs" / "2026-01-01T00-00-00-palp" / "renders" / made.name
    kept.parent.mkdir(parents=True)
    made.rename(kept)
    project = load_project(toy_project)
    assert resolve_renders(project, made.name) == kept
    with pytest.raises(UserError, match="nor a run of that name"):
        resolve_renders(project, "20990101-000000")


def test_existing_renders_keep_the_guidance_render_json_recorded(toy_project, oracle):
    """A render of a kept `none` run, scored after a `palp` run became the current one: its guidance is the one
    render.json recorded for its images, not the current run's manifest."""
    from palpcompose.evaluate import evaluate

    (toy_project / "out" / "manifest.json").write_text(json.dumps({"guidance": "palp", "status": "completed"}))
    run = compare_run(toy_project, "20260101-000000-compare")
    index = json.loads((run / "render.json").read_text())
    for image in index["images"]:
        image["guidance"] = "base" if image["model"] == "base" else "none"
    (run / "render.json").write_text(json.dumps(index))
    project = load_project(toy_project)
    result = evaluate(project, renders=run, scorer=OracleScorer(project, oracle))
    assert result.models["final"]["guidance"] == "none" == result.guidance
    assert result.models["base"]["guidance"] is None


def test_eval_results_are_kept_per_render_run(toy_project, oracle):
    from palpcompose.evaluate import evaluate

    project = load_project(toy_project)
    scorer = OracleScorer(project, oracle)
    first = compare_run(toy_project, "20260101-000000-compare")
    second = compare_run(toy_project, "20260102-000000-compare", own_seed=3, other_seed=7)
    evaluate(project, renders=first, scorer=scorer)
    evaluate(project, renders=second, scorer=scorer)
    kept = json.loads((first / "eval.json").read_text())
    latest = json.loads((second / "eval.json").read_text())
    assert kept["renders"] == str(first) and latest["renders"] == str(second)
    assert json.loads((toy_project / "out" / "eval.json").read_text()) == latest  # out/eval.json: the latest
    assert kept["subject_fidelity"] != latest["subject_fidelity"]


def test_eval_keeps_its_result_in_a_render_out_folder_but_writes_nothing_into_a_folder_of_loose_images(
        toy_project, oracle, tmp_path):
    import shutil

    from palpcompose.evaluate import evaluate

    project = load_project(toy_project)
    scorer = OracleScorer(project, oracle)
    rendered = tmp_path / "elsewhere" / "render-out"  # as `render --out PATH` leaves it: PNGs and render.json
    rendered.parent.mkdir()
    shutil.move(compare_run(toy_project, "20260101-000000-compare"), rendered)
    result = evaluate(project, renders=rendered, scorer=scorer)
    assert result.run_eval_json == rendered / "eval.json"
    assert json.loads((rendered / "eval.json").read_text())["renders"] == str(rendered)
    loose = tmp_path / "my-pictures"  # the user's own folder, no render.json
    toy_refs(loose, seed=7, count=2, style="sketch", ambiance="night")
    before = sorted(p.name for p in loose.iterdir())
    assert evaluate(project, renders=loose, scorer=scorer).run_eval_json is None
    assert sorted(p.name for p in loose.iterdir()) == before
    assert json.loads((toy_project / "out" / "eval.json").read_text())["renders"] == str(loose)  # the latest


def write_tiny_clip(folder, tokenizer_dir):
    """A random tiny CLIP (text + vision towers), its tokenizer and image processor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, tiny_pipeline_dir):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", tiny_pipeline_dir / "tokenizer")


def test_clip_eval_on_a_tiny_random_clip(tmp_path, tiny_pipeline_dir, tiny_clip, run_cli):
    root = make_project(tmp_path / "proj", tiny_pipeline_dir)
    result = run_cli("eval", root, "--clip", tiny_clip, "--seeds", "0-2")
    assert result.code == 0, result.err
    data = json.loads((root / "out" / "eval.json").read_text())
    assert data["metric"] == "clip" and data["clip_model"] == str(tiny_clip)
    assert 0 <= data["text_alignment"] <= 1 and 0 <= data["subject_fidelity"] <= 1
    assert len(data["images"]) == 3
    for row in data["images"]:
        assert -1 <= row["text_cosine"] <= 1
        assert row["text_alignment"] == pytest.approx(max(row["text_cosine"], 0.0))
        assert set(row["image_cosine"]) == {"V1", "V2"}
        assert row["subject_fidelity"] == pytest.approx(
            sum(max(c, 0.0) for c in row["image_cosine"].values()) / 2)


def test_clip_text_uses_class_words(tmp_path, tiny_pipeline_dir, tiny_clip):
    """The text side sees 'cat'/'painting', never the learned tokens: same score as the class-word prompt."""
    from PIL import Image

    from palpcompose.evaluate import ClipScorer

    project = load_project(make_project(tmp_path / "proj", tiny_pipeline_dir))
    scorer = ClipScorer(project, tiny_clip)
    image = [Image.new("RGB", (16, 16), "green")]
    with_placeholders = scorer.score(image, "an oil painting of [V1]")
    assert with_placeholders.details[0]["text_cosine"] == pytest.approx(
        scorer.score(image, "an oil painting of cat").details[0]["text_cosine"])
    assert with_placeholders.details[0]["text_cosine"] != pytest.approx(
        scorer.score(image, "an oil painting of dog").details[0]["text_cosine"])


@pytest.mark.parametrize("case", ["untrained", "no-clip", "bad-clip", "no-toy-words", "clip-and-oracle",
                                  "renders-and-seeds", "missing-renders"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, tiny_pipeline_dir, toy_project, oracle, run_cli):
    root = toy_project
    args = ["eval", root, "--oracle"]
    if case == "untrained":
        root = make_project(tmp_path / "untrained", tiny_pipeline_dir, trained=False)
        text = re.sub(r'target_prompt = ".*"', f'target_prompt = "{TARGET}"', (root / "palp.toml").read_text())
        (root / "palp.toml").write_text(text)
        args = ["eval", root, "--oracle"]
    elif case == "no-clip":
        args = ["eval", root]
    elif case == "bad-clip":
        args = ["eval", root, "--clip", tmp_path / "nowhere"]
    elif case == "no-toy-words":
        text = re.sub(r'target_prompt = ".*"', 'target_prompt = "an oil painting of [V2]"',
                      (root / "palp.toml").read_text())
        (root / "palp.toml").write_text(text)
    elif case == "clip-and-oracle":
        args += ["--clip", tmp_path]
    elif case == "renders-and-seeds":
        args += ["--renders", root / "out", "--seeds", "0"]
    elif case == "missing-renders":
        args += ["--renders", "no-such-run"]
    before = tree_snapshot(root)
    result = run_cli(*args)
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err and "error:" in result.err
    assert tree_snapshot(root) == before
    expected = {"untrained": "no trained weights", "no-clip": "--clip", "bad-clip": "not a CLIP model folder",
                "no-toy-words": "names no toy-world element", "clip-and-oracle": "only one",
                "renders-and-seeds": "--renders", "missing-renders": "no-such-run"}[case]
    assert expected in " ".join(result.err.split())
