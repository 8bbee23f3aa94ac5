"""What a trained model learned, in pictures: the paper's qualitative figures (Fig. 3–5) for any artifact.

    loaded = load_artifact("runs/final/model")
    batch = split_images(loaded, "test", 8)             # or file_images(loaded, [paths])
    explained = explain(loaded, batch)                  # {file name: matplotlib Figure}, and notes on what was skipped
    files = write_figures(explained.figures, folder)    # PNGs, each written atomically
    log_figures(loaded.record, files)                   # copies in the artifact's own MLflow run, figures/explain/

- similarity.png (Fig. 5, SA²VP only): for each image, the cosine similarity between one image token of the base
  pathway and every token of the prompt pathway at a few layers (`similarity_maps` of SA2VPViT / SA2VPSwin,
  where the maths lives), over the image. The default token is the model's `salient_tokens`: on ViT the patch
  the CLS token attends to most in the last layer, on Swin the peak of the predicted class's CAM.
- cam.png (Fig. 4's question, "where does the model look"): Grad-CAM of the predicted class (Captum's
  `LayerGradCam`) on the token grid of the last layer — for ViT the tokens entering the last block (a CLS readout
  takes nothing from the patch tokens after it), for Swin the last stage; for SA²VP the base pathway, which is
  the one it predicts with.
- tsne.png (Fig. 3): t-SNE (scikit-learn) of the pooled last-layer features — what the head reads — of a split,
  coloured by class; one panel per artifact (`tsne_figure` of several: `sa2vp explain --tsne A1 A2 …`).

Figures are drawn headless (Agg) at fixed sizes; images are chosen without randomness and t-SNE is seeded and
single-threaded, so two runs write the same PNG bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import sa2vp.figures  # noqa: F401  (selects matplotlib's headless backend before pyplot is imported)
from sa2vp.data import SPLITS, build_transform, load_image, load_split, split_dir
from sa2vp.engine.artifact import ArtifactRecord, LoadedArtifact
from sa2vp.engine.evaluation import check_same_data
from sa2vp.errors import ArtifactError, one_line
from sa2vp.figures import save_figure
from sa2vp.models import AdaptedModel, SA2VPSwin, SA2VPViT
from sa2vp.models.backbones import token_grid
from sa2vp.models.base import BackboneClassifier
from sa2vp.models.sa2vp_core import SimilarityMaps, check_layers, token_rows

log = logging.getLogger("sa2vp.explain")

FIGURES_PATH = "figures/explain"  # where the PNGs go in the artifact's MLflow run
DEFAULT_IMAGES = 8
DEFAULT_POINTS = 1000  # t-SNE: at most this many images of the split, spread over the classes
PANEL = 1.9  # inches per image panel
SIMILARITY_RANGE = (-1.0, 1.0)  # cosine similarity: one colour scale for every panel, so layers compare


# --- images --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageBatch:
    """Images as the model takes them, and what a figure says about each."""

    tensors: torch.Tensor  # (N, 3, H, W), resized and normalised by the artifact's own transform
    labels: list[int | None]  # true class index; None for a user's own file
    names: list[str]

    def pictures(self, data_config: dict[str, Any]) -> np.ndarray:
        """(N, H, W, 3) in [0, 1]: what the model saw, normalisation undone, for drawing."""
        mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        return (self.tensors.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def spread_by_class(targets: Sequence[int], n: int) -> list[int]:
    """Up to `n` indices taking each class in turn (its first image, then its second, …), in split order: as
    many classes as possible, and the same images every time."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        chosen += [q[rank] for q in queues if rank < len(q)][: n - len(chosen)]
        if len(chosen) == n:
            break
    return chosen


def _split_dataset(loaded: LoadedArtifact, split: str) -> Any:
    if split not in SPLITS:
        raise ArtifactError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    folder = split_dir(loaded.settings.data)
    check_same_data(folder, loaded)  # another dataset's images would be explained with this model's classes
    return load_split(folder, split, loaded.data_config, train=False, style=loaded.record.transform)


