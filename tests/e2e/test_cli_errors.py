"""Bad input ends with a short `hiertrans: error: ...` naming the culprit, a non-zero exit and no
partial run directory. Most cases call `hiertrans.cli.main` in-process (a subprocess costs ~10 s
of imports each); one end-to-end case checks the real exit code and stderr of `python -m hiertrans`."""

from pathlib import Path

import pytest
from helpers import TINY_LM_ARGS

from hiertrans.cli import main

TINY_LM = [*TINY_LM_ARGS,
           "--data.init_args.val_fraction=0.1", "--data.init_args.test_fraction=0.1",
           "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


def fail(tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    """Run the CLI in `tmp_path`; assert a clean user-error exit; return stderr."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HIERTRANS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 2, (info.value.code, err)
    assert "hiertrans: error:" in err and "Traceback" not in err, err
    message = err[err.index("hiertrans: error:"):]
    assert len(message.splitlines()) <= 4, message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lightning_logs").exists(), \
        sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    return message


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_malformed_yaml_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    bad = write(tmp_path / "bad.yaml", "model:\n  init_args: {dim: [1, 2\n")
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--config", bad)
    assert "bad.yaml" in err and "line" in err


def test_unknown_key(tmp_path, monkeypatch, capsys):
    extra = write(tmp_path / "extra.yaml", "trainer:\n  max_stepz: 3\n")
    assert "max_stepz" in fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--config", extra)
    assert "bogus" in fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--model.init_args.bogus=1")


def test_wrong_type_names_the_key(tmp_path, monkeypatch, capsys):
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--model.init_args.net.init_args.depth=abc")
    assert "model.init_args.net.init_args.depth" in err and "abc" in err


def test_missing_config_lists_the_shipped_ones(tmp_path, monkeypatch, capsys):
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "nope.yaml")
    assert "nope.yaml" in err and "lm.yaml" in err and "vit.yaml" in err


def test_invalid_model_hyperparameter(tmp_path, monkeypatch, capsys):
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--model.init_args.net.init_args.dim=-3")
    assert "dim=-3" in err and "LanguageModel" in err


def test_missing_data_path_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "no_such_corpus.txt")
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM,
               f"--data.init_args.path={missing}")
    assert "no_such_corpus.txt" in err


def test_empty_corpus(tmp_path, monkeypatch, capsys):
    empty = write(tmp_path / "empty.txt", "")
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM, f"--data.init_args.path={empty}")
    assert "empty.txt" in err and "empty" in err


def test_model_and_data_seq_len_mismatch_after_the_logger_started(tmp_path, monkeypatch, capsys):
    """Fails in LightningModule.setup, after TensorBoard and SaveConfigCallback wrote into runs/."""
    text = write(tmp_path / "c.txt", "hello world\n" * 400)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM, f"--data.init_args.path={text}",
               "--data.init_args.seq_len=64")
    assert "data.init_args.seq_len=64 is longer than the network's model.init_args.net.init_args.seq_len=32" in err


def _image_folder(root: Path, corrupt: bool) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (8, 8), color=60 if cls == "a" else 200).save(root / split / cls / "0.png")
    if corrupt:
        (root / "val" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


VIT = ["--model.init_args.net.init_args.num_classes=2", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"]


def test_corrupt_image_names_the_file(tmp_path, monkeypatch, capsys):
    _image_folder(tmp_path / "imgs", corrupt=True)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "vit.yaml", *VIT,
               f"--data.init_args.root={tmp_path / 'imgs'}")
    assert "broken.png" in err


def test_image_folder_without_classes(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "vit.yaml", *VIT,
               f"--data.init_args.root={tmp_path / 'imgs'}")
    assert "class folders" in err and "train" in err


def test_prompt_longer_than_seq_len(tmp_path, monkeypatch, capsys):
    err = fail(tmp_path, monkeypatch, capsys, "predict", "--config", "lm.yaml", *TINY_LM[:6],
               "--data.init_args.prompt=" + "x" * 40)
    assert "prompt" in err and "seq_len=32" in err


def test_traceback_flag_reraises_for_debugging(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="dim=-3"):
        main(["fit", "--config", "lm.yaml", "--model.init_args.net.init_args.dim=-3", "--traceback"])


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Exceptions other than user errors are not swallowed."""
    import lit_modules.language_model as lm

    def broken(self, batch, batch_idx):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(lm.LanguageModel, "training_step", broken)
    monkeypatch.chdir(tmp_path)
    text = write(tmp_path / "c.txt", "hello world\n" * 400)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["fit", "--config", "lm.yaml", *TINY_LM, f"--data.init_args.path={text}",
              "--trainer.num_sanity_val_steps=0"])


def test_lightning_misconfiguration_is_a_user_error(tmp_path, monkeypatch, capsys):
    text = write(tmp_path / "c.txt", "hello world\n" * 400)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM, f"--data.init_args.path={text}",
               "--trainer.logger=false")
    assert "LearningRateMonitor" in err


def test_end_to_end_exit_code_and_stderr(run_cli, tmp_path):
    proc = run_cli("fit", "--config", "lm.yaml", "--data.init_args.path=missing.txt", "--trainer.max_steps=1",
                   check=False)
    assert proc.returncode == 2
    assert "hiertrans: error:" in proc.stderr and "missing.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 8, proc.stderr
    assert not (tmp_path / "runs").exists()


