"""`sa2vp train | evaluate | predict | ui`: training runs tracked in MLflow, and using their artifacts
(library: sa2vp.engine, sa2vp.tracking)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sa2vp_cli.common import (
    ParamsOption, SetOption, expected_errors_exit_2, fail, progress, settings_from, with_options,
)

ArtifactArgument = Annotated[
    Path, typer.Argument(help="The artifact folder `sa2vp train` wrote (<train.output>/model) or its model.json.")
]
BackboneWeightsOption = Annotated[
    str | None,
    typer.Option("--backbone-weights", help="Backbone weights to use instead of the artifact's backbone.weights "
                 "(hub, random, or a .safetensors/.npz file); they must hash to what the model was trained on."),
]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps (train.device).")]


def train(
    dataset: Annotated[str | None, typer.Option(help="Dataset name or folder:<path> (data.dataset).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (train.epochs).")] = None,
    device: DeviceOption = None,
    output: Annotated[Path | None, typer.Option(help="Folder for checkpoints and the artifact (train.output).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last "
                                         "checkpoint (same settings).")] = False,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Train the configured method on a dataset; one MLflow run with params, curves, figures and the artifact."""
    _train(dataset, epochs, device, output, resume, params, overrides)


@expected_errors_exit_2
def _train(dataset: str | None, epochs: int | None, device: str | None, output: Path | None, resume: bool,
           params: Path, overrides: list[str] | None) -> None:
    from sa2vp.engine import fit

    options = {"data.dataset": dataset, "train.epochs": epochs, "train.device": device, "train.output": output}
    settings = settings_from(params, with_options(overrides, options))
    result = fit(settings, resume=resume, progress=progress())
    if result.test is not None:
        typer.echo(f"test top-1 {100 * result.test.top1:.2f} %  mean per-class {100 * result.test.mean_class:.2f} %  "
                   f"(best epoch {result.best_epoch})")
    typer.echo(f"artifact: {result.artifact}")
    if result.run_id:
        typer.echo(f"MLflow: run {result.run_id} in {settings.tracking.uri} (browse: sa2vp ui)")


@expected_errors_exit_2
def evaluate(
    artifact: ArtifactArgument,
    split: Annotated[str, typer.Option(help="Split of the artifact's dataset: train, val, trainval or test.")] = "test",
    backbone_weights: BackboneWeightsOption = None,
    device: DeviceOption = None,
    metrics_file: Annotated[Path | None, typer.Option(help="Also write the metrics as JSON here.")] = None,
) -> None:
    """Recompute an artifact's metrics on a split of the dataset it was trained on."""
    import json

    from sa2vp.atomic import write_atomic
    from sa2vp.data import SPLITS
    from sa2vp.engine import evaluate as run_evaluation
    from sa2vp.engine import load_artifact

    if split not in SPLITS:
        fail(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    loaded = load_artifact(artifact, backbone_weights)
    metrics = run_evaluation(loaded, split, device, progress())
    typer.echo(f"{split}: top-1 {100 * metrics.top1:.2f} %  mean per-class {100 * metrics.mean_class:.2f} %  "
               f"({metrics.count:,} images)")
    if metrics_file is not None:
        write_atomic(metrics_file, json.dumps({split: metrics.as_dict()}, indent=2) + "\n")


@expected_errors_exit_2
def predict(
    artifact: ArtifactArgument,
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to show per image.")] = 5,
    backbone_weights: BackboneWeightsOption = None,
    device: DeviceOption = None,
) -> None:
    """Classify image files with a trained artifact: the top-k classes and their probabilities."""
    from sa2vp.engine import load_artifact
    from sa2vp.engine import predict as classify

    loaded = load_artifact(artifact, backbone_weights)
    predictions = classify(loaded, images, top_k, device)
    table = Table(title=f"{loaded.settings.model.method} on {loaded.settings.backbone.name}")
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for prediction in predictions:
        for rank, (name, probability) in enumerate(prediction.top, start=1):
            table.add_row(str(prediction.image) if rank == 1 else "", str(rank), name, f"{probability:.4f}")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)


@expected_errors_exit_2
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 5000,
    params: ParamsOption = Path("params.yaml"),
    overrides: SetOption = None,
) -> None:
    """Open the MLflow UI on the project's tracking store (tracking.uri), bound to 127.0.0.1."""
    settings = settings_from(params, overrides)
    uri = settings.tracking.uri
    if uri.startswith(("http://", "https://")):
        fail(f"tracking.uri={uri!r} is already a tracking server: open it in a browser")
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        fail("the mlflow command is not installed in this environment")
    typer.echo(f"MLflow UI for {uri}: http://127.0.0.1:{port}  (Ctrl-C stops it)")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)])
