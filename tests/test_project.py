"""load_project's result: typed config, defaults resolved, hashes, the key-line scanner, and docs/schema.md in sync."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from palpcompose.project import (
    PalpConfig,
    ProjectConfig,
    RenderConfig,
    TrainConfig,
    key_lines,
    load_project,
    sanitize_name,
    schema_markdown,
)

REPO = Path(__file__).resolve().parents[1]

# The schema of contract.md (names and defaults are fixed there; other people's code relies on them).
CONTRACT_DEFAULTS = {
    "palp": {"guidance": "palp", "alpha": 7.5, "beta": 1.0, "weight": 1.0, "same_noise": True, "rescale": True},
    "train": {"steps": 500, "batch_size": 1, "learning_rate": 5e-5, "embedding_learning_rate": 5e-4, "lora_rank": 32,
              "resolution": 512, "seed": 0, "mixed_precision": "bf16", "attention": "auto", "save_every": 100,
              "preview_every": 100},
    "render": {"prompts": (), "seeds": (0, 1, 2, 3), "steps": 30, "guidance_scale": 7.5},
}


@pytest.mark.parametrize("table, cls", [("palp", PalpConfig), ("train", TrainConfig), ("render", RenderConfig)])
def test_contract_keys_and_defaults(table, cls):
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in CONTRACT_DEFAULTS[table].items():
        assert defaults[key] == value and type(defaults[key]) is type(value), (table, key)


def test_loaded_project(make_project):
    root = make_project({"subjects": {"V2": {"class_name": "oil painting", "images": ["refs/V2"]}}})
    project = load_project(root)
    assert project.root == root.resolve() and project.file == root.resolve() / "palp.toml"
    assert list(project.images) == ["V1", "V2"]
    assert [p.name for p in project.images["V1"]] == ["0.png", "1.png", "2.png"]
    assert all(p.is_absolute() for paths in project.images.values() for p in paths)
    config = project.config
    assert isinstance(config, ProjectConfig) and config.train.steps == 2 and config.train.resolution == 16
    # Documented defaults are resolved at load time.
    v1, v2 = config.subjects["V1"], config.subjects["V2"]
    assert v2.prompt == "A photo of [V2]" and v2.init_word == "oil painting"
    assert v1.flip is True and v2.flip is False  # paintings are not mirrored
    assert config.train.lora_alpha == 4.0  # = lora_rank
    assert config.render.prompts == ("An oil painting of [V1]",)  # = [palp.target_prompt]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 3


def test_single_string_images_entry(make_project):
    root = make_project({"subjects": {"V1": {"images": "refs/V1/*.png"}}})
    assert len(load_project(root).images["V1"]) == 3


def test_check_images_false_skips_the_files(make_project):
    root = make_project({"subjects": {"V1": {"images": ["refs/missing/*.png"]}}})
    assert load_project(root, check_images=False).images == {}


def test_to_dict_and_hashes(make_project):
    base = load_project(make_project(dirname="a")).config
    data = base.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["render"]["seeds"] == [0] and data["subjects"]["V1"]["images"] == ["refs/V1/*.png"]
    again = load_project(make_project(dirname="b")).config
    assert base.hash() == again.hash() and base.training_hash() == again.training_hash()

    render_only = load_project(make_project({"render": {"steps": 9}, "train": {"save_every": 7}}, dirname="c")).config
    assert render_only.hash() != base.hash()
    assert render_only.training_hash() == base.training_hash()

    more_steps = load_project(make_project({"train": {"steps": 3}}, dirname="d")).config
    assert more_steps.training_hash() != base.training_hash()


def test_key_line_scanner():
    text = """# comment
