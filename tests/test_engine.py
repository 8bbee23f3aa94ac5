"""The training engine in-process: schedule, optimiser groups, metrics, a real run on digits tracked in a real
MLflow store, the artifact (small, exact, loadable), evaluation and prediction from it, and its errors."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from sa2vp.engine import evaluate, fit, load_artifact, predict
from sa2vp.engine.artifact import MetricsRecord, read_record
from sa2vp.engine.metrics import Metrics
from sa2vp.engine.optim import WarmupCosine, build_optimizer
from sa2vp.engine.report import write_predictions
from sa2vp.engine.runtime import resolve_device, resolve_precision
from sa2vp.errors import ArtifactError, TrainingDiverged
from sa2vp.settings import SettingsError, TrainSettings
from tests.train_fixtures import digits_root, experiment_id, project, tiny_settings  # noqa: F401  (fixtures)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    schedule = WarmupCosine(total_steps=110, warmup_steps=10, floor=1e-4)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert schedule(110) == pytest.approx(1e-4)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_weight_decay_applies_to_matrices_only() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(list(layer.named_parameters()), TrainSettings(weight_decay=0.05))
    by_decay = {group["weight_decay"]: [p.ndim for p in group["params"]] for group in optimizer.param_groups}
    assert by_decay == {0.05: [2], 0.0: [1, 1, 1]}


def test_metrics_from_a_confusion_matrix() -> None:
    confusion = np.array([[8, 2, 0], [1, 1, 0], [0, 0, 0]])  # class 2 absent from the split
    metrics = Metrics(confusion)
    assert metrics.top1 == pytest.approx(9 / 12)
    assert metrics.mean_class == pytest.approx((0.8 + 0.5) / 2)
    assert metrics.per_class_rows(["a", "b", "c"])[2] == {"class": "c", "support": 0, "correct": 0, "accuracy": None}


def test_cpu_runs_in_fp32_and_refuses_fp16() -> None:
    cpu = resolve_device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    with pytest.raises(SettingsError, match="train.precision=fp16"):
        resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="train.device='cuda'"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_root: Path):
    folder = tmp_path_factory.mktemp("trained")
    import yaml

    from tests.train_fixtures import TINY_PARAMS

    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"]["root"] = str(digits_root)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    settings = tiny_settings(folder, **{"train.epochs": 2})
    return settings, fit(settings)


def test_a_run_is_tracked_with_params_curves_figures_artifact_and_tags(trained) -> None:
    settings, result = trained
    client = MlflowClient(settings.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.sa2vp.gamma"] == "0.1" and params["train.lr"] == "0.01" and params["data.dataset"] == "digits"
    assert json.loads(params["backbone.model_kwargs"]) == {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert params["model.sa2vp.deep_layers"] == "null"
    assert int(params["trainable_parameters"]) > 0 and float(params["trainable_percent"]) > 0
    for key in ("train/loss", "train/loss_base", "train/loss_prompt", "lr", "val/top1", "val/mean_class"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2], key
    assert run.data.metrics["test/top1"] == pytest.approx(result.test.top1)
    tags = run.data.tags
    assert tags["dataset"] == "digits" and tags["backbone"] == "vit_tiny_patch16_224"
    assert tags["dataset_manifest_hash"].startswith("sha256:") and len(tags["backbone_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"model", "test_confusion_matrix.png", "test_per_class_accuracy.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "model")} == {
        "model/model.json",
        "model/model.safetensors",
    }


def test_the_artifact_holds_only_trainable_weights_and_how_to_rebuild_the_model(trained) -> None:
    settings, result = trained
    tensors = load_file(str(result.artifact / "model.safetensors"))
    assert tensors and not any(name.startswith("backbone.") for name in tensors)
    record = json.loads((result.artifact / "model.json").read_text())
    assert record["classes"] == [str(d) for d in range(10)]
    assert record["settings"]["model"]["sa2vp"]["gamma"] == settings.model.sa2vp.gamma
    assert record["backbone"]["name"] == "vit_tiny_patch16_224" and len(record["backbone"]["sha256"]) == 64
    assert record["training"]["test"]["top1"] == result.test.top1
    for name in ("metrics.json", "history.csv", "per_class_accuracy.csv", "confusion_matrix.png", "checkpoint.pt"):
        assert (result.output / name).is_file(), name


def test_model_json_is_the_artifact_record_to_the_byte(trained) -> None:
    # One record type, which sa2vp.engine.artifact alone writes and reads: model.json read and written back is
    # the same file, in the layout artifacts have always had (those written before load as they are).
    _, result = trained
    text = (result.artifact / "model.json").read_text()
    _, record = read_record(result.artifact)
    assert json.dumps(record.model_dump(mode="json"), indent=2) + "\n" == text
    document = json.loads(text)
    assert list(document) == [
        *("format", "settings", "backbone", "classes", "data_config", "transform", "dataset"),
        *("trainable", "training", "versions"),
    ]
    assert list(document["backbone"]) == ["name", "weights", "sha256", "parameters"]
    assert record.training is not None and record.training.test == MetricsRecord.of(result.test)
    assert record.training.mlflow_run_id == result.run_id and record.training.val == MetricsRecord.of(result.val)
    # metrics.json: the same figures, by split
    metrics = json.loads((result.output / "metrics.json").read_text())
    assert metrics == {"val": result.val.as_dict(), "test": result.test.as_dict()}


def test_evaluate_reproduces_the_test_accuracy_exactly(trained) -> None:
    _, result = trained
    metrics = evaluate(load_artifact(result.artifact), "test")
    assert np.array_equal(metrics.confusion, result.test.confusion)
    assert metrics.top1 == result.test.top1


def test_predict_gives_sorted_probabilities_for_image_files(trained, digits_root: Path) -> None:
    _, result = trained
    images = sorted((digits_root / "digits" / "images" / "7").glob("*.png"))[:3]
    predictions = predict(load_artifact(result.artifact), images, top_k=4)
    assert [p.image for p in predictions] == images
    for prediction in predictions:
        probabilities = [p for _, p in prediction.top]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert {name for name, _ in prediction.top} <= {str(d) for d in range(10)}


def test_predictions_are_written_as_csv_or_json_rows(trained, digits_root: Path, tmp_path: Path) -> None:
    _, result = trained
    images = sorted((digits_root / "digits" / "images" / "7").glob("*.png"))[:2]
    predictions = predict(load_artifact(result.artifact), images, top_k=3)
    rows = [
        {"image": str(prediction.image), "rank": rank, "class": name, "probability": probability}
        for prediction in predictions
        for rank, (name, probability) in enumerate(prediction.top, start=1)
    ]
    assert len(rows) == 6 and json.loads(write_predictions(tmp_path / "p.json", predictions).read_text()) == rows
    with write_predictions(tmp_path / "p.csv", predictions).open(newline="") as file:
        assert list(csv.DictReader(file)) == [{key: str(value) for key, value in row.items()} for row in rows]
    with pytest.raises(ValueError, match=r"p\.txt: predictions are written as \.csv or \.json"):
        write_predictions(tmp_path / "p.txt", predictions)
    assert not (tmp_path / "p.txt").exists()


def test_an_artifact_on_other_backbone_weights_is_refused(trained, tmp_path: Path) -> None:
    _, result = trained
    import timm
    from safetensors.torch import save_file

    other = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ArtifactError, match="trained on"):
        load_artifact(result.artifact, backbone_weights=str(tmp_path / "other.safetensors"))


def test_resume_with_changed_settings_is_refused(trained) -> None:
    settings, _ = trained
    changed = tiny_settings(Path(settings.train.output).parent.parent, **{"model.sa2vp.gamma": 0.5})
    with pytest.raises(ArtifactError, match="model.sa2vp.gamma"):
        fit(changed, resume=True)


def test_a_diverging_loss_stops_the_run_with_a_clear_error(project: Path) -> None:
    settings = tiny_settings(project, **{"train.lr": 1e30, "train.warmup_epochs": 0, "train.epochs": 1})
    with pytest.raises(TrainingDiverged, match="lower train.lr"):
        fit(settings)
    client = MlflowClient(settings.tracking.uri)
    runs = client.search_runs([experiment_id(client, "tests")])
    assert runs[0].info.status == "FAILED" and "TrainingDiverged" in runs[0].data.tags["error"]
    assert not (project / "runs" / "train" / "model").exists()


def test_gradient_accumulation_steps_once_per_group_of_batches(project: Path) -> None:
    settings = tiny_settings(
        project, **{"train.epochs": 1, "train.accumulate": 4, "train.test_split": None, "tracking.enabled": False}
    )
    result = fit(settings)
    checkpoint = torch.load(result.output / "checkpoint.pt", weights_only=True)
    batches = -(-1257 // 64)  # digits holdout train split: 1257 images
    assert checkpoint["scheduler"]["last_epoch"] == -(-batches // 4)
    assert result.test is None and result.run_id == ""


def test_a_relative_sqlite_store_follows_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow caches stores by URI for the process: a relative one must be made absolute where it is used.
    from sa2vp.tracking import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
