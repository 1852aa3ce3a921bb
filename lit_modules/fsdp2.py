"""Fully sharded data parallelism with PyTorch's FSDP2 (`fully_shard`): `--trainer.strategy=fsdp2`.

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with every process in one data-parallel group
(no tensor parallelism): gloo on CPUs, nccl on GPUs, the same code path on both. The tasks shard their
network in `configure_model` (`shard_blocks`): each block gets its own FSDP unit (its parameters are
gathered for its forward and backward only), the network's remaining parameters (embeddings, head,
norms) form the root unit.

Checkpoints: by default a full, unsharded `.ckpt` file gathered on rank zero and written atomically by
Lightning, the same format as a single-process or DDP run's (`--ckpt_path last`, `predict`,
`load_from_checkpoint` and a different world size all work). With `save_distributed_checkpoint=true`
each rank writes its own shard into a directory (`last.ckpt/`: PyTorch distributed-checkpoint files
plus Lightning's `meta.pt`), for models too large to gather on one process; it is built beside the
old one and swapped in by rename, and only the fsdp2 strategy can load it (at any world size).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

# methods of a network that run its layers without going through `forward` (incremental decoding):
# FSDP2 must gather the root unit's parameters for them too
FORWARD_METHODS = ("decode",)


def shard_blocks(net: nn.Module, mesh: Any) -> int:
    """Apply `fully_shard` to each block of `net` (the outermost modules whose class name ends in
    "Block": `CausalBlock`, `HierarchicalBlock`, `MetaFormerBlock`, timm's `Block`), then to `net`
    itself, over the 1-D device mesh `mesh`; `net`'s `FORWARD_METHODS` gather parameters as `forward`
    does. Returns the number of blocks sharded."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks: list[nn.Module] = []
    inside: set[int] = set()  # a block inside a block belongs to the outer one's unit
    for module in net.modules():  # parents come before their children
        if id(module) in inside:
            inside.update(id(m) for m in module.children())
            continue
        if type(module).__name__.endswith("Block") and module is not net:
            blocks.append(module)
            inside.update(id(m) for m in module.children())
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for name in FORWARD_METHODS:
        if callable(getattr(net, name, None)):
            register_fsdp_forward_method(net, name)
    return len(blocks)


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as plain FSDP2: one data-parallel group of all `num_nodes x devices`
    processes, tensor-parallel size 1 (Lightning's default would split the processes of a node into a
    tensor-parallel group instead).

    Args:
        save_distributed_checkpoint: write one shard per rank into a checkpoint directory instead of a
            full checkpoint file gathered on rank zero (see the module docstring).
        process_group_backend: None picks gloo on CPUs and nccl on GPUs.
    """

    strategy_name = "fsdp2"

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards the model
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # a distributed checkpoint is many files: build it in a hidden sibling, then swap it in by renames,
        # so a kill mid-write never leaves a half-written checkpoint under the real name
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(f".{final.name}.{self.broadcast(uuid.uuid4().hex)}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex}.old")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()


StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) per block: gloo on CPUs, "
                          "nccl on GPUs", override=True)
