"""`hiertrans.cpu_kernels`: opt-in kernels with the plain ops' values and gradients, swapped in and
out of any model; the default path runs plain PyTorch only."""

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_plain_pytorch, plain_pytorch_violations
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hiertrans import HierarchicalTransformer, RMSNorm, Transformer, cpu_kernels
from hiertrans.cpu_kernels import (
    CPUGELU,
    SMALL_GELU_MAX_NUMEL,
    CPUTokenShift,
    OneDNNLinear,
    onednn_supported,
    with_previous_block_kernel,
)
from hiertrans.layers import local_attend, token_shift, with_previous_block

needs_onednn = pytest.mark.skipif(not onednn_supported(), reason="oneDNN linears are used on x86-64 CPUs only")


def lm(family: str = "hierarchical") -> nn.Module:
    torch.manual_seed(0)
    if family == "flat":
        return Transformer(num_tokens=256, dim=64, depth=2, seq_len=64, heads=2, dim_head=32, window_size=16,
                           token_shift=True)
    return HierarchicalTransformer(num_tokens=256, dim=64, depth=2, seq_len=64, heads=2, dim_head=32,
                                   hierarchies=(1, 2), window_sizes=(16, None), ignore_index=-1)


def lm_batch() -> torch.Tensor:  # 8 x 64 tokens: large enough for the oneDNN products
    return torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(0))


