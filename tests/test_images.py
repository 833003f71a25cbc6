"""Reference images: every mode comes out as 8-bit RGB, EXIF orientation is applied, bad files raise UserError."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_test_image
from PIL import Image

from palpcompose.errors import UserError
from palpcompose.images import load_reference_image, open_reference_image


def test_rgb_is_returned_unchanged(tmp_path):
    path = write_test_image(tmp_path / "a.png", seed=1)
    image, notes = open_reference_image(path)
    assert image.mode == "RGB" and notes == []
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))


def test_exif_orientation_is_applied(tmp_path):
    # A 4x2 image whose left half is red; EXIF orientation 6 means "rotate 90 degrees clockwise to display".
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    image, notes = open_reference_image(path)
    assert image.size == (2, 4)  # width and height swapped
    array = np.asarray(image).astype(int)
    assert array[0, :, 0].mean() > 200 and array[-1, :, 0].mean() < 60  # red moved from the left to the top
    assert any("EXIF orientation (6)" in n for n in notes)


def test_transparency_is_composited_over_white(tmp_path):
    path = tmp_path / "cutout.png"
    Image.new("RGBA", (4, 4), (0, 0, 255, 0)).save(path)
    image, notes = open_reference_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    assert any("converted from RGBA" in n for n in notes)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(path)
    image, notes = open_reference_image(path)
    assert image.mode == "RGB" and abs(image.getpixel((1, 1))[0] - 128) <= 1
    assert any("16/32-bit" in n for n in notes)


@pytest.mark.parametrize("mode, described", [("CMYK", "CMYK"), ("P", "P (palette)"), ("L", "L (greyscale)")])
def test_other_modes_become_rgb_with_a_note(tmp_path, mode, described):
    path = write_test_image(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"), seed=3, mode=mode)
    image, notes = open_reference_image(path)
    assert image.mode == "RGB"
    assert notes == [f"{path}: converted from {described} to 8-bit RGB"]


def test_small_image_warning_depends_on_resolution(tmp_path):
    path = write_test_image(tmp_path / "small.png", seed=4, size=100)
    assert open_reference_image(path, resolution=200)[1] == []
    notes = open_reference_image(path, resolution=512)[1]
    assert len(notes) == 1 and "much smaller than train.resolution = 512" in notes[0]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file (0 bytes)"), (b"hello", "not an image file"), (None, "file not found")],
)
def test_bad_files_raise_user_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_reference_image(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_truncated_jpeg(tmp_path):
    path = write_test_image(tmp_path / "cut.jpg", seed=5, size=64)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_reference_image(path)
