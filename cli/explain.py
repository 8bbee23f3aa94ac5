"""`sa2vp explain`: the paper's qualitative figures for a trained artifact (library: sa2vp.explain)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import check_writable, expected_errors_exit_2, fail

ArtifactsArgument = Annotated[
    Path, typer.Argument(help="The artifact folder `sa2vp train` wrote (<train.output>/model) or its model.json.")
]
ImagesArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Image files to explain (default: --n images of --split); with --tsne: more artifacts.", show_default=False
    ),
]


@expected_errors_exit_2
def explain(
    artifact: ArtifactsArgument,
    images: ImagesArgument = None,
    tsne: Annotated[
        bool,
        typer.Option(
            "--tsne",
            help="Only the t-SNE map of the pooled features, one panel per "
            "artifact given: sa2vp explain --tsne A1 A2 …",
        ),
    ] = False,
    split: Annotated[
        str,
        typer.Option(
            help="Split of the artifact's dataset to take images and the t-SNE "
            "points from: train, val, trainval or test."
        ),
    ] = "test",
    n: Annotated[
        int, typer.Option("--n", min=1, help="Images of --split to explain, one class after another (without IMAGES).")
    ] = 8,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers of the similarity maps, e.g. 0,6,11 (Swin: blocks "
            "of the cross stage); default: first, middle and last."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="The image token of the similarity maps as ROW,COLUMN of the "
            "token grid; default: the most salient one."
        ),
    ] = None,
    points: Annotated[
        int, typer.Option(min=3, help="Images of --split in the t-SNE map, at most (spread over the classes).")
    ] = 1000,
    seed: Annotated[int | None, typer.Option(help="t-SNE seed (default: the artifact's train.seed).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the PNGs; default: figures/ beside the artifact folder (its training's output folder)."
        ),
    ] = None,
    no_log: Annotated[
        bool, typer.Option("--no-log", help="Do not copy the figures into the artifact's MLflow run.")
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri", help="MLflow store of the artifact's run (default: the artifact's tracking.uri)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps (default: cpu).")] = None,
) -> None:
    """Draw what a trained model learned: SA²VP's prompt/image similarity maps (paper Fig. 5), Grad-CAM of the
    predicted class and a t-SNE map of the pooled features (Fig. 3); PNGs, also logged to the artifact's run.

    Example: sa2vp explain runs/final/model   |   sa2vp explain --tsne runs/a/model runs/b/model
    """
    from sa2vp.data import SPLITS

    if split not in SPLITS:
        fail(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if tsne and (layers is not None or token is not None):
        fail("--tsne draws only the t-SNE map; --layers and --token are for the similarity maps")
    chosen_layers = _parse_layers(layers)
    chosen_token = _parse_token(token)
    paths = [artifact, *(images or [])]
    folder = out if out is not None else _default_folder(artifact)
    where = _Where(folder, not no_log, tracking_uri, device)
    if tsne:
        _explain_tsne(paths, split, points, seed, where)
    else:
        _explain_one(artifact, images or [], split, n, chosen_layers, chosen_token, points, seed, where)


@dataclass(frozen=True)
class _Where:
    """Where the figures go (a folder; the artifacts' MLflow runs if `log`) and where the models run."""

    folder: Path
    log: bool
    tracking_uri: str | None
    device: str | None


def _default_folder(artifact: Path) -> Path:
    from sa2vp.engine.artifact import artifact_folder

    # Beside the artifact, not in it: the artifact folder is a pipeline's output (DVC would see it changed).
    return artifact_folder(artifact).resolve().parent / "figures"


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        fail(f"--layers {text!r}: expected layer indices separated by commas, e.g. 0,6,11")
    return values


def _parse_token(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        row, column = (int(part) for part in text.split(","))
    except ValueError:
        fail(f"--token {text!r}: expected ROW,COLUMN of the token grid, e.g. 3,4")
    return row, column


def _load(path: Path, device: str | None) -> Any:
    from sa2vp.engine import load_artifact
    from sa2vp.engine.runtime import resolve_device

    loaded = load_artifact(path)
    loaded.model.to(resolve_device(device or "cpu")).eval()
    return loaded


def _explain_one(
    artifact: Path,
    images: list[Path],
    split: str,
    n: int,
    layers: list[int] | None,
    token: tuple[int, int] | None,
    points: int,
    seed: int | None,
    where: _Where,
) -> None:
    from sa2vp.explain import explain, file_images, split_images

    loaded = _load(artifact, where.device)
    check_writable("--out", where.folder, folder=True)
    batch = file_images(loaded, images) if images else split_images(loaded, split, n)
    explained = explain(
        loaded, batch, layers, token, split, points, seed, similarity_required=layers is not None or token is not None
    )
    _finish(explained.figures, explained.notes, [loaded], where)


def _explain_tsne(
    paths: list[Path],
    split: str,
    points: int,
    seed: int | None,
    where: _Where,
) -> None:
    from sa2vp.explain import split_features, tsne_figure

    loaded = [_load(path, where.device) for path in paths]
    check_writable("--out", where.folder, folder=True)
    panels = [split_features(item, split, points) for item in loaded]
    figure = tsne_figure(panels, loaded[0].settings.train.seed if seed is None else seed)
    name = "tsne.png" if len(paths) == 1 else "tsne_comparison.png"
    _finish({name: figure}, [], loaded, where)


def _finish(figures: dict[str, Any], notes: list[str], loaded: list[Any], where: _Where) -> None:
    """Write the figures (only now, when every one of them could be drawn), then copy them to each run."""
    from sa2vp.explain import log_figures, write_figures

    for note in notes:
        typer.echo(note)
    files = write_figures(figures, where.folder)
    for path in files:
        typer.echo(f"wrote {path}")
    if where.log:
        for item in loaded:
            typer.echo(log_figures(item.record, files, where.tracking_uri))
