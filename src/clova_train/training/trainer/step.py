"""One optimizer step and what watches it: the step itself, validation, the bad-step guard, stop signals."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from clova_train.training.parallel.distributed import CollectiveError


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    stop: bool
    seconds: float


def train_step(engine, micro_batches: list[torch.Tensor], lr: float, *, stop_requested: bool, loss_scaling: bool = False) -> StepResult:
    """One optimizer step over a global batch; the loss averaged over all ranks, and whether any rank must stop.

    The stop flag rides on the loss all-reduce, so every rank agrees at no extra cost.
    ``skipped`` means a non-finite loss or gradient norm; under fp16 loss
    scaling an overflow step that DeepSpeed skips to lower the scale is routine
    and does not count.
    """
    import torch.distributed as td

    t0 = time.perf_counter()
    skipped_before = engine.skipped_steps
    engine.set_lr(lr)
    local = engine.train_batch(micro_batches)
    both = torch.stack([local.float(), torch.tensor(float(stop_requested), device=local.device)])
    td.all_reduce(both)
    loss, stop = (both[0] / td.get_world_size()).item(), both[1].item() > 0
    grad_norm = engine.grad_norm
    overflow = engine.skipped_steps > skipped_before
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or (loss_scaling and overflow))
    skipped = not finite or (overflow and not loss_scaling)
    return StepResult(loss, grad_norm, skipped, stop, time.perf_counter() - t0)


class BadStepGuard:
    """Counts steps skipped for a non-finite loss or gradient norm; stops after too many in a row."""

    def __init__(self, limit: int, total: int = 0, consecutive: int = 0):
        self.limit = limit
        self.total = total
        self.consecutive = consecutive

    def update(self, bad: bool, step: int, where: str) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise CollectiveError(
                f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or gradient norm "
                f"(data: {where}); stopped. Resume from the last checkpoint with a lower --lr, or raise --max-bad-steps"
            )


class StopSignal:
    """SIGTERM or SIGUSR1 (cluster preemption), or a first Ctrl-C: finish the step, save, exit 0.

    A second Ctrl-C interrupts at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._ctrl_c = False
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._ctrl_c:
                raise KeyboardInterrupt
            self._ctrl_c = True
        if self.received is None:  # the first signal says why; a later one (the SIGTERM of a requeue) does not
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a peer rank's signal"


class Evaluator:
    """Loss and perplexity on the same validation windows every time."""

    def __init__(self, engine, batches: list[torch.Tensor]):
        self.engine = engine
        self.batches = batches

    def __call__(self) -> dict:
        import torch.distributed as td

        if not self.batches:
            return {}
        total = self.engine.eval_loss(self.batches)
        both = torch.stack([total.float(), torch.tensor(float(len(self.batches)), device=total.device)])
        td.all_reduce(both)
        loss = (both[0] / both[1]).item()
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 700.0))}
