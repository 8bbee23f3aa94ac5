"""What a source hands to the split protocols: the dataset's images and its official lists, as published.

An item is `(relative/path, label)`, the path relative to `Catalogue.root` with `/` separators. Array
datasets (CIFAR's pickled batches, SVHN's .mat) are exported to PNG files once during preparation, so every
item of every dataset is an image file and one loader serves all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sa2vp.data.errors import MissingDataError, SplitError

Item = tuple[str, int]


@dataclass(frozen=True)
class Catalogue:
    """A prepared dataset: where its images are, its class names (index = label) and its official lists."""

    root: Path
    classes: tuple[str, ...]
    lists: Mapping[str, tuple[Item, ...]]  # e.g. {"train800": …, "test": …} or {"all": …}

    def pool(self, *names: str) -> list[Item]:
        """The items of several official lists together (e.g. train ∪ val as the official train split)."""
        return [item for name in names for item in self.lists.get(name, ())]


def make_catalogue(root: Path, classes: Sequence[str], lists: Mapping[str, Sequence[Item]], origin: str) -> Catalogue:
    """A Catalogue whose paths and labels are checked; `origin` names where the lists came from in errors."""
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        classes = tuple(str(i) for i in range(len(classes)))  # names must identify classes; fall back to indices
    checked = {
        name: tuple(_check(item, len(classes), f"{origin} ({name})") for item in items) for name, items in lists.items()
    }
    return Catalogue(root=Path(root), classes=classes, lists=checked)


def _check(item: Item, num_classes: int, where: str) -> Item:
    path, label = item
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or ".." in parts or "\n" in path or "\\" in path:
        raise SplitError(f"{where}: path {path!r} must be relative, with '/' separators and no '..'")
    if not 0 <= label < num_classes:
        raise SplitError(f"{where}: {path} has label {label}; labels must be 0…{num_classes - 1}")
    return path, int(label)


def class_names_from_paths(items: Sequence[Item], num_classes: int) -> list[str]:
    """Class names from the first folder of the item paths when it is one distinct folder per label
    (`001.Black_footed_Albatross/…jpg`), else the label numbers."""
    folders: dict[int, set[str]] = {}
    for path, label in items:
        parts = PurePosixPath(path).parts
        folders.setdefault(label, set()).add(parts[0] if len(parts) > 1 else "")
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else "" for i in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(i) for i in range(num_classes)]


def read_list(path: Path) -> list[Item]:
    """A list file of `relative/path label` lines (VTAB-1k's lists, our split files); errors name file:line."""
    items = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingDataError(f"{path}: list file not found") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        image, _, label = line.rstrip().rpartition(" ")
        if not image or not label.lstrip("-").isdigit():
            raise SplitError(f"{path}:{number}: expected 'relative/path label', got {line!r}")
        items.append((image.strip(), int(label)))
    return items


def format_list(items: Sequence[Item]) -> str:
    """The text of a list file: one `relative/path label` line per item, in the given order."""
    return "".join(f"{path} {label}\n" for path, label in items)
