"""The generated source task the offline backbone is pretrained on: glyph classification.

Each class is a random glyph prototype — one to a few strokes (straight lines, circular/elliptic arcs and rings,
smooth curves, corners), often joined end to side the way handwriting joins strokes — and each image is a fresh
rendering of its class' prototype under a random affine transform, a smooth elastic warp, random stroke
thickness, edge softness, ink level and pixel noise: light strokes on a dark background, grey, centred and
filling the frame. Telling many such glyph classes apart needs features for stroke orientation, curvature,
junctions, endings, loops and their layout — the vocabulary of small glyph-like images — while the classes
themselves are arbitrary: no digit, font or target image is ever drawn or read. It plays the role ImageNet-21k
pretraining plays for the published backbones: a large, generic, labelled source task whose features the target
task can reuse frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sa2vp.settings import PretrainSettings

# Points sampled along every stroke; a stroke is rendered as the polyline through them.
POINTS_PER_STROKE = 12
# Side of the square a prototype is scaled to, in canvas units (the canvas spans [-1, 1]): glyphs fill
# most of the frame with a margin, as scanned characters normalised to their box do.
GLYPH_EXTENT = 1.5
# Independent random streams of one seed: class prototypes, training renderings (one per epoch), held-out ones.
_PROTOTYPES, _TRAIN, _HELD_OUT = 0, 1, 2
# Images rendered at once (bounds the memory of the pixel × segment distance table).
_RENDER_CHUNK = 1024


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


def training_batches(
    task: GlyphTask, settings: PretrainSettings, size: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of class-balanced batches (ink images, labels), rendered batch by batch: every epoch sees new
    renderings (the source task is unlimited, like a large pretraining set) and memory stays that of one batch."""
    rng = _rng(settings.seed, _TRAIN, epoch)
    labels = rng.permutation(np.repeat(np.arange(task.num_classes), settings.images_per_class))
    for start in range(0, len(labels), settings.batch_size):
        batch = labels[start : start + settings.batch_size]
        yield render_images(task, batch, size, rng), torch.from_numpy(batch).long()


def held_out(task: GlyphTask, settings: PretrainSettings, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The renderings the source-task accuracy is measured on: a stream no training epoch draws from."""
    return generate(task, settings.eval_images_per_class, size, settings.seed, _HELD_OUT)


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
