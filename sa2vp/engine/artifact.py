"""The result of a training run: the trainable weights alone (safetensors) and a small JSON that says how to
rebuild the model around them — backbone name and the SHA-256 of its weights, every setting, class names,
the input transform. A few MB for ViT-B, never the frozen backbone.

    folder/model.safetensors   trainable tensors by parameter name
    folder/model.json          {"format": "sa2vp-artifact/2", "settings": …, "backbone": {…, "sha256"}, "classes": …}

model.json is an `ArtifactRecord`, and this module is the only one that writes or reads it (`save_artifact`,
`read_record`, `load_artifact`): the trainer builds the record, the suites and `explain` read its fields. It is
validated when written and when read; every field that rebuilding or using the model depends on is required (a
record without its backbone hash is refused, never trusted), and the trained tensors must be exactly the
model's trainable parameters (names, shapes, dtypes, finite values). Any mismatch is an ArtifactError naming
the file and the field.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode

from sa2vp.atomic import atomic_path, write_atomic
from sa2vp.data.registry import TransformStyle
from sa2vp.engine.metrics import Metrics
from sa2vp.engine.runtime import configure_cpu_numerics, use_portable_dropout
from sa2vp.errors import ArtifactError, BackboneError, one_line
from sa2vp.models import AdaptedModel, ParameterSummary, build_model
from sa2vp.models.backbones import data_config, safetensors_problem, weights_digest
from sa2vp.settings import SA2VPSettings, Settings, SettingsError, settings_from_dump

FORMAT: Final = "sa2vp-artifact/2"
# Format 1 (before SA²VP's settings moved from model.* into model.sa2vp.*) is read by upgrading it.
FORMAT_1: Final = "sa2vp-artifact/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"

SHA256 = r"^[0-9a-f]{64}$"
INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)  # what build_transform can resize with


# --- the record (model.json) --------------------------------------------------------------------------------


class _Part(BaseModel):
    # An unknown key is a typo or another version's record: refused, like an unknown setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneRecord(_Part):
    # In the order model.json has always had them (a record's fields are written in their declared order).
    name: str = Field(min_length=1, description="timm name; must be settings.backbone.name")
    weights: str | None = Field(None, description="backbone.weights at training time (for the reader)")
    sha256: str = Field(pattern=SHA256, description="weights_digest of the backbone training started from")
    parameters: NonNegativeInt | None = None


class DataConfigRecord(BaseModel):
    """timm's data configuration of the backbone as built (`backbones.data_config`): the input transform."""

    model_config = ConfigDict(extra="allow", frozen=True)  # timm's dict; a newer timm may add keys

    input_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    mean: tuple[float, float, float]
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    crop_pct: float | None = None
    crop_mode: str | None = None


class DatasetRecord(_Part):
    name: str | None = None
    protocol: str | None = None
    split_dir: str | None = None
    manifest_hash: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="content_hash of the split manifest the model was trained and tested on",
    )


class MetricsRecord(_Part):
    top1: float
    mean_class: float

    @classmethod
    def of(cls, metrics: Metrics) -> MetricsRecord:
        return cls(top1=metrics.top1, mean_class=metrics.mean_class)


class TrainableRecord(_Part):
    parameters: NonNegativeInt
    percent_of_backbone: float
    head: NonNegativeInt
    groups: dict[str, NonNegativeInt]

    @classmethod
    def of(cls, summary: ParameterSummary) -> TrainableRecord:
        return cls(
            parameters=summary.trainable,
            percent_of_backbone=summary.percent_of_backbone,
            head=summary.head,
            groups=summary.groups,
        )


class TrainingRecord(_Part):
    epochs: NonNegativeInt
    best_epoch: NonNegativeInt
    stopped_early: bool
    val: MetricsRecord | None
    test: MetricsRecord | None
    test_pathways: dict[str, MetricsRecord]
    eval_batch_size: PositiveInt
    mlflow_run_id: str | None


