"""`ImageClassifier`: image classification with any classifier network `net`.

Recipe (DeiT/timm style, sized down): AdamW with weight-decay groups, linear warm-up then cosine
decay stepped per optimizer step, label-smoothed cross-entropy (soft targets under mixup/cutmix).
An EMA of the weights is a callback, `lit_modules.EMA` (Lightning's `EMAWeightAveraging` with timm's
warm-up; `ema_decay` adds it): it swaps the averaged weights in for validation and saves them as the
checkpoint's `state_dict`, so validation, test and predict from a checkpoint all use them. Logs `train/loss`,
`train/acc`, `{val,test}/{loss,acc,acc_top5,f1}` (images/s and FLOPs/s come from the
`lit_modules.Throughput` callback in the configs) and, on rank zero at every validation,
the attention maps of a fixed validation image (`val/attention`) to loggers that take figures.
Predict writes `path,label,probability` rows to the datamodule's `predictions_path` (a CSV,
written atomically; it is a data setting because LightningCLI restores the model's own
hyperparameters from `--ckpt_path`, so they cannot be changed on the command line at predict time).

The network comes from the config (`model.init_args.net`): `hiertrans.HierarchialViT` with its
arguments, a preset (`hiertrans.vit.preset`), a config-built hierarchy
(`hiertrans.build_hierarchical_model`), or any timm model (`hiertrans.vit.timm_model`).
"""

import csv
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from hiertrans.io import atomic_write
from hiertrans.metrics import split_metrics
from hiertrans.optim import WarmupCosineLR
from hiertrans.pyramid import MultiScaleAttention
from hiertrans.vit import HierarchialViT

from .callbacks import EMA
from .media import log_figure, takes_media
from .task import Task


def num_classes_of(net: nn.Module) -> int:
    """The class count of a classifier: its `num_classes` (timm's and hiertrans' models), else the
    output width of its `head`."""
    count = getattr(net, "num_classes", None)
    if count is None:
        count = getattr(getattr(net, "head", None), "out_features", None)
    if not isinstance(count, int) or count < 2:
        raise ValueError(f"net must be a classifier with num_classes >= 2 (a num_classes attribute or a Linear "
                         f"head), got {type(net).__name__} with num_classes={count!r}")
    return count


