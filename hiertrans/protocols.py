"""What a language-modelling task may ask of its network: the `CausalLM` protocol.

A causal LM maps integer token ids `(b, n)`, n <= `seq_len`, to logits `(b, n, num_tokens)`,
where the logits at position t depend on `ids[:, :t + 1]` only. `hiertrans.Transformer`,
`hiertrans.HierarchicalTransformer`, `hiertrans.HourglassTransformer` and any third-party model
with these attributes qualify.

Auxiliary losses (optional, `CausalLMWithAuxLosses`): a network that has them names them with
their weights in `aux_loss_weights` (`{}` or no attribute: none) and returns them, unweighted
scalars, from `net(ids, return_aux_losses=True) -> (logits, aux)`. The task owns the main loss:

    weights = getattr(net, "aux_loss_weights", {})
    logits, aux = net(ids, return_aux_losses=True) if weights else (net(ids), {})
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
    loss = ce + sum(w * aux[name] for name, w in weights.items())

`hiertrans.lm.sample(net, prompt, seq_len, temperature, filter_thres, top_p)` samples from any of
them; from an `IncrementalCausalLM` (all three of ours) one position per token, on its caches:

    cache = net.init_cache()              # empty; tensors are allocated at the first decode
    logits = net.decode(prompt, cache)    # (b, t, num_tokens): the prompt, t <= seq_len
    logits = net.decode(next_ids, cache)  # (b, 1, num_tokens): then one token per call
"""

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class CausalLM(Protocol):
    """`ids (b, n) -> logits (b, n, num_tokens)`, causal, for n <= `seq_len`."""

    num_tokens: int
    seq_len: int

    def __call__(self, ids: Tensor) -> Tensor: ...


@runtime_checkable
class CausalLMWithAuxLosses(CausalLM, Protocol):
    """A `CausalLM` with auxiliary losses: `aux_loss_weights` names them, `return_aux_losses=True`
    returns them unweighted with the logits."""

    @property
    def aux_loss_weights(self) -> dict[str, float]: ...

    def __call__(self, ids: Tensor, return_aux_losses: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]: ...


@runtime_checkable
class IncrementalCausalLM(CausalLM, Protocol):
    """A `CausalLM` that decodes incrementally: `decode(ids, cache)` continues the sequence `cache`
    holds (a prompt into an empty cache, then one token per call, `seq_len` positions at most) and
    returns the logits of those positions, equal to the full forward's there."""

    def init_cache(self) -> Any: ...

    def decode(self, ids: Tensor, cache: Any) -> Tensor: ...
