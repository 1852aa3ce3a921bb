"""Optional CPU kernels: faster training steps on some CPUs, the same values within rounding.

    from hiertrans import cpu_kernels
    cpu_kernels.apply(model)            # any nn.Module: ours, timm's, a reference implementation
    cpu_kernels.apply(model, False)     # back to plain PyTorch (also: cpu_kernels.remove(model))
    HIERTRANS_CPU_KERNELS=1 python -m hiertrans fit ...   # the training tasks call `requested()`

`apply` swaps, by exact class and in place (`module.__class__`: same object, parameters, state
dict, hooks and optimizer references), each module for a subclass that only changes how forward
and backward are computed:

| `kernels=`      | swaps (exact class -> kernel subclass)        | what changes                               |
|-----------------|----------------------------------------------|--------------------------------------------|
| `linear`        | `nn.Linear` -> `OneDNNLinear`                | large fp32 CPU products on oneDNN, not MKL |
| `rms_norm`      | `hiertrans.RMSNorm` -> `CPURMSNorm`,         | a hand-written backward                    |
|                 | `nn.RMSNorm` -> `CPUTorchRMSNorm`            |                                            |
| `token_shift`   | `layers.TokenShift` -> `CPUTokenShift`       | one copy each way, not chunk + pad + cat   |
| `sliding_window`| `layers.Attention` -> `CPUAttention`         | one write each way for windowed keys/values|
| `gelu`          | `nn.GELU` -> `CPUGELU`                       | small inputs without autograd (a decoding  |
|                 |                                              | step's) on native kernels, not oneDNN's    |

Each kernel runs only on CPU tensors, outside `torch.func` transforms and forward-mode AD (the
RMSNorm one in fp32/fp64 with autograd recording; the oneDNN product in fp32 on x86-64, outside
autocast, for at least `ONEDNN_MIN_MACS` multiply-adds; the GELU one in fp32/fp64 without autograd,
for at most `SMALL_GELU_MAX_NUMEL` elements), and calls the plain op otherwise: outputs
stay equal within rounding with the kernels on or off, on every device. Second derivatives work
through all but the RMSNorm kernel, which refuses them (remove it for gradient penalties).

Where they pay, measured (`python bench/cpu_kernels.py`: configs/lm.yaml's training step, eager
fp32, with and without them, and each kernel's op alone at the step's shapes):

- AMD EPYC Zen 3 (family 25; AVX2, no AVX-512), 2 cores, torch 2.14.1 on MKL 2024.2 / oneDNN
  3.12, a VM shared with other jobs: they do not pay. MKL runs AVX2 kernels on this CPU as fast
  as oneDNN (two threads: 108 vs 96-116 GFLOP/s on the step's products and on 2048^2), and the
  `linear` op, forward + backward, ran at 0.94-1.04x. The RMSNorm, token-shift and window-layout
  kernels make their ops 1.55x, 1.0-1.17x and 1.21-1.24x faster, but those ops are a few percent
  of the step: the whole step with all kernels ran at 0.85-1.10x plain's speed (best and median
  steps, one and two threads), within this machine's noise.
- AMD EPYC Zen 5 (AVX-512), 2 cores (sessions 1-6): MKL takes its AVX-512 kernels on Intel CPUs
  only and ran fp32 products at 200-210 GFLOP/s, oneDNN at 390-480; with the oneDNN linears the LM
  step (dim 256, seq 1024, `bench/lm_throughput.py`) went from 1.49-1.60 to 1.06-1.09 s: 1.4-1.5x.
  The other three kernels were part of the 1.13-1.31x the plain implementation measured then.
- `gelu`, sampling (`python bench/lm_generate.py --new 256 --cpu-kernels gelu`, lm.yaml's model,
  batch 1, Intel Xeon family 6 model 167, AVX-512, 2 threads, session 14): 256 new bytes in
  0.44-0.45 instead of 0.48-0.50 s (6-11%; three runs of 7-9 alternating rounds), where each
  one-position GELU cost ~20 us on oneDNN inside the step and ~1.6 us on the native kernel.
  Training is untouched (its GELUs are large and record autograd).
- Not measured, expected not to pay: the training kernels on Intel CPUs (MKL takes its AVX-512
  kernels there itself); GPUs (every kernel falls back to the plain op: CUDA has a fused RMSNorm
  backward and cuBLAS; the swap is harmless); `torch.compile`, whose generated code fuses the
  norm, shift and layout anyway (the oneDNN product stays an opaque op, `hiertrans::onednn_mm`, in
  the graph).

This is the only module of hiertrans that uses private PyTorch APIs (`torch.ops.mkldnn` and
`torch._C`), each marked where it is used: the models' default paths are plain public PyTorch.
"""

import math
import platform
import threading
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula

from .layers import Attention, RMSNorm, TokenShift, token_shift, with_previous_block
from .layers.checks import env_flag

__all__ = ["KERNELS", "CPUAttention", "CPUGELU", "CPURMSNorm", "CPUTokenShift", "CPUTorchRMSNorm", "OneDNNLinear",
           "apply", "onednn_linear", "remove", "requested"]

