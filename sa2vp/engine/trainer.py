"""`fit`: train an adaptation method on a prepared dataset, tracked in MLflow, resumable from any epoch.

One epoch = shuffle (seeded by train.seed and the epoch) → optimiser steps with autocast, gradient accumulation
and the per-step schedule → validation (top-1, mean per-class) → checkpoint → MLflow metrics. The best epoch
on validation is kept (the last one when there is no validation split). At the end the kept weights are
evaluated on the test split and written as the artifact. A killed run continues from its last checkpoint
with `resume=True` and, on the CPU, ends with exactly the metrics of an uninterrupted run; its MLflow run
continues, each epoch's metrics logged once (an epoch is logged after its checkpoint is saved, and a resumed
run first logs the checkpointed epochs its run lacks).

Before any long work, the output folder must be writable and the tracking store usable; temporaries that a
killed run left in the output folder are removed, and its run (if still RUNNING) is marked KILLED.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from sa2vp.data import (
    NO_PROGRESS,
    DataError,
    Manifest,
    Progress,
    ensure_prepared,
    load_split,
    read_manifest,
    split_dir,
)
from sa2vp.engine.artifact import (
    FORMAT,
    ArtifactRecord,
    BackboneRecord,
    DataConfigRecord,
    DatasetRecord,
    MetricsRecord,
    TrainableRecord,
    TrainingRecord,
    build_seeded,
    save_artifact,
)
from sa2vp.engine.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from sa2vp.engine.compile import compile_metrics, compile_model
from sa2vp.engine.distributed import BatchShare, Replicas, replicas_for
from sa2vp.engine.features import probe_on_features
from sa2vp.engine.metrics import Metrics, evaluate_model
from sa2vp.engine.optim import build_optimizer, build_scheduler
from sa2vp.engine.report import write_report
from sa2vp.engine.runtime import Precision, configure_cpu_numerics, resolve_precision
from sa2vp.errors import ArtifactError, TrainingDiverged
from sa2vp.folders import remove_stale_temporaries, writable_problem
from sa2vp.models import AdaptedModel, ParameterSummary, PathwayClassifier, parameter_summary
from sa2vp.models.backbones import data_config, weights_digest
from sa2vp.settings import Settings, SettingsError, flatten_settings, settings_from_dump
from sa2vp.tracking import Run, check_store, disabled_run, start_run

log = logging.getLogger("sa2vp.train")

ARTIFACT_DIR = "model"
# Settings that may change between a killed run and its resumption without changing its result.
RESUMABLE_CHANGES = ("tracking.", "train.num_workers", "train.device", "train.output", "train.eval_batch_size")
# The final run of the protocol (§4): settings chosen on the validation split, then trained on train+val with no
# validation (its last epoch is kept) and tested once. `sa2vp train --final`, the root pipeline's final and
# linear-probe trainings and every suite cell train this way, through `final_settings`.
FINAL_RUN: Mapping[str, str | None] = {
    "train.train_split": "trainval",
    "train.val_split": None,
    "train.test_split": "test",
}


def final_settings(settings: Settings) -> Settings:
    """`settings` with the final run's splits (FINAL_RUN), whatever splits they named; the rest unchanged."""
    return settings_from_dump(settings.model_dump(mode="json"), FINAL_RUN)


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    losses: dict[str, float]
    lr: float
    val: Metrics | None
    seconds: float
    images: int

    def metrics(self) -> dict[str, float]:
        values = {f"train/{name}": value for name, value in self.losses.items()}
        values["lr"] = self.lr
        values["train/images_per_second"] = self.images / max(self.seconds, 1e-9)
        if self.val is not None:
            values.update(self.val.as_dict("val/"))
        return values

    def line(self) -> str:
        parts = "  ".join(f"{name} {value:.4f}" for name, value in self.losses.items())
        val = f"  val top1 {100 * self.val.top1:.2f}%  mean-class {100 * self.val.mean_class:.2f}%" if self.val else ""
        return (
            f"epoch {self.epoch}/{self.epochs}  {parts}  lr {self.lr:.3g}{val}  "
            f"{self.seconds:.1f}s ({self.images / max(self.seconds, 1e-9):.0f} img/s)"
        )