# --- checkpoints that are not usable for the config ------------------------------------------------


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of the language model: one step of lm.yaml's network, shrunk."""
    tmp = tmp_path_factory.mktemp("lm_checkpoint")
    text = write(tmp / "c.txt", "hello world\n" * 400)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        main(["fit", "--config", "lm.yaml", *TINY_LM, f"--data.init_args.path={text}",
              "--trainer.num_sanity_val_steps=0"])
    return tmp / "runs/lm/version_0/checkpoints/last.ckpt"


def _classifier_checkpoint(path: Path) -> None:
    """A checkpoint of an ImageClassifier built in Python (its hyperparameters name no task class)."""
    import lightning.pytorch as pl

    from hiertrans import HierarchialViT
    from lit_modules import ImageClassifier

    net = HierarchialViT(img_size=32, num_classes=10, embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1],
                         depths=[1, 1, 1, 1], sr_ratios=[1, 1, 1, 1])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(ImageClassifier(net))
    trainer.save_checkpoint(path)


class Opaque:
    """A class a checkpoint can pickle but weights_only=True refuses to rebuild."""


@pytest.mark.parametrize("case, expected", [
    ("text", "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle"),
    ("truncated", "is truncated or corrupt (torch.load: PytorchStreamReader failed reading zip archive"),
    ("other task", "was written by lit_modules.LanguageModel, but the config trains lit_modules.ImageClassifier"),
    ("other shape", "does not fit the configured network: net.token_emb.weight is (256, 32) in the checkpoint but "
                    "(256, 48) in the model"),
    ("old arguments", "holds arguments lit_modules.LanguageModel does not take (written by another version?): "
                      "ema_decay"),
    ("from Python", "was saved from Python, not by `python -m hiertrans fit`"),
    ("pickled object", "holds pickled objects other than plain data, which weights_only=True refuses"),
])
def test_a_checkpoint_that_does_not_fit_is_named_in_one_line(case, expected, lm_checkpoint, tmp_path, monkeypatch,
                                                             capsys):
    import torch

    path, config = tmp_path / "given.ckpt", "vit.yaml"
    if case == "text":
        path.write_text("these are notes, not weights\n")
    elif case == "truncated":
        data = lm_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "other task":
        path.write_bytes(lm_checkpoint.read_bytes())
    elif case in ("other shape", "old arguments"):  # hyperparameters that no longer describe the weights
        checkpoint, config = torch.load(lm_checkpoint, weights_only=True), "lm.yaml"
        if case == "other shape":
            checkpoint["hyper_parameters"]["net"]["init_args"]["dim"] = 48
        else:
            checkpoint["hyper_parameters"]["ema_decay"] = 0.999
        torch.save(checkpoint, path)
    elif case == "from Python":
        _classifier_checkpoint(path)
    else:
        torch.save({"state_dict": {}, "extra": Opaque()}, path)
    sub = "predict" if case == "other task" else "fit"  # every subcommand checks its --ckpt_path
    err = fail(tmp_path, monkeypatch, capsys, sub, "--config", config, "--ckpt_path", str(path),
               "--trainer.max_steps=1", "--trainer.enable_progress_bar=false")
    assert str(path) in err and expected in err, err


def test_checkpoint_paths_that_are_no_checkpoint(tmp_path):
    from hiertrans.cli import UserError, read_checkpoint

    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="is a directory, not a checkpoint"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("ema", ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                                 "--model.init_args.ema_decay=0.99"])
def test_ema_with_fsdp2_is_refused_before_any_process_starts(ema, tmp_path, monkeypatch, capsys):
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "vit.yaml", "--trainer.strategy=fsdp2",
               "--trainer.devices=2", "--trainer.accelerator=cpu", ema)
    assert "(EMA) does not support sharded models" in err and "ddp" in err


# --- data that is not usable ------------------------------------------------------------------------


def test_zero_byte_image_and_empty_class_folders(tmp_path, monkeypatch, capsys):
    _image_folder(tmp_path / "imgs", corrupt=False)
    (tmp_path / "imgs" / "train" / "b" / "blank.png").write_bytes(b"")
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "vit.yaml", *VIT,
               f"--data.init_args.root={tmp_path / 'imgs'}")
    assert "empty (0-byte) image files" in err and "blank.png" in err and "skip_corrupt" in err
    for cls in ("a", "b"):
        for f in (tmp_path / "imgs" / "train" / cls).iterdir():
            f.unlink()
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "vit.yaml", *VIT,
               f"--data.init_args.root={tmp_path / 'imgs'}")
    assert "class folders without images (every class folder is empty)" in err and "'a', 'b'" in err


def test_a_directory_of_binary_files_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM,
               f"--data.init_args.path={tmp_path / 'blobs'}")
    assert "no text files in directory" in err and "weights.bin" in err and "binary" in err


def test_a_binary_or_non_utf8_file_is_named_with_what_to_do(tmp_path, monkeypatch, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 100)
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM,
               f"--data.init_args.path={tmp_path / 'weights.bin'}")
    assert "weights.bin' is binary: a NUL byte at offset 0" in err and "allow_binary=true" in err
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", *TINY_LM,
               f"--data.init_args.path={tmp_path / 'latin1.txt'}")
    assert "latin1.txt' is not UTF-8: byte 0xe9" in err and "iconv" in err


def test_ckpt_path_last_says_when_it_cannot_find_runs(tmp_path, monkeypatch, capsys):
    two = write(tmp_path / "two_loggers.yaml", "trainer:\n  logger:\n"
                "    - {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: runs}}\n"
                "    - {class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: runs}}\n")
    err = fail(tmp_path, monkeypatch, capsys, "fit", "--config", "lm.yaml", "--config", two, "--ckpt_path", "last")
    assert "--ckpt_path last" in err and "a list of 2 loggers" in err and "checkpoint's path" in err
