"""The linear probe on features computed once, instead of every epoch.

A linear probe trains its head alone on the frozen backbone's pooled feature of each image. When nothing makes
that feature change between epochs — the backbone stays in eval mode while training (model.backbone_dropout
off, the linear probe's default) and the training transform is the evaluation transform (no augmentation:
data.transform `vtab`) — the backbone's forward gives every epoch the same features. They are computed once
here, for every image of the train, val and test splits, and the head trains on them: the same batches in the
same seeded order (a loader over the features draws the permutation the image loader would, from the same
generator), so the same training up to the last bits of the features (computed in other batches).
"""

from __future__ import annotations

import logging
import time
from typing import Any, TypeGuard, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, RandomSampler

from sa2vp.data import Progress, SplitDataset
from sa2vp.data.dataset import build_transform
from sa2vp.engine.runtime import Precision
from sa2vp.models import AdaptedModel
from sa2vp.models.backbones import data_config
from sa2vp.models.methods.linear import LinearProbe
from sa2vp.settings import Settings

log = logging.getLogger("sa2vp.train")


class FeatureHead(AdaptedModel):
    """A linear probe whose inputs are the frozen backbone's features instead of images: its head alone.

    It holds the probe's own backbone and head under the probe's names (`backbone.*`, frozen; `head.*`), so its
    trainable state, parameter summary, checkpoints and artifact are the probe's, and training it trains the
    probe."""

    def __init__(self, probe: LinearProbe) -> None:
        super().__init__()
        self.backbone = probe.backbone
        self.head = probe.head
        self.backbone_dropout = probe.backbone_dropout

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def features_fixed(model: AdaptedModel, dataset: Any) -> TypeGuard[LinearProbe]:
    """Whether `model` is a linear probe whose backbone gives the images of the training `dataset` the same
    features every epoch: backbone in eval mode while training, training transform = evaluation transform."""
    if not isinstance(model, LinearProbe) or model.backbone_dropout or not isinstance(dataset, SplitDataset):
        return False
    evaluation = build_transform(data_config(model.backbone), dataset.manifest.transform, train=False)
    return repr(dataset.transform) == repr(evaluation)


def probe_on_features(
    model: AdaptedModel,
    loaders: dict[str, DataLoader],
    settings: Settings,
    device: torch.device,
    precision: Precision,
    progress: Progress,
) -> tuple[AdaptedModel, dict[str, DataLoader]]:
    """(model, loaders) to train with: for a linear probe whose features are fixed (`features_fixed`), its
    `FeatureHead` and loaders of the features of each split, computed now; otherwise `model` and `loaders`.

    `model` is on `device`. In a torchrun run (each process loads its share of every batch) nothing changes."""
    train = loaders["train"]
    if (dist.is_available() and dist.is_initialized()) or not features_fixed(model, train.dataset):
        return model, loaders
    start = time.perf_counter()
    every_image = DataLoader(
        train.dataset, batch_size=settings.train.eval_batch_size, num_workers=settings.train.num_workers
    )
    cached = {"train": _feature_loader(model, every_image, train, "train", device, precision, progress)}
    for split in [name for name in loaders if name != "train"]:
        cached[split] = _feature_loader(model, loaders[split], loaders[split], split, device, precision, progress)
    images = sum(len(cast(_Features, loader.dataset)) for loader in cached.values())
    log.info(
        "linear probe: the frozen backbone's features of %s images (%s) computed once, in %.1f s; the head "
        "trains on them",
        f"{images:,}",
        ", ".join(cached),
        time.perf_counter() - start,
    )
    return FeatureHead(model), cached


def _feature_loader(
    probe: LinearProbe,
    images: DataLoader,
    like: DataLoader,
    split: str,
    device: torch.device,
    precision: Precision,
    progress: Progress,
) -> DataLoader:
    """A loader of the probe's features of the images `images` yields in order, batched and (for training)
    shuffled as the loader `like` is."""
    features, targets = _features(probe, images, split, device, precision, progress)
    shuffled = isinstance(like.sampler, RandomSampler)
    return DataLoader(
        _Features(features, targets),
        batch_size=like.batch_size,
        shuffle=shuffled,
        generator=torch.Generator() if shuffled else None,  # seeded each epoch by the trainer, as the image loader's
        collate_fn=_as_batch,
    )


def _features(
    probe: LinearProbe,
    loader: DataLoader,
    split: str,
    device: torch.device,
    precision: Precision,
    progress: Progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features on `device`, targets) of every image the loader yields, in order, as the probe's forward
    computes them (autocast, no gradient; the backbone in eval mode as it is in the probe's training)."""
    was_training = probe.training
    probe.eval()
    features, targets = [], []
    try:
        # no_grad, not inference_mode: the head's backward saves its input, which inference tensors cannot be.
        with torch.no_grad(), progress(f"features of the {split} split", len(loader), "batches") as advance:
            for inputs, labels in loader:
                with precision.autocast(device):
                    features.append(probe.features(inputs.to(device, non_blocking=True)))
                targets.append(torch.as_tensor(labels))
                advance(1)
    finally:
        probe.train(was_training)
    return torch.cat(features), torch.cat(targets)


class _Features(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(feature, target) pairs, fetched a whole batch at a time."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(indices)
        return self.features[rows.to(self.features.device)], self.targets[rows]


def _as_batch(batch: Any) -> Any:
    """The batch `_Features.__getitems__` already assembled, (features, targets), as it is."""
    return batch
