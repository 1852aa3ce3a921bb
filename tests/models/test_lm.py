import inspect
import json.decoder

import pytest
import torch
from helpers import assert_compiled_training_matches_eager, assert_strictly_causal

from hiertrans import HierarchicalBlock, HierarchicalTransformer, set_debug
from hiertrans.layers import local_attend

VOCAB = 40


def tiny(**kwargs) -> HierarchicalTransformer:
    torch.manual_seed(0)
    args = dict(num_tokens=VOCAB, dim=16, depth=2, seq_len=64, heads=2, dim_head=8)
    return HierarchicalTransformer(**{**args, **kwargs})


CAUSAL_CASES = {
    "flat": dict(hierarchies=1),
    "flat-local-nondividing": dict(hierarchies=1, window_sizes=5),
    "two-levels": dict(hierarchies=(1, 2), window_sizes=(4, None)),
    "four-levels-strided": dict(hierarchies=(1, 2, 4, 8), hierarchical_stride=(1, 2, 2, 4),
                                window_sizes=(3, 5, None, 2)),
    "eight-window-longer-than-seq": dict(hierarchies=(1, 8), window_sizes=(100, 3)),
    "merge-all": dict(hierarchies=(1, 2, 4), hierarchical_stride=(1, 2, 4), hierarchy_merge_all=True,
                      window_sizes=(3, None, 2)),
    "merge-all-predict-strided": dict(hierarchies=(2, 4), hierarchical_stride=(2, 2), hierarchy_merge_all=True,
                                      predict_hierarchy=2),
    "predict-use-all": dict(hierarchies=(1, 2, 4), hierarchical_stride=(1, 1, 4), predict_use_all_hierarchy=True,
                            window_sizes=(7, 3, None)),
    "predict-coarse": dict(hierarchies=(1, 4), predict_hierarchy=4, window_sizes=(0, 3)),
    "merge-all-use-all-no-attn": dict(hierarchies=(1, 2), hierarchy_merge_all=True, predict_use_all_hierarchy=True,
                                      window_sizes=(0, 2)),
}


@pytest.mark.parametrize("n", [3, 21])
@pytest.mark.parametrize("case", CAUSAL_CASES)
def test_strict_causality(case, n):
    """Logits at t never change when any token after t changes."""
    model = tiny(**CAUSAL_CASES[case]).eval()
    assert_strictly_causal(model, n, VOCAB)


def test_loss_and_flags():
    model = tiny(hierarchies=(1, 2, 4), window_sizes=(4, None, 2), hierarchical_stride=(1, 2, 2))
    ids = torch.randint(0, VOCAB, (3, 17))
    total, (ce, recon, hier_ar) = model(ids, return_loss=True)
    assert total.ndim == 0 and all(t.ndim == 0 for t in (ce, recon, hier_ar))
    torch.testing.assert_close(total, ce + 0.1 * recon + 0.25 * hier_ar)
    assert recon > 0 and hier_ar > 0
    total.backward()
    assert model.token_emb.weight.grad is not None

    token_embeds = model(ids, return_hierarchical_token_embeds=True)
    assert [t.shape for t in token_embeds] == [(3, 17, 16), (3, 9, 16), (3, 9, 16)]
    embeds = model(ids, return_hierarchical_embeds=True)
    assert [t.shape for t in embeds] == [(3, 17, 16), (3, 9, 16), (3, 9, 16)]
    ablated = model(ids, ablate_hierarchical_merge=True)
    assert ablated.shape == (3, 17, VOCAB) and not torch.allclose(ablated, model(ids))


def test_per_hierarchy_tuples():
    model = tiny(hierarchies=(1, 2), dim=(16, 32), heads=(2, 4), dim_head=(8, 4), ff_mult=(2, 4))
    assert model(torch.randint(0, VOCAB, (1, 9))).shape == (1, 9, VOCAB)
    assert model.layers[0][1].ff.fc1.out_features == 128


