"""HTA sets that torchvision's dataset classes download and read: CIFAR-10/100, DTD, Food-101, GTSRB, SVHN.

The root handed to torchvision is `<root>/torchvision/<folder>/`; torchvision's own layout lives under it
(`cifar-10-batches-py/`, `dtd/dtd/images/…`, `gtsrb/GTSRB/Training/…`, `food-101/…`, `train_32x32.mat`). Files
already there are read in place; otherwise torchvision downloads them (`download=True`, checking its archives'
md5s) into a `.partial` folder that is renamed when complete.

CIFAR's pickled batches and SVHN's .mat arrays are exported once to PNG files `images/<split>/<index>.png`
(index = position in torchvision's dataset), so that every dataset's items are image files with the same
loader, transforms and split files. Their labels and class names are written beside them (`images/<split>.txt`,
`images/classes.txt`). SVHN is read by torchvision's class (scipy's loadmat, no pickles). CIFAR's batches are
pickles, which torchvision would unpickle with `pickle.load` — running whatever a tampered file names — so
they are read here, exactly as torchvision reads them (same files, pixels, labels and class names), through
`sa2vp.data.pickles.load_restricted`, which admits numpy arrays, lists, dicts and strings only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sa2vp.atomic import write_atomic
from sa2vp.data.catalogue import Catalogue, Item, format_list, make_catalogue, read_list
from sa2vp.data.errors import DataError, MissingDataError
from sa2vp.data.files import mark_complete, read_marker, staging, verify_checksum
from sa2vp.data.pickles import load_restricted
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.settings import DataSettings


@dataclass(frozen=True)
class _Spec:
    splits: Mapping[str, Mapping[str, Any]]  # official list name → constructor arguments
    layout: str  # what torchvision expects under the root, for error messages
    arrays: bool = False  # images held in memory: exported to PNG
    pickled: bool = False  # python pickles (CIFAR): read with the restricted unpickler, never unverified by advice
    extra: Mapping[str, Any] = field(default_factory=dict)


_SPECS = {
    "CIFAR10": _Spec(
        {"train": {"train": True}, "test": {"train": False}},
        "cifar-10-batches-py/ (data_batch_1…5, test_batch, batches.meta)",
        arrays=True,
        pickled=True,
    ),
    "CIFAR100": _Spec(
        {"train": {"train": True}, "test": {"train": False}},
        "cifar-100-python/ (train, test, meta)",
        arrays=True,
        pickled=True,
    ),
    "SVHN": _Spec(
        {"train": {"split": "train"}, "test": {"split": "test"}}, "train_32x32.mat and test_32x32.mat", arrays=True
    ),
    "DTD": _Spec(
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
        "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,val,test}1.txt",
        extra={"partition": 1},
    ),
    "Food101": _Spec(
        {"train": {"split": "train"}, "test": {"split": "test"}},
        "food-101/images/<class>/*.jpg and food-101/meta/{train,test}.json",
    ),
    "GTSRB": _Spec(
        {"train": {"split": "train"}, "test": {"split": "test"}},
        "gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm, gtsrb/GT-final_test.csv",
    ),
}


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(settings.root) / "torchvision" / info.folder


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The dataset's torchvision root, downloaded or found in place, verified, exported, marked complete."""
    folder = dataset_dir(info, settings)
    if settings.source is not None:  # refused even when the folder is complete: never silently ignored
        raise DataError(
            f"data.source is not used for {info.name}: torchvision reads its files from {folder} "
            f"({_spec(info).layout}); put them there, or leave data.source unset to download them"
        )
    if read_marker(folder) is not None:
        return folder
    if folder.exists():  # in place
        _complete(info, folder, settings, progress)
        return folder
    with staging(folder) as tmp:
        cls = _torchvision_class(info)
        for kwargs in _spec(info).splits.values():
            try:
                cls(str(tmp), download=True, **kwargs, **_spec(info).extra)
            except (OSError, RuntimeError) as exc:  # URLError is an OSError
                raise DataError(f"{info.name}: torchvision could not download it into {tmp}: {exc}") from None
        _complete(info, tmp, settings, progress)
    return folder


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    folder = dataset_dir(info, settings)
    spec = _spec(info)
    if spec.arrays:
        images = folder / "images"
        classes = (images / "classes.txt").read_text(encoding="utf-8").splitlines()
        lists = {name: read_list(images / f"{name}.txt") for name in spec.splits}
        return make_catalogue(folder, classes, lists, str(images))
    named = {name: _file_items(info, folder, kwargs) for name, kwargs in spec.splits.items()}
    classes = _class_names(info, named)
    index = {name: i for i, name in enumerate(classes)}
    lists = {split: [(path, index[cls]) for path, cls in items] for split, items in named.items()}
    return make_catalogue(folder, classes, lists, f"torchvision {spec_name(info)} in {folder}")