def write_csv_atomic(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class ImageClassifier(Task):
    """Image classifier task around `net`: `images (B, C, H, W) -> logits (B, num_classes)`.

    Batches are `(images, targets)` with targets `(B,)` class indices or `(B, num_classes)` soft
    targets (mixup/cutmix); predict batches are `(images, paths)`. The data's class count,
    channels and image size are checked against the network's when a run starts.

    Args:
        net: the classifier network (`model.init_args.net`); see the module docstring.
        optimizer: called with the parameter groups (no weight decay on norms, biases, position
            embeddings, class token); default AdamW(lr=1e-3, weight_decay=0.05).
        scheduler: called with the optimizer, stepped per optimizer step; default linear warm-up
            over 5% of the run, then cosine decay to 1% of the LR.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: validate, test, predict and checkpoint an exponential moving average of the weights
            with this decay: a shortcut for the callback `lit_modules.EMA(decay=ema_decay)` (None: no
            EMA from the task; an EMA in `trainer.callbacks` still works).
        compile: `torch.compile(net, fullgraph=True)` for training.
        log_attention_every_val: log the attention-map figure of the first validation image (not under
            fsdp2: the maps read block weights outside their gathered forward).
        layer_decay: layer-wise LR decay for fine-tuning (e.g. 0.75): each depth of `net.group_matcher()`
            (timm's convention) gets `lr * layer_decay ** (depth of the head - depth)`; None: one LR.
        log_confusion_matrix: log the validation confusion matrix as a figure at every validation.
        grad_checkpointing: `net.set_grad_checkpointing()`: recompute the stages' blocks in the backward
            (less activation memory for about a third more compute).

    Figures (attention maps, the confusion matrix) reach every logger that keeps them: TensorBoard,
    CSV (PNG files beside metrics.csv) and W&B (`lit_modules.media`).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
        scheduler: LRSchedulerCallable | None = lambda optimizer: WarmupCosineLR(
            optimizer, warmup_fraction=0.05, min_lr_ratio=0.01),
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        compile: bool = False,
        log_attention_every_val: bool = True,
        layer_decay: float | None = None,
        log_confusion_matrix: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(net, optimizer, scheduler, compile, layer_decay, grad_checkpointing)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None (no EMA), got {ema_decay!r}")
        self.save_plain_hyperparameters()
        self.num_classes = num_classes = num_classes_of(net)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = split_metrics("val", num_classes)
        self.test_metrics = split_metrics("test", num_classes)
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.class_names: list[str] | None = None
        self._fixed_image: Tensor | None = None
        self._predictions: list[tuple[list[str], Tensor, Tensor]] = []

    # --- forward --------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def eval_model(self) -> nn.Module:
        """The network used for validation, test and predict: `net` (an EMA callback swaps its averaged
        weights into `net` for validation, and checkpoints hold them)."""
        return self.net

    def configure_callbacks(self) -> list[Callback]:
        """`[EMA(decay=ema_decay)]` when `ema_decay` is set, for fit (it then replaces an EMA in
        `trainer.callbacks`); outside fit the checkpoint already holds the averaged weights."""
        state = getattr(self._trainer, "state", None)
        if self.hparams.ema_decay is None or (state is not None and state.fn != "fit"):
            return []
        return [EMA(decay=self.hparams.ema_decay)]

    # --- setup and checks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and num_classes != self.num_classes:
            names = [str(n) for n in getattr(datamodule, "classes", [])]
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ValueError(f"the network has num_classes={self.num_classes} but the data has {num_classes} "
                             f"classes ({shown}); set model.init_args.net.init_args.num_classes: {num_classes}")
        in_chans, net_chans = getattr(datamodule, "in_chans", None), getattr(self.net, "in_chans", None)
        if in_chans is not None and net_chans is not None and in_chans != net_chans:
            raise ValueError(f"the network has in_chans={net_chans} but the data has {in_chans}-channel images; "
                             f"set model.init_args.net.init_args.in_chans: {in_chans}")
        img_size, net_size = getattr(datamodule, "img_size", None), getattr(self.net, "img_size", None)
        if isinstance(net_size, (tuple, list)) and len(set(net_size)) == 1:
            net_size = net_size[0]
        if img_size is not None and net_size is not None and img_size != net_size:
            rank_zero_warn(f"the network's img_size={net_size} but the data is {img_size} px: position "
                           f"embeddings are interpolated at every step; set both to the same size")
        if self.class_names is None and getattr(datamodule, "classes", None):
            self.class_names = list(datamodule.classes)
        super().setup(stage)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names  # predict can name classes without the training data

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("class_names"):
            self.class_names = list(checkpoint["class_names"])

    # --- optimisation ---------------------------------------------------------------------------
    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Label-smoothed cross-entropy; `targets` `(B,)` indices or `(B, K)` probabilities."""
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)

    # --- loops ----------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.loss(logits, targets)
        self.train_acc(logits.detach(), targets.argmax(-1) if targets.ndim == 2 else targets)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=images.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], split: str, metrics: MetricCollection,
                  confusion: MulticlassConfusionMatrix | None = None) -> Tensor:
        images, targets = batch
        logits = self.eval_model()(images)
        loss = self.loss(logits, targets)
        metrics.update(logits.float(), targets)
        if confusion is not None:
            confusion.update(logits.float(), targets)
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val", sync_dist=True,
                 batch_size=images.shape[0])
        self.log_dict(metrics, on_epoch=True, prog_bar=split == "val", batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == 0:  # the val loader is not shuffled: this is the same image at every validation
            self._fixed_image = batch[0][0].detach().clone()
            self._log_attention()  # here, not at the epoch end: an EMA callback has swapped its weights in
        confusion = self.val_confusion if self.hparams.log_confusion_matrix else None
        return self._evaluate(batch, "val", self.val_metrics, confusion)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_metrics)

    def _log_attention(self) -> None:
        if (not self.hparams.log_attention_every_val or self.trainer.sanity_checking
                or self._fixed_image is None or not self.trainer.is_global_zero):
            return
        if self.device_mesh is not None:  # the maps read block weights outside their (collective) forward
            return
        net = self.eval_model()
        net = getattr(net, "_orig_mod", net)
        if not isinstance(net, HierarchialViT) or not all(
                isinstance(getattr(stage.blocks[-1], "attn", None), MultiScaleAttention) for stage in net.stages):
            return  # timm models, and config-built ones with pooling/windowed mixers, have no maps to show
        if not takes_media(self.loggers):
            return
        from hiertrans.visualize import attention_figure  # matplotlib only when a logger takes figures

        with torch.no_grad():
            figure = attention_figure(net, self._fixed_image)
        log_figure(self.loggers, "val/attention", figure, self.global_step)

    def on_validation_epoch_end(self) -> None:
        """The validation confusion matrix as a figure (rows: true class, columns: predicted)."""
        if self.trainer.sanity_checking or not self.hparams.log_confusion_matrix:
            self.val_confusion.reset()
            return
        counts = self.val_confusion.compute()  # on every rank: it gathers the ranks' counts
        self.val_confusion.reset()
        if self.trainer.is_global_zero and takes_media(self.loggers):
            import matplotlib.pyplot as plt

            figure, _ = self.val_confusion.plot(counts, labels=self.class_names)
            log_figure(self.loggers, "val/confusion_matrix", figure, self.global_step)
            plt.close(figure)

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
        names = self.class_names or [str(i) for i in range(self.num_classes)]
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
