"""`shapes-count` and `shapes-loc`: generated offline tasks whose answer is *how many* things there are or
*where* one is, in the spirit of VTAB's structured group (clevr-count, dsprites-loc). Digits can be told
apart by local stroke shape; these need the layout of the whole image, which a spatially aligned prompt
should help with.

Every image is a dark canvas with a random background level and clipped Gaussian pixel noise, and a few
non-overlapping small shapes (filled square, disc, diamond, hollow square) of random size and brightness,
at least one unit apart. Sizes are in *units* of `data.render_size / 16` pixels, so the offline backbone's
16 px images have 1–3 px shapes and a 224 px rendering is the same task at 14× the resolution.

- `count`: k = 1…C shapes of any kind and size; label k − 1 (class name "k").
- `loc`: one *target* — a 3-unit hollow square, the only hollow shape — and 2–4 distractors (filled squares,
  discs and diamonds of 1–3 units; 3-unit discs and diamonds are crosses at 16 px); label = the cell of a
  g×g grid holding the target's centre, row-major (class name "r<row>c<col>").

Labels are balanced (exactly `per_class` images per class, shuffled) and come from their own random stream,
so the same seed gives the same paths and labels at any render size. Everything is drawn from `data.seed`
(a different seed is a different sample of the task): the images live under
`<root>/<folder>/seed<seed>/images/<class>/<index>.png`, one folder per seed, so the split files of one seed
never point at the images of another. Grayscale PNG, written atomically with a completion marker; a marker
from another render size or generator version is rendered again.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sa2vp.data.catalogue import Catalogue, make_catalogue
from sa2vp.data.errors import DataError
from sa2vp.data.files import mark_complete, read_marker, staging
from sa2vp.data.images import save_generated_png
from sa2vp.data.progress import NO_PROGRESS, Progress
from sa2vp.data.registry import DatasetInfo
from sa2vp.settings import DataSettings

# Bump when the drawing changes: a rendering marked with another version is made again.
GENERATOR = "shapes/1"
# Canvas side in units: one unit is one pixel at the offline backbone's 16 px input.
CANVAS_UNITS = 16
GAP_UNITS = 1  # free space around every shape: shapes never touch, so each is one connected blob
KINDS = ("square", "disc", "diamond", "ring")
SIZES = (1, 2, 3)  # shape sides, in units
TARGET = ("ring", 3)  # loc: the one shape of this kind and size in an image
# loc: every other kind, at every size, so the target is the only hollow shape at any render size. The 3-unit
# filled squares are the target without its hole: finding it takes its shape, not its brightness or area
# (without them, raw-pixel logistic regression reaches ~90 % at 16 px).
DISTRACTORS = tuple((kind, side) for kind in KINDS if kind != TARGET[0] for side in SIZES)
DISTRACTOR_COUNT = (2, 4)  # loc: distractors per image, inclusive
# Grey levels in [0, 1]. The ranges leave a margin of ≥ 0.16 between the brightest background pixel
# (0.15 + 3 × 0.04) and the dimmest shape pixel (0.55 − 3 × 0.04), so a threshold anywhere in (0.27, 0.43)
# recovers every shape: the labels are unambiguous, while brightness and shape size vary.
BACKGROUND = (0.0, 0.15)
NOISE = (0.0, 0.04)  # standard deviation, clipped at ±3
LEVEL = (0.55, 1.0)
_TASK_STREAMS = {"count": 1, "loc": 2}  # independent random streams of one seed per task
_LABELS, _IMAGES = 0, 1
_SCENE_ATTEMPTS = 100


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: its kind, the top-left corner and side of its box, and its grey level."""

    kind: str
    top: int  # pixels
    left: int
    side: int
    level: float


# --- the source interface ------------------------------------------------------------------------------------


def dataset_dir(info: DatasetInfo, settings: DataSettings) -> Path:
    return Path(settings.root) / info.folder / f"seed{settings.seed}"


