"""Per-image captions: a `name.txt` beside a reference `name.png` holds that image's prompt (docs/training.md).

Read and validated by `check` (placeholders, encoding, size, length), used as the prompt a sample trains with,
hashed with the images (a changed caption makes the weights stale and refuses --resume), ignored with
train.captions = false.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tree_snapshot

from palpcompose import models
from palpcompose.data import sample_batch
from palpcompose.errors import UserError
from palpcompose.outputs import image_hashes
from palpcompose.project import check_project, load_project
from palpcompose.run import make_plan
from palpcompose.step import encode_personal
from palpcompose.train import prepare_subjects


def _caption(root, key: str, index: int, text: str | bytes):
    path = root / "refs" / key / f"{index}.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_captions_are_read_and_listed_by_check(make_project, run_cli):
    root = make_project({"subjects": {"V2": {"class_name": "dog", "images": ["refs/V2/*.png"]}}})
    _caption(root, "V1", 0, "A photo of [V1] on a beach\n")
    _caption(root, "V1", 2, "a cat on a sofa")  # no placeholder: [V1] goes in front, with a note
    project = load_project(root)
    assert project.captions == {root / "refs/V1/0.png": "A photo of [V1] on a beach",
                                root / "refs/V1/2.png": "[V1] a cat on a sofa"}
    assert any("2.txt" in n and "no [V1]" in n for n in project.notes)
    result = run_cli("check", root)
    assert result.code == 0, result.err
    text = " ".join(result.out.replace("│", " ").split())  # the table's cells wrap over several lines
    assert "[V1] 2 of 3 image(s): refs/V1/0.png, refs/V1/2.png" in text
    assert "[V2] 0 of 3 image(s)" in text
    assert "no [V1]" in result.err
    assert check_project(root).captions == (("V1", 2, 3, ("refs/V1/0.png", "refs/V1/2.png")), ("V2", 0, 3, ()))


@pytest.mark.parametrize("content, expected", [
    ("A photo of [V1] and [V2]", "names [V2], the placeholder of another subject"),
    ("A photo of [V1] and [V7]", "uses [V7], which is not a subject of this project"),
    ("A photo of [v1]", "'[v1]' is not a placeholder"),
    ("  \n ", "the caption is empty"),
    (b"A photo of \xff[V1]", "not UTF-8"),
    ("a" * 5000, "over the 4096-byte limit"),
    ("A photo of [V1] " + "with a very long description " * 20, "tokens long, but the text encoder reads at most 77"),
])
def test_bad_captions_are_refused_naming_the_file(make_project, run_cli, content, expected):
    root = make_project({"subjects": {"V2": {"class_name": "dog", "images": ["refs/V2/*.png"]}}})
    caption = _caption(root, "V1", 1, content)
    before = tree_snapshot(root)
    result = run_cli("check", root)
    assert result.code == 2, result.out
    assert f"{caption}:1: " in result.err or f"{caption}: " in result.err
    assert expected in result.err
    assert "Traceback" not in result.err
    if "tokens long" in expected:  # train refuses it as check does, before writing anything
        assert run_cli("train", root).code == 2
    assert tree_snapshot(root) == before


def _subjects(project, tiny_pipeline_dir):
    components = models.load_components(models.resolve_base_model(str(tiny_pipeline_dir)))
    state = SimpleNamespace(components=components, accelerator=SimpleNamespace(device=torch.device("cpu")))
    tokens = models.placeholder_tokens(project.config.project.name, project.config.subjects)
    return components, state, tokens, prepare_subjects(project, project.config, state, tokens)


def test_a_sample_trains_with_its_images_caption(make_project, tiny_pipeline_dir):
    root = make_project(n_images=2)
    _caption(root, "V1", 0, "A drawing of [V1] in the snow")
    project = load_project(root)
    c, _, tokens, subjects = _subjects(project, tiny_pipeline_dir)

    def ids(prompt):
        return models.tokenize(c.tokenizer, [models.expand_placeholders(prompt, tokens)], c.tokenizer_2)[0]

    caption, prompt = ids("A drawing of [V1] in the snow"), ids("A photo of [V1]")
    assert torch.equal(subjects[0].image_ids[0], caption) and torch.equal(subjects[0].image_ids[1], prompt)
    batch = sample_batch(subjects, torch.Generator().manual_seed(0), 16, 1000)
    rows = {tuple(r.tolist()) for r in batch.input_ids}
    assert rows == {tuple(caption.tolist()), tuple(prompt.tolist())}  # each sample: its own image's prompt
    assert batch.captions
    # train.captions = false: every image trains with the subject's prompt
    (root / "palp.toml").write_text(
        (root / "palp.toml").read_text().replace("[train]\n", "[train]\ncaptions = false\n"))
    _, _, _, subjects = _subjects(load_project(root), tiny_pipeline_dir)
    assert subjects[0].image_ids is None
    batch = sample_batch(subjects, torch.Generator().manual_seed(0), 16, 1000)
    assert {tuple(r.tolist()) for r in batch.input_ids} == {tuple(prompt.tolist())} and not batch.captions


def test_each_distinct_prompt_is_encoded_once_with_the_same_result(make_project, tiny_pipeline_dir):
    root = make_project(n_images=2)
    _caption(root, "V1", 0, "A drawing of [V1] in the snow")
    c, _, _, subjects = _subjects(load_project(root), tiny_pipeline_dir)
    batch = sample_batch(subjects, torch.Generator().manual_seed(1), 6, 1000)
    calls = []
    encoder = c.text_encoder
    hook = encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    state = SimpleNamespace(text_encoder=encoder, accelerator=SimpleNamespace(device=torch.device("cpu")))
    with torch.no_grad():
        shared = encode_personal(state, batch)
        hook.remove()
        separate = models.encode_prompt(encoder, batch.input_ids)
    assert calls == [len({tuple(r.tolist()) for r in batch.input_ids})] and calls[0] < 6
    torch.testing.assert_close(shared.embeds, separate.embeds)


def test_a_changed_caption_makes_the_weights_stale_and_refuses_resume(make_project, run_cli, one_thread):
    root = make_project({"train": {"steps": 1}})
    caption = _caption(root, "V1", 0, "A photo of [V1] at night")
    assert run_cli("train", root).code == 0
    assert make_plan(root).up_to_date
    caption.write_text("A photo of [V1] at noon")
    assert not make_plan(root).up_to_date
    with pytest.raises(UserError, match=r"refs/V1/0\.txt changed"):
        make_plan(root, resume=True)
    caption.unlink()  # a caption removed is a change too
    assert "refs/V1/0.txt is gone" in run_cli("train", root, "--resume").err
    # train.captions = false: caption files are not the run's
    caption.write_text("A photo of [V1] at noon")
    assert "refs/V1/0.txt" in image_hashes(load_project(root), load_project(root).images)
    (root / "palp.toml").write_text(
        (root / "palp.toml").read_text().replace("[train]\n", "[train]\ncaptions = false\n"))
    project = load_project(root)
    assert project.captions == {} and "refs/V1/0.txt" not in image_hashes(project, project.images)


def test_projects_without_captions_hash_only_their_images(make_project):
    root = make_project()
    project = load_project(root)
    assert project.captions == {}
    assert sorted(image_hashes(project, project.images)) == [f"refs/V1/{i}.png" for i in range(3)]