[project]
name = "x"  # [not.a.table]
notes = \"\"\"
steps = 5
\"\"\"
[subjects.V1]
class_name = "cat"
[train]
seed = 1
render.steps = 4
"""
    lines = key_lines(text)
    assert lines[("project",)] == 2 and lines[("project", "name")] == 3
    assert ("project", "steps") not in lines  # inside a multi-line string
    assert lines[("subjects", "V1")] == 7 and lines[("subjects", "V1", "class_name")] == 8
    assert lines[("train", "seed")] == 10 and lines[("train", "render", "steps")] == 11


@pytest.mark.parametrize("folder, name", [("my cat", "my-cat"), ("Wanderer_2", "Wanderer_2"), ("___", "my-project"),
                                          ("café/é", "cafe-e"), ("猫", "my-project")])
def test_sanitize_name(folder, name):
    assert sanitize_name(folder) == name


def test_schema_doc_is_generated_from_the_code():
    generated = subprocess.run([sys.executable, "-m", "palpcompose.project", "--schema-md"], capture_output=True,
                               text=True, check=True).stdout
    assert generated == schema_markdown()
    on_disk = (REPO / "docs" / "schema.md").read_text()
    assert on_disk == generated, ("docs/schema.md is stale: run "
                                  "python -m palpcompose.project --schema-md > docs/schema.md")
    for cls in (PalpConfig, TrainConfig, RenderConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in on_disk


# -- defaults that depend on the base model ----------------------------------------------------------------------


def minimal_toy_project(root: Path, train: str = "") -> Path:
    """A builtin:toy palp.toml with no [train] keys (unless `train`), and one 64 px reference image."""
    from PIL import Image

    (root / "refs").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(root / "refs" / "star.png")
    (root / "palp.toml").write_text(
        '[project]\nname = "mini"\nbase_model = "builtin:toy"\n[subjects.V1]\nclass_name = "star"\n'
        'images = ["refs/star.png"]\n[palp]\ntarget_prompt = "a sketch of [V1]"\nclean_prompt = "a sketch of a star"\n'
        + (f"[train]\n{train}\n" if train else ""))
    return root


@pytest.mark.skipif(not (REPO / "palpcompose" / "builtin" / "toy" / "model_index.json").is_file(),
                    reason="builtin:toy is not installed in this checkout")
def test_builtin_toy_without_train_keys_gets_its_own_defaults(tmp_path):
    from palpcompose.models import TOY_DEFAULTS

    project = load_project(minimal_toy_project(tmp_path / "mini"))
    train, render = project.config.train, project.config.render
    assert train.resolution == 64  # its native size, not the schema's 512
    assert (train.steps, train.batch_size, train.learning_rate, train.embedding_learning_rate,
            train.mixed_precision) == (200, 4, 1e-3, 5e-3, "no")
    assert project.config.palp.weight == 3.0  # PALP's lambda for builtin:toy (the study's stage T)
    assert (render.steps, render.guidance_scale) == (20, 5.0)
    assert set(project.model_defaults) == {"train.resolution", *TOY_DEFAULTS}
    assert project.config.to_dict()["train"]["resolution"] == 64  # what the manifest records


@pytest.mark.skipif(not (REPO / "palpcompose" / "builtin" / "toy" / "model_index.json").is_file(),
                    reason="builtin:toy is not installed in this checkout")
def test_keys_written_in_palp_toml_beat_model_defaults(tmp_path):
    project = load_project(minimal_toy_project(tmp_path / "mini", "resolution = 32\nlearning_rate = 1e-4"))
    assert project.config.train.resolution == 32 and project.config.train.learning_rate == 1e-4
    assert project.config.train.steps == 200  # still the model's
    assert "train.resolution" not in project.model_defaults and "train.learning_rate" not in project.model_defaults


def fake_pipeline_configs(folder: Path, sample_size: int, vae_blocks: int) -> Path:
    import json

    for name, config in (("unet", {"sample_size": sample_size}),
                         ("vae", {"block_out_channels": [128, 256, 512, 512][:vae_blocks]})):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("sample_size, blocks, native", [(64, 4, 512), (96, 4, 768), (128, 4, 1024), (16, 3, 64)])
def test_native_resolution_is_read_from_the_unet_and_vae_configs(tmp_path, sample_size, blocks, native):
    """SD 1.5 (64 latents x 8), SD 2 768-v (96 x 8), SDXL (128 x 8), builtin:toy (16 x 4)."""
    from palpcompose.models import BaseModelSource, model_defaults, native_resolution

    folder = fake_pipeline_configs(tmp_path / "model", sample_size, blocks)
    source = BaseModelSource(str(folder), "folder", str(folder), True, "")
    assert native_resolution(source) == native
    why = f"the native size of {folder} (its UNet and VAE configs)"
    assert model_defaults(source) == {"train.resolution": (native, why)}


def test_native_resolution_unknown_without_configs(tmp_path):
    from palpcompose.models import BaseModelSource, native_resolution

    assert native_resolution(BaseModelSource("x.safetensors", "single_file", str(tmp_path / "x.safetensors"), True,
                                             "")) is None
    assert native_resolution(BaseModelSource(str(tmp_path), "folder", str(tmp_path), True, "")) is None


def test_a_diffusers_folder_trains_at_its_native_size_by_default(make_project, tiny_pipeline_dir):
    root = make_project({"train": {"resolution": None}})
    project = load_project(root)
    assert project.config.train.resolution == 16  # tiny pipeline: 8 latents x 2
    assert project.config.train.learning_rate == 5e-5  # not builtin:toy: the paper's values stay
    assert list(project.model_defaults) == ["train.resolution"]


def test_check_shows_the_resolved_defaults(make_project, run_cli):
    result = run_cli("check", make_project({"train": {"resolution": None}}))
    assert result.code == 0, result.err
    flat = " ".join(result.out.split())
    assert "from the base model" in flat and "train.resolution = 16" in flat


def test_schema_says_model_dependent():
    text = schema_markdown()
    for key in ("resolution", "learning_rate", "embedding_learning_rate", "steps", "guidance_scale"):
        assert re.search(rf"\| `{key}` \| [^|]+ \| model-dependent \|", text), key


def test_schema_doc_reads_builtin_toy_defaults(monkeypatch):
    """The doc's "Default: X, Y for builtin:toy" comes from models.TOY_DEFAULTS, not from prose that restates it."""
    from palpcompose.models import TOY_DEFAULTS

    monkeypatch.setitem(TOY_DEFAULTS, "train.steps", 123)
    monkeypatch.setitem(TOY_DEFAULTS, "train.mixed_precision", "fp16")
    text = schema_markdown()
    assert "Default: 500 (the paper's), 123 for builtin:toy." in text
    assert "Default: `bf16`, `fp16` for builtin:toy." in text