def test_ignore_index_skips_only_marked_targets():
    model = HierarchicalTransformer(num_tokens=VOCAB, dim=16, depth=1, heads=2, dim_head=8, ignore_index=-1)
    ids = torch.zeros(1, 9, dtype=torch.long)  # token 0 is a real token here
    _, (ce, _, _) = model(ids, return_loss=True)
    assert ce > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hierarchies=(1, 3)), "hierarchies must be unique powers of two"),
        (dict(hierarchies=(2, 2)), "hierarchies must be unique powers of two"),
        (dict(hierarchies=(1, 2), hierarchical_stride=(1, 4)), "stride 4 of hierarchy 2"),
        (dict(hierarchies=(1, 2), predict_hierarchy=2, hierarchical_stride=(1, 2)),
         "must be 1 unless hierarchy_merge_all"),
        (dict(hierarchies=(1, 2), dim=(16, 16, 16)), "dim has 3 entries but there are 2 hierarchies"),
        (dict(hierarchies=(1, 2), window_sizes=(4,)), "window_sizes has 1 entries"),
        (dict(dim=15, heads=2), "dim=15 of hierarchy 1 must be a positive multiple of heads=2"),
        (dict(predict_hierarchy=4), "predict_hierarchy must be one of"),
        (dict(depth=0), "depth must be a positive int"),
        (dict(window_sizes=-1), "window_size must be None"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


@pytest.fixture
def debug():
    previous = set_debug(True)
    yield
    set_debug(previous)


def test_invalid_inputs(debug):
    """Dtype, shape and length are checked always; token-id values (a host sync) in debug mode."""
    model = tiny()
    with pytest.raises(ValueError, match="longer than seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 39\]"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="got values from -2"):
        model(torch.tensor([[-2, 1]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 39\]"):  # generate checks them always
        set_debug(False)
        model.generate(torch.tensor([[1, 40]]), 2)


def test_forward_reads_no_token_values_outside_debug_mode(monkeypatch):
    """No host sync in the forward: the value check (`torch.aminmax`) runs in debug mode only."""
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda *args, **kwargs: calls.append(1) or (torch.tensor(0), torch.tensor(0)))
    model, ids = tiny(), torch.randint(0, VOCAB, (2, 9))
    previous = set_debug(False)
    try:
        model(ids, return_loss=True)
        assert not calls
        set_debug(True)
        model(ids)
        assert calls
    finally:
        set_debug(previous)


def test_aux_losses_protocol():
    """`return_aux_losses` gives the unweighted losses `aux_loss_weights` names; a task adding them to
    its own cross-entropy gets `return_loss`'s total."""
    model = tiny(hierarchies=(1, 2, 4), window_sizes=(4, None, 2), hierarchical_stride=(1, 2, 2), ignore_index=-1)
    ids = torch.randint(0, VOCAB, (3, 18))
    ids[0, -3:] = -1  # padded targets, as the LM task pads the last window
    total, (ce, recon, hier_ar) = model(ids[:, :-1].clamp(min=0), return_loss=True, labels=ids[:, 1:])
    assert model.aux_loss_weights == {"recon": 0.1, "hier_ar": 0.25}
    logits, aux = model(ids[:, :-1].clamp(min=0), return_aux_losses=True)
    assert set(aux) == {"recon", "hier_ar"} and all(loss.ndim == 0 for loss in aux.values())
    assert torch.equal(aux["recon"], recon) and torch.equal(aux["hier_ar"], hier_ar)
    task_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=-1)
    assert torch.equal(task_ce, ce)
    task_total = task_ce + sum(w * aux[name] for name, w in model.aux_loss_weights.items())
    torch.testing.assert_close(task_total, total, rtol=1e-6, atol=0)

    assert tiny(hierarchies=(1, 2), recon_loss_weight=0.0).aux_loss_weights == {"hier_ar": 0.25}
    assert tiny(hierarchies=1).aux_loss_weights == {}  # nothing compressed: no auxiliary losses
    logits, aux = tiny(hierarchies=1)(ids[:, :-1].clamp(min=0), return_aux_losses=True)
    assert aux == {} and logits.shape == (3, 17, VOCAB)
    with pytest.raises(ValueError, match="exclude each other"):
        model(ids, return_loss=True, return_aux_losses=True)


def test_compiles_fullgraph_forward_and_backward():
    """No graph breaks and no host syncs: `torch.compile(fullgraph=True)` takes the training step."""
    model = tiny(depth=1, hierarchies=(1, 2), window_sizes=(4, None))
    ids = torch.randint(0, VOCAB, (2, 22), generator=torch.Generator().manual_seed(0))
    assert_compiled_training_matches_eager(model, ids)


def test_block_keeps_shape_and_is_causal():
    torch.manual_seed(0)
    for kwargs in (dict(), dict(window_size=3), dict(window_size=0), dict(compress_factor=4, stride=2)):
        block = HierarchicalBlock(16, dim_head=8, heads=2, **kwargs).eval()
        x = torch.randn(2, 11, 16)
        out = block(x)
        assert out.shape == x.shape
        x2 = x.clone()
        x2[:, 6:] = torch.randn(2, 5, 16)
        torch.testing.assert_close(block(x2)[:, :6], out[:, :6])
    with pytest.raises(ValueError, match="compress_factor must be a power of two"):
        HierarchicalBlock(16, compress_factor=3)


@pytest.mark.parametrize("n, window", [(32, 8), (37, 8), (5, 8), (9, 8), (64, 1)])
def test_local_attention_matches_banded_full_attention_and_local_attention_package(n, window):
    from local_attention import LocalAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    banded = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j >= i - window))
    ours = local_attend(q, k, v, window)
    torch.testing.assert_close(ours, banded, atol=1e-5, rtol=1e-5)
    package = LocalAttention(window_size=window, causal=True, exact_windowsize=True, autopad=True,
                             use_rotary_pos_emb=False)
    torch.testing.assert_close(ours, package(q, k, v), atol=1e-5, rtol=1e-5)