def loss_and_grads(model: nn.Module, batch: torch.Tensor):
    model.zero_grad()
    loss = model(batch, return_loss=True)[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


# --- the switch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["hierarchical", "flat"])
def test_model_values_and_gradients_equal_with_kernels_on_and_off(family):
    plain = lm(family)
    fast = cpu_kernels.apply(copy.deepcopy(plain))
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"OneDNNLinear", "CPURMSNorm", "CPUTokenShift", "CPUAttention"} <= kinds
    assert not kinds & {"Linear", "RMSNorm", "TokenShift", "Attention"}
    loss, grads = loss_and_grads(plain, lm_batch())
    fast_loss, fast_grads = loss_and_grads(fast, lm_batch())
    torch.testing.assert_close(fast_loss, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_swap_round_trip_keeps_modules_parameters_and_state_dict():
    model = lm()
    classes = {name: type(m) for name, m in model.named_modules()}
    ids = {name: id(m) for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert cpu_kernels.apply(model) is model
    assert {name: id(m) for name, m in model.named_modules()} == ids  # same objects, new classes
    assert isinstance(model.norms[0], RMSNorm) and isinstance(model.to_logits, nn.Linear)
    assert list(model.state_dict()) == list(state) and [id(p) for p in model.parameters()] == params
    cpu_kernels.apply(model)  # idempotent
    assert cpu_kernels.remove(model) is model
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    cpu_kernels.apply(model, kernels=["token_shift"])
    assert {type(m).__name__ for m in model.modules()} & {"CPUTokenShift", "OneDNNLinear"} == {"CPUTokenShift"}
    cpu_kernels.apply(model, False)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    with pytest.raises(ValueError, match="unknown CPU kernel 'gemm'; expected some of linear, rms_norm"):
        cpu_kernels.apply(model, kernels=["gemm"])


def test_peer_model_gets_the_same_kernels():
    """Any nn.Module: a third-party peer's plain `nn.Linear`/`nn.RMSNorm` are swapped alike; exact
    classes only, so subclasses with forwards of their own are left alone."""
    torch.manual_seed(0)
    peer = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128), nn.RMSNorm(128),
                         nn.RMSNorm(128, eps=None))
    attention = nn.MultiheadAttention(128, 4)  # its out_proj is a Linear subclass: not swapped
    fast = cpu_kernels.apply(copy.deepcopy(peer))
    assert [type(m).__name__ for m in fast] == ["OneDNNLinear", "CPUGELU", "OneDNNLinear", "CPUTorchRMSNorm",
                                                "CPUTorchRMSNorm"]
    assert type(cpu_kernels.apply(attention).out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(4, 256, 128)
    outputs = []
    for model in (peer, fast):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.square().mean().backward()
        outputs.append((out, xi.grad, *(p.grad for p in model.parameters())))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if onednn_supported():
        assert "OneDNN" in type(fast[0](x.requires_grad_()).grad_fn).__name__


def test_requested_reads_the_environment(monkeypatch):
    monkeypatch.delenv("HIERTRANS_CPU_KERNELS", raising=False)
    assert not cpu_kernels.requested()
    monkeypatch.setenv("HIERTRANS_CPU_KERNELS", "1")
    assert cpu_kernels.requested()
    monkeypatch.setenv("HIERTRANS_CPU_KERNELS", "0")
    assert not cpu_kernels.requested()
    monkeypatch.setenv("HIERTRANS_CPU_KERNELS", "yes please")
    with pytest.raises(ValueError, match="HIERTRANS_CPU_KERNELS='yes please': expected 1"):
        cpu_kernels.requested()


@pytest.mark.parametrize("family", ["hierarchical", "flat"])
def test_default_forward_and_backward_run_plain_pytorch_only(family):
    """No custom op, no private op namespace and no hand-written autograd Function by default; the
    same check sees each kernel once they are switched on."""
    model, batch = lm(family), lm_batch()
    assert_plain_pytorch(lambda: model(batch, return_loss=True)[0].backward())
    cpu_kernels.apply(model)
    found = " ".join(plain_pytorch_violations(lambda: model(batch, return_loss=True)[0].backward()))
    for function in ("_RMSNormFunctionBackward", "_TokenShiftBackward", "_WithPreviousBlockBackward"):
        assert function in found
    if onednn_supported():
        assert "hiertrans::onednn_mm" in found and "_OneDNNLinearBackward" in found


# --- RMSNorm, token shift, sliding-window layout ------------------------------------------------

def test_rms_norm_function_matches_composite_values_and_gradients():
    """The hand-written backward equals autograd through `F.rms_norm`, to float64 precision."""
    from hiertrans.cpu_kernels import _RMSNormFunction, rms_norm

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.rand(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x, w))
    grad = torch.randn(3, 5, 16, dtype=torch.float64)
    ours = torch.autograd.grad(rms_norm(x, (16,), w, 1e-6), (x, w), grad)
    composite = torch.autograd.grad(F.rms_norm(x, (16,), w, 1e-6), (x, w), grad)
    assert all(torch.allclose(a, b) for a, b in zip(ours, composite))
    assert torch.allclose(rms_norm(x, (16,), w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
    assert rms_norm(x, (16,), w, 1e-6).grad_fn.name() == "_RMSNormFunctionBackward"
    assert rms_norm(x, (5, 16), None, None).grad_fn.name() != "_RMSNormFunctionBackward"  # falls back


@pytest.mark.parametrize("shift", [token_shift, CPUTokenShift()], ids=["plain", "kernel"])
def test_token_shift_values_and_gradients(shift):
    x = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)  # odd width: first half gets 4
    shifted = shift(x)
    first, second = x.detach()[..., :4], x.detach()[..., 4:]
    expected = torch.cat((first, F.pad(second, (0, 0, 1, -1))), dim=-1)
    assert torch.equal(shifted, expected)
    assert torch.autograd.gradcheck(shift, (x,))
    assert torch.autograd.gradgradcheck(shift, (x,))
    assert shift(torch.ones(1, 1, 4))[..., 2:].abs().sum() == 0  # a single position sees zeros


def test_window_layout_kernel_matches_plain_layout_and_banded_attention():
    for n, window in ((24, 8), (21, 8)):
        q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        t = torch.randn(2, 3, 32, 4, dtype=torch.float64, requires_grad=True)
        assert torch.equal(with_previous_block_kernel(t, 8), with_previous_block(t, 8))
        assert torch.autograd.gradcheck(lambda t: with_previous_block_kernel(t, 8), (t,))
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        banded = F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j >= i - window))
        ours = local_attend(q, k, v, window, with_previous_block_kernel)
        torch.testing.assert_close(ours, banded)
        grad = torch.randn_like(banded)
        for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(banded, (q, k, v), grad)):
            torch.testing.assert_close(a, b)


