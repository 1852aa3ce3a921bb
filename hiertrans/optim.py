"""Optimiser pieces shared by the LightningModules and `HViTTrainer`: weight-decay groups and
linear warm-up + cosine decay."""

import functools
import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# wrappers that distributed/compiled training inserts into parameter names
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW should not decay: 1-D parameters (norm gains, biases), embedding
    tables, and what `model.no_weight_decay()` names (position embeddings, class token): offsets whose
    magnitude carries meaning, not overfitting capacity.

    Call it on the unwrapped model: FSDP flattens and shards parameters, so their shapes no longer
    tell matrices from gains once it has wrapped the model.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # timm lists full names; some models list bare attribute names ("pos_embed"): match both
    return {clean_name(name) for name, param in model.named_parameters()
            if param.ndim <= 1 or id(param) in embeddings or name in skip or name.rsplit(".", 1)[-1] in skip}


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict[str, Any]]:
    """AdamW parameter groups `decay` and `no_decay`; `no_decay` names default to
    `no_weight_decay_names(model)` (pass them computed before an FSDP wrap)."""
    no_decay = no_weight_decay_names(model) if no_decay is None else no_decay
    groups: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[clean_name(name) not in no_decay].append(param)
    # "name" labels the groups in LearningRateMonitor (lr-AdamW/decay, lr-AdamW/no_decay)
    return [{"params": groups[True], "weight_decay": weight_decay, "name": "decay"},
            {"params": groups[False], "weight_decay": 0.0, "name": "no_decay"}]


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
