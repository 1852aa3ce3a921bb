"""HierarchyReduction1d against a naive per-segment loop, its validation, and the level-by-level encoder."""

import inspect
import json

import pytest
import torch
from einops import rearrange
from torch import nn

from hiertrans.reduction import HierarchicalEncoder, HierarchyReduction1d, LevelEncoder, text_boundaries

NAMED = ["sum", "mean", "max", "attention"]


def make_reduction(reducer: str, dim: int, heads: int = 2) -> HierarchyReduction1d:
    module = HierarchyReduction1d(reducer, dim=dim, heads=heads)
    if reducer == "attention":  # the query starts at zero (mean pooling): give it something to do
        nn.init.normal_(module.to_score.weight)
    return module


def naive(module: HierarchyReduction1d, x: torch.Tensor, slices) -> torch.Tensor:
    """The obvious Python loop: one segment at a time; empty segments give zeros."""
    rows = []
    for s, e in slices:
        seg = x[s:e]
        if e == s:
            rows.append(x.new_zeros(x.shape[1:]))
        elif module.reducer == "sum":
            rows.append(seg.sum(0))
        elif module.reducer == "mean":
            rows.append(seg.mean(0))
        elif module.reducer == "max":
            rows.append(seg.amax(0))
        else:
            w = module.to_score(seg).softmax(dim=0)  # (len, h)
            pooled = (rearrange(seg, "l (h d) -> l h d", h=module.heads) * w[..., None]).sum(0)
            rows.append(pooled.flatten())
    return torch.stack(rows)


