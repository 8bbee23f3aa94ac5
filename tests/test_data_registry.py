"""The dataset registry: names, aliases, groups, errors that suggest, and the data settings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sa2vp.data import DATASETS, UnknownDatasetError, by_group, lookup
from sa2vp.data.splits import resolve_protocol, split_dir
from sa2vp.settings import DataSettings, SettingsError, load_settings

VTAB_FOLDERS = [
    "caltech101",
    "cifar",
    "dtd",
    "oxford_flowers102",
    "oxford_iiit_pet",
    "svhn",
    "sun397",
    "patch_camelyon",
    "eurosat",
    "resisc45",
    "diabetic_retinopathy",
    "clevr_count",
    "clevr_dist",
    "dmlab",
    "kitti",
    "dsprites_loc",
    "dsprites_ori",
    "smallnorb_azi",
    "smallnorb_ele",
]


def test_benchmarks_are_complete() -> None:
    groups = Counter(info.group for info in DATASETS.values())
    assert groups["vtab-natural"] + groups["vtab-specialized"] + groups["vtab-structured"] == 19
    assert (groups["vtab-natural"], groups["vtab-specialized"], groups["vtab-structured"]) == (7, 4, 8)
    assert groups["fgvc"] == 5 and groups["hta"] == 10 and "digits" in DATASETS
    assert sorted(info.folder for info in DATASETS.values() if info.source == "vtab1k") == sorted(VTAB_FOLDERS)
    assert {info.num_classes for info in by_group()["fgvc"]} == {200, 555, 102, 120, 196}
    for info in DATASETS.values():
        assert info.protocols and info.title and info.licence and info.num_classes


def test_fgvc_entries_say_where_their_files_come_from() -> None:
    cub = lookup("fgvc-cub200")
    assert cub.urls == ("https://data.caltech.edu/records/65de6-vqs81/files/CUB_200_2011.tgz",)
    assert cub.checksums == {"CUB_200_2011.tgz": "md5:97eceeb196236b17998738112f37df78"}
    layout = {"image_dir": "images", "archive_root": "CUB_200_2011", "json_names": "CUB_200_2011,cub,cub200"}
    assert cub.options == lookup("hta-cub200").options == layout
    dogs, cars, nabirds = lookup("stanford-dogs"), lookup("stanford-cars"), lookup("nabirds")
    assert dogs.urls == ("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",) and dogs.checksums == {}
    assert (cars.urls, cars.options["hub_images"]) == ((), "car") and "hta-stanford-cars" not in DATASETS
    assert nabirds.urls == () and list(nabirds.options) == ["image_dir", "archive_root", "json_names", "manual"]
    vpt = "splits: Jia et al., Visual Prompt Tuning, ECCV 2022 (Hugging Face dataset XiN0919/FGVC, json.zip)"
    damvp = "protocol: Huang et al., Diversity-Aware Meta Visual Prompting (DAM-VP), CVPR 2023"
    assert cub.citation.endswith(f"CNS-TR-2011-001; {vpt}")
    assert lookup("hta-cub200").citation == f"{cub.citation}; {damvp}"


def test_a_source_dataset_is_credited_alike_in_every_benchmark() -> None:
    cifar = "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"
    assert lookup("vtab-cifar100").citation.endswith(f"(2019); source dataset: {cifar}")
    assert lookup("hta-cifar10").citation.startswith(f"{cifar}; protocol: Huang et al.")
    for name in ("vtab-cifar100", "hta-cifar10", "hta-cifar100"):
        info = lookup(name)
        assert (info.licence, info.homepage) == (
            "research use (see publisher)",
            "https://www.cs.toronto.edu/~kriz/cifar.html",
        )
    assert lookup("hta-svhn").licence == lookup("vtab-svhn").licence == "non-commercial use (see publisher)"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("svhn", "vtab-svhn"),
        ("SVHN", "vtab-svhn"),
        ("vtab_svhn", "vtab-svhn"),
        ("cifar", "vtab-cifar100"),
        ("oxford_iiit_pet", "vtab-oxford-iiit-pet"),
        ("cub200", "fgvc-cub200"),
        ("cifar10", "hta-cifar10"),
        ("hta-svhn", "hta-svhn"),
        ("Stanford_Dogs", "fgvc-stanford-dogs"),
        ("digits", "digits"),
    ],
)
def test_lookup_names_and_aliases(name: str, expected: str) -> None:
    assert lookup(name).name == expected


def test_every_vtab_folder_name_is_an_alias() -> None:
    for folder in VTAB_FOLDERS:
        assert lookup(folder).source == "vtab1k"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(UnknownDatasetError) as info:
        lookup("svnh")
    message = str(info.value)
    assert "'svnh'" in message and "vtab-svhn" in message and "hta-svhn" in message
    assert "folder:<path>" in message


def test_folder_entries(tmp_path: Path) -> None:
    info = lookup(f"folder:{tmp_path}")
    assert info.source == "folder" and info.protocol == "holdout" and info.folder == str(tmp_path)
    settings = DataSettings(dataset=f"folder:{tmp_path}", root=tmp_path / "data")
    assert split_dir(settings) == tmp_path / "data" / "splits" / info.slug / "holdout-seed42"
    assert info.slug.startswith(f"folder-{tmp_path.name}-")  # and a hash of the absolute path
    with pytest.raises(UnknownDatasetError):
        lookup("folder:")


def test_protocols_per_dataset() -> None:
    assert resolve_protocol(lookup("vtab-dtd"), DataSettings()) == "vtab1k"
    assert resolve_protocol(lookup("hta-cub200"), DataSettings()) == "hta"
    assert resolve_protocol(lookup("fgvc-cub200"), DataSettings(protocol="hta")) == "hta"
    with pytest.raises(Exception, match=r"data.protocol='fgvc' is not available for vtab-dtd; allowed: vtab1k"):
        resolve_protocol(lookup("vtab-dtd"), DataSettings(protocol="fgvc"))


def test_data_settings_defaults_and_validation() -> None:
    settings = load_settings(None, {"data.dataset": "svhn"})
    assert settings.data.root == Path("data") and settings.data.seed == 42 and settings.data.protocol is None
    with pytest.raises(SettingsError, match="test_fraction"):
        load_settings(None, {"data.val_fraction": 0.5, "data.test_fraction": 0.5})
    with pytest.raises(SettingsError, match="data.protocol"):
        load_settings(None, {"data.protocol": "random"})