@dataclass
class TrainResult:
    output: Path
    artifact: Path
    run_id: str
    epochs: int  # epochs trained (fewer than train.epochs when stopped early)
    best_epoch: int
    val: Metrics | None
    test: Metrics | None
    stopped_early: bool = False
    test_pathways: dict[str, Metrics] = field(default_factory=dict)  # auxiliary pathways' own test metrics
    rank: int = 0  # under torchrun, this process's; only rank 0 wrote the artifact and the run (run_id "" elsewhere)


# Called after every epoch; returning True stops training there (tuning's pruner uses it).
EpochCallback = Callable[[EpochReport], bool]


def fit(
    settings: Settings,
    *,
    resume: bool = False,
    progress: Progress = NO_PROGRESS,
    on_epoch: EpochCallback | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    run_tags: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `settings.model` on `settings.data` as `settings.train` says; log to `settings.tracking` (`run_tags`:
    more tags of the run, e.g. the tuning trial it is). Under torchrun, one run over all its processes
    (`sa2vp.engine.distributed`)."""
    replicas = replicas_for(settings.train.device, settings.train.batch_size)
    configure_cpu_numerics(
        settings.train.cpu_numerics, replicas.device, settings.train.cpu_threads
    )  # before any tensor op (a checkpoint's load, the process group)
    with replicas.joined():
        return _fit(
            settings,
            replicas,
            resume=resume,
            progress=progress if replicas.is_main else NO_PROGRESS,
            on_epoch=on_epoch,
            parent_run_id=parent_run_id,
            run_name=run_name,
            run_tags=run_tags,
        )


def _fit(
    settings: Settings,
    replicas: Replicas,
    *,
    resume: bool,
    progress: Progress,
    on_epoch: EpochCallback | None,
    parent_run_id: str | None,
    run_name: str | None,
    run_tags: Mapping[str, Any] | None,
) -> TrainResult:
    device = replicas.device
    precision = resolve_precision(settings.train.precision, device)
    checkpoint = load_checkpoint(settings.train.output) if resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint, settings)
    if replicas.is_main:  # the only writer
        _check_destinations(settings)
        for path in remove_stale_temporaries(settings.train.output):
            log.info("removed %s, left by a killed run", path)

    folder = _prepared(settings, progress, replicas)
    manifest = read_manifest(folder)
    model = build_seeded(settings, len(manifest.classes))
    replicas.own_random_stream(settings.train.seed)
    # Before a checkpoint is loaded: with full fine-tuning the backbone's weights are themselves trained, and
    # the digest identifies the weights training started from (what `load_artifact` rebuilds and checks).
    backbone_sha256 = weights_digest(model.backbone, model.backbone_name)
    config = data_config(model.backbone)
    loaders = _loaders(settings, folder, config, device, replicas)
    model.to(device)
    # A linear probe without augmentation trains its head on features computed once; then train.compile.
    model, loaders = probe_on_features(model, loaders, settings, device, precision, progress)
    compile_clock = compile_model(model, settings.train.compile)

    steps_per_epoch = math.ceil(len(loaders["train"]) / settings.train.accumulate)
    optimizer = build_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], settings.train)
    scheduler = build_scheduler(optimizer, settings.train, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_scaler)
    state = _TrainingState()
    if checkpoint is not None:
        model.load_trainable_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = _TrainingState.from_dict(checkpoint["state"])
        _restore_own_rng(checkpoint["rng"], replicas, settings.train.seed)
    net = replicas.wrap(model)  # the training forward: DDP under torchrun (model.loss etc. stay the model's)

    summary = parameter_summary(model)
    name = run_name or settings.tracking.run_name or _default_run_name(settings)
    run = (
        start_run(
            settings.tracking,
            name,
            {**_tags(settings, manifest, backbone_sha256), **(run_tags or {})},
            parent_run_id,
            resume_run_id=state.run_id or None,
            output=Path(settings.train.output).resolve(),
        )
        if replicas.is_main
        else disabled_run()  # one run, rank 0's
    )
    run.set_tags(
        {
            "distributed.world_size": replicas.world,
            "distributed.batch_per_rank": settings.train.batch_size // replicas.world,
        }
    )  # tags, not params: a resumed run may have another world size
    if checkpoint is not None:
        _log_missing_epochs(run, state.history)
    if not state.run_id:  # a new run (also: resumed with tracking enabled after a run without it)
        state.run_id = run.run_id
        run.log_params(
            {
                **flatten_settings(settings),
                "trainable_parameters": summary.trainable,
                "trainable_percent": round(summary.percent_of_backbone, 4),
                "backbone_parameters": summary.backbone,
                "num_classes": len(manifest.classes),
            }
        )
        run.log_metrics({"trainable_parameters": summary.trainable, "trainable_percent": summary.percent_of_backbone})
        run.log_inputs(
            manifest,
            {"train": settings.train.train_split, "val": settings.train.val_split, "test": settings.train.test_split},
        )
    log.info(
        "%s: %s trainable parameters (%.3f %% of the %s-parameter backbone), device %s, %s",
        name,
        f"{summary.trainable:,}",
        summary.percent_of_backbone,
        f"{summary.backbone:,}",
        device,
        precision.name,
    )

    stopped = False
    try:
        for epoch in range(state.epoch + 1, settings.train.epochs + 1):
            report = _train_epoch(
                model,
                loaders,
                optimizer,
                scheduler,
                scaler,
                settings,
                device,
                precision,
                epoch,
                len(manifest.classes),
                progress,
                net,
                replicas,
            )
            state.record(report, model)
            log.info(report.line())
            rng = _every_rank_rng(replicas)
            if replicas.is_main:
                save_checkpoint(
                    settings.train.output,
                    {
                        "model": model.trainable_state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng,
                        "state": state.as_dict(),
                        "settings": flatten_settings(settings),
                    },
                )
            # After the checkpoint: a kill before it reruns this epoch on resume, which must not log it twice.
            run.log_metrics({**report.metrics(), **compile_metrics(compile_clock, epoch)}, step=epoch)
            # Rank 0's decision (tuning's pruner), on every rank: all stop at the same epoch.
            if replicas.main_decides(on_epoch is not None and replicas.is_main and on_epoch(report)):
                stopped = True
                break
        result = _finish(
            model,
            state,
            settings,
            manifest,
            config,
            loaders,
            device,
            precision,
            run,
            summary,
            backbone_sha256,
            progress,
            stopped,
            replicas,
        )
    except BaseException as exc:
        run.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    run.finish("KILLED" if stopped else "FINISHED")
    return result


class _TrainingState:
    """What a checkpoint carries besides tensors: progress, the best epoch so far and its weights."""

    def __init__(self) -> None:
        self.epoch = 0
        self.run_id: str | None = None
        self.best_epoch = 0
        self.best_score = -1.0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_val: Any = None
        self.history: list[dict[str, Any]] = []

    def record(self, report: EpochReport, model: AdaptedModel) -> None:
        self.epoch = report.epoch
        self.history.append({"epoch": report.epoch, **report.metrics()})
        # Keep the best epoch on validation; without validation, the latest.
        score = report.val.top1 if report.val is not None else float(report.epoch)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, report.epoch
            self.best_weights = model.trainable_state_dict()
            self.best_val = None if report.val is None else torch.from_numpy(report.val.confusion)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> _TrainingState:
        state = cls()
        vars(state).update(values)
        return state


def _train_epoch(
    model: AdaptedModel,
    loaders: dict[str, DataLoader],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    settings: Settings,
    device: torch.device,
    precision: Precision,
    epoch: int,
    num_classes: int,
    progress: Progress,
    net: torch.nn.Module,
    replicas: Replicas,
) -> EpochReport:
    """One epoch; `net` is what the forward runs through (`model`, or its DDP wrapper under torchrun)."""
    train = settings.train
    loader = loaders["train"]
    loader.generator.manual_seed(train.seed * 100_003 + epoch)  # the epoch's order, the same after a resume
    model.train()
    sums: dict[str, torch.Tensor] = {}
    images = 0
    start = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    with progress(f"epoch {epoch}/{train.epochs}", len(loader), "batches") as advance:
        for index, (inputs, targets) in enumerate(loader):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            own, total = _share(loader, index, len(targets))  # this process's images of the global batch
            last = index + 1 == len(loader)
            step = (index + 1) % train.accumulate == 0 or last
            with replicas.syncing(net, step):  # under DDP, the gradients are all-reduced in the step's backward
                with precision.autocast(device):
                    terms = model.loss(net(inputs), targets)
                loss = _global_loss(terms.total, own, total, replicas)  # every rank stops together
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch}, batch {index + 1} (lr {lr:.3g}); "
                        "lower train.lr, raise train.warmup_epochs, or use train.precision=fp32"
                    )
                # DDP averages the ranks' gradients: each rank's mean loss weighted by its share of the global
                # batch makes that average the gradient of the global batch's mean (1 in a single process).
                weight = replicas.world * own / total
                scaler.scale((terms.total if weight == 1.0 else terms.total * weight) / train.accumulate).backward()
            if step:
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            for name, value in {"loss": terms.total, **{f"loss_{k}": v for k, v in terms.parts.items()}}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * own
            images += own
            advance(1)
    seconds = time.perf_counter() - start
    sums, images = _summed_over_ranks(sums, images, replicas, device)
    val = None
    if "val" in loaders:
        val = evaluate_model(
            model,
            loaders["val"],
            num_classes,
            device,
            precision,
            progress,
            "validating",
            combine=replicas.summed_counts,
        )
    losses = {name: float(total) / max(images, 1) for name, total in sums.items()}
    return EpochReport(epoch, train.epochs, losses, lr, val, seconds, images)


def _share(loader: DataLoader, index: int, count: int) -> tuple[int, int]:
    """(images of this process that count, images of the global batch) of the loader's batch `index`, whose
    length is `count`."""
    sampler = loader.batch_sampler
    return sampler.share(index) if isinstance(sampler, BatchShare) else (count, count)


def _global_loss(loss: torch.Tensor, own: int, total: int, replicas: Replicas) -> torch.Tensor:
    """The global batch's mean loss (this process's own in a single process), the same on every rank."""
    if not replicas.distributed:
        return loss
    return replicas.sum(loss.detach().float() * (own / total))


def _summed_over_ranks(
    sums: dict[str, Any], images: int, replicas: Replicas, device: torch.device
) -> tuple[dict[str, Any], int]:
    """An epoch's loss sums and image count over all processes (this process's own in a single process)."""
    if not replicas.distributed:
        return sums, images
    names = sorted(sums)
    values = [torch.as_tensor(sums[name], dtype=torch.float64, device=device) for name in names]
    packed = replicas.sum(torch.stack([*values, torch.tensor(float(images), dtype=torch.float64, device=device)]))
    return dict(zip(names, packed[:-1], strict=True)), int(packed[-1].item())


def _finish(
    model: AdaptedModel,
    state: _TrainingState,
    settings: Settings,
    manifest: Manifest,
    config: dict[str, Any],
    loaders: dict[str, DataLoader],
    device: torch.device,
    precision: Precision,
    run: Run,
    summary: ParameterSummary,
    backbone_sha256: str,
    progress: Progress,
    stopped: bool,
    replicas: Replicas,
) -> TrainResult:
    if state.best_weights is not None:
        model.load_trainable_state_dict(state.best_weights)
    classes = list(manifest.classes)
    test: Metrics | None = None
    pathways: dict[str, Metrics] = {}
    if "test" in loaders:
        test, pathways = _test(model, loaders["test"], len(classes), device, precision, progress, run, replicas)
    val = None if state.best_val is None else Metrics(state.best_val.numpy())
    output = Path(settings.train.output)
    if not replicas.is_main:  # rank 0 writes the artifact, the report and the run
        return TrainResult(
            output,
            output / ARTIFACT_DIR,
            "",
            state.epoch,
            state.best_epoch,
            val,
            test,
            stopped,
            pathways,
            replicas.rank,
        )
    training = TrainingRecord(
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        stopped_early=stopped,
        val=None if val is None else MetricsRecord.of(val),
        test=None if test is None else MetricsRecord.of(test),
        test_pathways={name: MetricsRecord.of(metrics) for name, metrics in pathways.items()},
        eval_batch_size=settings.train.eval_batch_size,
        mlflow_run_id=run.run_id or None,
    )
    record = _artifact_record(settings, manifest, config, summary, backbone_sha256, training)
    artifact = save_artifact(output / ARTIFACT_DIR, model, record)
    write_report(output, classes, state.history, val, test, run)
    run.log_artifacts(output / ARTIFACT_DIR, ARTIFACT_DIR)
    if settings.tracking.log_model:  # after the test metrics, which MLflow copies to the model
        run.log_model(output / ARTIFACT_DIR)
    if test is not None:
        log.info(
            "test: top1 %.2f%%  mean-class %.2f%% (best epoch %d)",
            100 * test.top1,
            100 * test.mean_class,
            state.best_epoch,
        )
        for name, metrics in pathways.items():
            log.info("test, %s pathway alone: top1 %.2f%%", name, 100 * metrics.top1)
    return TrainResult(output, artifact.parent, run.run_id, state.epoch, state.best_epoch, val, test, stopped, pathways)


def _test(
    model: AdaptedModel,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    precision: Precision,
    progress: Progress,
    run: Run,
    replicas: Replicas,
) -> tuple[Metrics, dict[str, Metrics]]:
    """The kept weights' test metrics, and each auxiliary pathway's own (logged to the run)."""
    combine = replicas.summed_counts
    test = evaluate_model(model, loader, num_classes, device, precision, progress, "testing", combine=combine)
    pathways: dict[str, Metrics] = {}
    # Is the other pathway learning? (SA²VP: the prompt pathway's own accuracy through the shared head.)
    for name in model.auxiliary_pathways:
        alone = PathwayClassifier(model, name)
        pathways[name] = evaluate_model(
            alone, loader, num_classes, device, precision, progress, f"testing the {name} pathway", combine=combine
        )
        run.log_metrics(pathways[name].as_dict(f"test/{name}_"))
    return test, pathways


def _artifact_record(
    settings: Settings,
    manifest: Manifest,
    config: dict[str, Any],
    summary: ParameterSummary,
    backbone_sha256: str,
    training: TrainingRecord,
) -> ArtifactRecord:
    """model.json of this run: how to rebuild the model (settings, backbone and the hash of the weights training
    started from, classes, input transform), the data it was tested on, and the run's report sections."""
    return ArtifactRecord(
        format=FORMAT,
        settings=settings,
        backbone=BackboneRecord(
            name=settings.backbone.name,
            weights=settings.backbone.weights,
            sha256=backbone_sha256,
            parameters=summary.backbone,
        ),
        classes=list(manifest.classes),
        data_config=DataConfigRecord.model_validate(config),
        transform=manifest.transform,
        dataset=DatasetRecord(
            name=manifest.data.get("dataset"),
            protocol=manifest.data.get("protocol"),
            split_dir=str(manifest.folder),
            manifest_hash=manifest.data.get("content_hash"),
        ),
        trainable=TrainableRecord.of(summary),
        training=training,
        versions=_versions(),
    )


