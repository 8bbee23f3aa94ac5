"""VTAB-1k from the pre-split archive (hub dataset XiN0919/VTAB-1k, vtab-1k.zip), a local copy of that
archive, or its extracted folder.

Each task becomes `<root>/vtab-1k/<task>/` holding `train800.txt`, `val200.txt`, `train800val200.txt`,
`test.txt` (`relative/path label` lines) and the images they name. Only the requested task is extracted; an
extracted folder given as data.source is copied (cloned where the file system can), never hard-linked, so
nothing written under data/ can reach the user's files.
"""

from __future__ import annotations

from pathlib import Path

from sa2vp.data.catalogue import Catalogue, make_catalogue, read_list
from sa2vp.data.errors import DataError, MissingDataError
from sa2vp.data.files import archive_names, building, complete_in_place, copy_tree, extract, members_under
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.data.sources.hub import hub_file
from sa2vp.settings import DataSettings

HUB_REPO = "XiN0919/VTAB-1k"
HUB_FILE = "vtab-1k.zip"
LISTS = ("train800", "val200", "train800val200", "test")


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(settings.root) / "vtab-1k" / info.folder


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The task's folder, extracted (or copied) and marked complete."""
    folder = dataset_dir(info, settings)
    source = settings.source
    marker = {"dataset": info.name}
    if complete_in_place(folder, source, marker, _check_lists):  # by hand: accepted if its lists are there
        return folder
    if source is not None and not source.exists():
        raise MissingDataError(
            f"data.source={source}: no such file or folder (expected {HUB_FILE} or the folder it extracts to)"
        )
    # VTAB-1k's archive (data.source's copy, or downloaded), or the folder it extracts to (data.source).
    origin = source
    if origin is None:
        origin = hub_file(HUB_REPO, HUB_FILE, Path(settings.root) / "downloads", settings.verify_checksums, progress)
    with building(folder, source, marker) as tmp:
        if origin.is_file():
            _extract_task(origin, info.folder, tmp, progress)
        else:
            copy_tree(_task_in_folder(origin, info.folder), tmp, progress)
        _check_lists(tmp)
    return folder


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    """The archive's four lists; class names are the label numbers (the lists carry no names)."""
    folder = dataset_dir(info, settings)
    lists = {name: read_list(folder / f"{name}.txt") for name in LISTS}
    assert info.num_classes is not None
    return make_catalogue(folder, [str(i) for i in range(info.num_classes)], lists, str(folder))


def _check_lists(folder: Path) -> None:
    missing = [f"{name}.txt" for name in LISTS if not (folder / f"{name}.txt").is_file()]
    if missing:
        raise MissingDataError(
            f"{folder}: missing {', '.join(missing)} (a VTAB-1k task folder holds "
            f"{', '.join(n + '.txt' for n in LISTS)} and its images)"
        )


def _task_in_folder(source: Path, task: str) -> Path:
    for candidate in (source / task, source / "vtab-1k" / task, source):
        if (candidate / "train800.txt").is_file() and (candidate != source or source.name == task):
            return candidate
    raise MissingDataError(
        f"data.source={source}: no VTAB-1k task folder {task}/ with train800.txt in it "
        f"(expected {source / task / 'train800.txt'})"
    )


def _extract_task(archive: Path, task: str, dest: Path, progress: Progress) -> None:
    # The archive's top folder is not fixed (vtab-1k/<task>/… or <task>/…): find the task by its list file.
    lists = [n for n in archive_names(archive) if n == f"{task}/train800.txt" or n.endswith(f"/{task}/train800.txt")]
    if not lists:
        raise DataError(f"{archive}: has no {task}/train800.txt; is it VTAB-1k's {HUB_FILE}?")
    prefix = min(lists, key=len)[: -len("train800.txt")]
    extract(archive, dest, members_under(prefix), progress)
