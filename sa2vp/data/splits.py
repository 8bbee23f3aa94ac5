"""Protocols → split files + manifest, in a folder DVC can track (method file §4).

`prepare` writes `<root>/splits/<dataset>/<protocol>[-seed<seed>]/` with `train.txt`, `val.txt`, `trainval.txt`,
`test.txt` (one `relative/path label` line per image, sorted by path) and `manifest.json`, written last:

    {"format": "sa2vp-splits/1", "dataset", "protocol", "seed", "fractions", "transform",
     "images": folder the paths are relative to (relative to this folder when under data.root),
     "classes": [name of label 0, …], "prepared": the dataset's completion details,
     "splits": {split: {"file", "count", "sha256", "per_class": {class: count}}},
     "skipped": [{"path", "reason"}], "content_hash": "sha256:…" of the classes and the split files}

Protocols: `vtab1k` (the archive's train800 / val200 / train800val200 / test), `fgvc` (VPT's train / val /
test; trainval = train ∪ val), `hta` (a seeded, stratified hold-out of `data.val_fraction` of the official
train split — train ∪ val where the publisher ships a val list — for validation; the official test split),
`holdout` (seeded, stratified train / val / test of every image). Seeded assignments rank each class's images
by sha256(seed, path), so they depend on nothing but the seed and the paths: the same inputs give
byte-identical files on any machine, and adding an image moves no other. No image is in two of train / val /
test, nor in trainval and test — checked for every protocol before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sa2vp.data.catalogue import Catalogue, Item, format_list, read_list
from sa2vp.data.errors import CorruptImageError, DataError, MissingDataError, SplitError
from sa2vp.data.files import read_marker, write_atomic
from sa2vp.data.images import load_image
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo, lookup
from sa2vp.data.sources import dataset_dir, fetch, read_catalogue
from sa2vp.settings import DataSettings

SPLITS = ("train", "val", "trainval", "test")
MANIFEST = "manifest.json"
FORMAT = "sa2vp-splits/1"
_SEEDED = ("hta", "holdout")

Splits = dict[str, list[Item]]


# --- protocols --------------------------------------------------------------------------------------------

def _vtab1k(catalogue: Catalogue, settings: DataSettings) -> Splits:
    lists = _require(catalogue, "vtab1k", ("train800", "val200", "train800val200", "test"))
    return {"train": lists["train800"], "val": lists["val200"], "trainval": lists["train800val200"],
            "test": lists["test"]}


def _fgvc(catalogue: Catalogue, settings: DataSettings) -> Splits:
    lists = _require(catalogue, "fgvc", ("train", "val", "test"))
    return {"train": lists["train"], "val": lists["val"], "trainval": lists["train"] + lists["val"],
            "test": lists["test"]}


def _hta(catalogue: Catalogue, settings: DataSettings) -> Splits:
    _require(catalogue, "hta", ("train", "test"))
    official_train = catalogue.pool("train", "val")
    parts = stratified_holdout(official_train, {"val": settings.val_fraction}, settings.seed)
    return {"train": parts["rest"], "val": parts["val"], "trainval": official_train,
            "test": list(catalogue.lists["test"])}


def _holdout(catalogue: Catalogue, settings: DataSettings) -> Splits:
    everything = catalogue.pool(*catalogue.lists)
    parts = stratified_holdout(everything, {"test": settings.test_fraction, "val": settings.val_fraction},
                               settings.seed)
    return {"train": parts["rest"], "val": parts["val"], "trainval": parts["rest"] + parts["val"],
            "test": parts["test"]}


PROTOCOLS: Mapping[str, Callable[[Catalogue, DataSettings], Splits]] = {
    "vtab1k": _vtab1k, "fgvc": _fgvc, "hta": _hta, "holdout": _holdout,
}


def _require(catalogue: Catalogue, protocol: str, names: Sequence[str]) -> dict[str, list[Item]]:
    missing = [n for n in names if n not in catalogue.lists]
    if missing:
        raise SplitError(f"protocol {protocol} needs the lists {', '.join(names)}; {catalogue.root} has "
                         f"{', '.join(catalogue.lists)}")
    return {n: list(catalogue.lists[n]) for n in names}


def stratified_holdout(items: Sequence[Item], fractions: Mapping[str, float], seed: int) -> dict[str, list[Item]]:
    """Per class, the first round(n·f) images by sha256(seed, path) go to each named part, in the given order;
    the rest to "rest" (at least one image per class stays there)."""
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    parts: dict[str, list[Item]] = {name: [] for name in (*fractions, "rest")}
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda item: _rank(seed, item[0]))
        start = 0
        for name, fraction in fractions.items():
            take = min(math.floor(len(ranked) * fraction + 0.5), len(ranked) - start - 1)
            take = max(take, 0)
            parts[name] += ranked[start:start + take]
            start += take
        parts["rest"] += ranked[start:]
    return parts


def _rank(seed: int, path: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{path}".encode()).digest()


def check_disjoint(splits: Mapping[str, Sequence[Item]], where: str) -> None:
    """SplitError if an image is listed twice in a split, in two of train/val/test, in trainval and test, or
    with two different labels anywhere."""
    owner: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for path, _ in splits[split]:
            if path in owner:
                what = "twice" if owner[path] == split else f"in both {owner[path]} and {split}"
                raise SplitError(f"{where}: {path} is listed {what}; train, val and test must not share images")
            owner[path] = split
    test = {path for path, _ in splits["test"]}
    labels: dict[str, int] = {}
    for split in SPLITS:
        for path, label in splits[split]:
            if split == "trainval" and path in test:
                raise SplitError(f"{where}: {path} is in both trainval and test")
            if labels.setdefault(path, label) != label:
                raise SplitError(f"{where}: {path} is listed with labels {labels[path]} and {label}")


# --- prepare ----------------------------------------------------------------------------------------------

def resolve_protocol(info: DatasetInfo, settings: DataSettings) -> str:
    """data.protocol, or the dataset's default; an error names what the dataset allows."""
    protocol = settings.protocol or info.protocol
    if protocol not in info.protocols:
        raise DataError(f"data.protocol={protocol!r} is not available for {info.name}; allowed: "
                        f"{', '.join(info.protocols)}")
    return protocol


