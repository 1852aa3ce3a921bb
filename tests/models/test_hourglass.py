"""`hiertrans.HourglassTransformer` (Nawrot et al. 2021) on the shared layers."""

import inspect
import json.decoder

import pytest
import torch
from helpers import assert_compiled_training_matches_eager, assert_strictly_causal

from hiertrans import CausalLM, HourglassTransformer
from hiertrans.hourglass import hourglass_hierarchy
from hiertrans.protocols import CausalLMWithAuxLosses, IncrementalCausalLM

VOCAB = 40

HOURGLASS_CASES = {
    "k2-linear": dict(depths=(1, 1, 1), shorten_factors=(2,)),
    "k3-average-attention": dict(depths=(1, 2, 1), shorten_factors=(3,), downsample="average", upsample="attention"),
    "two-levels-attention": dict(depths=(1, 1, 1, 1, 1), shorten_factors=(2, 3), upsample="attention"),
    "k4-window-no-post": dict(depths=(1, 1, 0), shorten_factors=(4,), window_size=3),
}


def tiny(**kwargs) -> HourglassTransformer:
    torch.manual_seed(0)
    args = dict(num_tokens=VOCAB, dim=16, seq_len=64, heads=2, dim_head=8)
    return HourglassTransformer(**{**args, **kwargs})


@pytest.mark.parametrize("n", [5, 23])  # divisible by none of the factors
@pytest.mark.parametrize("case", HOURGLASS_CASES)
def test_strict_causality(case, n):
    """Logits at t never change when any token after t changes."""
    model = tiny(**HOURGLASS_CASES[case]).eval()
    assert_strictly_causal(model, n, VOCAB)


def test_shortening_reads_only_completed_chunks():
    """Shortened token j pools positions j*k - k + 1 .. j*k and position t reads token t // k: with
    factor 3 and no full-resolution layers, a change at position 1 reaches position 1 (its own
    residual) and positions 3.. (token 1 covers 1..3), never position 2 (token 0 covers 0 only)."""
    model = tiny(depths=(0, 1, 0), shorten_factors=(3,)).eval()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 1] = (ids[0, 1] + 1) % VOCAB
    with torch.no_grad():
        moved = (model(changed) - model(ids)).abs().amax(-1)[0] > 0
    assert moved.tolist() == [False, True, False, True, True, True, True]


def test_loss_labels_and_protocol():
    model = tiny()
    assert isinstance(model, CausalLM) and isinstance(model, IncrementalCausalLM)
    assert not isinstance(model, CausalLMWithAuxLosses)
    ids = torch.randint(0, VOCAB, (3, 10))
    loss, (ce,) = model(ids, return_loss=True)
    assert loss is ce and loss.ndim == 0
    labels = ids[:, 1:].clone()
    labels[0, -2:] = -1
    expected = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-1)
    torch.testing.assert_close(model(ids[:, :-1], return_loss=True, labels=labels)[0], expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="longer than seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shorten_factors=()), "shorten_factors must be one or more ints >= 2"),
        (dict(shorten_factors=(1,)), "shorten_factors must be one or more ints >= 2"),
        (dict(depths=(1, 2)), r"depths must be 3 ints >= 0 for 1 shortening level"),
        (dict(depths=(1, 1, 1), shorten_factors=(2, 2)), r"depths must be 5 ints >= 0 for 2 shortening level"),
        (dict(depths=(1, 0, 1)), r"the innermost level needs layers: depths\[1\] must be >= 1"),
        (dict(downsample="max"), r"downsample must be one of \('linear', 'average'\), got 'max'"),
        (dict(upsample="repeat"), r"upsample must be one of \('linear', 'attention'\), got 'repeat'"),
        (dict(window_size=0), "window_size must be None"),
        (dict(dim_head=7), "dim_head must be even"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_dropout_in_training_only():
    model = tiny(dropout=0.3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.train()(ids), model(ids))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), model(ids), rtol=0, atol=0)


def test_paper_notation():
    assert hourglass_hierarchy("2@1 4@3 2@1") == {"depths": (2, 4, 2), "shorten_factors": (3,)}
    assert hourglass_hierarchy("1@1 2@2 8@6 2@2 1@1") == {"depths": (1, 2, 8, 2, 1), "shorten_factors": (2, 3)}
    for bad in ("2@1 4@3", "2@1 4@3 2@2", "2@1 4@4 6@6 4@4 2@1", "2-1 4@3 2@1"):
        with pytest.raises(ValueError, match="hierarchy"):
            hourglass_hierarchy(bad)


def test_compiles_fullgraph_forward_and_backward():
    model = tiny(depths=(0, 1, 0), shorten_factors=(3,), upsample="attention")  # the most code, fewest kernels
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    assert_compiled_training_matches_eager(model, ids)


def test_loss_falls_on_real_text():
    """A few dozen steps on real Python source bring the loss down a long way from uniform."""
    data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
    torch.manual_seed(0)
    model = HourglassTransformer(num_tokens=256, dim=64, seq_len=64, heads=2, dim_head=32, depths=(1, 1, 1),
                                 shorten_factors=(2,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss, _ = model(batch, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.5  # ~ln(256) at initialisation
    assert sum(losses[-5:]) / 5 < 3.3


def test_lm_hourglass_yaml_parameter_count():
    """configs/lm_hourglass.yaml's network is within 1% of lm.yaml's 2,316,032 parameters."""
    with torch.device("meta"):
        model = HourglassTransformer(num_tokens=256, dim=160, seq_len=256, depths=(2, 3, 2), shorten_factors=(2,),
                                     heads=5, dim_head=32)
    assert sum(p.numel() for p in model.parameters()) == 2_337_760


@pytest.mark.slow
def test_cli_fit_and_predict_through_lm_hourglass_yaml(run_cli, tmp_path):
    from conftest import read_scalars

    run_cli("fit", "--config", "lm_hourglass.yaml", "--trainer.max_steps=20", "--trainer.limit_val_batches=2",
            "--model.init_args.sample_length=8")
    (saved,) = (tmp_path / "runs").rglob("config.yaml")  # the whole resolved config, as --print_config prints it
    assert "class_path: hiertrans.HourglassTransformer\n" in saved.read_text()
    scalars = read_scalars(tmp_path / "runs")
    assert "train/loss" in scalars and "val/bpb" in scalars
    assert scalars["train/loss"][-1] < scalars["train/loss"][0]
    (ckpt,) = (tmp_path / "runs").rglob("last.ckpt")
    proc = run_cli("predict", "--config", "lm_hourglass.yaml", f"--ckpt_path={ckpt}",
                   "--data.init_args.prompt=import json", "--data.init_args.predict_length=12")
    assert "import json" in proc.stdout


def test_save_pretrained_round_trip(tmp_path):
    """Hugging Face-style weights (`hiertrans.hub.HubMixin`): the same outputs from the saved folder."""
    model = tiny(**HOURGLASS_CASES["two-levels-attention"]).eval()
    model.save_pretrained(tmp_path)
    loaded = HourglassTransformer.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids), model(ids)) and not loaded.training
    assert loaded.depths == model.depths and loaded.shorten_factors == model.shorten_factors
