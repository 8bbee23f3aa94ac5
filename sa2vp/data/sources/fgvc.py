"""FGVC sets (CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) with VPT's json splits.

Each set becomes `<root>/fgvc/<VPT's folder>/` (CUB_200_2011, nabirds, OxfordFlower, Stanford-dogs,
Stanford-cars) holding the images under `image_dir` (registry options) and VPT's `train.json`, `val.json`,
`test.json` (`{relative/path: class id}`). Images come from the publisher's URL, the hub (Stanford Cars, whose
site is gone), or `data.source` (a local archive or folder; the only way for NABirds, whose terms must be
accepted by hand). The json files come from hub dataset XiN0919/FGVC (`json.zip`) unless already there. A
folder given as data.source is copied (cloned where the file system can), never hard-linked into data/.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from sa2vp.data.catalogue import Catalogue, class_names_from_paths, make_catalogue
from sa2vp.data.errors import DataError, MissingDataError, SplitError
from sa2vp.data.files import (
    archive_names,
    building,
    complete_in_place,
    copy_tree,
    download_url,
    extract,
    members_under,
    read_json,
)
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo, normalise
from sa2vp.data.sources.hub import hub_file, hub_filenames
from sa2vp.settings import DataSettings

HUB_REPO = "XiN0919/FGVC"
JSON_FILE = "json.zip"
SPLITS = ("train", "val", "test")
_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(settings.root) / "fgvc" / info.folder


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The set's folder with its images and VPT's json splits, marked complete."""

    def add_splits(images: Path) -> None:  # to the images, whether put in place by hand or just fetched
        _add_json_splits(info, images, settings, progress)
        _check_layout(info, images)

    folder = dataset_dir(info, settings)
    source = settings.source
    marker = {"dataset": info.folder}
    if complete_in_place(folder, source, marker, add_splits):
        return folder
    images = _image_source(info, settings, progress)
    with building(folder, source, marker) as tmp:
        if images.is_dir():
            copy_tree(images, tmp, progress)
        else:
            _extract_images(info, images, tmp, progress)
        add_splits(tmp)
    return folder


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    """VPT's three lists, with VPT's class ids mapped to 0…N-1 in sorted order (as VPT's loader does)."""
    folder = dataset_dir(info, settings)
    raw = {split: _read_json(folder / f"{split}.json") for split in SPLITS}
    ids = sorted({label for entries in raw.values() for label in entries.values()})
    if info.num_classes is not None and len(ids) != info.num_classes:
        raise SplitError(f"{folder}: the json splits hold {len(ids)} classes, {info.name} has {info.num_classes}")
    index = {label: i for i, label in enumerate(ids)}
    lists = {split: sorted((path, index[label]) for path, label in entries.items()) for split, entries in raw.items()}
    classes = class_names_from_paths([item for items in lists.values() for item in items], len(ids))
    return make_catalogue(folder / info.options["image_dir"], classes, lists, f"{folder} json splits")


def _read_json(path: Path) -> dict[str, int]:
    data = read_json(path, "split file not found", SplitError)
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected an object {{relative/path: class id}}")
    try:
        return {str(k): int(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise SplitError(f"{path}: class ids must be integers") from None


def _image_source(info: DatasetInfo, settings: DataSettings, progress: Progress) -> Path:
    """A local archive or folder with the images, downloading it where there is a public source."""
    if settings.source is not None:
        if not settings.source.exists():
            raise MissingDataError(f"data.source={settings.source}: no such file or folder")
        return settings.source
    if "manual" in info.options:
        raise MissingDataError(
            f"{info.title} must be downloaded by hand: {info.options['manual']}; then run `sa2vp data download "
            f"{info.name} --from <that file>` (or set data.source), or extract it yourself so that "
            f"{Path(settings.root) / 'fgvc' / info.folder / info.options['image_dir']}/ holds the images"
        )
    downloads = Path(settings.root) / "downloads"
    if "hub_images" in info.options:
        hint = info.options["hub_images"]
        names = [n for n in hub_filenames(HUB_REPO) if hint in n.lower() and n.lower().endswith(_ARCHIVES)]
        if not names:
            raise DataError(f"hub dataset {HUB_REPO} has no archive with {hint!r} in its name; set data.source")
        return hub_file(HUB_REPO, names[0], downloads, settings.verify_checksums, progress)
    (url,) = info.urls
    filename = url.rsplit("/", 1)[-1]
    checksum = info.checksums.get(filename) if settings.verify_checksums else None
    return download_url(url, downloads / filename, checksum, progress)


def _extract_images(info: DatasetInfo, archive: Path, dest: Path, progress: Progress) -> None:
    # Publishers wrap their files differently (CUB_200_2011/…, nabirds/…, jpg/…, Images/…): `archive_root` is
    # the wrapping folder to strip, when the archive has it.
    root = info.options["archive_root"]
    prefix = f"{root}/" if root else ""
    if prefix and not any(name.startswith(prefix) for name in archive_names(archive)):
        prefix = ""
    extract(archive, dest, members_under(prefix), progress)


def _add_json_splits(info: DatasetInfo, folder: Path, settings: DataSettings, progress: Progress) -> None:
    if all((folder / f"{s}.json").is_file() for s in SPLITS):
        return
    archive = hub_file(HUB_REPO, JSON_FILE, Path(settings.root) / "downloads", settings.verify_checksums, progress)
    prefix = _json_folder(info, archive)
    # Extracted beside the folder, then renamed in, so that a json file is either complete or absent.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".json-") as tmp:
        wanted = {f"{prefix}{s}.json": f"{s}.json" for s in SPLITS}
        extract(archive, Path(tmp), wanted.get, progress)
        for name in wanted.values():
            os.replace(Path(tmp) / name, folder / name)


def _json_folder(info: DatasetInfo, archive: Path) -> str:
    """The folder inside json.zip that holds this set's train/val/test.json (matched by name)."""
    names = set(archive_names(archive))
    accepted = {normalise(n) for n in info.options["json_names"].split(",")}
    folders = sorted({str(PurePosixPath(n).parent) for n in names if n.endswith("train.json")})
    for candidate in folders:
        prefix = "" if candidate == "." else f"{candidate}/"
        if normalise(PurePosixPath(candidate).name) in accepted and all(f"{prefix}{s}.json" in names for s in SPLITS):
            return prefix
    raise DataError(
        f"{archive}: no folder for {info.title} with train/val/test.json (looked for "
        f"{info.options['json_names']}; found {', '.join(folders) or 'none'})"
    )


def _check_layout(info: DatasetInfo, folder: Path) -> None:
    image_dir = folder / info.options["image_dir"]
    missing = [f"{s}.json" for s in SPLITS if not (folder / f"{s}.json").is_file()]
    if not image_dir.is_dir() or missing or not any(image_dir.iterdir()):
        raise MissingDataError(
            f"{folder}: expected the images under {image_dir}/ and VPT's train.json, val.json, test.json"
            + (f" (missing {', '.join(missing)})" if missing else "")
        )
