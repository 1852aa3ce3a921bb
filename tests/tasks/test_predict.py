"""`predict` checked for content: the language model's continuation of a prompt is the model's own seeded
sampling (`net.generate` after `torch.manual_seed` with the run's seed), through the CLI and a checkpoint, with
the sampling options of the predict command (the datamodule's), not those saved in the checkpoint. (The
classifier's predictions: tests/tasks/test_classifier.py, the argmax class and its softmax.)"""

import inspect
import json

import pytest
import torch
from helpers import TINY_LM_ARGS

from datamodules import ByteTextDataModule
from hiertrans.cli import main
from lit_modules import LanguageModel

PROMPT = "def load("


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 3-step lm.yaml run on a tiny net; its validation sample settings (sample_length 24, temperature
    0.8, filter_thres 0.9) are saved in the checkpoint's hyperparameters."""
    root = tmp_path_factory.mktemp("predict")
    (root / "corpus.txt").write_text(inspect.getsource(json) * 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", "--config", "lm.yaml", *tiny_args(), "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
              "--trainer.num_sanity_val_steps=0"])
    return root, root / "runs/lm/version_0/checkpoints/last.ckpt"


def tiny_args() -> list[str]:
    return [*TINY_LM_ARGS, "--data.init_args.path=corpus.txt", "--model.init_args.sample_length=24",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def predict(checkpoint, monkeypatch, capsys, *options: str) -> str:
    root, ckpt = checkpoint
    monkeypatch.chdir(root)
    capsys.readouterr()
    main(["predict", "--config", "lm.yaml", *tiny_args(), "--ckpt_path", str(ckpt), f"--data.init_args.prompt={PROMPT}",
          *options])
    return capsys.readouterr().out


def own_sampling(ckpt, length: int, seed: int, **options) -> str:
    """The network's own `generate` from the checkpoint's weights, after `torch.manual_seed(seed)`."""
    net = LanguageModel.load_from_checkpoint(ckpt, weights_only=True).net.eval()
    ids = ByteTextDataModule.encode(PROMPT)
    torch.manual_seed(seed)
    return ByteTextDataModule.decode(net.generate(ids, length, **options))


def test_predict_continues_the_prompt_with_the_models_own_seeded_sampling(checkpoint, monkeypatch, capsys):
    printed = predict(checkpoint, monkeypatch, capsys, "--data.init_args.predict_length=20",
                      "--data.init_args.predict_temperature=1.5", "--data.init_args.predict_top_k=40",
                      "--data.init_args.predict_top_p=0.95")
    # lm.yaml's seed_everything: 0, the first prompt: seed 0
    expected = PROMPT + own_sampling(checkpoint[1], 20, 0, temperature=1.5, filter_thres=0.0, top_k=40, top_p=0.95)
    assert expected in printed, (expected, printed)
    other = own_sampling(checkpoint[1], 20, 1, temperature=1.5, filter_thres=0.0, top_k=40, top_p=0.95)
    assert other != expected[len(PROMPT):]  # the seed decides: the check can fail


def test_predict_options_are_the_commands_not_the_checkpoints(checkpoint, monkeypatch, capsys):
    """The checkpoint saved sample_length 24 and temperature 0.8 (the validation sample's); predict samples
    the data's predict_length greedily, token for token the argmax of the full forward (uncached)."""
    printed = predict(checkpoint, monkeypatch, capsys, "--data.init_args.predict_length=9",
                      "--data.init_args.predict_temperature=0")
    greedy = own_sampling(checkpoint[1], 9, 123, temperature=0.0, use_cache=False)
    assert PROMPT + greedy + "\n" in printed, (greedy, printed)
    task = LanguageModel.load_from_checkpoint(checkpoint[1], weights_only=True)
    assert task.hparams.sample_length == 24 and task.hparams.temperature == 0.8


@pytest.mark.parametrize("option, value, match", [
    ("predict_length", -1, "predict_length must be an int >= 0"),
    ("predict_temperature", -0.5, "predict_temperature must be a number >= 0"),
    ("predict_top_k", 0, r"predict_top_k must be None \(all bytes\) or an int >= 1, got 0"),
    ("predict_top_p", 1.5, r"predict_top_p must be None \(no nucleus\) or in \(0, 1\], got 1.5"),
])
def test_invalid_predict_options_name_the_value(option, value, match):
    with pytest.raises(ValueError, match=match):
        ByteTextDataModule(**{option: value})
