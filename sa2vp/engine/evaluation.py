"""Using an artifact: recompute a split's metrics, or classify a user's own image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from sa2vp.data import NO_PROGRESS, Progress, build_transform, load_image, load_split
from sa2vp.data.splits import read_manifest, split_dir
from sa2vp.engine.artifact import LoadedArtifact
from sa2vp.engine.metrics import Metrics, evaluate_model
from sa2vp.engine.runtime import resolve_device, resolve_precision
from sa2vp.errors import ArtifactError
from sa2vp.models import PathwayClassifier


def evaluate(loaded: LoadedArtifact, split: str = "test", device: str | None = None,
             progress: Progress = NO_PROGRESS, pathway: str | None = None) -> Metrics:
    """Metrics of the artifact's model on a split of the dataset it was trained on.

    Same split files, eval transform, batch size and precision as at the end of training, so the test
    accuracy is reproduced exactly on the same device. `pathway` names an auxiliary pathway to score instead
    of the model's prediction (SA²VP: "prompt").
    """
    if pathway is not None and pathway not in loaded.model.auxiliary_pathways:
        have = ", ".join(loaded.model.auxiliary_pathways) or "none"
        raise ArtifactError(f"--pathway {pathway!r}: a {loaded.settings.model.method} model's auxiliary pathways "
                            f"are: {have}")
    settings = loaded.settings
    folder = split_dir(settings.data)
    _check_same_data(folder, loaded)
    dataset = load_split(folder, split, loaded.data_config, train=False, style=loaded.record.transform)
    target = resolve_device(device or settings.train.device)
    precision = resolve_precision(settings.train.precision, target)
    # The batch size the run evaluated with (its settings, as recorded): batch composition can move the last
    # bits of the logits, and evaluate reproduces the recorded test accuracy exactly.
    loader = DataLoader(dataset, batch_size=settings.train.eval_batch_size, shuffle=False,
                        num_workers=settings.train.num_workers,
                        pin_memory=target.type == "cuda")
    model = loaded.model.to(target)
    if pathway is not None:
        model = PathwayClassifier(model, pathway)
    return evaluate_model(model, loader, len(loaded.classes), target, precision, progress, f"evaluating {split}")


def _check_same_data(folder: Path, loaded: LoadedArtifact) -> None:
    """The split folder must be the one the model was trained and tested on: same classes in the same order
    (else every label is misread), same split lists (else "test" may hold training images)."""
    manifest = read_manifest(folder)
    if list(manifest.classes) != loaded.classes:
        raise ArtifactError(f"{folder}: its classes differ from the artifact's; was the dataset prepared again "
                            "with other settings?")
    recorded, now = loaded.record.dataset.manifest_hash, manifest.data.get("content_hash")
    if now != recorded:
        raise ArtifactError(f"{folder}: its split lists (manifest content_hash {str(now)[:19]}…) are not the ones "
                            f"the model was trained and tested on ({recorded[:19]}…); evaluate on that data or "
                            "train again")


@dataclass(frozen=True)
class Prediction:
    image: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


@torch.inference_mode()
def predict(loaded: LoadedArtifact, images: list[Path], top_k: int = 5, device: str | None = None,
            batch_size: int = 32) -> list[Prediction]:
    """The `top_k` classes and their probabilities for each image file (any format PIL reads)."""
    for path in images:
        if not path.is_file():
            raise ArtifactError(f"{path}: no such image file")
    transform = build_transform(loaded.data_config, loaded.record.transform, train=False)
    target = resolve_device(device or loaded.settings.train.device)
    precision = resolve_precision(loaded.settings.train.precision, target)
    model = loaded.model.to(target).eval()
    k = min(top_k, len(loaded.classes))
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([transform(load_image(path)) for path in chunk]).to(target)
        with precision.autocast(target):
            logits = model(batch)
        probabilities = logits.float().softmax(dim=1)
        values, indices = probabilities.topk(k, dim=1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            results.append(Prediction(path, [(loaded.classes[i], p) for i, p in zip(row_indices, row_values,
                                                                                     strict=True)]))
    return results

