"""`folder:<path>`: an image folder with one sub-folder per class (class names = sub-folder names, sorted;
images found recursively inside each; hidden files and non-image files are ignored). Read in place."""

from __future__ import annotations

from pathlib import Path

from sa2vp.data.catalogue import Catalogue, Item, make_catalogue
from sa2vp.data.errors import MissingDataError
from sa2vp.data.images import IMAGE_EXTENSIONS
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.settings import DataSettings


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(info.folder)


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    folder = dataset_dir(info, settings)
    if not folder.is_dir():
        raise MissingDataError(
            f"{folder}: image folder not found (folder:<path> needs a folder with one sub-folder of images per class)"
        )
    return folder


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    folder = fetch(info, settings)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise MissingDataError(f"{folder}: no class folders (expected one sub-folder of images per class)")
    items: list[Item] = []
    for label, name in enumerate(classes):
        images = _images(folder / name)
        if not images:
            raise MissingDataError(
                f"{folder / name}: class folder {name!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        items += [(path.relative_to(folder).as_posix(), label) for path in images]
    return make_catalogue(folder, classes, {"all": items}, str(folder))


def _images(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )
