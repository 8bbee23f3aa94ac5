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
from typing import Literal, NamedTuple

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


_VTAB_OPTIONS = {"archive": "Hugging Face dataset XiN0919/VTAB-1k, file vtab-1k.zip (NOAH's pre-split VTAB-1k)"}
_VPT = "splits: Jia et al., Visual Prompt Tuning, ECCV 2022 (Hugging Face dataset XiN0919/FGVC, json.zip)"
_DAMVP = "protocol: Huang et al., Diversity-Aware Meta Visual Prompting (DAM-VP), CVPR 2023"


class _Benchmark(NamedTuple):
    """What the entries of one benchmark share (built by `_entry`)."""

    prefix: str  # of the entries' names
    source: SourceKind
    protocols: tuple[Protocol, ...]
    transform: TransformStyle
    citation: str  # the entries' citation; `{source}` stands for the source dataset's


_VTAB = _Benchmark(
    "vtab",
    "vtab1k",
    ("vtab1k",),
    "vtab",
    "Zhai et al., A Large-scale Study of Representation Learning with the Visual Task Adaptation Benchmark, "
    "arXiv:1910.04867 (2019); source dataset: {source}",
)
_FGVC = _Benchmark("fgvc", "fgvc", ("fgvc", "hta"), "fgvc", f"{{source}}; {_VPT}")
_HTA_FGVC = _Benchmark("hta", "fgvc", ("hta", "fgvc"), "fgvc", f"{{source}}; {_VPT}; {_DAMVP}")  # FGVC sets in HTA
_HTA = _Benchmark("hta", "torchvision", ("hta",), "fgvc", f"{{source}}; {_DAMVP}")  # read by torchvision


class _Publisher(NamedTuple):
    """A source dataset: whom to cite, its licence, where to read about it."""

    citation: str
    licence: str
    homepage: str


