"""Helpers shared by the test files (`from helpers import ...`: pytest puts tests/ on sys.path)."""

import re
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

BACKWARD_NODE = "autograd::engine::evaluate_function: "
# autograd's own nodes: generated ones are numbered (AddmmBackward0, SumBackward1, ...), the engine's
# live in torch::autograd (AccumulateGrad, CopySlices, GraphRoot). A Python autograd.Function's node
# is named after its class plus "Backward", with no number: `_TokenShift` -> `_TokenShiftBackward`.
PYTORCH_NODE = re.compile(r"Backward\d+$|^torch::autograd::")
# op events are "namespace::name"; PyTorch's public operators are ATen's. Engine events use the
# `autograd::` and `torch::autograd::` prefixes; custom ops (`hiertrans::onednn_mm`) and private
# namespaces (`mkldnn::_linear_pointwise`) are the rest.
ENGINE_EVENT = re.compile(r"^(aten|autograd|torch::autograd)::")
OP_EVENT = re.compile(r"^\w+::")


def plain_pytorch_violations(fn: Callable[[], object]) -> list[str]:
    """Run `fn` under `torch.profiler`; the events that are not PyTorch's own: ops outside ATen, and
    backward nodes of Python autograd Functions."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = set()
    for name in {event.name for event in prof.events()}:
        if name.startswith(BACKWARD_NODE):
            if not PYTORCH_NODE.search(name.removeprefix(BACKWARD_NODE)):
                found.add(name)
        elif OP_EVENT.match(name) and not ENGINE_EVENT.match(name):
            found.add(name)
    return sorted(found)


def assert_plain_pytorch(fn: Callable[[], object]) -> None:
    """Assert that `fn` (an eager forward and backward) runs only PyTorch's own code: every op an
    ATen op (no custom op, no private `torch.ops` namespace) and every backward node one of
    autograd's (no hand-written `torch.autograd.Function`, whose node names end in `Backward`
    without a number). A backward must run inside `fn`, or Functions go unseen. Eager only:
    `torch.compile` runs its graphs through a Function of its own (`CompiledFunction`)."""
    violations = plain_pytorch_violations(fn)
    assert not violations, f"not plain PyTorch: {violations}"


# lm.yaml's network shrunk for tests: the CLI flags that give a 32-wide, one-layer, 32-byte-context model
TINY_LM_ARGS = [*(f"--model.init_args.net.init_args.{k}" for k in ("dim=32", "depth=1", "heads=2", "dim_head=16",
                                                                   "seq_len=32")),
                "--data.init_args.seq_len=32", "--model.init_args.scheduler.init_args.warmup_steps=2"]


def assert_compiled_training_matches_eager(model, ids) -> None:
    """`torch.compile(model, fullgraph=True)` takes the training step (no graph breaks, no host syncs) and
    its loss and gradients equal eager's within rounding. `model(ids, return_loss=True) -> (loss, ...)`."""
    import torch

    torch._dynamo.reset()
    loss, _ = torch.compile(model, fullgraph=True)(ids, return_loss=True)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected, _ = model(ids, return_loss=True)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for got, param in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-5)


def assert_strictly_causal(model, n: int, vocab: int) -> None:
    """The perturbation sweep: `model(ids) -> (2, n, vocab)` logits at t never change when any token after
    t changes (every t, random replacements, eval mode, no gradients)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, n), generator=gen)
    with torch.no_grad():
        base = model(ids)
        assert base.shape == (2, n, vocab)
        for t in range(n - 1):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, vocab, (2, n - t - 1), generator=gen)
            torch.testing.assert_close(model(changed)[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)


def cli_in_process(cwd, *args: str) -> int:
    """`python -m hiertrans <args>` run in this process from `cwd` (no import cost), with one intra-op thread
    like the subprocesses (another thread count may change float summation order); returns the exit code."""
    import os
    from pathlib import Path

    import torch

    from hiertrans.cli import main

    threads, here = torch.get_num_threads(), Path.cwd()
    torch.set_num_threads(1)
    os.chdir(cwd)
    try:
        main(list(args))
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
