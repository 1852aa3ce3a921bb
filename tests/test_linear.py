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


@pytest.mark.parametrize("case", ["small", "float64", "autocast", "switched off"])
def test_other_cases_take_f_linear(onednn, case):
    layer = Linear(256, 1024)
    x = torch.randn(4096, 256)
    if case == "small":
        x = x[:4]
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "switched off":
        set_onednn_linear(False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = layer(x.requires_grad_())
        expected = F.linear(x, layer.weight, layer.bias)
    assert "OneDNN" not in type(out.grad_fn).__name__
    assert out.dtype == (torch.bfloat16 if case == "autocast" else x.dtype)
    torch.testing.assert_close(out, expected)


@needs_onednn
def test_compiles_with_the_onednn_product(onednn):
    torch.manual_seed(0)
    ours, theirs = twin(128, 256, True)
    x = torch.randn(256, 128, requires_grad=True)
    compiled = torch.compile(ours)
    compiled(x).square().sum().backward()
    ours_grads = x.grad.clone(), ours.weight.grad
    x.grad = None
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours_grads[0], x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_grads[1], theirs.weight.grad, rtol=1e-4, atol=1e-4)
