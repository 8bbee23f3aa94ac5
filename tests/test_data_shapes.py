"""The generated offline tasks shapes-count and shapes-loc: what is on disk, that the labels match the drawn
content, determinism per seed, balanced classes, stratified splits, and preparing through the CLI."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from sa2vp.data import DataError, UnknownDatasetError, lookup, prepare, read_manifest, read_split
from sa2vp.data.files import MARKER
from sa2vp.data.sources import shapes
from sa2vp.settings import DataSettings
from sa2vp_cli.main import app
from tests.data_fixtures import TEST_DATA_CONFIG

NAMES = ("shapes-count", "shapes-loc")
# Between the brightest background pixel and the dimmest shape pixel (shapes.BACKGROUND, NOISE, LEVEL).
THRESHOLD = 0.35 * 255
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _blobs(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(pixels > THRESHOLD, structure=EIGHT_NEIGHBOURS)


def _count(pixels: np.ndarray) -> int:
    """The label the image shows for shapes-count: its number of shapes, minus one."""
    return _blobs(pixels)[1] - 1


def _cell(pixels: np.ndarray, grid: int = 4) -> int:
    """The label the image shows for shapes-loc: the grid cell of the centre of the one blob with a hole."""
    labelled, count = _blobs(pixels)
    hollow = [i for i in range(1, count + 1) if (ndimage.binary_fill_holes(labelled == i) != (labelled == i)).any()]
    assert len(hollow) == 1, f"expected one hollow shape, found {len(hollow)}"
    rows, cols = np.nonzero(labelled == hollow[0])
    size = pixels.shape[0]

    def cell(values: np.ndarray) -> int:
        return math.floor((values.min() + values.max() + 1) / 2 * grid / size)

    return cell(rows) * grid + cell(cols)


READ_LABEL = {"shapes-count": _count, "shapes-loc": _cell}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tasks prepared once at the offline backbone's 16 px (seed 42): their split folders."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    return {name: prepare(DataSettings(dataset=name, root=root, render_size=16)) for name in NAMES}


def test_registry_entries() -> None:
    for name in NAMES:
        info = lookup(name)
        assert (info.group, info.source, info.protocol, info.transform) == ("demo", "shapes", "holdout", "vtab")
        assert len(shapes.class_names(info)) == info.num_classes and "generated" in info.title
    assert lookup("Shapes_Count").name == "shapes-count"
    with pytest.raises(UnknownDatasetError):
        lookup("count")  # the demos lend no bare names (count could mean clevr-count)


@pytest.mark.parametrize("name", NAMES)
def test_images_on_disk_show_their_labels(prepared: dict[str, Path], name: str) -> None:
    manifest = read_manifest(prepared[name])
    info = lookup(name)
    assert info.num_classes is not None
    items = read_split(prepared[name], "trainval") + read_split(prepared[name], "test")
    assert len(items) == info.num_classes * int(info.options["per_class"])
    assert manifest.images.resolve() == (prepared[name].parents[2] / name / "seed42").resolve()
    for path, label in items:
        assert path.startswith(f"images/{manifest.classes[label]}/")
        with Image.open(manifest.images / path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (16, 16))
            assert READ_LABEL[name](np.asarray(image)) == label, path


@pytest.mark.parametrize("name", NAMES)
def test_balanced_classes_and_stratified_holdout(prepared: dict[str, Path], name: str) -> None:
    data = read_manifest(prepared[name]).data
    per_class = int(lookup(name).options["per_class"])
    splits = data["splits"]
    for cls in data["classes"]:
        counts = {split: splits[split]["per_class"][cls] for split in ("train", "val", "test")}
        assert sum(counts.values()) == per_class
        # the splitter's round-half-up share of every class (data.test_fraction 0.2, data.val_fraction 0.1)
        assert counts["test"] == math.floor(per_class * 0.2 + 0.5)
        assert counts["val"] == math.floor(per_class * 0.1 + 0.5)
    assert data["prepared"]["generator"] == shapes.GENERATOR and data["prepared"]["seed"] == 42


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_deterministic_per_seed(prepared: dict[str, Path], name: str) -> None:
    info = lookup(name)
    labels = shapes.make_labels(info, 42)
    assert np.array_equal(labels, shapes.make_labels(info, 42))
    assert not np.array_equal(labels, shapes.make_labels(info, 7))
    images = read_manifest(prepared[name]).images
    names = shapes.class_names(info)
    for index in range(0, len(labels), 97):
        pixels = shapes.render_image(info, 42, index, int(labels[index]), 16)
        with Image.open(images / f"images/{names[labels[index]]}/{index:04d}.png") as on_disk:
            assert np.array_equal(pixels, np.asarray(on_disk))
        assert not np.array_equal(pixels, shapes.render_image(info, 7, index, int(labels[index]), 16))


@pytest.mark.parametrize("name", NAMES)
def test_shapes_scale_with_render_size(name: str) -> None:
    info = lookup(name)
    labels = shapes.make_labels(info, 3)
    areas = {}
    for size in (16, 48):
        rendered = [shapes.render_image(info, 3, i, int(labels[i]), size) for i in range(40)]
        assert all(READ_LABEL[name](p) == labels[i] for i, p in enumerate(rendered))
        areas[size] = np.mean([(p > THRESHOLD).sum() for p in rendered])
    assert 6 < areas[48] / areas[16] < 12  # 3× the side: about 9× the ink


def test_loader_reads_the_images(prepared: dict[str, Path]) -> None:
    from sa2vp.data import load_split  # imports torch: only here

    dataset = load_split(prepared["shapes-count"], "train", TEST_DATA_CONFIG)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 6 and Counter(dataset.targets)[label] == 245


def test_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.render_size=12: shapes-count needs at least 16 px"):
        prepare(DataSettings(dataset="shapes-count", root=tmp_path, render_size=12))
    (tmp_path / "shapes-loc" / "seed42").mkdir(parents=True)
    with pytest.raises(DataError, match="not a shapes-loc rendering"):
        prepare(DataSettings(dataset="shapes-loc", root=tmp_path, render_size=16))


def test_an_interrupted_generation_leaves_nothing_that_looks_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shapes.render_image

    def fail_at_100(info: object, seed: int, index: int, label: int, size: int) -> np.ndarray:
        if index == 100:
            raise KeyboardInterrupt
        return real(info, seed, index, label, size)  # type: ignore[arg-type]

    monkeypatch.setattr(shapes, "render_image", fail_at_100)
    with pytest.raises(KeyboardInterrupt):
        prepare(DataSettings(dataset="shapes-count", root=tmp_path, render_size=16))
    assert list((tmp_path / "shapes-count").iterdir()) == [] and not (tmp_path / "splits").exists()


def test_cli_prepares_once_per_seed_and_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["data", "list", "--group", "demo"])
    assert listed.exit_code == 0 and all(name in listed.output for name in NAMES)
    args = ["data", "prepare", "--set", "data.dataset=shapes-count", "--set", "data.render_size=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "shapes-count (holdout, 6 classes): train 1,470, val 210, trainval 1,680, test 420" in result.stdout
    assert "generating shapes-count (seed 42) at 16×16" in result.stderr
    splits = tmp_path / "data/splits/shapes-count/holdout-seed42"
    images = tmp_path / "data/shapes-count/seed42"
    test = read_split(splits, "test")
    marker = (images / MARKER).read_bytes()

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "generating" not in again.stderr  # complete: not redone

    other_seed = runner.invoke(app, [*args, "--seed", "7"])
    assert other_seed.exit_code == 0 and "generating shapes-count (seed 7)" in other_seed.stderr
    assert (images / MARKER).read_bytes() == marker  # seed 42's images untouched beside seed 7's
    assert read_split(tmp_path / "data/splits/shapes-count/holdout-seed7", "test") != test

    resized = runner.invoke(app, [*args, "--set", "data.render_size=20"])
    assert resized.exit_code == 0 and "at 20×20" in resized.stderr
    assert read_split(splits, "test") == test  # same paths and labels at any size
    path, label = test[0]
    with Image.open(images / path) as image:
        assert image.size == (20, 20) and _count(np.asarray(image)) == label
    assert read_manifest(splits).data["prepared"]["render_size"] == 20

    small = runner.invoke(app, ["data", "prepare", "shapes-loc", "--set", "data.render_size=8"])
    assert small.exit_code == 2 and "data.render_size=8" in small.stderr and "Traceback" not in small.output