def split_images(loaded: LoadedArtifact, split: str = "test", n: int = DEFAULT_IMAGES) -> ImageBatch:
    """`n` images of a split of the artifact's dataset, one class after another (`spread_by_class`)."""
    dataset = _split_dataset(loaded, split)
    indices = spread_by_class(dataset.targets, n)
    if not indices:
        raise ArtifactError(f"split {split!r} of {dataset.root} holds no images")
    items = [dataset[i] for i in indices]
    return ImageBatch(
        torch.stack([image for image, _ in items]),
        [label for _, label in items],
        [dataset.path(i).name for i in indices],
    )


def file_images(loaded: LoadedArtifact, paths: Sequence[Path]) -> ImageBatch:
    """A user's image files, through the artifact's eval transform (a missing file: ArtifactError)."""
    for path in paths:
        if not Path(path).is_file():
            raise ArtifactError(f"{path}: no such image file")
    transform = build_transform(loaded.data_config, loaded.record.transform, train=False)
    tensors = torch.stack([transform(load_image(Path(path))) for path in paths])
    return ImageBatch(tensors, [None] * len(paths), [Path(path).name for path in paths])


# --- what the model computes -------------------------------------------------------------------------------


def is_sa2vp(model: nn.Module) -> TypeGuard[SA2VPViT | SA2VPSwin]:
    return isinstance(model, (SA2VPViT, SA2VPSwin))


