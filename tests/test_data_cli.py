"""`sa2vp data …` through the real entry point (typer's CliRunner), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sa2vp_cli.main import app
from tests.data_fixtures import make_image_folder, make_vtab_task, zip_folder

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # data/ and params.yaml are relative to the working directory


def test_list_shows_registry() -> None:
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    for name in ("vtab-svhn", "vtab-smallnorb-ele", "fgvc-stanford-cars", "hta-gtsrb", "digits", "folder:<path>"):
        assert name in result.output
    fgvc = runner.invoke(app, ["data", "list", "--group", "fgvc", "--details"])
    assert fgvc.exit_code == 0 and "Wah et al." in fgvc.output and "vtab-svhn:" not in fgvc.output


def test_prepare_digits_offline(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "digits", "--seed", "5", "--set", "data.render_size=16"])
    assert result.exit_code == 0, result.output
    assert "train 1,259" in result.stdout and "data/splits/digits/holdout-seed5" in result.stdout
    assert "rendering digits" in result.stderr  # plain progress lines when not on a terminal
    manifest = json.loads((tmp_path / "data/splits/digits/holdout-seed5/manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["prepared"]["render_size"] == 16
    again = runner.invoke(app, ["data", "prepare", "digits", "--seed", "5", "--set", "data.render_size=16"])
    assert again.exit_code == 0 and "rendering" not in again.stderr  # complete: not redone


def test_prepare_reads_params_file_and_options_win(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "my images", {"a": 5, "b": 5})
    (tmp_path / "params.yaml").write_text(f"data:\n  dataset: 'folder:{images}'\n  seed: 3\n")
    result = runner.invoke(app, ["data", "prepare", "--seed", "4"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "data/splits").glob("folder-my images-*")  # keyed by a hash of the absolute path
    assert (folder / "holdout-seed4/train.txt").is_file()


def test_download_from_local_archive(tmp_path: Path) -> None:
    make_vtab_task(tmp_path / "pub", "resisc45", num_classes=45, train=1, val=1, test=1)
    archive = zip_folder(tmp_path / "pub", tmp_path / "vtab-1k.zip", "vtab-1k/")
    result = runner.invoke(app, ["data", "download", "resisc45", "--from", str(archive)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data/vtab-1k/resisc45/train800.txt").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data", "prepare", "svnh"], "unknown dataset 'svnh'; did you mean"),
        (["data", "prepare", "vtab-dtd", "--protocol", "fgvc"], "not available for vtab-dtd; allowed: vtab1k"),
        (["data", "prepare", "folder:nowhere"], "nowhere: image folder not found"),
        (["data", "download", "svhn", "--from", "missing.zip"], "data.source=missing.zip: no such file"),
        (["data", "prepare", "nabirds"], "must be downloaded by hand"),
        (["data", "prepare", "digits", "--set", "data.val_fraction=2"], "data.val_fraction"),
    ],
)
def test_expected_errors_are_one_line_exit_2(args: list[str], expected: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
