"""Protocols → split files + manifest, in a folder DVC can track (method file §4).

`prepare` writes `<root>/splits/<dataset>/<protocol>[-seed<seed>]/` with `train.txt`, `val.txt`, `trainval.txt`,
`test.txt` (one `relative/path label` line per image, sorted by path) and `manifest.json`, written last:

    {"format": "sa2vp-splits/1", "dataset", "source", "protocol", "seed", "fractions", "transform",
     "images": folder the paths are relative to (relative to this folder when under data.root),
     "classes": [name of label 0, …], "prepared": the dataset's completion details,
     "splits": {split: {"file", "count", "sha256", "per_class": {class: count}}},
     "skipped": [{"path", "reason"}], "content_hash": "sha256:…" of the classes and the split files}

`<dataset>` is the registry name, or for `folder:<path>` `folder-<base name>-<8 hex digits of the sha256 of the
absolute path>` (`source` in the manifest is that path), so two folders with one base name never share split
files. A split folder is only ever used for what it was made from: `split_dir` refuses (SplitMismatchError)
a manifest whose dataset, source folder, protocol, seed, fractions or transform differ from the settings, or
whose images were rendered for other settings or rebuilt since (the completion marker it recorded).

Before anything is written, every listed image is decoded (an unreadable one is a CorruptImageError naming
it, or with data.skip_corrupt is left out and listed under "skipped"), and the splits must be able to train
and test a classifier: at least two classes, each in the train split and in every part a seeded protocol holds
out of it (SplitError naming the dataset, class and split).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from sa2vp.atomic import write_atomic
from sa2vp.data.catalogue import Catalogue, Item, format_list, read_list
from sa2vp.data.errors import CorruptImageError, DataError, MissingDataError, SplitError, SplitMismatchError
from sa2vp.data.files import read_json, read_marker
from sa2vp.data.images import check_image
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo, lookup
from sa2vp.data.sources import dataset_dir, fetch, read_catalogue, wanted_marker
from sa2vp.settings import DataSettings

SPLITS = ("train", "val", "trainval", "test")
MANIFEST = "manifest.json"
# In data.root: taken while `ensure_prepared` prepares, so processes started together prepare a dataset once.
PREPARE_LOCK = ".sa2vp-prepare.lock"
FORMAT = "sa2vp-splits/1"
_SEEDED = ("hta", "holdout")
# The splits each protocol fills by a stratified hold-out: every class must get images in each (with the
# remainder, "train"); the official lists of vtab1k and fgvc are used as published.
_STRATIFIED = {"hta": ("train", "val"), "holdout": ("train", "val", "test")}
_DECODE_THREADS = 8  # PIL releases the GIL while decoding

Splits = dict[str, list[Item]]


# --- protocols --------------------------------------------------------------------------------------------


def _vtab1k(catalogue: Catalogue, settings: DataSettings) -> Splits:
    lists = _require(catalogue, "vtab1k", ("train800", "val200", "train800val200", "test"))
    return {
        "train": lists["train800"],
        "val": lists["val200"],
        "trainval": lists["train800val200"],
        "test": lists["test"],
    }


def _fgvc(catalogue: Catalogue, settings: DataSettings) -> Splits:
    lists = _require(catalogue, "fgvc", ("train", "val", "test"))
    return {
        "train": lists["train"],
        "val": lists["val"],
        "trainval": lists["train"] + lists["val"],
        "test": lists["test"],
    }


def _hta(catalogue: Catalogue, settings: DataSettings) -> Splits:
    _require(catalogue, "hta", ("train", "test"))
    official_train = catalogue.pool("train", "val")
    parts = stratified_holdout(official_train, {"val": settings.val_fraction}, settings.seed)
    return {
        "train": parts["rest"],
        "val": parts["val"],
        "trainval": official_train,
        "test": list(catalogue.lists["test"]),
    }


def _holdout(catalogue: Catalogue, settings: DataSettings) -> Splits:
    everything = catalogue.pool(*catalogue.lists)
    parts = stratified_holdout(
        everything, {"test": settings.test_fraction, "val": settings.val_fraction}, settings.seed
    )
    return {
        "train": parts["rest"],
        "val": parts["val"],
        "trainval": parts["rest"] + parts["val"],
        "test": parts["test"],
    }


PROTOCOLS: Mapping[str, Callable[[Catalogue, DataSettings], Splits]] = {
    "vtab1k": _vtab1k,
    "fgvc": _fgvc,
    "hta": _hta,
    "holdout": _holdout,
}


def _require(catalogue: Catalogue, protocol: str, names: Sequence[str]) -> dict[str, list[Item]]:
    missing = [n for n in names if n not in catalogue.lists]
    if missing:
        raise SplitError(
            f"protocol {protocol} needs the lists {', '.join(names)}; {catalogue.root} has {', '.join(catalogue.lists)}"
        )
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
            parts[name] += ranked[start : start + take]
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
        raise DataError(
            f"data.protocol={protocol!r} is not available for {info.name}; allowed: {', '.join(info.protocols)}"
        )
    return protocol


def split_path(settings: DataSettings) -> Path:
    """Where `prepare` writes the split files of the configured dataset (nothing is read)."""
    info = lookup(settings.dataset)
    protocol = resolve_protocol(info, settings)
    suffix = f"-seed{settings.seed}" if protocol in _SEEDED else ""
    return Path(settings.root) / "splits" / info.slug / f"{protocol}{suffix}"


def split_dir(settings: DataSettings) -> Path:
    """The split folder of the configured dataset, for reading: when it holds a manifest, that manifest must
    have been prepared from these settings (SplitMismatchError otherwise; see `check_prepared`)."""
    folder = split_path(settings)
    if (folder / MANIFEST).is_file():
        check_prepared(folder, settings)
    return folder


def check_prepared(folder: Path, settings: DataSettings) -> Manifest:
    """The manifest of a prepared split folder, refused unless it was made from what `settings` ask for: the
    same dataset (for an image folder, the same absolute path), protocol, seed, fractions and transform, from
    images rendered for these settings and not rebuilt since. One line names the folder, the setting, both
    values and the fix."""
    manifest = read_manifest(folder)
    info = lookup(settings.dataset)
    protocol = resolve_protocol(info, settings)
    data = manifest.data
    rewrite = "run `sa2vp data prepare` with these settings to rewrite it"
    identity = ("source", info.origin) if info.origin is not None else ("dataset", info.name)
    for key, wanted, setting in (
        (*identity, "data.dataset"),
        ("protocol", protocol, "data.protocol"),
        ("seed", settings.seed if protocol in _SEEDED else None, "data.seed"),
        ("fractions", _fractions(protocol, settings), "data.val_fraction / data.test_fraction"),
        ("transform", settings.transform or info.transform, "data.transform"),
    ):
        if data.get(key) != wanted:
            raise SplitMismatchError(
                f"{folder} was prepared with {key} {data.get(key)!r}, but these settings "
                f"({setting}) ask for {wanted!r}; {rewrite}"
            )
    recorded = data.get("prepared") or {}
    wanted_files = wanted_marker(info, settings)
    if wanted_files is not None and recorded != dict(wanted_files):
        differ = (
            ", ".join(
                f"{k}={recorded.get(k)!r} (asked: {v!r})" for k, v in wanted_files.items() if recorded.get(k) != v
            )
            or f"{recorded} (asked: {dict(wanted_files)})"
        )
        raise SplitMismatchError(f"{folder} was prepared from {info.name} files made with {differ}; {rewrite}")
    # A folder prepared before prepare refused them (one class, a class missing from a split) is refused too.
    try:
        per_class = {name: dict(data["splits"][name]["per_class"]) for name in ("train", "val", "test")}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{folder / MANIFEST}: no per-class counts of train, val and test; {rewrite}") from None
    check_classes(manifest.classes, protocol, per_class, settings, f"{folder} ({info.name}, {protocol})")
    images = dataset_dir(info, settings)
    current = read_marker(images) or {}
    if recorded != current:
        raise SplitMismatchError(
            f"{folder} was prepared from {images} as completed then ({recorded}), which has "
            f"been rebuilt or removed since (now {current or 'not complete'}); {rewrite}"
        )
    return manifest


def download(settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """Fetch the configured dataset's files (download, extract, verify) without splitting; returns its folder."""
    return fetch(lookup(settings.dataset), settings, progress)


