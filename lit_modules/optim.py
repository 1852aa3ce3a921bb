"""Optimiser pieces shared by the LightningModules: weight-decay groups and warm-up + cosine."""

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()) -> list[dict]:
    """AdamW groups: decay on matrices and conv kernels only; none on norms, biases, embeddings
    and any parameter whose name contains one of `no_decay` (position embeddings, class tokens)."""
    no_decay = tuple(no_decay)
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or id(p) in embedding_params or any(key in name for key in no_decay)
        (keep if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` x lr at `total_steps`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