ENV_VAR = "HIERTRANS_CPU_KERNELS"
ONEDNN_MIN_MACS = 1 << 22  # below this, oneDNN's per-call overhead loses to MKL


def requested() -> bool:
    """Whether `HIERTRANS_CPU_KERNELS=1` asks for the kernels (unset or 0: no; other values raise)."""
    return env_flag(ENV_VAR)


def _plain_autograd() -> bool:
    """No `torch.func` transform and no forward-mode AD active: the Functions here define neither
    vmap nor jvp rules, so they step aside for those. Private APIs, allowed in this module only."""
    return not torch._C._are_functorch_transforms_active() and forward_ad._current_level < 0


def _takes_kernel(x: Tensor) -> bool:
    return x.device.type == "cpu" and _plain_autograd()


# --- linear on oneDNN ---------------------------------------------------------------------------

def onednn_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@torch.library.custom_op("hiertrans::onednn_mm", mutates_args=(), device_types="cpu")
def _onednn_mm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """`a @ b.T (+ bias)` on oneDNN; `a (..., k)`, `b (n, k)`, any strides. An opaque op, so that
    `torch.compile` keeps it (inductor lowers oneDNN's linear only for frozen, constant weights).
    `torch.ops.mkldnn` is a private namespace: allowed in this opt-in module only."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_onednn_mm.register_fake
def _(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    return a.new_empty(*a.shape[:-1], b.shape[0])


@register_flop_formula(torch.ops.hiertrans.onednn_mm)
def _onednn_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """So that `FlopCounterMode` counts these products as it counts `aten.mm`."""
    return 2 * math.prod(a_shape) * b_shape[0]


def _dense(t: Tensor) -> Tensor:
    # a no-op for the usual operands; on zero or gapped strides, such as the expanded gradient of
    # a .sum(), oneDNN falls back to a reference kernel ~1000x slower
    return t.contiguous()


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
                # operand in the weight slot (390 vs 250 GFLOP/s for 256 -> 1024 on Zen 5)
                if flat_grad.shape[1] >= flat_x.shape[1]:  # out_features >= in_features
                    grad_weight = _onednn_mm(flat_x.t(), flat_grad.t()).t()
                else:
                    grad_weight = _onednn_mm(flat_grad.t(), flat_x.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _takes_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (onednn_supported() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu") and _plain_autograd())


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, on oneDNN for large fp32 products on x86-64 CPUs (see the module docstring)."""
    if _takes_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """`nn.Linear` (same parameters, init and state dict) computed by `onednn_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return F.linear(x, self.weight, self.bias)
        return self._linear(x)

    @torch.jit.unused
    def _linear(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)


# --- RMSNorm with a hand-written backward -------------------------------------------------------

class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last axis with a hand-written backward: the composite autograd of
    `F.rms_norm` (PyTorch fuses the backward on CUDA only) spends most of a CPU step's norm time
    in `pow` and its backward.

    With r = rsqrt(mean(x^2) + eps), x̂ = x r, gw = g w:
    dx = r (gw - x̂ mean(gw x̂)),  dw = sum over rows of g x̂.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)  # x_hat instead of x: same memory, one pass less later
        return x_hat * weight

    @staticmethod
    @once_differentiable  # rstd is saved as a constant: a second derivative would be wrong, so refuse it
    def backward(ctx, grad: Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        grad_w = grad * weight
        mean = (grad_w * x_hat).mean(-1, keepdim=True)
        grad_x = torch.addcmul(grad_w, x_hat, mean, value=-1.0).mul_(rstd)
        grad_weight = (grad * x_hat).reshape(-1, x_hat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def rms_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float | None) -> Tensor:
    """`F.rms_norm`, through `_RMSNormFunction` for a gain over the last axis of a CPU tensor."""
    # the kernel is a backward: without autograd recording, or in half precision, F.rms_norm it is
    if (torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64) and len(normalized_shape) == 1
            and weight is not None and weight.dtype == x.dtype and _takes_kernel(x)):
        return _RMSNormFunction.apply(x, weight, torch.finfo(x.dtype).eps if eps is None else eps)
    return F.rms_norm(x, normalized_shape, weight, eps)


class CPUTorchRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` with the hand-written CPU backward."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class CPURMSNorm(RMSNorm):
    """`hiertrans.layers.RMSNorm` with the hand-written CPU backward."""

    forward = CPUTorchRMSNorm.forward


# --- token shift and the sliding-window layout --------------------------------------------------

class _TokenShift(torch.autograd.Function):
    """`token_shift` in one copy each way, where chunk + pad + cat copy (and zero-fill) two to three times."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        split = (x.shape[-1] + 1) // 2  # as x.chunk(2, -1): the first half gets the odd feature
        ctx.split = split
        out = torch.empty_like(x)
        out[..., :split] = x[..., :split]
        out[..., 1:, split:] = x[..., :-1, split:]
        out[..., :1, split:] = 0
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        split = ctx.split
        grad_x = torch.empty_like(grad)
        grad_x[..., :split] = grad[..., :split]
        grad_x[..., :-1, split:] = grad[..., 1:, split:]
        grad_x[..., -1:, split:] = 0
        return grad_x