def default_layers(count: int) -> list[int]:
    """First, middle and last layer."""
    return sorted({0, count // 2, count - 1})


def predicting_forward(model: AdaptedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits the model predicts with, through its head exactly once (SA²VP's eval forward also reads the
    prompt pathway out; a linear probe's forward shuts off gradients, which the CAM needs)."""
    if is_sa2vp(model):
        return model.base_logits
    if isinstance(model, BackboneClassifier):
        return lambda images: model.head(model.features(images))
    return model


def similarity(
    model: AdaptedModel, images: ImageBatch, layers: list[int], token: tuple[int, int] | None = None
) -> SimilarityMaps:
    """`similarity_maps` of an SA²VP model; ArtifactError for another method, a bad layer or token."""
    if not is_sa2vp(model):
        raise ArtifactError(
            "similarity maps are SA²VP's (its prompt pathway against the image's); this model has "
            "no prompt pathway — its CAM and t-SNE figures work for every method"
        )
    try:
        check_layers(layers, model.num_layers)
        if token is not None:
            token_rows(token, 1, model.similarity_grid)
    except ValueError as exc:
        what = "--token" if token is not None and "token" in str(exc) else "--layers"
        raise ArtifactError(f"{what}: {exc}") from None
    with torch.inference_mode():
        return model.similarity_maps(images.tensors, layers, token)


class _GridTap(nn.Module):
    """The identity on a token tensor that routes its patch tokens through `view`, an (B, C, h, w) image of them:
    the layer Grad-CAM attributes to (it averages gradients over dims 2…, reading dim 1 as channels)."""

    def __init__(self, grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.grid = grid  # None: tokens already on their grid, (B, H, W, C) as in timm's Swin
        self.view = nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return self.view(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        count = self.grid[0] * self.grid[1]  # patch tokens come last, after CLS (and VPT's prompts)
        patches = tokens[:, -count:].transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return torch.cat([tokens[:, :-count], self.view(patches).flatten(2).transpose(1, 2)], dim=1)


@contextmanager
def _cam_tap(model: AdaptedModel) -> Iterator[tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]]:
    """(forward, layer) for Grad-CAM: the predicting forward with the last layer's tokens routed through a tap."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    backbone = model.backbone
    if isinstance(model, SA2VPViT):  # its blocks run inside `_run_blocks`, not through their forward: its trace
        if model.num_layers < 2:
            raise ArtifactError("Grad-CAM reads the tokens entering the last layer: this SA²VP model has one layer")
        tap, last = _GridTap(model.grid), model.num_layers - 2

        def trace(i: int, base: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (tap(base), prompt) if i == last else (base, prompt)

        yield (lambda images: model.base_logits(images, trace)), tap.view
        return
    if isinstance(backbone, SwinTransformer):  # average pooling: the last stage, as it enters the final norm
        tap = _GridTap(None)
        handle = backbone.norm.register_forward_pre_hook(lambda module, args: (tap(args[0]), *args[1:]))
    elif isinstance(backbone, VisionTransformer):  # CLS readout: the tokens entering the last block
        tap = _GridTap(token_grid(backbone))
        handle = backbone.blocks[-1].register_forward_pre_hook(lambda module, args: (tap(args[0]), *args[1:]))
    else:
        raise ArtifactError(f"Grad-CAM supports ViT and Swin backbones, not {type(backbone).__name__}")
    try:
        yield predicting_forward(model), tap.view
    finally:
        handle.remove()


@dataclass(frozen=True)
class ClassActivation:
    maps: torch.Tensor  # (B, h, w) in [0, 1]: Grad-CAM of the predicted class, each image scaled to its maximum
    predicted: list[int]
    confidence: list[float]  # the predicted class's probability


def class_activation_maps(model: AdaptedModel, images: torch.Tensor) -> ClassActivation:
    """Grad-CAM (Captum's LayerGradCam, ReLU'd as in the paper by Selvaraju et al.) of each image's predicted
    class on the last layer's token grid."""
    from captum.attr import LayerGradCam

    with _cam_tap(model) as (forward, layer):
        with torch.no_grad():
            probabilities = forward(images).float().softmax(dim=-1)
        predicted = probabilities.argmax(dim=-1)
        cam = LayerGradCam(forward, layer).attribute(images, target=predicted, relu_attributions=True)
    cam = cam.detach()[:, 0].float()
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(cam.dtype).tiny)
    return ClassActivation(
        cam / peak[:, None, None], predicted.tolist(), probabilities.gather(1, predicted[:, None])[:, 0].tolist()
    )


def pooled_features(model: AdaptedModel, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """(N, D): what the head reads — the pooled last-layer feature of the pathway the model predicts with."""
    forward, captured = predicting_forward(model), []
    device = next(model.parameters()).device
    handle = model.head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().cpu()))
    try:
        with torch.inference_mode():
            for images in batches:
                forward(images.to(device))
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


def split_features(loaded: LoadedArtifact, split: str, points: int = DEFAULT_POINTS) -> TsnePanel:
    """Pooled features of up to `points` images of a split (`spread_by_class`), for a t-SNE panel."""
    dataset = _split_dataset(loaded, split)
    indices = spread_by_class(dataset.targets, points)
    size = loaded.settings.train.eval_batch_size
    batches = (
        torch.stack([dataset[i][0] for i in indices[start : start + size]]) for start in range(0, len(indices), size)
    )
    features = pooled_features(loaded.model, batches)
    name = loaded.record.dataset.name or "dataset"
    return TsnePanel(
        method_label(loaded),
        f"{name} {split}, {len(indices)} images",
        features,
        [dataset.targets[i] for i in indices],
        loaded.classes,
    )


def tsne_points(features: np.ndarray, seed: int) -> np.ndarray:
    """(N, 2) t-SNE of `features`: seeded, PCA-initialised, perplexity clipped to the sample count, on one
    thread (Barnes–Hut's parallel sums are not in a fixed order)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    count = len(features)
    if count < 3:
        raise ArtifactError(f"t-SNE needs at least 3 images, got {count}")
    perplexity = min(30.0, (count - 1) / 3)
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1).fit_transform(
            features.astype(np.float64)
        )


# --- figures --------------------------------------------------------------------------------------------------


def method_label(loaded: LoadedArtifact) -> str:
    """The method as the paper's figures name it; SA²VP with its window (the global variant is Tab. 5's)."""
    model = loaded.settings.model
    if model.method != "sa2vp":
        return model.method
    return (
        "SA²VP, global attention" if model.sa2vp.window_size is None else f"SA²VP, window c={model.sa2vp.window_size}"
    )


def _imshow(axes: Any, picture: np.ndarray) -> None:
    # Small images (16 px digits) are shown as their pixels, not blurred.
    axes.imshow(picture, interpolation="nearest" if picture.shape[0] < 64 else "antialiased")
    axes.set_xticks([])
    axes.set_yticks([])


def _overlay(
    axes: Any,
    picture: np.ndarray,
    values: np.ndarray,
    cmap: str,
    limits: tuple[float, float],
    alpha: float | np.ndarray,
) -> Any:
    """`picture` in grey under a token grid of `values`, each token a cell over the pixels it covers."""
    height, width = picture.shape[:2]
    _imshow(axes, picture.mean(axis=2, keepdims=True).repeat(3, axis=2))
    # imshow puts pixel centres on integers: the image spans −0.5 … size − 0.5, and so must the grid.
    return axes.imshow(
        values,
        cmap=cmap,
        vmin=limits[0],
        vmax=limits[1],
        alpha=alpha,
        interpolation="nearest",
        extent=(-0.5, width - 0.5, height - 0.5, -0.5),
    )


def _mark_cell(
    axes: Any, row: int, column: int, grid: tuple[int, int], size: tuple[int, int], colour: str, style: str = "-"
) -> None:
    """Outline one token's cell of `grid` on an image of `size` (H, W) pixels."""
    from matplotlib.patches import Rectangle

    cell_h, cell_w = size[0] / grid[0], size[1] / grid[1]
    axes.add_patch(
        Rectangle(
            (column * cell_w - 0.5, row * cell_h - 0.5),
            cell_w,
            cell_h,
            fill=False,
            edgecolor=colour,
            linewidth=2.0,
            linestyle=style,
        )
    )


def _caption(
    labels: list[int | None], names: list[str], classes: list[str], index: int, predicted: list[int] | None = None
) -> str:
    true = labels[index]
    parts = [names[index] if true is None else f"true {classes[true]}"]
    if predicted is not None:
        parts.append(f"pred {classes[predicted[index]]}")
    return " · ".join(parts)


def _title(figure: Any, title: str, note: str) -> None:
    """A title line and a note wrapped to the figure's width."""
    import textwrap

    width = max(40, int(figure.get_size_inches()[0] * 14))  # characters of a 9-point line
    figure.suptitle(title + "\n" + textwrap.fill(note, width), fontsize=9)


def similarity_figure(
    maps: SimilarityMaps, batch: ImageBatch, pictures: np.ndarray, classes: list[str], title: str, token_note: str
) -> Any:
    """One row per image: the image with its chosen token outlined, then the similarity map at each layer (the
    token outlined in red, the map's peak dashed in white). One colour scale, cosine −1…1, for every panel."""
    rows, columns = len(pictures), 1 + len(maps.layers)
    figure, grid = plt.subplots(
        rows, columns, figsize=(PANEL * columns + 1.2, PANEL * rows + 1.0), squeeze=False, layout="constrained"
    )
    size = pictures.shape[1:3]
    image = None
    for r in range(rows):
        _imshow(grid[r, 0], pictures[r])
        row, column = maps.tokens[0][r].tolist()
        map_rows, map_columns = maps.maps[0].shape[1:]
        _mark_cell(grid[r, 0], row, column, (map_rows, map_columns), size, "red")
        grid[r, 0].set_ylabel(_caption(batch.labels, batch.names, classes, r), fontsize=9)
        for c in range(1, columns):
            values = maps.maps[c - 1][r].float().cpu().numpy()
            image = _overlay(grid[r, c], pictures[r], values, "coolwarm", SIMILARITY_RANGE, 0.8)
            row, column = maps.tokens[c - 1][r].tolist()
            _mark_cell(grid[r, c], row, column, values.shape, size, "red")
            peak = np.unravel_index(int(values.argmax()), values.shape)
            _mark_cell(grid[r, c], int(peak[0]), int(peak[1]), values.shape, size, "white", "--")
    grid[0, 0].set_title("image and token", fontsize=9)
    for c, layer in enumerate(maps.layers, start=1):
        grid[0, c].set_title(f"layer {layer}", fontsize=9)
    for axes in grid.flat:
        axes.set_label("panel")
    assert image is not None  # every map has at least one layer: check_layers refuses an empty list
    figure.colorbar(image, ax=grid, shrink=min(0.6, 3.0 / rows), label="cosine similarity")
    _title(
        figure,
        title,
        f"Each map: the cosine similarity between one image token of the base pathway (red: "
        f"{token_note}) and every token of the prompt pathway after that layer; white dashes: the "
        "most similar prompt token. A map that peaks at and around the red token shows spatial alignment "
        "(paper Fig. 5; compare the global variant).",
    )
    return figure


def cam_figure(cam: ClassActivation, batch: ImageBatch, pictures: np.ndarray, classes: list[str], title: str) -> Any:
    """Two rows: the images (true and predicted class, its probability) and their Grad-CAM of the predicted
    class, the colour more opaque where the map is higher."""
    columns = len(pictures)
    figure, grid = plt.subplots(
        2, columns, figsize=(PANEL * columns + 1.2, 2 * PANEL + 1.2), squeeze=False, layout="constrained"
    )
    image = None
    for c in range(columns):
        _imshow(grid[0, c], pictures[c])
        grid[0, c].set_title(
            _caption(batch.labels, batch.names, classes, c, cam.predicted) + f"\np = {cam.confidence[c]:.2f}",
            fontsize=8,
        )
        values = cam.maps[c].cpu().numpy()
        image = _overlay(grid[1, c], pictures[c], values, "inferno", (0.0, 1.0), 0.25 + 0.65 * values)
    grid[0, 0].set_ylabel("image", fontsize=9)
    grid[1, 0].set_ylabel("Grad-CAM", fontsize=9)
    for axes in grid.flat:
        axes.set_label("panel")
    assert image is not None  # a batch holds at least one image
    figure.colorbar(image, ax=grid[1, :], shrink=0.9, label="share of the peak")
    _title(
        figure,
        title,
        "Grad-CAM of the predicted class on the last layer's token grid: where the evidence for "
        "it lies (each image scaled to its own peak).",
    )
    return figure


@dataclass(frozen=True)
class TsnePanel:
    title: str
    subtitle: str
    features: np.ndarray  # (N, D)
    labels: list[int]
    classes: list[str]


def tsne_figure(panels: Sequence[TsnePanel], seed: int) -> Any:
    """Fig. 3: one t-SNE map per artifact, points coloured by true class (a legend for up to 20 classes)."""
    figure, grid = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6), squeeze=False, layout="constrained")
    for axes, panel in zip(grid[0], panels, strict=True):
        points = tsne_points(panel.features, seed)
        labels = np.asarray(panel.labels)
        cmap = plt.get_cmap("tab10" if len(panel.classes) <= 10 else "tab20" if len(panel.classes) <= 20 else "turbo")
        for index, name in enumerate(panel.classes):
            chosen = labels == index
            if chosen.any():
                colour = cmap(index if len(panel.classes) <= 20 else index / max(1, len(panel.classes) - 1))
                axes.scatter(points[chosen, 0], points[chosen, 1], s=9, color=colour, label=name, linewidths=0)
        if len(panel.classes) <= 20:
            axes.legend(
                fontsize=7,
                markerscale=1.8,
                loc="center left",
                bbox_to_anchor=(1.0, 0.5),
                ncols=2 if len(panel.classes) > 10 else 1,
                title="class",
                title_fontsize=7,
                frameon=False,
            )
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(f"{panel.title}\n{panel.subtitle}", fontsize=10)
        axes.set_label("panel")
    _title(
        figure,
        "t-SNE of the pooled last-layer features",
        "what the head reads; one point per image, coloured by its true class",
    )
    return figure


