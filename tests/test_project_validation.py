"""Every validation rule of palp.toml, fed through the CLI: exit code 2, a located message, and nothing written."""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from conftest import set_in_toml, tree_snapshot, write_test_image


def line_of(root: Path, needle: str, after: str | None = None) -> int:
    """Line number of the first line containing `needle` (below the line containing `after`, if given)."""
    lines = (root / "palp.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    for number, line in enumerate(lines[start:], start=start + 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in palp.toml")


def check_fails(run_cli, root: Path, *fragments: str):
    """Run `check`, assert exit 2, no traceback, every fragment in stderr, and the folder untouched."""
    before = tree_snapshot(root)
    result = run_cli("check", root)
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, f"{fragment!r} missing from:\n{result.err}"
    assert tree_snapshot(root) == before
    return result.err


def located(root: Path, key: str, needle: str) -> str:
    """The `file:line: key:` prefix a problem must start with."""
    return f"{root / 'palp.toml'}:{line_of(root, needle)}: {key}:"


def test_valid_project_passes(make_project, run_cli):
    root = make_project()
    before = tree_snapshot(root)
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "<tiny-v1>" in result.out and "from the model's tokenizer" in result.out
    assert tree_snapshot(root) == before


def test_toml_syntax_error_has_its_line(make_project, run_cli):
    root = make_project()
    set_in_toml(root, 'class_name = "cat"', "class_name = cat")
    check_fails(run_cli, root, f"{root / 'palp.toml'}:{line_of(root, 'class_name = cat')}:", "TOML syntax error",
                "hint: strings need quotes")


def test_not_utf8(make_project, run_cli):
    root = make_project()
    (root / "palp.toml").write_bytes((root / "palp.toml").read_bytes() + b'\n# caf\xe9\n')
    check_fails(run_cli, root, "not UTF-8", "hint: save it as UTF-8")


def test_unknown_table_and_key_get_did_you_mean(make_project, run_cli):
    root = make_project({"trian": {"steps": 3}, "train": {"step": 3}})
    check_fails(run_cli, root,
                located(root, "trian", "[trian]") + " unknown table (hint: did you mean 'train'?)",
                located(root, "train.step", "step = 3") + " unknown key (hint: did you mean 'steps'?)")


def test_unknown_key_in_subject(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"clas_name": "cat"}}})
    check_fails(run_cli, root, located(root, "subjects.V1.clas_name", "clas_name") + " unknown key",
                "did you mean 'class_name'?")