def _prepared(settings: Settings, progress: Progress, replicas: Replicas) -> Path:
    """The dataset's split folder, prepared first if it is not there yet (once however many processes start
    together; under torchrun by rank 0, the other processes waiting for it)."""
    folder = ensure_prepared(settings.data, progress) if replicas.is_main else split_dir(settings.data)
    replicas.barrier()
    if not (folder / "manifest.json").is_file():  # a process on another machine than rank 0's
        raise DataError(
            f"{folder}: the prepared dataset data.dataset={settings.data.dataset!r} is not on this machine (process "
            f"{replicas.rank} of a torchrun run; rank 0 prepares it on its own machine); run sa2vp data prepare on "
            "every machine first, or put data.root on a shared folder"
        )
    return folder


def _loaders(
    settings: Settings, folder: Path, config: dict[str, Any], device: torch.device, replicas: Replicas
) -> dict[str, DataLoader]:
    """The train loader (shuffled by its own generator, which each epoch seeds) and the val and test loaders;
    under torchrun, each process's share of every train batch and its shard of the evaluation batches."""
    train = settings.train

    def loader(split: str, batch_size: int, training: bool) -> DataLoader:
        dataset = load_split(folder, split, config, train=training)
        generator = torch.Generator() if training else None
        common: dict[str, Any] = {
            "num_workers": train.num_workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": False,
        }
        if not replicas.distributed:
            return DataLoader(dataset, batch_size=batch_size, shuffle=training, generator=generator, **common)
        # The same generator draws the same permutation as DataLoader(shuffle=True) does in one process.
        batches = (
            replicas.train_batches(RandomSampler(dataset, generator=generator), batch_size)
            if training
            else replicas.eval_batches(dataset, batch_size)
        )
        return DataLoader(
            dataset, batch_sampler=batches, generator=generator, worker_init_fn=replicas.worker_init(), **common
        )

    loaders = {"train": loader(train.train_split, train.batch_size, training=True)}
    for key, split in (("val", train.val_split), ("test", train.test_split)):
        if split is not None:
            loaders[key] = loader(split, train.eval_batch_size, training=False)
    return loaders