# --- the oneDNN linear --------------------------------------------------------------------------

def twin(in_features: int, out_features: int, bias: bool) -> tuple[OneDNNLinear, nn.Linear]:
    ours = OneDNNLinear(in_features, out_features, bias=bias)
    theirs = nn.Linear(in_features, out_features, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@needs_onednn
@pytest.mark.parametrize("in_features, out_features", [(64, 256), (256, 64)])  # both dW layouts
@pytest.mark.parametrize("bias", [True, False])
def test_linear_values_and_gradients_match_nn_linear(in_features, out_features, bias):
    torch.manual_seed(0)
    ours, theirs = twin(in_features, out_features, bias)
    x = torch.randn(3, 700, in_features)[:, ::2]  # strided input, 350 rows
    grad = torch.randn(3, 350, out_features)
    results = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(grad)
        results.append((out, xi.grad, *(p.grad for p in model.parameters())))
    assert "OneDNN" in type(ours(x.requires_grad_()).grad_fn).__name__
    for a, b in zip(*results):  # dW and db sum 1050 rows: fp32 rounding differs by ~1e-6 relative
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_linear_frozen_weight_and_input_without_grad():
    ours, theirs = twin(128, 512, True)
    ours.weight.requires_grad_(False)
    x = torch.randn(64, 128)
    ours(x).sum().backward()
    assert ours.weight.grad is None and ours.bias.grad is not None
    torch.testing.assert_close(ours.bias.grad, torch.full((512,), 64.0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_flop_counter_counts_onednn_products():
    layer, x = OneDNNLinear(256, 1024, bias=False), torch.randn(4096, 256, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 4096 * 256 * 1024  # forward, dx, dW


@pytest.mark.parametrize("case", ["small", "float64", "autocast", "mkldnn flag off"])
def test_linear_other_cases_take_f_linear(case):
    layer = OneDNNLinear(256, 1024)
    x = torch.randn(4096, 256)
    if case == "small":
        x = x[:4]
    if case == "float64":
        layer, x = layer.double(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"), \
            torch.backends.mkldnn.flags(enabled=case != "mkldnn flag off"):
        out = layer(x.requires_grad_())
        expected = F.linear(x, layer.weight, layer.bias)
    assert "OneDNN" not in type(out.grad_fn).__name__
    assert out.dtype == (torch.bfloat16 if case == "autocast" else x.dtype)
    torch.testing.assert_close(out, expected)


@needs_onednn
@pytest.mark.parametrize("outer", ["square", "sum"])  # with .sum() the incoming gradient is a constant
def test_linear_second_derivatives_match_nn_linear(outer):
    torch.manual_seed(0)
    ours, theirs = twin(128, 256, True)
    x = torch.randn(256, 128, requires_grad=True)
    grads = []
    for model in (ours, theirs):
        y = model(torch.tanh(x * 1.5))
        y = y.square().sum() if outer == "square" else y.sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        penalty = gx.square().sum()  # a gradient penalty, as in WGAN-GP / R1
        grads.append(torch.autograd.grad(penalty, [x, model.weight]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_torch_func_and_forward_ad_take_plain_ops():
    ours, theirs = twin(128, 256, False)
    x, tangent = torch.randn(256, 128), torch.randn(256, 128)
    per_sample = torch.func.vmap(torch.func.grad(lambda xi: ours(xi[None]).square().sum()))(x)
    expected = torch.func.vmap(torch.func.grad(lambda xi: theirs(xi[None]).square().sum()))(x)
    torch.testing.assert_close(per_sample, expected)
    _, jvp = torch.func.jvp(ours, (x,), (tangent,))
    torch.testing.assert_close(jvp, theirs(tangent))  # no bias: the map is linear
    norm, shift = cpu_kernels.apply(nn.RMSNorm(128)), CPUTokenShift()
    torch.func.vmap(torch.func.grad(lambda xi: shift(norm(xi[None, None])).sum()))(x)  # no Function inside


@needs_onednn
def test_linear_frozen_weight_keeps_no_input_for_backward():
    layer = OneDNNLinear(128, 512).requires_grad_(False)
    x = torch.randn(256, 128, requires_grad=True)
    saved = [t for t in layer(x).grad_fn.saved_tensors if t is not None]
    assert [t.shape for t in saved] == [layer.weight.shape]  # as F.linear: no x when no dW


def test_linear_one_dimensional_input_and_scripting():
    layer = OneDNNLinear(4096, 1024)
    x = torch.randn(4096, requires_grad=True)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(nn.Sequential(OneDNNLinear(8, 4)))
    assert scripted(torch.randn(2, 8)).shape == (2, 4)


@needs_onednn
def test_linear_compiles_with_the_onednn_product():
    torch.manual_seed(0)
    ours, theirs = twin(128, 256, True)
    x = torch.randn(256, 128, requires_grad=True)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(ours, backend=recording_backend)
    compiled(x).square().sum().backward()
    subgraphs = [m for gm in graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    assert any("onednn_mm" in str(node.target) for m in subgraphs for node in m.graph.nodes)
    ours_grads = x.grad.clone(), ours.weight.grad
    x.grad = None
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours_grads[0], x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_grads[1], theirs.weight.grad, rtol=1e-4, atol=1e-4)


# --- GELU of small inputs -----------------------------------------------------------------------

def test_small_gelu_matches_exact_gelu_and_leaves_large_or_autograd_inputs_to_it():
    gelu = CPUGELU()
    x = torch.cat((torch.linspace(-12, 12, 2001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])))
    with torch.inference_mode():
        exact = F.gelu(x.double())  # float64: ATen's own kernel, exact erf
        torch.testing.assert_close(gelu(x).double(), exact, rtol=1e-5, atol=1e-6)  # as close as F.gelu's fp32
        torch.testing.assert_close(gelu(x), F.gelu(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gelu(x.double()), exact, rtol=1e-12, atol=1e-14)
        big = torch.randn(SMALL_GELU_MAX_NUMEL + 1)
        assert torch.equal(gelu(big), F.gelu(big))  # above the size: F.gelu itself
        tanh = CPUGELU(approximate="tanh")
        assert torch.equal(tanh(x), F.gelu(x, approximate="tanh"))
        onednn = torch.backends.mkldnn.enabled
        try:  # the kernel switches oneDNN off for its call only, whatever it was, from any number of threads
            for enabled in (False, True):
                torch.backends.mkldnn.enabled = enabled
                gelu(x)
                assert torch.backends.mkldnn.enabled == enabled

            def calls(_: int) -> None:
                with torch.inference_mode():  # grad mode is per thread
                    for _ in range(500):
                        gelu(x[:64])

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(calls, range(4)))
            assert torch.backends.mkldnn.enabled
        finally:
            torch.backends.mkldnn.enabled = onednn
    leaf = torch.randn(8, requires_grad=True)  # autograd recording: F.gelu, with its backward
    assert gelu(leaf).grad_fn.name() == "GeluBackward0"


def test_small_gelu_decoding_equals_plain_decoding():
    """A decoding step's GELUs (one position) take the kernel; logits stay equal within rounding
    and greedy generation is token for token the same."""
    plain = lm()
    fast = cpu_kernels.apply(copy.deepcopy(plain), kernels=["gelu"])
    assert {type(m).__name__ for m in fast.modules()} >= {"CPUGELU"}
    prompt = lm_batch()[:2, :12]
    with torch.inference_mode():
        plain_cache, fast_cache = plain.init_cache(), fast.init_cache()
        torch.testing.assert_close(fast.decode(prompt, fast_cache), plain.decode(prompt, plain_cache))
        for token in lm_batch()[:2, 12:30].unbind(1):
            torch.testing.assert_close(fast.decode(token[:, None], fast_cache),
                                       plain.decode(token[:, None], plain_cache), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.generate(prompt, 40, temperature=0), plain.generate(prompt, 40, temperature=0))