class CPUTokenShift(TokenShift):
    """`layers.TokenShift` in one copy each way."""

    def forward(self, x: Tensor) -> Tensor:
        return _TokenShift.apply(x) if _takes_kernel(x) else token_shift(x)


class _WithPreviousBlock(torch.autograd.Function):
    """`with_previous_block` in one write each way, where pad + cat copy twice and the backward
    zero-fills and scatters."""

    @staticmethod
    def forward(ctx, t: Tensor, block: int) -> Tensor:
        b, h, length, d = t.shape
        blocks = t.unflatten(2, (length // block, block))  # a view, whatever t's strides
        out = t.new_empty(b, h, length // block, 2 * block, d)
        out[..., block:, :] = blocks
        out[:, :, 1:, :block] = blocks[:, :, :-1]
        out[:, :, :1, :block] = 0
        ctx.block, ctx.heads = block, h
        return out.flatten(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        block = ctx.block
        grad = grad.unflatten(0, (-1, ctx.heads))
        grad_t = grad[..., block:, :].clone()
        grad_t[:, :, :-1] += grad[:, :, 1:, :block]
        return grad_t.flatten(2, 3), None


def with_previous_block_kernel(t: Tensor, block: int) -> Tensor:
    """`layers.with_previous_block`, through `_WithPreviousBlock` for CPU tensors."""
    return _WithPreviousBlock.apply(t, block) if _takes_kernel(t) else with_previous_block(t, block)


class CPUAttention(Attention):
    """`layers.Attention` whose sliding window lays out its keys and values in one write."""

    window_layout = staticmethod(with_previous_block_kernel)


# --- GELU of small inputs -----------------------------------------------------------------------

SMALL_GELU_MAX_NUMEL = 1 << 12  # about where oneDNN's per-call setup stops mattering


class CPUGELU(nn.GELU):
    """`nn.GELU` whose small fp32/fp64 CPU inputs outside autograd run on PyTorch's native kernel:
    `F.gelu` sends every fp32 CPU input to oneDNN's eltwise GELU, whose per-call setup (~8 us alone,
    ~20 us inside a decoding step) is most of the cost of a one-position GELU (decoding a token runs
    one per block); the native kernel takes ~1.6 us. Both `approximate` modes take this path (the
    tanh one never used oneDNN: no change there).

    oneDNN is switched off (`torch.backends.mkldnn.enabled`, a process-wide flag) for the one call and
    restored after it, under a lock so that concurrent calls cannot leave it off; other threads' ops
    in that window also take PyTorch's native kernels (the same values within rounding)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and x.numel() <= SMALL_GELU_MAX_NUMEL
                and not (torch.is_grad_enabled() or torch.compiler.is_compiling())):
            with _ONEDNN_SWITCH:
                onednn = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
                try:
                    return super().forward(x)
                finally:
                    torch.backends.mkldnn.enabled = onednn
        return super().forward(x)


_ONEDNN_SWITCH = threading.Lock()


# --- the switch ---------------------------------------------------------------------------------

KERNELS: dict[str, dict[type[nn.Module], type[nn.Module]]] = {
    "linear": {nn.Linear: OneDNNLinear},
    "rms_norm": {RMSNorm: CPURMSNorm, nn.RMSNorm: CPUTorchRMSNorm},
    "token_shift": {TokenShift: CPUTokenShift},
    "sliding_window": {Attention: CPUAttention},
    "gelu": {nn.GELU: CPUGELU},
}


def apply(model: nn.Module, enabled: bool = True, kernels: Iterable[str] = tuple(KERNELS)) -> nn.Module:
    """Switch the CPU kernels on (or off, `enabled=False`) in every submodule of `model`, in place;
    returns `model`. Only modules of exactly the classes in `KERNELS` change: subclasses of
    `nn.Linear` with their own forward (quantized, LoRA, ...) keep it. `kernels` picks a subset.
    """
    swaps: dict[type[nn.Module], type[nn.Module]] = {}
    for name in kernels:
        if name not in KERNELS:
            raise ValueError(f"unknown CPU kernel {name!r}; expected some of {', '.join(KERNELS)}")
        swaps.update(KERNELS[name])
    if not enabled:
        swaps = {kernel: plain for plain, kernel in swaps.items()}
    for module in model.modules():
        kernel_class = swaps.get(type(module))
        if kernel_class is not None:
            # same instance, new class: parameters, buffers, hooks and any references held elsewhere
            # (optimizers, tied weights, shared modules) stay as they are
            module.__class__ = kernel_class
    return model


def remove(model: nn.Module, kernels: Iterable[str] = tuple(KERNELS)) -> nn.Module:
    """Back to plain PyTorch: `apply(model, False, kernels)`."""
    return apply(model, False, kernels)
