"""One training run over several processes (PyTorch DDP under `torchrun`): the one home of process-group logic.

    torchrun --standalone --nproc-per-node 2 $(which sa2vp) train …        # one machine, 2 processes
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-id JOB --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        $(which sa2vp) train --output /shared/run …                       # 2 machines, 4 GPUs each

Without torchrun (or with a world of one process) nothing here acts: no process group, no wrapper, the run is
the single-process run it always was. Under torchrun (WORLD_SIZE > 1) each process is a rank:

- Device and backend: `train.device` auto or `cuda` → the GPU `cuda:LOCAL_RANK` with NCCL (when CUDA is
  there), `cpu` → Gloo; `cuda:N` and `mps` are refused (each process takes the GPU of its own local rank).
- Batches: `train.batch_size` stays the global batch. Every rank draws the seeded permutation a single process
  draws (same generator, same seed per epoch), cuts it into the same global batches and takes its share,
  positions rank, rank + world, … of each (BatchShare): `train.batch_size` must divide by the world size. The
  loss of a share is weighted by its size, so that DDP's averaged gradient is the single process's mean over
  the global batch, also for the last, smaller batch; a rank whose share of it is empty runs one sample of
  the batch at weight zero, so that it still joins the gradient all-reduce. Gradient accumulation as in one
  process (no all-reduce on the micro-steps). Without dropout or random augmentation, the weights equal the
  single process's to float tolerance (sums taken in another order). Dropout and augmentation draw from each
  rank's own random stream (rank 0 keeps the single process's; a resume restores every rank's own stream
  when the world size is the same), so with them a run is reproducible for a given world size, not equal to
  one process's.
- Evaluation: each rank evaluates every world-th batch of the single process's sequential batches
  (BatchShard: the same batches, so the same logits), and the confusion matrices are summed: top-1 and mean
  per-class are exact, and the same on every rank.
- Only rank 0 writes: checkpoints, the artifact, the report and the MLflow run (one run, tagged with the world
  size); progress bars and log lines are rank 0's (the other ranks' warnings and errors still show). With
  `--resume` every rank reads rank 0's checkpoint from `train.output`. Across machines, `train.output` must
  therefore be one shared folder, and the prepared data (data.root) must be there on every machine (rank 0
  prepares it when it is missing; on another machine, prepare it there first: `sa2vp data prepare`).
- Failures: a setting refused here (or any error every rank meets) prints its one `error:` line once per
  process; when a process fails, torchrun stops the others, prints its summary of the failed processes and exits
  1. The checkpoint of the last finished epoch is there to `--resume` from (under torchrun again; with another
  world size that divides the batch, too). The MLflow run of a process killed outright stays RUNNING until the
  next run of the same output marks it KILLED, or resumes it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sized
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, Sampler, SequentialSampler

from sa2vp.engine.runtime import resolve_device
from sa2vp.settings import SettingsError

log = logging.getLogger("sa2vp.distributed")

# The variables torchrun sets for each process it starts (torch.distributed.run).
ENV_WORLD, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class Replicas:
    """This process's place in a run: its rank among `world` processes and the device it computes on. A world
    of one (no torchrun) is a plain single-process run, for which every method below does nothing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes files and MLflow records and logs progress."""
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @contextmanager
    def joined(self) -> Iterator[Replicas]:
        """Within a run: the process group (init_process_group from torchrun's environment, on the first run
        of the process), the other ranks' info lines hushed.

        The group lives until the process ends (destroyed at exit, also after an error): a process that runs
        several trainings reuses it, because a second init_process_group on torchrun's store finds the first
        one's keys there, and ranks that re-join at different moments connect to peers that are leaving."""
        if not self.distributed:
            yield self
            return
        if not dist.is_initialized():  # else: this process's earlier run's, or the caller's own group
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(self.backend, device_id=self.device if self.device.type == "cuda" else None)
            atexit.register(_leave)
            if self.is_main:
                log.info("%d processes (torchrun, %s): rank 0 logs and writes", self.world, self.backend)
        quiet = logging.getLogger("sa2vp")
        level = quiet.level
        if not self.is_main:
            quiet.setLevel(logging.WARNING)
        try:
            yield self
        finally:
            quiet.setLevel(level)

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training forward runs through: DDP around `model` (it all-reduces the gradients of the
        parameters that require grad, the trainable ones), or `model` itself in a single process. DDP starts
        from rank 0's parameters and buffers."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Non-persistent buffers (SA²VP's tile masks, position indices) are derived from the architecture, which
        # every rank builds itself; some are expanded views, which DDP's broadcast cannot write into.
        derived = [
            f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            for name in module._non_persistent_buffers_set
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, derived)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def syncing(self, net: nn.Module, sync: bool) -> AbstractContextManager[Any]:
        """Around a micro-step's forward and backward: no gradient all-reduce unless `sync` (the last
        micro-step before an optimiser step)."""
        if sync or not isinstance(net, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return net.no_sync()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (a new tensor on the caller's device; `tensor` itself alone)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def summed_counts(self, counts: np.ndarray) -> np.ndarray:
        """Integer counts (a confusion matrix) summed over the ranks, exactly."""
        if not self.distributed:
            return counts
        return self.sum(torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))).numpy()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def main_decides(self, value: bool) -> bool:
        """Rank 0's `value`, on every rank (a decision only rank 0 may take, such as stopping early)."""
        if not self.distributed:
            return value
        flag = torch.tensor([int(value)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's `value` (picklable, made in this run's own processes) by rank, on rank 0; None elsewhere."""
        if not self.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def own_random_stream(self, seed: int) -> None:
        """Seed this rank's dropout stream: every rank but 0 its own (rank 0 keeps the single process's)."""
        if self.rank:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    def worker_init(self) -> Callable[[int], None] | None:
        """A DataLoader's worker_init_fn: each rank's workers draw augmentation from their own streams (DataLoader
        seeds worker k with the same base seed + k on every rank, the base seed coming from the shared
        generator)."""
        return None if not self.distributed else functools.partial(_reseed_worker, self.rank)

    def train_batches(self, sampler: Sampler[int], batch_size: int) -> BatchShare:
        return BatchShare(sampler, batch_size, self.rank, self.world)

    def eval_batches(self, dataset: Sized, batch_size: int) -> BatchShard:
        return BatchShard(SequentialSampler(dataset), batch_size, self.rank, self.world)


class BatchShare(BatchSampler):
    """A rank's share of each global batch: the global batches are those of `BatchSampler(sampler, batch_size)`
    (the single process's, the last one smaller), and rank r takes positions r, r + world, … of each. A rank
    whose share of a (last) batch is empty gets the batch's first index instead, to be weighted zero (`share`
    says so): every rank runs every step, which DDP's all-reduce needs."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield batch[self.rank :: self.world] or batch[:1]

    def share(self, index: int) -> tuple[int, int]:
        """(images of this rank that count, images of the global batch) of batch `index`."""
        total = min(self.batch_size, len(self.sampler) - index * self.batch_size)  # type: ignore[arg-type]
        return len(range(self.rank, total, self.world)), total