def fetch(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Path:
    """The generated images of `data.seed`; generated again when data.render_size or the generator changed."""
    if settings.render_size < CANVAS_UNITS:
        # Below one pixel per unit, 1- and 2-unit shapes merge and the loc target loses its hole.
        raise DataError(f"data.render_size={settings.render_size}: {info.name} needs at least {CANVAS_UNITS} px")
    folder = dataset_dir(info, settings)
    expected = marker(info, settings)
    found = read_marker(folder)
    if found == expected:
        return folder
    if found is not None:
        shutil.rmtree(folder)  # our own rendering at another size or by another generator version
    elif folder.exists():
        raise DataError(f"{folder} exists but is not a {info.name} rendering (no completion marker); remove it")
    labels = make_labels(info, settings.seed)
    names = class_names(info)
    size = settings.render_size
    with (
        staging(folder) as tmp,
        progress(f"generating {info.name} (seed {settings.seed}) at {size}×{size}", len(labels), "images") as advance,
    ):
        for index, label in enumerate(labels):
            path = tmp / _relative(index, names[label])
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = render_image(info, settings.seed, index, int(label), size)
            save_generated_png(Image.fromarray(pixels, mode="L"), path)
            advance(1)
        mark_complete(tmp, expected)
    return folder


def catalogue(info: DatasetInfo, settings: DataSettings, progress: Progress = NO_PROGRESS) -> Catalogue:
    names = class_names(info)
    items = [(_relative(i, names[label]), int(label)) for i, label in enumerate(make_labels(info, settings.seed))]
    return make_catalogue(dataset_dir(info, settings), names, {"all": items}, info.name)


# --- labels and scenes ---------------------------------------------------------------------------------------


def class_names(info: DatasetInfo) -> list[str]:
    """Index = label: the count ("1", "2", …) or the grid cell ("r0c0", "r0c1", …)."""
    if _task(info) == "count":
        return [str(k) for k in range(1, _classes(info) + 1)]
    grid = _grid(info)
    return [f"r{row}c{col}" for row in range(grid) for col in range(grid)]


def make_labels(info: DatasetInfo, seed: int) -> np.ndarray:
    """Label of every image index: `per_class` of each class, shuffled (independent of the render size)."""
    per_class = int(info.options["per_class"])
    rng = _rng(info, seed, _LABELS)
    return rng.permutation(np.repeat(np.arange(_classes(info)), per_class))


def render_image(info: DatasetInfo, seed: int, index: int, label: int, size: int) -> np.ndarray:
    """Image `index` (of class `label`) as uint8 grey pixels (size, size); its own random stream, so any
    image can be made alone."""
    rng = _rng(info, seed, _IMAGES, index)
    if _task(info) == "count":
        scene = _count_scene(rng, label + 1, size)
    else:
        scene = _loc_scene(rng, label, _grid(info), size)
    return _draw(scene, size, rng)


def _count_scene(rng: np.random.Generator, count: int, size: int) -> list[Shape]:
    for _ in range(_SCENE_ATTEMPTS):  # a crowded canvas can leave no room for the last shape: start over
        blocked = np.zeros((size, size), dtype=bool)
        placed = []
        for _ in range(count):
            kind, side = KINDS[rng.integers(len(KINDS))], int(SIZES[rng.integers(len(SIZES))])
            shape = _place(rng, blocked, kind, _pixels(side, size), size)
            if shape is None:
                break
            placed.append(shape)
        else:
            return placed
    raise DataError(f"could not place {count} shapes on a {size}×{size} canvas in {_SCENE_ATTEMPTS} attempts")


def _loc_scene(rng: np.random.Generator, label: int, grid: int, size: int) -> list[Shape]:
    blocked = np.zeros((size, size), dtype=bool)
    side = _pixels(TARGET[1], size)

    def in_cell(corners: np.ndarray) -> np.ndarray:
        row = np.floor((corners[:, 0] + side / 2) * grid / size)
        col = np.floor((corners[:, 1] + side / 2) * grid / size)
        return row * grid + col == label

    target = _place(rng, blocked, TARGET[0], side, size, in_cell)
    if target is None:
        raise DataError(f"data.render_size={size}: too small for a {grid}×{grid} grid of target positions")
    shapes = [target]
    for _ in range(rng.integers(DISTRACTOR_COUNT[0], DISTRACTOR_COUNT[1] + 1)):
        kind, units = DISTRACTORS[rng.integers(len(DISTRACTORS))]
        distractor = _place(rng, blocked, kind, _pixels(units, size), size)
        if distractor is not None:  # no room left: fewer distractors, the label is unaffected
            shapes.append(distractor)
    return shapes


def _place(
    rng: np.random.Generator,
    blocked: np.ndarray,
    kind: str,
    side: int,
    size: int,
    allowed: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Shape | None:
    """A shape at a uniformly drawn free position (None when there is none); marks its surroundings blocked."""
    corners = _free_corners(blocked, side)
    if allowed is not None and len(corners):
        corners = corners[allowed(corners)]
    if not len(corners):
        return None
    top, left = (int(v) for v in corners[rng.integers(len(corners))])
    gap = _pixels(GAP_UNITS, size)
    blocked[max(top - gap, 0) : top + side + gap, max(left - gap, 0) : left + side + gap] = True
    return Shape(kind, top, left, side, float(rng.uniform(*LEVEL)))


def _free_corners(blocked: np.ndarray, side: int) -> np.ndarray:
    """(row, col) of every top-left corner whose side×side box covers no blocked pixel (summed-area table)."""
    size = blocked.shape[0]
    table = np.zeros((size + 1, size + 1), dtype=np.int32)  # a zero first row and column (np.pad is slower)
    table[1:, 1:] = blocked.cumsum(0, dtype=np.int32).cumsum(1)
    n = size - side + 1
    sums = table[side:, side:] - table[:n, side:] - table[side:, :n] + table[:n, :n]
    return np.argwhere(sums == 0)


# --- drawing -------------------------------------------------------------------------------------------------


def _draw(scene: list[Shape], size: int, rng: np.random.Generator) -> np.ndarray:
    background, noise = rng.uniform(*BACKGROUND), rng.uniform(*NOISE)
    ink = np.full((size, size), background)
    for shape in scene:
        box = ink[shape.top : shape.top + shape.side, shape.left : shape.left + shape.side]
        box[_mask(shape.kind, shape.side)] = shape.level
    grain = np.clip(rng.standard_normal((size, size)), -3.0, 3.0)
    return np.round(np.clip(ink + noise * grain, 0.0, 1.0) * 255).astype(np.uint8)


@functools.cache
def _mask(kind: str, side: int) -> np.ndarray:
    """The pixels of a shape inside its side×side box (cached, read-only). At 1–2 px every kind is a filled
    square; at 3 px discs and diamonds are crosses and the ring a square with a one-pixel hole."""
    centre = (side - 1) / 2
    y, x = np.mgrid[:side, :side] - centre
    if kind == "square":
        mask = np.ones((side, side), dtype=bool)
    elif kind == "disc":
        mask = np.hypot(x, y) <= 0.45 * side
    elif kind == "diamond":
        mask = np.abs(x) + np.abs(y) <= side / 2
    elif kind == "ring":
        # A border of a third of the side: the 3-unit target is one unit thick at every render size.
        mask = np.maximum(np.abs(x), np.abs(y)) > centre - max(1, side // 3)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {', '.join(KINDS)}")
    mask.flags.writeable = False
    return mask


# --- helpers -------------------------------------------------------------------------------------------------


def _pixels(units: int, size: int) -> int:
    return max(1, round(units * size / CANVAS_UNITS))


def _task(info: DatasetInfo) -> str:
    task = info.options.get("task", "")
    if task not in _TASK_STREAMS:
        raise DataError(f"{info.name}: registry option task={task!r}; expected one of {', '.join(_TASK_STREAMS)}")
    return task


def _classes(info: DatasetInfo) -> int:
    assert info.num_classes is not None
    return info.num_classes


def _grid(info: DatasetInfo) -> int:
    grid = math.isqrt(_classes(info))
    if grid * grid != _classes(info):
        raise DataError(f"{info.name}: a location task needs a square number of classes, not {info.num_classes}")
    return grid


def _rng(info: DatasetInfo, seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _TASK_STREAMS[_task(info)], *stream])


def marker(info: DatasetInfo, settings: DataSettings) -> dict[str, object]:
    """The completion marker of the rendering these settings ask for (a split prepared from another is stale)."""
    return {
        "dataset": info.name,
        "generator": GENERATOR,
        "images": _classes(info) * int(info.options["per_class"]),
        "render_size": settings.render_size,
        "seed": settings.seed,
    }


def _relative(index: int, name: str) -> str:
    return f"images/{name}/{index:04d}.png"