class ArtifactRecord(_Part):
    """model.json. Required: what rebuilding the model, checking it and feeding it depend on. Optional: what
    only reports on the run (sizes, metrics, versions), typed when present."""

    format: Literal["sa2vp-artifact/2"]
    settings: Settings
    backbone: BackboneRecord
    classes: list[str] = Field(min_length=2)
    data_config: DataConfigRecord
    transform: TransformStyle
    dataset: DatasetRecord
    trainable: TrainableRecord | None = None
    training: TrainingRecord | None = None
    versions: dict[str, str] | None = None

    @field_validator("settings", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> Any:
        # The same validation (and messages) as any settings; never the environment or a params file.
        return settings_from_dump(value) if isinstance(value, dict) else value

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted(name for name, count in Counter(value).items() if count > 1)
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(map(repr, repeated[:5]))}")
        return value

    @model_validator(mode="after")
    def _same_backbone(self) -> ArtifactRecord:
        if self.backbone.name != self.settings.backbone.name:
            raise ValueError(
                f"backbone.name {self.backbone.name!r} is not settings.backbone.name {self.settings.backbone.name!r}"
            )
        return self


def validate_record(document: Any, source: Path) -> ArtifactRecord:
    """`document` (model.json's contents) as an ArtifactRecord, or an ArtifactError naming `source` and every
    field that is missing or wrong."""
    if not isinstance(document, dict):
        raise ArtifactError(f"{source}: expected a JSON object, got {type(document).__name__}")
    if document.get("format") == FORMAT_1:
        document = upgrade_format_1(document)
    if document.get("format") != FORMAT:  # another version's record: its other fields would only be noise
        raise ArtifactError(f"{source}: format {document.get('format')!r} is not {FORMAT!r}")
    try:
        return ArtifactRecord.model_validate(document)
    except ValidationError as exc:
        raise ArtifactError(f"{source}: {_describe(exc)}") from None


def upgrade_format_1(document: dict[str, Any]) -> dict[str, Any]:
    """A format-1 record as format 2: SA²VP's settings, then keys of the `model:` section itself, move into its
    `sa2vp` sub-section. Nothing else differs."""
    settings = document.get("settings")
    model = settings.get("model") if isinstance(settings, dict) else None
    if not isinstance(settings, dict) or not isinstance(model, dict):
        return {**document, "format": FORMAT}  # validation names what is missing
    own = {key: model[key] for key in SA2VPSettings.model_fields if key in model}
    rest = {key: value for key, value in model.items() if key not in own}
    return {**document, "format": FORMAT, "settings": {**settings, "model": {**rest, "sa2vp": own}}}


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "missing (required)"
        elif error["type"] == "extra_forbidden":
            message = "unknown field"
        elif not isinstance(error.get("input"), (dict, list)) and key != "(root)":
            got = repr(error["input"])
            message += f" (got {got if len(got) <= 80 else got[:79] + '…'})"
        parts.append(f"{key}: {message}")
    return "; ".join(parts[:6]) + (f"; … {len(parts) - 6} more" if len(parts) > 6 else "")


# --- writing and reading --------------------------------------------------------------------------------------


def build_seeded(settings: Settings, num_classes: int) -> AdaptedModel:
    """The model, initialised from `train.seed`: a randomly initialised backbone is the same every time,
    which is what lets an artifact on a random backbone be rebuilt and checked by its hash."""
    numerics = configure_cpu_numerics(
        settings.train.cpu_numerics, settings.train.device, settings.train.cpu_threads
    )  # before the first tensor op
    torch.manual_seed(settings.train.seed)
    model = build_model(settings, num_classes)
    if numerics is not None:
        use_portable_dropout(model)
    return model


