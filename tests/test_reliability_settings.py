"""Settings and command line: what was named is used or refused, never silently replaced; each refusal is one
line that names where the bad value came from (--set, a --set-file, the environment, the params file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from sa2vp.models import build_model
from sa2vp.settings import Settings, SettingsError, load_settings, settings_from_dump
from sa2vp_cli.main import app

TINY_VIT = {
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.weights": "random",
    "backbone.img_size": 16,
    "backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
}  # 4×4 grid
# Cross stage 1 of this Swin: a 32/4/2 = 4×4 grid.
TINY_SWIN = {
    "backbone.name": "swin_tiny_patch4_window7_224",
    "backbone.weights": "random",
    "backbone.img_size": 32,
    "backbone.model_kwargs": {"embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2], "window_size": 4},
}


def invoke(folder: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """The `sa2vp` app in this process, run in `folder`; asserts the project's one-line refusal (exit 2)."""
    monkeypatch.chdir(folder)
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 2, (done.exit_code, done.output, done.exception)
    assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0].removeprefix("error: ")


def commands_with_params() -> list[list[str]]:
    """Every command that takes -p/--params, with a placeholder for each required argument."""
    found = []

    def walk(command: Any, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if any(param.name == "params" for param in command.params):
            found.append([*path, *("x" for param in command.params if param.required)])

    walk(typer.main.get_command(app), [])
    return found


# --- item 2: a params file that was named must exist --------------------------------------------------------


@pytest.mark.parametrize("command", commands_with_params(), ids=" ".join)
def test_a_named_params_file_that_is_missing_is_refused_by_every_command(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The invalid --set makes the old behaviour (the defaults, silently) fail fast with another message.
    message = invoke(tmp_path, monkeypatch, *command, "-p", "parms.yaml", "--set", "model.sa2vp.gamma=-1")
    assert message.startswith("parms.yaml: settings file not found"), message
    assert list(tmp_path.iterdir()) == []


def test_only_the_implicit_params_yaml_may_be_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = {" ".join(part for part in command if part != "x") for command in commands_with_params()}
    assert {"train", "tune", "ui", "model summary", "data prepare", "suite run"} <= names, names  # found them all
    named = invoke(
        tmp_path, monkeypatch, "model", "summary", "--params", "params.yaml", "--set", "model.sa2vp.gamma=-1"
    )
    assert named.startswith("params.yaml: settings file not found"), named
    implicit = invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.sa2vp.gamma=-1")
    assert implicit.startswith("--set model.sa2vp.gamma:"), implicit  # no file: the built-in defaults, then --set
    (tmp_path / "folder.yaml").mkdir()
    assert "folder.yaml: is not a file" in invoke(tmp_path, monkeypatch, "model", "summary", "-p", "folder.yaml")


def test_a_missing_set_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = invoke(tmp_path, monkeypatch, "train", "--set-file", "runs/tune/bset.yaml")
    assert message == "--set-file runs/tune/bset.yaml: file not found"
    assert list(tmp_path.iterdir()) == []


# --- item 5: a window larger than the token grid --------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, grid, where",
    [
        (TINY_VIT, "4×4", "vit_tiny_patch16_224"),
        (TINY_SWIN, "4×4", "cross stage 1 of swin_tiny_patch4_window7_224"),
    ],
)
def test_a_window_larger_than_the_token_grid_is_refused(backbone: dict[str, Any], grid: str, where: str) -> None:
    build_model(load_settings(None, {**backbone, "model.sa2vp.window": 7}), 3)  # 2·4−1 reaches every token: allowed
    with pytest.raises(SettingsError) as error:
        build_model(load_settings(None, {**backbone, "model.sa2vp.window": 9}), 3)
    assert str(error.value) == (
        f"model.sa2vp.window: 9 is larger than the {grid} token grid of {where}; allowed: odd "
        "1…7 (2·4−1, which already covers the whole grid) or 'global'"
    )


def test_the_command_refuses_a_window_of_99_on_an_8x8_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = json.dumps(TINY_VIT["backbone.model_kwargs"])
    message = invoke(
        tmp_path,
        monkeypatch,
        "model",
        "summary",
        "--set",
        "backbone.name=vit_tiny_patch16_224",
        "--set",
        "backbone.weights=random",
        "--set",
        "backbone.img_size=32",
        "--set",
        f"backbone.model_kwargs={kwargs}",
        "--set",
        "model.sa2vp.window=99",
    )
    assert message.startswith(
        "model.sa2vp.window: 99 is larger than the 8×8 token grid of vit_tiny_patch16_224; allowed: odd 1…15"
    ), message


# --- item 8: the search space is checked before the study exists ---------------------------------------------


@pytest.mark.parametrize(
    "space, expected",
    [
        (
            {"model.gama": {"type": "float", "low": 0.1, "high": 1}},
            "--set tune.space: key 'model.gama' is not a setting; did you mean model.sa2vp.gamma?",
        ),
        (
            {"model.sa2vp.window": {"type": "choice", "choices": [3, 4]}},
            "tune.space: model.sa2vp.window: the value 4 is not allowed: model.sa2vp.window: must be an odd integer",
        ),
        (
            {"model.sa2vp.window": {"type": "int", "low": 1, "high": 5}},  # step 1 samples even windows
            "tune.space: model.sa2vp.window: the value 2 is not allowed",
        ),
        (
            {"model.sa2vp.lam": {"type": "float", "low": 0.5, "high": 2}},
            "tune.space: model.sa2vp.lam: the value 2.0 is not allowed: "
            "model.sa2vp.lam: Input should be less than or equal to 1",
        ),
        (
            {"model.sa2vp.prompt_rank": {"type": "float", "low": 1, "high": 16}},
            "tune.space: model.sa2vp.prompt_rank: the value",
        ),  # floats for an integer setting
        (
            {"train.epochs": {"type": "int", "low": 1, "high": 9}},
            "tune.space: train.epochs cannot be searched (tune.epochs sets a trial's epochs)",
        ),
    ],
)
def test_a_bad_search_space_is_refused_before_the_study_is_written(
    space: dict[str, Any], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = invoke(
        tmp_path,
        monkeypatch,
        "tune",
        "--set",
        f"tune.space={json.dumps(space)}",
        "--set",
        "data.render_size=16",
        "--set",
        "tune.epochs=1",
        "--set",
        "tracking.enabled=false",
    )
    assert message.startswith(expected), message
    assert not (tmp_path / "runs/tune/optuna.journal").exists()
    assert list(tmp_path.iterdir()) == []  # no data prepared either


# --- item 12: the error names the source of the bad value -----------------------------------------------------


def test_errors_name_the_source_of_the_bad_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gamma = "model.sa2vp.gamma: Input should be greater than or equal to 0"
    assert (
        invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.sa2vp.gamma=-1") == f"--set {gamma} (got -1)"
    )
    best = tmp_path / "best.yaml"
    best.write_text("settings:\n  model.sa2vp.gamma: -2\n")
    assert invoke(tmp_path, monkeypatch, "train", "--set-file", "best.yaml") == f"best.yaml: {gamma} (got -2)"
    assert invoke(tmp_path, monkeypatch, "train", "--epochs", "0") == (
        "command line train.epochs: Input should be greater than or equal to 1 (got 0)"
    )
    (tmp_path / "params.yaml").write_text("model:\n  sa2vp:\n    gamma: -3\n    lam: 2\n")
    assert invoke(tmp_path, monkeypatch, "model", "summary") == (
        f"params.yaml: {gamma} (got -3); params.yaml: model.sa2vp.lam: Input should be less than or equal to 1 (got 2)"
    )
    overridden = invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.sa2vp.lam=0.5")
    assert overridden == f"params.yaml: {gamma} (got -3)"
    monkeypatch.setenv("SA2VP_MODEL__SA2VP__GAMMA", "-4")
    assert invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.sa2vp.lam=0.5") == (
        "environment SA2VP_MODEL__SA2VP__GAMMA: Input should be greater than or equal to 0 (got '-4')"
    )


def test_unknown_keys_name_their_source_and_the_likely_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.gama=0.5") == (
        "--set model.gama: unknown setting; did you mean model.sa2vp.gamma?"
    )
    assert invoke(tmp_path, monkeypatch, "model", "summary", "--set", "modle.gamma=0.5") == (
        "--set modle.gamma: unknown setting; did you mean model.sa2vp.gamma?"
    )
    (tmp_path / "params.yaml").write_text("train:\n  warmup_epoch: 1\n")
    assert invoke(tmp_path, monkeypatch, "model", "summary") == (
        "params.yaml: train.warmup_epoch: unknown setting; did you mean train.warmup_epochs?"
    )