def prepare(settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """Fetch the configured dataset if needed and write its split files and manifest; returns their folder."""
    info = lookup(settings.dataset)
    protocol = resolve_protocol(info, settings)
    catalogue = read_catalogue(info, settings, progress)
    where = f"{info.name} ({protocol})"
    if len(catalogue.classes) < 2:  # before any protocol runs: a one-class folder is the usual case
        check_classes(catalogue.classes, protocol, {}, settings, where)
    splits = PROTOCOLS[protocol](catalogue, settings)
    check_disjoint(splits, where)
    _check_files_exist(catalogue.root, splits, where)
    skipped = _scan_images(catalogue.root, splits, progress)
    if skipped and not settings.skip_corrupt:
        first = skipped[0]
        more = f" ({len(skipped) - 1} more unreadable images)" if len(skipped) > 1 else ""
        raise CorruptImageError(
            f"{where}: {catalogue.root / first['path']}: {first['reason']}{more}; replace or "
            f"remove it, or set data.skip_corrupt=true to leave unreadable images out"
        )
    if skipped:
        bad = {entry["path"] for entry in skipped}
        splits = {name: [item for item in items if item[0] not in bad] for name, items in splits.items()}
    for name in ("train", "val", "test"):
        if not splits[name]:
            raise SplitError(f"{where}: the {name} split is empty (too few images per class for the fractions?)")
    per_class = {name: _per_class(catalogue.classes, splits[name]) for name in ("train", "val", "test")}
    check_classes(catalogue.classes, protocol, per_class, settings, where)
    out = split_path(settings)
    _write(out, info, protocol, settings, catalogue, splits, skipped)
    return out


def ensure_prepared(settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The split folder (`split_dir`), prepared first when it is not there yet. Processes that start at once on
    one data.root (a suite's cells, tuning workers, trainings side by side) prepare it once: the first takes a
    file lock in data.root and prepares; the others wait for it, then find the folder prepared."""
    folder = split_dir(settings)
    if (folder / MANIFEST).is_file():
        return folder
    root = Path(settings.root)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / PREPARE_LOCK):
        folder = split_dir(settings)
        return folder if (folder / MANIFEST).is_file() else prepare(settings, progress)


def check_classes(
    classes: Sequence[str],
    protocol: str,
    per_class: Mapping[str, Mapping[str, int]],
    settings: DataSettings,
    where: str,
) -> None:
    """SplitError unless the splits can train and test a classifier: at least two classes; every class in each
    split a seeded protocol fills by stratified hold-out (hta: train, val; holdout: train, val, test); at least
    two classes in train and in test under any protocol. `per_class`: split → class name → image count."""
    if len(classes) < 2:
        found = f"only class {classes[0]!r}" if classes else "no classes"
        raise SplitError(
            f"{where}: {found}; a classifier needs at least two classes (an image folder needs one "
            f"sub-folder of images per class)"
        )
    stratified = _STRATIFIED.get(protocol, ())
    for name in stratified:
        for cls in classes:
            if per_class[name].get(cls, 0):
                continue
            pool = sum(per_class[part].get(cls, 0) for part in stratified)  # what the hold-out divided
            if not pool:
                reason = "it has no images to split (none in the official train split?)"
            else:
                fraction = settings.val_fraction if name == "val" else settings.test_fraction
                reason = (
                    f"its {pool} image(s) are too few to hold out a {name} share at data.{name}_fraction"
                    f"={fraction}; add images to it or remove the class"
                )
            raise SplitError(f"{where}: class {cls!r} has no images in the {name} split: {reason}")
    for name in ("train", "test"):
        present = [cls for cls in classes if per_class[name].get(cls, 0)]
        if len(present) < 2:
            raise SplitError(
                f"{where}: the {name} split holds images of {len(present)} class(es) only "
                f"({', '.join(map(repr, present))}); it cannot {name} a classifier"
            )


def _per_class(classes: Sequence[str], items: Sequence[Item]) -> dict[str, int]:
    counts = Counter(label for _, label in items)
    return {cls: counts.get(i, 0) for i, cls in enumerate(classes)}


def _check_files_exist(root: Path, splits: Mapping[str, Sequence[Item]], where: str) -> None:
    paths = sorted({path for items in splits.values() for path, _ in items})
    missing = [path for path in paths if not os.path.isfile(root / path)]
    if missing:
        raise MissingDataError(
            f"{where}: {len(missing)} of {len(paths)} listed images are missing under {root}, "
            f"e.g. {', '.join(missing[:3])}"
        )


def _scan_images(root: Path, splits: Mapping[str, Sequence[Item]], progress: Progress) -> list[dict[str, str]]:
    """Decode every listed image (in threads); the unreadable ones, with the reason, in path order."""
    paths = sorted({path for items in splits.values() for path, _ in items})
    skipped = []
    threads = max(1, min(_DECODE_THREADS, os.cpu_count() or 1))
    with progress("checking images", len(paths), "images") as advance, ThreadPoolExecutor(threads) as pool:
        for path, reason in zip(paths, pool.map(check_image, (root / p for p in paths)), strict=True):
            if reason is not None:
                skipped.append({"path": path, "reason": reason})
            advance(1)
    return skipped


def _write(
    out: Path,
    info: DatasetInfo,
    protocol: str,
    settings: DataSettings,
    catalogue: Catalogue,
    splits: Mapping[str, Sequence[Item]],
    skipped: list[dict[str, str]],
) -> None:
    entries: dict[str, Any] = {}
    # A folder being rewritten (other settings) must not look prepared while its files are half new: its
    # manifest goes first and comes back last.
    (out / MANIFEST).unlink(missing_ok=True)
    for name in SPLITS:
        text = format_list(sorted(splits[name]))
        write_atomic(out / f"{name}.txt", text)
        entries[name] = {
            "file": f"{name}.txt",
            "count": len(splits[name]),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "per_class": _per_class(catalogue.classes, splits[name]),
        }
    content = json.dumps(
        {"classes": catalogue.classes, "splits": {n: e["sha256"] for n, e in entries.items()}}, sort_keys=True
    )
    seeded = protocol in _SEEDED
    manifest = {
        "format": FORMAT,
        "dataset": info.name,
        "source": info.origin,
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


_MANIFEST_FIELDS = {"images": str, "classes": list, "transform": str}  # what `Manifest` is made of


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a split folder written by `prepare`."""
    path = Path(folder) / MANIFEST
    data = read_json(path, "not found; run `sa2vp data prepare` first")
    again = "run `sa2vp data prepare` again"
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found a {type(data).__name__}; {again}")
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; {again}")
    malformed = [key for key, kind in _MANIFEST_FIELDS.items() if not isinstance(data.get(key), kind)]
    if malformed:
        raise DataError(f"{path}: {', '.join(malformed)} missing or malformed; {again}")
    images = Path(data["images"])
    return Manifest(
        folder=Path(folder),
        images=images if images.is_absolute() else Path(folder) / images,
        classes=tuple(data["classes"]),
        transform=data["transform"],
        data=data,
    )


def read_split(folder: Path, split: str) -> list[Item]:
    """The items of one split (`train`, `val`, `trainval`, `test`) of a split folder."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    return read_list(Path(folder) / f"{split}.txt")
