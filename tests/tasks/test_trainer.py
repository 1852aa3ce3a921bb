"""HViTTrainer (Fabric): training, validation, atomic checkpoints and exact resumption."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hiertrans.trainer import HViTTrainer, warmup_cosine
from hiertrans.vit import create_model

TINY = dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1),
            num_classes=3, drop_path_rate=0.2, drop_rate=0.1)  # dropouts: resumption must replay the RNG



def data(n: int = 40, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    images = torch.randn(n, 3, 32, 32, generator=g)
    images[torch.arange(n), targets] += 1.5
    return TensorDataset(images, targets)


def make_trainer(init_seed: int = 0, **config) -> HViTTrainer:
    torch.manual_seed(init_seed)
    model = create_model("hvit_cifar", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    config = {"train_loader": DataLoader(data(), batch_size=8, shuffle=True),
              "val_loader": DataLoader(data(12, seed=1), batch_size=6), "epochs": 3,
              "scheduler": {"warmup_steps": 3, "min_lr_ratio": 0.1}, "seed": 7, "verbose": False, **config}
    return HViTTrainer(model, optimizer, nn.CrossEntropyLoss(label_smoothing=0.1), "cpu", config)


def test_train_epoch_and_validate():
    trainer = make_trainer()
    first = trainer.train_epoch()
    assert set(first) == {"loss", "accuracy"} and 0 <= first["accuracy"] <= 1
    assert trainer.epoch == 1 and trainer.global_step == 5
    metrics = trainer.validate()
    assert {"loss", "accuracy", "f1", "precision", "recall"} <= metrics.keys()
    assert trainer.model.training is False
    history = trainer.fit()
    assert [row["epoch"] for row in history] == [2, 3] and "val/accuracy" in history[-1]
    assert history[-1]["train/loss"] < first["loss"]


def test_resume_is_exact(tmp_path):
    """3 epochs straight == 1 epoch, save, a fresh trainer (other init, other global RNG), load, 2 more."""
    straight = make_trainer()
    torch.manual_seed(123)
    straight_history = straight.fit()

    first = make_trainer()
    torch.manual_seed(123)
    first.fit(1)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed = make_trainer(init_seed=99)
    torch.manual_seed(555)  # whatever happened in between: the checkpoint restores the RNG
    resumed.load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed.epoch == 1 and resumed.global_step == 5
    resumed_history = resumed.fit()

    assert resumed_history == straight_history[1:]
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    a, b = straight.raw_optimizer.state_dict()["state"], resumed.raw_optimizer.state_dict()["state"]
    assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_checkpoint_is_plain_atomic_and_weights_only(tmp_path, monkeypatch):
    trainer = make_trainer(checkpoint_dir=str(tmp_path / "run"))
    trainer.fit(1)
    path = tmp_path / "run" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects: loaders left out of config
    assert checkpoint["epoch"] == 1 and "train_loader" not in checkpoint["config"]
    assert checkpoint["config"]["scheduler"] == {"warmup_steps": 3, "min_lr_ratio": 0.1}

    def full_disk(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(tmp_path / "other" / "ckpt.pt")
    assert list((tmp_path / "other").iterdir()) == []  # no partial file, no temporary left
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["last.pt"]


def test_bf16_mixed_precision_runs():
    trainer = make_trainer(precision="bf16-mixed", epochs=1)
    assert torch.isfinite(torch.tensor(trainer.train_epoch()["loss"]))


def test_user_errors(tmp_path):
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="train_loader"):
        HViTTrainer(model, optimizer, nn.CrossEntropyLoss(), "cpu", {})
    with pytest.raises(ValueError, match="device"):
        HViTTrainer(model, optimizer, nn.CrossEntropyLoss(), "toaster", {"train_loader": loader})
    with pytest.raises(ValueError, match="epochs"):
        HViTTrainer(model, optimizer, nn.CrossEntropyLoss(), "cpu", {"train_loader": loader, "epochs": 0})
    trainer = HViTTrainer(model, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"),
                          {"train_loader": loader})
    with pytest.raises(ValueError, match="val_loader"):
        trainer.validate()
    with pytest.raises(ValueError, match="does not exist"):
        trainer.load_checkpoint(tmp_path / "missing.pt")
    make_trainer().save_checkpoint(tmp_path / "with_scheduler.pt")
    with pytest.raises(ValueError, match="scheduler"):
        make_trainer(scheduler=None).load_checkpoint(tmp_path / "with_scheduler.pt")


def test_warmup_cosine_shape():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(16)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0) and values[9] == pytest.approx(0.55)
    assert values[14] == values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
