"""Every dataset the project knows: one `DatasetInfo` per entry (method file §4 and §6).

Names are `<benchmark>-<task>`: `vtab-svhn`, `fgvc-cub200`, `hta-cifar10`, plus the offline demos — `digits`
(scikit-learn's handwritten digits) and `shapes-count` / `shapes-loc` (generated counting and location tasks in
the spirit of VTAB's structured group) — and `folder:<path>` (any image folder with one sub-folder per class).

Lookup ignores case and treats `_` like `-`. A bare benchmark task name is an alias: it means the VTAB-1k task
when there is one (`svhn` → `vtab-svhn`, `dtd` → `vtab-dtd`, `cifar100` → `vtab-cifar100`), because VTAB-1k is
the paper's main benchmark and one archive serves all its tasks; otherwise the FGVC set (`cub200` →
`fgvc-cub200`), otherwise the HTA set (`cifar10` → `hta-cifar10`); the demos lend none. The archive's own
folder names are aliases of the VTAB-1k tasks too (`cifar`, `oxford_iiit_pet`, …). `sa2vp data list` shows
every name and alias.

The same images can appear under two benchmarks (fgvc-cub200 and hta-cub200 share one folder); the entries
differ in their default protocol and transforms.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from sa2vp.data.errors import UnknownDatasetError

Group = Literal["vtab-natural", "vtab-specialized", "vtab-structured", "fgvc", "hta", "demo", "custom"]
SourceKind = Literal["vtab1k", "torchvision", "fgvc", "digits", "shapes", "folder"]
Protocol = Literal["vtab1k", "fgvc", "hta", "holdout"]
TransformStyle = Literal["vtab", "fgvc"]

FOLDER_PREFIX = "folder:"


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: what it is, where it comes from, and how it is split and transformed by default."""

    name: str
    group: Group
    num_classes: int | None  # None: found when the data is read (image folders)
    source: SourceKind  # which module in sa2vp.data.sources fetches and reads it
    folder: str  # folder name in the publisher's archive (VTAB-1k task, VPT's FGVC folder, …)
    protocols: tuple[Protocol, ...]  # allowed protocols; the first is the default
    transform: TransformStyle
    title: str
    citation: str
    licence: str
    homepage: str
    urls: tuple[str, ...] = ()  # files fetched by our own downloader (publisher URLs)
    checksums: Mapping[str, str] = field(default_factory=dict)  # file name → "md5:…" / "sha256:…"
    options: Mapping[str, str] = field(default_factory=dict)  # source-specific details
    aliases: tuple[str, ...] = ()

    @property
    def protocol(self) -> Protocol:
        """The default protocol."""
        return self.protocols[0]

    @property
    def slug(self) -> str:
        """The dataset's folder name (under `<root>/splits/`): the registry name, or for an image folder
        `folder-<base name>-<first 8 hex digits of the sha256 of its absolute path>`, so that two folders with
        one base name (`/a/small`, `/b/small`) never share a split folder."""
        if self.source != "folder":
            return self.name
        path = Path(self.folder).resolve()
        return f"folder-{path.name}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}"

    @property
    def origin(self) -> str | None:
        """What an image folder entry was made from (its absolute path); None for registry datasets, whose
        name says it."""
        return Path(self.folder).resolve().as_posix() if self.source == "folder" else None


_VTAB_ARCHIVE = "Hugging Face dataset XiN0919/VTAB-1k, file vtab-1k.zip (NOAH's pre-split VTAB-1k)"
_VTAB_CITATION = (
    "Zhai et al., A Large-scale Study of Representation Learning with the Visual Task Adaptation Benchmark, "
    "arXiv:1910.04867 (2019); source dataset: {source}"
)
_VPT = "splits: Jia et al., Visual Prompt Tuning, ECCV 2022 (Hugging Face dataset XiN0919/FGVC, json.zip)"
_DAMVP = "protocol: Huang et al., Diversity-Aware Meta Visual Prompting (DAM-VP), CVPR 2023"

