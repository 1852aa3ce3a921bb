"""`hiertrans.Transformer`: the flat causal control on the shared layers."""

import inspect
import json.decoder

import pytest
import torch
from helpers import assert_compiled_training_matches_eager, assert_strictly_causal

from hiertrans import CausalLM, HierarchicalTransformer, Transformer
from hiertrans.protocols import CausalLMWithAuxLosses

VOCAB = 40


def tiny(**kwargs) -> Transformer:
    torch.manual_seed(0)
    args = dict(num_tokens=VOCAB, dim=16, depth=2, seq_len=64, heads=2, dim_head=8)
    return Transformer(**{**args, **kwargs})


@pytest.mark.parametrize("n", [3, 21])
@pytest.mark.parametrize("kwargs", [dict(), dict(window_size=5, token_shift=True)], ids=["full", "window-shift"])
def test_strict_causality(kwargs, n):
    """Logits at t never change when any token after t changes."""
    assert_strictly_causal(tiny(**kwargs).eval(), n, VOCAB)


def test_loss_labels_and_protocol():
    model = tiny()
    assert isinstance(model, CausalLM) and not isinstance(model, CausalLMWithAuxLosses)
    assert isinstance(HierarchicalTransformer(num_tokens=VOCAB, dim=16, depth=1), CausalLMWithAuxLosses)
    ids = torch.randint(0, VOCAB, (3, 10))
    loss, (ce,) = model(ids, return_loss=True)
    assert loss is ce and loss.ndim == 0
    labels = ids[:, 1:].clone()
    labels[0, -2:] = -1  # ignore_index: padding; token 0 is a real token
    expected = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-1)
    torch.testing.assert_close(model(ids[:, :-1], return_loss=True, labels=labels)[0], expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="labels of shape"):
        model(ids, return_loss=True, labels=labels)
    with pytest.raises(ValueError, match="longer than seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.rand(1, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=0), "depth must be a positive int, got 0"),
        (dict(dim=2.5), "dim must be a positive int"),
        (dict(heads=0), "heads must be a positive int"),
        (dict(dim_head=7), "dim_head must be even"),
        (dict(ff_mult=0), "ff_mult must be a positive number"),
        (dict(window_size=0), r"window_size must be None \(full attention\) or a positive int, got 0"),
        (dict(seq_len=True), "seq_len must be a positive int"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_generate_samples_and_restores_training_flag():
    model = tiny(window_size=4).train()
    prompt = torch.randint(0, VOCAB, (2, 5))
    torch.manual_seed(3)
    out = model.generate(prompt, 7)
    assert out.shape == (2, 7) and out.dtype == prompt.dtype and model.training
    assert 0 <= int(out.min()) and int(out.max()) < VOCAB
    torch.manual_seed(3)
    assert torch.equal(out, model.generate(prompt, 7))
    greedy = model.generate(prompt[0], 70, temperature=0.0)  # longer than seq_len: a sliding context
    assert greedy.shape == (70,)
    with torch.no_grad():
        model.eval()
        assert greedy[0] == model(prompt[:1]).argmax(-1)[0, -1]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 39\]"):
        model.generate(torch.tensor([[1, 40]]), 2)


def test_compiles_fullgraph_forward_and_backward():
    model = tiny(depth=1, window_size=4, token_shift=True)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    assert_compiled_training_matches_eager(model, ids)


def test_loss_falls_on_real_text():
    """A few dozen steps on real Python source bring the loss down a long way from uniform."""
    data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
    torch.manual_seed(0)
    model = Transformer(num_tokens=256, dim=64, depth=2, seq_len=64, heads=2, dim_head=32, window_size=16)
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


def test_parameter_count_matches_lm_yaml_at_depth_12():
    """configs/lm.yaml's HierarchicalTransformer (dim 128, depth 4, hierarchies (1, 2)) has 2.32M
    parameters; the flat control of the same width needs depth 12 for about as many (+4.8%)."""
    def count(model):
        return sum(p.numel() for p in model.parameters())

    shared = dict(num_tokens=256, dim=128, seq_len=256, heads=4, dim_head=32, ff_mult=4)
    with torch.device("meta"):
        hierarchical = HierarchicalTransformer(**shared, depth=4, hierarchies=(1, 2), window_sizes=(32, None))
        flat = Transformer(**shared, depth=12)
    assert count(hierarchical) == 2_316_032
    assert count(flat) == 2_428_032


def test_save_pretrained_round_trip(tmp_path):
    """Hugging Face-style weights (`hiertrans.hub.HubMixin`): the same outputs from the saved folder."""
    model = tiny(window_size=5, token_shift=True).eval()
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, model.num_tokens, (2, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids), model(ids)) and not loaded.training