def split_dir(settings: DataSettings) -> Path:
    """Where `prepare` writes (and the loader reads) the split files of the configured dataset."""
    info = lookup(settings.dataset)
    protocol = resolve_protocol(info, settings)
    name = f"folder-{Path(info.folder).resolve().name}" if info.source == "folder" else info.name
    suffix = f"-seed{settings.seed}" if protocol in _SEEDED else ""
    return Path(settings.root) / "splits" / name / f"{protocol}{suffix}"


def download(settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """Fetch the configured dataset's files (download, extract, verify) without splitting; returns its folder."""
    return fetch(lookup(settings.dataset), settings, progress)


def prepare(settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """Fetch the configured dataset if needed and write its split files and manifest; returns their folder."""
    info = lookup(settings.dataset)
    protocol = resolve_protocol(info, settings)
    catalogue = read_catalogue(info, settings, progress)
    splits = PROTOCOLS[protocol](catalogue, settings)
    where = f"{info.name} ({protocol})"
    check_disjoint(splits, where)
    _check_files_exist(catalogue.root, splits, where)
    skipped = _scan_images(catalogue.root, splits, progress) if settings.skip_corrupt else []
    if skipped:
        bad = {entry["path"] for entry in skipped}
        splits = {name: [item for item in items if item[0] not in bad] for name, items in splits.items()}
    for name in ("train", "val", "test"):
        if not splits[name]:
            raise SplitError(f"{where}: the {name} split is empty (too few images per class for the fractions?)")
    out = split_dir(settings)
    _write(out, info, protocol, settings, catalogue, splits, skipped)
    return out


def _check_files_exist(root: Path, splits: Mapping[str, Sequence[Item]], where: str) -> None:
    paths = sorted({path for items in splits.values() for path, _ in items})
    missing = [path for path in paths if not os.path.isfile(root / path)]
    if missing:
        raise MissingDataError(f"{where}: {len(missing)} of {len(paths)} listed images are missing under {root}, "
                               f"e.g. {', '.join(missing[:3])}")


def _scan_images(root: Path, splits: Mapping[str, Sequence[Item]], progress: Progress) -> list[dict[str, str]]:
    """Decode every listed image; the unreadable ones, with the reason."""
    paths = sorted({path for items in splits.values() for path, _ in items})
    skipped = []
    with progress("checking images", len(paths), "images") as advance:
        for path in paths:
            try:
                load_image(root / path)
            except CorruptImageError as exc:
                skipped.append({"path": path, "reason": str(exc).split(": ", 1)[-1]})
            advance(1)
    return skipped


def _write(out: Path, info: DatasetInfo, protocol: str, settings: DataSettings, catalogue: Catalogue,
           splits: Mapping[str, Sequence[Item]], skipped: list[dict[str, str]]) -> None:
    entries: dict[str, Any] = {}
    for name in SPLITS:
        text = format_list(sorted(splits[name]))
        write_atomic(out / f"{name}.txt", text)
        counts = Counter(label for _, label in splits[name])
        entries[name] = {
            "file": f"{name}.txt",
            "count": len(splits[name]),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "per_class": {cls: counts.get(i, 0) for i, cls in enumerate(catalogue.classes)},
        }
    content = json.dumps({"classes": catalogue.classes, "splits": {n: e["sha256"] for n, e in entries.items()}},
                         sort_keys=True)
    seeded = protocol in _SEEDED
    manifest = {
        "format": FORMAT,
        "dataset": info.name,
        "protocol": protocol,
        "seed": settings.seed if seeded else None,
        "fractions": _fractions(protocol, settings),
        "transform": settings.transform or info.transform,
        "images": _images_ref(catalogue.root, out, Path(settings.root)),
        "classes": list(catalogue.classes),
        "prepared": read_marker(dataset_dir(info, settings)) or {},
        "splits": entries,
        "skipped": skipped,
        "content_hash": "sha256:" + hashlib.sha256(content.encode("utf-8")).hexdigest(),
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _fractions(protocol: str, settings: DataSettings) -> dict[str, float] | None:
    if protocol == "hta":
        return {"val": settings.val_fraction}
    if protocol == "holdout":
        return {"val": settings.val_fraction, "test": settings.test_fraction}
    return None


def _images_ref(images: Path, out: Path, root: Path) -> str:
    # Relative when under data.root, so the data folder can move (or be checked out elsewhere) as a whole.
    images, out, root = images.resolve(), out.resolve(), root.resolve()
    if images.is_relative_to(root):
        return Path(os.path.relpath(images, out)).as_posix()
    return images.as_posix()


# --- reading ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    """A split folder's manifest, with the images folder resolved."""

    folder: Path
    images: Path
    classes: tuple[str, ...]
    transform: str
    data: Mapping[str, Any]  # everything in manifest.json


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a split folder written by `prepare`."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingDataError(f"{path}: not found; run `sa2vp data prepare` first") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; run `sa2vp data prepare` again")
    images = Path(data["images"])
    return Manifest(folder=Path(folder), images=images if images.is_absolute() else Path(folder) / images,
                    classes=tuple(data["classes"]), transform=data["transform"], data=data)


def read_split(folder: Path, split: str) -> list[Item]:
    """The items of one split (`train`, `val`, `trainval`, `test`) of a split folder."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return read_list(Path(folder) / f"{split}.txt")
