"""`--trainer.precision=bf16-mixed` on the CPU: the path GPU users take (autocast) trains both tasks, a
few steps each with the opt-in CPU kernels on: the loss is finite and falls, and the oneDNN product,
which is fp32-only, steps aside under autocast (its threshold is lowered so that it would run in fp32)."""

import inspect
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import read_scalars
from helpers import TINY_LM_ARGS

from hiertrans import cpu_kernels

STEPS = 6
VIT_TINY = [f"--model.init_args.net.init_args.{k}" for k in (
    "embed_dims=[16,16,32,32]", "num_heads=[1,1,2,2]", "depths=[1,1,1,1]", "mlp_ratios=[2,2,2,2]")]
COMMON = ["--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu", f"--trainer.max_steps={STEPS}",
          "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--trainer.callbacks+=test_bf16.ProfileStep"]


class ProfileStep(pl.Callback):
    """Test helper: into `ops.json`, the names of the ops the third training step ran, the CPU-kernel
    classes in the network and the dtype of the network's output."""

    def on_train_start(self, trainer, module) -> None:
        self.dtypes = set()
        logits = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731 - (logits, aux losses) or logits
        module.net.register_forward_hook(lambda net, args, out: self.dtypes.add(str(logits(out).dtype)))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step == 3:
            self.profile.__exit__(None, None, None)
            kernels = {type(m).__name__ for m in module.net.modules() if type(m).__module__ == cpu_kernels.__name__}
            ops = {event.name for event in self.profile.events()}
            Path("ops.json").write_text(json.dumps({"ops": sorted(ops), "kernels": sorted(kernels),
                                                    "dtypes": sorted(self.dtypes)}))


@pytest.mark.parametrize("config", ["lm.yaml", "vit.yaml"])
def test_bf16_mixed_trains_with_the_cpu_kernels_stepping_aside(config, tmp_path, monkeypatch):
    from hiertrans.cli import main

    monkeypatch.setenv("HIERTRANS_CPU_KERNELS", "1")
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_MACS", 0)  # in fp32 every linear would take oneDNN
    monkeypatch.chdir(tmp_path)
    if config == "lm.yaml":
        (tmp_path / "corpus.txt").write_text(inspect.getsource(json) * 2)
        args = [*TINY_LM_ARGS, "--data.init_args.path=corpus.txt", "--data.init_args.batch_size=8",
                "--model.init_args.sample_length=4"]
    else:
        args = [*VIT_TINY, "--model.init_args.log_attention_every_val=false", "--data.init_args.batch_size=32"]
    threads = torch.get_num_threads()
    try:
        main(["fit", "--config", config, *args, *COMMON])
    finally:
        torch.set_num_threads(threads)
    losses = read_scalars(tmp_path / "runs")["train/loss"]  # one run, one event file: in step order
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # falling
    profiled = json.loads((tmp_path / "ops.json").read_text())
    assert "OneDNNLinear" in profiled["kernels"]  # the kernels are in the network ...
    assert "hiertrans::onednn_mm" not in profiled["ops"]  # ... and the fp32-only product stepped aside
    assert profiled["dtypes"] == ["torch.bfloat16"]  # autocast: the products ran in bf16
