"""The result of a training run: the trainable weights alone (safetensors) and a small JSON that says how to
rebuild the model around them — backbone name and the SHA-256 of its weights, every setting, class names,
the input transform. A few MB for ViT-B, never the frozen backbone.

    folder/model.safetensors   trainable tensors by parameter name
    folder/model.json          {"format": "sa2vp-artifact/1", "settings": …, "backbone": {…, "sha256"}, "classes": …}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sa2vp.atomic import atomic_path, write_atomic
from sa2vp.errors import ArtifactError
from sa2vp.models import AdaptedModel, build_model
from sa2vp.models.backbones import weights_digest
from sa2vp.settings import Settings, SettingsError, flatten_settings, settings_from_dump

FORMAT = "sa2vp-artifact/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"


def build_seeded(settings: Settings, num_classes: int) -> AdaptedModel:
    """The model, initialised from `train.seed`: a randomly initialised backbone is the same every time,
    which is what lets an artifact on a random backbone be rebuilt and checked by its hash."""
    torch.manual_seed(settings.train.seed)
    return build_model(settings, num_classes)


def save_artifact(folder: Path, model: AdaptedModel, settings: Settings, record: dict[str, Any]) -> Path:
    """Write model.safetensors + model.json into `folder` (each atomically); returns the JSON's path.

    `record` holds what the run knows beyond the settings: classes, data_config, backbone sha256, metrics.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.trainable_state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    document = {"format": FORMAT, "settings": settings.model_dump(mode="json"), **record}
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    return write_atomic(folder / CONFIG_NAME, text)


@dataclass
class LoadedArtifact:
    model: AdaptedModel
    settings: Settings
    record: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.record["classes"])

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self.record["data_config"])


def read_record(path: Path) -> tuple[Path, dict[str, Any]]:
    """(folder, model.json contents) of an artifact given its folder or its model.json."""
    folder = path if path.is_dir() else path.parent
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise ArtifactError(f"{path}: not an sa2vp artifact (no {CONFIG_NAME}; expected the folder `sa2vp train` "
                            "wrote, e.g. runs/train/model)")
    try:
        record = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config}: not valid JSON ({exc})") from None
    if record.get("format") != FORMAT:
        raise ArtifactError(f"{config}: format {record.get('format')!r} is not {FORMAT!r}")
    return folder, record


def load_artifact(path: Path, backbone_weights: str | None = None, check_backbone: bool = True) -> LoadedArtifact:
    """Rebuild the trained model: backbone from its settings (or `backbone_weights`), trained tensors on top.

    The backbone's weights must hash to what the model was trained on; otherwise the predictions would be
    quietly wrong, so this is an error naming both hashes.
    """
    folder, record = read_record(path)
    overrides = {"backbone.weights": backbone_weights} if backbone_weights is not None else {}
    try:
        settings = settings_from_dump(record["settings"], overrides)
    except SettingsError as exc:
        raise ArtifactError(f"{folder / CONFIG_NAME}: its settings are not valid here: {exc}") from None
    model = build_seeded(settings, len(record["classes"]))
    expected = record.get("backbone", {}).get("sha256")
    if check_backbone and expected:
        actual = weights_digest(model.backbone, model.backbone_name)
        if actual != expected:
            raise ArtifactError(
                f"{folder}: backbone {settings.backbone.name} with weights={settings.backbone.weights!r} has "
                f"sha256 {actual[:12]}…, but the model was trained on {expected[:12]}…; pass the weights it was "
                "trained on (--backbone-weights)"
            )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing (the artifact's trained weights)")
    try:
        model.load_trainable_state_dict(load_file(str(weights)))
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"{weights}: {exc}") from None
    return LoadedArtifact(model.eval(), settings, record)
