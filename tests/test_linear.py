"""The shared `Linear`: nn.Linear's values and gradients, on oneDNN where that path is taken."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hiertrans.layers import Linear, set_onednn_linear
from hiertrans.layers.linear import onednn_supported

needs_onednn = pytest.mark.skipif(not onednn_supported(), reason="oneDNN linears are used on x86-64 CPUs only")


@pytest.fixture
def onednn():
    previous = set_onednn_linear(True)
    yield
    set_onednn_linear(previous)


def twin(in_features: int, out_features: int, bias: bool) -> tuple[Linear, nn.Linear]:
    ours = Linear(in_features, out_features, bias=bias)
    theirs = nn.Linear(in_features, out_features, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@needs_onednn
@pytest.mark.parametrize("in_features, out_features", [(64, 256), (256, 64)])  # both dW layouts
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_nn_linear(onednn, in_features, out_features, bias):
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
def test_frozen_weight_and_input_without_grad(onednn):
    ours, theirs = twin(128, 512, True)
    ours.weight.requires_grad_(False)
    x = torch.randn(64, 128)
    ours(x).sum().backward()
    assert ours.weight.grad is None and ours.bias.grad is not None
    torch.testing.assert_close(ours.bias.grad, torch.full((512,), 64.0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_flop_counter_counts_onednn_products(onednn):
    layer, x = Linear(256, 1024, bias=False), torch.randn(4096, 256, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 4096 * 256 * 1024  # forward, dx, dW


@pytest.mark.parametrize("case", ["small", "float64", "autocast", "switched off", "mkldnn flag off"])
def test_other_cases_take_f_linear(onednn, case):
    layer = Linear(256, 1024)
    x = torch.randn(4096, 256)
    if case == "small":
        x = x[:4]
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "switched off":
        set_onednn_linear(False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"), \
            torch.backends.mkldnn.flags(enabled=case != "mkldnn flag off"):
        out = layer(x.requires_grad_())
        expected = F.linear(x, layer.weight, layer.bias)
    assert "OneDNN" not in type(out.grad_fn).__name__
    assert out.dtype == (torch.bfloat16 if case == "autocast" else x.dtype)
    torch.testing.assert_close(out, expected)


@needs_onednn
@pytest.mark.parametrize("outer", ["square", "sum"])  # with .sum() the incoming gradient is a constant
def test_second_derivatives_match_nn_linear(onednn, outer):
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
def test_torch_func_and_forward_ad_take_f_linear(onednn):
    ours, theirs = twin(128, 256, False)
    x, tangent = torch.randn(256, 128), torch.randn(256, 128)
    per_sample = torch.func.vmap(torch.func.grad(lambda xi: ours(xi[None]).square().sum()))(x)
    expected = torch.func.vmap(torch.func.grad(lambda xi: theirs(xi[None]).square().sum()))(x)
    torch.testing.assert_close(per_sample, expected)
    _, jvp = torch.func.jvp(ours, (x,), (tangent,))
    torch.testing.assert_close(jvp, theirs(tangent))  # no bias: the map is linear


@needs_onednn
def test_frozen_weight_keeps_no_input_for_backward(onednn):
    layer = Linear(128, 512).requires_grad_(False)
    x = torch.randn(256, 128, requires_grad=True)
    saved = [t for t in layer(x).grad_fn.saved_tensors if t is not None]
    assert [t.shape for t in saved] == [layer.weight.shape]  # as F.linear: no x when no dW


def test_one_dimensional_input_and_scripting(onednn):
    layer = Linear(4096, 1024)
    x = torch.randn(4096, requires_grad=True)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(nn.Sequential(Linear(8, 4)))
    assert scripted(torch.randn(2, 8)).shape == (2, 4)


@needs_onednn
def test_compiles_with_the_onednn_product(onednn):
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
