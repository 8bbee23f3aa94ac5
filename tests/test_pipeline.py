"""The declarative pipelines for real: in a temporary copy of the repository (tiny budget), the offline
backbone's own pipeline (pipelines/backbone), then `dvc repro` of the main pipeline on the file it made, the
MLflow store it filled, DVC's metrics, and a second `dvc repro` that has nothing to do; then every benchmark
suite under pipelines/ on fabricated tiny data in the real on-disk formats: the two offline suites in that copy,
the four paper suites meanwhile in a second copy, where they share one pipeline and one backbone file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.data_fixtures import make_cifar10, make_cub_images, make_vtab_task, write_vpt_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    "train.epochs": 1,
    "tune.n_trials": 2,
    "tune.epochs": 1,
    # One torch thread a process: the two copies reproduce side by side on a 2-core machine, and threads
    # competing for cores burn CPU for nothing on models this small.
    "train.cpu_threads": 1,
}
# The offline backbone's pretraining (pipelines/backbone/params.yaml), cut to seconds; one thread, so that every
# paper suite's backbone stage writes the same bytes (as the hub download does).
TINY_PRETRAIN = {"images_per_class": 20, "eval_images_per_class": 5, "epochs": 1, "classes": 8, "threads": 1}
# What each `dvc repro` printed (the fixtures' runs, read by the tests).
LOGS: dict[str, str] = {}


def _copy_repository(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def _set(params: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, env=_env(), timeout=600
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    return experiment.experiment_id


@pytest.fixture(scope="module")
def paper_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A second copy where the four paper suites reproduce meanwhile (a second core's worth of work)."""
    project = _copy_repository(tmp_path_factory.mktemp("paper-repo"))
    for suite in PAPER_SUITES:
        _tiny_suite(project, suite)
    # each suite is a DVC project of its own: one `dvc --cd pipelines/<suite> repro` each, one after the other
    script = " && ".join(f"dvc --cd pipelines/{suite} repro" for suite in PAPER_SUITES)
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()
    )
    yield project, process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def reproduced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if any("suites" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("paper_repository")  # started first: it reproduces while this copy does
    project = _copy_repository(tmp_path_factory.mktemp("repo"))
    # The committed offline backbone's pipeline, on the tiny architecture: it writes the file the main one uses.
    made = yaml.safe_load((project / "pipelines/backbone/params.yaml").read_text())
    made["backbone"]["model_kwargs"] = TINY["backbone.model_kwargs"]
    made["backbone"]["pretrain"].update(TINY_PRETRAIN)
    (project / "pipelines/backbone/params.yaml").write_text(yaml.safe_dump(made, sort_keys=False))
    LOGS["backbone"] = _dvc(project, "--cd", "pipelines/backbone", "repro").stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in TINY.items():
        _set(params, key, value)
    # the main pipeline pins the file that pipeline wrote
    _set(params, "backbone.sha256", hashlib.sha256((project / params["backbone"]["weights"]).read_bytes()).hexdigest())
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    LOGS["main"] = _dvc(project, "repro").stdout
    return project


def test_the_backbone_pipeline_makes_the_file_and_the_main_pipeline_uses_it_without_pretraining(
    reproduced: Path,
) -> None:
    assert "Running stage 'pretrain'" in LOGS["backbone"]
    assert "source-task accuracy" in LOGS["backbone"]
    # upstream of the main pipeline (its stages depend on the file) and up to date: not rerun
    assert "Running stage 'tune'" in LOGS["main"]
    assert "Running stage 'pretrain'" not in LOGS["main"]
    status = _dvc(reproduced, "--cd", "pipelines/backbone", "status")
    assert "up to date" in status.stdout.lower()


def test_dvc_repro_fills_mlflow_with_the_tuning_study_its_trials_and_the_final_run(
    reproduced: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(reproduced)  # the store's artifact paths are relative to its folder
    client = MlflowClient(f"sqlite:///{reproduced / 'mlflow.db'}")
    runs = client.search_runs([_experiment_id(client, "sa2vp")])
    by_name = {run.info.run_name: run for run in runs}
    (parent,) = [run for name, run in by_name.items() if name.startswith("tune-")]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    assert "best_val_top1" in parent.data.metrics and "best.model.sa2vp.gamma" in parent.data.tags
    assert {"tuning/optimization_history.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "tuning")}
    finals = [
        run
        for run in runs
        if run.data.params.get("train.train_split") == "trainval" and run.data.params.get("model.method") == "sa2vp"
    ]
    assert len(finals) == 1 and "test/top1" in finals[0].data.metrics
    assert {a.path for a in client.list_artifacts(finals[0].info.run_id, "model")} == {
        "model/model.json",
        "model/model.safetensors",
    }
    best = yaml.safe_load((reproduced / "runs/tune/best.yaml").read_text())["settings"]
    assert float(finals[0].data.params["model.sa2vp.gamma"]) == pytest.approx(best["model.sa2vp.gamma"])


def test_dvc_metrics_and_a_second_repro_that_does_nothing(reproduced: Path) -> None:
    # The evaluate stages recompute each final run's test metrics exactly: what the run itself recorded.
    for name, run in (("sa2vp", "final"), ("linear", "linear")):
        recorded = json.loads((reproduced / f"runs/{run}/model/model.json").read_text())["training"]["test"]
        assert json.loads((reproduced / f"metrics/{name}.json").read_text()) == {"test": recorded}
    shown = _dvc(reproduced, "metrics", "show", "--json")
    assert "metrics/sa2vp.json" in shown.stdout
    plots = json.loads(_dvc(reproduced, "plots", "show", "--json").stdout)
    assert not plots.get("errors") and {"training loss", "learning rate", "plots/sa2vp/confusion.csv"} <= set(
        plots["data"]
    ), plots
    curve = json.dumps(plots["data"]["training loss"][0]["content"]["data"]["values"])
    # DVC labels each file by the shortest part of its path that tells them apart
    assert "final/history.csv" in curve and "linear/history.csv" in curve and "train/loss" in curve
    again = _dvc(reproduced, "repro")  # (its `dvc status`: test_the_root_project_shows_the_main_pipeline_only)
    assert "Running stage" not in again.stdout, again.stdout


# --- the benchmark suites ---------------------------------------------------------------------------------

PAPER_SUITES = ("vtab1k", "fgvc", "hta", "ablation")  # one pipeline, one backbone file: the copy's models/

# The paper suites' backbone section, tiny: the one file they share, made by each suite's backbone stage.
TINY_BACKBONE = {
    "name": "vit_tiny_patch16_224",
    "img_size": 16,
    "model_kwargs": TINY["backbone.model_kwargs"],
    "origin": "synthetic",
    "pretrain": TINY_PRETRAIN,
    "weights": "../../models/backbone.safetensors",
}


# The tests of the suites' runs: every suite in two copies of the repository at once, its cells side by side.
# They start several processes (the CI runs them; `-m "not slow"` skips them, and the paper repository with them).
suites_run = pytest.mark.slow


def _suite_file(root: Path, suite: str, name: str) -> Path:
    return root / "pipelines" / suite / name


def test_the_paper_suites_share_one_pipeline_and_one_backbone_file() -> None:
    """What a paper suite runs is its params.yaml alone: its dvc.yaml is the others', byte for byte (copies, not
    symlinks: DVC reads a symlink at another git revision as the path it points to), and its backbone is the
    others' — one git-ignored file in the repository's models/, named after it, not copied into DVC's caches."""
    pipelines = {suite: _suite_file(REPO, suite, "dvc.yaml") for suite in PAPER_SUITES}
    first = PAPER_SUITES[0]
    for suite, path in pipelines.items():
        assert not path.is_symlink() and path.read_bytes() == pipelines[first].read_bytes(), (
            f"pipelines/{suite}/dvc.yaml differs from pipelines/{first}/dvc.yaml: the paper suites share one "
            "pipeline (a difference belongs in a suite's params.yaml); copy the one you changed to the others"
        )
    backbones = {
        suite: yaml.safe_load(_suite_file(REPO, suite, "params.yaml").read_text())["backbone"] for suite in PAPER_SUITES
    }
    assert all(backbone == backbones[first] for backbone in backbones.values()), backbones
    shared = backbones[first]
    weights = (REPO / "pipelines" / first / shared["weights"]).resolve()
    assert weights == REPO / "models" / f"{shared['name']}.safetensors"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(weights.relative_to(REPO))], cwd=REPO, check=False)
    assert ignored.returncode == 0, f"{weights} is not git-ignored"
    stage = yaml.safe_load(pipelines[first].read_text())["stages"]["backbone"]
    assert stage["outs"] == [{"${backbone.weights}": {"cache": False, "persist": True}}], stage


def _fabricate_vtab(data: Path) -> None:
    make_vtab_task(data / "vtab-1k", "svhn", num_classes=10, train=3, val=2, test=2)


def _fabricate_cub(data: Path) -> None:
    folder = data / "fgvc" / "CUB_200_2011"
    write_vpt_json(folder, make_cub_images(folder, per_class=3))


# suite → (datasets, variants, seeds, tune, data it needs in place); one cell each keeps the test short
SUITE_CELLS = {
    "vtab1k": (["vtab-svhn"], ["sa2vp"], [42], True, _fabricate_vtab),
    "fgvc": (["fgvc-cub200"], ["lora"], [42], False, _fabricate_cub),
    "hta": (
        ["hta-cifar10"],
        ["adaptformer"],
        [42],
        False,
        lambda data: make_cifar10(data / "torchvision" / "cifar10", per_batch=10),
    ),
    "ablation": (["vtab-svhn"], ["no-adapter"], [42], False, _fabricate_vtab),
    # linear: the one that trains 0 %; two cells, reproduced side by side (`_reproduce_cells_side_by_side`)
    "offline": (["shapes-count"], ["linear", "sa2vp"], [0, 1], False, None),
    "offline-explain": (["digits"], ["no-backbone-dropout"], [0], False, None),
}


def _tiny_suite(project: Path, suite: str) -> None:
    """The suite's params.yaml on the tiny backbone and its cells, and its data fabricated in place."""
    datasets, variants, seeds, tune, fabricate = SUITE_CELLS[suite]
    folder = project / "pipelines" / suite
    params = yaml.safe_load((folder / "params.yaml").read_text())
    if suite.startswith("offline"):  # the main pipeline's backbone section, as in the repository (the file it pins)
        main = yaml.safe_load((project / "params.yaml").read_text())["backbone"]
        params["backbone"] = {**main, "weights": params["backbone"]["weights"]}
    else:
        params["backbone"] = dict(TINY_BACKBONE)
    # fabricated CIFAR batches cannot match the publisher's checksums
    params["data"] = {**params["data"], "render_size": 16, "verify_checksums": suite != "hta"}
    params["train"] = {
        **params.get("train", {}),
        "epochs": 1,
        "batch_size": 16,
        "warmup_epochs": 0,
        "num_workers": 0,
        "cpu_threads": TINY["train.cpu_threads"],
    }
    params["tune"] = {**params.get("tune", {}), "n_trials": 1, "epochs": 1}
    params["suite"] = {**params["suite"], "datasets": datasets, "variants": variants, "seeds": seeds, "tune": tune}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if fabricate is not None:
        fabricate(folder / "data")


@pytest.fixture(scope="module")
def suites(reproduced: Path, paper_repository: tuple[Path, subprocess.Popen[str]]) -> dict[str, Path]:
    """Every suite reproduced: the offline ones (on the main pipeline's backbone) here, the paper ones in the
    paper repository. Returns each suite's repository."""
    offline = [suite for suite in SUITE_CELLS if suite not in PAPER_SUITES]
    for suite in offline:
        _tiny_suite(reproduced, suite)
        if suite == "offline":
            _reproduce_cells_side_by_side(reproduced, suite)
        else:
            _dvc(reproduced, "--cd", f"pipelines/{suite}", "repro")
    paper, process = paper_repository
    LOGS["paper"], _ = process.communicate(timeout=600)
    assert process.returncode == 0, f"dvc repro (paper repository):\n{LOGS['paper']}"
    return {suite: paper if suite in PAPER_SUITES else reproduced for suite in SUITE_CELLS}


def _reproduce_cells_side_by_side(project: Path, suite: str) -> None:
    """A suite's cells on several workers, as the README's "Running on a cluster" has it: one `dvc repro
    --single-item run@<cell>` per cell, all at once (sharing the data folder and the MLflow store, each creating
    them if missing), then `dvc repro`, which finds the cells done and runs the report."""
    datasets, variants = SUITE_CELLS[suite][:2]
    cells = [f"run@{dataset}-{variant}" for dataset in datasets for variant in variants]
    command = [str(BIN / "dvc"), "--wait-for-lock", "--cd", f"pipelines/{suite}", "repro", "--single-item"]
    workers = {
        cell: subprocess.Popen(
            [*command, cell], cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()
        )
        for cell in cells
    }
    for cell, worker in workers.items():
        LOGS[cell], _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, f"dvc repro --single-item {cell}:\n{LOGS[cell]}"
    LOGS[f"{suite} report"] = _dvc(project, "--cd", f"pipelines/{suite}", "repro").stdout


@suites_run
def test_a_suites_cells_run_side_by_side_and_the_report_collects_them(suites: dict[str, Path]) -> None:
    datasets, variants = SUITE_CELLS["offline"][:2]
    for cell in (f"run@{dataset}-{variant}" for dataset in datasets for variant in variants):
        assert f"Running stage 'pipelines/offline/dvc.yaml:{cell}'" in LOGS[cell] or f"'{cell}'" in LOGS[cell]
    report = LOGS["offline report"]
    assert "Running stage" in report and "'report'" in report and "run@" not in report.split("Running stage")[1]
    # the table's rows and the MLflow runs of every cell: test_each_suite_runs_its_cells_and_writes_its_table


@suites_run
@pytest.mark.parametrize("suite", list(SUITE_CELLS))
def test_each_suite_runs_its_cells_and_writes_its_table(
    suites: dict[str, Path], suite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets, variants, seeds, _, _ = SUITE_CELLS[suite]
    folder = suites[suite] / "pipelines" / suite
    table = (folder / "report" / "results.md").read_text()
    for variant in variants:
        assert f"| {variant} |" in table
    header = table.splitlines()[4]
    assert all(f" {dataset} " in header for dataset in datasets), header
    for dataset in datasets:
        for variant in variants:
            result = json.loads((folder / "results" / dataset / variant / "result.json").read_text())
            assert result["seeds"] == seeds and len(result["test_top1"]) == len(seeds)
            assert (result["trainable_percent"] > 0) == (variant != "linear") and result["trainable_percent"] < 100
    monkeypatch.chdir(suites[suite])  # the store's artifact paths are relative to its folder
    client = MlflowClient(f"sqlite:///{suites[suite] / 'mlflow.db'}")  # every suite logs to the repository's store
    experiment = _experiment_id(client, suite)
    (report,) = client.search_runs([experiment], f"attributes.run_name = 'suite-{suite}'")
    assert {"results.md", "results.csv"} <= {a.path for a in client.list_artifacts(report.info.run_id)}
    runs = client.search_runs([experiment])
    finals = [run for run in runs if run.data.params.get("train.train_split") == "trainval"]
    assert len(finals) == len(datasets) * len(variants) * len(seeds)


@suites_run
def test_suite_cells_get_the_groups_settings_and_are_tuned(suites: dict[str, Path]) -> None:
    client = MlflowClient(f"sqlite:///{suites['vtab1k'] / 'mlflow.db'}")
    (final,) = client.search_runs(
        [_experiment_id(client, "vtab1k")], "attributes.run_name = 'vtab1k/vtab-svhn/sa2vp/seed-42'"
    )
    assert final.data.params["model.sa2vp.prompt_rank"] == "8"  # vtab-natural's release value, from suite.overrides
    result = json.loads((suites["vtab1k"] / "pipelines/vtab1k/results/vtab-svhn/sa2vp/result.json").read_text())
    assert set(result["tuned"]) == {"model.sa2vp.gamma", "model.sa2vp.lam", "model.sa2vp.window", "train.lr"}
    assert result["val_top1"] is not None
    assert final.data.params["model.sa2vp.gamma"] == str(result["tuned"]["model.sa2vp.gamma"])
    ablation = json.loads(
        (suites["ablation"] / "pipelines/ablation/results/vtab-svhn/no-adapter/result.json").read_text()
    )
    assert ablation["method"] == "sa2vp" and ablation["trainable_percent"] < result["trainable_percent"]


@suites_run
def test_a_second_suite_repro_does_nothing(suites: dict[str, Path]) -> None:
    again = _dvc(suites["offline"], "--cd", "pipelines/offline", "repro")
    assert "Running stage" not in again.stdout, again.stdout


@suites_run
def test_the_paper_suites_make_one_backbone_file_and_stay_up_to_date(suites: dict[str, Path]) -> None:
    """Each paper suite's backbone stage ran once and wrote the same bytes to the one shared file (outside the
    suites, not in their DVC caches): the first suite, rerun after the other three, has nothing to do."""
    project = suites[PAPER_SUITES[0]]
    shared = project / "models" / "backbone.safetensors"
    md5 = hashlib.md5(shared.read_bytes()).hexdigest()
    assert LOGS["paper"].count("Running stage 'backbone'") == len(PAPER_SUITES), LOGS["paper"]
    for suite in PAPER_SUITES:
        lock = yaml.safe_load(_suite_file(project, suite, "dvc.lock").read_text())["stages"]
        (out,) = lock["backbone"]["outs"]
        assert (out["path"], out["md5"]) == (TINY_BACKBONE["weights"], md5), (suite, out)
        assert not _suite_file(project, suite, "models").exists()
        assert not _suite_file(project, suite, f".dvc/cache/files/md5/{md5[:2]}/{md5[2:]}").exists()
    again = _dvc(project, "--cd", f"pipelines/{PAPER_SUITES[0]}", "repro")
    assert "Running stage" not in again.stdout, again.stdout


@suites_run
def test_the_root_project_shows_the_main_pipeline_only(suites: dict[str, Path]) -> None:
    """The suites are DVC projects of their own: after they ran, the root's status, DAG and experiment table
    know nothing of them (a user's `dvc status` stays a screenful)."""
    root = suites["offline"]
    status = _dvc(root, "status").stdout
    assert "up to date" in status.lower() and "pipelines/" not in status, status
    dag = _dvc(root, "dag", "--md").stdout
    assert "pipelines/" not in dag and "run@" not in dag and "linear-probe" in dag, dag
    assert "suite.variants" not in _dvc(root, "params", "diff", "--all", "--md").stdout