@pytest.mark.parametrize(
    "table, key, value, message, hint",
    [
        ("train", "steps", 0, "must be >= 1 and <= 1000000, got 0", None),
        ("train", "steps", "500", 'must be an integer, got "500" (string)', "remove the quotes: steps = 500"),
        ("train", "steps", 2.5, "must be an integer, got 2.5 (number)", None),
        ("train", "batch_size", 0, "must be >= 1", None),
        ("train", "learning_rate", 0.0, "must be > 0 and <= 1, got 0", None),
        ("train", "learning_rate", "5e-5", "must be a number", "remove the quotes: learning_rate = 5e-5"),
        ("train", "embedding_learning_rate", -1.0, "must be >= 0", None),
        ("train", "lora_rank", 0, "must be >= 1", None),
        ("train", "lora_alpha", 0, "must be > 0, got 0", None),
        ("train", "resolution", 500, "must be a multiple of 8, got 500", "use 496 or 504"),
        ("train", "seed", -3, "must be >= 0", None),
        ("train", "save_every", -1, "must be >= 0", None),
        ("train", "mixed_precision", "bf32", "must be one of 'no', 'fp16', 'bf16', got \"bf32\"", None),
        ("train", "attention", "xformer", "must be one of 'auto', 'sdpa', 'xformers'", "did you mean 'xformers'?"),
        ("train", "gradient_checkpointing", "true", "must be a boolean", "write true without quotes"),
        ("palp", "guidance", "pal", "must be one of 'palp', 'sds', 'none', got \"pal\" (string)",
         "did you mean 'palp'?"),
        ("palp", "alpha", -1.0, "must be >= 0", None),
        ("palp", "alpha", float("nan"), "must be a finite number, got nan", None),
        ("palp", "beta", -0.5, "must be >= 0", None),
        ("palp", "weight", -2, "must be >= 0", None),
        ("palp", "same_noise", 1, "must be a boolean (true or false), got 1 (integer)", None),
        ("render", "seeds", [0, -1], "must be >= 0", None),
        ("render", "seeds", 3, "must be a list of integers", "e.g. seeds = [0, 1]"),
        ("render", "steps", 0, "must be >= 1", None),
        ("render", "width", 100, "must be a multiple of 8", "use 96 or 104"),
        ("render", "scheduler", "heun", "must be one of 'dpm++', 'ddim', 'euler-a', 'euler'", None),
        # euler is Flux.1's and SD 3's flow-matching sampler: Stable Diffusion refuses it (Family.samplers)
        ("render", "scheduler", "euler", ("'euler' is not a sampler Stable Diffusion 1.x renders with (it renders "
         "with dpm++, ddim, euler-a)"), 'set render.scheduler = "dpm++", or leave it out for the model\'s default'),
    ],
)
def test_types_ranges_and_choices(make_project, run_cli, table, key, value, message, hint):
    root = make_project({table: {key: value}})
    shown_key = f"{table}.{key}" + ("[1]" if value == [0, -1] else "")
    line = line_of(root, f"{key} = ", after=f"[{table}]")
    fragments = [f"{root / 'palp.toml'}:{line}: {shown_key}: {message}"] + ([f"(hint: {hint})"] if hint else [])
    check_fails(run_cli, root, *fragments)


def test_project_name_charset(make_project, run_cli):
    root = make_project({"project": {"name": "cat wanderer!"}})
    check_fails(run_cli, root,
                located(root, "project.name", "name = ") + " 'cat wanderer!' may contain only ASCII letters",
                "hint: e.g. name = 'cat-wanderer'")


def test_missing_required_keys(make_project, run_cli):
    root = make_project({"project": {"base_model": None}, "subjects": {"V1": {"class_name": None}}})
    check_fails(run_cli, root, located(root, "project.base_model", "[project]") + " required key is missing",
                located(root, "subjects.V1.class_name", "[subjects.V1]") + " required key is missing")


def test_required_strings_must_not_be_empty(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"class_name": "  ", "images": ["refs/V1/*.png", ""]}}})
    check_fails(run_cli, root, located(root, "subjects.V1.class_name", "class_name") + " must not be empty")
    root = make_project({"subjects": {"V1": {"images": ["refs/V1/*.png", ""]}}}, dirname="other")
    check_fails(run_cli, root, located(root, "subjects.V1.images", "images") + ' empty entry ""')


def test_at_least_one_subject(make_project, run_cli):
    root = make_project({"subjects": None, "palp": {"target_prompt": "An oil painting", "clean_prompt": "A cat"}})
    err = check_fails(run_cli, root, "1 problem found", f"{root / 'palp.toml'}:1: subjects: no subjects: a project "
                      "needs at least one", "[subjects.V1]")
    assert 'prompt = "A photo of [V1]"' in err


def test_subject_key_must_be_V_number(make_project, run_cli):
    root = make_project({"subjects": {"V1": None, "v1": {"class_name": "cat", "images": ["refs/V1"]}}})
    check_fails(run_cli, root, located(root, "subjects.v1", "[subjects.v1]") + " subject keys must be V followed",
                "hint: did you mean [subjects.V1]?")


def test_subject_prompt_needs_its_own_placeholder(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"prompt": "A photo of a cat"}}})
    check_fails(run_cli, root, located(root, "subjects.V1.prompt", "prompt = ") + " must contain the subject's own "
                "placeholder [V1]")


