"""Using an artifact: recompute a split's metrics, or classify a user's own images (files or tensors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image

from sa2vp.data import NO_PROGRESS, Progress, build_transform, load_image, load_split
from sa2vp.data.splits import read_manifest, split_dir
from sa2vp.engine.artifact import LoadedArtifact, load_artifact
from sa2vp.engine.metrics import Metrics, evaluate_model
from sa2vp.engine.runtime import resolve_device, resolve_precision
from sa2vp.errors import ArtifactError
from sa2vp.models import PathwayClassifier


def evaluate(
    loaded: LoadedArtifact,
    split: str = "test",
    device: str | None = None,
    progress: Progress = NO_PROGRESS,
    pathway: str | None = None,
) -> Metrics:
    """Metrics of the artifact's model on a split of the dataset it was trained on.

    Same split files, eval transform, batch size and precision as at the end of training, so the test
    accuracy is reproduced exactly on the same device. `pathway` names an auxiliary pathway to score instead
    of the model's prediction (SA²VP: "prompt").
    """
    if pathway is not None and pathway not in loaded.model.auxiliary_pathways:
        have = ", ".join(loaded.model.auxiliary_pathways) or "none"
        raise ArtifactError(
            f"--pathway {pathway!r}: a {loaded.settings.model.method} model's auxiliary pathways are: {have}"
        )
    settings = loaded.settings
    folder = split_dir(settings.data)
    check_same_data(folder, loaded)
    dataset = load_split(folder, split, loaded.data_config, train=False, style=loaded.record.transform)
    target = resolve_device(device or settings.train.device)
    precision = resolve_precision(settings.train.precision, target)
    # The batch size the run evaluated with (its settings, as recorded): batch composition can move the last
    # bits of the logits, and evaluate reproduces the recorded test accuracy exactly.
    loader = DataLoader(
        dataset,
        batch_size=settings.train.eval_batch_size,
        shuffle=False,
        num_workers=settings.train.num_workers,
        pin_memory=target.type == "cuda",
    )
    model: nn.Module = loaded.model.to(target)
    if pathway is not None:
        model = PathwayClassifier(loaded.model, pathway)
    return evaluate_model(model, loader, len(loaded.classes), target, precision, progress, f"evaluating {split}")


def check_same_data(folder: Path, loaded: LoadedArtifact) -> None:
    """The split folder must be the one the model was trained and tested on: same classes in the same order
    (else every label is misread), same split lists (else "test" may hold training images)."""
    manifest = read_manifest(folder)
    if list(manifest.classes) != loaded.classes:
        raise ArtifactError(
            f"{folder}: its classes differ from the artifact's; was the dataset prepared again with other settings?"
        )
    recorded, now = loaded.record.dataset.manifest_hash, manifest.data.get("content_hash")
    if now != recorded:
        raise ArtifactError(
            f"{folder}: its split lists (manifest content_hash {str(now)[:19]}…) are not the ones "
            f"the model was trained and tested on ({recorded[:19]}…); evaluate on that data or "
            "train again"
        )


@dataclass(frozen=True)
class Prediction:
    image: Path | int  # the image file, or the index of the image in a tensor batch
    top: list[tuple[str, float]]  # (class name, probability), most likely first


Images = torch.Tensor | Sequence[Path | str]
"""Image files (any format PIL reads), or a batch of images as a tensor: (N, 3, H, W) or one (3, H, W), of any
size, with pixel values as uint8 0–255 or floats in [0, 1] — not normalised: the artifact's own resize, crop
and normalisation are applied, exactly as to its files."""


@torch.inference_mode()
def predict(
    artifact: LoadedArtifact | Path | str,
    images: Images,
    top_k: int = 5,
    device: str | None = None,
    batch_size: int = 32,
) -> list[Prediction]:
    """The `top_k` classes and their probabilities for each image, most likely first.

    `artifact`: a loaded artifact, or the folder `sa2vp train` wrote (loaded here). `images`: see `Images`."""
    loaded = artifact if isinstance(artifact, LoadedArtifact) else load_artifact(Path(artifact))
    named, pictures = _as_pictures(images)
    transform = build_transform(loaded.data_config, loaded.record.transform, train=False)
    target = resolve_device(device or loaded.settings.train.device)
    precision = resolve_precision(loaded.settings.train.precision, target)
    model = loaded.model.to(target).eval()
    k = min(top_k, len(loaded.classes))
    results = []
    for start in range(0, len(named), batch_size):
        chunk = named[start : start + batch_size]
        batch = torch.stack([transform(pictures(item)) for item in chunk]).to(target)
        with precision.autocast(target):
            logits = model(batch)
        probabilities = logits.float().softmax(dim=1)
        values, indices = probabilities.topk(k, dim=1)
        for item, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            results.append(
                Prediction(item, [(loaded.classes[i], p) for i, p in zip(row_indices, row_values, strict=True)])
            )
    return results


def _as_pictures(images: Images) -> tuple[list[Any], Callable[[Any], Image.Image]]:
    """(what each prediction names — a path or a batch index, a function giving its RGB picture), checked."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        if batch.dim() != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"images: expected a tensor of shape (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
        if batch.is_floating_point() and batch.numel() and not 0.0 <= float(batch.min()) <= float(batch.max()) <= 1.0:
            # normalised inputs would be normalised twice: a quietly wrong answer
            low, high = float(batch.min()), float(batch.max())
            raise ValueError(
                f"images: float pixel values must be in [0, 1] (not normalised: the artifact's "
                f"normalisation is applied here), got [{low:.3g}, {high:.3g}]"
            )
        if not batch.is_floating_point() and batch.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 (0–255) or float (0–1) pixels, got {batch.dtype}")
        cpu = batch.detach().cpu()
        return list(range(len(cpu))), lambda index: to_pil_image(cpu[index]).convert("RGB")
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(item) for item in images]
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path}: no such image file")
    return paths, load_image
