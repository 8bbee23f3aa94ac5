"""`sa2vp evaluate | predict | ui`: using a trained artifact, and browsing the tracked runs
(library: sa2vp.engine, sa2vp.tracking)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import (
    DEFAULT_PARAMS,
    ParamsOption,
    SetOption,
    check_writable,
    expected_errors_exit_2,
    fail,
    progress,
    settings_from,
)
from .train import DeviceOption

# A str, not a Path: a Path would fold the `//` of `mlflow-artifacts://host:port/…`.
ArtifactArgument = Annotated[
    str,
    typer.Argument(
        help="The artifact folder `sa2vp train` wrote (<train.output>/model) or its model.json; or its MLflow "
        "URI, downloaded through the tracking store: runs:/<run id>/model, mlflow-artifacts:/…, models:/<model id>."
    ),
]
TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow store to download an artifact URI from (default: tracking.uri of params.yaml here).",
    ),
]
BackboneWeightsOption = Annotated[
    str | None,
    typer.Option(
        "--backbone-weights",
        help="Backbone weights to use instead of the artifact's backbone.weights "
        "(hub, random, or a .safetensors/.npz file); they must hash to what the model was trained on.",
    ),
]


@expected_errors_exit_2
def evaluate(
    artifact: ArtifactArgument,
    split: Annotated[str, typer.Option(help="Split of the artifact's dataset: train, val, trainval or test.")] = "test",
    backbone_weights: BackboneWeightsOption = None,
    device: DeviceOption = None,
    metrics_file: Annotated[Path | None, typer.Option(help="Also write the metrics as JSON here.")] = None,
    plots_dir: Annotated[
        Path | None, typer.Option(help="Also write confusion.csv and per_class_accuracy.csv here (DVC plots).")
    ] = None,
    pathway: Annotated[
        str | None,
        typer.Option(
            help="Score an auxiliary pathway alone instead of the model's "
            "prediction: `prompt` (SA²VP's prompt pathway)."
        ),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Recompute an artifact's metrics on a split of the dataset it was trained on.

    Example: sa2vp evaluate runs/train/model --split test --metrics-file metrics.json
    From the tracking server: sa2vp evaluate runs:/<run id>/model
    """
    from sa2vp.data import SPLITS
    from sa2vp.engine import evaluate as run_evaluation
    from sa2vp.engine import load_artifact
    from sa2vp.engine.report import write_dvc_plots, write_metrics
    from sa2vp.tracking import local_artifact

    if split not in SPLITS:
        fail(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if metrics_file is not None:
        check_writable("--metrics-file", metrics_file)
    if plots_dir is not None:
        check_writable("--plots-dir", plots_dir, folder=True)
    with local_artifact(artifact, lambda: _tracking_uri(tracking_uri)) as folder:
        loaded = load_artifact(folder, backbone_weights)
    metrics = run_evaluation(loaded, split, device, progress(), pathway)
    label = split if pathway is None else f"{split}, {pathway} pathway"
    typer.echo(
        f"{label}: top-1 {100 * metrics.top1:.2f} %  mean per-class {100 * metrics.mean_class:.2f} %  "
        f"({metrics.count:,} images)"
    )
    if metrics_file is not None:
        write_metrics(metrics_file, {split: metrics})
    if plots_dir is not None:
        write_dvc_plots(plots_dir, loaded.classes, metrics)


@expected_errors_exit_2
def predict(
    artifact: ArtifactArgument,
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes to show per image.")] = 5,
    backbone_weights: BackboneWeightsOption = None,
    device: DeviceOption = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Also write the predictions here: a .csv (image, rank, class, probability) or a .json file."),
    ] = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Classify image files with a trained artifact: the top-k classes and their probabilities.

    Example: sa2vp predict runs/train/model photo1.png photo2.jpg -k 3 --output predictions.csv
    """
    from sa2vp.engine import load_artifact
    from sa2vp.engine import predict as classify
    from sa2vp.engine.report import PREDICTION_SUFFIXES, write_predictions
    from sa2vp.tracking import local_artifact

    if output is not None:
        if output.suffix not in PREDICTION_SUFFIXES:
            fail(f"--output {output}: expected a {' or '.join(PREDICTION_SUFFIXES)} file name")
        check_writable("--output", output)
    with local_artifact(artifact, lambda: _tracking_uri(tracking_uri)) as folder:
        loaded = load_artifact(folder, backbone_weights)
    predictions = classify(loaded, images, top_k, device)
    if output is not None:
        write_predictions(output, predictions)
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
    """Open the MLflow UI on the project's tracking store (tracking.uri), bound to 127.0.0.1.

    Example: sa2vp ui --port 5001
    """
    from sa2vp.tracking import is_server, serve_ui, server_page

    settings = settings_from(params, overrides)
    uri = settings.tracking.uri
    if is_server(uri):  # nothing to start: the server serves the UI itself
        typer.echo(
            f"tracking.uri={uri!r} is a tracking server, which serves the MLflow UI: "
            f"{server_page(uri, settings.tracking.experiment)}"
        )
        return

    def waiting(seconds: float) -> None:
        # The server takes tens of seconds to answer; its address is printed once it does.
        typer.echo(
            f"starting the MLflow UI for {uri} on 127.0.0.1:{port} …"
            if seconds < 1
            else f"still starting ({seconds:.0f} s) …",
            err=True,
        )

    def ready(page: str) -> None:
        typer.echo(f"MLflow UI for {uri}: {page}  (Ctrl-C stops it)")

    raise typer.Exit(serve_ui(uri, port, settings.tracking.experiment, on_ready=ready, on_waiting=waiting))


def _tracking_uri(given: str | None) -> str:
    """The store an artifact URI is read through: --tracking-uri, else the project's tracking.uri (params.yaml
    here if present, SA2VP_TRACKING__URI), as `sa2vp train` logged to it."""
    if given is not None:
        return given
    return settings_from(DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None, None).tracking.uri
