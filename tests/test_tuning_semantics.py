"""How tuning treats the settings a user gives (issue 14): a searched setting given a value is pinned — left
out of the search, used as given —; the search itself changes with one `--set tune.space.…`; and a study
resumes only with the settings it was made with. Last, the README's `dvc exp run -S ++model.sa2vp.gamma=0.5` for
real, in a copy of the repository."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from sa2vp.settings import Choice, FloatRange, SettingsError, load_settings
from sa2vp.tuning import given_settings, plan_search
from tests.test_pipeline import BIN, TINY, _copy_repository, _env
from tests.train_fixtures import digits_root, experiment_id, invoke_sa2vp, project  # noqa: F401  (fixtures)

FAST = ["--set", "tune.epochs=1", "--set", "tune.pruner=none", "--set", "train.batch_size=128"]


def _study(project: Path, name: str = "s", journal: str = "runs/study.journal") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(project / journal))))


def _params_without(project: Path, *dotted: str, **given: Any) -> None:
    """The project's params.yaml less some keys, plus others (dotted)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key in dotted:
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section.get(part) or {}
        section.pop(leaf, None)
    for key, value in given.items():
        *parents, leaf = key.split("__")
        section = params
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _trial_runs(project: Path, parent_name: str) -> tuple[Any, list[Any]]:
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([experiment_id(client, "tests")])
    (parent,) = [run for run in runs if run.info.run_name == parent_name]
    return parent, [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


# --- item 1: a setting given a value is pinned -----------------------------------------------------------------


def test_a_searched_setting_given_by_set_or_params_is_pinned_and_recorded(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _params_without(project, "model.sa2vp.window", "train.lr", model__sa2vp__lam=0.9)  # λ given in params.yaml
    caplog.set_level(logging.INFO, logger="sa2vp.tune")
    done = invoke_sa2vp(
        project,
        "tune",
        "--n-trials",
        "1",
        "--study-name",
        "s",
        "--storage",
        "runs/study.journal",
        "--set",
        "model.sa2vp.gamma=0.5",
        *FAST,
    )
    assert "0.5 (pinned)" in done.stdout
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("searching "))
    assert plan.endswith("; pinned model.sa2vp.gamma=0.5 (--set), model.sa2vp.lam=0.9 (params.yaml)"), plan
    assert "model.sa2vp.window {1, 3, 5, 7} from 3" in plan and "train.lr 0.0001…0.02 log from 0.001" in plan, plan
    study = _study(project)
    assert [set(t.params) for t in study.trials] == [{"model.sa2vp.window", "train.lr"}]
    best = yaml.safe_load((project / "runs/tune/best.yaml").read_text())
    assert best["settings"]["model.sa2vp.gamma"] == 0.5 and best["settings"]["model.sa2vp.lam"] == 0.9
    assert best["pinned"] == {
        "model.sa2vp.gamma": {"value": 0.5, "from": "--set"},
        "model.sa2vp.lam": {"value": 0.9, "from": "params.yaml"},
    }
    assert set(best["tuned"]) == {"model.sa2vp.window", "train.lr"}
    parent, trials = _trial_runs(project, "tune-s")
    assert json.loads(parent.data.params["search.pinned"])["model.sa2vp.gamma"] == {"value": 0.5, "from": "--set"}
    assert set(json.loads(parent.data.params["search.tuned"])) == {"model.sa2vp.window", "train.lr"}
    assert [(run.data.params["model.sa2vp.gamma"], run.data.params["model.sa2vp.lam"]) for run in trials] == [
        ("0.5", "0.9")
    ]


def test_one_set_of_tune_space_changes_the_search_and_its_start(project: Path) -> None:
    _params_without(project, "model.sa2vp.window", "train.lr")
    invoke_sa2vp(
        project,
        "tune",
        "--n-trials",
        "2",
        "--study-name",
        "s",
        "--storage",
        "runs/study.journal",
        "--set",
        "tune.space.model.sa2vp.gamma.low=1.2",
        "--set",
        "tune.space.model.sa2vp.window.choices=[1, 5]",
        "--set",
        "tune.space.train.lr.start=0.003",
        "--set",
        "tune.space.model.sa2vp.lam=null",
        *FAST,
    )
    trials = _study(project).trials
    assert all(set(t.params) == {"model.sa2vp.gamma", "model.sa2vp.window", "train.lr"} for t in trials)
    assert all(1.2 <= t.params["model.sa2vp.gamma"] <= 2.0 for t in trials)  # the method's high, the new low
    assert all(t.params["model.sa2vp.window"] in (1, 5) for t in trials)
    # the first trial: lr at its start; γ's default 0.1 and c = 3 are outside the new ranges, so sampled
    assert trials[0].params["train.lr"] == 0.003


def test_the_plan_rules() -> None:
    # a setting given a value and given a range by tune.space is searched, from its value
    settings = load_settings(
        None,
        {
            "model.sa2vp.gamma": 0.3,
            "tune.space": {"model": {"sa2vp": {"gamma": {"high": 0.9}}}},
            "train.lr": 0.002,
            "model.sa2vp.lam": 0.7,
        },
    )
    plan = plan_search(settings, given_settings(settings, {"model.sa2vp.gamma": "--set", "train.lr": "--set"}))
    gamma = plan.space["model.sa2vp.gamma"]
    assert isinstance(gamma, FloatRange) and gamma.high == 0.9 and gamma.log  # merged into the method's
    assert plan.start["model.sa2vp.gamma"] == 0.3 and plan.pinned == {"train.lr": "--set", "model.sa2vp.lam": "given"}
    # a start alone does not unpin: the value given wins
    settings = load_settings(None, {"train.lr": 0.002, "tune.space.train.lr.start": 0.005})
    assert plan_search(settings, given_settings(settings)).pinned == {"train.lr": "given"}
    # a whole new dimension, its kind from `choices`; one the method lacks needs its kind
    settings = load_settings(None, {"tune.space.model.sa2vp.prompt_rank.choices": [8, 16]})
    rank = plan_search(settings).space["model.sa2vp.prompt_rank"]
    assert isinstance(rank, Choice) and rank.choices == [8, 16]
    with pytest.raises(SettingsError, match="method 'sa2vp' does not search model.sa2vp.adapter_dim; give its type"):
        plan_search(load_settings(None, {"tune.space.model.sa2vp.adapter_dim.low": 4}))
    with pytest.raises(SettingsError, match="tune.space.model.sa2vp.window: a choice dimension has no low"):
        plan_search(load_settings(None, {"tune.space.model.sa2vp.window.low": 1}))
    with pytest.raises(SettingsError, match="tune.space: key 'model.gama' is not a setting; did you mean"):
        load_settings(None, {"tune.space.model.gama.high": 1})
    # an ablation in a suite stays pinned even when tune.space ranges it
    settings = load_settings(None, {"model.sa2vp.window": "global", "tune.space.model.sa2vp.window.choices": [1, 3]})
    plan = plan_search(settings, pinned={"model.sa2vp.window": "suite.overrides.global"})
    assert "model.sa2vp.window" not in plan.space and plan.values == {"model.sa2vp.window": "global"}


def test_the_source_of_a_pinned_setting_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text("model:\n  sa2vp:\n    lam: 0.7\n")
    monkeypatch.setenv("SA2VP_MODEL__SA2VP__GAMMA", "0.4")
    settings = load_settings(tmp_path / "p.yaml", {"train.lr": 0.01})
    given = given_settings(settings, {"train.lr": "best.yaml"}, tmp_path / "p.yaml")
    assert plan_search(settings, given).pinned == {
        "model.sa2vp.gamma": "environment SA2VP_MODEL__SA2VP__GAMMA",
        "model.sa2vp.lam": str(tmp_path / "p.yaml"),
        "train.lr": "best.yaml",
    }


# --- item 2: a study resumes only with the settings it was made with ------------------------------------------


def _tune(project: Path, *args: str, check: bool = True) -> Any:
    return invoke_sa2vp(
        project,
        "tune",
        "--study-name",
        "s",
        "--storage",
        "runs/study.journal",
        "--set",
        "tracking.enabled=false",
        "--set",
        "tune.pruner=none",
        *args,
        check=check,
    )


def test_resuming_a_study_with_other_settings_is_refused_and_writes_nothing(project: Path) -> None:
    _tune(project, "--n-trials", "1", "--set", "tune.epochs=1")
    journal = project / "runs/study.journal"
    before, best = journal.read_bytes(), (project / "runs/tune/best.yaml").read_bytes()
    refused = _tune(project, "--n-trials", "1", "--set", "tune.epochs=2", check=False)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip() == (
        "error: tune.storage runs/study.journal: study 's' was run with other settings (train.epochs 1 → 2); "
        "resume it with the same ones, or --set tune.study_name=<new name> starts another study beside it, or "
        "delete runs/study.journal"
    )
    assert journal.read_bytes() == before and (project / "runs/tune/best.yaml").read_bytes() == best
    # a search of other settings is another study too: its trials' parameters would not fit the old ones
    refused = _tune(project, "--n-trials", "1", "--set", "tune.epochs=1", "--set", "model.sa2vp.gamma=0.5", check=False)
    assert refused.exit_code == 2 and "(model.sa2vp.gamma searched 0.01…2 log → 0.5); resume" in refused.stderr
    assert journal.read_bytes() == before


def test_resuming_with_the_same_settings_continues_the_study(project: Path) -> None:
    _tune(project, "--n-trials", "1", "--set", "tune.epochs=1")
    study = _study(project)
    assert study.user_attrs["sa2vp_settings"]["train.epochs"] == 1  # what the trials train with, recorded
    assert len(study.user_attrs["sa2vp_settings_sha256"]) == 64
    # settings that do not change what a trial scores may change: the study's trials (2: one more), workers,
    # tracking, the start
    _tune(
        project,
        "--n-trials",
        "2",
        "--set",
        "tune.epochs=1",
        "--set",
        "train.num_workers=1",
        "--set",
        "tune.space.model.sa2vp.gamma.start=0.2",
        "--set",
        "train.epochs=7",
    )
    assert [t.number for t in _study(project).trials] == [0, 1]


def test_a_study_without_a_record_of_its_settings_is_not_resumed(project: Path) -> None:
    journal = project / "runs/study.journal"
    journal.parent.mkdir(parents=True)
    old = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(journal))))
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    before = journal.read_bytes()
    refused = _tune(project, "--n-trials", "1", "--set", "tune.epochs=1", check=False)
    assert refused.exit_code == 2 and "has 1 trials but no record of the settings" in refused.stderr
    assert journal.read_bytes() == before


