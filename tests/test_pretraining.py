"""Offline backbone pretraining: the generated glyph task, a tiny pretraining run, and the weights file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from sa2vp.engine.optim import WarmupHoldCooldown
from sa2vp.errors import BackboneError
from sa2vp.models.backbones import create_backbone, weights_digest
from sa2vp.pretraining import (
    Pretrained,
    backbone_file,
    generate,
    input_geometry,
    make_task,
    materialise_backbone,
    normalise,
    pretrain,
    read_metadata,
)
from sa2vp.pretraining.backbone_file import save_weights
from sa2vp.pretraining.loop import optimizer_and_schedule
from sa2vp.settings import BackboneSettings, PretrainSettings, SettingsError, load_settings
from tests.train_fixtures import invoke_sa2vp

REPO = Path(__file__).resolve().parents[1]

NAME = "vit_tiny_patch16_224"
# A 4×4-token ViT small enough to pretrain in a second or two.
TINY: dict[str, Any] = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_TASK = PretrainSettings(
    seed=1,
    classes=4,
    max_strokes=2,
    images_per_class=128,
    eval_images_per_class=25,
    epochs=6,
    batch_size=32,
    lr=5e-3,
    warmup_epochs=0.5,
    label_smoothing=0.0,
)


def _tiny(**update) -> BackboneSettings:
    return BackboneSettings(name=NAME, img_size=16, model_kwargs=TINY, origin="synthetic", pretrain=TINY_TASK, **update)


@pytest.fixture(scope="module")
def materialised(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone") / "weights" / "backbone.safetensors"
    return materialise_backbone(_tiny(), out)


def test_generator_is_deterministic_balanced_and_sized():
    task = make_task(PretrainSettings(seed=5, classes=6))
    assert task.strokes.shape[:2] == (6, 3) and task.present[:, 0].all()
    images, labels = generate(task, per_class=7, size=12, seed=5, stream=1)
    again_images, again_labels = generate(make_task(PretrainSettings(seed=5, classes=6)), 7, 12, 5, 1)
    assert images.shape == (42, 12, 12) and images.dtype == torch.float32
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert torch.bincount(labels).tolist() == [7] * 6
    assert images.min() >= 0 and images.max() <= 1
    # Light strokes on a dark background, as glyphs are: some ink, mostly background.
    assert 0.05 < images.mean() < 0.5
    other, _ = generate(task, 7, 12, seed=6, stream=1)
    held_out, _ = generate(task, 7, 12, seed=5, stream=2)
    assert not torch.equal(images, other) and not torch.equal(images, held_out)


def test_images_are_sized_and_normalised_for_the_backbone():
    model = timm.create_model(NAME, img_size=16, num_classes=0, **TINY)
    size, mean, std = input_geometry(model)
    assert size == 16  # the model's own input size, not the pretrained configuration's 224
    assert (mean, std) == tuple(timm.data.resolve_data_config(model=model)[k] for k in ("mean", "std"))
    ink, _ = generate(make_task(PretrainSettings(classes=2)), 3, size, seed=0, stream=1)
    batch = normalise(ink, mean, std)
    assert batch.shape == (6, 3, 16, 16)
    torch.testing.assert_close(batch[:, 1], (ink - mean[1]) / std[1])
    assert model(batch).shape == (6, model.num_features)


def test_pretraining_learns_the_task_and_writes_a_loadable_file(materialised):
    metadata = read_metadata(materialised)
    assert metadata["timm_name"] == NAME and metadata["origin"] == "synthetic" and metadata["seed"] == "1"
    assert float(metadata["source_accuracy"]) > 0.5  # chance is 1/4
    loaded = create_backbone(BackboneSettings(name=NAME, weights=str(materialised), img_size=16, model_kwargs=TINY))
    stored = load_file(str(materialised))
    state = loaded.state_dict()
    assert stored.keys() == state.keys() and not any(key.startswith("head.") for key in stored)
    for key, tensor in stored.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    random = create_backbone(BackboneSettings(name=NAME, weights="random", img_size=16, model_kwargs=TINY))
    assert weights_digest(loaded) != weights_digest(random)
    assert list(materialised.parent.iterdir()) == [materialised]  # no temporary file left beside it


def test_pretraining_is_deterministic_for_a_seed(materialised):
    settings = _tiny()
    model = pretrain(settings).model
    assert not model.training and model.num_classes == 0
    stored = load_file(str(materialised))
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, stored[key], rtol=0, atol=0, msg=key)


def test_the_schedule_warms_up_from_the_first_step_holds_then_cools_down_to_zero() -> None:
    # The committed backbone was trained with exactly these factors: a change to the warm-up (which, unlike the
    # engine's WarmupCosine, starts at 1/warmup, not 0) or to the cool-down changes its weights.
    schedule = WarmupHoldCooldown(total_steps=20, warmup_steps=4, cooldown=0.3)  # cool-down: round(6.0) steps
    pinned = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 14: 1.0, 15: 5 / 6, 17: 0.5, 19: 1 / 6, 20: 0.0, 25: 0.0}
    assert {step: schedule(step) for step in pinned} == pinned
    assert WarmupHoldCooldown(total_steps=10, warmup_steps=0, cooldown=0.01)(9) == 1.0  # at least one step down


def test_pretraining_decays_matrices_but_not_tokens_with_its_betas_and_schedule() -> None:
    model = timm.create_model(NAME, img_size=16, num_classes=4, **TINY)
    optimizer, scheduler = optimizer_and_schedule(model, TINY_TASK, steps_per_epoch=4)  # 6 epochs: 24 steps
    decayed, undecayed = optimizer.param_groups
    names = {id(param): name for name, param in model.named_parameters()}
    assert decayed["weight_decay"] == TINY_TASK.weight_decay and undecayed["weight_decay"] == 0.0
    assert {"cls_token", "pos_embed"} <= {names[id(p)] for p in undecayed["params"]}
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(names)  # every weight is trained
    assert decayed["betas"] == (0.9, 0.95)
    rates = []
    for _ in range(24):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # a warm-up of round(0.5 × 4) = 2 steps, the peak held, and the last round(0.3 × 24) = 7 steps down towards 0
    expected = [0.5, 1, *[1] * 15, 7 / 7, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7]
    assert rates == pytest.approx([TINY_TASK.lr * factor for factor in expected], rel=1e-12)


def _fake_pretraining(monkeypatch):
    model = timm.create_model(NAME, img_size=16, num_classes=0, **TINY)
    monkeypatch.setattr(backbone_file, "pretrain", lambda settings, progress: Pretrained(model, 0.5))


def test_an_unwritable_destination_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    _fake_pretraining(monkeypatch)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(BackboneError, match="could not write the backbone weights"):
        materialise_backbone(_tiny(), blocker / "backbone.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_a_failure_mid_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    _fake_pretraining(monkeypatch)
    out = tmp_path / "backbone.safetensors"
    out.write_bytes(b"previous weights")

    def fails_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(backbone_file, "save_file", fails_half_way)
    with pytest.raises(RuntimeError, match="interrupted"):
        materialise_backbone(_tiny(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.safetensors"]
    assert out.read_bytes() == b"previous weights"


def test_only_safetensors_files_are_written(tmp_path):
    with pytest.raises(BackboneError, match="written as .safetensors"):
        materialise_backbone(_tiny(), tmp_path / "backbone.pth")


def test_hub_origin_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: set its constants too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    settings = BackboneSettings(name="vit_tiny_patch16_224.augreg_in21k", origin="hub", img_size=32)
    out = tmp_path / "backbone.safetensors"
    with pytest.raises(BackboneError, match="origin=hub: could not fetch pretrained weights .* HF_HUB_OFFLINE"):
        materialise_backbone(settings, out)
    assert not out.exists()


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("backbone.pretrain.classes", 1, "backbone.pretrain.classes: Input should be greater than or equal to 2"),
        ("backbone.pretrain.lr", 0, "backbone.pretrain.lr: Input should be greater than 0"),
        ("backbone.pretrain.label_smoothing", 1, "backbone.pretrain.label_smoothing: Input should be less than 1"),
        ("backbone.pretrain.warmup_epochs", 9, "warmup_epochs must be < epochs"),
    ],
)
def test_pretraining_settings_are_validated(key, value, expected):
    with pytest.raises(SettingsError, match=expected):
        load_settings(None, {key: value})


def test_the_weights_file_header_is_in_sorted_order(tmp_path: Path) -> None:
    # safetensors writes metadata in hash-map order, which varies between processes; the file DVC hashes must
    # not: the header is rewritten in sorted order.
    from safetensors import safe_open
    from torch import nn

    model = nn.Linear(3, 2)
    metadata = {f"key{i}": str(i) for i in (5, 3, 8, 1, 7, 2)}
    save_weights(model, tmp_path / "w.safetensors", metadata)
    raw = (tmp_path / "w.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")], object_pairs_hook=list)
    keys = [key for key, _ in dict(header)["__metadata__"]]
    assert keys == sorted(keys) and [key for key, _ in header] == sorted(key for key, _ in header)
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", **metadata}
        assert torch.equal(handle.get_tensor("weight"), model.weight.detach())


def test_materialise_in_a_log_prints_progress_while_pretraining(tmp_path: Path) -> None:
    # Not a terminal (DVC, CI): plain lines with the step count every --log-every seconds, and one at the end.
    task = {
        "classes": 4,
        "max_strokes": 2,
        "images_per_class": 16,
        "eval_images_per_class": 2,
        "epochs": 2,
        "batch_size": 16,
        "threads": 1,
    }
    backbone = {
        "name": NAME,
        "img_size": 16,
        "model_kwargs": TINY,
        "origin": "synthetic",
        "weights": "backbone.safetensors",
        "pretrain": task,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"backbone": backbone}))
    threads = torch.get_num_threads()
    result = invoke_sa2vp(tmp_path, "--log-every", "0.01", "backbone", "materialise")
    assert torch.get_num_threads() == threads  # pretrain.threads holds only while pretraining
    counts = [int(line.split(": ")[1].split("/")[0]) for line in result.stderr.splitlines() if "/8 steps (" in line]
    assert len(counts) >= 2 and counts == sorted(counts) and counts[-1] == 8, result.stderr
    assert "source-task accuracy" in result.stdout and (tmp_path / "backbone.safetensors").is_file()


# --- the committed offline backbone (pipelines/backbone) -----------------------------------------------------


def test_the_committed_offline_backbone_is_the_file_params_yaml_pins() -> None:
    root = load_settings(REPO / "params.yaml").backbone
    made = load_settings(REPO / "pipelines/backbone/params.yaml").backbone
    path = REPO / root.weights
    assert (REPO / "pipelines/backbone" / made.weights).resolve() == path.resolve()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == root.sha256
    # the file is the backbone pipeline's product: its dvc.lock records this very file
    (stage,) = yaml.safe_load((REPO / "pipelines/backbone/dvc.lock").read_text())["stages"].values()
    (out,) = stage["outs"]
    assert (REPO / "pipelines/backbone" / out["path"]).resolve() == path.resolve()
    assert out["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    # it carries its architecture and how it was made, and that is what the backbone pipeline's params say
    metadata = read_metadata(path)
    assert metadata["timm_name"] == made.name and metadata["origin"] == root.origin == made.origin == "synthetic"
    assert json.loads(metadata["img_size"]) == made.img_size
    assert json.loads(metadata["model_kwargs"]) == made.model_kwargs
    assert PretrainSettings.model_validate_json(metadata["pretrain"]) == made.pretrain
    assert float(metadata["source_accuracy"]) > 0.6  # 200 glyph classes: chance is 0.5 %
    # the root names that architecture (offline_vit12, registered with timm): the same network, the file loads
    used = create_backbone(root.model_copy(update={"weights": str(path)}))
    spelled = create_backbone(made.model_copy(update={"weights": str(path), "sha256": root.sha256}))
    assert weights_digest(used) == weights_digest(spelled) and repr(used) == repr(spelled)
    # the paper backbone's depth, so that SA²VP's layer schedule applies unchanged, on a square token grid
    assert isinstance(used, timm.models.vision_transformer.VisionTransformer)
    assert len(used.blocks) == 12 and used.patch_embed.grid_size == (8, 8)


def test_the_main_pipeline_uses_the_committed_backbone_and_does_not_pretrain() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert not any("backbone materialise" in stage["cmd"] for stage in stages.values())
    for name in ("tune", "train", "evaluate", "linear-probe"):
        assert "${backbone.weights}" in stages[name]["deps"], name