def random_documents(gen: torch.Generator, docs: int = 3, max_segments: int = 12, max_len: int = 6):
    """Per-document segment lengths (empty segments included) and the packed (start, end) slices."""
    per_doc = [torch.randint(0, max_len + 1, (int(torch.randint(1, max_segments, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(docs)]
    per_doc[0][0] = 0  # always at least one empty segment
    lengths = [n for doc in per_doc for n in doc]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    return per_doc, [(e - n, e) for n, e in zip(lengths, ends)], lengths


@pytest.mark.parametrize("reducer", NAMED)
def test_matches_naive_loop_on_packed_documents(reducer):
    gen = torch.Generator().manual_seed(0)
    module = make_reduction(reducer, dim=8)
    for _ in range(5):
        per_doc, slices, lengths = random_documents(gen)
        x = torch.randn(sum(lengths), 8, generator=gen)
        out = module(x, slices)
        torch.testing.assert_close(out, naive(module, x, slices))
        # packing documents together changes nothing: rows come back in slice order, doc by doc
        pieces, start = [], 0
        for doc in per_doc:
            pieces.append(module(x[start:start + sum(doc)], lengths=doc))
            start += sum(doc)
        torch.testing.assert_close(out, torch.cat(pieces))


@pytest.mark.parametrize("reducer", NAMED)
def test_slices_offsets_lengths_agree(reducer):
    gen = torch.Generator().manual_seed(1)
    module = make_reduction(reducer, dim=6)
    _, slices, lengths = random_documents(gen)
    x = torch.randn(sum(lengths), 6, generator=gen)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    expected = module(x, slices)
    for out in (module(x, torch.tensor(slices)), module(x, offsets=offsets),
                module(x, offsets=offsets.tolist()), module(x, lengths=lengths),
                module(x, lengths=torch.tensor(lengths)), module(x, slices, check=False)):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_custom_module_reducer_loops_per_segment():
    class FirstPlusLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, seg):
            return self.scale * (seg[0] + seg[-1]) if len(seg) else seg.new_zeros(seg.shape[1:])

    module = HierarchyReduction1d(FirstPlusLast())
    assert [n for n, _ in module.named_parameters()] == ["fn.scale"]
    slices = [(0, 2), (2, 2), (2, 5)]
    x = torch.randn(5, 4, requires_grad=True)
    out = module(x, slices)
    torch.testing.assert_close(out, torch.stack([2 * (x[0] + x[1]), torch.zeros(4), 2 * (x[2] + x[4])]))
    out.sum().backward()
    assert module.fn.scale.grad is not None
    # plain callables work as well
    torch.testing.assert_close(HierarchyReduction1d(lambda s: s.sum(0))(x, slices),
                               HierarchyReduction1d("sum")(x, slices))


@pytest.mark.parametrize("reducer", NAMED)
def test_empty_segments_are_zero_with_zero_finite_gradient(reducer):
    module = make_reduction(reducer, dim=4)
    x = -torch.rand(5, 4) - 1  # all negative: a max that started from 0 or -inf would show
    x.requires_grad_()
    out = module(x, [(0, 0), (0, 3), (3, 3), (3, 5), (5, 5)])
    assert torch.isfinite(out).all()
    assert (out[[0, 2, 4]] == 0).all() and (out[[1, 3]] != 0).all()
    grad = torch.zeros_like(out)
    grad[[0, 2, 4]] = 1.0  # gradient flowing into empty segments only
    out.backward(grad)
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    # nothing but empty segments, and no segments at all over an empty input
    assert (module(torch.zeros(0, 4), [(0, 0), (0, 0)]) == 0).all()
    assert module(torch.zeros(0, 4), []).shape == (0, 4)


@pytest.mark.parametrize("reducer", NAMED)
def test_gradcheck_float64(reducer):
    gen = torch.Generator().manual_seed(2)
    slices = [(0, 3), (3, 3), (3, 4), (4, 8)]
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)  # distinct: max is smooth
    module = make_reduction(reducer, dim=4).double()
    if reducer != "attention":
        assert torch.autograd.gradcheck(lambda t: module(t, slices), (x,))
        return
    weight = module.to_score.weight.detach().clone().requires_grad_()

    def pooled(t, w):
        return torch.func.functional_call(module, {"to_score.weight": w}, (t, slices))

    assert torch.autograd.gradcheck(pooled, (x, weight))


def test_max_splits_gradient_between_ties():
    x = torch.tensor([[1.0], [3.0], [3.0], [2.0]], requires_grad=True)
    HierarchyReduction1d("max")(x, [(0, 4)]).sum().backward()
    assert x.grad.flatten().tolist() == [0.0, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reducer", NAMED)
def test_dtypes(reducer, dtype):
    gen = torch.Generator().manual_seed(3)
    module = make_reduction(reducer, dim=8)
    lengths = [0, 300, 7, 1]  # a long segment: half-precision sums must accumulate in float32
    x = torch.randn(sum(lengths), 8, generator=gen)
    expected = module(x, lengths=lengths)
    out = module.to(dtype)(x.to(dtype), lengths=lengths)
    assert out.dtype == dtype
    tol = {torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * max(1, lengths[1] ** 0.5))


def test_trailing_feature_dims():
    x = torch.randn(7, 2, 3)
    for reducer in ("sum", "mean", "max"):
        out = HierarchyReduction1d(reducer)(x, lengths=[2, 0, 5])
        flat = HierarchyReduction1d(reducer)(x.flatten(1), lengths=[2, 0, 5])
        torch.testing.assert_close(out, flat.view(3, 2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reducer", NAMED)
def test_cuda_matches_cpu(reducer):
    module = make_reduction(reducer, dim=8)
    x = torch.randn(20, 8)
    slices = [(0, 5), (5, 5), (5, 20)]
    torch.testing.assert_close(module.cuda()(x.cuda(), slices).cpu(), module.cpu()(x, slices))


# ----------------------------------------------------------------------------------------------
# bad input

BAD_SLICES = [
    ([(0, 3), (2, 6)], r"slice 1 = \(2, 6\) overlaps slice 0 = \(0, 3\); expected it to start at 3"),
    ([(0, 3), (4, 6)], r"slice 1 = \(4, 6\) leaves a gap after slice 0 = \(0, 3\): rows 3\.\.4 are not"),
    ([(1, 6)], r"slice 0 = \(1, 6\) leaves a gap: rows 0\.\.1 are not covered"),
    ([(0, 3), (3, 5)], r"the last slice 1 = \(3, 5\) ends at 5, leaving rows 5\.\.6 uncovered; .* at 6"),
    ([(0, 3), (3, 8)], r"slice 1 = \(3, 8\) is out of range: the input has 6 rows"),
    ([(3, 6), (0, 3)], r"slice 1 = \(0, 3\) is not in increasing order: it starts before slice 0 = \(3, 6\)"),
    ([(-1, 3), (3, 6)], r"slice 0 = \(-1, 3\) has a negative bound"),
    ([(0, 3), (3, 2), (2, 6)], r"slice 1 = \(3, 2\) has end < start"),
    ([], r"no segments given but the input has 6 rows"),
]


@pytest.mark.parametrize("slices, message", BAD_SLICES)
def test_bad_slices_say_which(slices, message):
    module = HierarchyReduction1d("sum")
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="invalid slices: " + message):
        module(x, slices)
    if slices:
        with pytest.raises(ValueError, match=message):
            module(x, torch.tensor(slices))


@pytest.mark.parametrize("kwargs, message", [
    ({"offsets": [1, 3, 6]},
     r"invalid offsets: segment 0 = \(offsets\[0\], offsets\[1\]\) = \(1, 3\) leaves a"),
    ({"offsets": [0, 3, 5]}, r"invalid offsets: the last segment 1 .* ends at 5, leaving rows 5\.\.6"),
    ({"offsets": [0, 4, 3, 6]}, r"segment 1 = \(offsets\[1\], offsets\[2\]\) = \(4, 3\) has end < start"),
    ({"offsets": [0, 3, 7]}, r"\(3, 7\) is out of range: the input has 6 rows"),
    ({"offsets": []}, r"offsets must be 1-D \(num_segments \+ 1,\)"),
    ({"lengths": [3, -1, 4]}, r"invalid lengths: segment 1 \(lengths\[1\] = -1, rows 3\.\.2\) has end <"),
    ({"lengths": [3, 4]}, r"segment 1 \(lengths\[1\] = 4, rows 3\.\.7\) is out of range"),
    ({"lengths": [3, 2]}, r"leaving rows 5\.\.6 uncovered"),
    ({"lengths": [[3, 3]]}, r"lengths must be 1-D"),
    ({"slices": [(0, 3, 6)]}, r"slices must be \(num_segments, 2\)"),
    ({}, r"give exactly one of slices, offsets= or lengths=; got none"),
    ({"slices": [(0, 6)], "lengths": [6]}, r"exactly one of .*; got slices, lengths"),
])
def test_bad_boundaries(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HierarchyReduction1d("mean")(torch.randn(6, 2), **kwargs)


def test_bad_construction_and_dtype():
    with pytest.raises(ValueError, match="unknown reducer 'median'"):
        HierarchyReduction1d("median")
    with pytest.raises(ValueError, match="give dim="):
        HierarchyReduction1d("attention")
    with pytest.raises(TypeError, match="slices must hold integers"):
        HierarchyReduction1d("sum")(torch.randn(6, 2), [(0.0, 6.0)])


# ----------------------------------------------------------------------------------------------
# boundaries from text and the encoder


def corpus() -> list[str]:
    return [inspect.getsource(json)[:2500], "Hello, wörld! Short doc.\n\n  New paragraph here", "", "  lead"]


def test_text_boundaries_tile_the_text():
    texts = corpus()
    byte_ids, (words, sentences, documents) = text_boundaries(texts)
    data = bytes(byte_ids.tolist())
    assert data == "".join(texts).encode()
    levels = ((words, len(byte_ids)), (sentences, len(words) - 1), (documents, len(sentences) - 1))
    for offsets, below in levels:
        assert offsets[0] == 0 and offsets[-1] == below and (offsets.diff() >= 0).all()
    assert len(documents) == len(texts) + 1
    # documents' bytes are the texts, words carry their whitespace, sentences end where expected
    doc_bytes = words[sentences[documents]].tolist()
    assert [data[s:e].decode() for s, e in zip(doc_bytes, doc_bytes[1:])] == texts
    ids, (w, s, d) = text_boundaries(["Hello world. How are you?\n\nNew para", "  Hi there."])
    data, bounds = bytes(ids.tolist()), w.tolist()
    assert [data[a:b].decode() for a, b in zip(bounds, bounds[1:])] == [
        "Hello ", "world. ", "How ", "are ", "you?\n\n", "New ", "para", "  ", "Hi ", "there."]
    assert s.tolist() == [0, 2, 5, 7, 10] and d.tolist() == [0, 3, 4]


@pytest.fixture(scope="module")
def encoded():
    torch.manual_seed(0)
    encoder = HierarchicalEncoder(32, depth_per_level=[1, 1, 1], heads=2, dim_head=16)
    byte_ids, boundaries = text_boundaries(corpus())
    return encoder, byte_ids, boundaries, encoder(byte_ids, boundaries)


def test_encoder_level_counts_and_gradients(encoded):
    encoder, byte_ids, boundaries, outputs = encoded
    assert encoder.level_names == ("bytes", "words", "sentences", "documents")
    counts = [len(byte_ids)] + [len(b) - 1 for b in boundaries]
    assert [tuple(o.shape) for o in outputs] == [(n, 32) for n in counts]
    assert outputs[-1].shape[0] == len(corpus())
    assert (outputs[-1][2] == 0).all()  # the empty text: a document with no sentences
    assert all(torch.isfinite(o).all() for o in outputs)
    outputs[-1].sum().backward()
    grad = encoder.embed.weight.grad
    assert grad is not None and (grad[byte_ids.unique()].abs().sum(-1) > 0).all()


def test_attention_stays_inside_each_group():
    torch.manual_seed(0)
    encoder = HierarchicalEncoder(16, heads=2, dim_head=8).eval()
    byte_ids, boundaries = text_boundaries(["one two three. four five six.", "seven eight"])
    before = encoder(byte_ids, boundaries)
    changed = byte_ids.clone()
    changed[5] = ord("X")  # inside "two " = bytes 4..8, word 1, sentence 0, document 0
    after = encoder(changed, boundaries)
    differs = [(a - b).abs().amax(-1) > 1e-6 for a, b in zip(before, after)]
    assert differs[0].nonzero().flatten().tolist() == [4, 5, 6, 7]  # only the bytes of that word
    assert differs[1].nonzero().flatten().tolist() == [0, 1, 2]  # only the words of that sentence
    assert differs[3].tolist() == [True, False]  # only that document


def test_bucketed_level_encoder_matches_per_group_loop():
    torch.manual_seed(0)
    level = LevelEncoder(16, depth=2, heads=2, dim_head=8)
    lengths = [3, 0, 1, 17, 5, 8, 2, 0, 33]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(sum(lengths), 16)
    expected = []
    for s, e in zip(offsets.tolist(), offsets[1:].tolist()):
        h = x[s:e][None]
        for block in level.blocks:
            h = block(h, torch.ones(1, e - s, dtype=torch.bool))
        expected.append(h[0])
    torch.testing.assert_close(level(x, offsets), torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_encoder_rejects_bad_boundaries():
    encoder = HierarchicalEncoder(16, heads=2, dim_head=8)
    byte_ids, (words, sentences, documents) = text_boundaries(["a b. c d."])
    with pytest.raises(ValueError, match="got 2 boundary tensors for 3 levels"):
        encoder(byte_ids, [words, sentences])
    with pytest.raises(ValueError, match="invalid sentences offsets: the last segment"):
        encoder(byte_ids, [words, sentences[:-1], documents])