# --- one artifact, end to end --------------------------------------------------------------------------------


@dataclass
class Explanation:
    figures: dict[str, Any] = field(default_factory=dict)  # file name → matplotlib Figure
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def explain(
    loaded: LoadedArtifact,
    batch: ImageBatch,
    layers: list[int] | None = None,
    token: tuple[int, int] | None = None,
    split: str = "test",
    points: int = DEFAULT_POINTS,
    seed: int | None = None,
    similarity_required: bool = False,
) -> Explanation:
    """Every figure of one artifact: similarity maps (SA²VP; else skipped with a note, or an ArtifactError when
    `similarity_required`), Grad-CAM of `batch`, and the t-SNE map of `split` (None: no t-SNE)."""
    model, result = loaded.model.eval(), Explanation()
    pictures = batch.pictures(loaded.data_config)
    batch = ImageBatch(batch.tensors.to(next(model.parameters()).device), batch.labels, batch.names)
    label = method_label(loaded)
    if is_sa2vp(model):
        chosen = layers if layers is not None else default_layers(model.num_layers)
        maps = similarity(model, batch, chosen, token)
        where = (
            f"the token at row {token[0]}, column {token[1]}"
            if token is not None
            else (
                "the patch the CLS token attends to most in the last layer"
                if isinstance(model, SA2VPViT)
                else "where the predicted class's CAM peaks"
            )
        )
        result.figures["similarity.png"] = similarity_figure(
            maps, batch, pictures, loaded.classes, f"{label}: prompt tokens against an image token", where
        )
    elif similarity_required:
        similarity(model, batch, layers or [0], token)  # raises: not SA²VP
    else:
        result.notes.append(
            f"similarity maps skipped: a {loaded.settings.model.method} model has no prompt pathway (they are SA²VP's)"
        )
    cam = class_activation_maps(model, batch.tensors)
    result.figures["cam.png"] = cam_figure(cam, batch, pictures, loaded.classes, f"{label}: where it looks")
    if split is not None:
        panel = split_features(loaded, split, points)
        result.figures["tsne.png"] = tsne_figure([panel], loaded.settings.train.seed if seed is None else seed)
    return result