def test_every_builtin_toy_default_is_a_model_dependent_schema_key():
    from palpcompose.models import TOY_DEFAULTS
    from palpcompose.project import SECTIONS, model_dependent

    keys = {f"{table}.{f.name}" for table, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(TOY_DEFAULTS) <= keys
    assert all(model_dependent(key) for key in TOY_DEFAULTS) and model_dependent("train.resolution")
    assert not model_dependent("train.lora_rank")


def test_allowed_values_come_from_one_tuple_each():
    """Validation and the schema doc read the same tuples as the code that implements each value."""
    from palpcompose import guidance, models, render
    from palpcompose.project import MAX_SEED, MIXED_PRECISION_MODES, SCHEDULER_NAMES

    def spec(cls, name):
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata

    assert spec(PalpConfig, "guidance")["choices"] is guidance.GUIDANCE_MODES
    assert spec(TrainConfig, "attention")["choices"] is models.ATTENTION_MODES
    assert spec(TrainConfig, "mixed_precision")["choices"] is MIXED_PRECISION_MODES
    assert spec(RenderConfig, "scheduler")["choices"] is SCHEDULER_NAMES
    assert set(render.SCHEDULERS) == set(SCHEDULER_NAMES)  # render implements every sampler palp.toml allows
    assert spec(TrainConfig, "seed")["le"] == spec(RenderConfig, "seeds")["le"] == MAX_SEED
    text = schema_markdown()
    assert " \\| ".join(f'`"{mode}"`' for mode in guidance.GUIDANCE_MODES) in text
    assert ", ".join(models.LORA_TARGET_MODULES) in text
