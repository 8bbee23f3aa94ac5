"""Artifacts, backbone weights and checkpoints that are damaged, foreign or edited: each is refused with one
line naming the file and what is wrong (exit code 2, no traceback), never used for a quiet wrong answer.

One tiny model is trained once for the module; every test tampers with its own copy of the artifact and runs
`sa2vp predict` and `sa2vp evaluate` on it (the Typer app, in-process).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from sa2vp.engine import fit
from sa2vp.engine.artifact import read_record, save_artifact, validate_record
from sa2vp.errors import ArtifactError
from sa2vp.models import build_model
from tests.train_fixtures import TINY_PARAMS, digits_root, invoke_sa2vp, tiny_settings  # noqa: F401  (fixtures)

# Changes a copied artifact folder (or writes a file); what it returns (write_bytes' count) is ignored.
Tamper = Callable[[Path], object]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> tuple[Path, Any]:
    """(project folder, fit result) of a one-epoch tiny SA²VP on digits, untracked."""
    project = tmp_path_factory.mktemp("artifact-project")
    params = json.loads(json.dumps(TINY_PARAMS))
    params["data"]["root"] = str(digits_root)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    settings = tiny_settings(project, **{"train.epochs": 1, "train.warmup_epochs": 0, "tracking.enabled": False})
    return project, fit(settings)


@pytest.fixture()
def image(digits_root: Path) -> Path:
    return next((digits_root / "digits" / "images" / "4").glob("*.png"))


def copy_artifact(trained: tuple[Path, Any], tmp_path: Path, tamper: Tamper | None = None) -> Path:
    folder = shutil.copytree(trained[1].artifact, tmp_path / "model")
    if tamper is not None:
        tamper(folder)
    return folder


def assert_refused(result: Any, *fragments: str) -> None:
    """Exit code 2, one `error: …` line on stderr holding every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def predict_and_evaluate(project: Path, folder: Path, image: Path, *extra: str) -> list[Any]:
    return [
        invoke_sa2vp(project, "predict", str(folder), str(image), *extra, check=False),
        invoke_sa2vp(project, "evaluate", str(folder), *extra, check=False),
    ]


def edit_record(change: Callable[[dict[str, Any]], None]) -> Tamper:
    def tamper(folder: Path) -> None:
        record = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        change(record)
        (folder / "model.json").write_text(json.dumps(record), encoding="utf-8")

    return tamper


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], object]) -> Tamper:
    def tamper(folder: Path) -> None:
        tensors = _read(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, str(folder / "model.safetensors"))

    return tamper


def replace_weights(write: Tamper) -> Tamper:
    return lambda folder: write(folder / "model.safetensors")


def _read(path: Path) -> dict[str, torch.Tensor]:
    # Copies: load_file maps the file, which is about to be overwritten.
    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


def _pickled_tensors(path: Path) -> None:
    torch.save(_read(path), path)  # the same tensors, pickled: never unpickled


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- the untampered copy works (so that every refusal below is about the tampering) ----------------------------


def test_an_untampered_copy_predicts_and_evaluates(trained, tmp_path: Path, image: Path) -> None:
    project, result = trained
    folder = copy_artifact(trained, tmp_path)
    predicted, evaluated = predict_and_evaluate(project, folder, image)
    assert predicted.exit_code == 0 and image.name in predicted.stdout, predicted.output
    assert evaluated.exit_code == 0 and f"top-1 {100 * result.test.top1:.2f} %" in evaluated.stdout, evaluated.output


def _as_format_1(record: dict[str, Any]) -> None:
    """The record as format 1 wrote it: SA²VP's settings flat in the `model:` section."""
    model = record["settings"]["model"]
    record["settings"]["model"] = {**{k: v for k, v in model.items() if k != "sa2vp"}, **model["sa2vp"]}
    record["format"] = "sa2vp-artifact/1"


def test_an_artifact_of_format_1_loads_with_the_same_settings_and_metrics(trained, tmp_path: Path) -> None:
    project, result = trained
    folder = copy_artifact(trained, tmp_path, edit_record(_as_format_1))
    _, upgraded = read_record(folder / "model.json")
    _, current = read_record(Path(result.artifact) / "model.json")
    assert upgraded.settings == current.settings and upgraded.format == "sa2vp-artifact/2"
    evaluated = invoke_sa2vp(project, "evaluate", str(folder), check=False)
    assert evaluated.exit_code == 0 and f"top-1 {100 * result.test.top1:.2f} %" in evaluated.stdout, evaluated.output
    # A value off its default is moved, not dropped for the default.
    document = json.loads((folder / "model.json").read_text())
    document["settings"]["model"]["gamma"] = 0.7
    assert validate_record(document, folder / "model.json").settings.model.sa2vp.gamma == 0.7


