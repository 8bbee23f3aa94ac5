"""Reading one image file as RGB, or an error that names the file; writing a generated one reproducibly."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sa2vp.data.errors import CorruptImageError, MissingDataError

# What counts as an image in a class folder (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_image(path: Path) -> Image.Image:
    """The image at `path`, fully decoded and converted to RGB (grayscale, palette, RGBA, CMYK, …).

    A missing file raises MissingDataError; an unreadable or truncated one CorruptImageError, both naming it.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a transform
            return _to_rgb(image)
    except FileNotFoundError:
        raise MissingDataError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"{path}: unreadable or truncated image ({exc})") from None


def check_image(path: Path) -> str | None:
    """Why the image at `path` cannot be decoded, or None when it decodes (fully: a truncated file is caught)."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "image file not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable or truncated image ({exc})"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palettes with transparency; alpha is dropped below
    # Alpha is dropped, not composited, as in torchvision's loader that the published numbers used.
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def save_generated_png(image: Image.Image, path: Path) -> None:
    """Write a generated image as a PNG whose bytes depend on its pixels only.

    Stored (uncompressed) deflate blocks: zlib's match search is SIMD code chosen by CPU (Pillow bundles zlib-ng),
    which may compress the same pixels to other bytes on another machine and so change the data's DVC hash.
    A 16×16 grayscale rendering is ~300 bytes either way.
    """
    image.save(path, format="PNG", compress_level=0)