def _check_destinations(settings: Settings) -> None:
    """Where the run will write, checked before it prepares data or trains: the output folder, the store."""
    output = settings.train.output
    problem = writable_problem(output)
    if problem is not None:
        raise SettingsError(
            f"train.output={str(output)!r}: cannot write there ({problem}); choose a writable "
            "folder (--output or --set train.output=...)"
        )
    if settings.tracking.enabled:
        check_store(settings.tracking.uri)


def _every_rank_rng(replicas: Replicas) -> dict[str, Any]:
    """The checkpoint's random state: this process's (rank 0's), plus under torchrun every rank's by rank."""
    state = rng_state()
    ranks = replicas.gather_to_main(state)
    return state if not replicas.distributed else {**state, "ranks": ranks}


def _restore_own_rng(saved: dict[str, Any], replicas: Replicas, seed: int) -> None:
    """This rank's random state from a checkpoint: its own when the checkpoint has one for the same world size;
    otherwise rank 0 takes the saved one and the others a stream of their own (dropout then draws otherwise
    than in the run that was killed)."""
    ranks = saved.get("ranks")
    if ranks is not None and len(ranks) == replicas.world:
        restore_rng_state(ranks[replicas.rank])
        return
    restore_rng_state(saved)
    replicas.own_random_stream(seed)