def test_every_placeholder_must_be_declared(make_project, run_cli):
    root = make_project({"palp": {"target_prompt": "An oil painting of [V1] inspired by [V2] painting"},
                         "render": {"prompts": ["[V1] and [V7]"]}})
    check_fails(run_cli, root,
                located(root, "palp.target_prompt", "target_prompt") + " uses [V2], which is not a subject",
                located(root, "render.prompts[0]", "prompts = ") + " uses [V7]",
                "hint: add a [subjects.V2] table")


def test_malformed_placeholder(make_project, run_cli):
    root = make_project({"palp": {"target_prompt": "An oil painting of [v1]"}})
    check_fails(run_cli, root, "palp.target_prompt: '[v1]' is not a placeholder",
                "hint: placeholders are written exactly [V1]")


def test_clean_prompt_has_no_placeholders(make_project, run_cli):
    root = make_project({"palp": {"clean_prompt": "An oil painting of [V1]"}})
    check_fails(run_cli, root, located(root, "palp.clean_prompt", "clean_prompt") + " the clean prompt must not "
                "contain placeholders, found [V1]")


@pytest.mark.parametrize("guidance", ["palp", "sds"])
def test_target_and_clean_prompts_required_with_guidance(make_project, run_cli, guidance):
    root = make_project({"palp": {"guidance": guidance, "target_prompt": None, "clean_prompt": None}})
    check_fails(run_cli, root, f"palp.target_prompt: required when palp.guidance = '{guidance}'",
                f"palp.clean_prompt: required when palp.guidance = '{guidance}'", 'set guidance = "none"')


def test_prompts_optional_without_guidance(make_project, run_cli):
    root = make_project({"palp": {"guidance": "none", "target_prompt": None, "clean_prompt": None}})
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "no palp.target_prompt and no render.prompts: `render` will need --prompt" in result.err


def test_base_model_must_resolve(make_project, run_cli):
    root = make_project({"project": {"base_model": "builtin:toyy"}})
    check_fails(run_cli, root, located(root, "project.base_model", "base_model") + " unknown built-in model")


def test_builtin_model_missing_from_the_installation(make_project, run_cli, monkeypatch, tmp_path):
    from palpcompose import models

    monkeypatch.setitem(models.BUILTIN_MODELS, "builtin:toy", tmp_path / "not-installed")
    root = make_project({"project": {"base_model": "builtin:toy"}})
    check_fails(run_cli, root, located(root, "project.base_model", "base_model") + " builtin:toy is not installed",
                "hint: reinstall palpcompose")


