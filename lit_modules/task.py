"""`Task`: what every training task shares. The network arrives as an argument, the optimizer and its
schedule as callables from the config (LightningCLI's dependency-injection pattern), so a model
argument is declared once, in the model:

    model:
      class_path: lit_modules.LanguageModel
      init_args:
        net:                                   # any nn.Module: its own class and arguments
          class_path: hiertrans.HierarchicalTransformer
          init_args: {num_tokens: 256, dim: 128, depth: 4, ...}
        optimizer:                             # any torch.optim class; called with the param groups
          class_path: torch.optim.AdamW
          init_args: {lr: 2.0e-3, weight_decay: 0.1}
        scheduler:                             # any LR scheduler class; called with the optimizer
          class_path: hiertrans.optim.WarmupCosineLR
          init_args: {warmup_steps: 100, min_lr_ratio: 0.1}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ThroughputMonitor, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from hiertrans import cpu_kernels
from hiertrans.optim import WarmupCosineLR, no_weight_decay_names, param_groups

from .fsdp2 import shard_blocks

PLAIN = (bool, int, float, str, type(None))


def is_plain(value: Any) -> bool:
    """JSON-like data (what a checkpoint loaded with `weights_only=True` may hold)."""
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(is_plain(v) for v in value)
    return isinstance(value, PLAIN)


def count_flops(net: nn.Module, inputs: Tensor) -> int:
    """FLOPs of `net`'s forward and backward on `inputs`, counted by torch's `FlopCounterMode` with meta
    tensors in place of the parameters and buffers (`torch.func.functional_call`): no memory, no compute,
    the network untouched. The backward starts from the sum of the output (the loss is not counted)."""
    from lightning.fabric.utilities.throughput import measure_flops
    from torch.func import functional_call

    state = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
             for name, t in [*net.named_parameters(), *net.named_buffers()]}
    inputs = inputs.to("meta")
    return measure_flops(net, lambda: functional_call(net, state, (inputs,), strict=True),
                         lambda out: (out[0] if isinstance(out, tuple) else out).sum())


class Task(LightningModule):
    """A training task around `net`: weight-decay groups (decided on the unwrapped network, before any
    sharding wrap), the optimizer and schedule callables, optional `torch.compile(fullgraph=True)`,
    FSDP2 sharding per block under `--trainer.strategy=fsdp2` (`configure_model`), and the optional
    CPU kernels (`hiertrans.cpu_kernels`) when `HIERTRANS_CPU_KERNELS=1`.

    Weight decay applies to matrices only: not to norms, biases, embeddings, or what
    `net.no_weight_decay()` names (position embeddings, class token). A `WarmupCosineLR` built
    without `total_steps` runs for the trainer's `estimated_stepping_batches`; schedules step once
    per optimizer step.

    Under a `ThroughputMonitor` (`lit_modules.Throughput`), `flops_per_batch` is set when fit starts:
    the network's forward and backward on one training batch's input (`example_input`), counted on
    meta tensors (`count_flops`), so the monitor logs FLOPs/s and, on GPUs it knows, MFU.

    `grad_checkpointing`: `net.set_grad_checkpointing()`, recomputing its blocks in the backward
    instead of keeping their activations (less memory, about a third more compute).

    Randomness inside the network (dropout, drop-path) is drawn from the global RNG seeded at every
    training step with (the run's seed, step, rank): a run resumed from a checkpoint draws what the
    uninterrupted run drew (Lightning does not save RNG states), and DDP ranks draw different masks.
    """

    def __init__(self, net: nn.Module, optimizer: Any, scheduler: Any = None, compile: bool = False,
                 layer_decay: float | None = None, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module (model.init_args.net.class_path), got {type(net).__name__}")
        self.net = cpu_kernels.apply(net) if cpu_kernels.requested() else net
        self.optimizer, self.scheduler, self.compile_net = optimizer, scheduler, compile
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] or None (off), got {layer_decay!r}")
        self.layer_decay = layer_decay
        if grad_checkpointing:
            if not callable(getattr(net, "set_grad_checkpointing", None)):
                raise TypeError(f"grad_checkpointing=True needs a net with set_grad_checkpointing() (timm's API; every "
                                f"hiertrans model has it); {type(net).__name__} has none")
            net.set_grad_checkpointing(True)
        self.no_decay = no_weight_decay_names(net)  # now: an FSDP wrap would hide the shapes
        self.flops_per_batch: int | None = None  # read by ThroughputMonitor at every step

    def save_plain_hyperparameters(self) -> None:
        """`save_hyperparameters()` keeping plain data only. Under LightningCLI the hyperparameters are
        the parsed config (the network and optimizer as class paths and arguments), so
        `load_from_checkpoint` rebuilds everything; built in Python, the network object itself is
        left out (pass `net=` to `load_from_checkpoint`) and checkpoints stay `weights_only`-loadable."""
        import inspect

        frame = inspect.currentframe().f_back
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters(frame=frame)
        for key in [k for k, v in self.hparams.items() if not is_plain(v) and not k.startswith("_")]:
            del self.hparams[key]
            self._hparams_initial.pop(key, None)

    def configure_model(self) -> None:
        """Under the `fsdp2` strategy (a device mesh is set), shard `net` per block with FSDP2
        (`lit_modules.fsdp2.shard_blocks`); otherwise nothing. Called once per run, before the optimizer
        is built, so the weight-decay groups take the sharded (DTensor) parameters by their unchanged names."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        averaging = [type(cb).__name__ for cb in getattr(self._trainer, "callbacks", [])
                     if isinstance(cb, WeightAveraging)]
        if averaging:
            raise ValueError(f"{averaging[0]} (EMA) does not support sharded models: Lightning's weight averaging "
                             f"keeps an unsharded copy of the whole model on every rank; use "
                             f"--trainer.strategy=ddp with EMA, or remove the callback for fsdp2")
        if mesh.ndim != 2 or mesh["tensor_parallel"].size() != 1:
            raise ValueError(f"{type(self).__name__} shards data-parallel only (FSDP2); got the device mesh "
                             f"{mesh}: use --trainer.strategy=fsdp2")
        shard_blocks(self.net, mesh["data_parallel"])
        self._sharded = True

    def example_input(self) -> Tensor | None:
        """A meta tensor shaped like one training batch's input to `net`, from what the datamodule
        describes (docs/architecture.md): images `(batch_size, in_chans, img_size, img_size)`, token ids
        `(batch_size, seq_len)`; None when it describes neither."""
        data = getattr(self.trainer, "datamodule", None)
        batch = getattr(data, "batch_size", None)
        size, chans, seq_len = (getattr(data, k, None) for k in ("img_size", "in_chans", "seq_len"))
        if not isinstance(batch, int):
            return None
        if isinstance(size, int) and isinstance(chans, int):
            return torch.empty(batch, chans, size, size, device="meta")
        if isinstance(seq_len, int):
            return torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        return None

    def setup(self, stage: str) -> None:
        self.run_seed = torch.initial_seed()  # seed_everything's value in a seeded run
        if (stage == "fit" and self.flops_per_batch is None
                and any(isinstance(cb, ThroughputMonitor) for cb in self.trainer.callbacks)):
            inputs = self.example_input()  # here: before any sharding or compilation
            try:
                self.flops_per_batch = None if inputs is None else count_flops(self.net, inputs)
            except (RuntimeError, NotImplementedError, TypeError) as exc:  # an op without a meta kernel
                rank_zero_warn(f"could not count {type(self.net).__name__}'s FLOPs on the meta device ({exc}); "
                               f"the throughput monitor logs no FLOPs/s")
        if self.compile_net and stage == "fit" and not getattr(self, "_compiled", False):
            self.net.compile(fullgraph=True)  # in place: parameter names (and checkpoints) unchanged
            self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step_seed = np.random.SeedSequence([self.run_seed, self.global_step, self.global_rank]).generate_state(1)
        torch.manual_seed(int(step_seed[0]))
        # The loggers' step. Lightning 2.6 counts one too many after resuming from a checkpoint written at
        # an epoch's end (its epoch loop applies its restart correction again in the next epoch), which
        # leaves a gap in every curve; with one optimizer it is the optimizer step count.
        epoch_loop = self.trainer.fit_loop.epoch_loop
        if len(self.trainer.optimizers) == 1 and epoch_loop._batches_that_stepped != self.global_step:
            epoch_loop._batches_that_stepped = self.global_step

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer(param_groups(self.net, no_decay=self.no_decay, layer_decay=self.layer_decay))
        if self.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