# --- the README's example, for real ------------------------------------------------------------------------------


@pytest.mark.slow  # a DVC experiment end to end: dvc, then each stage a process of its own
def test_dvc_exp_run_pins_gamma(tmp_path: Path) -> None:
    """`dvc exp run -S ++model.sa2vp.gamma=0.5` in a copy of the repository, on a tiny backbone and budget: the
    tuning leaves γ out, best.yaml says so, and the final training uses γ = 0.5."""
    import timm
    from safetensors.torch import save_file

    repo = _copy_repository(tmp_path / "repo")
    kwargs = TINY["backbone.model_kwargs"]
    assert isinstance(kwargs, dict)
    weights = repo / "backbones" / "tiny.safetensors"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["backbone"].update(
        model_kwargs=kwargs,
        weights="backbones/tiny.safetensors",
        sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )
    params["train"]["epochs"] = 1
    params["tune"].update(n_trials=1, epochs=1)
    assert "gamma" not in params["model"]  # searched by default: the repository's file leaves it out
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **_env(),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "tiny"], cwd=repo, check=True, env=env)
    done = subprocess.run(
        [str(BIN / "dvc"), "exp", "run", "-S", "++model.sa2vp.gamma=0.5", "train"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "pinned model.sa2vp.gamma=0.5 (params.yaml)" in done.stdout + done.stderr
    best = yaml.safe_load((repo / "runs/tune/best.yaml").read_text())
    assert "model.sa2vp.gamma" not in best["tuned"] and best["pinned"]["model.sa2vp.gamma"] == {
        "value": 0.5,
        "from": "params.yaml",
    }
    assert best["tuned"]["train.lr"]["start"] == 0.005  # the file's tune.space: lr searched, first at 0.005
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([experiment_id(client, "sa2vp")])
    finals = [run for run in runs if run.data.params.get("train.train_split") == "trainval"]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    assert len(finals) == 1 and finals[0].data.params["model.sa2vp.gamma"] == "0.5"
    assert trials and all(run.data.params["model.sa2vp.gamma"] == "0.5" for run in trials)
    # DVC deletes a stage's outs before it reruns it (unless persist): the journal is one, so every `dvc repro` /
    # `dvc exp run` of the tune stage starts a fresh study rather than being refused a resume with other settings.
    outs = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["tune"]["outs"]
    (journal,) = [out["${tune.storage}"] for out in outs if isinstance(out, dict) and "${tune.storage}" in out]
    assert not journal.get("persist", False)
