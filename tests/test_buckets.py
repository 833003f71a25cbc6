"""Aspect-ratio buckets (docs/training.md, "Aspect-ratio buckets"): the sizes chosen for non-square references, one
bucket per micro-batch, SDXL's size values of bucketed images, previews at the references' shape, `check`'s list,
and a bucketed run that resumes bit-exactly. Square references keep their centre crops (tests/test_golden_weights.py
holds their weights bit-identical)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_test_image
from PIL import Image
from test_golden_weights import weights_digest

from palpcompose import buckets, models
from palpcompose.data import SubjectData, encode_references, resize_center_crop, sample_batch, to_pixel_tensor
from palpcompose.previews import preview_shapes


def test_alignment_follows_the_model():
    assert buckets.alignment(8, 3) == 64  # SD 1/2: 8x VAE, three UNet downsamplings
    assert buckets.alignment(8, 2) == 64  # SDXL: 64 as other trainers bucket, though 32 would divide
    assert buckets.alignment(4, 2) == 16  # builtin:toy
    assert buckets.alignment(2, 1) == 8  # the test pipelines: 4 would divide, but pipelines draw multiples of 8
    toy = models.resolve_base_model("builtin:toy")
    assert models.source_bucket_alignment(toy) == 16


@pytest.mark.parametrize("resolution, step", [(512, 64), (1024, 64), (64, 16), (32, 8)])
def test_buckets_keep_the_area_the_alignment_and_at_most_2_to_1(resolution, step):
    sizes = buckets.bucket_sizes(resolution, step)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        if (w, h) != (resolution, resolution):
            assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution and max(w, h) <= 2 * min(w, h)
        assert (h, w) in sizes


@pytest.mark.parametrize("resolution, step, landscape", [(512, 64, (640, 384)), (32, 8, (40, 24)),
                                                         (64, 16, (80, 48))])
def test_a_2_to_1_and_a_1_to_2_image_get_the_most_elongated_buckets(resolution, step, landscape):
    assert buckets.choose_bucket((2000, 1000), resolution, step) == landscape
    assert buckets.choose_bucket((1000, 2000), resolution, step) == landscape[::-1]
    assert buckets.choose_bucket((1000, 1000), resolution, step) == (resolution, resolution)
    assert buckets.choose_bucket((1000, 980), resolution, step) == (resolution, resolution)  # near square: square
    assert buckets.choose_bucket((2000, 1000), resolution, step, enabled=False) == (resolution, resolution)
    w, h = buckets.choose_bucket((1500, 1000), 512, 64)  # 3:2: the nearest ratio, in log terms
    assert min(abs(math.log(a / b) - math.log(1.5)) for a, b in buckets.bucket_sizes(512, 64)) == pytest.approx(
        abs(math.log(w / h) - math.log(1.5)))


def _tiny_vae(tiny_pipeline_dir):
    return models.load_components(models.resolve_base_model(str(tiny_pipeline_dir)))


def test_square_references_encode_exactly_as_before(tmp_path, tiny_pipeline_dir):
    c = _tiny_vae(tiny_pipeline_dir)
    paths = [write_test_image(tmp_path / f"{i}.png", seed=i, size=s) for i, s in enumerate((16, 24, 40))]
    # the encoding of before buckets: centre crops, mirrors after them, encoded one by one, stacked, then scaled
    images = [resize_center_crop(Image.open(p).convert("RGB"), 16) for p in paths]
    images += [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    with torch.no_grad():
        dists = [c.vae.encode(to_pixel_tensor(im).unsqueeze(0)).latent_dist for im in images]
    scale = c.vae.config.scaling_factor
    mean, std = torch.cat([d.mean for d in dists]) * scale, torch.cat([d.std for d in dists]) * scale
    refs = encode_references(c.vae, paths, 16, True, "cpu", torch.float32, alignment=8)
    assert all(torch.equal(mean[i], refs.means[i]) and torch.equal(std[i], refs.stds[i]) for i in range(6))
    assert refs.size_ids == [None] * 6


def test_non_square_references_encode_at_their_bucket_with_sdxl_size_values(tmp_path, tiny_pipeline_dir):
    c = _tiny_vae(tiny_pipeline_dir)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (64, 32), "red").save(wide)
    tall = tmp_path / "tall.png"
    Image.new("RGB", (30, 60), "blue").save(tall)
    refs = encode_references(c.vae, [wide, tall], 32, True, "cpu", torch.float32, alignment=8)
    assert [tuple(m.shape[-2:]) for m in refs.means] == [(12, 20), (20, 12), (12, 20), (20, 12)]  # bucket / 2
    # (original height, width, crop top, left, bucket height, width): 64x32 scaled to 48x24 covers 40x24, crop x 4
    assert refs.size_ids[0].tolist() == [32, 64, 0, 4, 24, 40]
    assert refs.size_ids[1].tolist() == [60, 30, 4, 0, 40, 24]  # 30x60 scaled to 24x48: crop y 4
    assert refs.size_ids[2].tolist() == [32, 64, 0, 4, 24, 40]  # the mirror's crop, seen from the other side
    off = encode_references(c.vae, [wide], 32, False, "cpu", torch.float32, alignment=8, bucketed=False)
    assert tuple(off.means[0].shape[-2:]) == (16, 16) and off.size_ids == [None]


def _subject(key, shapes, flip=True):
    n = len(shapes)
    means = [torch.full((4, *shape), float(i)) for i, shape in enumerate(shapes)]
    means += [m.clone() for m in means] if flip else []
    return SubjectData(key, torch.full((77,), int(key[1:])), means, [torch.zeros_like(m) for m in means], n, flip)


def test_a_micro_batch_never_mixes_buckets_and_each_image_is_drawn_as_often_as_before():
    subjects = [_subject("V1", [(6, 10), (8, 8), (8, 8), (10, 6)]), _subject("V2", [(8, 8)], flip=False)]
    generator = torch.Generator().manual_seed(0)
    seen: dict[tuple[str, float], int] = {}
    shapes = set()
    for _ in range(1500):
        batch = sample_batch(subjects, generator, 3, 1000)
        assert len({tuple(x.shape) for x in batch.latents}) == 1  # one bucket
        shapes.add(tuple(batch.latents.shape[-2:]))
        for key, latent in zip(batch.subjects, batch.latents, strict=True):
            seen[key, float(latent[0, 0, 0])] = seen.get((key, float(latent[0, 0, 0])), 0) + 1
    assert shapes == {(6, 10), (8, 8), (10, 6)}
    total = sum(seen.values())
    # as without buckets: a subject with probability 1/2, then one of its images uniformly
    expected = {("V1", float(i)): 1 / 8 for i in range(4)} | {("V2", 0.0): 1 / 2}
    for image, p in expected.items():
        assert seen[image] / total == pytest.approx(p, abs=0.03)


def test_one_bucket_draws_exactly_as_before():
    """Latents as one stacked tensor (before buckets) or as a list of one shape: the same draws."""
    mean, std = torch.randn(6, 4, 8, 8), torch.rand(6, 4, 8, 8)  # 3 images and their mirrors
    stacked = SubjectData("V1", torch.zeros(77, dtype=torch.long), mean, std, 3, True)
    listed = SubjectData("V1", stacked.input_ids, list(mean), list(std), 3, True)
    a = sample_batch([stacked], torch.Generator().manual_seed(3), 4, 1000)
    b = sample_batch([listed], torch.Generator().manual_seed(3), 4, 1000)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise) and a.size_ids is None


def test_previews_use_the_references_shapes():
    subjects = [_subject("V1", [(6, 10), (6, 10), (8, 8)]), _subject("V2", [(10, 6)])]
    assert preview_shapes(subjects) == {"V1": (6, 10), "V2": (10, 6), "": (6, 10)}
    assert preview_shapes([_subject("V1", [(8, 8)])]) == {"V1": (8, 8), "": (8, 8)}


def _non_square_project(make_project, **train):
    root = make_project({"train": {"steps": 4, "save_every": 2, "resolution": 32, **train}}, n_images=1,
                        image_size=32)
    write_test_image(root / "refs" / "V1" / "wide.png", seed=7, size=64)
    Image.open(root / "refs" / "V1" / "wide.png").resize((64, 32)).save(root / "refs" / "V1" / "wide.png")
    Image.open(root / "refs" / "V1" / "0.png").resize((32, 64)).rotate(90).save(root / "refs" / "V1" / "tall.png")
    return root


def test_check_prints_the_buckets(make_project, run_cli):
    root = _non_square_project(make_project)
    result = run_cli("check", root)
    assert result.code == 0, result.err
    text = " ".join(result.out.replace("│", " ").split())
    assert "32x32 -> 1 image" in text and "40x24 -> 1 image" in text and "24x40 -> 1 image" in text
    (root / "palp.toml").write_text((root / "palp.toml").read_text().replace("[train]\n", "[train]\nbuckets = false\n"))
    text = " ".join(run_cli("check", root).out.replace("│", " ").split())
    assert "32x32 -> 3 images (train.buckets = false" in text


def test_a_bucketed_run_trains_and_resumes_bit_exactly(make_project, run_cli, tmp_path, one_thread):
    whole = _non_square_project(make_project, preview_every=2)
    assert run_cli("train", whole).code == 0
    assert (whole / "out" / "previews" / "step-000002.png").is_file()
    halves = tmp_path / "halves"
    halves.mkdir()
    for path in whole.glob("refs/V1/*.png"):
        (halves / "refs" / "V1").mkdir(parents=True, exist_ok=True)
        (halves / "refs" / "V1" / path.name).write_bytes(path.read_bytes())
    (halves / "palp.toml").write_text((whole / "palp.toml").read_text())
    result = run_cli("train", halves, "--steps", "2")
    assert result.code == 0, result.err
    result = run_cli("train", halves, "--steps", "4", "--resume")
    assert result.code == 0, result.err
    assert weights_digest(halves / "out" / "weights" / "final") == weights_digest(whole / "out" / "weights" / "final")
    # the buckets changed the weights: the same project with square crops trains others
    (halves / "palp.toml").write_text((halves / "palp.toml").read_text().replace("[train]\n",
                                                                               "[train]\nbuckets = false\n"))
    assert run_cli("train", halves).code == 0
    assert weights_digest(halves / "out" / "weights" / "final") != weights_digest(whole / "out" / "weights" / "final")


def test_sdxl_trains_a_bucket_with_its_own_size_values(tmp_path, tiny_sdxl_pipeline_dir, run_cli, one_thread,
                                                       monkeypatch):
    from conftest import _merge, default_project_config, to_toml

    config = _merge(default_project_config(str(tiny_sdxl_pipeline_dir)),
                    {"train": {"resolution": 32, "steps": 2, "save_every": 0, "batch_size": 2}})
    root = tmp_path / "xl"
    root.mkdir()
    (root / "palp.toml").write_text(to_toml(config))
    (root / "refs" / "V1").mkdir(parents=True)
    Image.new("RGB", (64, 32), "red").save(root / "refs" / "V1" / "wide.png")
    seen = []
    forward = models.unet_forward

    def recording(unet, latents, timesteps, cond, time_ids=None):
        seen.append((tuple(latents.shape[-2:]), time_ids.tolist()))
        return forward(unet, latents, timesteps, cond, time_ids)

    monkeypatch.setattr(models, "unet_forward", recording)
    result = run_cli("train", root)
    assert result.code == 0, result.err
    # 64x32 -> bucket 40x24 (width x height): latents 12x20, size values (32, 64, 0, crop left, 24, 40) per sample
    assert seen and all(shape == (12, 20) for shape, _ in seen)
    assert all(row[:3] == [32.0, 64.0, 0.0] and row[4:] == [24.0, 40.0] for _, ids in seen for row in ids)