def save_artifact(folder: Path, model: AdaptedModel, record: ArtifactRecord) -> Path:
    """Write model.safetensors (`model`'s trainable tensors) + model.json (`record`) into `folder`, each
    atomically; returns the JSON's path.

    The record is validated again as it will be read (as JSON) first: a record changed without validation
    (`model_copy(update=...)`), or settings that would not load back, would make an artifact that could not be
    loaded, which is never written.
    """
    document = record.model_dump(mode="json")
    validate_record(document, folder / CONFIG_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.trainable_state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    return write_atomic(folder / CONFIG_NAME, text)


@dataclass
class LoadedArtifact:
    model: AdaptedModel
    settings: Settings  # the record's, with any override (backbone weights) applied
    record: ArtifactRecord

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def data_config(self) -> dict[str, Any]:
        return self.record.data_config.model_dump(mode="json")


def artifact_folder(path: Path) -> Path:
    """An artifact's folder, given the folder or a file in it (its model.json)."""
    return path if path.is_dir() else path.parent


def read_record(path: Path) -> tuple[Path, ArtifactRecord]:
    """(folder, validated model.json) of an artifact given its folder or its model.json."""
    folder = artifact_folder(path)
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise ArtifactError(
            f"{path}: not an sa2vp artifact (no {CONFIG_NAME}; expected the folder `sa2vp train` "
            "wrote, e.g. runs/train/model)"
        )
    try:
        document = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{config}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ArtifactError(f"{config}: cannot be read ({one_line(exc)})") from None
    return folder, validate_record(document, config)


def load_artifact(path: Path | str, backbone_weights: str | None = None) -> LoadedArtifact:
    """Rebuild the trained model: backbone from its settings (or `backbone_weights`), trained tensors on top.

    Refused with an ArtifactError naming the file: a record that does not validate (`read_record`), a backbone
    whose weights do not hash to what the model was trained on (the predictions would be quietly wrong; the
    error names both hashes), a data_config for another input size, trained tensors that are not exactly the
    model's trainable parameters (`read_tensors`).
    """
    folder, record = read_record(Path(path))
    config = folder / CONFIG_NAME
    source = f"{config}" if backbone_weights is None else f"{config} with --backbone-weights {backbone_weights}"
    overrides = {"backbone.weights": backbone_weights} if backbone_weights is not None else {}
    try:
        settings = settings_from_dump(record.settings.model_dump(mode="json"), overrides)
        model = build_seeded(settings, len(record.classes))
    except (SettingsError, BackboneError) as exc:
        raise type(exc)(f"{source}: {exc}") from None
    _check_backbone(model, settings, record, folder)
    _check_input_size(model, record, config)
    model.load_trainable_state_dict(read_tensors(folder / WEIGHTS_NAME, model))
    return LoadedArtifact(model.eval(), settings, record)


def _check_backbone(model: AdaptedModel, settings: Settings, record: ArtifactRecord, folder: Path) -> None:
    actual, expected = weights_digest(model.backbone, model.backbone_name), record.backbone.sha256
    if actual != expected:
        raise ArtifactError(
            f"{folder}: backbone {settings.backbone.name} with weights={settings.backbone.weights!r} has "
            f"sha256 {actual[:12]}…, but the model was trained on {expected[:12]}…; pass the weights it was "
            "trained on (--backbone-weights)"
        )


def _check_input_size(model: AdaptedModel, record: ArtifactRecord, config: Path) -> None:
    # The size the backbone is built for is fixed by the settings; a record that says otherwise would feed
    # it images it cannot take.
    built = tuple(data_config(model.backbone)["input_size"])
    if record.data_config.input_size != built:
        raise ArtifactError(
            f"{config}: data_config.input_size {list(record.data_config.input_size)} is not the "
            f"input size of the backbone its settings build, {list(built)}"
        )


def read_tensors(weights: Path, model: AdaptedModel) -> dict[str, torch.Tensor]:
    """The artifact's trained tensors, which must be exactly `model`'s trainable parameters: same names,
    shapes and dtypes, finite values (ArtifactError naming the file and the tensors otherwise)."""
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing (the artifact's trained weights)")
    problem = safetensors_problem(weights)
    if problem is not None:
        raise ArtifactError(
            f"{weights} {problem}; an artifact's weights are read only as safetensors, the format `sa2vp train` writes"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{weights}: not a readable safetensors file ({one_line(exc)})") from None
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems = [f"missing {name}" for name in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {name}" for name in sorted(tensors.keys() - expected.keys())]
    for name in sorted(expected.keys() & tensors.keys()):
        have, want = tensors[name], expected[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            problems.append(
                f"{name} is {have.dtype} {list(have.shape)}, the model's is {want.dtype} {list(want.shape)}"
            )
        elif have.is_floating_point() and not bool(torch.isfinite(have).all()):
            problems.append(f"{name} holds NaN or infinite values")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; … {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ArtifactError(
            f"{weights}: the trained tensors do not fit the model its {CONFIG_NAME} describes ({shown})"
        )
    return tensors
