"""Training throughput shared by the LightningModules."""

import time


class StepRate:
    """Items per second over one full training iteration (data, forward, backward, optimizer step).

    Call it once per training step with the items the step processed (on all ranks); `reset()`
    where a gap (validation, an epoch boundary) is not training time.
    """

    def __init__(self) -> None:
        self.last: float | None = None

    def reset(self) -> None:
        self.last = None

    def __call__(self, items: int) -> float | None:
        now = time.perf_counter()
        rate = None if self.last is None else items / (now - self.last)
        self.last = now
        return rate
