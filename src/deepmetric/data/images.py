"""Decoding images robustly (CMYK, greyscale, palette, truncated files) into RGB PIL images.

``convert("RGB")`` handles CMYK, greyscale and palette images. A truncated file (an incomplete
download or a broken copy) is an error unless ``allow_truncated`` (the default): it is then decoded as far
as it goes, a warning names it once, and :func:`truncated_files` lists every such file this process met.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile

from deepmetric.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

_TRUNCATED: list[str] = []


def _decode(path: str | Path, truncated_ok: bool) -> Image.Image:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_rgb(path: str | Path, allow_truncated: bool = True) -> Image.Image:
    """Open ``path`` as an RGB image; a truncated file is decoded as far as it goes if ``allow_truncated``."""
    try:
        return _decode(path, truncated_ok=False)
    except (OSError, SyntaxError, ValueError) as exc:
        if allow_truncated and "truncated" in str(exc).lower():
            try:
                img = _decode(path, truncated_ok=True)
            except (OSError, SyntaxError, ValueError) as exc2:
                raise DataError(f"cannot decode image {path}: {exc2}") from exc2
            if str(path) not in _TRUNCATED:
                _TRUNCATED.append(str(path))
                warnings.warn(f"image {path} is truncated; decoded as far as it goes", stacklevel=2)
            return img
        hint = " (pass allow_truncated=True to decode it as far as it goes)" if "truncated" in str(exc).lower() else ""
        raise DataError(f"cannot decode image {path}: {exc}{hint}") from exc


def truncated_files() -> list[str]:
    """Truncated images decoded so far in this process (DataLoader workers keep their own lists)."""
    return list(_TRUNCATED)


def is_readable(path: str | Path) -> bool:
    """True if PIL recognises ``path`` as an image (reads the header only)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many exception types for bad files
        return False
