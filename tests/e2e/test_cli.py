import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiertrans.cli import resolve_config, shipped_configs

ROOT = Path(__file__).resolve().parents[2]


def test_bare_config_names_resolve_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"lm.yaml", "vit.yaml", "vit_cifar10.yaml"} <= set(shipped_configs())
    assert Path(resolve_config("lm.yaml")).is_file()
    assert Path(resolve_config("vit")).name == "vit.yaml"
    (tmp_path / "lm.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("lm.yaml") == "lm.yaml"  # a file in the working directory wins


def test_help_and_print_config(tmp_path, capsys):
    from helpers import cli_in_process  # the CLI's own entry point; the subprocess runs are in the fit tests

    assert cli_in_process(tmp_path, "fit", "--help") == 0
    assert "--config" in capsys.readouterr().out
    assert cli_in_process(tmp_path, "fit", "--config", "lm.yaml", "--print_config") == 0
    printed = capsys.readouterr().out
    assert "class_path: lit_modules.LanguageModel" in printed
    assert "class_path: datamodules.ByteTextDataModule" in printed


@pytest.mark.skipif(os.environ.get("HIERTRANS_SKIP_WHEEL_TEST") == "1", reason="HIERTRANS_SKIP_WHEEL_TEST=1")
def test_non_editable_install_finds_its_configs_from_any_directory(tmp_path):
    """Build the wheel, install it into a bare directory, run the CLI from elsewhere."""
    wheels, target, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("hiertrans-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "hiertrans", "fit", "--config", "vit.yaml", "--print_config"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: lit_modules.ImageClassifier" in proc.stdout
    assert "class_path: hiertrans.HierarchialViT" in proc.stdout  # the network, injected by the config
    origin = subprocess.run([sys.executable, "-c", "import hiertrans; print(hiertrans.__file__)"], cwd=cwd, env=env,
                            capture_output=True, text=True, check=True).stdout
    assert origin.startswith(str(target))


def finish_wandb_run() -> None:
    """Close a W&B run the in-process CLI left open (WandbLogger would reuse it in the next run)."""
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].finish()


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_ckpt_path_last_resumes_with_csv_and_wandb_loggers(tmp_path, monkeypatch, logger):
    """`--ckpt_path last` finds the newest last.ckpt under a CSV logger's runs and a W&B logger's
    `<save_dir>/<project>/<run id>/`, and keeps logging into that run."""
    from helpers import TINY_LM_ARGS

    from hiertrans.cli import main

    if logger == "wandb":
        wandb = pytest.importorskip("wandb", reason="W&B is the optional `wandb` extra")
        monkeypatch.setenv("WANDB_SILENT", "true")
        wandb.finish()
        chosen = ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.save_dir=runs",
                  "--trainer.logger.offline=true", "--trainer.logger.project=lm"]
    else:
        chosen = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir=runs",
                  "--trainer.logger.name=lm"]
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    args = ["fit", "--config", "lm.yaml", *TINY_LM_ARGS, *chosen, f"--data.init_args.path={corpus}",
            "--data.init_args.val_fraction=0.1", "--data.init_args.test_fraction=0.1",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--model.init_args.sample_length=4"]
    main([*args, "--trainer.max_steps=2"])
    (first,) = (tmp_path / "runs" / "lm").glob("*/checkpoints/last.ckpt")
    finish_wandb_run()
    main([*args, "--trainer.max_steps=3", "--ckpt_path", "last"])
    finish_wandb_run()
    (resumed,) = (tmp_path / "runs" / "lm").glob("*/checkpoints/last.ckpt")  # the same run, continued
    assert resumed == first
    assert torch.load(resumed, weights_only=True, map_location="cpu")["global_step"] == 3
