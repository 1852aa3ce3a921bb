"""Language modelling on byte windows: any causal LM `net`, `ids (b, n) -> logits (b, n, vocab)`."""

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from hiertrans.optim import WarmupCosineLR

from .media import log_text, takes_media
from .task import Task

# Marks positions without a target (padding of the last validation window): no byte takes it, so
# the loss counts every real byte and bits per byte are exact.
IGNORE_INDEX = -1


class LanguageModel(Task):
    """Trains a causal language model `net` on batches of byte windows `(b, seq_len + 1)`.

    `net` maps `ids (b, n) -> logits (b, n, num_tokens)` and has `seq_len` and `num_tokens`
    attributes (`hiertrans.HierarchicalTransformer`, `hiertrans.Transformer`, or your own; see
    `hiertrans.protocols.CausalLM`). A network with auxiliary losses declares their weights in
    `net.aux_loss_weights` (`{"recon": 0.1, ...}`) and returns `(logits, {name: loss})` from
    `net(ids, return_aux_losses=True)`; the task adds `weight * loss` to the cross-entropy and logs
    each as `train/<name>`. Logs `train/loss|ce|bpb`, `val/loss`, `val/bpb`
    (bits per byte over the whole validation split, exactly) and a text sample at each validation
    (from the weights validation uses: the averaged ones under an EMA callback). Tokens/s and FLOPs/s
    come from the `lit_modules.Throughput` callback (Lightning's ThroughputMonitor) in the configs.

    Sampling is seeded, not drawn from the global RNG: validation samples with the step number as
    seed, predict with the run's seed plus the prompt's index, so validating never changes what
    training draws and `generate(prompt, n, seed, **options)` reproduces a prediction.

    `sample_length`, `temperature` and `filter_thres` are the validation sample's settings (part of
    the training run, saved with it). Predict takes its settings from the datamodule's
    `predict_options` (`ByteTextDataModule`'s `predict_length`, `predict_temperature`, ...):
    predict-time options, which a checkpoint's saved hyperparameters cannot override; these
    settings only stand in for a datamodule without them.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = lambda params: torch.optim.AdamW(
            params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
        scheduler: LRSchedulerCallable | None = lambda optimizer: WarmupCosineLR(
            optimizer, warmup_steps=100, min_lr_ratio=0.1),
        compile: bool = False,
        sample_length: int = 256,
        temperature: float = 0.8,
        filter_thres: float = 0.9,
        grad_checkpointing: bool = False,
    ):
        super().__init__(net, optimizer, scheduler, compile, grad_checkpointing=grad_checkpointing)
        for name in ("seq_len", "num_tokens"):
            if not isinstance(getattr(net, name, None), int):
                raise TypeError(f"the language model's net must have an int attribute {name!r} "
                                f"(hiertrans.protocols.CausalLM); {type(net).__name__} has none")
        self.save_plain_hyperparameters()
        self.val_bpb, self.test_bpb = MeanMetric(), MeanMetric()

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_seq_len = getattr(data, "seq_len", None)
        if data_seq_len is not None and data_seq_len > self.net.seq_len:
            raise ValueError(f"data.init_args.seq_len={data_seq_len} is longer than the network's "
                             f"model.init_args.net.init_args.seq_len={self.net.seq_len}; make the net's seq_len >= "
                             f"the data's")
        vocab = getattr(data, "vocab_size", None)
        if vocab is not None and vocab > self.net.num_tokens:
            raise ValueError(f"the data has {vocab} token values but model.init_args.net.init_args.num_tokens="
                             f"{self.net.num_tokens}; set num_tokens: {vocab}")
        super().setup(stage)

    def forward(self, ids: Tensor) -> Tensor:
        return self.net(ids)

    def losses(self, batch: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """`(total, ce, aux losses, labels)` for windows of `seq_len + 1` bytes."""
        # IGNORE_INDEX pads only the tail, after every real byte
        inputs, labels = batch[:, :-1].clamp(min=0), batch[:, 1:]
        weights = getattr(self.net, "aux_loss_weights", None) or {}
        logits, aux = self.net(inputs, return_aux_losses=True) if weights else (self.net(inputs), {})
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        total = ce + sum(weights[name] * loss for name, loss in aux.items())
        return total, ce, aux, labels

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, ce, aux, _ = self.losses(batch)
        self.log_dict({"train/loss": loss, "train/ce": ce, **{f"train/{k}": v for k, v in aux.items()}})
        self.log("train/bpb", ce / math.log(2), prog_bar=True)
        return loss

    def _eval_step(self, batch: Tensor, split: str, bpb: MeanMetric) -> None:
        loss, ce, _, labels = self.losses(batch)
        count = (labels != IGNORE_INDEX).sum()
        bpb.update(ce.detach() / math.log(2), weight=count)  # weighted by real bytes: exact over the split
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=batch.shape[0])
        self.log(f"{split}/bpb", bpb, prog_bar=True)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_sample()  # here, not at the epoch end: an EMA callback has swapped its weights in
        self._eval_step(batch, "val", self.val_bpb)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_bpb)

    def _log_sample(self) -> None:
        wanted = self.trainer.is_global_zero and takes_media(self.loggers)  # TensorBoard, CSV, W&B
        if not hasattr(self.net, "generate") or (self.device_mesh is None and not wanted):
            return
        # a sharded network's forward is collective: then every rank samples (the same text: same seed)
        prompt = getattr(self.trainer.datamodule, "prompt", None) or "\n"
        text = prompt + self.generate(prompt, self.hparams.sample_length, seed=self.global_step)
        if wanted:
            log_text(self.loggers, "val/sample", text, self.global_step)

    def generate(self, prompt: str, length: int, seed: int | None = None, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None) -> str:
        """Continue `prompt` by `length` bytes, decoded as UTF-8. With `seed`, the sampling noise is drawn
        after `torch.manual_seed(seed)` and the global RNG is restored afterwards; without, from the global RNG.

        Without `temperature`: the validation sample's settings (the task's `temperature` and
        `filter_thres`). With it: `temperature` (0: greedy) among the `top_k` likeliest bytes (None:
        all), then the nucleus `top_p` (None: none), as `net.generate` / `hiertrans.lm.sample`."""
        ids = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.long, device=self.device)
        if ids.numel() > self.net.seq_len:
            raise ValueError(f"prompt of {ids.numel()} bytes is longer than seq_len={self.net.seq_len}")
        if ids.numel() == 0:
            ids = torch.tensor([ord("\n")], device=self.device)
        accelerator = [self.device] if self.device.type != "cpu" else []
        with torch.random.fork_rng(accelerator, enabled=seed is not None, device_type=self.device.type):
            if seed is not None:
                torch.manual_seed(seed)
            if temperature is None:
                out = self.net.generate(ids, length, self.hparams.temperature, self.hparams.filter_thres)
            else:  # top_k None keeps every byte: filter_thres 0
                out = self.net.generate(ids, length, temperature, 0.0, top_p, top_k=top_k)
        return bytes(out.tolist()).decode("utf-8", errors="replace")

    def predict_step(self, batch: Tensor, batch_idx: int) -> str:
        """Print and return the prompt with its continuation, sampled with the datamodule's
        `predict_options` (`{"length", "temperature", "top_k", "top_p"}`; without: `sample_length`
        bytes at the validation sample's settings) and seed `torch.initial_seed() + batch_idx` (the
        run's `seed_everything` value plus the prompt's index): `generate(prompt, length, seed,
        temperature=..., top_k=..., top_p=...)` gives the same text."""
        prompt = bytes(batch[0].tolist()).decode("utf-8", errors="replace")
        seed = (torch.initial_seed() + batch_idx) % (1 << 63)
        options = dict(getattr(self.trainer.datamodule, "predict_options", None) or {})
        length = options.pop("length", self.hparams.sample_length)
        text = prompt + self.generate(prompt, length, seed=seed, **options)
        self.print(text)
        return text
