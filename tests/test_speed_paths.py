"""The fast paths of issue 16 ("Close to the floor") do what the slow paths did: the linear probe on features
computed once, `train.compile`, the portable dropout's cheaper mask, and the training-step benchmark's --json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from sa2vp.data import read_split, split_dir
from sa2vp.data.dataset import load_split
from sa2vp.engine import evaluate, fit, load_artifact
from sa2vp.engine.features import features_fixed
from sa2vp.engine.runtime import PortableDropout
from sa2vp.models import build_model
from sa2vp.models.backbones import data_config, freeze, set_stochastic_layers
from sa2vp.models.sa2vp_vit import _deep_block
from sa2vp.settings import SettingsError, load_settings
from tests.train_fixtures import digits_root, project, tiny_settings  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def images_through_backbones() -> Iterator[list[int]]:
    """Counts the images every timm patch embedding sees while the block runs (one entry per call)."""
    seen: list[int] = []

    def count(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, PatchEmbed):
            seen.append(int(inputs[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        yield seen
    finally:
        handle.remove()


# --- the linear probe on features computed once ---------------------------------------------------------------


def test_the_linear_probe_computes_features_once_and_trains_as_it_does_on_images(project: Path) -> None:
    common = {"model.method": "linear", "train.epochs": 2, "train.lr": 0.05, "tracking.enabled": False}
    with images_through_backbones() as cached_seen:
        cached = fit(tiny_settings(project, **common, **{"train.output": str(project / "cached")}))
    # The same training on the images every epoch: a backbone in training mode without dropout gives the same
    # features, but the engine cannot know that (model.backbone_dropout on) and runs it every epoch.
    on_images = tiny_settings(
        project,
        **common,
        **{"train.output": str(project / "images"), "model.backbone_dropout": "on", "backbone.dropout": 0.0},
    )
    with images_through_backbones() as image_seen:
        uncached = fit(on_images)

    folder = split_dir(on_images.data)
    train, val, test = (len(read_split(folder, split)) for split in ("train", "val", "test"))
    assert sum(cached_seen) == train + val + test  # each image once
    assert sum(image_seen) == 2 * (train + val) + test  # the uncached path, for contrast
    # The same batches in the same order: the same head to float tolerance, the same predictions.
    ours, theirs = (load_file(str(r.artifact / "model.safetensors")) for r in (cached, uncached))
    assert ours.keys() == theirs.keys() == {"head.weight", "head.bias"}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert cached.test is not None and uncached.test is not None
    assert abs(cached.test.top1 - uncached.test.top1) <= 1 / test  # at most one image on a near tie
    # The artifact is a plain linear probe's: it loads and predicts from images.
    assert type(load_artifact(cached.artifact).model).__name__ == "LinearProbe"


def test_features_are_fixed_only_without_augmentation_and_with_the_backbone_in_eval_mode(
    project: Path,
) -> None:
    settings = tiny_settings(project, **{"model.method": "linear"})
    probe = build_model(settings, 10)
    config = data_config(probe.backbone)
    folder = split_dir(settings.data)
    plain = load_split(folder, "train", config, style="vtab")
    augmented = load_split(folder, "train", config, style="fgvc")  # random crop and flip
    assert features_fixed(probe, plain)
    assert not features_fixed(probe, augmented)
    probe.backbone_dropout = True  # model.backbone_dropout on: the backbone trains in training mode
    assert not features_fixed(probe, plain)
    sa2vp = build_model(tiny_settings(project), 10)
    assert not features_fixed(sa2vp, plain)


# --- train.compile ----------------------------------------------------------------------------------------------


TINY_SA2VP = {
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.weights": "random",
    "backbone.img_size": 16,
    "backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "model.sa2vp.window": 3,
    # No dropout: the compiled step draws its random numbers from another stream than the eager one.
    "model.backbone_dropout": "off",
    "model.sa2vp.dropout": 0.0,
}


@pytest.mark.slow  # compiling a forward and backward on the CPU: about a minute
def test_a_compiled_sa2vp_model_trains_as_the_eager_one_and_keeps_its_state_names() -> None:
    from sa2vp.engine.compile import compile_model

    settings = load_settings(None, TINY_SA2VP)
    torch.manual_seed(0)
    eager = build_model(settings, 10)
    compiled = build_model(settings, 10)
    compiled.load_state_dict(eager.state_dict())
    names = list(compiled.state_dict())
    clock = compile_model(compiled, "default")
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = []
    for model in (eager, compiled):
        model.train()
        loss = model.loss(model(images), labels).total
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, ours), theirs in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        if theirs.requires_grad:
            assert ours.grad is not None and theirs.grad is not None, name
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert clock is not None and clock.train > 0 and clock.compilations >= 1 and clock.eval == 0
    # In place: the same module, parameters and names, so its trained state loads into an eager model.
    assert list(compiled.state_dict()) == names
    torch.manual_seed(0)
    fresh = build_model(settings, 10)  # the same random backbone as `eager`
    fresh.load_trainable_state_dict(compiled.trainable_state_dict())
    fresh.train()
    torch.testing.assert_close(fresh.loss(fresh(images), labels).total, losses[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # compiles (the probe's head: seconds each) for the training step and the evaluation
def test_a_compiled_run_logs_its_compile_time_and_its_artifact_loads_eagerly(project: Path) -> None:
    settings = tiny_settings(project, **{"model.method": "linear", "train.epochs": 2, "train.compile": True})
    assert settings.train.compile == "default"
    result = fit(settings)
    client = MlflowClient(settings.tracking.uri)
    history = client.get_metric_history(result.run_id, "compile_seconds")
    assert history and history[0].step == 1 and history[0].value > 0  # the first epoch compiled the step
    loaded = load_artifact(result.artifact)  # an eager model
    assert loaded.model._compiled_call_impl is None
    assert result.test is not None
    assert evaluate(loaded, "test").top1 == pytest.approx(result.test.top1, abs=1.5 / result.test.count)


# --- benchmarks/train_step.py --json ----------------------------------------------------------------------------

BENCHMARK = ROOT / "benchmarks" / "train_step.py"
TINY_BACKBONE = ["--model", "vit_tiny_patch16_224", "--image-size", "16", "--batch-size", "4"]
TINY_KWARGS = "backbone.model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"
FIGURES = {"train_img_s", "infer_img_s", "train_peak_mib", "infer_peak_mib", "first_step_seconds"}


def _benchmark_module() -> Any:
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_measures_a_method_beside_one_pathway_and_documents_it() -> None:
    bench = _benchmark_module()
    overrides = {"backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}
    common = bench.Common("vit_tiny_patch16_224", 16, 4, "fp32", "cpu", 1, 1, "dense", overrides)
    units = [bench.Unit("pathway", None, "off"), bench.Unit("sa2vp", 3, "off"), bench.Unit("linear", None, "off")]
    measured = [(unit, bench.measure(common, unit)) for unit in units]
    document = json.loads(json.dumps(bench._document(common, measured)))  # what --json writes
    assert document["schema"] == 1
    assert {"sha", "dirty"} <= document["commit"].keys()
    assert {"torch", "timm", "sa2vp", "python"} <= document["versions"].keys()
    assert document["device"]["type"] == "cpu" and document["device"]["name"]
    assert document["settings"]["batch_size"] == 4 and document["settings"]["kernel"] == "dense"
    assert document["memory"] == "cpu_peak_rss_growth"
    rows = {(row["method"], row["window"], row["compile"]): row for row in document["results"]}
    assert rows.keys() == {("pathway", None, "off"), ("sa2vp", 3, "off"), ("linear", None, "off")}
    for row in rows.values():
        assert all(row[key] > 0 for key in FIGURES - {"train_peak_mib", "infer_peak_mib"}), row
        assert row["train_ratio"] == pytest.approx(rows["pathway", None, "off"]["train_img_s"] / row["train_img_s"])
    sa2vp = rows["sa2vp", 3, "off"]
    assert 0 < sa2vp["cross_share"] < 1 and sa2vp["trainable"] > 0  # timed inside real steps
    assert rows["linear", None, "off"]["cross_share"] is None and rows["pathway", None, "off"]["trainable"] is None


@pytest.mark.slow  # one process per measurement
def test_the_benchmark_command_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "train_step.json"
    options = ["--methods", "sa2vp", "--windows", "1", "--steps", "1", "--warmup", "1", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *TINY_BACKBONE, "--set", TINY_KWARGS, *options],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(out.read_text())
    assert [(row["method"], row["window"]) for row in document["results"]] == [("pathway", None), ("sa2vp", 1)]
    assert "sa2vp" in done.stdout and "ratio" in done.stdout  # the table


def test_the_benchmark_refuses_an_unknown_method_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _benchmark_module()
    monkeypatch.setattr(sys, "argv", ["train_step.py", *TINY_BACKBONE, "--methods", "sa2vp,vpt-dep"])
    with pytest.raises(SystemExit, match="--methods vpt-dep: model.method"):
        bench.main()
    assert "measuring" not in capsys.readouterr().out


# --- the portable dropout's mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_dropout_gives_the_same_numbers_without_casting_its_mask(dtype: torch.dtype) -> None:
    drop = PortableDropout(0.1).train()
    x = torch.randn(4, 65, 256, dtype=dtype, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.manual_seed(3)
        out = drop(x)
        out.backward(torch.ones_like(out))
    # The documented numbers: x · (rand ≥ p) · 1/(1−p), with the same draws — sign of zero included.
    torch.manual_seed(3)
    expected = x.detach() * (torch.rand_like(x) >= 0.1) * (1 / 0.9)
    assert torch.equal(
        out.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    assert x.grad is not None and torch.equal(x.grad, (expected != 0) * torch.tensor(1 / 0.9, dtype=dtype))
    # No full-size cast of a boolean mask, forward or backward (a quarter of the dropout's time on the CPU).
    casts = [
        e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == list(x.shape)
    ]
    assert casts == []


def test_train_compile_reads_yaml_booleans_as_its_switch_and_refuses_other_values() -> None:
    assert load_settings(None, {}).train.compile == "off"  # the reproducible default
    assert load_settings(None, {"train.compile": True}).train.compile == "default"
    assert load_settings(None, {"train.compile": False}).train.compile == "off"
    assert load_settings(None, {"train.compile": "reduce-overhead"}).train.compile == "reduce-overhead"
    with pytest.raises(SettingsError, match=r"train\.compile: .*'max-autotune' \(got 'fast'\)"):
        load_settings(None, {"train.compile": "fast"})


# --- SA²VP's deep maps: computed once up to the first dropout -------------------------------------------------


@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_a_deep_map_meets_the_batch_at_the_first_dropout_with_the_release_numbers(drop_path: float) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    set_stochastic_layers(vit, dropout=0.1, drop_path=drop_path)
    block = freeze(vit).blocks[1].train()
    assert isinstance(block, Block)
    deep_map = torch.randn(1, 17, 32, requires_grad=True)
    results = []
    for run in (lambda: _deep_block(block, deep_map, 5), lambda: block(deep_map.expand(5, -1, -1))):
        torch.manual_seed(7)  # the same random draws
        deep_map.grad = None
        with FlopCounterMode(display=False) as flops:
            out = run()
            out.square().sum().backward()
        results.append((out.detach(), deep_map.grad, flops.get_total_flops()))
    (ours, our_grad, our_flops), (release, release_grad, release_flops) = results
    assert ours.shape == (5, 17, 32) and not torch.allclose(ours[0], ours[1])  # a dropout mask per image
    torch.testing.assert_close(ours, release, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, release_grad, rtol=1e-5, atol=1e-6)
    if drop_path == 0.0:  # attention, fc1 and its activation once, not per image
        assert our_flops < 0.5 * release_flops
    else:  # drop-path draws per image from the attention branch on: the release's way
        assert our_flops == release_flops
