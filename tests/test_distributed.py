"""One training run over several processes (DDP under torchrun, Gloo on this CPU): the global batch and the
weights of one process, one MLflow run and one artifact, a kill and `--resume` under torchrun; and, in-process,
the batch shares and shards every rank takes and the one-line refusals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from sa2vp.engine import fit
from sa2vp.engine.checkpoint import load_checkpoint
from sa2vp.engine.distributed import BatchShard, BatchShare, replicas_for
from sa2vp.settings import SettingsError
from tests.train_fixtures import SA2VP, TINY_PARAMS, digits_root, experiment_id, tiny_settings  # noqa: F401

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
EPOCHS = 2
# digits' train split has 1,259 images: 19 batches of 64 and a last one of 43, which 2 processes share 22 / 21.
# No dropout: each process draws its own dropout masks, which one process cannot reproduce.
PARAMS: dict[str, Any] = {
    **TINY_PARAMS,
    "model": {"backbone_dropout": "off", "sa2vp": {"window": 3, "dropout": 0.0}},
    "train": {
        **TINY_PARAMS["train"],
        "epochs": EPOCHS,
        "eval_batch_size": 64,  # val: 3 batches, test: 6, shared by the ranks
        "cpu_threads": 1,
    },
}


# --- in-process: the batches each rank takes -------------------------------------------------------------------


class _Indices(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def _epoch_batches(loader: DataLoader, seed: int) -> list[list[int]]:
    loader.generator.manual_seed(seed)  # as the trainer seeds each epoch
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize(("size", "batch", "world"), [(43, 8, 2), (41, 8, 4), (37, 12, 3)])
def test_the_ranks_shares_partition_the_single_process_batches(size: int, batch: int, world: int) -> None:
    """Each rank's loader (same generator, same epoch seed) takes its share of the very batches one process's
    DataLoader(shuffle=True) makes; the shares partition each batch; a rank with nothing left in the last batch
    gets one image to weigh zero."""
    dataset = _Indices(size)
    single = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator())
    samplers, loaders = [], []
    for rank in range(world):
        generator = torch.Generator()
        samplers.append(BatchShare(RandomSampler(dataset, generator=generator), batch, rank, world))
        loaders.append(DataLoader(dataset, batch_sampler=samplers[-1], generator=generator))
    for epoch in (1, 2):
        expected = _epoch_batches(single, epoch)
        shares = [_epoch_batches(loader, epoch) for loader in loaders]
        assert all(len(own) == len(expected) for own in shares)
        for index, global_batch in enumerate(expected):
            counts = [sampler.share(index) for sampler in samplers]
            assert {total for _, total in counts} == {len(global_batch)}
            counted = [image for own, (count, _) in zip(shares, counts, strict=True) for image in own[index][:count]]
            assert sorted(counted) == sorted(global_batch)  # each image of the batch exactly once
            for own, (count, _) in zip(shares, counts, strict=True):
                assert len(own[index]) == max(count, 1) and set(own[index]) <= set(global_batch)
    last = size % batch
    if last < world:  # ranks with an empty share of the last batch: one image each, weighed zero
        assert [sampler.share(len(expected) - 1) for sampler in samplers].count((0, last)) == world - last


def test_the_ranks_evaluate_disjoint_single_process_batches() -> None:
    dataset = _Indices(23)
    single = list(BatchSampler(SequentialSampler(dataset), 5, drop_last=False))
    shards = [list(BatchShard(SequentialSampler(dataset), 5, rank, 2)) for rank in range(2)]
    assert [len(BatchShard(SequentialSampler(dataset), 5, rank, 2)) for rank in range(2)] == [3, 2]
    assert sorted(shards[0] + shards[1]) == single


def test_a_batch_that_does_not_split_or_a_fixed_gpu_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SettingsError) as refused:
        replicas_for("cpu", 30)
    line = str(refused.value)
    assert "train.batch_size=30" in line and "WORLD_SIZE=4" in line and "divisible by 4" in line, line
    assert "\n" not in line
    with pytest.raises(SettingsError, match=r"train.device='cuda:1'.*LOCAL_RANK"):
        replicas_for("cuda:1", 32)
    replicas = replicas_for("cpu", 32)
    assert (replicas.rank, replicas.world, replicas.device.type, replicas.backend) == (1, 4, "cpu", "gloo")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: the plain single-process run
    assert not replicas_for("cpu", 30).distributed


# --- torchrun: real processes ------------------------------------------------------------------------------------


def _project(folder: Path, data_root: Path) -> Path:
    params = yaml.safe_load(yaml.safe_dump(PARAMS))
    params["data"]["root"] = str(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return folder


def _torchrun(project: Path, *args: str) -> subprocess.Popen[str]:
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", SA2VP, "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(run: subprocess.Popen[str]) -> str:
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    return output


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers run in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _kill_after_first_checkpoint(run: subprocess.Popen[str], output: Path) -> None:
    """SIGKILL torchrun and its workers (a machine lost) once the first epoch's checkpoint is written."""
    deadline = time.monotonic() + 240
    while not (output / "checkpoint.pt").exists():
        assert run.poll() is None, run.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    workers = _children(run.pid)
    for pid in [*workers, run.pid]:
        os.kill(pid, signal.SIGKILL)
    run.communicate()
    deadline = time.monotonic() + 30
    while any(_state(pid) not in ("gone", "Z") for pid in workers):  # orphans: init reaps them
        assert time.monotonic() < deadline, "torchrun's workers outlived the kill"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def _weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> dict[str, Any]:
    """The same training three ways: one process (in this one), 2 processes under torchrun, and 2 processes
    killed after the first checkpoint and resumed under torchrun. The uninterrupted torchrun runs in the
    background meanwhile; the one to kill starts only when this process can watch it (started before the
    single-process run, on a busy machine it had passed its last checkpoint before the watch began)."""
    base = tmp_path_factory.mktemp("distributed")
    whole, killed, single = (_project(base / name, digits_root) for name in ("whole", "killed", "single"))
    uninterrupted = _torchrun(whole)
    threads = torch.get_num_threads()
    try:
        settings = tiny_settings(single)
        reference = fit(settings)
    finally:
        torch.set_num_threads(threads)  # the run set 1 (train.cpu_threads); later tests in this process keep theirs
    interrupted = _torchrun(killed)
    _kill_after_first_checkpoint(interrupted, killed / "runs" / "train")
    stopped_at = load_checkpoint(killed / "runs" / "train")["state"]["epoch"]
    resumed = _torchrun(killed, "--resume")
    return {
        "single": (settings, reference),
        "whole": (whole, _finished(uninterrupted)),
        "killed": (killed, _finished(resumed), stopped_at),
    }