def test_local_attention_gradients_match_banded_full_attention():
    """Through the blocked layout (`with_previous_block`), gradients equal the banded reference's,
    in float64, for a length that fills its blocks and one that does not."""
    for n, window in ((24, 8), (21, 8)):
        q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        banded = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j >= i - window))
        grad = torch.randn_like(banded)
        expected = torch.autograd.grad(banded, (q, k, v), grad)
        ours = torch.autograd.grad(local_attend(q, k, v, window), (q, k, v), grad)
        for a, b in zip(ours, expected):
            torch.testing.assert_close(a, b)
        assert torch.autograd.gradcheck(lambda q, k, v, w=window: local_attend(q, k, v, w), (q, k, v))


def test_generate_samples_and_restores_training_flag():
    model = tiny(hierarchies=(1, 2), window_sizes=(4, None)).train()
    prompt = torch.randint(0, VOCAB, (2, 5))
    torch.manual_seed(3)
    out = model.generate(prompt, 7, temperature=1.0, filter_thres=0.9)
    assert out.shape == (2, 7) and out.dtype == prompt.dtype
    assert 0 <= int(out.min()) and int(out.max()) < VOCAB
    assert model.training
    torch.manual_seed(3)
    assert torch.equal(out, model.generate(prompt, 7))
    greedy = model.generate(prompt[0], 70, temperature=0.0)  # longer than seq_len: uses a sliding context
    assert greedy.shape == (70,)
    with pytest.raises(ValueError, match="filter_thres"):
        model.generate(prompt, 3, filter_thres=1.0)


def test_sampling_follows_the_distribution():
    from hiertrans.lm import gumbel_sample, top_k

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]).clamp(min=1e-9)).expand(4000, 4)
    counts = torch.bincount(gumbel_sample(logits, temperature=1.0), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.03, rtol=0)
    kept = top_k(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), thres=0.5)  # keep the top half
    assert torch.isinf(kept).tolist() == [[False, True, False, True]]
    assert gumbel_sample(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0.0).item() == 1


def test_loss_falls_on_real_text():
    """A few dozen steps on real Python source bring the loss down a long way from uniform."""
    data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
    torch.manual_seed(0)
    model = HierarchicalTransformer(num_tokens=256, dim=64, depth=2, seq_len=64, heads=2, dim_head=32,
                                    hierarchies=(1, 2), window_sizes=(16, None), ignore_index=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss, (ce, _, _) = model(batch, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert losses[0] > 4.5  # ~ln(256) at initialisation
    assert sum(losses[-5:]) / 5 < 3.3


def test_save_pretrained_round_trip(tmp_path):
    """Hugging Face-style weights (`hiertrans.hub.HubMixin`): the same outputs, and the same cached decoding."""
    model = tiny(hierarchies=(1, 2, 4), window_sizes=(4, None, None), hierarchical_stride=(1, 2, 2)).eval()
    model.save_pretrained(tmp_path)
    loaded = HierarchicalTransformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids), model(ids)) and not loaded.training
    assert loaded.strides == model.strides and loaded.hierarchies == model.hierarchies
    assert torch.equal(loaded.generate(ids[:, :3], 6, temperature=0.0), model.generate(ids[:, :3], 6, temperature=0.0))
