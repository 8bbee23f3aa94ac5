"""Reliability of the data layer: split folders used only for what they were made from, splits that can train
and test a classifier, user files never written through, pickles that cannot run code, images decoded when
prepared. Real files in the real formats, fabricated in tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from sa2vp.data import (
    ChecksumError,
    DataError,
    SplitError,
    SplitMismatchError,
    UnsafePickleError,
    prepare,
    read_manifest,
    split_dir,
)
from sa2vp.data.pickles import load_restricted
from sa2vp.settings import DataSettings
from sa2vp_cli.main import app
from tests.data_fixtures import (
    image_bytes,
    make_cifar10,
    make_cub_images,
    make_dtd,
    make_image_folder,
    make_vtab_task,
    write_vpt_json,
)

runner = CliRunner()
LIBRARY = Path(__file__).resolve().parents[1] / "sa2vp"


def _settings(tmp_path: Path, **kwargs: object) -> DataSettings:
    return DataSettings(root=tmp_path / "data", **kwargs)


# --- 1: a split folder is keyed by, and checked against, what it was made from -----------------------------------


def test_two_folders_with_one_base_name_get_their_own_splits(tmp_path: Path) -> None:
    first = make_image_folder(tmp_path / "a" / "small", {"cat": 5, "dog": 5})
    second = make_image_folder(tmp_path / "b" / "small", {"ant": 5, "bee": 5, "fly": 5})
    out_a = prepare(_settings(tmp_path, dataset=f"folder:{first}"))
    out_b = prepare(_settings(tmp_path, dataset=f"folder:{second}"))
    assert out_a != out_b and out_a.parent.name.startswith("folder-small-")
    # what training reads for each: its own folder, classes and images
    for images, out, classes in ((first, out_a, ("cat", "dog")), (second, out_b, ("ant", "bee", "fly"))):
        settings = _settings(tmp_path, dataset=f"folder:{images}")
        assert split_dir(settings) == out
        manifest = read_manifest(out)
        assert manifest.classes == classes and manifest.data["source"] == images.resolve().as_posix()
        assert manifest.images.resolve() == images.resolve()


def test_a_split_made_from_another_folder_is_refused(tmp_path: Path) -> None:
    first = make_image_folder(tmp_path / "a" / "small", {"cat": 5, "dog": 5})
    second = make_image_folder(tmp_path / "b" / "small", {"ant": 5, "bee": 5})
    out_a = prepare(_settings(tmp_path, dataset=f"folder:{first}"))
    wanted = _settings(tmp_path, dataset=f"folder:{second}")
    target = split_dir(wanted)  # not prepared yet: just where it will be
    shutil.copytree(out_a, target)  # a split folder copied or left where another dataset's belongs
    with pytest.raises(SplitMismatchError) as info:
        split_dir(wanted)
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    assert f"source {first.resolve().as_posix()!r}" in message and repr(second.resolve().as_posix()) in message
    assert "sa2vp data prepare" in message
    assert prepare(wanted) == target and split_dir(wanted) == target  # preparing rewrites it for this folder
    assert read_manifest(target).classes == ("ant", "bee")


@pytest.mark.parametrize(
    ("change", "recorded"),
    [
        ({"val_fraction": 0.3}, "fractions {'val': 0.1, 'test': 0.2}"),
        ({"test_fraction": 0.4}, "fractions {'val': 0.1, 'test': 0.2}"),
        ({"transform": "fgvc"}, "transform 'vtab'"),
    ],
)
def test_a_split_reused_with_other_settings_is_refused(tmp_path: Path, change: dict, recorded: str) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    settings = _settings(tmp_path, dataset=f"folder:{images}")
    out = prepare(settings)
    assert split_dir(settings) == out
    other = settings.model_copy(update=change)
    with pytest.raises(SplitMismatchError, match=re.escape(f"{out} was prepared with {recorded}, but")):
        split_dir(other)
    assert prepare(other) == out and split_dir(other) == out


def test_a_split_copied_under_another_seed_or_dataset_is_refused(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    out = prepare(_settings(tmp_path, dataset=f"folder:{images}", seed=1))
    shutil.copytree(out, out.with_name("holdout-seed2"))
    with pytest.raises(SplitMismatchError, match="was prepared with seed 1, but these settings .data.seed. ask for 2"):
        split_dir(_settings(tmp_path, dataset=f"folder:{images}", seed=2))
    make_vtab_task(tmp_path / "data" / "vtab-1k", "eurosat", num_classes=10)
    out = prepare(_settings(tmp_path, dataset="eurosat"))
    shutil.copytree(out, out.parent.parent / "vtab-resisc45" / "vtab1k")
    with pytest.raises(SplitMismatchError, match="with dataset 'vtab-eurosat', but .* ask for 'vtab-resisc45'"):
        split_dir(_settings(tmp_path, dataset="resisc45"))


def test_a_split_of_images_rendered_for_other_settings_is_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path, dataset="digits", render_size=8, seed=5)
    prepare(settings)
    bigger = settings.model_copy(update={"render_size": 12})
    with pytest.raises(SplitMismatchError, match=r"digits files made with render_size=8 \(asked: 12\)"):
        split_dir(bigger)  # training would read 8 px images as if they were 12 px ones
    prepare(bigger.model_copy(update={"seed": 6}))  # re-renders the shared images at 12 px
    with pytest.raises(SplitMismatchError, match=r"render_size=8 \(asked: 12\)"):
        split_dir(bigger)
    with pytest.raises(SplitMismatchError, match=r"rebuilt or removed since"):
        split_dir(settings)  # asks for 8 px, but the images the split lists are now 12 px


def test_a_dataset_folder_made_from_another_copy_is_refused(tmp_path: Path) -> None:
    first = make_vtab_task(tmp_path / "first", "svhn", num_classes=10, train=1, val=1, test=1).parent
    second = make_vtab_task(tmp_path / "second", "svhn", num_classes=10, train=2, val=1, test=1).parent
    prepare(_settings(tmp_path, dataset="svhn", source=first))
    with pytest.raises(DataError) as info:  # before: the copy of `first` was used, and --from silently ignored
        prepare(_settings(tmp_path, dataset="svhn", source=second))
    folder = tmp_path / "data" / "vtab-1k" / "svhn"
    assert str(info.value) == (
        f"{folder} was made from {first.resolve().as_posix()}, not from data.source={second}; "
        f"remove {folder} to rebuild it from {second}, or leave data.source unset to use it "
        f"as it is"
    )
    assert prepare(_settings(tmp_path, dataset="svhn", source=first)).is_dir()  # the same copy, or none named
    assert prepare(_settings(tmp_path, dataset="svhn")).is_dir()
    make_cifar10(tmp_path / "data" / "torchvision" / "cifar10", per_batch=10)
    prepare(_settings(tmp_path, dataset="cifar10", verify_checksums=False))
    with pytest.raises(DataError, match="data.source is not used for hta-cifar10"):  # complete: still not ignored
        prepare(_settings(tmp_path, dataset="cifar10", verify_checksums=False, source=first))


# --- 4: splits that can train and test a classifier -------------------------------------------------------------


def test_one_class_folder_is_refused(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "only", {"cat": 20})
    with pytest.raises(SplitError, match=rf"folder:{re.escape(str(images))} \(holdout\): only class 'cat'"):
        prepare(_settings(tmp_path, dataset=f"folder:{images}"))
    assert not (tmp_path / "data" / "splits").exists()


def test_a_one_class_split_prepared_earlier_is_refused_when_reused(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    settings = _settings(tmp_path, dataset=f"folder:{images}")
    out = prepare(settings)
    manifest = json.loads((out / "manifest.json").read_text())  # as a version without the check wrote it
    manifest["classes"] = ["cat"]
    for entry in manifest["splits"].values():
        entry["per_class"] = {"cat": entry["per_class"]["cat"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SplitError, match=rf"{re.escape(str(out))} \(folder:.*\): only class 'cat'"):
        split_dir(settings)


def test_class_too_small_for_a_held_out_split_is_named(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 20, "dog": 2})
    with pytest.raises(SplitError) as info:
        prepare(_settings(tmp_path, dataset=f"folder:{images}"))
    message = str(info.value)
    assert f"folder:{images} (holdout): class 'dog' has no images in the val split" in message
    assert "2 image(s) are too few" in message and "data.val_fraction=0.1" in message


def test_hta_class_without_a_validation_share_is_named(tmp_path: Path) -> None:
    data = make_dtd(tmp_path / "data" / "torchvision" / "dtd", num_classes=47, per_split=1) / "dtd" / "dtd"
    extra = [f"texture{c:02d}/texture{c:02d}_extra.jpg" for c in range(47) if c != 5]
    for entry in extra:  # a third official training image for every class but texture05
        shutil.copy(data / "images" / entry.replace("_extra", "_train1_0"), data / "images" / entry)
    with (data / "labels" / "train1.txt").open("a") as handle:
        handle.write("".join(f"{e}\n" for e in extra))
    with pytest.raises(SplitError) as info:  # 3 × 0.2 rounds to 1 image held out, 2 × 0.2 to none
        prepare(_settings(tmp_path, dataset="hta-dtd", val_fraction=0.2))
    assert str(info.value).startswith("hta-dtd (hta): class 'texture05' has no images in the val split: its 2 image")
    assert prepare(_settings(tmp_path, dataset="hta-dtd", val_fraction=0.25)).is_dir()  # 2 × 0.25 rounds to 1


def test_test_split_of_one_class_is_refused(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path / "data" / "vtab-1k", "patch_camelyon", num_classes=2)
    (task / "test.txt").write_text("images/test/0_0.jpg 0\n")
    with pytest.raises(SplitError, match=r"vtab-patch-camelyon \(vtab1k\): the test split holds images of 1 class"):
        prepare(_settings(tmp_path, dataset="patch_camelyon"))


# --- 6: a --from folder is copied, never hard-linked -------------------------------------------------------------


def _vtab_source(tmp_path: Path) -> tuple[str, Path, str]:
    make_vtab_task(tmp_path / "mine", "svhn", num_classes=10, train=1, val=1, test=1)
    return "svhn", tmp_path / "mine", "vtab-1k/svhn/images/train800/0_0.jpg"


def _cub_source(tmp_path: Path) -> tuple[str, Path, str]:
    folder = tmp_path / "mine" / "CUB_200_2011"
    write_vpt_json(folder, make_cub_images(folder, per_class=3))  # json splits beside the images: no hub needed
    return "fgvc-cub200", folder, "fgvc/CUB_200_2011/images/001.Bird_1/Bird_1_0000.jpg"


@pytest.mark.parametrize("make_source", [_vtab_source, _cub_source])
def test_writing_into_data_never_changes_the_users_files(tmp_path: Path, make_source) -> None:
    dataset, source, relative = make_source(tmp_path)
    prepare(_settings(tmp_path, dataset=dataset, source=source))
    copy = tmp_path / "data" / relative
    mine = next(p for p in source.rglob(copy.name) if p.parent.name == copy.parent.name)
    original = mine.read_bytes()
    assert copy.read_bytes() == original and os.stat(copy).st_ino != os.stat(mine).st_ino
    with open(copy, "wb") as handle:  # anything writing into data/ in place (a tool, a user, a bug)
        handle.write(b"overwritten")
    assert mine.read_bytes() == original and os.stat(mine).st_nlink == 1


# --- 7: pickles are read with a restricted unpickler -------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_cifar_batch_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path / "data" / "torchvision" / "cifar10", per_batch=10)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    content = pickle.loads(batch.read_bytes())
    marker = tmp_path / "payload-ran"
    batch.write_bytes(pickle.dumps({**content, "batch_label": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafePickleError) as info:
        prepare(_settings(tmp_path, dataset="cifar10", verify_checksums=False))
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and str(batch) in message and f"{os.system.__module__}.system" in message
    assert not (root / "images").exists() and not (tmp_path / "data" / "splits").exists()


def test_genuine_cifar_batches_load_and_checksum_advice_keeps_verification(tmp_path: Path) -> None:
    root = make_cifar10(tmp_path / "data" / "torchvision" / "cifar10", per_batch=10)
    with pytest.raises(ChecksumError) as info:
        prepare(_settings(tmp_path, dataset="cifar10"))  # fabricated batches are not the publisher's
    assert "data_batch_1" in str(info.value) and "verify_checksums=false" not in str(info.value)
    # numpy 1.x and Python 2 (the published batches) name the array module numpy.core.multiarray
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    out = prepare(_settings(tmp_path, dataset="cifar10", verify_checksums=False))
    assert read_manifest(out).classes[:2] == ("airplane", "automobile")
    entry = load_restricted(batch)
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (10, 3072) and entry["labels"][:3] == [0, 1, 2]


def test_restricted_unpickler_admits_arrays_and_plain_values_only(tmp_path: Path) -> None:
    path = tmp_path / "f.pkl"
    plain: dict[str, Any] = {
        "a": [1, 2.5, "x", b"", b"bytes", None, True],
        "t": (1,),
        "n": np.arange(6, dtype=np.uint8),
    }
    path.write_bytes(pickle.dumps(plain, protocol=2))
    loaded = load_restricted(path)
    assert loaded["a"] == plain["a"] and np.array_equal(loaded["n"], plain["n"])
    for evil in (Path("x"), np.float64(1.0), shutil.rmtree):  # any other global: a class, a scalar, a function
        path.write_bytes(pickle.dumps(evil, protocol=2))
        with pytest.raises(UnsafePickleError, match="the pickle asks for"):
            load_restricted(path)


def test_nothing_unpickles_without_the_restriction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only sa2vp/data/pickles.py unpickles; torch.load always with weights_only=True; numpy never with pickles.
    And preparing CIFAR calls no unrestricted `pickle.load` / `pickle.loads` (torchvision's CIFAR classes do)."""
    make_cifar10(tmp_path / "data" / "torchvision" / "cifar10", per_batch=10)

    def unrestricted(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle.load(s) called: it would run whatever a tampered file names")

    with monkeypatch.context() as patch:
        patch.setattr(pickle, "load", unrestricted)
        patch.setattr(pickle, "loads", unrestricted)
        prepare(_settings(tmp_path, dataset="cifar10", verify_checksums=False))
    risky = re.compile(
        r"pickle\.loads?\(|pickle\.Unpickler|allow_pickle\s*=\s*True|\bdill\b|\bcloudpickle\b|"
        r"torch\.load\((?![^)]*weights_only=True)"
    )
    found = [
        f"{path.relative_to(LIBRARY)}:{n}"
        for path in LIBRARY.rglob("*.py")
        if path.name != "pickles.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if risky.search(line)
    ]
    assert found == []


# --- 15: every image is decoded when prepared --------------------------------------------------------------------


def test_prepare_decodes_every_image_and_names_a_broken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    data = image_bytes(3, "PNG")
    (images / "dog" / "dog_zz_truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "prepare", f"folder:{images}"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output
    assert f"{images}/dog/dog_zz_truncated.png: unreadable or truncated" in line
    assert "data.skip_corrupt=true" in line and not (tmp_path / "data" / "splits").exists()
    skipping = runner.invoke(app, ["data", "prepare", f"folder:{images}", "--set", "data.skip_corrupt=true"])
    assert skipping.exit_code == 0 and "skipped 1 unreadable images" in skipping.stdout


def _prepare_in_a_process(root: str) -> str:
    from sa2vp.data import ensure_prepared

    settings = DataSettings(dataset="digits", render_size=16, root=root)
    return (ensure_prepared(settings) / "manifest.json").read_text()


def test_processes_started_together_prepare_a_dataset_once(tmp_path: Path) -> None:
    # A suite's cells and tuning workers start at once on one data.root: without the lock both would render the
    # images into the same staging folder and one would remove the other's.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        manifests = pool.map(_prepare_in_a_process, [str(tmp_path)] * 2)
    assert manifests[0] == manifests[1]
    assert not list(tmp_path.glob("**/*.partial"))
