"""Where datasets come from: one module per source kind, each with the same three functions.

    dataset_dir(info, settings) -> Path        where the dataset's files live
    fetch(info, settings, progress) -> Path     download / extract / verify once, then mark complete
    catalogue(info, settings, progress)         the images and official lists of a fetched dataset

and, for the sources whose files depend on settings (generated sets: digits, shapes-*),

    marker(info, settings) -> dict              the completion marker of the files these settings ask for
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from sa2vp.data.catalogue import Catalogue
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.data.sources import digits, fgvc, folder, shapes, torchvision_sets, vtab1k
from sa2vp.settings import DataSettings

_SOURCES: dict[str, ModuleType] = {
    "vtab1k": vtab1k,
    "torchvision": torchvision_sets,
    "fgvc": fgvc,
    "digits": digits,
    "shapes": shapes,
    "folder": folder,
}


def source_module(info: DatasetInfo) -> ModuleType:
    return _SOURCES[info.source]


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return source_module(info).dataset_dir(info, settings)


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """Make the dataset's files complete on disk (downloading if needed); returns their folder."""
    return source_module(info).fetch(info, settings, progress)


def read_catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    """Fetch the dataset if needed and return its images and official lists."""
    fetch(info, settings, progress)
    return source_module(info).catalogue(info, settings, progress)


def wanted_marker(info: DatasetInfo, settings: DataSettings) -> Mapping[str, object] | None:
    """The completion marker `fetch` would leave for these settings, where the files depend on settings (None
    where they do not: downloaded and in-place datasets, image folders)."""
    make = getattr(source_module(info), "marker", None)
    return make(info, settings) if make is not None else None