def spec_name(info: DatasetInfo) -> str:
    return info.options["class"]


def _spec(info: DatasetInfo) -> _Spec:
    return _SPECS[spec_name(info)]


def _complete(info: DatasetInfo, folder: Path, settings: DataSettings, progress: Progress) -> None:
    if settings.verify_checksums:
        _verify(info, folder)
    if _spec(info).arrays and not (folder / "images").exists():
        with staging(folder / "images") as tmp:
            _export_arrays(info, folder, tmp, progress)
    elif not _spec(info).arrays:
        for kwargs in _spec(info).splits.values():
            _reader(info, folder, kwargs)  # proves torchvision finds every split
    mark_complete(folder, {"dataset": info.name})


def _torchvision_class(info: DatasetInfo) -> type[Any]:
    """torchvision's class for the set (its attributes untyped: torchvision ships no type information)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, spec_name(info))


def _known_md5s(info: DatasetInfo) -> dict[str, str]:
    """File → md5 for the files torchvision pins checksums of (CIFAR's batches, SVHN's .mat files)."""
    cls = _torchvision_class(info)
    if spec_name(info) in ("CIFAR10", "CIFAR100"):
        pairs = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        return {f"{cls.base_folder}/{name}": md5 for name, md5 in pairs}
    if spec_name(info) == "SVHN":
        return {cls.split_list[s][1]: cls.split_list[s][2] for s in ("train", "test")}
    return {}  # DTD, Food-101, GTSRB: torchvision checks their archives only


def _verify(info: DatasetInfo, folder: Path) -> None:
    for name, md5 in _known_md5s(info).items():
        path = folder / name
        if not path.is_file():
            raise MissingDataError(
                f"{path}: missing (torchvision's {spec_name(info)} expects {_spec(info).layout} under {folder})"
            )
        # A pickle with the wrong checksum is not to be waved through: the advice is to replace it.
        verify_checksum(path, f"md5:{md5}", can_skip=not _spec(info).pickled)


def _reader(info: DatasetInfo, folder: Path, kwargs: Mapping[str, Any]) -> Any:
    """torchvision's dataset over files in place; its own md5 checks are left to `_verify` (done once, and
    skippable with data.verify_checksums=false)."""
    cls = _unchecked(_torchvision_class(info))
    try:
        return cls(str(folder), download=False, **kwargs, **_spec(info).extra)
    except (RuntimeError, OSError) as exc:
        raise MissingDataError(
            f"{folder}: torchvision's {spec_name(info)} cannot read it ({exc}); it expects "
            f"{_spec(info).layout}; remove the folder to download it again"
        ) from None


def _unchecked(cls: type[Any]) -> type[Any]:
    name = cls.__name__
    if name in ("CIFAR10", "CIFAR100"):
        raise AssertionError("CIFAR is read by _CifarArrays, never by torchvision's pickle.load")
    if name == "SVHN":

        def exists(self: Any) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

        return type(f"{name}InPlace", (cls,), {"_check_integrity": exists})
    return cls


def _export_arrays(info: DatasetInfo, folder: Path, dest: Path, progress: Progress) -> None:
    classes: list[str] = []
    for split, kwargs in _spec(info).splits.items():
        dataset = _CifarArrays(info, folder, kwargs) if _spec(info).pickled else _reader(info, folder, kwargs)
        classes = [str(c) for c in getattr(dataset, "classes", range(10))]  # SVHN has no names: digits 0–9
        width = max(5, len(str(len(dataset) - 1)))
        items: list[Item] = []
        (dest / split).mkdir()
        with progress(f"exporting {info.name} {split} to PNG", len(dataset), "images") as advance:
            for i in range(len(dataset)):
                image, label = dataset[i]
                relative = f"images/{split}/{i:0{width}d}.png"
                image.save(dest / split / f"{i:0{width}d}.png", format="PNG")
                items.append((relative, int(label)))
                advance(1)
        write_atomic(dest / f"{split}.txt", format_list(items))
    write_atomic(dest / "classes.txt", "".join(f"{c}\n" for c in classes))


class _CifarArrays:
    """CIFAR-10/100 batches as torchvision's CIFAR10/CIFAR100 read them (its file lists, `data` reshaped to
    N×32×32×3, `labels` or `fine_labels`, class names from the meta file) — but unpickled by `load_restricted`,
    and checked to be what a CIFAR batch holds."""

    def __init__(self, info: DatasetInfo, folder: Path, kwargs: Mapping[str, Any]) -> None:
        cls = _torchvision_class(info)
        base = folder / cls.base_folder
        data, labels = [], []
        for name, _ in cls.train_list if kwargs["train"] else cls.test_list:
            pixels, targets = _cifar_batch(info, base / name)
            data.append(pixels)
            labels += targets
        self.images = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.labels = labels
        meta_path = base / cls.meta["filename"]
        meta = _cifar_load(info, meta_path)
        names = meta.get(cls.meta["key"]) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{meta_path}: not CIFAR's meta file (no list of class names under {cls.meta['key']!r})")
        self.classes = names
        if any(not 0 <= label < len(names) for label in labels):
            raise DataError(f"{base}: labels outside 0…{len(names) - 1}; not CIFAR's batches")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.labels[index]


def _cifar_load(info: DatasetInfo, path: Path) -> Any:
    if not path.is_file():
        raise MissingDataError(f"{path}: missing (torchvision's {spec_name(info)} expects {_spec(info).layout})")
    return load_restricted(path)


def _cifar_batch(info: DatasetInfo, path: Path) -> tuple[np.ndarray, list[int]]:
    entry = _cifar_load(info, path)
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR batch (a pickled {type(entry).__name__}, not a dict)")
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: not a CIFAR batch ('data' must be a uint8 array of N×3072 pixels)")
    if (
        not isinstance(labels, list)
        or len(labels) != len(data)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
    ):
        raise DataError(f"{path}: not a CIFAR batch ('labels' / 'fine_labels' must list one integer per image)")
    return data, labels


def _file_items(info: DatasetInfo, folder: Path, kwargs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(path relative to the root, class name) of a file-backed torchvision dataset."""
    dataset = _reader(info, folder, kwargs)
    if spec_name(info) == "GTSRB":
        # GTSRB keeps (path, class id) pairs privately; the id is the folder name (train) or the csv (test),
        # so training labels are taken from the folder name, which stays right even if a class folder is absent.
        pairs = [
            (Path(p), str(int(Path(p).parent.name)) if kwargs["split"] == "train" else str(c))
            for p, c in dataset._samples
        ]
    else:
        # DTD and Food-101 take a loader: one that returns the path gives their file lists without decoding.
        dataset.loader = _identity
        pairs = [(Path(p), dataset.classes[label]) for p, label in (dataset[i] for i in range(len(dataset)))]
    return [(p.relative_to(folder).as_posix(), cls) for p, cls in pairs]


def _identity(path: Any) -> Any:
    return path


def _class_names(info: DatasetInfo, named: Mapping[str, list[tuple[str, str]]]) -> list[str]:
    if spec_name(info) == "GTSRB":
        assert info.num_classes is not None
        return [str(i) for i in range(info.num_classes)]
    found = sorted({cls for items in named.values() for _, cls in items})
    if len(found) != info.num_classes:
        raise DataError(f"{info.name}: found {len(found)} classes, expected {info.num_classes}; is the data complete?")
    return found
