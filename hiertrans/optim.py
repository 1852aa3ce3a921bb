"""Optimiser pieces shared by the LightningModules and `HViTTrainer`: weight-decay groups and
linear warm-up + cosine decay."""

import functools
import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices and kernels; none on 1-D parameters (norm
    gains, biases), embedding tables, nor what `model.no_weight_decay()` names (position
    embeddings, class token): offsets whose magnitude carries meaning, not overfitting capacity."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # timm lists full names; some models list bare attribute names ("pos_embed"): match both
        excluded = (param.ndim <= 1 or id(param) in embeddings or name in skip
                    or name.rsplit(".", 1)[-1] in skip)
        (no_decay if excluded else decay).append(param)
    # "name" labels the groups in LearningRateMonitor (lr-AdamW/decay, lr-AdamW/no_decay)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`
    at `total_steps` (flat after; an unbounded run, `total_steps=inf`, stays at 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: float,
                           min_lr_ratio: float = 0.0) -> LambdaLR:
    """`LambdaLR` with `warmup_cosine`, to be stepped once per optimizer step."""
    if warmup_steps < 0 or total_steps < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"need warmup_steps >= 0, total_steps >= 1 and 0 <= min_lr_ratio <= 1, got "
                         f"{warmup_steps=}, {total_steps=}, {min_lr_ratio=}")
    if math.isfinite(total_steps):
        warmup_steps = min(warmup_steps, int(total_steps))
    # a partial (not a lambda) so that LambdaLR.state_dict can save it
    return LambdaLR(optimizer, functools.partial(warmup_cosine, warmup_steps=warmup_steps,
                                                 total_steps=total_steps, min_lr_ratio=min_lr_ratio))
