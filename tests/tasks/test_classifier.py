"""ImageClassifier: weight-decay groups, learning, the EMA callback, checks, predict CSV, and the vit.yaml CLI run."""

import csv
import shutil

import pytest
import torch
from conftest import read_scalars
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from PIL import Image
from torch import nn

from datamodules.images import ImageDataModule
from hiertrans.optim import WarmupCosineLR
from hiertrans.optim import param_groups as weight_decay_groups
from hiertrans.vit import create_model, timm_model
from lit_modules.callbacks import EMA, ema_warmup_update
from lit_modules.classifier import ImageClassifier

TINY = dict(embed_dims=[8, 16, 16, 16], num_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1])


def tiny_net(**kwargs) -> nn.Module:
    return create_model("hvit_cifar", **{**TINY, "num_classes": 3, **kwargs})


def adamw(lr: float = 1e-3):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.05)


def tiny(net: nn.Module | None = None, **kwargs) -> ImageClassifier:
    return ImageClassifier(net if net is not None else tiny_net(), **kwargs)


def image_folder(root, per_class: int = 8, classes=("blue", "green", "red")):
    """Solid-colour images, one colour per class (learnable in a few steps)."""
    for c, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            colour = [40 + 3 * i] * 3
            colour[c % 3] = 250 - 3 * i - 50 * (c // 3)
            Image.new("RGB", (10, 10), tuple(colour)).save(root / "train" / name / f"{i}.png")
    return str(root)


def trainer(**kwargs) -> Trainer:
    return Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                      "enable_progress_bar": False, "enable_model_summary": False, **kwargs})


