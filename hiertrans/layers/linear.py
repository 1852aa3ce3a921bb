"""`Linear`: `nn.Linear` whose fp32 CPU matmuls run on oneDNN, the fastest fp32 GEMM PyTorch ships.

PyTorch sends fp32 CPU matmuls to MKL, which takes its AVX-512 kernels on Intel CPUs only: on an
AMD EPYC (Zen 5, AVX-512) it ran at 200-210 GFLOP/s where oneDNN's brgemm, which dispatches on the
instruction set, ran the same products at 390-480 (`bench/lm_throughput.py --kernels` shows what
that is worth). Same products in the same fp32 precision, equal within rounding.

Taken only where it pays: fp32 tensors on an x86-64 CPU with oneDNN enabled
(`torch.backends.mkldnn.enabled`), a product of at least `ONEDNN_MIN_MACS` multiply-adds (below
that, oneDNN's per-call overhead loses), outside autocast (mixed precision keeps PyTorch's
bf16/fp16 path) and outside `torch.func` transforms and forward-mode AD. Everything else, every
other device included, takes `F.linear`. Gradients of gradients work (the backward switches to
differentiable ops under `create_graph=True`). Under `torch.compile` the product is an opaque op
(`hiertrans::onednn_mm`), so exported programs need `hiertrans` imported, and
`quantize_dynamic(model, {nn.Linear})`, which matches exact types, passes these layers by.
`HIERTRANS_ONEDNN=0` in the environment, or `set_onednn_linear(False)`, turns the path off.
"""

import math
import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.utils.flop_counter import register_flop_formula

ONEDNN_MIN_MACS = 1 << 22


def onednn_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


_enabled = False


def set_onednn_linear(enabled: bool) -> bool:
    """Route large fp32 CPU linears to oneDNN (where supported) or not; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled) and onednn_supported()
    return previous


set_onednn_linear(os.environ.get("HIERTRANS_ONEDNN", "1") != "0")


@torch.library.custom_op("hiertrans::onednn_mm", mutates_args=(), device_types="cpu")
def _onednn_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """`a @ b.T (+ bias)` on oneDNN; `a (..., k)`, `b (n, k)`, any strides. An opaque op, so that
    `torch.compile` keeps it (inductor lowers oneDNN's linear only for frozen, constant weights)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_onednn_mm.register_fake
def _(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return a.new_empty(*a.shape[:-1], b.shape[0])


@register_flop_formula(torch.ops.hiertrans.onednn_mm)
def _onednn_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """So that `FlopCounterMode` counts these products as it counts `aten.mm`."""
    return 2 * math.prod(a_shape) * b_shape[0]


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # what each gradient needs, as F.linear keeps it: x for dW only, the weight for dx only
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return _onednn_mm(_dense(x), _dense(weight), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        grad = _dense(grad)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        flat_x = _dense(x).reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops, for higher derivatives
            if ctx.needs_input_grad[0]:
                grad_x = grad @ weight
            if ctx.needs_input_grad[1]:
                grad_weight = flat_grad.mT @ flat_x
        else:
            if ctx.needs_input_grad[0]:
                grad_x = _onednn_mm(grad, weight.t())
            if ctx.needs_input_grad[1]:
                # dW = grad^T x, a reduction over the tokens; oneDNN runs it fastest with the wider
                # operand in the weight slot (390 vs 250 GFLOP/s for 256 -> 1024)
                if flat_grad.shape[1] >= flat_x.shape[1]:  # out_features >= in_features
                    grad_weight = _onednn_mm(flat_x.t(), flat_grad.t()).t()
                else:
                    grad_weight = _onednn_mm(flat_grad.t(), flat_x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _dense(t: Tensor) -> Tensor:
    # a no-op for the usual operands; on zero or gapped strides, such as the expanded gradient of
    # a .sum(), oneDNN falls back to a reference kernel ~1000x slower
    return t.contiguous()


def _takes_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (_enabled and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            # torch.func transforms and forward-mode AD need rules this Function does not define
            and not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, on oneDNN for large fp32 products on x86-64 CPUs (see the module docstring)."""
    if _takes_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state dict) computed by `linear`; `(..., in) -> (..., out)`."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, self.weight, self.bias)
        return self._linear(x)

    @torch.jit.unused
    def _linear(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
