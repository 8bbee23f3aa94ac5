"""A torch Dataset over a prepared split, with the transforms of method file §4.

The transforms take their input size, interpolation and normalisation from the backbone's data configuration
(the dict `timm.data.resolve_data_config` returns: input_size, mean, std, interpolation, crop_pct); this
package never looks at the model itself.

- `vtab`: resize to the input size (H×W), no augmentation, for training and evaluation alike.
- `fgvc`: resize to 256/224 of the input size (256×256 for 224), then a random crop of the input size and a
  random horizontal flip for training, or the centre crop for evaluation. (crop_pct is not used: the ratio
  is the release's fixed 256/224.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms as T

from sa2vp.data.errors import DataError
from sa2vp.data.images import load_image
from sa2vp.data.splits import read_manifest, read_split

Transform = Callable[[Any], Any]
TRAINING_SPLITS = ("train", "trainval")
_FGVC_RESIZE = 256 / 224


class SplitDataset(Dataset):
    """(image, label) pairs of one split of a folder written by `sa2vp data prepare`.

    An image that cannot be read raises CorruptImageError (or MissingDataError) naming the file: a split never
    silently drops or relabels an image. (`data.skip_corrupt` leaves bad images out when preparing instead.)
    """

    def __init__(self, split_dir: Path, split: str, transform: Transform | None = None) -> None:
        manifest = read_manifest(split_dir)
        self.root = manifest.images
        self.classes: tuple[str, ...] = manifest.classes
        self.samples = read_split(split_dir, split)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(self.root / path)
        return (self.transform(image) if self.transform is not None else image), label

    def path(self, index: int) -> Path:
        """The image file of an item (for predictions and error reports)."""
        return self.root / self.samples[index][0]


def load_split(
    split_dir: Path, split: str, data_config: Mapping[str, Any], train: bool | None = None, style: str | None = None
) -> SplitDataset:
    """A split with the transforms its manifest names (`style` overrides); `train` defaults to True for the
    train and trainval splits."""
    dataset = SplitDataset(split_dir, split)
    training = split in TRAINING_SPLITS if train is None else train
    dataset.transform = build_transform(data_config, style or dataset.manifest.transform, training)
    return dataset


def build_transform(data_config: Mapping[str, Any], style: str, train: bool) -> Transform:
    """PIL image → normalised float tensor (C, H, W), as described in the module docstring."""
    height, width = _input_size(data_config)
    interpolation = _interpolation(data_config)
    if style == "vtab":
        geometry: list[Transform] = [T.Resize((height, width), interpolation=interpolation)]
    elif style == "fgvc":
        resize = T.Resize((round(height * _FGVC_RESIZE), round(width * _FGVC_RESIZE)), interpolation=interpolation)
        geometry = (
            [resize, T.RandomCrop((height, width)), T.RandomHorizontalFlip()]
            if train
            else [resize, T.CenterCrop((height, width))]
        )
    else:
        raise DataError(f"data.transform={style!r}: expected 'vtab' or 'fgvc'")
    mean, std = _stats(data_config)
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])


def _input_size(config: Mapping[str, Any]) -> tuple[int, int]:
    size = config.get("input_size")
    if not isinstance(size, (tuple, list)) or len(size) != 3:
        raise DataError(f"data config: input_size must be (channels, height, width), got {size!r}")
    return int(size[1]), int(size[2])


def _interpolation(config: Mapping[str, Any]) -> T.InterpolationMode:
    if "interpolation" not in config:
        raise DataError("data config: missing 'interpolation' (e.g. 'bicubic')")
    name = str(config["interpolation"])
    try:
        return T.InterpolationMode(name)
    except ValueError:
        allowed = ", ".join(m.value for m in T.InterpolationMode)
        raise DataError(f"data config: interpolation {name!r} is not one of {allowed}") from None


def _stats(config: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean = tuple(float(v) for v in config["mean"])
        std = tuple(float(v) for v in config["std"])
    except KeyError as exc:
        raise DataError(f"data config: missing {exc.args[0]!r} (the backbone's normalisation)") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"data config: mean and std need 3 values each, std > 0 (got {mean}, {std})")
    return mean, std