def test_weight_decay_groups_exclude_norms_biases_pos_embeds():
    model = tiny(tiny_net(global_pool="token")).net  # with a class token
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert all(n.endswith(("pos_embed", "cls_token", ".bias")) or "norm" in n for n in kept)
    assert any(n.endswith("pos_embed") for n in kept) and any(n.endswith("cls_token") for n in kept)
    assert any("norm" in n for n in kept) and any(n.endswith(".bias") for n in kept)
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" in decayed

    class Bare(nn.Module):  # a model naming its no-decay parameters without their module path
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = nn.Linear(8, 8)

        def no_weight_decay(self):
            return {"pos_embed"}

    decay, no_decay = weight_decay_groups(Bare(), 0.1)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 2


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    module = tiny(label_smoothing=0.0)
    images = torch.randn(24, 3, 32, 32)
    targets = torch.arange(24) % 3
    images[torch.arange(24), targets] += 2.0  # the class is the brightest channel
    optimizer = torch.optim.AdamW(weight_decay_groups(module.net, 0.05), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = module.loss(module(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_soft_targets_match_hard_targets():
    module = tiny(label_smoothing=0.1)
    logits, targets = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    soft = torch.nn.functional.one_hot(targets, 3).float()
    assert torch.allclose(module.loss(logits, targets), module.loss(logits, soft))


class RecordHead(Callback):
    """Test helper: the head's weights after every optimizer step, and the ones each validation used."""

    def __init__(self) -> None:
        self.trained, self.validated = [], []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.trained.append(module.net.head.weight.detach().clone())

    def on_validation_epoch_start(self, trainer, module) -> None:  # runs after the EMA callback's swap
        if not trainer.sanity_checking:
            self.validated.append(module.net.head.weight.detach().clone())


def test_ema_warms_up_like_timm_and_ema_decay_adds_the_callback():
    ema, param = [torch.zeros(3), torch.zeros(2, dtype=torch.long)], [torch.ones(3), torch.ones(2, dtype=torch.long)]
    ema_warmup_update(ema, param, torch.tensor(0), decay=0.999)  # n = 0: decay min(0.999, 1/10)
    assert torch.allclose(ema[0], torch.full((3,), 0.9)) and ema[1].tolist() == [1, 1]  # integers: copied
    ema_warmup_update(ema, param, torch.tensor(10_000), decay=0.5)
    assert torch.allclose(ema[0], torch.full((3,), 0.95))
    (callback,) = tiny(ema_decay=0.99).configure_callbacks()
    assert isinstance(callback, EMAWeightAveraging) and callback.decay == 0.99
    assert tiny().configure_callbacks() == []
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(decay=1.0)


def test_fit_with_ema_callback_schedule_and_metrics(tmp_path):
    """Lightning's EMAWeightAveraging: updated after every optimizer step (a copy at the first, then
    `0.9 * ema + 0.1 * weights`: no warm-up), swapped in for validation, saved as the checkpoint's
    `state_dict` beside the trained weights (`current_model_state`), all loadable with weights_only."""
    torch.manual_seed(0)
    dm = ImageDataModule(image_folder(tmp_path / "data"), img_size=32, batch_size=8, val_fraction=0.25)
    module = tiny(optimizer=adamw(1e-3), scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=2, min_lr_ratio=0.1))
    record = RecordHead()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(max_epochs=2, callbacks=[EMAWeightAveraging(decay=0.9), record, checkpoints],
                enable_checkpointing=True)
    t.fit(module, dm)  # 18 train images: 3 steps per epoch, a validation after each epoch
    assert t.global_step == 6 and len(record.trained) == 6
    averages = [record.trained[0]]
    for weights in record.trained[1:]:
        averages.append(0.9 * averages[-1] + 0.1 * weights)
    for validated, step in zip(record.validated, (3, 6), strict=True):
        torch.testing.assert_close(validated, averages[step - 1])
    assert not torch.allclose(averages[-1], record.trained[-1])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["net.head.weight"], averages[-1])
    torch.testing.assert_close(saved["current_model_state"]["net.head.weight"], record.trained[-1])
    assert int(saved["averaging_state"]["n_averaged"]) == 6
    evaluated = ImageClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=True, net=tiny_net())
    torch.testing.assert_close(evaluated.net.head.weight, averages[-1])  # predict/test use the average
    # warm-up over 2 steps, then cosine to 0.1 x lr at step 6
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert t.lr_scheduler_configs[0].interval == "step"
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    assert scheduler.total_steps == 6  # the run's length, from the trainer
    assert [scheduler.multiplier(s) for s in (0, 1, 2)] == pytest.approx([0.5, 1.0, 1.0])
    metrics = t.callback_metrics
    assert {"val/loss", "val/acc", "val/f1", "train/acc"} <= metrics.keys()
    assert "val/acc_top5" not in metrics  # only with more than 5 classes
    assert module.class_names == ["blue", "green", "red"]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = tiny()
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.class_names == ["blue", "green", "red"]


def test_in_memory_data_through_a_real_trainer(tmp_path):
    """Lightning calls the datamodule's `on_after_batch_transfer`: uint8 batches arrive normalised."""
    torch.manual_seed(0)
    dm = ImageDataModule(image_folder(tmp_path), img_size=32, batch_size=6, val_fraction=0.25, in_memory=True,
                         random_resized_crop=True, crop_scale=(0.6, 1.0), hflip=True)
    module = tiny(optimizer=adamw(3e-3), scheduler=None, label_smoothing=0.0)
    t = trainer(max_epochs=8, num_sanity_val_steps=0)
    t.fit(module, dm)
    assert t.callback_metrics["val/acc"] == 1.0  # one solid colour per class
    assert module._fixed_image.dtype == torch.float32 and module._fixed_image.min() < 0


def test_num_classes_must_match_the_data(tmp_path):
    dm = ImageDataModule(image_folder(tmp_path, per_class=2), img_size=32)
    with pytest.raises(ValueError, match="num_classes=10 but the data has 3 classes.*net.init_args.num_classes: 3"):
        trainer(max_steps=1).fit(tiny(tiny_net(num_classes=10)), dm)


