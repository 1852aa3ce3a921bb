"""`ImageClassifier`: image classification with a HierarchialViT preset or any timm model.

Recipe (DeiT/timm style, sized down): AdamW with weight-decay groups, linear warm-up then cosine
decay stepped per optimizer step, label-smoothed cross-entropy (soft targets under mixup/cutmix),
stochastic depth, optional EMA of the weights for evaluation. Logs `train/loss`, `train/acc`,
`train/images_per_sec`, `{val,test}/{loss,acc,acc_top5,f1}` and, on rank zero at every validation,
the attention maps of a fixed validation image (`val/attention`) to loggers that take figures.
Predict writes `path,label,probability` rows to the datamodule's `predictions_path` (a CSV,
written atomically; it is a data setting because LightningCLI restores the model's own
hyperparameters from `--ckpt_path`, so they cannot be changed on the command line at predict time).
"""

import csv
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from hiertrans.optim import no_weight_decay_names, param_groups, warmup_cosine_schedule
from hiertrans.vit import PRESETS, HierarchialViT, MultiScaleAttention, create_model

from .throughput import StepRate


def build_model(model_name: str, num_classes: int, img_size: int, in_chans: int = 3,
                drop_path_rate: float = 0.0, drop_rate: float = 0.0, hierarchy: dict[str, Any] | None = None,
                **kwargs: Any) -> nn.Module:
    """A hiertrans preset (`hvit_*`, through `hiertrans.vit.create_model`), any timm model name, or,
    when `hierarchy` is given, a model built from that hierarchy config (`model_name` is then only a
    label; see `hiertrans.hierarchical_configs`)."""
    common = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                  drop_rate=drop_rate)
    if hierarchy is not None:
        return HierarchialViT.from_config(hierarchy, img_size=img_size, **common, **kwargs)
    if model_name in PRESETS:
        return create_model(model_name, img_size=img_size, **common, **kwargs)
    import timm

    if not timm.is_model(model_name):
        raise ValueError(f"unknown model_name {model_name!r}: use a hiertrans preset ({', '.join(PRESETS)}) "
                         f"or a timm model name (see timm.list_models())")
    try:
        return timm.create_model(model_name, img_size=img_size, **common, **kwargs)
    except TypeError as exc:  # size-agnostic models (pvt_v2, convnets) take no img_size
        if "img_size" not in str(exc):
            raise
        return timm.create_model(model_name, **common, **kwargs)


def ema_update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor | int,
               decay: float) -> None:
    """EMA with timm's warm-up: the decay rises as (1 + n) / (10 + n) up to `decay`, so early
    averages are not dominated by the random initialisation."""
    n = int(num_averaged)
    d = min(decay, (1 + n) / (10 + n))
    torch._foreach_lerp_(ema_params, params, 1.0 - d)