# --- model.json: every field the model depends on is required and validated ------------------------------------

RECORD_TAMPERING: dict[str, tuple[Callable[[dict[str, Any]], None], tuple[str, ...]]] = {
    "no backbone.sha256": (lambda r: r["backbone"].pop("sha256"), ("backbone.sha256", "missing")),
    "no backbone": (lambda r: r.pop("backbone"), ("backbone", "missing")),
    "no classes": (lambda r: r.pop("classes"), ("classes", "missing")),
    "no settings": (lambda r: r.pop("settings"), ("settings", "missing")),
    "no data_config": (lambda r: r.pop("data_config"), ("data_config", "missing")),
    "no transform": (lambda r: r.pop("transform"), ("transform", "missing")),
    "no dataset.manifest_hash": (lambda r: r["dataset"].pop("manifest_hash"), ("dataset.manifest_hash", "missing")),
    "sha256 not a hash": (lambda r: r["backbone"].update(sha256="abc"), ("backbone.sha256",)),
    "backbone.name not the settings'": (
        lambda r: r["backbone"].update(name="vit_small_patch16_224"),
        ("backbone.name", "settings.backbone.name"),
    ),
    "one class": (lambda r: r.update(classes=["0"]), ("classes",)),
    "repeated class": (lambda r: r["classes"].__setitem__(1, "0"), ("classes", "unique")),
    "class not text": (lambda r: r["classes"].__setitem__(1, 1), ("classes.1",)),
    "invalid setting": (lambda r: r["settings"]["model"].update(window=4), ("settings", "model.sa2vp.window")),
    "unknown transform": (lambda r: r.update(transform="imagenet"), ("transform",)),
    "std of zero": (lambda r: r["data_config"].update(std=[0.5, 0.0, 0.5]), ("data_config.std",)),
    "other input size": (lambda r: r["data_config"].update(input_size=[3, 32, 32]), ("data_config.input_size",)),
    "unknown field": (lambda r: r.update(clases=r["classes"]), ("clases", "unknown field")),
    "other format": (lambda r: r.update(format="sa2vp-artifact/0"), ("format",)),
    "empty object": (lambda r: r.clear(), ("format",)),
}


@pytest.mark.parametrize("case", RECORD_TAMPERING)
def test_an_edited_record_is_refused_naming_model_json_and_the_field(
    trained, tmp_path: Path, image: Path, case: str
) -> None:
    change, fragments = RECORD_TAMPERING[case]
    folder = copy_artifact(trained, tmp_path, edit_record(change))
    for result in predict_and_evaluate(trained[0], folder, image):
        assert_refused(result, str(folder / "model.json"), *fragments)


def test_a_record_without_its_backbone_hash_is_refused_even_with_other_backbone_weights(
    trained, tmp_path: Path, image: Path
) -> None:
    # The drill: with sha256 removed, other weights gave other probabilities and no error.
    other = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=16, **TINY_PARAMS["backbone"]["model_kwargs"]
    )
    weights = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    folder = copy_artifact(trained, tmp_path, edit_record(lambda r: r["backbone"].pop("sha256")))
    for result in predict_and_evaluate(trained[0], folder, image, "--backbone-weights", str(weights)):
        assert_refused(result, "model.json", "backbone.sha256")


def test_evaluate_refuses_split_lists_other_than_the_recorded_ones(trained, tmp_path: Path, image: Path) -> None:
    folder = copy_artifact(
        trained, tmp_path, edit_record(lambda r: r["dataset"].update(manifest_hash="sha256:" + "0" * 64))
    )
    predicted, evaluated = predict_and_evaluate(trained[0], folder, image)
    assert predicted.exit_code == 0, predicted.output  # predict reads no dataset
    assert_refused(evaluated, "content_hash", "not the ones the model was trained and tested on")


# --- model.safetensors: only safetensors, and exactly the model's trainable tensors ----------------------------

WEIGHTS_TAMPERING: dict[str, tuple[Tamper, tuple[str, ...]]] = {
    "pickle (torch.save)": (replace_weights(_pickled_tensors), ("not a safetensors file", "pickled")),
    "random bytes": (replace_weights(lambda p: p.write_bytes(os.urandom(4096))), ("not a safetensors file",)),
    "empty": (replace_weights(lambda p: p.write_bytes(b"")), ("not a safetensors file",)),
    "truncated": (replace_weights(_cut_in_half), ("not a safetensors file",)),
    "missing": (replace_weights(lambda p: p.unlink()), ("missing",)),
    "wrong shape": (
        edit_tensors(lambda t: t.update({"head.weight": torch.zeros(3, 3)})),
        ("head.weight", "[3, 3]", "do not fit"),
    ),
    "wrong dtype": (
        edit_tensors(lambda t: t.update({"head.weight": t["head.weight"].double()})),
        ("head.weight", "torch.float64", "do not fit"),
    ),
    "a tensor missing": (edit_tensors(lambda t: t.pop("head.bias")), ("missing head.bias",)),
    "an extra tensor": (
        edit_tensors(lambda t: t.update({"extra.weight": torch.zeros(2)})),
        ("unexpected extra.weight",),
    ),
    "not finite": (
        edit_tensors(lambda t: t["head.bias"].__setitem__(0, float("nan"))),
        ("head.bias", "NaN or infinite"),
    ),
}


