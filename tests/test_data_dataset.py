"""Loading prepared splits: §4's transforms from the backbone's data config, RGB conversion, bad images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sa2vp.data import CorruptImageError, DataError, build_transform, load_image, load_split, prepare
from sa2vp.settings import DataSettings
from tests.data_fixtures import TEST_DATA_CONFIG, image_bytes, make_image_folder


def _asymmetric(size: tuple[int, int] = (48, 40)) -> Image.Image:
    x = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x[:, : size[0] // 3] = 255  # a bright left third: flips and crops change the result
    return Image.fromarray(x)


def test_vtab_transform_resizes_and_normalises_without_augmentation() -> None:
    transform = build_transform(TEST_DATA_CONFIG, "vtab", train=True)
    white = transform(Image.new("RGB", (50, 70), (255, 255, 255)))
    assert white.shape == (3, 32, 32) and torch.allclose(white, torch.ones_like(white))  # (1 − 0.5) / 0.5
    image = _asymmetric()
    assert torch.equal(transform(image), transform(image))


def test_fgvc_transform_crops_and_flips_for_training_only() -> None:
    image = _asymmetric()
    train = build_transform(TEST_DATA_CONFIG, "fgvc", train=True)
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(12)]
    assert all(o.shape == (3, 32, 32) for o in outputs)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    evaluate = build_transform(TEST_DATA_CONFIG, "fgvc", train=False)
    assert torch.equal(evaluate(image), evaluate(image)) and evaluate(image).shape == (3, 32, 32)
    # evaluation resizes to 256/224 of the input size, then takes the centre crop
    steps = [type(t).__name__ for t in evaluate.transforms]
    assert steps == ["Resize", "CenterCrop", "ToTensor", "Normalize"] and evaluate.transforms[0].size == (37, 37)


def test_transform_from_timm_data_config() -> None:
    import timm.data
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg("vit_base_patch16_224.orig_in21k")
    assert pretrained_cfg is not None
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    out = build_transform(config, "fgvc", train=False)(_asymmetric())
    assert out.shape == (3, 224, 224)
    with pytest.raises(DataError, match="interpolation 'sinc'"):
        build_transform({**config, "interpolation": "sinc"}, "vtab", train=False)
    with pytest.raises(DataError, match="'mean'"):
        build_transform({k: v for k, v in config.items() if k != "mean"}, "vtab", train=False)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.open(io.BytesIO(image_bytes(3, "PNG")))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.full((12, 12), 300, dtype=np.uint16))
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    if mode == "P":
        image.info["transparency"] = 0
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (12, 12)


def test_truncated_and_non_image_files_are_named(tmp_path: Path) -> None:
    data = image_bytes(1, "JPEG")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    for name in ("half.jpg", "text.png"):
        with pytest.raises(CorruptImageError, match=f"{name}: unreadable or truncated"):
            load_image(tmp_path / name)


def test_load_split_batches_with_class_names(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pets", {"cat": 10, "dog": 10})
    out = prepare(DataSettings(dataset=f"folder:{images}", root=tmp_path / "data"))
    train = load_split(out, "train", TEST_DATA_CONFIG)
    assert train.classes == ("cat", "dog") and len(train) == len(train.targets) == 14
    assert train.path(0) == images / train.samples[0][0]
    batch, labels = next(iter(DataLoader(train, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32 and labels.tolist() == [0, 0, 0, 0]
    test = load_split(out, "test", TEST_DATA_CONFIG, style="fgvc")
    assert type(test.transform.transforms[1]).__name__ == "CenterCrop"
    with pytest.raises(DataError, match="split 'dev'"):
        load_split(out, "dev", TEST_DATA_CONFIG)