def test_bad_hyperparameters_and_networks():
    with pytest.raises(ValueError, match="ema_decay"):
        tiny(ema_decay=1.5)
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        ImageClassifier("hvit_cifar")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ImageClassifier(nn.Flatten())
    with pytest.raises(ValueError, match="unknown timm model 'nope'"):
        timm_model("nope")
    pvt = ImageClassifier(timm_model("pvt_v2_b0", num_classes=10, img_size=32)).net  # size-agnostic: no img_size
    assert pvt(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_predict_writes_a_csv_of_class_names(tmp_path):
    root = image_folder(tmp_path / "data", per_class=2)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tmp_path / "data" / "train" / "red", unlabelled / "nested")
    out = tmp_path / "out" / "predictions.csv"
    dm = ImageDataModule(root, img_size=32, batch_size=1, predict_root=str(unlabelled),
                         predictions_path=str(out))
    module = tiny()
    probs = trainer().predict(module, dm)
    assert len(probs) == 2 and probs[0].shape == (1, 3)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == sorted(str(p) for p in (unlabelled / "nested").iterdir())
    assert all(r["label"] in {"blue", "green", "red"} and 0 < float(r["probability"]) <= 1 for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["predictions.csv"]  # no temporary file left


@pytest.mark.slow
def test_cli_main_job_reaches_95_percent_then_predicts(run_cli, tmp_path, monkeypatch):
    """`python -m hiertrans fit --config vit.yaml` as shipped, to its end (30 epochs on the embedded
    digits): >= 95% validation accuracy, the scalars, figures and checkpoint; then `predict` with
    that checkpoint (in-process through the same `hiertrans.cli.main`: a second subprocess costs
    ~15 s of imports)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("fit", "--config", "vit.yaml", "--trainer.enable_progress_bar=false")
    log_dir = tmp_path / "runs" / "vit" / "version_0"
    scalars = read_scalars(log_dir)
    assert len(scalars["val/acc"]) >= 30 and scalars["val/acc"][-1] >= 0.95, scalars["val/acc"][-5:]  # 0.972 (I10)
    assert {"train/loss", "val/acc", "val/acc_top5", "val/f1", "train/device/items_per_sec",
            "train/device/flops_per_sec"} <= scalars.keys()  # (the last two: lit_modules.Throughput)
    assert any(k.startswith("lr-AdamW") for k in scalars)
    event_file = next(log_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(event_file), size_guidance={"images": 0})
    acc.Reload()
    assert {"val/attention", "val/confusion_matrix"} <= set(acc.Tags()["images"])
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()

    from datamodules.images import prepare_digits

    images = tmp_path / "to_label"
    shutil.copytree(prepare_digits() / "val" / "7", images)
    from hiertrans.cli import main

    monkeypatch.chdir(tmp_path)
    main(["predict", "--config", "vit.yaml", "--ckpt_path", str(checkpoint),
          "--data.init_args.predict_root", str(images), "--data.init_args.predictions_path", "labels.csv",
          "--trainer.enable_progress_bar=false"])
    with open(tmp_path / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.iterdir())
    # the content: each image's label is the class at the argmax, its probability the largest softmax
    from datamodules.images import eval_transform, load_rgb

    model = ImageClassifier.load_from_checkpoint(checkpoint, weights_only=True).eval()
    with torch.no_grad():
        probs = model(torch.stack([eval_transform(32)(load_rgb(r["path"])) for r in rows])).softmax(-1)
    assert [r["label"] for r in rows] == [model.class_names[i] for i in probs.argmax(-1).tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=2e-6)


def test_cifar10_config_builds_model_and_data(tmp_path):
    """vit_cifar10.yaml instantiated in-process (a subprocess would cost ~15 s of imports)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    from hiertrans.cli import resolve_config

    root = image_folder(tmp_path / "cifar", per_class=2, classes=[f"c{i}" for i in range(10)])
    args = ["--config", resolve_config("vit_cifar10.yaml"), "--data.init_args.root", root,
            "--trainer.logger=false", "--trainer.devices=1", "--data.init_args.num_workers=0"]
    cli = LightningCLI(LightningModule, LightningDataModule, subclass_mode_model=True,
                       subclass_mode_data=True, auto_configure_optimizers=False, run=False, args=args)
    assert isinstance(cli.model, ImageClassifier) and cli.model.hparams.net["init_args"]["name"] == "hvit_cifar"
    (ema,) = cli.model.configure_callbacks()  # ema_decay: 0.9998 -> the EMA callback, with warm-up
    assert isinstance(ema, EMA) and ema.decay == 0.9998 and ema.warmup and cli.datamodule.num_classes == 10
    cli.datamodule.setup("fit")
    x, y = next(iter(cli.datamodule.train_dataloader()))
    assert x.shape == (10, 3, 32, 32) and y.shape == (10, 10)  # one image per class held out; mixup on


def test_throughput_callback_and_flop_count(tmp_path):
    """`lit_modules.Throughput` makes the task count its network's FLOPs once, on meta tensors: a linear
    map's forward (2 x batch x in x out) and its weight's backward (the same again); the classifier's
    count is for a training batch's shape, and the weights are untouched."""
    from lit_modules import Throughput
    from lit_modules.callbacks import batch_items, batch_samples
    from lit_modules.task import count_flops

    linear = nn.Linear(4, 3, bias=False)
    assert count_flops(linear, torch.zeros(5, 4)) == 2 * (2 * 5 * 4 * 3) and linear.weight.grad is None
    assert batch_samples((torch.zeros(6, 3, 8, 8), torch.zeros(6))) == batch_items((torch.zeros(6, 3, 8, 8),)) == 6
    assert batch_samples(torch.zeros(4, 33)) == 4 and batch_items(torch.zeros(4, 33)) == 4 * 32  # tokens predicted
    with pytest.raises(ValueError, match="window_size"):
        Throughput(window_size=1)

    dm = ImageDataModule(image_folder(tmp_path), img_size=32, batch_size=8, val_fraction=0.25)
    module = tiny()
    trainer(max_steps=2, callbacks=[Throughput(window_size=2)], limit_val_batches=0).fit(module, dm)
    expected = count_flops(tiny_net(), torch.zeros(8, 3, 32, 32))
    assert module.flops_per_batch == expected > 0


def test_layer_decay_reaches_the_optimizer():
    """ImageClassifier(layer_decay=...): the optimizer's groups carry per-depth LR scales (head 1.0; the
    schedule applies them, tests/models/test_vit.py); bad values are refused."""
    from hiertrans.vit import create_model
    from lit_modules import ImageClassifier

    task = ImageClassifier(create_model("hvit_cifar", depths=(1, 1, 1, 1)), scheduler=None, layer_decay=0.5)
    optimizer = task.configure_optimizers()["optimizer"]
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.5 ** 3
    with pytest.raises(ValueError, match="layer_decay must be in"):
        ImageClassifier(create_model("hvit_cifar", depths=(1, 1, 1, 1)), layer_decay=0)


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_figures_reach_csv_and_wandb_loggers(tmp_path, monkeypatch, logger):
    """The attention maps and the confusion matrix reach a CSVLogger (PNG files beside metrics.csv) and
    a WandbLogger in offline mode (its run's media), as they reach TensorBoard."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if logger == "wandb":
        wandb = pytest.importorskip("wandb", reason="W&B is the optional `wandb` extra")
        monkeypatch.setenv("WANDB_SILENT", "true")
        wandb.finish()  # a run left open elsewhere in this process would be reused (and hold the media)
        chosen = WandbLogger(save_dir=str(tmp_path), offline=True, project="hiertrans-test")
    else:
        chosen = CSVLogger(str(tmp_path), name="csv")
    torch.manual_seed(0)
    dm = ImageDataModule(image_folder(tmp_path / "data", per_class=4), img_size=32, batch_size=6, val_fraction=0.25)
    trainer(max_steps=2, logger=chosen, log_every_n_steps=1, num_sanity_val_steps=0).fit(tiny(), dm)
    if logger == "csv":
        media = sorted(p.name for p in (tmp_path / "csv" / "version_0" / "media").iterdir())
        assert media == ["val_attention_step2.png", "val_confusion_matrix_step2.png"]
        assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    else:
        chosen.experiment.finish()
        images = [p.name for p in tmp_path.rglob("*.png")]
        assert any(name.startswith("val/attention") or "attention" in name for name in images), images
        assert any("confusion_matrix" in name for name in images), images
