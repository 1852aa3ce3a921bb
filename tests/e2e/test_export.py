"""`python -m hiertrans export`: a training checkpoint's network as a save_pretrained folder, with the
trained or (`--ema`) the averaged weights, rebuilt by `from_pretrained` with identical outputs; bad
requests end in one `hiertrans: error:` line. Everything runs in this process (no imports to pay)."""

from pathlib import Path

import pytest
import torch
from test_resume_images import VIT_TINY

from hiertrans import HierarchialViT
from hiertrans.cli import main


def cli(cwd: Path, *args: str) -> tuple[int, str]:
    """`python -m hiertrans <args>` in `cwd`, in this process: (exit code, stderr)."""
    import contextlib
    import io
    import os

    here, err = Path.cwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        os.chdir(here)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """vit.yaml (tiny net) trained 3 steps with an EMA (`ema_decay`)."""
    tmp = tmp_path_factory.mktemp("export")
    code, err = cli(tmp, "fit", "--config", "vit.yaml", *VIT_TINY, "--model.init_args.ema_decay=0.5",
                    "--model.init_args.log_attention_every_val=false", "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
    assert code == 0, err
    return tmp / "runs/vit/version_0/checkpoints/last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_export_writes_the_trained_or_the_averaged_weights(ema, checkpoint, tmp_path):
    out = tmp_path / "exported"
    code, err = cli(tmp_path, "export", "--config", "vit.yaml", "--ckpt_path", str(checkpoint), "--out", str(out),
                    *(["--ema"] if ema else []))
    assert code == 0, err
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}  # (and a model card)
    saved = torch.load(checkpoint, weights_only=True)
    weights = saved["state_dict" if ema else "current_model_state"]  # the EMA callback's layout
    net = HierarchialViT.from_pretrained(out)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[f"net.{name}"], rtol=0, atol=0, msg=name)
    assert not torch.equal(saved["state_dict"]["net.head.weight"], saved["current_model_state"]["net.head.weight"])


@pytest.mark.slow
def test_bad_exports_end_in_one_line(checkpoint, tmp_path):
    plain = tmp_path / "plain.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"] = saved.pop("current_model_state")  # as trained without an EMA
    torch.save(saved, plain)
    for args, expected in [
        (["--ckpt_path", str(plain), "--out", "a", "--ema"], "holds no EMA weights"),
        (["--config", "lm.yaml", "--ckpt_path", str(checkpoint), "--out", "a"],
         "was written by lit_modules.ImageClassifier, but the config trains lit_modules.LanguageModel"),
        (["--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", "a"], "does not exist"),
        (["--ckpt_path", str(checkpoint), "--out", str(tmp_path)], "already exists"),
        (["--ckpt_path", str(checkpoint)], "export needs --ckpt_path CKPT and --out DIR"),
        (["--ckpt_path", str(checkpoint), "--out", "a", "--bogus"], "not --bogus"),
    ]:
        code, err = cli(tmp_path, "export", *args)
        assert code == 2 and "hiertrans: error:" in err and expected in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_export_of_the_language_model(tmp_path):
    import inspect
    import json

    from helpers import TINY_LM_ARGS

    from hiertrans import HierarchicalTransformer

    (tmp_path / "corpus.txt").write_text(inspect.getsource(json))
    code, err = cli(tmp_path, "fit", "--config", "lm.yaml", *TINY_LM_ARGS, "--data.init_args.path=corpus.txt",
                    "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false")
    assert code == 0, err
    checkpoint = tmp_path / "runs/lm/version_0/checkpoints/last.ckpt"
    code, err = cli(tmp_path, "export", "--config", "lm.yaml", "--ckpt_path", str(checkpoint), "--out", "lm")
    assert code == 0, err
    net = HierarchicalTransformer.from_pretrained(tmp_path / "lm")
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[f"net.{name}"], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_fine_tune_exported_weights_with_another_class_count(checkpoint, tmp_path):
    """Exported weights as the network of a new fit (`hiertrans.vit.pretrained`) on 3 classes instead of
    10 (a new head), with layer-wise LR decay: the acceptance command of fine-tuning, through the CLI."""
    out = tmp_path / "exported"
    assert cli(tmp_path, "export", "--config", "vit.yaml", "--ckpt_path", str(checkpoint), "--out", str(out))[0] == 0
    data = tmp_path / "three"
    from PIL import Image

    for c, name in enumerate(("a", "b", "c")):
        (data / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (80 * c, 10 * i, 0)).save(data / "train" / name / f"{i}.png")
    code, err = cli(tmp_path, "fit", "--config", "vit.yaml", "--model.init_args.net=hiertrans.vit.pretrained",
                    f"--model.init_args.net.init_args.path={out}", "--model.init_args.net.init_args.num_classes=3",
                    "--model.init_args.layer_decay=0.75", f"--data.init_args.root={data}",
                    "--data.init_args.val_fraction=0.25", "--data.init_args.batch_size=4", "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                    "--model.init_args.log_attention_every_val=false", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false")
    assert code == 0, err
    tuned = torch.load(next(tmp_path.glob("runs/vit/version_*/checkpoints/last.ckpt")), weights_only=True)
    assert tuned["state_dict"]["net.head.weight"].shape[0] == 3
    assert {group["lr_scale"] for group in tuned["optimizer_states"][0]["param_groups"]} >= {1.0, 0.75}
