"""Materialise the frozen backbone's weights as one safetensors file: downloaded, or pretrained offline.

`materialise_backbone` writes the file that `backbone.weights: <path>.safetensors` later loads. For
`backbone.origin: hub` it is timm's checkpoint of `backbone.name`. For `backbone.origin: synthetic` (the
offline default) it is the same architecture pretrained from scratch on a *generated source task*:

The source task is glyph classification. Each class is a random glyph prototype — one to a few strokes
(straight lines, circular/elliptic arcs and rings, smooth curves, corners), often joined end to side the way
handwriting joins strokes — and each image is a fresh rendering of its class' prototype under a random
affine transform, a smooth elastic warp, random stroke thickness, edge softness, ink level and pixel noise:
light strokes on a dark background, grey, centred and filling the frame. Telling many such glyph classes
apart needs features for stroke orientation, curvature, junctions, endings, loops and their layout — the
vocabulary of small glyph-like images — while the classes themselves are arbitrary: no digit, font or
target image is ever drawn or read. It plays the role ImageNet-21k pretraining plays for the published
backbones: a large, generic, labelled source task whose features the target task can reuse frozen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from sa2vp.atomic import atomic_path
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.errors import BackboneError
from sa2vp.settings import BackboneSettings, PretrainSettings

# Points sampled along every stroke; a stroke is rendered as the polyline through them.
POINTS_PER_STROKE = 12
# Side of the square a prototype is scaled to, in canvas units (the canvas spans [-1, 1]): glyphs fill
# most of the frame with a margin, as scanned characters normalised to their box do.
GLYPH_EXTENT = 1.5
# Independent random streams of one seed: class prototypes, training renderings (one per epoch), held-out ones.
_PROTOTYPES, _TRAIN, _HELD_OUT = 0, 1, 2
# Images rendered at once (bounds the memory of the pixel × segment distance table).
_RENDER_CHUNK = 1024
_GRAD_CLIP = 1.0


# --------------------------------------------------------------------------------------------------- source task


@dataclass(frozen=True)
class GlyphTask:
    """The class prototypes of the generated source task: polylines (classes, strokes, points, 2) in canvas
    coordinates, and which strokes each class has (classes, strokes)."""

    strokes: np.ndarray
    present: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.strokes.shape[0])


def make_task(settings: PretrainSettings) -> GlyphTask:
    """The `settings.classes` glyph prototypes for `settings.seed` (the same seed gives the same classes)."""
    rng = _rng(settings.seed, _PROTOTYPES)
    strokes = np.zeros((settings.classes, settings.max_strokes, POINTS_PER_STROKE, 2))
    present = np.zeros((settings.classes, settings.max_strokes), dtype=bool)
    for index in range(settings.classes):
        glyph = _prototype(rng, settings.max_strokes)
        strokes[index, : len(glyph)] = glyph
        present[index, : len(glyph)] = True
    return GlyphTask(strokes, present)


def render_images(task: GlyphTask, labels: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random rendering of each label's prototype: (N, size, size) float ink in [0, 1]."""
    count = len(labels)
    points = torch.from_numpy(_deform(task.strokes[labels], rng)).float()
    present = torch.from_numpy(task.present[labels])
    # Per image: stroke half-width, edge softness, ink level, background level and pixel noise (canvas units;
    # one pixel is 2 / size). The ranges cover thin sharp pen strokes to thick strokes blurred by upscaling.
    half_width, softness, ink, background, noise = (
        torch.from_numpy(values).float().view(-1, 1, 1)
        for values in (
            rng.uniform(0.08, 0.24, count),
            rng.uniform(0.04, 0.2, count),
            rng.uniform(0.6, 1.0, count),
            rng.uniform(0.0, 0.1, count) * rng.random(count),
            rng.uniform(0.0, 0.06, count),
        )
    )
    grain = torch.from_numpy(rng.standard_normal((count, size, size))).float()
    images = torch.empty(count, size, size)
    for start in range(0, count, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        distance = _stroke_distance(points[part], present[part], size)
        edge = ((half_width[part] + softness[part] - distance) / (2 * softness[part])).clamp(0, 1)
        coverage = edge * edge * (3 - 2 * edge)  # smoothstep: a soft, rounded stroke edge
        level = background[part] + (ink[part] - background[part]) * coverage
        images[part] = (level + noise[part] * grain[part]).clamp(0, 1)
    return images


def generate(task: GlyphTask, per_class: int, size: int, seed: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` renderings of every class, shuffled: ink images (N, size, size) and labels (N,)."""
    rng = _rng(seed, stream)
    labels = rng.permutation(np.repeat(np.arange(task.num_classes), per_class))
    return render_images(task, labels, size, rng), torch.from_numpy(labels).long()


def normalise(ink: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Grey ink images (N, H, W) in [0, 1] → the backbone's normalised RGB input (N, 3, H, W)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (ink.unsqueeze(1).expand(-1, len(mean), -1, -1) - mean_t) / std_t


def input_geometry(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the model's input. The side is the model's own: timm's data config keeps the
    pretrained configuration's input size even when the model was built with another `img_size`."""
    config = timm.data.resolve_data_config(model=model)
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else config["input_size"][1:]
    if size[0] != size[1]:
        raise BackboneError(f"the source task renders square images; the backbone's input is {tuple(size)}")
    return int(size[0]), tuple(config["mean"]), tuple(config["std"])


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _prototype(rng: np.random.Generator, max_strokes: int) -> np.ndarray:
    """One glyph: 1..max_strokes strokes, later ones often starting on an earlier one, scaled to the frame."""
    count = int(rng.integers(1, max_strokes + 1))
    strokes: list[np.ndarray] = []
    for _ in range(count):
        stroke = _PRIMITIVES[int(rng.integers(len(_PRIMITIVES)))](rng)
        if strokes and rng.random() < 0.6:  # join: handwriting rarely leaves strokes floating apart
            anchor = strokes[int(rng.integers(len(strokes)))][int(rng.integers(POINTS_PER_STROKE))]
            stroke = stroke - stroke[0] + anchor
        strokes.append(stroke)
    glyph = np.stack(strokes)
    low, high = glyph.reshape(-1, 2).min(0), glyph.reshape(-1, 2).max(0)
    return (glyph - (low + high) / 2) * (GLYPH_EXTENT / max(float((high - low).max()), 1e-6))


def _line(rng: np.random.Generator) -> np.ndarray:
    start, end = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
    return start + np.linspace(0, 1, POINTS_PER_STROKE)[:, None] * (end - start)


def _arc(rng: np.random.Generator) -> np.ndarray:
    # Sweeps from a quarter turn to a closed ring (one in four): bowls, hooks, loops.
    sweep = 2 * math.pi if rng.random() < 0.25 else rng.uniform(0.5 * math.pi, 1.8 * math.pi)
    angles = rng.uniform(0, 2 * math.pi) + np.linspace(0, sweep, POINTS_PER_STROKE) * rng.choice([-1, 1])
    radii = rng.uniform(0.3, 0.8, 2)
    return rng.uniform(-0.3, 0.3, 2) + radii * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _curve(rng: np.random.Generator) -> np.ndarray:
    a, b, c = rng.uniform(-1, 1, (3, 2))
    t = np.linspace(0, 1, POINTS_PER_STROKE)[:, None]
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c  # quadratic Bézier


def _corner(rng: np.random.Generator) -> np.ndarray:
    a, b, c = rng.uniform(-1, 1, (3, 2))
    t = np.linspace(0, 2, POINTS_PER_STROKE)[:, None]
    return np.where(t <= 1, a + t * (b - a), b + (t - 1) * (c - b))


_PRIMITIVES = (_line, _arc, _curve, _corner)


def _deform(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random affine transform and smooth elastic warp per image: points (N, S, P, 2) → same shape."""
    count = len(points)
    angle = rng.uniform(-0.3, 0.3, count)
    scale = rng.uniform(0.8, 1.1, count)[:, None] * np.exp(rng.uniform(-0.15, 0.15, (count, 2)))
    shear = rng.uniform(-0.25, 0.25, count)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.broadcast_to(np.eye(2), (count, 2, 2)).copy()
    shearing[:, 0, 1] = shear
    matrix = rotation @ shearing * scale[:, None, :]
    warped = np.einsum("nij,nspj->nspi", matrix, points)
    # Elastic warp: a sum of two random low-frequency sine waves displaces each point (wobbly strokes).
    for _ in range(2):
        frequency = rng.normal(0, 1.5, (count, 1, 1, 2))
        phase = rng.uniform(0, 2 * math.pi, (count, 1, 1, 1))
        amplitude = rng.normal(0, 0.05, (count, 1, 1, 2))
        warped = warped + amplitude * np.sin((warped * frequency).sum(-1, keepdims=True) + phase)
    return warped + rng.uniform(-0.12, 0.12, (count, 1, 1, 2))


def _stroke_distance(points: torch.Tensor, present: torch.Tensor, size: int) -> torch.Tensor:
    """Distance of every pixel centre to the nearest stroke segment: (N, S, P, 2) → (N, size, size)."""
    coords = (torch.arange(size, dtype=points.dtype) + 0.5) * (2 / size) - 1  # pixel centres, x right, y down
    pixel_y, pixel_x = (c.reshape(1, -1, 1) for c in torch.meshgrid(coords, coords, indexing="ij"))
    start, end = points[:, :, :-1].flatten(1, 2), points[:, :, 1:].flatten(1, 2)  # (N, segments, 2)
    start_x, start_y = (c.unsqueeze(1) for c in start.unbind(-1))
    dir_x, dir_y = (c.unsqueeze(1) for c in (end - start).unbind(-1))
    # Components rather than stacked vectors, updated in place: this table is the generator's whole cost.
    off_x, off_y = pixel_x - start_x, pixel_y - start_y  # (N, pixels, segments)
    t = ((off_x * dir_x + off_y * dir_y) / (dir_x * dir_x + dir_y * dir_y).clamp_min(1e-12)).clamp_(0, 1)
    off_x.sub_(t * dir_x).square_()
    off_y.sub_(t * dir_y).square_()
    squared = off_x.add_(off_y)
    valid = present[:, :, None].expand(-1, -1, points.shape[2] - 1).flatten(1)
    squared.masked_fill_(~valid.unsqueeze(1), math.inf)
    return squared.amin(-1).sqrt().view(-1, size, size)


# --------------------------------------------------------------------------------------------------- pretraining


@dataclass
class Pretrained:
    """A backbone pretrained on the source task (classifier removed, eval mode) and its held-out accuracy."""

    model: nn.Module
    source_accuracy: float


def pretrain(settings: BackboneSettings, progress: Progress = NO_PROGRESS) -> Pretrained:
    """Train `settings.name` from scratch (all weights, with a temporary linear head) on the glyph task, then
    measure its accuracy on held-out renderings."""
    config = settings.pretrain
    task = make_task(config)
    with _torch_threads(config.threads):
        # Seeded initialisation and patch dropout, without resetting the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = _build(settings, num_classes=task.num_classes, patch_drop=config.patch_drop)
            size, mean, std = input_geometry(model)
            _train(model, task, config, lambda ink: normalise(ink, mean, std), size, progress)
        if config.patch_drop > 0:
            model.patch_drop = nn.Identity()  # as built without patch dropout: the backbone sees every token
        held_out, labels = generate(task, config.eval_images_per_class, size, config.seed, _HELD_OUT)
        accuracy = accuracy_on(model, normalise(held_out, mean, std), labels)
    model.reset_classifier(0)
    return Pretrained(model.eval(), accuracy)


def pretrain_backbone(settings: BackboneSettings, progress: Progress = NO_PROGRESS) -> nn.Module:
    """The backbone pretrained on the generated source task, classifier removed, in eval mode."""
    return pretrain(settings, progress).model


def accuracy_on(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of a classifier on normalised images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` (None: left as it is) for the block, then restored."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build(settings: BackboneSettings, num_classes: int, patch_drop: float) -> nn.Module:
    kwargs: dict[str, Any] = {**settings.model_kwargs, "num_classes": num_classes}
    if patch_drop > 0:
        kwargs["patch_drop_rate"] = patch_drop
    if settings.img_size is not None:
        kwargs["img_size"] = settings.img_size
    try:
        return timm.create_model(settings.name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise BackboneError(f"backbone: cannot build {settings.name!r} with {kwargs}: {exc}") from exc


def _train(
    model: nn.Module,
    task: GlyphTask,
    config: PretrainSettings,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    progress: Progress,
) -> None:
    per_epoch = task.num_classes * config.images_per_class
    steps_per_epoch = math.ceil(per_epoch / config.batch_size)
    total = config.epochs * steps_per_epoch
    # beta2 0.95 rather than 0.999: the second-moment estimate keeps up with the fast-changing gradients of a
    # short run from scratch (measured: clearly better source and probe accuracy for the same steps).
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    warmup = round(config.warmup_epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_hold_cooldown(warmup, total, config.cooldown))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    description = f"pretraining on {config.epochs} × {per_epoch:,} generated glyphs"
    with progress(description, total, "steps") as advance:
        for epoch in range(config.epochs):
            for ink, labels in _epoch(task, config, size, epoch):
                loss = loss_fn(model(to_input(ink)), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)  # steadies the first steps from scratch
                optimizer.step()
                schedule.step()
                advance(1)


def _epoch(
    task: GlyphTask, config: PretrainSettings, size: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of class-balanced batches, rendered batch by batch: every epoch sees new renderings (the
    source task is unlimited, like a large pretraining set) and memory stays that of one batch."""
    rng = _rng(config.seed, _TRAIN, epoch)
    labels = rng.permutation(np.repeat(np.arange(task.num_classes), config.images_per_class))
    for start in range(0, len(labels), config.batch_size):
        batch = labels[start : start + config.batch_size]
        yield render_images(task, batch, size, rng), torch.from_numpy(batch).long()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms, tokens and position embeddings (1-D or not "weights"): the usual ViT recipe.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        no_decay_param = param.ndim < 2 or name.endswith(("cls_token", "pos_embed", "reg_token"))
        (no_decay if no_decay_param else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_hold_cooldown(warmup: int, total: int, cooldown: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, constant, then a linear cool-down to 0 over the last
    `cooldown` fraction. On a budget of a couple of thousand steps, holding the peak rate for most of them
    learns clearly faster than a cosine that starts decaying at once (measured on the default task)."""
    decay = max(1, round(cooldown * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return min(1.0, max(0.0, (total - step) / decay))

    return factor


# --------------------------------------------------------------------------------------------------- the file


def materialise_backbone(settings: BackboneSettings, out: Path, progress: Progress = NO_PROGRESS) -> Path:
    """Write the backbone's weights (classifier removed) to `out` (.safetensors), atomically; return `out`.

    origin `synthetic`: pretrained here on the generated source task; origin `hub`: timm's checkpoint of
    `settings.name`. The file loads with `backbone.weights: <out>` and the same name, img_size and model_kwargs.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise BackboneError(f"backbone weights are written as .safetensors; got {out}")
    metadata = {
        "timm_name": settings.name,
        "origin": settings.origin,
        "img_size": json.dumps(settings.img_size),
        "model_kwargs": json.dumps(settings.model_kwargs, sort_keys=True),
    }
    if settings.origin == "synthetic":
        result = pretrain(settings, progress)
        model = result.model
        metadata |= {
            "seed": str(settings.pretrain.seed),
            "source_accuracy": f"{result.source_accuracy:.4f}",
            "pretrain": settings.pretrain.model_dump_json(),
        }
    else:
        model = _download(settings)
    _save(model, out, metadata)
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata a materialised weights file carries (timm name, origin, seed, source accuracy, …)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _download(settings: BackboneSettings) -> nn.Module:
    kwargs: dict[str, Any] = {**settings.model_kwargs, "num_classes": 0}
    if settings.img_size is not None:
        kwargs["img_size"] = settings.img_size
    try:
        return timm.create_model(settings.name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BackboneError(
            f"backbone.origin=hub: could not fetch pretrained weights for {settings.name!r} "
            f"({type(exc).__name__}: {exc}). Check the network or HF_HUB_OFFLINE, or set backbone.origin to "
            "'synthetic' to pretrain offline."
        ) from exc


def _save(model: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    # Contiguous clones: safetensors refuses shared or strided storage.
    tensors = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    try:
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
            _sort_header(tmp)
    except OSError as exc:
        raise BackboneError(f"could not write the backbone weights to {out}: {exc}") from exc


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, in place and at the same length. safetensors
    writes the metadata in hash-map order, which changes from process to process: the same weights would
    hash differently, and DVC would see a new backbone on every run."""
    with path.open("r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= length:  # safetensors pads its header with spaces to an 8-byte boundary
            handle.seek(8)
            handle.write(text.ljust(length, b" "))
