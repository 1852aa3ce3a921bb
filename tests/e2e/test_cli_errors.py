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
    assert info.value.code not in (0, None), err
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