def split_metrics(split: str, num_classes: int) -> MetricCollection:
    """Top-1 accuracy, top-5 accuracy (only with more than 5 classes), macro F1: `<split>/acc`, ..."""
    metrics = {"acc": MulticlassAccuracy(num_classes, average="micro"),
               "f1": MulticlassF1Score(num_classes, average="macro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # no compute groups: torchmetrics merges metrics whose states match after the first batch, a
    # heuristic that went wrong here (val/f1 logged as 1.0 next to val/acc 0.89); these are cheap anyway
    return MetricCollection(metrics, prefix=f"{split}/", compute_groups=False)


def write_csv_atomic(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageClassifier(LightningModule):
    """Image classifier: `images (B, in_chans, img_size, img_size) -> logits (B, num_classes)`.

    Batches are `(images, targets)` with targets `(B,)` class indices or `(B, num_classes)` soft
    targets (mixup/cutmix); predict batches are `(images, paths)`.

    Args:
        model_name: a hiertrans preset (`hvit_cifar`, `hvit_tiny`, ...) or any timm model name.
        hierarchy: build the model from this hierarchy config instead (the dict form of
            `hiertrans.hierarchical_configs.HierarchicalConfig`: `stages: [...]`, or the short form
            `layers: [BasicLayerConfig fields]` + `get_hierarchical_configuration` keywords);
            `model_name` is then only a label.
        num_classes, img_size, in_chans: the data's; `num_classes` is checked against the
            datamodule's in `setup()`.
        drop_path_rate, drop_rate: stochastic depth (rising linearly over the blocks) and dropout.
        model_kwargs: further constructor overrides, e.g. `{embed_dims: [32, 64, 96, 128]}`.
        lr, weight_decay, betas: AdamW (no decay on norms, biases, position embeddings, class token).
        warmup_fraction: linear warm-up over this fraction of all optimizer steps ...
        warmup_steps: ... or over this many steps (overrides `warmup_fraction` when set).
        min_lr_ratio: the cosine decay ends at `lr * min_lr_ratio`.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: keep an exponential moving average of the weights and evaluate with it (None: off).
        compile: `torch.compile` the training forward.
        log_attention_every_val: log the attention-map figure of the first validation image.
    """

    def __init__(
        self,
        model_name: str = "hvit_cifar",
        num_classes: int = 10,
        img_size: int = 32,
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_fraction: float = 0.05,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        compile: bool = False,
        log_attention_every_val: bool = True,
        hierarchy: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {lr=}, {weight_decay=}")
        if not 0 <= warmup_fraction < 1 or (warmup_steps is not None and warmup_steps < 0):
            raise ValueError(f"need 0 <= warmup_fraction < 1 and warmup_steps >= 0 (or None), got "
                             f"warmup_fraction={warmup_fraction!r}, warmup_steps={warmup_steps!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None (off), got {ema_decay!r}")
        self.save_hyperparameters()
        self.model = build_model(model_name, num_classes, img_size, in_chans, drop_path_rate, drop_rate,
                                 hierarchy=hierarchy, **(model_kwargs or {}))
        self.no_decay = no_weight_decay_names(self.model)  # now: an FSDP wrap would hide the shapes
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=functools.partial(ema_update, decay=ema_decay),
                                     use_buffers=True)
            self.ema.requires_grad_(False)  # a shadow copy: DDP must not wait for its gradients
        # not registered as a submodule, so checkpoints keep the plain `model.*` keys
        self.__dict__["_compiled"] = torch.compile(self.model) if compile else None
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = split_metrics("val", num_classes)
        self.test_metrics = split_metrics("test", num_classes)
        self.class_names: list[str] | None = None
        self._fixed_image: Tensor | None = None
        self.step_rate = StepRate()
        self._predictions: list[tuple[list[str], Tensor, Tensor]] = []

    # --- forward --------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return (self._compiled if self._compiled is not None else self.model)(images)

    def eval_model(self) -> nn.Module:
        """The network used for validation, test and predict: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    # --- setup and checks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and num_classes != self.hparams.num_classes:
            names = [str(n) for n in getattr(datamodule, "classes", [])]
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValueError(f"model num_classes={self.hparams.num_classes} but the data has {num_classes} "
                             f"classes ({shown}); set model.init_args.num_classes: {num_classes}")
        in_chans = getattr(datamodule, "in_chans", None)
        if in_chans is not None and in_chans != self.hparams.in_chans:
            raise ValueError(f"model in_chans={self.hparams.in_chans} but the data has {in_chans}-channel "
                             f"images; set model.init_args.in_chans: {in_chans}")
        img_size = getattr(datamodule, "img_size", None)
        if img_size is not None and img_size != self.hparams.img_size:
            rank_zero_warn(f"model img_size={self.hparams.img_size} but the data is {img_size} px: position "
                           f"embeddings are interpolated at every step; set both to the same size")
        if self.class_names is None and getattr(datamodule, "classes", None):
            self.class_names = list(datamodule.classes)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names  # predict can name classes without the training data

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay, self.no_decay), lr=hp.lr,
                                      betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the LR schedule needs a finite length: set trainer.max_epochs or "
                             "trainer.max_steps")
        total = max(1, int(total))
        warmup = hp.warmup_steps if hp.warmup_steps is not None else round(hp.warmup_fraction * total)
        scheduler = warmup_cosine_schedule(optimizer, min(warmup, total), total, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # after every real optimizer step (gradient accumulation included)
            self.ema.update_parameters(self.model)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Label-smoothed cross-entropy; `targets` `(B,)` indices or `(B, K)` probabilities."""
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)

    # --- loops ----------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.step_rate.reset()  # the gap across validation/epoch boundaries is not throughput

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        rate = self.step_rate(images.shape[0] * self.trainer.world_size)
        if rate is not None:
            self.log("train/images_per_sec", rate, on_step=True, on_epoch=False, rank_zero_only=True)
        logits = self(images)
        loss = self.loss(logits, targets)
        self.train_acc(logits.detach(), targets.argmax(-1) if targets.ndim == 2 else targets)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=images.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str, metrics: MetricCollection) -> Tensor:
        images, targets = batch
        logits = self.eval_model()(images)
        loss = self.loss(logits, targets)
        metrics.update(logits.float(), targets)
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val", sync_dist=True,
                 batch_size=images.shape[0])
        self.log_dict(metrics, on_epoch=True, prog_bar=split == "val", batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == 0:  # the val loader is not shuffled: this is the same image at every validation
            self._fixed_image = batch[0][0].detach().clone()
        return self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        if (not self.hparams.log_attention_every_val or self.trainer.sanity_checking
                or self._fixed_image is None or not self.trainer.is_global_zero):
            return
        net = self.eval_model()
        net = getattr(net, "_orig_mod", net)
        if not isinstance(net, HierarchialViT) or not all(
                isinstance(getattr(stage.blocks[-1], "attn", None), MultiScaleAttention) for stage in net.stages):
            return  # timm models, and config-built ones with pooling/windowed mixers, have no maps to show
        writers = [lg.experiment for lg in self.loggers
                   if callable(getattr(getattr(lg, "experiment", None), "add_figure", None))]
        if not writers:
            return
        from hiertrans.visualize import attention_figure  # matplotlib only when a logger takes figures

        with torch.no_grad():
            figure = attention_figure(net, self._fixed_image)
        for writer in writers:
            writer.add_figure("val/attention", figure, global_step=self.global_step, close=False)

    # --- predict --------------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: tuple[Tensor, list[str]], batch_idx: int) -> Tensor:
        """`-> (B, num_classes)` class probabilities; the CSV is written at the end of the epoch."""
        images, paths = batch
        probs = self.eval_model()(images).float().softmax(dim=-1)
        confidence, label = probs.max(dim=-1)
        self._predictions.append((list(paths), label.cpu(), confidence.cpu()))
        return probs

    def on_predict_epoch_end(self) -> None:
        rows = {}
        for paths, labels, confidences in self._predictions:
            for path, label, confidence in zip(paths, labels.tolist(), confidences.tolist()):
                rows[path] = (label, confidence)
        if self.trainer.world_size > 1:  # each rank predicted a shard; the sampler pads with repeats
            gathered: list[dict] = [{} for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, rows)
            rows = {k: v for shard in gathered for k, v in shard.items()}
        if not self.trainer.is_global_zero:
            return
        out = getattr(getattr(self.trainer, "datamodule", None), "predictions_path", None)
        if out is None:  # plain dataloaders: the probabilities returned by trainer.predict are all
            return
        names = self.class_names or [str(i) for i in range(self.hparams.num_classes)]
        table = [[path, names[label], f"{conf:.6f}"] for path, (label, conf) in sorted(rows.items())]
        write_csv_atomic(out, ["path", "label", "probability"], table)
        rank_zero_info(f"wrote {len(table)} predictions to {os.path.abspath(out)}")


class TorchThreads(Callback):
    """Set torch's intra-op thread count when a run starts (`trainer.callbacks` in the configs).

    Small models on a small CPU shared with other work: OpenMP threads spin-wait for peers the OS
    has descheduled, and on 2 busy cores 2 threads ran hvit_cifar 10-30x slower than 1 thread.
    """

    def __init__(self, num_threads: int = 1) -> None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        self.num_threads = num_threads

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.num_threads)
