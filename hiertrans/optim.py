"""Optimiser pieces shared by the training tasks and `HViTTrainer`: weight-decay groups and linear
warm-up + cosine decay (`WarmupCosineLR`)."""

import math
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

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


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> depth index (0 = the stem, the largest = the head), by `model.group_matcher()`
    (the timm convention, which `HierarchialViT` follows), else timm's automatic grouping."""
    from timm.models import group_parameters
    from timm.optim._param_groups import auto_group_layers

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return auto_group_layers(model)


def param_groups(model: nn.Module, weight_decay: float | None = None, no_decay: set[str] | None = None,
                 layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups `decay` and `no_decay` (weight decay 0). The `decay` group takes
    `weight_decay` when given, else the optimizer's own setting; `no_decay` names default to
    `no_weight_decay_names(model)` (pass them computed before an FSDP wrap).

    `layer_decay` (e.g. 0.75, for fine-tuning) splits both groups per depth (`layer_ids`) and gives each
    an `lr_scale` of `layer_decay ** (depth of the head - depth)`, as timm's optimizer factory does;
    `WarmupCosineLR` (like timm's schedulers) multiplies each group's LR by it.
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (1: no decay), got {layer_decay!r}")
    no_decay = no_weight_decay_names(model) if no_decay is None else no_decay
    depth_of = layer_ids(model) if layer_decay is not None else {}
    deepest = max(depth_of.values(), default=0)
    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for decays in (True, False):  # "decay" and "no_decay" first and always present without layer decay
        if layer_decay is None:
            groups[None, decays] = {"params": [], "name": "decay" if decays else "no_decay"}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays, depth = clean_name(name) not in no_decay, depth_of.get(name)
        # "name" labels the groups in LearningRateMonitor (lr-AdamW/decay, lr-AdamW/layer_3/no_decay)
        group = groups.setdefault((depth, decays), {
            "params": [], "name": f"layer_{depth}/{'decay' if decays else 'no_decay'}",
            "lr_scale": layer_decay ** (deepest - depth) if depth is not None else 1.0})
        group["params"].append(param)
    for (_, decays), group in groups.items():
        if not decays:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
    return list(groups.values())


def warmup_cosine(step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`
    at `total_steps` (flat after; an unbounded run, `total_steps=inf`, stays at 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then cosine decay to `min_lr_ratio` x the base LR, stepped once per optimizer step.

    Warm-up lasts `warmup_steps`, or `warmup_fraction` of `total_steps` when `warmup_steps` is None.
    `total_steps=None` means "the length of the run": the training tasks set it from the trainer
    (`set_total_steps`) before the first step, so one config serves any `max_steps` / `max_epochs`.
    Its state (steps taken, lengths) is in `state_dict`, so a resumed run continues the same curve.
    A group's `lr_scale` (layer-wise decay, `param_groups(layer_decay=...)`) scales its LR throughout.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int | None = None, warmup_fraction: float = 0.0,
                 min_lr_ratio: float = 0.0, total_steps: int | None = None, last_epoch: int = -1):
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an int >= 0 or None, got {warmup_steps!r}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps, self.warmup_fraction, self.min_lr_ratio = warmup_steps, warmup_fraction, min_lr_ratio
        self.total_steps = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: float) -> None:
        """The run's length in optimizer steps (finite; the cosine ends there)."""
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(f"the LR schedule needs a finite run length >= 1 step, got {total_steps}: set "
                             f"trainer.max_steps or trainer.max_epochs")
        self.total_steps = int(total_steps)

    def multiplier(self, step: int) -> float:
        total = self.total_steps if self.total_steps is not None else math.inf
        warmup = self.warmup_steps
        if warmup is None:
            warmup = round(self.warmup_fraction * total) if math.isfinite(total) else 0
        if math.isfinite(total):
            warmup = min(warmup, total)
        return warmup_cosine(step, warmup, total, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        factor = self.multiplier(self.last_epoch)
        return [base * factor * group.get("lr_scale", 1.0)
                for base, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)]


def warmup_cosine_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: float,
                           min_lr_ratio: float = 0.0) -> WarmupCosineLR:
    """`WarmupCosineLR` over `total_steps` (inf: warm-up, then constant)."""
    if warmup_steps < 0 or total_steps < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"need warmup_steps >= 0, total_steps >= 1 and 0 <= min_lr_ratio <= 1, got "
                         f"{warmup_steps=}, {total_steps=}, {min_lr_ratio=}")
    schedule = WarmupCosineLR(optimizer, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    if math.isfinite(total_steps):
        schedule.set_total_steps(total_steps)
    return schedule
