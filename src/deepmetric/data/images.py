"""Decoding images robustly (CMYK, greyscale, palette, truncated files) into RGB PIL images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageFile

from deepmetric.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB image; a truncated file is decoded as far as it goes."""
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def is_readable(path: str | Path) -> bool:
    """True if PIL recognises ``path`` as an image (reads the header only)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many exception types for bad files
        return False
