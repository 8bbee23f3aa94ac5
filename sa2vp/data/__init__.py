"""Datasets for SA²VP: the registry, downloads, split protocols and a torch Dataset with §4's transforms.

    lookup("svhn")                      → DatasetInfo of vtab-svhn (registry.py: names, aliases, sources)
    download(settings.data)             → the dataset's files, fetched, verified and marked complete
    prepare(settings.data)              → folder of split files + manifest.json (splits.py: the protocols)
    split_dir(settings.data)            → that folder, checked to have been prepared from these settings
    load_split(folder, "train", cfg)    → SplitDataset with the transforms for `cfg`, the backbone's data
                                          configuration (timm.data.resolve_data_config)

This package knows nothing of models; it is handed the backbone's data configuration.
"""

from typing import Any

from sa2vp.data.catalogue import Catalogue, Item
from sa2vp.data.errors import (
    ChecksumError,
    CorruptImageError,
    DataError,
    MissingDataError,
    SplitError,
    SplitMismatchError,
    UnknownDatasetError,
    UnsafeArchiveError,
    UnsafePickleError,
)
from sa2vp.data.images import load_image
from sa2vp.data.progress import NO_PROGRESS, BarProgress, LineProgress, Progress
from sa2vp.data.registry import ALIASES, DATASETS, DatasetInfo, by_group, lookup
from sa2vp.data.splits import (
    SPLITS,
    Manifest,
    check_prepared,
    download,
    ensure_prepared,
    prepare,
    read_manifest,
    read_split,
    split_dir,
    split_path,
)

__all__ = [
    "ALIASES",
    "DATASETS",
    "NO_PROGRESS",
    "SPLITS",
    "BarProgress",
    "Catalogue",
    "ChecksumError",
    "CorruptImageError",
    "DataError",
    "DatasetInfo",
    "Item",
    "LineProgress",
    "Manifest",
    "MissingDataError",
    "Progress",
    "SplitDataset",
    "SplitError",
    "SplitMismatchError",
    "UnknownDatasetError",
    "UnsafeArchiveError",
    "UnsafePickleError",
    "build_transform",
    "by_group",
    "check_prepared",
    "download",
    "ensure_prepared",
    "load_image",
    "load_split",
    "lookup",
    "prepare",
    "read_manifest",
    "read_split",
    "split_dir",
    "split_path",
]

_LAZY = {"SplitDataset", "build_transform", "load_split"}  # they import torch: loaded when first used


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from sa2vp.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'sa2vp.data' has no attribute {name!r}")
