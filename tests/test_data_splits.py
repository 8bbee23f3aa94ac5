"""Preparing every kind of source offline and splitting it by every protocol: deterministic and disjoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sa2vp.data import (
    SPLITS,
    ChecksumError,
    CorruptImageError,
    DataError,
    MissingDataError,
    SplitError,
    lookup,
    prepare,
    read_manifest,
    read_split,
)
from sa2vp.data.files import MARKER
from sa2vp.data.sources import fgvc, vtab1k
from sa2vp.settings import DataSettings
from tests.data_fixtures import (
    make_cifar10,
    make_cub_images,
    make_dtd,
    make_gtsrb,
    make_image_folder,
    make_json_zip,
    make_svhn,
    make_vtab_task,
    tar_folder,
    write_vpt_json,
    zip_folder,
)
from tests.hub_server import HubServer, run_sa2vp


def _settings(tmp_path: Path, **kwargs: object) -> DataSettings:
    return DataSettings(root=tmp_path / "data", **kwargs)


def _splits(folder: Path) -> dict[str, list[tuple[str, int]]]:
    return {name: read_split(folder, name) for name in SPLITS}


def _assert_disjoint(splits: dict[str, list[tuple[str, int]]]) -> None:
    train, val, test = ({p for p, _ in splits[n]} for n in ("train", "val", "test"))
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert not {p for p, _ in splits["trainval"]} & test
    for name, items in splits.items():
        assert items == sorted(items) and len({p for p, _ in items}) == len(items), name


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_deterministic(settings: DataSettings) -> Path:
    """Prepare twice from scratch (split files removed in between): byte-identical files."""
    folder = prepare(settings)
    first = _snapshot(folder)
    shutil.rmtree(folder)
    assert prepare(settings) == folder and _snapshot(folder) == first
    assert sorted(first) == ["manifest.json", "test.txt", "train.txt", "trainval.txt", "val.txt"]
    _assert_disjoint(_splits(folder))
    return folder


# --- vtab1k -----------------------------------------------------------------------------------------------


@pytest.fixture
def vtab_zip(tmp_path: Path) -> Path:
    staging = tmp_path / "publisher"
    make_vtab_task(staging, "svhn", num_classes=10)
    make_vtab_task(staging, "dtd", num_classes=3)
    archive = tmp_path / "vtab-1k.zip"
    zip_folder(staging, archive, "vtab-1k/")
    return archive


def test_vtab1k_from_local_archive(tmp_path: Path, vtab_zip: Path) -> None:
    settings = _settings(tmp_path, dataset="svhn", source=vtab_zip)
    folder = _assert_deterministic(settings)
    assert folder == tmp_path / "data" / "splits" / "vtab-svhn" / "vtab1k"
    splits = _splits(folder)
    assert [len(splits[n]) for n in SPLITS] == [20, 10, 30, 10]
    assert splits["trainval"] == sorted(splits["train"] + splits["val"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["images"] == "../../../vtab-1k/svhn" and manifest["seed"] is None
    assert manifest["splits"]["train"]["per_class"] == {str(c): 2 for c in range(10)}
    assert manifest["content_hash"].startswith("sha256:") and manifest["transform"] == "vtab"
    # only the requested task was extracted, with the archive's top folder stripped
    assert sorted(p.name for p in (tmp_path / "data" / "vtab-1k").iterdir()) == ["svhn"]
    assert (tmp_path / "data" / "vtab-1k" / "svhn" / MARKER).is_file()


def test_vtab1k_from_local_folder_and_from_hub(tmp_path: Path, vtab_zip: Path) -> None:
    publisher = tmp_path / "publisher"
    by_folder = prepare(_settings(tmp_path / "a", dataset="vtab-dtd", source=publisher))
    # from a loopback Hub, through the shipped command and the real huggingface_hub client (tests/hub_server.py),
    # with a folder left half-extracted by an interrupted run
    leftover = tmp_path / "b" / "data" / "vtab-1k" / "dtd.partial"
    leftover.mkdir(parents=True)
    (leftover / "train800.txt").write_text("images/half.jpg 0\n")
    with HubServer({("dataset", vtab1k.HUB_REPO, vtab1k.HUB_FILE): vtab_zip.read_bytes()}) as hub:
        result = run_sa2vp(["data", "prepare", "dtd"], tmp_path / "b", hub.client_env(tmp_path / "hf-home"))
        assert result.returncode == 0, result.stderr
        assert [(r.method, r.origin) for r in hub.requests] == [("HEAD", "hub"), ("GET", "cdn"), ("POST", "hub")]
    by_hub = tmp_path / "b" / "data" / "splits" / "vtab-dtd" / "vtab1k"
    assert _snapshot(by_folder) == _snapshot(by_hub)
    assert not leftover.exists()


def test_vtab1k_leak_between_train_and_test_is_refused(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path / "data" / "vtab-1k", "kitti", num_classes=4)  # in place, no marker
    leaked = (task / "train800.txt").read_text().splitlines()[0]
    with (task / "test.txt").open("a") as handle:
        handle.write(leaked + "\n")
    with pytest.raises(SplitError, match="in both train and test"):
        prepare(_settings(tmp_path, dataset="kitti"))


def test_vtab1k_missing_image_and_bad_label_are_named(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path / "data" / "vtab-1k", "eurosat", num_classes=10)
    (task / "images" / "test" / "3_0.jpg").unlink()
    with pytest.raises(MissingDataError, match=r"1 of 40 listed images are missing .* images/test/3_0.jpg"):
        prepare(_settings(tmp_path, dataset="eurosat"))
    (task / "val200.txt").write_text("images/val200/0_0.jpg 12\n")
    with pytest.raises(SplitError, match="label 12; labels must be 0…9"):
        prepare(_settings(tmp_path, dataset="eurosat"))


# --- fgvc -------------------------------------------------------------------------------------------------


def test_fgvc_in_place_and_hta_on_it(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "fgvc" / "CUB_200_2011"
    write_vpt_json(folder, make_cub_images(folder, per_class=4))
    out = _assert_deterministic(_settings(tmp_path, dataset="cub200"))
    splits = _splits(out)
    assert [len(splits[n]) for n in SPLITS] == [400, 200, 600, 200]
    manifest = read_manifest(out)
    assert manifest.classes[0] == "001.Bird_1" and manifest.transform == "fgvc"
    assert splits["train"][0] == ("001.Bird_1/Bird_1_0000.jpg", 0)  # VPT's 1-based ids → 0…199
    assert manifest.images.resolve() == (folder / "images").resolve()

    hta = _settings(tmp_path, dataset="hta-cub200", val_fraction=0.3)
    out_hta = _assert_deterministic(hta)
    assert out_hta.name == "hta-seed42"
    hta_splits = _splits(out_hta)
    assert hta_splits["trainval"] == sorted(splits["train"] + splits["val"])  # the official train split
    assert hta_splits["test"] == splits["test"]
    assert [len(hta_splits[n]) for n in ("train", "val")] == [400, 200]  # one of three per class held out
    other_seed = _splits(prepare(hta.model_copy(update={"seed": 7})))
    assert other_seed["val"] != hta_splits["val"] and other_seed["test"] == hta_splits["test"]


def test_fgvc_download_extracts_publisher_archive_and_hub_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = tmp_path / "publisher" / "CUB_200_2011"
    splits = make_cub_images(publisher, per_class=3)
    (publisher / "README").write_text("CUB")
    archive = tar_folder(publisher, tmp_path / "CUB_200_2011.tgz", "CUB_200_2011")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    info = dataclasses.replace(
        lookup("fgvc-cub200"), urls=(archive.as_uri(),), checksums={"CUB_200_2011.tgz": f"md5:{md5}"}
    )
    monkeypatch.setattr("sa2vp.data.splits.lookup", lambda name: info)
    json_zip = make_json_zip(tmp_path / "json.zip", {"CUB_200_2011": splits, "nabirds": {"train": {}}})
    monkeypatch.setattr(fgvc, "hub_file", lambda *args: json_zip)
    out = prepare(_settings(tmp_path, dataset="fgvc-cub200"))
    folder = tmp_path / "data" / "fgvc" / "CUB_200_2011"
    assert (folder / "README").is_file() and (folder / "test.json").is_file() and (folder / MARKER).is_file()
    assert [len(v) for v in _splits(out).values()] == [200, 200, 400, 200]
    assert (tmp_path / "data" / "downloads" / "CUB_200_2011.tgz").is_file()


def test_nabirds_says_what_to_download_by_hand(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as info:
        prepare(_settings(tmp_path, dataset="nabirds"))
    message = str(info.value)
    assert "nabirds.tar.gz" in message and "https://dl.allaboutbirds.org/nabirds" in message
    assert "--from" in message and str(Path("fgvc") / "nabirds" / "images") in message


# --- hta through torchvision's classes ---------------------------------------------------------------------


def test_hta_cifar10_batches_exported_through_torchvision(tmp_path: Path) -> None:
    root = tmp_path / "data" / "torchvision" / "cifar10"
    make_cifar10(root, per_batch=10)
    with pytest.raises(ChecksumError, match=r"cifar-10-batches-py/data_batch_1: md5"):
        prepare(_settings(tmp_path, dataset="cifar10"))  # fabricated batches are not the publisher's
    settings = _settings(tmp_path, dataset="cifar10", verify_checksums=False)
    out = _assert_deterministic(settings)
    splits = _splits(out)
    assert [len(splits[n]) for n in SPLITS] == [40, 10, 50, 10]
    manifest = read_manifest(out)
    assert manifest.classes[:2] == ("airplane", "automobile")
    # the exported PNG holds exactly torchvision's pixels and label
    import torchvision

    tv = torchvision.datasets.CIFAR10
    reference = type(
        "Unchecked",
        (tv,),
        {
            "train_list": [[f, None] for f, _ in tv.train_list],
            "test_list": [[f, None] for f, _ in tv.test_list],
            "meta": {**tv.meta, "md5": None},
        },
    )(str(root), train=True)
    image, label = reference[13]
    assert ("images/train/00013.png", label) in splits["trainval"]
    assert np.array_equal(np.asarray(Image.open(root / "images" / "train" / "00013.png")), np.asarray(image))


def test_hta_svhn_mat_label_10_is_digit_0(tmp_path: Path) -> None:
    make_svhn(tmp_path / "data" / "torchvision" / "svhn", per_split=50)
    out = _assert_deterministic(_settings(tmp_path, dataset="hta-svhn", verify_checksums=False))
    test = dict(read_split(out, "test"))
    assert test["images/test/00009.png"] == 0  # y = 10 in the .mat
    assert test["images/test/00000.png"] == 1
    assert read_manifest(out).classes == tuple(str(d) for d in range(10))


def test_hta_dtd_and_gtsrb_in_place(tmp_path: Path) -> None:
    make_dtd(tmp_path / "data" / "torchvision" / "dtd", per_split=2)
    out = _assert_deterministic(_settings(tmp_path, dataset="hta-dtd", val_fraction=0.25))
    splits = _splits(out)
    assert [len(splits[n]) for n in SPLITS] == [141, 47, 188, 94]  # official train = train1 ∪ val1
    assert splits["test"][0] == ("dtd/dtd/images/texture00/texture00_test1_0.jpg", 0)

    make_gtsrb(tmp_path / "data" / "torchvision" / "gtsrb", train=4, test=1)
    out = _assert_deterministic(_settings(tmp_path, dataset="gtsrb", val_fraction=0.25))
    splits = _splits(out)
    assert [len(splits[n]) for n in SPLITS] == [129, 43, 172, 43]
    assert ("gtsrb/GTSRB/Final_Test/Images/00042.ppm", 42) in splits["test"]
    assert ("gtsrb/GTSRB/Training/00007/00000_00000.ppm", 7) in splits["trainval"]


# --- holdout: image folders and digits ---------------------------------------------------------------------


def test_folder_holdout_is_stratified_and_seeded(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 20})
    settings = _settings(tmp_path, dataset=f"folder:{images}")
    out = _assert_deterministic(settings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["fractions"] == {"val": 0.1, "test": 0.2}
    assert manifest["splits"]["test"]["per_class"] == {"cat": 2, "dog": 4}
    assert manifest["splits"]["val"]["per_class"] == {"cat": 1, "dog": 2}
    assert not any(path.endswith("notes.txt") for path, _ in read_split(out, "trainval"))
    other = prepare(settings.model_copy(update={"seed": 1}))
    assert other.name == "holdout-seed1" and read_split(other, "test") != read_split(out, "test")


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10}, corrupt=True)
    with pytest.raises(CorruptImageError, match=r"pets/cat/broken.jpg: unreadable or truncated .*skip_corrupt=true"):
        prepare(_settings(tmp_path, dataset=f"folder:{images}", seed=3))  # every listed image is decoded first
    assert not (tmp_path / "data" / "splits").exists()

    skipping = prepare(_settings(tmp_path, dataset=f"folder:{images}", seed=3, skip_corrupt=True))
    manifest = json.loads((skipping / "manifest.json").read_text())
    assert [entry["path"] for entry in manifest["skipped"]] == ["cat/broken.jpg"]
    assert all("broken" not in path for items in _splits(skipping).values() for path, _ in items)
    assert sum(manifest["splits"][n]["count"] for n in ("train", "val", "test")) == 20


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 5})
    (images / "dog").mkdir()
    with pytest.raises(MissingDataError, match=r"pets/dog: class folder 'dog' holds no images"):
        prepare(_settings(tmp_path, dataset=f"folder:{images}"))
    with pytest.raises(MissingDataError, match="image folder not found"):
        prepare(_settings(tmp_path, dataset=f"folder:{tmp_path / 'nowhere'}"))


def test_digits_offline(tmp_path: Path) -> None:
    settings = _settings(tmp_path, dataset="digits", render_size=16)
    out = _assert_deterministic(settings)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["splits"][n]["count"] for n in ("train", "val", "test")) == 1797
    assert manifest["prepared"] == {"dataset": "digits", "render_size": 16}
    first = read_split(out, "train")[0][0]
    assert Image.open(tmp_path / "data" / "digits" / first).size == (16, 16)
    prepare(settings.model_copy(update={"render_size": 20}))  # another size: rendered again
    assert Image.open(tmp_path / "data" / "digits" / first).size == (20, 20)


def test_unreadable_json_is_named_with_its_file(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"manifest.json: not found; run `sa2vp data prepare` first"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON \(Expecting property name"):
        read_manifest(tmp_path)
    settings = _settings(tmp_path, dataset="cub200")
    folder = tmp_path / "data" / "fgvc" / "CUB_200_2011"
    with pytest.raises(MissingDataError, match=r"CUB_200_2011/train.json: split file not found"):
        fgvc.catalogue(lookup("cub200"), settings)
    folder.mkdir(parents=True)
    (folder / "train.json").write_text("{")
    with pytest.raises(SplitError, match=r"CUB_200_2011/train.json: not valid JSON \(Expecting property name"):
        fgvc.catalogue(lookup("cub200"), settings)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("[]", "expected a JSON object"),
        ('{"format": "sa2vp-splits/1", "classes": ["a", "b"], "transform": "vtab"}', "images missing or malformed"),
        ('{"format": "sa2vp-splits/1", "images": "x", "classes": 3, "transform": "vtab"}', "classes missing or"),
    ],
)
def test_damaged_manifest_is_a_data_error(tmp_path: Path, content: str, named: str) -> None:
    # A hand-edited or damaged manifest is bad input: one DataError naming the file, never a traceback.
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError, match=rf"manifest.json: {named}.*run `sa2vp data prepare` again"):
        read_manifest(tmp_path)