def test_a_misspelt_environment_section_is_refused_not_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA2VP_MODLE__GAMMA", "0.5")  # pydantic-settings reads only known sections' variables
    with pytest.raises(
        SettingsError,
        match=r"^environment SA2VP_MODLE__GAMMA: unknown setting modle.gamma; "
        r"did you mean model.sa2vp.gamma\?",
    ):
        load_settings(None)


def test_an_unreadable_set_value_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model.sa2vp.deep_layers=[4, 8")
    assert message.startswith("--set model.sa2vp.deep_layers: the value '[4, 8' is not valid YAML"), message


def test_a_setting_below_one_given_a_value_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = invoke(tmp_path, monkeypatch, "model", "summary", "--set", "model=1", "--set", "model.sa2vp.gamma=0.5")
    assert message == "--set model.sa2vp.gamma: model is given the value 1, not a section of settings", message
    # a deeper setting of a section given as a whole is set in it, as in the file's own sections
    settings = load_settings(None, {"model": {"sa2vp": {"lam": 0.5}}, "model.sa2vp.gamma": 0.25, "tune.space": None})
    assert (settings.model.sa2vp.lam, settings.model.sa2vp.gamma) == (0.5, 0.25)
    assert load_settings(None, {"tune.space": None, "tune.space.model.sa2vp.lam": None}).tune.space == {
        "model": {"sa2vp": {"lam": None}}
    }


def test_saved_settings_do_not_change_with_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    dump = load_settings(None, {"backbone.model_kwargs": {"depth": 2}}).model_dump(mode="json")
    monkeypatch.setenv("SA2VP_MODEL__SA2VP__GAMMA", "-1")  # would make the artifact's settings invalid
    monkeypatch.setenv("SA2VP_BACKBONE__MODEL_KWARGS", '{"patch_size": 8}')  # would be merged into its mapping
    restored = settings_from_dump(dump)
    assert restored.model_dump(mode="json") == dump and isinstance(restored, Settings)
    assert yaml.safe_dump(restored.backbone.model_kwargs) == "depth: 2\n"