def test_uncached_hub_model_fails_check_as_it_fails_train(make_project, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    root = make_project({"project": {"base_model": "nobody-here/no-such-model"}})
    before = tree_snapshot(root)
    checked = run_cli("check", root)
    assert checked.code == 2 and "1 problem found" in checked.err, checked.err
    assert located(root, "project.base_model", "base_model") in checked.err
    for fix in ("not in this machine's Hugging Face cache", "palpcompose never downloads",
                "`hf download nobody-here/no-such-model --local-dir models/no-such-model`",
                'set base_model = "models/no-such-model"', 'base_model = "builtin:toy"'):
        assert fix in checked.err, fix
    trained = run_cli("train", root)  # the same refusal, the same fix
    assert trained.code == 2 and "hf download nobody-here/no-such-model" in trained.err, trained.err
    assert tree_snapshot(root) == before


def test_prompt_longer_than_the_token_limit(make_project, run_cli):
    long = "An oil painting of [V1] " + "with a red ball " * 30
    root = make_project({"palp": {"target_prompt": long}})
    err = check_fails(run_cli, root, located(root, "palp.target_prompt", "target_prompt") + " is ",
                      "but the text encoder reads at most 77")
    n = int(re.search(r"is (\d+) tokens long", err).group(1))
    assert f"hint: shorten it by {n - 77} tokens" in err


# -- images --------------------------------------------------------------------------------------------------------


def images_problem(run_cli, root, *fragments):
    return check_fails(run_cli, root, located(root, "subjects.V1.images", "images = "), *fragments)


def test_glob_matching_nothing(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/cat/*.jpg"]}}})
    images_problem(run_cli, root, "'refs/cat/*.jpg' matches no files")


def test_missing_file_with_did_you_mean(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/V1/0.png", "refs/V1/11.png"]}}})
    images_problem(run_cli, root, "'refs/V1/11.png' not found (hint: did you mean 'refs/V1/1.png'?)")


def test_empty_folder(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/empty"]}}})
    (root / "refs" / "empty").mkdir()
    images_problem(run_cli, root, "folder 'refs/empty' contains no images", "hint: put pictures of the subject")


def test_not_an_image(make_project, run_cli):
    root = make_project()
    (root / "refs" / "V1" / "3.png").write_text("this is not a picture")
    images_problem(run_cli, root, "refs/V1/3.png: not an image file Pillow can read")


def test_zero_byte_file(make_project, run_cli):
    root = make_project()
    (root / "refs" / "V1" / "3.png").write_bytes(b"")
    images_problem(run_cli, root, "refs/V1/3.png: empty file (0 bytes)")


def test_truncated_file(make_project, run_cli):
    root = make_project()
    path = write_test_image(root / "refs" / "V1" / "3.jpg", seed=7, size=64)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    set_in_toml(root, '"refs/V1/*.png"', '"refs/V1"')
    images_problem(run_cli, root, "refs/V1/3.jpg: the image data is truncated or corrupt")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (valid CRCs) with almost no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, message", [
    (12_000, "12000x12000 pixels is over the 100 MP limit for reference images"),  # our limit
    (20_000, "refused as a decompression bomb"),  # so large that Pillow itself refuses to open it
])
def test_decompression_bomb(make_project, run_cli, side, message):
    root = make_project()
    (root / "refs" / "V1" / "bomb.png").write_bytes(_png_header_only(side, side))
    images_problem(run_cli, root, f"refs/V1/bomb.png: {message}", "downscale")


def test_absolute_and_parent_paths_are_refused(make_project, run_cli, tmp_path):
    outside = write_test_image(tmp_path / "outside.png", seed=5)
    root = make_project({"subjects": {"V1": {"images": ["refs/V1/*.png", str(outside), "../outside.png"]}}})
    images_problem(run_cli, root, f"'{outside}' points outside the project folder",
                   "'../outside.png' points outside the project folder", "hint: copy the images into the project")


def test_symlink_leaving_the_project(make_project, run_cli, tmp_path):
    outside = write_test_image(tmp_path / "outside.png", seed=5)
    root = make_project()
    os.symlink(outside, root / "refs" / "V1" / "link.png")
    images_problem(run_cli, root, "refs/V1/link.png links outside the project folder")


def test_same_entry_twice(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/V1/*.png", "refs/V1/*.png"]}}})
    images_problem(run_cli, root, "'refs/V1/*.png' is listed twice")


def test_byte_identical_images(make_project, run_cli):
    root = make_project()
    (root / "refs" / "V1" / "copy.png").write_bytes((root / "refs" / "V1" / "0.png").read_bytes())
    images_problem(run_cli, root, "refs/V1/copy.png is a duplicate of refs/V1/0.png (identical bytes)",
                   "hint: delete one of the two files")


def test_one_image_in_two_subjects(make_project, run_cli):
    root = make_project({"subjects": {"V2": {"class_name": "dog", "images": ["refs/V2/*.png", "refs/V1/0.png"]}}})
    check_fails(run_cli, root, "subjects.V2.images: refs/V1/0.png is also an image of V1")


def test_overlapping_entries_count_each_image_once(make_project):
    from palpcompose.project import load_project

    root = make_project({"subjects": {"V1": {"images": ["refs/V1/*.png", "refs/V1/0.png", "refs/V1"]}}})
    project = load_project(root)
    assert [p.name for p in project.images["V1"]] == ["0.png", "1.png", "2.png"]


def test_unusual_modes_are_notes_not_errors(make_project, run_cli):
    root = make_project()
    write_test_image(root / "refs" / "V1" / "rgba.png", seed=11, mode="RGBA")
    write_test_image(root / "refs" / "V1" / "palette.png", seed=12, mode="P")
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "refs/V1/rgba.png: converted from RGBA" in result.err
    assert "refs/V1/palette.png: converted from P (palette)" in result.err


def test_small_images_are_warned(make_project, run_cli):
    root = make_project({"train": {"resolution": 64}})
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "refs/V1/0.png: 16x16 is much smaller than train.resolution = 64" in result.err


# -- several problems at once --------------------------------------------------------------------------------------


def test_broken_project_lists_every_problem_with_its_line(make_project, run_cli):
    root = make_project({
        "project": {"name": "bad name"},
        "subjects": {"V1": {"prompt": "A photo of a cat", "images": ["refs/nothing/*.png"]}},
        "palp": {"guidance": "pal", "clean_prompt": "An oil painting of [V1]"},
        "train": {"steps": -5, "resolution": 100, "lerning_rate": 1e-4},
        "render": {"seeds": [1, -1]},
    })
    err = check_fails(run_cli, root, "9 problems found:")
    keys = ["project.name", "subjects.V1.images", "subjects.V1.prompt", "palp.clean_prompt", "palp.guidance",
            "train.steps", "train.resolution", "train.lerning_rate", "render.seeds[1]"]
    problem_lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problem_lines) == len(keys)
    for key in keys:
        assert any(re.match(rf"  - {re.escape(str(root / 'palp.toml'))}:\d+: {re.escape(key)}:", line)
                   for line in problem_lines), key


def test_missing_project_file(tmp_path, run_cli):
    result = run_cli("check", tmp_path)
    assert result.code == 2
    assert "palp.toml: not found" in result.err and "palpcompose init" in result.err
    assert list(tmp_path.iterdir()) == []


def test_palp_toml_with_a_utf8_bom_reads_like_without(make_project, run_cli):
    root = make_project()
    (root / "palp.toml").write_bytes(b"\xef\xbb\xbf" + (root / "palp.toml").read_bytes())
    result = run_cli("check", root)
    assert result.code == 0, result.err


def test_wrong_paths_to_the_project_say_what_to_pass(make_project, run_cli, tmp_path):
    root = make_project()
    result = run_cli("check", root / "palp.toml")
    assert result.code == 2 and f"give the project folder, not its palp.toml: {root}" in result.err
    (tmp_path / "afile").write_text("x")
    result = run_cli("check", tmp_path / "afile")
    assert result.code == 2 and "is a file, not a project folder" in result.err
    (tmp_path / "odd" / "palp.toml").mkdir(parents=True)
    result = run_cli("check", tmp_path / "odd")
    assert result.code == 2 and "palp.toml: is a folder" in result.err


def test_pickled_base_model_is_refused_by_check_unless_allowed(make_project, run_cli):
    root = make_project()
    marker = root.parent / "unpickled"
    # A pickle that would create `marker` if anything unpickled it.
    (root / "model.ckpt").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model.ckpt"', text))
    check_fails(run_cli, root, located(root, "project.base_model", "base_model") + " ",
                "runs pickled code", "allow_pickle = true")
    for command in ("train", "render"):
        result = run_cli(command, root)
        assert result.code == 2 and "allow_pickle = true" in result.err, (command, result.err)
    assert not marker.exists() and not (root / "out").exists()
    # Allowed: check accepts it (it never opens a checkpoint's weights).
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model.ckpt"\nallow_pickle = true',
                                           text))
    assert run_cli("check", root).code == 0 and not marker.exists()


@pytest.mark.parametrize("tensors, message", [
    ({"foo": 3}, "holds no Stable Diffusion UNet (1 tensors"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": 3}, "is a LoRA, not a base model"),
    ({"emb_params": 3}, "is a textual-inversion embedding, not a base model"),
    (None, "damaged or incomplete weights file (its header is not a readable safetensors header)"),
])
def test_safetensors_base_model_that_is_not_a_model(make_project, run_cli, tensors, message):
    import torch
    from safetensors.torch import save_file

    root = make_project()
    if tensors is None:
        (root / "model.safetensors").write_bytes(b"\x00" * 64)
    else:
        save_file({k: torch.zeros(n) for k, n in tensors.items()}, str(root / "model.safetensors"))
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model.safetensors"', text))
    check_fails(run_cli, root, located(root, "project.base_model", "base_model") + " ", message)


def test_pipeline_folder_with_a_broken_model_index(make_project, run_cli):
    root = make_project()
    (root / "model").mkdir()
    (root / "model" / "model_index.json").write_text("{")
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model"', text))
    check_fails(run_cli, root, "model_index.json: unreadable", "not a complete diffusers pipeline")


def test_too_long_prompt_is_refused_by_train_too(make_project, run_cli):
    long = "An oil painting of [V1] " + "with a red ball " * 30
    root = make_project({"palp": {"target_prompt": long}})
    before = tree_snapshot(root)
    result = run_cli("train", root)
    assert result.code == 2 and "but the text encoder reads at most 77" in result.err, result.err
    assert f"{root / 'palp.toml'}:{line_of(root, 'target_prompt')}: palp.target_prompt:" in result.err
    assert "Token indices sequence length" not in result.err  # no transformers warning besides ours
    assert tree_snapshot(root) == before  # render's own check: tests/test_render.py


def test_empty_render_seeds_is_a_note_for_render(make_project, run_cli):
    root = make_project({"render": {"seeds": []}})
    result = run_cli("check", root)
    assert result.code == 0 and "render.seeds is empty: `render` will need --seeds" in result.err


def test_subject_numbers_start_at_one(make_project, run_cli):
    root = make_project({"palp": {"target_prompt": "A photo of [V0] and [V1]"}})
    check_fails(run_cli, root, "'[V0]' is not a placeholder", "subjects are numbered from 1")


def test_image_entries_that_look_like_globs_backslashes_links_and_case(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/V1/img[1].png"]}}})
    write_test_image(root / "refs" / "V1" / "img[1].png", seed=7)
    assert run_cli("check", root).code == 0  # the literal file name wins over the glob reading
    write_test_image(root / "refs" / "c[1]" / "a.png", seed=8)
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(text.replace('"refs/V1/img[1].png"', '"refs/V1/img[1].png", "refs/c[1]/*.png"'))
    assert run_cli("check", root).code == 0  # a folder named like a glob: only the file name is a pattern
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r"images = \[.*\]", lambda _: 'images = ["refs\\\\V1"]', text, count=1))
    result = run_cli("check", root)  # a Windows path is read as one, with a note
    assert result.code == 0 and "'refs\\\\V1' read as 'refs/V1'; write forward slashes" in result.err, result.err
    for entries, fragment in [
        (["refs/V1/*.PNG"], "glob patterns are case-sensitive: '*.PNG' does not match '0.png'"),
        (["refs/gone.png"], "'refs/gone.png' is a broken symbolic link"),
    ]:
        if not (root / "refs" / "gone.png").is_symlink():
            (root / "refs" / "gone.png").symlink_to(root / "nowhere.png")
        text = (root / "palp.toml").read_text()
        images = "images = [" + ", ".join('"' + e.replace("\\", "\\\\") + '"' for e in entries) + "]"
        (root / "palp.toml").write_text(re.sub(r"images = \[.*\]", lambda _, images=images: images, text, count=1))
        images_problem(run_cli, root, fragment)


def test_broken_symlink_as_base_model_is_named(make_project, run_cli):
    root = make_project()
    (root / "model.safetensors").symlink_to(root / "elsewhere.safetensors")
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model.safetensors"', text))
    check_fails(run_cli, root, "is a broken symbolic link")


def test_pickled_weights_inside_a_pipeline_folder_are_refused(make_project, run_cli, tiny_pipeline_dir):
    import shutil

    root = make_project()
    shutil.copytree(tiny_pipeline_dir, root / "model")
    (weights,) = (root / "model" / "unet").glob("*.safetensors")
    weights.rename(weights.with_suffix(".bin"))  # check refuses by name, before anything is read
    text = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(re.sub(r'base_model = ".*"', 'base_model = "model"', text))
    check_fails(run_cli, root, "unet: its weights are a pickled file", "allow_pickle = true")
    shutil.rmtree(root / "model" / "tokenizer")
    check_fails(run_cli, root, "tokenizer: missing; the pipeline folder is incomplete")


def test_blank_render_prompt_and_palp_toml_named_in_any_case(make_project, run_cli):
    root = make_project({"render": {"prompts": ["A photo of [V1]", "  "]}})
    check_fails(run_cli, root, "render.prompts[1]: is empty")
    result = run_cli("check", root / "PALP.TOML")
    assert result.code == 2 and "give the project folder, not its palp.toml" in result.err


@pytest.mark.parametrize("text, key, first, hint", [
    ('[train]\nsteps = 2\nseed = 1\nsteps = 3\n', "train.steps", 2, "delete one of the two lines"),
    ('[train]\nsteps = 2\n\n[train]\nseed = 1\n', "train", 1, "move the keys under this [train] into the first"),
    ('[palp]\nalpha = 1.0\nbeta = 1.0\n\n[render]\n"seeds" = [0]\nsteps = 2\nseeds = [1]\n', "render.seeds", 6,
     "delete one of the two lines"),
])
def test_a_key_defined_twice_is_named_with_both_lines(make_project, run_cli, text, key, first, hint):
    root = make_project({"train": None, "palp": None, "render": None})
    base = (root / "palp.toml").read_text()
    (root / "palp.toml").write_text(base + "\n" + text)
    offset = base.count("\n") + 1  # text starts on the line after the blank one
    err = check_fails(run_cli, root, f": {key}: is defined twice (first on line {offset + first})", hint)
    assert "TOML syntax error" not in err
    assert f"palp.toml:{offset + _line_of_second(text, key)}: {key}:" in err, err


def _line_of_second(text: str, key: str) -> int:
    """The line (in `text`) of the second definition of `key`."""
    name = key.split(".")[-1]
    hits = [n for n, line in enumerate(text.splitlines(), 1)
            if line.strip().startswith((f"[{key}]", f"{name} =", f'"{name}" ='))]
    return hits[1]


def _heic_bytes() -> bytes:
    """The start of an iPhone HEIC file (an ISO-BMFF `ftyp heic` box): what Pillow cannot identify."""
    return struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + b"\0" * 64


@pytest.mark.parametrize("entry", ["refs/V1", "refs/V1/*", "refs/V1/IMG_0001.HEIC", "refs/V1/*.png"])
def test_heic_photos_say_heic_is_not_supported_and_how_to_convert(make_project, run_cli, entry):
    root = make_project({"subjects": {"V1": {"images": [entry]}}}, n_images=0)
    for n in (1, 2):
        (root / "refs" / "V1").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "V1" / f"IMG_000{n}.HEIC").write_bytes(_heic_bytes())
    err = check_fails(run_cli, root, "HEIC", "not supported", "convert it to PNG or JPEG", "sips -s format png",
                      "heif-convert")
    assert "contains no images" not in err and "but no images" not in err and "matches no files" not in err
    assert "not an image file Pillow can read" not in err


def test_heic_photos_next_to_images_are_skipped_with_a_note(make_project, run_cli):
    root = make_project({"subjects": {"V1": {"images": ["refs/V1"]}}})
    (root / "refs" / "V1" / "IMG_0001.heic").write_bytes(_heic_bytes())
    result = run_cli("check", root)
    assert result.code == 0, result.err
    assert "refs/V1/IMG_0001.heic: skipped, HEIC/HEIF photos are not supported" in result.err