_RESEARCH = "research use (see publisher)"
# The datasets the benchmarks' images come from, by key: one entry serves every benchmark built on it (CIFAR,
# DTD and SVHN are in VTAB-1k and in HTA). FGVC sets are keyed by their short name; their citations are the
# full titles, so Oxford Flowers has a short (VTAB) and a long (FGVC) entry.
_PUBLISHERS: Mapping[str, _Publisher] = {
    "caltech101": _Publisher("Fei-Fei et al., CVPR-W 2004", _RESEARCH, "https://data.caltech.edu/records/mzrjq-6wc02"),
    "cifar": _Publisher(
        "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
        _RESEARCH,
        "https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "dtd": _Publisher(
        "Cimpoi et al., Describing Textures in the Wild, CVPR 2014",
        _RESEARCH,
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/",
    ),
    "oxford-flowers102": _Publisher(
        "Nilsback & Zisserman, ICVGIP 2008", _RESEARCH, "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    ),
    "oxford-iiit-pet": _Publisher(
        "Parkhi et al., Cats and Dogs, CVPR 2012", "CC BY-SA 4.0", "https://www.robots.ox.ac.uk/~vgg/data/pets/"
    ),
    "svhn": _Publisher(
        "Netzer et al., Reading Digits in Natural Images, NIPS-W 2011",
        "non-commercial use (see publisher)",
        "http://ufldl.stanford.edu/housenumbers/",
    ),
    "sun397": _Publisher(
        "Xiao et al., SUN Database, CVPR 2010", _RESEARCH, "https://vision.princeton.edu/projects/2010/SUN/"
    ),
    "patch-camelyon": _Publisher(
        "Veeling et al., Rotation Equivariant CNNs for Digital Pathology, MICCAI 2018",
        "CC0 1.0",
        "https://github.com/basveeling/pcam",
    ),
    "eurosat": _Publisher("Helber et al., EuroSAT, IEEE JSTARS 2019", "MIT", "https://github.com/phelber/EuroSAT"),
    "resisc45": _Publisher(
        "Cheng et al., Remote Sensing Image Scene Classification, Proc. IEEE 2017",
        _RESEARCH,
        "https://www.tensorflow.org/datasets/catalog/resisc45",
    ),
    "diabetic-retinopathy": _Publisher(
        "Kaggle Diabetic Retinopathy Detection, 2015",
        "Kaggle competition terms",
        "https://www.kaggle.com/c/diabetic-retinopathy-detection",
    ),
    "clevr": _Publisher(
        "Johnson et al., CLEVR, CVPR 2017", "CC BY 4.0", "https://cs.stanford.edu/people/jcjohns/clevr/"
    ),
    "dmlab": _Publisher(
        "Beattie et al., DeepMind Lab, arXiv:1612.03801 (2016)", _RESEARCH, "https://github.com/google-deepmind/lab"
    ),
    "kitti": _Publisher(
        "Geiger et al., Vision meets Robotics: the KITTI Dataset, IJRR 2013",
        "CC BY-NC-SA 3.0",
        "https://www.cvlibs.net/datasets/kitti/",
    ),
    "dsprites": _Publisher(
        "Matthey et al., dSprites, 2017", "Apache 2.0", "https://github.com/google-deepmind/dsprites-dataset"
    ),
    "smallnorb": _Publisher(
        "LeCun et al., Learning Methods for Generic Object Recognition, CVPR 2004",
        _RESEARCH,
        "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",
    ),
    "food101": _Publisher(
        "Bossard et al., Food-101 – Mining Discriminative Components with Random Forests, ECCV 2014",
        _RESEARCH,
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
    ),
    "gtsrb": _Publisher(
        "Stallkamp et al., Man vs. Computer, Neural Networks 2012", "CC0 1.0", "https://benchmark.ini.rub.de/"
    ),
    "cub200": _Publisher(
        "Wah et al., The Caltech-UCSD Birds-200-2011 Dataset, CNS-TR-2011-001",
        "research use (images from Flickr; see publisher)",
        "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    ),
    "nabirds": _Publisher(
        "Van Horn et al., Building a Bird Recognition App and Large Scale Dataset with Citizen Scientists, CVPR 2015",
        "non-commercial research (terms accepted on download)",
        "https://dl.allaboutbirds.org/nabirds",
    ),
    "oxford-flowers": _Publisher(
        "Nilsback & Zisserman, Automated Flower Classification over a Large Number of Classes, ICVGIP 2008",
        _RESEARCH,
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    ),
    "stanford-dogs": _Publisher(
        "Khosla et al., Novel Dataset for Fine-Grained Image Categorization, CVPR-W 2011",
        "research use (ImageNet images; see publisher)",
        "http://vision.stanford.edu/aditya86/ImageNetDogs/",
    ),
    "stanford-cars": _Publisher(
        "Krause et al., 3D Object Representations for Fine-Grained Categorization, 3dRR 2013",
        _RESEARCH,
        "https://huggingface.co/datasets/XiN0919/FGVC",  # the original site is gone
    ),
}

# (task, archive folder, group, classes, publisher)
_VTAB_TASKS: tuple[tuple[str, str, Group, int, str], ...] = (
    ("caltech101", "caltech101", "vtab-natural", 102, "caltech101"),
    ("cifar100", "cifar", "vtab-natural", 100, "cifar"),
    ("dtd", "dtd", "vtab-natural", 47, "dtd"),
    ("oxford-flowers102", "oxford_flowers102", "vtab-natural", 102, "oxford-flowers102"),
    ("oxford-iiit-pet", "oxford_iiit_pet", "vtab-natural", 37, "oxford-iiit-pet"),
    ("svhn", "svhn", "vtab-natural", 10, "svhn"),
    ("sun397", "sun397", "vtab-natural", 397, "sun397"),
    ("patch-camelyon", "patch_camelyon", "vtab-specialized", 2, "patch-camelyon"),
    ("eurosat", "eurosat", "vtab-specialized", 10, "eurosat"),
    ("resisc45", "resisc45", "vtab-specialized", 45, "resisc45"),
    ("diabetic-retinopathy", "diabetic_retinopathy", "vtab-specialized", 5, "diabetic-retinopathy"),
    ("clevr-count", "clevr_count", "vtab-structured", 8, "clevr"),
    ("clevr-dist", "clevr_dist", "vtab-structured", 6, "clevr"),
    ("dmlab", "dmlab", "vtab-structured", 6, "dmlab"),
    ("kitti", "kitti", "vtab-structured", 4, "kitti"),
    ("dsprites-loc", "dsprites_loc", "vtab-structured", 16, "dsprites"),
    ("dsprites-ori", "dsprites_ori", "vtab-structured", 16, "dsprites"),
    ("smallnorb-azi", "smallnorb_azi", "vtab-structured", 18, "smallnorb"),
    ("smallnorb-ele", "smallnorb_ele", "vtab-structured", 9, "smallnorb"),
)


def _vtab_entries() -> Iterator[DatasetInfo]:
    for task, folder, group, classes, publisher in _VTAB_TASKS:
        aliases = (folder,) if folder != task else ()
        yield _entry(
            _VTAB, task, group, classes, folder, f"VTAB-1k {folder}", publisher, _VTAB_OPTIONS, aliases=aliases
        )


# FGVC images come from their publishers; VPT's json splits from the hub. (short name, VPT's folder, classes,
# title, image_dir, archive_root, json_names): `image_dir` is where VPT's json paths are rooted inside the
# folder; `archive_root` the folder inside the image archive that becomes ours; `json_names` the names of this
# set's folder in json.zip.
_FGVC_SETS: tuple[tuple[str, str, int, str, str, str, str], ...] = (
    ("cub200", "CUB_200_2011", 200, "Caltech-UCSD Birds-200-2011", "images", "CUB_200_2011", "CUB_200_2011,cub,cub200"),
    ("nabirds", "nabirds", 555, "NABirds", "images", "nabirds", "nabirds"),
    (
        "oxford-flowers",
        "OxfordFlower",
        102,
        "Oxford Flowers-102",
        "",
        "",
        "OxfordFlower,flowers,flowers102,oxford_flowers",
    ),
    ("stanford-dogs", "Stanford-dogs", 120, "Stanford Dogs", "Images", "", "Stanford-dogs,dogs,stanford_dogs"),
    ("stanford-cars", "Stanford-cars", 196, "Stanford Cars", "", "", "Stanford-cars,cars,stanford_cars"),
)


@dataclass(frozen=True)
class _Images:
    """Where an FGVC set's images come from when data.source names no local copy (read by sources/fgvc.py)."""

    url: str | None = None  # the publisher's archive
    checksum: str | None = None  # of that archive ("md5:…"), where one is known
    manual: str | None = None  # what to download by hand, where the terms of use must be accepted first
    hub_images: str | None = None  # a word in the name of the archive with the images in VPT's hub repo

    def urls(self) -> tuple[str, ...]:
        return (self.url,) if self.url else ()

    def checksums(self) -> dict[str, str]:
        # By file name, as sources/fgvc.py looks them up.
        return {self.url.rsplit("/", 1)[-1]: self.checksum} if self.url and self.checksum else {}

    def options(self, layout: Mapping[str, str]) -> dict[str, str]:
        """The entry's options: the set's layout, then how to fetch its images where not from `url`."""
        fetch = {"manual": self.manual, "hub_images": self.hub_images}
        return {**layout, **{key: value for key, value in fetch.items() if value is not None}}


_FGVC_IMAGES: Mapping[str, _Images] = {
    # The checksum is the one published on data.caltech.edu.
    "cub200": _Images(
        "https://data.caltech.edu/records/65de6-vqs81/files/CUB_200_2011.tgz", "md5:97eceeb196236b17998738112f37df78"
    ),
    "nabirds": _Images(
        manual="nabirds.tar.gz from https://dl.allaboutbirds.org/nabirds (accept the terms of use first)"
    ),
    # The publisher gives no checksum; this is the one torchvision's Flowers102 pins for the same file.
    "oxford-flowers": _Images(
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz", "md5:52808999861908f626f3c1f4e79d11fa"
    ),
    "stanford-dogs": _Images("http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar"),
    # The original site is gone; the images are in the same hub repo as the json splits.
    "stanford-cars": _Images(hub_images="car"),
}


def _fgvc_entries(benchmark: _Benchmark) -> Iterator[DatasetInfo]:
    group: Group = "fgvc" if benchmark is _FGVC else "hta"
    for short, folder, classes, title, image_dir, archive_root, json_names in _FGVC_SETS:
        if group == "hta" and short == "stanford-cars":
            continue  # not part of HTA
        images = _FGVC_IMAGES[short]
        options = images.options({"image_dir": image_dir, "archive_root": archive_root, "json_names": json_names})
        yield _entry(
            benchmark,
            short,
            group,
            classes,
            folder,
            title,
            short,  # FGVC sets are their own publishers' keys
            options,
            urls=images.urls(),
            checksums=images.checksums(),
        )


# HTA sets read by torchvision's own classes (`options["class"]`); torchvision checks its archives' md5s.
# (short name = folder, torchvision class, classes, title, publisher)
_TORCHVISION_SETS: tuple[tuple[str, str, int, str, str], ...] = (
    ("cifar10", "CIFAR10", 10, "CIFAR-10", "cifar"),
    ("cifar100", "CIFAR100", 100, "CIFAR-100", "cifar"),
    ("dtd", "DTD", 47, "Describable Textures Dataset", "dtd"),
    ("food101", "Food101", 101, "Food-101", "food101"),
    ("gtsrb", "GTSRB", 43, "German Traffic Sign Recognition Benchmark", "gtsrb"),
    ("svhn", "SVHN", 10, "Street View House Numbers", "svhn"),
)


def _torchvision_entries() -> Iterator[DatasetInfo]:
    for short, cls, classes, title, publisher in _TORCHVISION_SETS:
        yield _entry(_HTA, short, "hta", classes, short, title, publisher, {"class": cls})


def _entry(
    benchmark: _Benchmark,
    short: str,
    group: Group,
    classes: int,
    folder: str,
    title: str,
    publisher: str,
    options: Mapping[str, str],
    *,
    urls: tuple[str, ...] = (),
    checksums: Mapping[str, str] | None = None,
    aliases: tuple[str, ...] = (),
) -> DatasetInfo:
    """The entry `<prefix>-<short>` of `benchmark`, credited to the source dataset `publisher` (a key of
    _PUBLISHERS)."""
    source = _PUBLISHERS[publisher]
    return DatasetInfo(
        name=f"{benchmark.prefix}-{short}",
        group=group,
        num_classes=classes,
        source=benchmark.source,
        folder=folder,
        protocols=benchmark.protocols,
        transform=benchmark.transform,
        title=title,
        citation=benchmark.citation.format(source=source.citation),
        licence=source.licence,
        homepage=source.homepage,
        urls=urls,
        checksums=dict(checksums or {}),
        options=dict(options),
        aliases=aliases,
    )


_DIGITS = DatasetInfo(
    name="digits",
    group="demo",
    num_classes=10,
    source="digits",
    folder="digits",
    protocols=("holdout",),
    transform="vtab",
    title="Handwritten digits (8×8, bundled with scikit-learn; offline demo)",
    citation="Alpaydin & Kaynak, Optical Recognition of Handwritten Digits, UCI ML Repository (1998)",
    licence="CC BY 4.0",
    homepage="https://archive.ics.uci.edu/dataset/80",
)


def _shapes(task: str, classes: int, per_class: int, title: str, spirit: str) -> DatasetInfo:
    """A task generated by sa2vp.data.sources.shapes from data.seed at data.render_size (no download; see its
    docstring): `classes` × `per_class` images, in the spirit of the VTAB task `spirit` names."""
    return DatasetInfo(
        name=f"shapes-{task}",
        group="demo",
        num_classes=classes,
        source="shapes",
        folder=f"shapes-{task}",
        protocols=("holdout",),
        transform="vtab",
        title=f"{title} (generated, {classes} × {per_class} images from data.seed; offline demo of a structured task)",
        citation=f"Generated by sa2vp.data.sources.shapes; in the spirit of {spirit}",
        licence="generated here (no third-party content)",
        homepage="",
        options={"task": task, "per_class": str(per_class)},
    )


_SHAPES_COUNT = _shapes(
    "count",
    6,
    350,
    "Counting 1–6 small shapes on a noisy background",
    "VTAB clevr-count (Johnson et al., CLEVR, CVPR 2017)",
)
_SHAPES_LOC = _shapes(
    "loc",
    16,
    125,
    "Location of a hollow square among 2–4 distractors, as its cell of a 4×4 grid",
    "VTAB dsprites-loc (Matthey et al., dSprites, 2017)",
)
# Prefixes whose bare task names become aliases (`svhn` → `vtab-svhn`); the demos' `count` would only confuse.
_BENCHMARKS = ("vtab", "fgvc", "hta")


def _build() -> tuple[Mapping[str, DatasetInfo], Mapping[str, str]]:
    # Order matters for aliases: the first entry to claim a bare name keeps it (VTAB, then FGVC, then HTA).
    entries = [
        *_vtab_entries(),
        *_fgvc_entries(_FGVC),
        *_fgvc_entries(_HTA_FGVC),
        *_torchvision_entries(),
        _DIGITS,
        _SHAPES_COUNT,
        _SHAPES_LOC,
    ]
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
        path = name[len(FOLDER_PREFIX) :].strip()
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
        name=f"{FOLDER_PREFIX}{path}",
        group="custom",
        num_classes=None,
        source="folder",
        folder=str(path),
        protocols=("holdout",),
        transform="vtab",
        title=f"image folder {path}",
        citation="",
        licence="(yours)",
        homepage="",
    )


def by_group() -> dict[str, list[DatasetInfo]]:
    """Registry entries grouped by benchmark, in registry order."""
    groups: dict[str, list[DatasetInfo]] = {}
    for info in DATASETS.values():
        groups.setdefault(info.group, []).append(info)
    return groups
