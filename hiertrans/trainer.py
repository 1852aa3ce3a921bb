"""`HViTTrainer`: a plain epoch loop (the seed's API) on Lightning Fabric.

Fabric gives precision (`"bf16-mixed"`, `"16-mixed"`, ...) and multi-device strategies (DDP) for
free while the loop stays ordinary PyTorch. For configs, logging and callbacks use the
LightningCLI (`python -m hiertrans fit --config vit.yaml`); this trainer is for scripts and
notebooks that want to own the loop.

    trainer = HViTTrainer(model, optimizer, nn.CrossEntropyLoss(), "cpu",
                          {"train_loader": train_loader, "val_loader": val_loader, "epochs": 10,
                           "scheduler": {"warmup_steps": 100, "min_lr_ratio": 0.01}})
    history = trainer.fit()
    trainer.save_checkpoint("last.pt")

Resuming is exact: weights after N uninterrupted epochs equal those after K epochs, save, a fresh
trainer, `load_checkpoint`, N - K epochs. The shuffling order of epoch e is drawn from a generator
seeded with `seed + e`, and the global RNG states (dropout, augmentation) are checkpointed.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .io import atomic_write
from .optim import warmup_cosine, warmup_cosine_schedule  # noqa: F401  (warmup_cosine: public here too)

PLAIN = (bool, int, float, str, type(None))
_DROP = object()  # marks values plain_data leaves out


def plain_data(value: Any) -> Any:
    """The JSON-like part of `value` (loaders, modules and other objects dropped), so that a
    checkpoint holding it loads with `torch.load(weights_only=True)`."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        items = [plain_data(v) for v in value]
        return type(value)(v for v in items if v is not _DROP)
    if isinstance(value, dict):
        items = {k: plain_data(v) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in items.items() if v is not _DROP}
    return _DROP



def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` that never leaves a half-written `path` (`hiertrans.io.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))


