"""`set_grad_checkpointing`: the blocks run again in the backward, and nothing else changes."""

import pytest
import torch

from hiertrans import HierarchicalTransformer, HourglassTransformer, Transformer
from lit_modules import LanguageModel

SHARED = dict(num_tokens=64, seq_len=32, heads=2, dim_head=8)
NETS = {
    "hierarchical": lambda: HierarchicalTransformer(**SHARED, dim=16, depth=2, hierarchies=(1, 2),
                                                    window_sizes=(4, None), ignore_index=-1),
    "flat": lambda: Transformer(**SHARED, dim=16, depth=2, window_size=8),
    "hourglass": lambda: HourglassTransformer(**SHARED, dim=16, depths=(1, 1, 1), shorten_factors=(2,)),
}


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, **compile_options):
    forward = torch.compile(model, fullgraph=True, **compile_options) if compile_options else model
    out = forward(ids, return_loss=True)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("name", NETS)
def test_recomputed_blocks_give_the_same_loss_and_gradients(name):
    torch.manual_seed(0)
    model, ids = NETS[name]().train(), torch.randint(0, 64, (2, 33))
    loss, grads = loss_and_grads(model, ids)
    model.set_grad_checkpointing()
    blocks = [m for m in model.modules() if getattr(m, "grad_checkpointing", False)]
    assert blocks, "no block was switched to recomputation"
    runs = []
    hook = blocks[0].ff.register_forward_pre_hook(lambda *_: runs.append(torch.is_grad_enabled()))
    checkpointed_loss, checkpointed_grads = loss_and_grads(model, ids)
    hook.remove()
    assert runs == [True, True]  # the forward, and again in the backward
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(checkpointed_grads[key], grads[key], rtol=1e-6, atol=1e-7, msg=key)
    with torch.no_grad():  # inference keeps nothing for a backward: no checkpoint to take
        model(ids[:, :-1])
    compiled_loss, compiled_grads = loss_and_grads(model, ids, backend="aot_eager")  # one graph, no breaks
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing(False)
    assert not any(m.grad_checkpointing for m in blocks)


def test_the_task_switches_it_on_and_names_a_net_without_it():
    net = NETS["flat"]()
    LanguageModel(net, grad_checkpointing=True)
    assert all(block.grad_checkpointing for block in net.blocks)

    class Bare(torch.nn.Module):
        seq_len, num_tokens = 8, 4

    with pytest.raises(TypeError, match="Bare has none"):
        LanguageModel(Bare(), grad_checkpointing=True)
