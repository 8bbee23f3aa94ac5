"""Every knob is a typed, validated setting; errors name the setting and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from sa2vp.models.backbones import create_backbone, data_config, weights_digest
from sa2vp.models.sa2vp_vit import resolve_layers
from sa2vp.settings import (
    BackboneSettings,
    ModelSettings,
    SA2VPSettings,
    Settings,
    SettingsError,
    dotted_parent,
    flatten_settings,
    load_settings,
)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("model.sa2vp.window", 4, "model.sa2vp.window: must be an odd integer >= 1"),
        ("model.sa2vp.window", 0, "model.sa2vp.window: must be an odd integer >= 1"),
        ("model.sa2vp.window", -3, "model.sa2vp.window: must be an odd integer >= 1"),
        ("model.sa2vp.window", "wide", "model.sa2vp.window: must be an odd integer >= 1"),
        ("model.sa2vp.lam", 1.5, "model.sa2vp.lam: Input should be less than or equal to 1"),
        ("model.sa2vp.lam", -0.1, "model.sa2vp.lam: Input should be greater than or equal to 0"),
        ("model.sa2vp.gamma", -1, "model.sa2vp.gamma: Input should be greater than or equal to 0"),
        ("model.sa2vp.prompt_rank", 0, "model.sa2vp.prompt_rank: Input should be greater than or equal to 1"),
        ("model.sa2vp.adapter_act", "tanh", "model.sa2vp.adapter_act: Input should be 'gelu' or 'relu'"),
        ("model.sa2vp.head_mode", "both", "model.sa2vp.head_mode: Input should be 'multi' or 'single'"),
        ("model.sa2vp.border", "wrap", "model.sa2vp.border: Input should be 'clip' or 'zero'"),
        ("model.sa2vp.deep_layers", [-1], "model.sa2vp.deep_layers: layer indices must be >= 0"),
        ("model.gama", 0.5, "model.gama: unknown setting"),
    ],
)
def test_invalid_values_raise_an_error_naming_the_setting(key, value, expected):
    with pytest.raises(SettingsError) as error:
        load_settings(None, {key: value})
    assert expected in str(error.value)


def test_valid_windows_and_defaults():
    assert load_settings(None, {"model.sa2vp.window": "5"}).model.sa2vp.window == 5
    assert load_settings(None, {"model.sa2vp.window": "global"}).model.sa2vp.window_size is None
    model = ModelSettings()
    assert (
        model.sa2vp.window,
        model.sa2vp.gamma,
        model.sa2vp.lam,
        model.sa2vp.prompt_rank,
        model.sa2vp.adapter_dim,
    ) == (3, 0.1, 0.8, 16, 16)
    assert (model.sa2vp.adapter_act, model.sa2vp.head_mode, model.sa2vp.border, model.sa2vp.dropout) == (
        "gelu",
        "multi",
        "clip",
        0.1,
    )


def test_layer_index_beyond_the_depth_names_the_setting_and_the_range():
    with pytest.raises(SettingsError, match=r"model.sa2vp.deep_layers: layer index 12 .* allowed 0..11"):
        resolve_layers(SA2VPSettings(deep_layers=[4, 12]), depth=12)
    with pytest.raises(SettingsError, match=r"model.sa2vp.to_prompt_layers: layer index 6 .* allowed 0..5"):
        resolve_layers(SA2VPSettings(to_prompt_layers=[0, 6]), depth=6)


def test_precedence_is_overrides_then_environment_then_params_file(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  sa2vp:\n    gamma: 0.3\n    lam: 0.5\n    window: 5\n")
    monkeypatch.setenv("SA2VP_MODEL__SA2VP__LAM", "0.6")
    settings = load_settings(params, {"model.sa2vp.window": 7})
    assert (settings.model.sa2vp.gamma, settings.model.sa2vp.lam, settings.model.sa2vp.window) == (0.3, 0.6, 7)


def test_a_broken_params_file_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model: [unclosed\n")
    with pytest.raises(SettingsError, match=f"{params}: not valid YAML"):
        load_settings(params)
    params.write_text("model:\n  sa2vp:\n    window: 2\n")
    with pytest.raises(SettingsError, match=rf"{params}: model.sa2vp.window: must be an odd"):
        load_settings(params)


def test_an_overriding_mapping_replaces_the_files_mapping(tmp_path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("backbone:\n  model_kwargs: {depth: 2, patch_size: 4}\n  img_size: 32\n")
    settings = load_settings(params, {"backbone.model_kwargs": {"depths": [1, 1]}})
    assert settings.backbone.model_kwargs == {"depths": [1, 1]} and settings.backbone.img_size == 32
    assert load_settings(params).backbone.model_kwargs == {"depth": 2, "patch_size": 4}


# --- issue 15, item 3: settings said once ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# What the offline default backbone was before timm knew it by name (the committed file's metadata says so too).
AS_TIMM_ARGUMENTS = {
    "name": "vit_tiny_patch16_224",
    "img_size": 16,
    "model_kwargs": {"patch_size": 2, "embed_dim": 64, "depth": 12, "num_heads": 4},
}


def test_the_offline_default_backbone_is_one_timm_name_for_the_same_network() -> None:
    pinned = load_settings(REPO / "params.yaml").backbone
    assert (pinned.name, pinned.img_size, pinned.model_kwargs) == ("offline_vit12", None, {})
    weights = {"weights": str(REPO / pinned.weights), "sha256": pinned.sha256}
    named = create_backbone(BackboneSettings(name=pinned.name, **weights))
    spelled = create_backbone(BackboneSettings(**AS_TIMM_ARGUMENTS, **weights))
    # the same parameters (names, shapes, bytes: the committed file loads unchanged), modules and input
    assert weights_digest(named) == weights_digest(spelled) and repr(named) == repr(spelled)
    assert (
        data_config(named)
        == data_config(spelled)
        == {
            "input_size": (3, 16, 16),
            "interpolation": "bicubic",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "crop_pct": 0.9,
            "crop_mode": "center",
        }
    )
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(named(images), spelled(images))
    # model_kwargs and img_size still change the named architecture, one argument at a time
    shallow = create_backbone(BackboneSettings(name="offline_vit12", weights="random", model_kwargs={"depth": 2}))
    assert isinstance(shallow, VisionTransformer) and len(shallow.blocks) == 2 and shallow.embed_dim == 64
    assert shallow.patch_embed.img_size == (16, 16)


def test_params_yaml_gives_only_what_differs_from_the_schema_and_what_dvc_reads() -> None:
    file = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = flatten_settings(Settings.model_construct())  # the schema alone, no SA2VP_* variable
    restated = {key for key, value in _leaves(file) if key in defaults and value == defaults[key]}
    # DVC interpolates these in dvc.yaml, and refuses a plain `dvc exp run -S key=…` for a key the file lacks
    interpolated = set(re.findall(r"\$\{([a-z_.]+)\}", (REPO / "dvc.yaml").read_text()))
    assert restated <= interpolated | {"data.dataset", "model.method"}, restated - interpolated
    assert {"data.root", "tune.storage", "tune.output"} <= interpolated
    # and every section and key a stage tracks is in the file (DVC reads the file, not the schema)
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("params", []):
            holder, leaf = dotted_parent(file, key)
            assert holder is not None and leaf in holder, key


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    found = []
    for name, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{name}" not in ("backbone.model_kwargs", "tune.space"):
            found += _leaves(value, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", value))
    return found
