"""Reference images: open, check and normalise the pictures a project trains on.

Everything here turns a bad file into a `UserError` that names the file and says what to do, so `check` can list
every broken image at once. Images come out as 8-bit RGB with their EXIF orientation applied, whatever they were
stored as (palette, RGBA, CMYK, 16-bit grey, ...); what was converted is reported as a note, not silently.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from palpcompose.errors import UserError, command_line

# File types a glob or a folder in `images` picks up. A file named explicitly is opened whatever its suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Formats Pillow cannot read, common enough to name with a way to convert them: HEIC/HEIF is the iPhone's default.
HEIC_SUFFIXES = (".heic", ".heif")

# Decompression-bomb guard: a reference image above this many pixels is refused before it is decoded. 100 MP is
# more than any camera's full-resolution photo; training uses a few hundred pixels per side anyway.
MAX_PIXELS = 100_000_000

# An image whose shorter side is below `resolution * SMALL_FACTOR` gets a warning (it is upscaled and looks soft).
SMALL_FACTOR = 0.5

_EXIF_ORIENTATION = 0x0112


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def is_heic_name(path: Path) -> bool:
    return path.suffix.lower() in HEIC_SUFFIXES and not path.name.startswith(".")


def heic_fix(path: Path) -> str:
    """How to turn the HEIC photo `path` into a PNG that palpcompose reads (one example command per system)."""
    png = path.with_suffix(".png")
    return (f"convert it to PNG or JPEG: on macOS `{command_line('sips', '-s', 'format', 'png', path, '--out', png)}` "
            f"(or Preview > File > Export), on Linux `{command_line('heif-convert', path, png)}` (package "
            "libheif-examples), on Windows the Photos app's Save as; or set the iPhone's Settings > Camera > Formats "
            "to Most Compatible")


def open_reference_image(path: str | os.PathLike, resolution: int | None = None) -> tuple[Image.Image, list[str]]:
    """Decode `path` fully and return (RGB image, notes). Raises UserError naming the file when it is unusable.

    Notes say what was changed (mode conversion, EXIF rotation) and warn when the image is much smaller than
    `resolution` (the training resolution), since it will be upscaled.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); replace it with the real image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above 2x its limit raises) for huge images; we apply our own, lower limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UserError(
                    f"{path}: {width}x{height} pixels is over the {MAX_PIXELS // 1_000_000} MP limit for reference "
                    "images (a decompression bomb, or a huge scan); downscale it, e.g. to 1024 px on the long side"
                )
            image.load()
    except UserError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused as a decompression bomb ({exc}); downscale the image") from exc
    except UnidentifiedImageError as exc:
        if is_heic_name(path):
            raise UserError(f"{path}: HEIC/HEIF photos are not supported (Pillow cannot read them); "
                            f"{heic_fix(path)}") from exc
        raise UserError(
            f"{path}: not an image file Pillow can read; use PNG, JPEG or WebP ({', '.join(IMAGE_SUFFIXES)})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated") or SyntaxError (bad chunks).
        raise UserError(f"{path}: the image data is truncated or corrupt ({exc}); re-export or re-download it") from exc

    notes: list[str] = []
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append(f"{path}: rotated according to its EXIF orientation ({orientation})")
    image, converted_from = _to_rgb(image)
    if converted_from:
        notes.append(f"{path}: converted from {converted_from} to 8-bit RGB")
    if resolution is not None and min(image.size) < resolution * SMALL_FACTOR:
        notes.append(
            f"{path}: {image.width}x{image.height} is much smaller than train.resolution = {resolution}; "
            f"it will be upscaled and look soft (use images at least {resolution} px on the short side)"
        )
    return image, notes


def load_reference_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as 8-bit RGB with its EXIF orientation applied. Raises UserError naming the file."""
    return open_reference_image(path)[0]


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to RGB. Returns (image, description of the original mode, or None when it was RGB).

    Transparent pixels are composited over white (what viewers show for cut-out subjects), 16/32-bit and float
    images are scaled down to 8 bits instead of being clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if mode != "F" else 1.0  # 16-bit data (Pillow stores 16-bit PNGs as I;16 or I)
        grey = np.clip(array * scale + (0.5 if mode != "F" else 0.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), f"{mode} (16/32-bit or float grey)"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        described = f"{mode} (transparency composited over white)"
        return Image.alpha_composite(background, rgba).convert("RGB"), described
    described = {"P": "P (palette)", "L": "L (greyscale)", "1": "1 (black and white)", "CMYK": "CMYK"}.get(mode, mode)
    return image.convert("RGB"), described
