"""Cached generation (`decode` on key/value caches) against the uncached loop, for every model and
every mode the causality tests cover; the sampling options."""

import pytest
import torch
from test_hourglass import HOURGLASS_CASES
from test_hourglass import tiny as tiny_hourglass
from test_lm import CAUSAL_CASES
from test_lm import tiny as tiny_hierarchical
from test_transformer import tiny as tiny_flat

from hiertrans.lm import sample, top_p

VOCAB, CONTEXT = 40, 24  # a short context, so that 30 new tokens run past it

MODELS = {
    **{f"hierarchical-{name}": (tiny_hierarchical, case) for name, case in CAUSAL_CASES.items()},
    "flat-full": (tiny_flat, dict()),
    "flat-window-shift": (tiny_flat, dict(window_size=5, token_shift=True)),
    **{f"hourglass-{name}": (tiny_hourglass, case) for name, case in HOURGLASS_CASES.items()},
}


def build(name: str, seq_len: int = CONTEXT) -> torch.nn.Module:
    """In float64: the cached and the full forward then agree to ~1e-15, so no argmax is a near tie."""
    make, case = MODELS[name]
    return make(**case, seq_len=seq_len).double().eval()


@pytest.mark.parametrize("name", MODELS)
def test_decode_equals_the_full_forward(name):
    """A prompt into an empty cache, then one token at a time: the logits of every position equal
    the full forward's (prompt lengths that do and do not fill the strides and chunks)."""
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        for prompt in (1, 5):
            cache = model.init_cache()
            logits = [model.decode(ids[:, :prompt], cache)]
            logits += [model.decode(ids[:, t : t + 1], cache) for t in range(prompt, CONTEXT)]
            torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_cached_equals_the_uncached_loop(name):
    """Temperature 0: token for token the argmax of the full forward over the last seq_len tokens,
    also past the context (`slide=1` rebuilds the cache at every token there, as the loop does)."""
    model = build(name)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    uncached = model.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert torch.equal(model.generate(prompt, 30, temperature=0.0, slide=1), uncached)


def windowed_greedy(model, prompt: torch.Tensor, steps: int, slide: int) -> torch.Tensor:
    """The context policy of `sample` with its cache, by full forwards: the context grows to seq_len,
    then restarts from its last seq_len - slide tokens and the new one."""
    out, start = prompt, 0
    for _ in range(steps):
        if out.shape[1] - start > model.seq_len:
            start = out.shape[1] - (model.seq_len - slide + 1)
        with torch.no_grad():
            out = torch.cat((out, model(out[:, start:])[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("name", ["hierarchical-merge-all-predict-strided", "flat-window-shift",
                                  "hourglass-two-levels-attention"])
def test_past_the_context_the_cache_slides_by_slide_tokens(name):
    model = build(name)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    for slide in (None, 7):  # default: seq_len // 4
        expected = windowed_greedy(model, prompt, 50, CONTEXT // 4 if slide is None else slide)
        assert torch.equal(model.generate(prompt, 50, temperature=0.0, slide=slide), expected)


def test_batched_prompts_and_seeded_sampling_match_the_uncached_loop():
    model = build("hierarchical-four-levels-strided")
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    greedy = model.generate(prompt, 12, temperature=0.0)
    for row in range(3):  # each row of a batch as if alone
        assert torch.equal(model.generate(prompt[row], 12, temperature=0.0), greedy[row])
    torch.manual_seed(0)
    cached = model.generate(prompt, 12, temperature=0.9, filter_thres=0.5, top_p=0.9)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, 12, temperature=0.9, filter_thres=0.5, top_p=0.9, use_cache=False),
                       cached)


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_p(logits, 0.7)).tolist() == [[False, False, True, True]]  # 0.5 + 0.3 reach 0.7
    assert torch.isinf(top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(top_p(logits, 1e-9)).tolist() == [[False, True, True, True]]  # at least one
    model = build("flat-full")
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_p=1e-9), greedy)
    torch.manual_seed(0)  # the sampled tokens follow the filtered distribution
    counts = torch.bincount(sample_from(logits.expand(4000, 4), top_p=0.7), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)


def sample_from(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    from hiertrans.lm import next_token

    return next_token(logits, 1.0, logits.shape[-1], kwargs.get("top_p"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be a number >= 0"),
        (dict(top_k=0), ValueError, "top_k must be None or an int >= 1"),
        (dict(top_p=0.0), ValueError, r"top_p must be None or in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"top_p must be None or in \(0, 1\]"),
        (dict(filter_thres=1.0), ValueError, r"filter_thres must be in \[0, 1\)"),
        (dict(slide=0), ValueError, r"slide must be an int in \[1, seq_len=24\]"),
        (dict(slide=25), ValueError, r"slide must be an int in \[1, seq_len=24\]"),
        (dict(compile="yes"), TypeError, "compile must be a bool or a dict of torch.compile options, got 'yes'"),
        (dict(compile=True, use_cache=False), ValueError, "compile compiles the cached decode step"),
    ],
)
def test_invalid_sampling_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        build("flat-full").generate(torch.zeros(1, 3, dtype=torch.long), 2, **kwargs)


def test_decode_misuse_and_models_without_a_cache():
    model = build("hierarchical-two-levels")
    cache = model.init_cache()
    model.decode(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="then one token per call; got 2 tokens after 3"):
        model.decode(torch.zeros(1, 2, dtype=torch.long), cache)
    full = model.init_cache()
    model.decode(torch.zeros(1, CONTEXT, dtype=torch.long), full)
    with pytest.raises(ValueError, match="exceed seq_len=24; start a new cache"):
        model.decode(torch.zeros(1, 1, dtype=torch.long), full)

    class Plain(torch.nn.Module):  # a CausalLM without init_cache/decode: the uncached loop
        num_tokens, seq_len = VOCAB, CONTEXT

        def forward(self, ids):
            return model(ids)

    prompt = torch.randint(0, VOCAB, (1, 4))
    assert torch.equal(sample(Plain(), prompt, 5, temperature=0.0), model.generate(prompt, 5, temperature=0.0))
    with pytest.raises(TypeError, match="use_cache=True needs a model with init_cache"):
        sample(Plain(), prompt, 5, use_cache=True)


@pytest.mark.parametrize("name", ["hierarchical-four-levels-strided", "flat-window-shift"])
def test_compiled_decode_step_is_greedy_equal_and_compiles_once_per_phase(name):
    """`compile`: the decode step through torch.compile (its graphs, run by an eager backend here)
    gives the uncached loop's tokens, and its graphs do not grow with the number of steps: the
    caches keep their shapes, so only the phases of the strides and sub-sequences compile."""
    model = build(name)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    uncached = model.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert torch.equal(model.generate(prompt, 40, temperature=0.0, slide=1, compile={"backend": backend}), uncached)
    compiled = len(graphs)
    assert 0 < compiled <= 10
    model.generate(prompt, 40, temperature=0.0, compile={"backend": backend})  # a second call reuses them
    assert len(graphs) == compiled