def accelerator_of(device: torch.device | str) -> tuple[str, list[int] | None]:
    """`"cuda:1"` -> `("cuda", [1])`; `"cpu"` -> `("cpu", None)` (device count from the config)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a string like 'cpu', 'cuda', 'cuda:1', 'mps'; "
                         f"got {device!r}") from exc
    return device.type, ([device.index] if device.index is not None else None)


class HViTTrainer:
    """Train/validate a classifier on Lightning Fabric: `model(images (B, C, H, W)) -> (B, K)` logits.

    Args:
        model: any `nn.Module` (typically `hiertrans.vit.create_model(...)`).
        optimizer: built on `model.parameters()` (weight-decay groups are the caller's choice).
        criterion: `criterion(logits (B, K), targets)`; targets `(B,)` class indices or `(B, K)`
            soft targets (mixup); the accuracy uses their argmax then.
        device: `torch.device` or string; its type picks Fabric's accelerator, an index the device.
        config: plain settings plus the loaders:
            train_loader (required), val_loader (optional): `DataLoader`s of `(images, targets)`;
            epochs (1): what `fit()` trains to, and the length of the LR schedule;
            seed (0): epoch e shuffles with a generator seeded `seed + e`;
            precision ("32-true"), devices (1), strategy ("auto"), num_nodes (1): passed to Fabric;
            scheduler (None): `{"warmup_steps": int, "min_lr_ratio": float}` for linear warm-up and
                cosine decay over `epochs * len(train_loader)` optimizer steps;
            grad_clip (None): max gradient norm;
            checkpoint_dir (None): `fit()` writes `last.pt` there after every epoch;
            verbose (True): `fit()` prints a line per epoch (rank zero).
        scheduler: instead of `config["scheduler"]`, any LR scheduler stepped per optimizer step.

    Exact resumption needs the data order to come from this trainer (a shuffling `RandomSampler`
    or `DistributedSampler`, reseeded per epoch) and workers that are not persistent (persistent
    workers keep augmentation RNG state across epochs that a checkpoint cannot capture).
    Multi-device strategies relaunch the script (`fabric.launch()`): one such trainer per process.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 device: torch.device | str = "cpu", config: dict[str, Any] | None = None,
                 scheduler: LRScheduler | None = None) -> None:
        config = dict(config or {})
        if "train_loader" not in config or not isinstance(config["train_loader"], DataLoader):
            raise ValueError("config['train_loader'] must be a torch DataLoader of (images, targets) batches")
        if config.get("val_loader") is not None and not isinstance(config["val_loader"], DataLoader):
            raise TypeError(f"config['val_loader'] must be a DataLoader or None, "
                            f"got {type(config['val_loader']).__name__}")
        epochs = config.setdefault("epochs", 1)
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"config['epochs'] must be a positive int, got {epochs!r}")
        self.config = config
        self.seed = int(config.get("seed", 0))
        accelerator, indices = accelerator_of(device)
        self.fabric = Fabric(accelerator=accelerator, devices=indices or config.get("devices", 1),
                             strategy=config.get("strategy", "auto"), num_nodes=config.get("num_nodes", 1),
                             precision=config.get("precision", "32-true"))
        self.fabric.launch()
        # keep the unwrapped objects: their state_dicts are what checkpoints hold
        self.module, self.raw_optimizer = model, optimizer
        self.model, self.optimizer = self.fabric.setup(model, optimizer)
        self.criterion = criterion.to(self.fabric.device) if isinstance(criterion, nn.Module) else criterion
        self.train_loader = self.fabric.setup_dataloaders(config["train_loader"])
        self.val_loader = (self.fabric.setup_dataloaders(config["val_loader"], use_distributed_sampler=False)
                           if config.get("val_loader") is not None else None)
        if scheduler is None and config.get("scheduler"):
            settings = config["scheduler"]
            scheduler = warmup_cosine_schedule(optimizer, int(settings.get("warmup_steps", 0)),
                                               epochs * len(self.train_loader),
                                               float(settings.get("min_lr_ratio", 0.0)))
        self.scheduler = scheduler
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps

    def _reseed_sampler(self) -> None:
        """Make epoch e's order a function of (seed, e) alone, so a resumed run replays it."""
        sampler = self.train_loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.seed = self.seed
            sampler.set_epoch(self.epoch)
        elif isinstance(sampler, RandomSampler):
            sampler.generator = torch.Generator().manual_seed(self.seed + self.epoch)

    def train_epoch(self) -> dict[str, float]:
        """One pass over `train_loader`: `{"loss": mean loss, "accuracy": top-1}` over all ranks."""
        self.model.train()
        self._reseed_sampler()
        sums = torch.zeros(3, device=self.fabric.device, dtype=torch.float64)  # loss * n, correct, n
        for images, targets in self.train_loader:
            logits = self.model(images)
            loss = self.criterion(logits, targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.fabric.backward(loss)
            if self.config.get("grad_clip"):
                max_norm = float(self.config["grad_clip"])
                self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
            hard = targets.argmax(-1) if targets.ndim == 2 else targets
            n = images.shape[0]
            sums += torch.stack([loss.detach().double() * n, (logits.argmax(-1) == hard).sum().double(),
                                 torch.tensor(float(n), device=sums.device, dtype=torch.float64)])
        self.epoch += 1
        loss_sum, correct, count = self.fabric.all_reduce(sums, reduce_op="sum").tolist()
        return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """`{"loss": ..., **calculate_metrics(logits, targets)}` over the whole `val_loader`."""
        from .metrics import calculate_metrics

        if self.val_loader is None:
            raise ValueError("validate() needs config['val_loader']")
        self.model.eval()
        outputs, targets = [], []
        for images, target in self.val_loader:
            outputs.append(self.model(images).float())
            targets.append(target)
        outputs, targets = torch.cat(outputs), torch.cat(targets)
        loss = self.criterion(outputs, targets)
        return {"loss": float(loss), **calculate_metrics(outputs, targets)}

    def fit(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Train (and validate, when there is a val_loader) up to `epochs` completed epochs
        (default `config["epochs"]`); returns one dict per epoch run."""
        epochs = self.config["epochs"] if epochs is None else epochs
        history = []
        while self.epoch < epochs:
            row = {"epoch": self.epoch + 1, **{f"train/{k}": v for k, v in self.train_epoch().items()}}
            if self.val_loader is not None:
                row.update({f"val/{k}": v for k, v in self.validate().items()})
            history.append(row)
            if self.config.get("checkpoint_dir"):
                self.save_checkpoint(Path(self.config["checkpoint_dir"]) / "last.pt")
            if self.config.get("verbose", True):
                self.fabric.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items() if isinstance(v, (int, float))))
        return history

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.raw_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "config": plain_data(self.config),  # loaders and objects dropped: weights_only-loadable
            "rng": rng_states(),
        }

    def save_checkpoint(self, path: str | Path) -> None:
        """Model, optimizer, scheduler, epoch, plain config and RNG states; written atomically by rank 0."""
        state = self.state_dict()
        if self.fabric.is_global_zero:
            atomic_save(state, path)
        self.fabric.barrier()

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Restore everything `save_checkpoint` wrote (`weights_only=True`); returns the checkpoint."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"checkpoint {str(path)!r} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "optimizer", "epoch", "global_step", "rng"} - checkpoint.keys()
        if missing:
            raise ValueError(f"{str(path)!r} is not an HViTTrainer checkpoint: missing {sorted(missing)}")
        self.module.load_state_dict(checkpoint["model"])
        self.raw_optimizer.load_state_dict(checkpoint["optimizer"])
        if (checkpoint.get("scheduler") is None) != (self.scheduler is None):
            saved = "with" if checkpoint.get("scheduler") is not None else "without"
            raise ValueError(f"{str(path)!r} was saved {saved} an LR scheduler but this trainer has "
                             f"{'one' if self.scheduler is not None else 'none'}")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.epoch, self.global_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        set_rng_states(checkpoint["rng"])
        return checkpoint