def _store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _the_run(project: Path) -> Any:
    """The one MLflow run in the project's store: a run over 2 processes, 32 images each per batch of 64."""
    client = _store(project)
    (run,) = client.search_runs([experiment_id(client)])
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2" and run.data.tags["distributed.batch_per_rank"] == "32"
    return run


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(runs: dict[str, Any]) -> None:
    settings, _ = runs["single"]
    whole, output = runs["whole"]
    _the_run(whole)  # one run over 2 processes (2 independent single-process runs would train these weights too)
    assert "2 processes (torchrun, gloo)" in output, output
    one, two = _weights(settings.train.output), _weights(whole / "runs" / "train")
    assert one.keys() == two.keys()
    for name in one:
        # Sums over the batch taken in another order: float rounding, measured ≤ 1e-6. Shares of the last, uneven
        # batch weighed equally instead of by their size (22 / 21 images) move weights by 6e-4.
        assert torch.allclose(one[name], two[name], rtol=0, atol=2e-5), (name, (one[name] - two[name]).abs().max())


@pytest.mark.slow
def test_two_processes_make_one_mlflow_run_and_one_artifact_with_the_metrics_of_one(runs: dict[str, Any]) -> None:
    settings, reference = runs["single"]
    whole, output = runs["whole"]
    client = _store(whole)
    run = _the_run(whole)
    assert output.count("artifact: ") == 1 and output.count("MLflow: run ") == 1, output
    assert output.count(f"epoch 1/{EPOCHS}  loss") == 1, output  # rank 0's log lines only
    assert sorted(p.name for p in (whole / "runs").iterdir()) == ["train"]
    assert sorted(p.name for p in (whole / "runs" / "train" / "model").iterdir()) == [
        "model.json",
        "model.safetensors",
    ]
    with contextlib.chdir(whole):  # params.yaml's store is relative: its artifacts are beside it
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == [
            "model/model.json",
            "model/model.safetensors",
        ]
    single = _store(settings.train.output.parent.parent)
    (expected,) = single.search_runs([experiment_id(single)])
    for key in ("val/top1", "val/mean_class", "test/top1", "test/mean_class", "test/prompt_top1"):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == [(m.step, m.value) for m in single.get_metric_history(expected.info.run_id, key)], key
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    expected_losses = single.get_metric_history(expected.info.run_id, "train/loss")
    assert [m.value for m in losses] == pytest.approx([m.value for m in expected_losses], abs=1e-5)
    assert reference.test is not None and run.data.metrics["test/top1"] == reference.test.top1


@pytest.mark.slow
def test_a_torchrun_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(runs: dict[str, Any]) -> None:
    killed, output, stopped_at = runs["killed"]
    whole, _ = runs["whole"]
    assert 1 <= stopped_at < EPOCHS  # killed mid-run, after a checkpoint
    assert f"epoch {stopped_at}/{EPOCHS}  loss" not in output and f"epoch {EPOCHS}/{EPOCHS}  loss" in output, output
    resumed, uninterrupted = _weights(killed / "runs" / "train"), _weights(whole / "runs" / "train")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    client = _store(killed)
    run = _the_run(killed)  # the killed run, continued
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")] == list(range(1, EPOCHS + 1))
