"""`train.compile`: torch.compile of the model a run trains, and how long compiling took.

The model is compiled in place (`nn.Module.compile`): the run keeps the same module, whose parameters, state
dict and artifact are exactly the eager model's — only calling it runs the compiled code. Compilation is lazy:
the first training step compiles the forward and backward graphs, the first evaluation (eval mode) and each new
batch shape (an epoch's smaller last batch) compile again. `CompileClock` adds up what torch reports compiling
(graph capture, backward compilation, CUDA-graph recording), so that the run can log it per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._dynamo.callback import CallbackArgs, CallbackTrigger, callback_handler

log = logging.getLogger("sa2vp.train")


def compile_model(model: nn.Module, mode: str) -> CompileClock | None:
    """Compile `model`'s forward in place as `train.compile` says (`off`: leave it eager, None); the clock
    that measures its compilation from now on."""
    if mode == "off":
        return None
    # A run compiles afresh: the recompilation limit counts per run, not per process (a study trains many models,
    # each of its own shapes and settings, in one process; past the limit torch would run them eagerly).
    torch._dynamo.reset()
    model.compile(mode=None if mode == "default" else mode)
    return CompileClock()


@dataclass
class CompileClock:
    """Seconds torch.compile spends compiling while the clock lives: the training step's graphs (forward with
    gradients, their backward) and the evaluation's (forward without gradients), apart. `lap` returns what
    was added since the previous lap."""

    train: float = 0.0
    eval: float = 0.0
    compilations: int = 0
    _lapped: tuple[float, float, int] = (0.0, 0.0, 0)
    _started: float | None = field(default=None, repr=False)
    _training: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        # The callbacks hold the clock weakly and leave with it, so a finished run leaves nothing registered.
        this = weakref.ref(self)

        def start(args: CallbackArgs) -> None:
            clock = this()
            if clock is not None:
                clock._start(args)

        def end(args: CallbackArgs) -> None:
            clock = this()
            if clock is not None:
                clock._end()

        callback_handler.register_start_callback(start)
        callback_handler.register_end_callback(end)
        weakref.finalize(self, _unregister, start, end)

    def _start(self, args: CallbackArgs) -> None:
        self._started = time.perf_counter()
        # A lazily compiled backward belongs to the training step, whatever the gradient mode it runs under.
        self._training = args.callback_trigger == CallbackTrigger.LAZY_BACKWARD or torch.is_grad_enabled()

    def _end(self) -> None:
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        self.compilations += 1
        if self._training:
            self.train += seconds
        else:
            self.eval += seconds

    def lap(self) -> tuple[float, float, int]:
        """(training seconds, evaluation seconds, compilations) since the previous lap."""
        now = (self.train, self.eval, self.compilations)
        before, self._lapped = self._lapped, now
        return now[0] - before[0], now[1] - before[1], now[2] - before[2]


def _unregister(start: Callable[[CallbackArgs], None], end: Callable[[CallbackArgs], None]) -> None:
    # Already gone after a torch._dynamo.reset(), which clears every callback.
    with contextlib.suppress(ValueError):
        callback_handler.remove_start_callback(start)
    with contextlib.suppress(ValueError):
        callback_handler.remove_end_callback(end)


def compile_metrics(clock: CompileClock | None, epoch: int) -> dict[str, float]:
    """The epoch's compilation as MLflow metrics (`compile_seconds`: the training step's graphs;
    `compile_seconds_eval`: the evaluation's), logged with a line; empty when nothing compiled."""
    if clock is None:
        return {}
    train, evaluation, compilations = clock.lap()
    if compilations == 0:
        return {}
    log.info(
        "torch.compile: epoch %d compiled %d time(s), %.1f s for the training step and %.1f s for the evaluation",
        epoch,
        compilations,
        train,
        evaluation,
    )
    return {"compile_seconds": train, "compile_seconds_eval": evaluation}
