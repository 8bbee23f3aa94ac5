"""Tiny copies of the real on-disk formats the data package reads, made on the fly for the tests.

Each builder writes what the publisher (or torchvision) would put on disk, only with a handful of images.
Image bytes are encoded once per colour and reused, which keeps hundreds of files cheap to write.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

TEST_DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.9,
}


@functools.cache
def image_bytes(shade: int, fmt: str = "JPEG", size: int = 12) -> bytes:
    """A small RGB image (a gradient tinted by `shade`) encoded in `fmt`."""
    x = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(x, x) / 2, np.full((size, size), shade % 256), np.tile(x, (size, 1))], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, shade: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    fmt = fmt or {".png": "PNG", ".ppm": "PPM"}.get(suffix, "JPEG")
    path.write_bytes(image_bytes(shade, fmt))
    return path


def _lines(items: Iterable[tuple[str, int]]) -> str:
    return "".join(f"{path} {label}\n" for path, label in items)


# --- VTAB-1k ----------------------------------------------------------------------------------------------


def make_vtab_task(
    parent: Path, task: str = "svhn", num_classes: int = 10, train: int = 2, val: int = 1, test: int = 1
) -> Path:
    """`<parent>/<task>/` as in vtab-1k.zip: images plus train800/val200/train800val200/test lists."""
    folder = parent / task
    lists: dict[str, list[tuple[str, int]]] = {"train800": [], "val200": [], "test": []}
    for label in range(num_classes):
        for split, count in (("train800", train), ("val200", val), ("test", test)):
            for k in range(count):
                relative = f"images/{split}/{label}_{k}.jpg"
                write_image(folder / relative, shade=label * 20 + k)
                lists[split].append((relative, label))
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, items in lists.items():
        (folder / f"{name}.txt").write_text(_lines(items))
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str) -> Path:
    """Zip `folder` with every member under `prefix` (e.g. `vtab-1k/svhn/`)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


# --- torchvision layouts ----------------------------------------------------------------------------------


def make_svhn(root: Path, per_split: int = 20) -> Path:
    """`train_32x32.mat` and `test_32x32.mat`: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        y = (np.arange(per_split) % 10 + 1).astype(np.uint8).reshape(-1, 1)  # 1…10, as the real files
        x = rng.integers(0, 256, (32, 32, 3, per_split), dtype=np.uint8)
        scipy.io.savemat(root / name, {"X": x, "y": y})
    return root


def make_cifar10(root: Path, per_batch: int = 10) -> Path:
    """`cifar-10-batches-py/` with data_batch_1…5, test_batch and batches.meta, pickled as the real ones."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def make_dtd(root: Path, num_classes: int = 47, per_split: int = 2) -> Path:
    """torchvision's DTD layout: `dtd/dtd/images/<class>/*.jpg` and `dtd/dtd/labels/{train,val,test}1.txt`."""
    data = root / "dtd" / "dtd"
    lists: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for c in range(num_classes):
        name = f"texture{c:02d}"
        for split in lists:
            for k in range(per_split):
                filename = f"{name}_{split}_{k}.jpg"
                write_image(data / "images" / name / filename, shade=c)
                lists[split].append(f"{name}/{filename}")
    (data / "labels").mkdir(parents=True, exist_ok=True)
    for split, entries in lists.items():
        (data / "labels" / f"{split}.txt").write_text("".join(f"{e}\n" for e in entries))
    return root


def make_gtsrb(root: Path, num_classes: int = 43, train: int = 4, test: int = 1) -> Path:
    """torchvision's GTSRB layout: Training/<class>/*.ppm (+ per-class csv), Final_Test/Images/*.ppm and
    GT-final_test.csv (`;`-separated with ClassId)."""
    base = root / "gtsrb"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    n = 0
    for c in range(num_classes):
        class_dir = base / "GTSRB" / "Training" / f"{c:05d}"
        for k in range(train):
            write_image(class_dir / f"00000_{k:05d}.ppm", shade=c)
        (class_dir / f"GT-{c:05d}.csv").write_text("Filename;ClassId\n")
        for _ in range(test):
            write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{n:05d}.ppm", shade=c)
            rows.append(f"{n:05d}.ppm;12;12;0;0;11;11;{c}")
            n += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


# --- FGVC -------------------------------------------------------------------------------------------------


def make_cub_images(folder: Path, num_classes: int = 200, per_class: int = 3) -> dict[str, dict[str, int]]:
    """CUB-200-2011's images under `folder/images/<id>.<Name>/*.jpg`; returns VPT-style splits (1-based ids)."""
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    order = ["train", "train", "val", "test"] if per_class > 3 else ["train", "val", "test"]
    for c in range(num_classes):
        class_name = f"{c + 1:03d}.Bird_{c + 1}"
        for k in range(per_class):
            relative = f"{class_name}/Bird_{c + 1}_{k:04d}.jpg"
            write_image(folder / "images" / relative, shade=c)
            splits[order[k % len(order)]][relative] = c + 1
    return splits


def write_vpt_json(folder: Path, splits: dict[str, dict[str, int]]) -> None:
    for name, entries in splits.items():
        (folder / f"{name}.json").write_text(json.dumps(entries))


def make_json_zip(archive: Path, sets: dict[str, dict[str, dict[str, int]]]) -> Path:
    """A json.zip as on the hub: one folder per set with train/val/test.json."""
    with zipfile.ZipFile(archive, "w") as zf:
        for folder, splits in sets.items():
            for name, entries in splits.items():
                zf.writestr(f"json/{folder}/{name}.json", json.dumps(entries))
    return archive


def tar_folder(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return archive


# --- image folders ----------------------------------------------------------------------------------------


def make_image_folder(root: Path, classes: dict[str, int], corrupt: bool = False) -> Path:
    """One sub-folder per class of small images in mixed formats and modes; optionally one truncated JPEG."""
    modes = ["RGB", "L", "P", "RGBA", "LA"]
    for c, (name, count) in enumerate(classes.items()):
        for k in range(count):
            mode = modes[k % len(modes)]
            image = Image.open(io.BytesIO(image_bytes(c * 40 + k, "PNG"))).convert(mode)
            path = root / name / f"{name}_{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    (root / next(iter(classes)) / "notes.txt").write_text("not an image")
    if corrupt:
        data = image_bytes(7, "JPEG")
        (root / next(iter(classes)) / "broken.jpg").write_bytes(data[: len(data) // 2])
    return root