class BatchShard(BatchSampler):
    """Every world-th batch of `BatchSampler(sampler, batch_size)`, starting at batch `rank`: the ranks evaluate
    disjoint sets of the single process's own batches, which together are all of them."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(super().__iter__()):
            if index % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(range(self.rank, super().__len__(), self.world))


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _reseed_worker(rank: int, worker_id: int) -> None:
    torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)


def replicas_for(device: str, batch_size: int) -> Replicas:
    """This process's Replicas for a run with `train.device` = `device` and `train.batch_size` = `batch_size`:
    from torchrun's environment, else a world of one on `resolve_device(device)`. Starts nothing (`joined`
    does); refuses, in one line, what cannot work before any process waits for another."""
    world = _env_int(ENV_WORLD, 1)
    if world <= 1:
        return Replicas(device=resolve_device(device))
    rank, local_rank = _env_int(ENV_RANK, None), _env_int(ENV_LOCAL_RANK, None)
    if batch_size % world:
        counts = [n for n in range(2, min(batch_size, 64) + 1) if batch_size % n == 0]
        raise SettingsError(
            f"train.batch_size={batch_size}: the global batch must split into equal shares of the {world} "
            f"processes ({ENV_WORLD}={world}, torchrun); use a train.batch_size divisible by {world}"
            + (f", or {', '.join(map(str, counts[:8]))} processes" if counts else "")
        )
    return Replicas(rank, world, local_rank, _rank_device(device, local_rank))


def _rank_device(setting: str, local_rank: int) -> torch.device:
    """auto / cuda → this local rank's GPU (auto: the CPU without CUDA); cpu; a fixed cuda:N or mps is refused."""
    if setting == "mps" or setting.startswith("cuda:"):
        raise SettingsError(
            f"train.device={setting!r}: under torchrun each process computes on the GPU of its LOCAL_RANK, or on "
            "the CPU; use auto, cuda or cpu"
        )
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SettingsError(
            f"train.device={setting!r}: {ENV_LOCAL_RANK}={local_rank} computes on cuda:{local_rank}, and this "
            f"machine has {count} CUDA device(s); start at most {count} processes per machine (--nproc-per-node)"
            + (" or use train.device=cpu" if count == 0 else "")
        )
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int | None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(
            f"environment variable {name}={value!r}: torchrun sets it to an integer; start the run with torchrun "
            f"(or unset {ENV_WORLD} for a single process)"
        ) from None