def write_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    """Each figure as folder/<name>, written atomically (and closed)."""
    return [save_figure(figure, Path(folder) / name) for name, figure in figures.items()]


def log_figures(record: ArtifactRecord, files: Sequence[Path], tracking_uri: str | None = None) -> str:
    """Copy `files` into the artifact's own MLflow run under figures/explain/; returns a line that says where,
    or why not (no run recorded, the store or the run is not there). Never raises: the files are the product."""
    from mlflow.exceptions import MlflowException

    from sa2vp.tracking import existing_run

    run_id = record.training.mlflow_run_id if record.training is not None else None
    if run_id is None:
        return "not logged to MLflow: the artifact records no MLflow run (trained with tracking disabled)"
    given = tracking_uri or record.settings.tracking.uri
    source = "--tracking-uri" if tracking_uri else "the artifact's tracking.uri"
    try:
        run = existing_run(given, run_id)
        for path in files:
            run.log_file(path, FIGURES_PATH)
    except FileNotFoundError as exc:  # MLflow would have created an empty store there
        return (
            f"not logged to MLflow: {source} {given!r} names {exc.filename}, which does not "
            "exist (run from the project folder, or pass --tracking-uri)"
        )
    except (MlflowException, OSError) as exc:
        return f"not logged to MLflow: run {run_id} in {given!r} ({source}): {one_line(exc)}"
    return f"logged to MLflow run {run_id} in {given}, under {FIGURES_PATH}/"