def _log_missing_epochs(run: Run, history: list[dict[str, Any]]) -> None:
    """A resumed run's checkpointed epochs that its MLflow run lacks (killed between the checkpoint and the
    logging): logged now, so that every epoch is logged exactly once."""
    logged = run.logged_steps("lr")  # every epoch logs lr
    for entry in history:
        if entry["epoch"] not in logged:
            run.log_metrics({key: value for key, value in entry.items() if key != "epoch"}, step=entry["epoch"])


def _check_resumable(checkpoint: dict[str, Any], settings: Settings) -> None:
    before, now = checkpoint.get("settings", {}), flatten_settings(settings)
    changed = [
        key
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]
    if changed:
        key = changed[0]
        raise ArtifactError(
            f"--resume: the checkpoint in {settings.train.output} was written with {key}={before.get(key)!r}, now "
            f"{now.get(key)!r} ({len(changed)} setting(s) differ); resume with the same settings or train afresh"
        )


def _tags(settings: Settings, manifest: Any, backbone_sha256: str) -> dict[str, Any]:
    return {
        "dataset": manifest.data.get("dataset"),
        "protocol": manifest.data.get("protocol"),
        "dataset_manifest_hash": manifest.data.get("content_hash"),
        "backbone": settings.backbone.name,
        "backbone_weights": settings.backbone.weights,
        "backbone_sha256": backbone_sha256,
        "method": settings.model.method,
    }


def _default_run_name(settings: Settings) -> str:
    return f"{settings.data.dataset}-{settings.model.method}-{settings.backbone.name}"


def _versions() -> dict[str, str]:
    import timm

    import sa2vp

    return {"sa2vp": getattr(sa2vp, "__version__", "unknown"), "torch": torch.__version__, "timm": timm.__version__}