@pytest.mark.parametrize("case", WEIGHTS_TAMPERING)
def test_damaged_or_foreign_trained_weights_are_refused_naming_the_file(
    trained, tmp_path: Path, image: Path, case: str
) -> None:
    tamper, fragments = WEIGHTS_TAMPERING[case]
    folder = copy_artifact(trained, tmp_path, tamper)
    for result in predict_and_evaluate(trained[0], folder, image):
        assert_refused(result, str(folder / "model.safetensors"), *fragments)


# --- --backbone-weights: only safetensors or Google's .npz, never a pickle -----------------------------------------


def _pickle_zip(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path)


def _pickle_legacy(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)


BACKBONE_FILES: dict[str, tuple[str, Tamper, tuple[str, ...]]] = {
    "torch.save renamed .safetensors": (".safetensors", _pickle_zip, ("not a safetensors file", "pickled")),
    "legacy pickle renamed .safetensors": (".safetensors", _pickle_legacy, ("not a safetensors file", "pickled")),
    "torch.save renamed .npz": (".npz", _pickle_zip, ("not of NumPy arrays", "torch.save")),
    "random bytes .npz": (".npz", lambda p: p.write_bytes(os.urandom(4096)), ("not an .npz archive",)),
    "empty .safetensors": (".safetensors", lambda p: p.write_bytes(b""), ("not a safetensors file",)),
}


@pytest.mark.parametrize("case", BACKBONE_FILES)
def test_backbone_weights_that_are_not_safetensors_or_npz_are_refused(
    trained, tmp_path: Path, image: Path, case: str
) -> None:
    suffix, write, fragments = BACKBONE_FILES[case]
    weights = tmp_path / f"backbone{suffix}"
    write(weights)
    folder = copy_artifact(trained, tmp_path)
    for result in predict_and_evaluate(trained[0], folder, image, "--backbone-weights", str(weights)):
        assert_refused(result, str(weights), "--backbone-weights", "only safetensors files", *fragments)


# --- writing: an artifact that could not be loaded is never written ----------------------------------------------


def test_save_artifact_refuses_a_record_that_would_not_load(trained, tmp_path: Path) -> None:
    _, record = read_record(trained[1].artifact)
    # model_copy does not validate: a record can be made that the reader would refuse (no backbone hash).
    unhashed = record.model_copy(update={"backbone": record.backbone.model_copy(update={"sha256": None})})
    with pytest.raises(ArtifactError, match="model.json: backbone.sha256: Input should be a valid string"):
        save_artifact(tmp_path / "model", build_model(record.settings, len(record.classes)), unhashed)
    assert not (tmp_path / "model").exists()


# --- --resume: a damaged checkpoint is one line ------------------------------------------------------------------


def _truncated_checkpoint(trained: tuple[Path, Any]) -> Tamper:
    data = (trained[1].output / "checkpoint.pt").read_bytes()
    return lambda path: path.write_bytes(data[: len(data) // 2])


CHECKPOINTS: dict[str, tuple[Callable[[tuple[Path, Any]], Tamper], tuple[str, ...]]] = {
    "truncated": (_truncated_checkpoint, ("not a readable sa2vp checkpoint",)),
    "empty": (lambda _: lambda p: p.write_bytes(b""), ("empty or cut short",)),
    "a pickled object": (lambda _: lambda p: torch.save(Path("x"), p), ("nothing else is ever unpickled",)),
    "a foreign dict": (lambda _: lambda p: torch.save({"model": {}}, p), ("missing optimizer",)),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_resume_from_a_damaged_checkpoint_is_one_line(trained, tmp_path: Path, case: str) -> None:
    make, fragments = CHECKPOINTS[case]
    output = tmp_path / "run"
    output.mkdir()
    make(trained)(output / "checkpoint.pt")
    result = invoke_sa2vp(
        trained[0], "train", "--resume", "--output", str(output), "--set", "tracking.enabled=false", check=False
    )
    assert_refused(result, str(output / "checkpoint.pt"), *fragments)
