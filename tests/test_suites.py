"""Benchmark suites in-process: which settings a cell gets, what tuning may search, and the results table
(the suites' DVC pipelines themselves run in tests/test_pipeline.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sa2vp.engine.artifact import read_record
from sa2vp.models.backbones import create_backbone, data_config, weights_digest
from sa2vp.settings import SettingsError, load_settings
from sa2vp.suites import CellResult, cell_dir, cell_search_space, cell_settings, read_results, run_cell, write_report
from tests.train_fixtures import digits_root, project  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SUITES = ("vtab1k", "fgvc", "hta", "ablation", "offline", "offline-explain")


def _suite(tmp_path: Path, **suite: object):
    values = {
        "suite.name": "t",
        "suite.output": str(tmp_path / "results"),
        "suite.report": str(tmp_path / "report"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment": "suites",
    }
    return load_settings(None, {**values, **{f"suite.{k}": v for k, v in suite.items()}})


def test_a_cell_applies_group_then_dataset_then_variant_settings(tmp_path: Path) -> None:
    settings = _suite(
        tmp_path,
        datasets=["vtab-svhn", "vtab-eurosat"],
        variants=["sa2vp", "lora", "global"],
        overrides={
            "vtab-natural": {"model.sa2vp.gamma": 0.1, "train.lr": 0.002},
            "vtab-svhn": {"train.lr": 0.0005},
            "global": {"model.sa2vp.window": "global", "model.sa2vp.gamma": 0.7},
        },
    )
    svhn = cell_settings(settings, "vtab-svhn", "global")
    assert (svhn.model.method, svhn.model.sa2vp.window, svhn.model.sa2vp.gamma, svhn.train.lr) == (
        "sa2vp",
        "global",
        0.7,
        0.0005,
    )
    assert svhn.data.dataset == "vtab-svhn" and svhn.tune.study_name == "t-vtab-svhn-global"
    assert Path(svhn.tune.storage) == cell_dir(settings, "vtab-svhn", "global") / "tune" / "optuna.journal"
    eurosat = cell_settings(settings, "vtab-eurosat", "lora")  # specialized: no natural-group values
    assert (eurosat.model.method, eurosat.model.sa2vp.gamma, eurosat.train.lr) == ("lora", 0.1, 0.001)
    with pytest.raises(SettingsError, match="variant 'vpt-deep': not in suite.variants"):
        cell_settings(settings, "vtab-svhn", "vpt-deep")
    with pytest.raises(SettingsError, match="dataset 'vtab-dtd': not in suite.datasets"):
        cell_settings(settings, "vtab-dtd", "sa2vp")


def test_variants_must_be_methods_or_have_settings() -> None:
    with pytest.raises(SettingsError, match=r"suite: variants \['typo'\]: each must be a method"):
        load_settings(None, {"suite.variants": ["sa2vp", "typo"]})
    with pytest.raises(SettingsError, match="key 'gamma': expected a dotted setting"):
        load_settings(None, {"suite.overrides": {"x": {"gamma": 1}}})


@pytest.mark.parametrize("suite", SUITES)
def test_each_committed_suite_is_valid_settings(suite: str) -> None:
    settings = load_settings(REPO / "pipelines" / suite / "params.yaml")
    written = yaml.safe_load((REPO / "pipelines" / suite / "params.yaml").read_text())["suite"]
    # DVC interpolates and tracks these from the file itself (it never sees the schema's defaults)
    assert {"datasets", "variants", "seeds", "tune", "overrides", "output", "report"} <= set(written)
    file = yaml.safe_load((REPO / "pipelines" / suite / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "pipelines" / suite / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for key in stage.get("params", []):
            section, *rest = key.split(".")
            assert section in file and (not rest or rest[0] in file[section]), f"{suite}: {key} not in params.yaml"
    assert settings.suite.name == suite and settings.suite.datasets and settings.suite.variants
    for dataset in settings.suite.datasets:
        for variant in settings.suite.variants:
            cell_settings(settings, dataset, variant)  # every cell's settings validate


@pytest.mark.parametrize("suite", ["offline", "offline-explain"])
def test_the_offline_suites_use_the_main_pipelines_backbone(suite: str) -> None:
    root = load_settings(REPO / "params.yaml").backbone
    offline = load_settings(REPO / "pipelines" / suite / "params.yaml").backbone
    weights = (REPO / root.weights).resolve()
    assert (REPO / "pipelines" / suite / offline.weights).resolve() == weights
    assert (offline.sha256, offline.origin, offline.pretrain) == (root.sha256, root.origin, root.pretrain)
    # the root names the architecture (offline_vit12); a suite may give it as timm arguments: the same network
    used, run = (create_backbone(b.model_copy(update={"weights": str(weights)})) for b in (root, offline))
    assert weights_digest(used) == weights_digest(run) and repr(used) == repr(run)
    assert data_config(used) == data_config(run)


def test_the_offline_comparison_tunes_every_method_with_the_same_budget_over_its_learning_rate() -> None:
    settings = load_settings(REPO / "pipelines/offline/params.yaml")
    assert settings.suite.tune and settings.tune.pruner == "none" and len(settings.suite.seeds) == 3
    for variant in settings.suite.variants:
        cell = cell_settings(settings, "digits", variant)
        assert "train.lr" in cell_search_space(settings, cell, variant), variant
        assert (cell.tune.n_trials, cell.tune.epochs) == (settings.tune.n_trials, settings.tune.epochs)


def test_an_ablation_pins_its_settings_and_a_method_variant_only_starts_from_them(tmp_path: Path) -> None:
    settings = _suite(
        tmp_path,
        datasets=["digits"],
        variants=["full", "global"],
        overrides={"full": {"train.lr": 0.0002}, "global": {"model.sa2vp.window": "global"}},
    )
    full = cell_settings(settings, "digits", "full")
    assert full.train.lr == 0.0002 and set(cell_search_space(settings, full, "full")) == {"train.lr"}
    ablation = cell_settings(settings, "digits", "global")
    assert ablation.model.sa2vp.window == "global"
    assert set(cell_search_space(settings, ablation, "global")) == {"model.sa2vp.gamma", "model.sa2vp.lam", "train.lr"}


def test_a_cell_makes_the_final_run_per_seed_and_records_it_from_the_artifacts(project: Path) -> None:
    values = {"suite.datasets": ["digits"], "suite.variants": ["sa2vp"], "suite.seeds": [1, 2], "suite.tune": False}
    settings = load_settings(
        project / "params.yaml",
        {**values, "suite.output": str(project / "results"), "train.epochs": 1, "tracking.enabled": False},
    )
    result = run_cell(settings, "digits", "sa2vp")
    folder = cell_dir(settings, "digits", "sa2vp")
    assert CellResult.read(folder / "result.json") == result
    for index, seed in enumerate([1, 2]):
        _, record = read_record(folder / f"seed-{seed}" / "model")
        train = record.settings.train
        assert (train.train_split, train.val_split, train.test_split, train.seed) == ("trainval", None, "test", seed)
        assert record.training is not None and record.training.test is not None
        assert result.test_top1[index] == record.training.test.top1
        assert result.test_pathways_top1["prompt"][index] == record.training.test_pathways["prompt"].top1
        assert not (folder / f"seed-{seed}" / "checkpoint.pt").exists()  # the artifact stays, resume state not
    assert record.trainable is not None
    assert (result.trainable_parameters, result.trainable_percent) == (
        record.trainable.parameters,
        record.trainable.percent_of_backbone,
    )


def _write_result(
    settings,
    dataset: str,
    variant: str,
    group: str,
    top1: list[float],
    percent: float,
    pathways: dict[str, list[float]] | None = None,
) -> None:
    result = CellResult(
        dataset=dataset,
        group=group,
        variant=variant,
        method=variant,
        seeds=[0, 1, 2][: len(top1)],
        test_top1=top1,
        test_mean_class=top1,
        trainable_parameters=100,
        trainable_percent=percent,
        tuned={},
        val_top1=None,
        test_pathways_top1=pathways or {},
    )
    folder = cell_dir(settings, dataset, variant)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result.as_dict()))


def test_the_report_has_the_papers_layout_and_lands_in_mlflow(tmp_path: Path) -> None:
    settings = _suite(
        tmp_path, datasets=["vtab-svhn", "vtab-dtd", "vtab-eurosat"], variants=["linear", "sa2vp"], seeds=[0, 1]
    )
    with pytest.raises(SettingsError, match="no result for vtab-svhn / linear"):
        read_results(settings)
    for variant, shift, percent in (("linear", 0.0, 0.0), ("sa2vp", 0.1, 0.433)):
        prompt = {"prompt": [0.2, 0.3]} if variant == "sa2vp" else None
        _write_result(settings, "vtab-svhn", variant, "vtab-natural", [0.5 + shift, 0.6 + shift], percent, prompt)
        _write_result(settings, "vtab-dtd", variant, "vtab-natural", [0.3 + shift, 0.3 + shift], percent)
        _write_result(settings, "vtab-eurosat", variant, "vtab-specialized", [0.8 + shift, 0.9 + shift], percent)
    report = write_report(settings)

    lines = report.markdown.read_text().splitlines()
    header = [c.strip() for c in lines[4].strip("|").split("|")]
    assert header == [
        "variant",
        "params %",
        "vtab-svhn",
        "vtab-dtd",
        "vtab-eurosat",
        "vtab-natural mean",
        "vtab-specialized mean",
        "mean",
    ]
    sa2vp = [c.strip() for c in lines[7].strip("|").split("|")]
    # svhn 65 ± 7.07 (two seeds), natural mean (65 + 40) / 2, specialized 95, overall (65 + 40 + 95) / 3
    assert sa2vp == ["sa2vp", "0.433", "65.00 ± 7.07", "40.00 ± 0.00", "95.00 ± 7.07", "52.50", "95.00", "66.67"]
    # The prompt pathway alone, where a cell measured it (svhn's SA²VP only): mean 25 %.
    assert "| sa2vp (prompt pathway) | 25.00 | — | — |" in lines
    rows = list(csv.DictReader(report.csv.open()))
    assert [r["variant"] for r in rows] == ["linear", "sa2vp"]
    assert (
        float(rows[1]["vtab-svhn prompt pathway"]) == pytest.approx(0.25) and rows[0]["vtab-svhn prompt pathway"] == ""
    )
    assert float(rows[0]["vtab-natural mean"]) == pytest.approx(0.425)

    client = MlflowClient(settings.tracking.uri)
    run = client.get_run(report.run_id)
    assert run.info.run_name == "suite-t"
    assert run.data.metrics["sa2vp/mean"] == pytest.approx(2 / 3, abs=1e-4)
    assert {"results.md", "results.csv", "suite"} <= {a.path for a in client.list_artifacts(report.run_id)}