# (name, archive folder, group, classes, source dataset citation, licence, homepage)
_VTAB_TASKS: tuple[tuple[str, str, Group, int, str, str, str], ...] = (
    ("caltech101", "caltech101", "vtab-natural", 102, "Fei-Fei et al., CVPR-W 2004", "research use (see publisher)",
     "https://data.caltech.edu/records/mzrjq-6wc02"),
    ("cifar100", "cifar", "vtab-natural", 100, "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, "
     "2009", "research use (see publisher)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("dtd", "dtd", "vtab-natural", 47, "Cimpoi et al., Describing Textures in the Wild, CVPR 2014",
     "research use (see publisher)", "https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    ("oxford-flowers102", "oxford_flowers102", "vtab-natural", 102, "Nilsback & Zisserman, ICVGIP 2008",
     "research use (see publisher)", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    ("oxford-iiit-pet", "oxford_iiit_pet", "vtab-natural", 37, "Parkhi et al., Cats and Dogs, CVPR 2012",
     "CC BY-SA 4.0", "https://www.robots.ox.ac.uk/~vgg/data/pets/"),
    ("svhn", "svhn", "vtab-natural", 10, "Netzer et al., Reading Digits in Natural Images, NIPS-W 2011",
     "non-commercial use (see publisher)", "http://ufldl.stanford.edu/housenumbers/"),
    ("sun397", "sun397", "vtab-natural", 397, "Xiao et al., SUN Database, CVPR 2010",
     "research use (see publisher)", "https://vision.princeton.edu/projects/2010/SUN/"),
    ("patch-camelyon", "patch_camelyon", "vtab-specialized", 2, "Veeling et al., Rotation Equivariant CNNs for "
     "Digital Pathology, MICCAI 2018", "CC0 1.0", "https://github.com/basveeling/pcam"),
    ("eurosat", "eurosat", "vtab-specialized", 10, "Helber et al., EuroSAT, IEEE JSTARS 2019", "MIT",
     "https://github.com/phelber/EuroSAT"),
    ("resisc45", "resisc45", "vtab-specialized", 45, "Cheng et al., Remote Sensing Image Scene Classification, "
     "Proc. IEEE 2017", "research use (see publisher)", "https://www.tensorflow.org/datasets/catalog/resisc45"),
    ("diabetic-retinopathy", "diabetic_retinopathy", "vtab-specialized", 5, "Kaggle Diabetic Retinopathy "
     "Detection, 2015", "Kaggle competition terms", "https://www.kaggle.com/c/diabetic-retinopathy-detection"),
    ("clevr-count", "clevr_count", "vtab-structured", 8, "Johnson et al., CLEVR, CVPR 2017", "CC BY 4.0",
     "https://cs.stanford.edu/people/jcjohns/clevr/"),
    ("clevr-dist", "clevr_dist", "vtab-structured", 6, "Johnson et al., CLEVR, CVPR 2017", "CC BY 4.0",
     "https://cs.stanford.edu/people/jcjohns/clevr/"),
    ("dmlab", "dmlab", "vtab-structured", 6, "Beattie et al., DeepMind Lab, arXiv:1612.03801 (2016)",
     "research use (see publisher)", "https://github.com/google-deepmind/lab"),
    ("kitti", "kitti", "vtab-structured", 4, "Geiger et al., Vision meets Robotics: the KITTI Dataset, IJRR 2013",
     "CC BY-NC-SA 3.0", "https://www.cvlibs.net/datasets/kitti/"),
    ("dsprites-loc", "dsprites_loc", "vtab-structured", 16, "Matthey et al., dSprites, 2017", "Apache 2.0",
     "https://github.com/google-deepmind/dsprites-dataset"),
    ("dsprites-ori", "dsprites_ori", "vtab-structured", 16, "Matthey et al., dSprites, 2017", "Apache 2.0",
     "https://github.com/google-deepmind/dsprites-dataset"),
    ("smallnorb-azi", "smallnorb_azi", "vtab-structured", 18, "LeCun et al., Learning Methods for Generic Object "
     "Recognition, CVPR 2004", "research use (see publisher)", "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"),
    ("smallnorb-ele", "smallnorb_ele", "vtab-structured", 9, "LeCun et al., Learning Methods for Generic Object "
     "Recognition, CVPR 2004", "research use (see publisher)", "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"),
)


def _vtab_entries() -> Iterator[DatasetInfo]:
    for task, folder, group, classes, source, licence, homepage in _VTAB_TASKS:
        yield DatasetInfo(
            name=f"vtab-{task}", group=group, num_classes=classes, source="vtab1k", folder=folder,
            protocols=("vtab1k",), transform="vtab", title=f"VTAB-1k {folder}",
            citation=_VTAB_CITATION.format(source=source), licence=licence, homepage=homepage,
            options={"archive": _VTAB_ARCHIVE}, aliases=(folder,) if folder != task else (),
        )


# FGVC images come from their publishers; VPT's json splits from the hub. `image_dir` is where VPT's json
# paths are rooted inside the folder; `archive_root` the folder inside the image archive that becomes ours.
_CUB = dict(
    folder="CUB_200_2011", num_classes=200, title="Caltech-UCSD Birds-200-2011",
    citation=f"Wah et al., The Caltech-UCSD Birds-200-2011 Dataset, CNS-TR-2011-001; {_VPT}",
    licence="research use (images from Flickr; see publisher)",
    homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
    urls=("https://data.caltech.edu/records/65de6-vqs81/files/CUB_200_2011.tgz",),
    checksums={"CUB_200_2011.tgz": "md5:97eceeb196236b17998738112f37df78"},  # published on data.caltech.edu
    options={"image_dir": "images", "archive_root": "CUB_200_2011", "json_names": "CUB_200_2011,cub,cub200"},
)
_NABIRDS = dict(
    folder="nabirds", num_classes=555, title="NABirds",
    citation=f"Van Horn et al., Building a Bird Recognition App and Large Scale Dataset with Citizen "
    f"Scientists, CVPR 2015; {_VPT}",
    licence="non-commercial research (terms accepted on download)",
    homepage="https://dl.allaboutbirds.org/nabirds",
    options={"image_dir": "images", "archive_root": "nabirds", "json_names": "nabirds",
             "manual": "nabirds.tar.gz from https://dl.allaboutbirds.org/nabirds (accept the terms of use first)"},
)
_FLOWERS = dict(
    folder="OxfordFlower", num_classes=102, title="Oxford Flowers-102",
    citation=f"Nilsback & Zisserman, Automated Flower Classification over a Large Number of Classes, ICVGIP "
    f"2008; {_VPT}",
    licence="research use (see publisher)", homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    urls=("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",),
    # The publisher gives no checksum; this is the one torchvision's Flowers102 pins for the same file.
    checksums={"102flowers.tgz": "md5:52808999861908f626f3c1f4e79d11fa"},
    options={"image_dir": "", "archive_root": "", "json_names": "OxfordFlower,flowers,flowers102,oxford_flowers"},
)
_DOGS = dict(
    folder="Stanford-dogs", num_classes=120, title="Stanford Dogs",
    citation=f"Khosla et al., Novel Dataset for Fine-Grained Image Categorization, CVPR-W 2011; {_VPT}",
    licence="research use (ImageNet images; see publisher)",
    homepage="http://vision.stanford.edu/aditya86/ImageNetDogs/",
    urls=("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar",),
    options={"image_dir": "Images", "archive_root": "", "json_names": "Stanford-dogs,dogs,stanford_dogs"},
)
_CARS = dict(
    folder="Stanford-cars", num_classes=196, title="Stanford Cars",
    citation=f"Krause et al., 3D Object Representations for Fine-Grained Categorization, 3dRR 2013; {_VPT}",
    licence="research use (see publisher)",
    homepage="https://huggingface.co/datasets/XiN0919/FGVC",
    # The original site is gone; the images are in the same hub repo as the json splits.
    options={"image_dir": "", "archive_root": "", "json_names": "Stanford-cars,cars,stanford_cars",
             "hub_images": "car"},
)
_FGVC_SETS = (("cub200", _CUB), ("nabirds", _NABIRDS), ("oxford-flowers", _FLOWERS), ("stanford-dogs", _DOGS),
              ("stanford-cars", _CARS))


def _fgvc_entries(prefix: Literal["fgvc", "hta"]) -> Iterator[DatasetInfo]:
    for short, spec in _FGVC_SETS:
        if prefix == "hta" and short == "stanford-cars":
            continue  # not part of HTA
        protocols: tuple[Protocol, ...] = ("fgvc", "hta") if prefix == "fgvc" else ("hta", "fgvc")
        citation = spec["citation"] if prefix == "fgvc" else f"{spec['citation']}; {_DAMVP}"
        yield DatasetInfo(name=f"{prefix}-{short}", group=prefix, source="fgvc", protocols=protocols,
                          transform="fgvc", **{**spec, "citation": citation})


# HTA sets read by torchvision's own classes (`options["class"]`); torchvision checks its archives' md5s.
_TORCHVISION_SETS: tuple[tuple[str, str, str, int, str, str, str, str], ...] = (
    ("cifar10", "cifar10", "CIFAR10", 10, "CIFAR-10", "Krizhevsky, Learning Multiple Layers of Features from "
     "Tiny Images, 2009", "research use (see publisher)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("cifar100", "cifar100", "CIFAR100", 100, "CIFAR-100", "Krizhevsky, Learning Multiple Layers of Features "
     "from Tiny Images, 2009", "research use (see publisher)", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("dtd", "dtd", "DTD", 47, "Describable Textures Dataset", "Cimpoi et al., Describing Textures in the Wild, "
     "CVPR 2014", "research use (see publisher)", "https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    ("food101", "food101", "Food101", 101, "Food-101", "Bossard et al., Food-101 – Mining Discriminative "
     "Components with Random Forests, ECCV 2014", "research use (see publisher)",
     "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"),
    ("gtsrb", "gtsrb", "GTSRB", 43, "German Traffic Sign Recognition Benchmark", "Stallkamp et al., Man vs. "
     "Computer, Neural Networks 2012", "CC0 1.0", "https://benchmark.ini.rub.de/"),
    ("svhn", "svhn", "SVHN", 10, "Street View House Numbers", "Netzer et al., Reading Digits in Natural Images, "
     "NIPS-W 2011", "non-commercial use (see publisher)", "http://ufldl.stanford.edu/housenumbers/"),
)


def _torchvision_entries() -> Iterator[DatasetInfo]:
    for short, folder, cls, classes, title, citation, licence, homepage in _TORCHVISION_SETS:
        yield DatasetInfo(
            name=f"hta-{short}", group="hta", num_classes=classes, source="torchvision", folder=folder,
            protocols=("hta",), transform="fgvc", title=title, citation=f"{citation}; {_DAMVP}",
            licence=licence, homepage=homepage, options={"class": cls},
        )


_DIGITS = DatasetInfo(
    name="digits", group="demo", num_classes=10, source="digits", folder="digits", protocols=("holdout",),
    transform="vtab", title="Handwritten digits (8×8, bundled with scikit-learn; offline demo)",
    citation="Alpaydin & Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository (1998)",
    licence="CC BY 4.0", homepage="https://archive.ics.uci.edu/dataset/80",
)

# Generated by sa2vp.data.sources.shapes from data.seed at data.render_size (no download; see its docstring).
_SHAPES_COMMON = dict(
    group="demo", source="shapes", protocols=("holdout",), transform="vtab",
    licence="generated here (no third-party content)", homepage="",
)
_SHAPES_COUNT = DatasetInfo(
    name="shapes-count", num_classes=6, folder="shapes-count",
    title="Counting 1–6 small shapes on a noisy background (generated, 6 × 350 images from data.seed; offline "
    "demo of a structured task)",
    citation="Generated by sa2vp.data.sources.shapes; in the spirit of VTAB clevr-count (Johnson et al., CLEVR, "
    "CVPR 2017)",
    options={"task": "count", "per_class": "350"}, **_SHAPES_COMMON,
)
_SHAPES_LOC = DatasetInfo(
    name="shapes-loc", num_classes=16, folder="shapes-loc",
    title="Location of a hollow square among 2–4 distractors, as its cell of a 4×4 grid (generated, "
    "16 × 125 images from data.seed; offline demo of a structured task)",
    citation="Generated by sa2vp.data.sources.shapes; in the spirit of VTAB dsprites-loc (Matthey et al., "
    "dSprites, 2017)",
    options={"task": "loc", "per_class": "125"}, **_SHAPES_COMMON,
)
# Prefixes whose bare task names become aliases (`svhn` → `vtab-svhn`); the demos' `count` would only confuse.
_BENCHMARKS = ("vtab", "fgvc", "hta")


def _build() -> tuple[Mapping[str, DatasetInfo], Mapping[str, str]]:
    # Order matters for aliases: the first entry to claim a bare name keeps it (VTAB, then FGVC, then HTA).
    entries = [*_vtab_entries(), *_fgvc_entries("fgvc"), *_fgvc_entries("hta"), *_torchvision_entries(), _DIGITS,
               _SHAPES_COUNT, _SHAPES_LOC]
    by_name = {info.name: info for info in entries}
    aliases: dict[str, str] = {}
    for info in entries:
        prefix, _, short = info.name.partition("-")
        short = short if prefix in _BENCHMARKS else ""
        for alias in (short, *info.aliases):
            key = normalise(alias)
            if alias and key not in by_name:
                aliases.setdefault(key, info.name)
    with_aliases = {
        name: replace(info, aliases=tuple(sorted(a for a, target in aliases.items() if target == name)))
        for name, info in by_name.items()
    }
    return MappingProxyType(with_aliases), MappingProxyType(aliases)


def normalise(name: str) -> str:
    """The lookup key of a name: lower case, `_` and spaces read as `-`."""
    return name.strip().lower().replace("_", "-").replace(" ", "-")


DATASETS, ALIASES = _build()


def lookup(name: str) -> DatasetInfo:
    """The registry entry for a name, alias or `folder:<path>`; UnknownDatasetError suggests close names."""
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):].strip()
        if not path:
            raise UnknownDatasetError("`folder:` needs a path, e.g. folder:data/my_images")
        return folder_entry(Path(path))
    key = normalise(name)
    key = ALIASES.get(key, key)
    if key in DATASETS:
        return DATASETS[key]
    close = difflib.get_close_matches(key, [*DATASETS, *ALIASES], n=4, cutoff=0.5)
    # An alias suggestion is shown with what it means, so the user learns the canonical name.
    hints = [f"{c} (= {ALIASES[c]})" if c in ALIASES else c for c in close]
    suggestion = f"did you mean {', '.join(hints)}? " if hints else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}; {suggestion}`sa2vp data list` shows all names, and an image folder "
        f"with one sub-folder per class is `folder:<path>`"
    )


def folder_entry(path: Path) -> DatasetInfo:
    """An entry for an image folder with one sub-folder per class (split by a seeded stratified hold-out)."""
    return DatasetInfo(
        name=f"{FOLDER_PREFIX}{path}", group="custom", num_classes=None, source="folder", folder=str(path),
        protocols=("holdout",), transform="vtab", title=f"image folder {path}", citation="", licence="(yours)",
        homepage="",
    )


def by_group() -> dict[str, list[DatasetInfo]]:
    """Registry entries grouped by benchmark, in registry order."""
    groups: dict[str, list[DatasetInfo]] = {}
    for info in DATASETS.values():
        groups.setdefault(info.group, []).append(info)
    return groups
