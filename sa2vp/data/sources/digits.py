"""`digits`: the 1,797 handwritten 8×8 digits bundled with scikit-learn (UCI optdigits), rendered as PNG
files at `data.render_size` (bilinear upscaling of the 0–16 ink levels to 0–255 grayscale) under
`<root>/digits/images/<label>/<index>.png`. No network: the offline default for the demo and the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from sa2vp.data.catalogue import Catalogue, make_catalogue
from sa2vp.data.errors import DataError
from sa2vp.data.files import mark_complete, read_marker, staging
from sa2vp.data.images import save_generated_png
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.settings import DataSettings


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(settings.root) / info.folder


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The rendered digits; rendered again when data.render_size changed."""
    folder = dataset_dir(info, settings)
    found = read_marker(folder)
    if found == marker(info, settings):
        return folder
    if found is not None:
        shutil.rmtree(folder)  # our own rendering at another size
    elif folder.exists():
        raise DataError(f"{folder} exists but is not a digits rendering (no completion marker); remove it")
    images, labels = _load()
    size = settings.render_size
    with staging(folder) as tmp, progress(f"rendering digits at {size}×{size}", len(labels), "images") as advance:
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            path = tmp / _relative(index, int(label))
            path.parent.mkdir(parents=True, exist_ok=True)
            ink = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
            save_generated_png(ink.resize((size, size), Image.Resampling.BILINEAR), path)
            advance(1)
        mark_complete(tmp, marker(info, settings))
    return folder


def marker(info: DatasetInfo, settings: DataSettings) -> dict[str, object]:
    """The completion marker of the rendering these settings ask for (a split prepared from another is stale)."""
    return {"dataset": info.name, "render_size": settings.render_size}


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    _, labels = _load()
    items = [(_relative(i, int(label)), int(label)) for i, label in enumerate(labels)]
    return make_catalogue(dataset_dir(info, settings), [str(d) for d in range(10)], {"all": items}, "digits")


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _relative(index: int, label: int) -> str:
    return f"images/{label}/{index:04d}.png"
