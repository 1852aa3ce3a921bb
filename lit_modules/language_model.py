"""Byte-level language modelling with `HierarchicalTransformer`."""

import math

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from hiertrans import HierarchicalTransformer
from hiertrans.optim import no_weight_decay_names, param_groups, warmup_cosine_schedule

from .throughput import StepRate

# Marks positions without a target (padding of the last validation window): no byte takes it, so
# the loss counts every real byte and bits per byte are exact.
IGNORE_INDEX = -1


class LanguageModel(LightningModule):
    """Trains a `HierarchicalTransformer` on batches of byte windows `(b, seq_len + 1)`.

    Model arguments are those of `HierarchicalTransformer` (tuples give one value per hierarchy).
    Logs `train/loss|ce|recon|hier_ar`, `train/tokens_per_sec`, `val/loss`, `val/bpb` (bits per
    byte over the whole validation split) and a text sample at each validation.
    """

    def __init__(
        self,
        # model
        num_tokens: int = 256,
        dim: int | tuple[int, ...] = 256,
        depth: int = 4,
        seq_len: int = 256,
        dim_head: int | tuple[int, ...] = 64,
        heads: int | tuple[int, ...] = 4,
        ff_mult: int | tuple[int, ...] = 4,
        hierarchies: int | tuple[int, ...] = (1, 2),
        window_sizes: int | None | tuple[int | None, ...] = (32, None),
        hierarchical_stride: int | tuple[int, ...] = 1,
        hierarchy_merge_all: bool = False,
        predict_hierarchy: int | None = None,
        predict_use_all_hierarchy: bool = False,
        recon_loss_weight: float = 0.1,
        hierarchical_ar_loss_weight: float = 0.25,
        # optimisation
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool = False,
        # samples written to TensorBoard at each validation and by `predict`
        sample_length: int = 256,
        temperature: float = 0.8,
        filter_thres: float = 0.9,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = HierarchicalTransformer(
            num_tokens=num_tokens, dim=dim, depth=depth, seq_len=seq_len, dim_head=dim_head, heads=heads,
            ff_mult=ff_mult, hierarchies=hierarchies, window_sizes=window_sizes,
            hierarchical_stride=hierarchical_stride, hierarchy_merge_all=hierarchy_merge_all,
            predict_hierarchy=predict_hierarchy, predict_use_all_hierarchy=predict_use_all_hierarchy,
            recon_loss_weight=recon_loss_weight, hierarchical_ar_loss_weight=hierarchical_ar_loss_weight,
            ignore_index=IGNORE_INDEX,
        )
        self.no_decay = no_weight_decay_names(self.model)  # now: an FSDP wrap would hide the shapes
        self.val_bpb, self.test_bpb = MeanMetric(), MeanMetric()
        self.step_rate = StepRate()

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_seq_len = getattr(data, "seq_len", None)
        if data_seq_len is not None and data_seq_len > self.model.seq_len:
            raise ValueError(f"data.seq_len={data_seq_len} is longer than model seq_len={self.model.seq_len}; "
                             "set model.init_args.seq_len >= data.init_args.seq_len")
        if self.hparams.compile and stage == "fit":
            self.model.compile()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def _loss(self, batch: torch.Tensor):
        # windows hold seq_len + 1 bytes; IGNORE_INDEX pads only the tail, after every real byte
        inputs, labels = batch[:, :-1].clamp(min=0), batch[:, 1:]
        return self.model(inputs, return_loss=True, labels=labels), labels

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        (loss, (ce, recon, hier_ar)), _ = self._loss(batch)
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/recon": recon, "train/hier_ar": hier_ar},
                      prog_bar=False)
        self.log("train/bpb", ce / math.log(2), prog_bar=True)
        rate = self.step_rate(batch[:, 1:].numel() * self.trainer.world_size)
        if rate is not None:
            self.log("train/tokens_per_sec", rate, rank_zero_only=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self.step_rate.reset()  # validation time is not training throughput

    def _eval_step(self, batch: torch.Tensor, split: str, bpb: MeanMetric) -> None:
        (loss, (ce, _, _)), labels = self._loss(batch)
        count = (labels != IGNORE_INDEX).sum()
        bpb.update(ce.detach() / math.log(2), weight=count)  # weighted by real bytes: exact over the split
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=batch.shape[0])
        self.log(f"{split}/bpb", bpb, prog_bar=True)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_bpb)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_bpb)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._log_sample()
        self.step_rate.reset()

    @rank_zero_only
    def _log_sample(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        prompt = getattr(self.trainer.datamodule, "prompt", None) or "\n"
        text = prompt + self.generate(prompt, self.hparams.sample_length)
        # TensorBoard renders text as markdown: a code block keeps whitespace
        experiment.add_text("val/sample", "```\n" + text.replace("```", "'''") + "\n```", self.global_step)

    def generate(self, prompt: str, length: int) -> str:
        """Continue `prompt` by `length` bytes, decoded as UTF-8."""
        ids = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.long, device=self.device)
        if ids.numel() > self.model.seq_len:
            raise ValueError(f"prompt of {ids.numel()} bytes is longer than seq_len={self.model.seq_len}")
        if ids.numel() == 0:
            ids = torch.tensor([ord("\n")], device=self.device)
        out = self.model.generate(ids, length, self.hparams.temperature, self.hparams.filter_thres)
        return bytes(out.tolist()).decode("utf-8", errors="replace")

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> str:
        prompt = bytes(batch[0].tolist()).decode("utf-8", errors="replace")
        text = prompt + self.generate(prompt, self.hparams.sample_length)
        self.print(text)
        return text

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, self.no_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        scheduler = warmup_cosine_schedule(optimizer, hp.warmup_steps, self.trainer.estimated_stepping_batches,
                                  hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
