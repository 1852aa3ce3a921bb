"""Token-level hierarchical transformer language model.

The design of simple-hierarchical-transformer (lucidrains): the token embeddings are compressed
causally into several hierarchies (compression factors 1, 2, 4, ...), each hierarchy runs its own
transformer blocks, and after every layer all hierarchies are merged into the one that predicts
the next token. Strict causality holds throughout: logits at position t depend only on tokens
0..t.

einops notation: b batch, n tokens, a axial factor (compression / stride), d feature dim.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .hub import HubMixin
from .layers import BlockCache, CausalBlock, GradCheckpointing, RMSNorm, check_token_ids

IntOrTuple = int | Sequence[int]


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def per_hierarchy(value, count: int, name: str) -> tuple:
    """Broadcast a hyperparameter to one value per hierarchy, or check the tuple given has one."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries but there are {count} hierarchies; "
                             f"give one value or a tuple of {count}")
        return tuple(value)
    return (value,) * count


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad the token axis (-2) at the end up to a multiple; causality keeps the tail invisible."""
    pad = -x.shape[-2] % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def expand_to_tokens(x: Tensor, stride: int, length: int) -> Tensor:
    """Place a stride-s hierarchy on the token axis: token t reads compressed token t // s.

    Compressed token j covers tokens up to j * s <= t, so this never looks ahead.
    """
    if stride > 1:
        x = x.repeat_interleave(stride, dim=-2)
    return x[..., :length, :]


def hierarchical_cat(tokens: Sequence[Tensor], strides: Sequence[int], length: int) -> Tensor:
    """Concatenate all hierarchies' features per token position: `-> (b, length, sum(dims))`."""
    return torch.cat([expand_to_tokens(t, s, length) for t, s in zip(tokens, strides)], dim=-1)


def expand_new_tokens(latest: Tensor | None, new: Tensor, stride: int, start: int, length: int) -> Tensor:
    """`expand_to_tokens` while decoding: token positions `start .. start + length - 1` of a stride-s
    hierarchy whose new compressed tokens `new (b, m, d)` are those at `j * s >= start`, and whose
    `latest (b, 1, d)` is the one before them (None at the start: then it is never read)."""
    if new.shape[1] == length:  # every position reads a new token of its own (stride 1, say)
        return new
    if length == 1:  # one position: its token is the new one if it completed one, else the latest
        return newest(latest, new)
    latest = new.new_zeros(new.shape[0], 1, new.shape[-1]) if latest is None else latest
    first = -(-start // stride) - 1  # compressed index of `latest`
    offset = start - first * stride
    return torch.cat((latest, new), dim=1).repeat_interleave(stride, dim=1)[:, offset : offset + length]


def causal_windows(x: Tensor, size: int, step: int, history: Tensor | None = None,
                   start: int = 0) -> tuple[Tensor, Tensor]:
    """The windows of `size` consecutive inputs that end at positions `j * step` (zeros before the
    sequence), for the inputs `x (b, n, d)` at positions `start .. start + n - 1`, preceded by
    `history (b, size - 1, d)` (None: zeros, `start` 0) -> `(windows (b, m, d, size), history)`:
    window j covers positions `j * step - size + 1 .. j * step`, one for each j with `start <=
    j * step < start + n`; the returned history is the last `size - 1` inputs, for the next call."""
    past = x.new_zeros(x.shape[0], size - 1, x.shape[-1]) if history is None else history
    inputs = torch.cat((past, x), dim=1)  # positions start - size + 1 .. start + n - 1
    ending_here = inputs[:, -start % step :]  # from the first window that ends at one of x's positions
    if ending_here.shape[1] < size:  # none does
        windows = inputs.new_zeros(x.shape[0], 0, x.shape[-1], size)
    else:
        windows = ending_here.unfold(1, size, step)
    return windows, inputs[:, inputs.shape[1] - (size - 1) :]


def newest(latest: Tensor | None, new: Tensor) -> Tensor | None:
    """The newest compressed token: the last of `new (b, m, d)`, or `latest` when m = 0."""
    if not new.shape[1]:
        return latest
    if new.shape[1] == 1 and not torch.compiler.is_compiling():
        return new
    # compiled decoding: a copy, not a view whose offset into `new` torch.compile would guard on
    return new[:, -1:].clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else new[:, -1:]


def check_continuation(ids: Tensor, length: int, num_tokens: int, seq_len: int) -> None:
    """What `decode(ids, cache)` accepts: a whole prompt into an empty cache (`length` 0), then one
    token per call, never more than `seq_len` positions in all."""
    check_token_ids(ids, num_tokens, seq_len)
    n = ids.shape[1]
    if length and n != 1:
        raise ValueError(f"decode takes a prompt into an empty cache, then one token per call; got {n} tokens "
                         f"after {length}")
    if length + n > seq_len:
        raise ValueError(f"the cache holds {length} positions and {n} more exceed seq_len={seq_len}; start a new "
                         f"cache (hiertrans.lm.sample slides the context so)")


class Compress(nn.Module):
    """Causal compression of token embeddings into one hierarchy.

    `(b, n, dim_in) -> (b, ceil(n / stride), dim_out)`: output j summarises input tokens
    `j*stride - c + 1 .. j*stride` (a causal convolution of width c written as a linear map over
    each window), with an optional head that reconstructs those c tokens.
    """

    def __init__(self, dim_in: int, dim_out: int, compress_factor: int, stride: int = 1,
                 num_tokens: int | None = None, reconstruct: bool = False, expansion: int = 4):
        super().__init__()
        self.compress_factor, self.stride = compress_factor, stride
        if compress_factor == 1:
            self.net = nn.Linear(dim_in, dim_out, bias=False) if dim_in != dim_out else nn.Identity()
        else:
            self.net = nn.Sequential(
                nn.Linear(compress_factor * dim_in, dim_in * expansion),
                nn.SiLU(),
                nn.Linear(dim_in * expansion, dim_out),
            )
        reconstruct = reconstruct and compress_factor > 1
        self.to_recon = nn.Linear(dim_out, compress_factor * num_tokens, bias=False) if reconstruct else None

    def windows(self, x: Tensor, pad_value: float | int = 0) -> Tensor:
        """`(b, n, ...) -> (b, ceil(n/stride), ..., c)`: the c inputs that each output covers."""
        c = self.compress_factor
        pad = [0, 0] * (x.ndim - 2) + [c - 1, 0]
        return F.pad(x, pad, value=pad_value).unfold(1, c, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.compress_factor == 1:
            return self.net(x)
        return self.net(rearrange(self.windows(x), "b n d c -> b n (c d)"))

    def extend(self, x: Tensor, history: Tensor | None, start: int) -> tuple[Tensor, Tensor | None]:
        """Decoding: the compressed tokens that inputs `x (b, n, dim_in)` at positions `start ..`
        complete (those j with `start <= j * stride < start + n`), and the new `history`, the last
        c - 1 inputs (None before the first call: zeros, as `windows` pads)."""
        if self.compress_factor == 1:
            return self.net(x), None
        windows, history = causal_windows(x, self.compress_factor, self.stride, history, start)
        return self.net(rearrange(windows, "b n d c -> b n (c d)")), history

    def recon_loss(self, h: Tensor, ids: Tensor, ignore_index: int) -> Tensor:
        """Cross-entropy of reconstructing, from each compressed token, the tokens it covers."""
        if self.to_recon is None:
            return h.new_zeros(())
        logits = rearrange(self.to_recon(h), "b n (c v) -> (b n c) v", c=self.compress_factor)
        targets = self.windows(ids, pad_value=ignore_index)  # positions before 0 are ignored
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)


class HierarchicalBlock(CausalBlock):
    """One transformer block of a hierarchy, `(b, n, dim) -> (b, n, dim)`.

    The sequence of a hierarchy with compression c and stride s is split into a = c / s
    interleaved sub-sequences (positions i, i + a, i + 2a, ...), whose consecutive compressed
    tokens tile the input without overlap; each runs causal attention (full, or local over the
    last `window_size` positions; `window_size=0` leaves attention out) and a feed-forward, both
    after a token shift and pre-norm (`layers.CausalBlock`).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, window_size: int | None = None,
                 compress_factor: int = 1, stride: int = 1, ff_mult: int = 4):
        if not is_power_of_two(compress_factor):
            raise ValueError(f"compress_factor must be a power of two (1, 2, 4, ...), got {compress_factor}")
        if not is_power_of_two(stride) or stride > compress_factor:
            raise ValueError(f"stride must be a power of two no larger than compress_factor={compress_factor}, "
                             f"got {stride}")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 0):
            raise ValueError(f"window_size must be None (full attention), 0 (no attention) or a positive "
                             f"int, got {window_size!r}")
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        super().__init__(dim, heads, dim_head, ff_mult, window_size, token_shift=True)
        self.axial = compress_factor // stride

    def forward(self, x: Tensor, cache: "SubsequenceCache | None" = None) -> Tensor:
        n, a = x.shape[-2], self.axial
        if cache is not None:
            return self.decode_subsequences(x, cache)
        if a == 1:
            return super().forward(x)
        x = rearrange(pad_to_multiple(x, a), "b (n a) d -> (b a) n d", a=a)
        x = super().forward(x)
        return rearrange(x, "(b a) n d -> b (n a) d", a=a)[:, :n]

    def init_cache(self, capacity: int) -> "SubsequenceCache":
        """Decoding state for up to `capacity` compressed tokens: one block cache per sub-sequence."""
        per_subsequence = -(-capacity // self.axial)
        return SubsequenceCache([CausalBlock.init_cache(self, per_subsequence) for _ in range(self.axial)])

    def decode_subsequences(self, x: Tensor, cache: "SubsequenceCache") -> Tensor:
        """`forward` for `x (b, m, dim)`, the compressed tokens after those `cache` has seen: each goes
        through the block with the cache of its sub-sequence (position p: sub-sequence p mod a)."""
        n, a = x.shape[-2], self.axial
        if n == 1 or (a == 1 and n):  # all of x goes to one sub-sequence
            out = super().forward(x, cache.subsequences[cache.length % a])
            cache.length += n
            return out
        out = torch.empty_like(x)
        for r, sub in enumerate(cache.subsequences):
            first = (r - cache.length) % a  # x's first position in sub-sequence r
            if first < n:
                out[:, first::a] = super().forward(x[:, first::a], sub)
        cache.length += n
        return out


@dataclass
class SubsequenceCache:
    """`HierarchicalBlock`'s decoding state: a `BlockCache` per interleaved sub-sequence, and the
    number of compressed tokens seen."""

    subsequences: list[BlockCache]
    length: int = 0


@dataclass
class HierarchicalCache:
    """`HierarchicalTransformer`'s decoding state. Per layer and hierarchy: the block's cache and
    the newest compressed token after the block (what the merges read until the next one completes);
    per hierarchy: the compressor's last inputs and the newest final embedding."""

    blocks: list[list[SubsequenceCache]]
    latest: list[list[Tensor | None]]
    history: list[Tensor | None]
    latest_embeds: list[Tensor | None]
    length: int = 0


class HierarchicalMerge(nn.Module):
    """Merge all hierarchies per token position: `[(b, n_i, d_i)] -> (b, n, dim_out)`."""

    def __init__(self, dims: Sequence[int], dim_out: int, strides: Sequence[int]):
        super().__init__()
        self.strides = tuple(strides)
        self.net = nn.Sequential(
            RMSNorm(sum(dims)),
            nn.Linear(sum(dims), dim_out * 2),
            nn.SiLU(),
            nn.Linear(dim_out * 2, dim_out),
        )

    def forward(self, tokens: Sequence[Tensor], length: int) -> Tensor:
        return self.net(hierarchical_cat(tokens, self.strides, length))


def top_k(logits: Tensor, thres: float = 0.9, k: int | None = None) -> Tensor:
    """Keep the `k` largest logits (default: the top (1 - thres) fraction, at least one), the rest -inf."""
    k = max(1, int((1 - thres) * logits.shape[-1])) if k is None else min(k, logits.shape[-1])
    val, ind = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ind, val)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the most probable logits until their probabilities reach `p` (at least
    one), the rest -inf."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= p  # the mass before this one already reaches p
    return logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))


def gumbel_sample(logits: Tensor, temperature: float = 1.0) -> Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand_like(logits).clamp(1e-20, 1.0)
    noise = -torch.log((-torch.log(uniform)).clamp(min=1e-20))
    return ((logits if temperature == 1 else logits / temperature) + noise).argmax(dim=-1)


def next_token_targets(ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Inputs and targets of the next-token loss: `ids (b, n + 1)` -> `ids[:, :-1]`, `ids[:, 1:]`, or
    `ids (b, n)` and the `labels (b, n)` given."""
    if labels is None:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError("return_loss needs ids of shape (batch, length + 1) with length >= 1")
        return ids[:, :-1], ids[:, 1:]
    if not isinstance(labels, Tensor) or not isinstance(ids, Tensor) or labels.shape != ids.shape:
        raise ValueError(f"labels of shape {tuple(getattr(labels, 'shape', ()))} must match ids "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    return ids, labels


def next_token(logits: Tensor, temperature: float, k: int, p: float | None) -> Tensor:
    """`logits (b, vocab) -> (b,)`: the argmax at temperature 0, else a sample of softmax(logits / T)
    restricted to the top `k` and then to the nucleus `p`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1:  # before top-p: the nucleus is that of the distribution sampled
        logits = logits / temperature
    if k < logits.shape[-1]:
        logits = top_k(logits, k=k)
    if p is not None and p < 1:
        logits = top_p(logits, p)
    return gumbel_sample(logits)


def sample(model: nn.Module, prompt: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9,
           top_p: float | None = None, *, top_k: int | None = None, use_cache: bool | None = None,
           slide: int | None = None, compile: bool | dict = False) -> Tensor:
    """Sample `seq_len` tokens after `prompt` (`(b, t)` or `(t,)`, t <= `model.seq_len`) from any
    causal LM `ids (b, n) -> logits (b, n, num_tokens)` with `num_tokens` and `seq_len` attributes
    (`hiertrans.protocols.CausalLM`). Returns the new tokens only: `(b, seq_len)` or `(seq_len,)`.

    Each token: the argmax at `temperature=0` (greedy), else a sample of softmax(logits /
    temperature) among the `top_k` most likely tokens (default: the top `1 - filter_thres`
    fraction; `filter_thres=0` keeps all), then within the nucleus of probability `top_p`.

    `use_cache` (default: when the model has `init_cache` and `decode`,
    `hiertrans.protocols.IncrementalCausalLM`) runs the prompt once and then one position per
    token against per-layer key/value caches, instead of the whole context per token. The context
    is at most `model.seq_len` tokens: without the cache, every token sees the last `seq_len`;
    with it, once the context is full, the oldest `slide` tokens (default `seq_len // 4`) are
    dropped and the cache is rebuilt from the rest, so each token sees between `seq_len - slide`
    and `seq_len` (`slide=1`: the uncached loop exactly, at its cost). Runs in eval mode and
    restores the training flag afterwards.

    `compile` (with the cache): the one-token decode step runs through `torch.compile` (True, or a
    dict of its options such as `{"mode": "max-autotune"}`); prompts stay eager. The caches keep
    their shapes from step to step under compilation, so it compiles a few graphs once per model
    (one per phase of the hierarchies' strides and sub-sequences) and reuses them in later calls.
    """
    context = model.seq_len
    if not 0.0 <= filter_thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0 (the number of tokens to sample), got {seq_len!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    slide = max(1, context // 4) if slide is None else slide
    if not isinstance(slide, int) or not 1 <= slide <= context:
        raise ValueError(f"slide must be an int in [1, seq_len={context}], got {slide!r}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
    incremental = hasattr(model, "init_cache") and hasattr(model, "decode")
    if use_cache and not incremental:
        raise TypeError(f"use_cache=True needs a model with init_cache() and decode(ids, cache); "
                        f"{type(model).__name__} has none (use_cache=False runs the whole context per token)")
    use_cache = incremental if use_cache is None else use_cache
    if compile is not False and not use_cache:
        raise ValueError("compile compiles the cached decode step; it needs use_cache (and a model with decode)")
    squeeze = prompt.ndim == 1
    out = prompt[None] if squeeze else prompt
    check_token_ids(out, model.num_tokens, context, values=True)  # eager: one sync per call is nothing
    k = max(1, int((1 - filter_thres) * model.num_tokens)) if top_k is None else top_k
    was_training = model.training
    model.eval()
    try:  # inference mode: no autograd or version-counter bookkeeping on the ~1,000 small ops of a token
        with torch.inference_mode():
            step = None
            if compile is not False:  # dynamic: the batch size and the positions are symbolic from the start
                step = torch.compile(model.decode, **{"dynamic": True, **({} if compile is True else compile)})
            new = _sampling_loop(model, out, seq_len, temperature, k, top_p, use_cache, slide, step)
    finally:
        model.train(was_training)
    new = new.clone()  # a normal tensor for the caller (an inference tensor refuses in-place writes outside)
    return new[0] if squeeze else new


def _sampling_loop(model: nn.Module, out: Tensor, seq_len: int, temperature: float, k: int, top_p: float | None,
                   use_cache: bool, slide: int, step: Callable | None = None) -> Tensor:
    """`sample`'s loop: `out (b, t)` -> the `seq_len` tokens sampled after it; `step`: what decodes
    one token (default `model.decode`)."""
    step = step or getattr(model, "decode", None)
    context, start, cache = model.seq_len, out.shape[1], None
    for _ in range(seq_len):
        if not use_cache:
            logits = model(out[:, -context:])[:, -1]
        elif cache is None or cache.length == context:  # the prompt, or a full context: (re)build
            window = out if cache is None else out[:, -(context - slide + 1) :]
            cache = model.init_cache()
            logits = model.decode(window, cache)[:, -1]
        else:
            logits = step(out[:, -1:].clone(), cache)[:, -1]  # a fresh (b, 1): the same strides every step
        out = torch.cat((out, next_token(logits, temperature, k, top_p)[:, None].to(out.dtype)), dim=-1)
    return out[:, start:]


def cosine_sim_loss(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()


class Generates:
    """`generate` for any `IncrementalCausalLM` (HierarchicalTransformer, Transformer, HourglassTransformer):
    one sampling loop, `sample`, for every model family."""

    def generate(self, prompt: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9,
                 top_p: float | None = None, *, top_k: int | None = None, use_cache: bool | None = None,
                 slide: int | None = None, compile: bool | dict = False) -> Tensor:
        """Sample `seq_len` tokens after `prompt` (`(b, t)` or `(t,)`): greedy at `temperature=0`,
        else top-k (`filter_thres`, or `top_k` tokens) and top-p sampling, on the key/value caches
        of `decode` (`use_cache=False`: the whole context per token; `slide`: how the context moves
        past `seq_len`; `compile`: the decode step through `torch.compile`). `hiertrans.lm.sample`
        describes each option. Runs in eval mode and restores the training flag afterwards. Returns
        the new tokens only."""
        return sample(self, prompt, seq_len, temperature, filter_thres, top_p, top_k=top_k, use_cache=use_cache,
                      slide=slide, compile=compile)


class HierarchicalTransformer(nn.Module, HubMixin, Generates, GradCheckpointing):
    """Hierarchical transformer language model: `ids (b, n) -> logits (b, n, num_tokens)`.

    Args mirror simple-hierarchical-transformer. `dim`, `dim_head`, `heads`, `ff_mult`,
    `window_sizes` and `hierarchical_stride` take one value or a tuple with one per hierarchy.
    `hierarchies` are the compression factors (unique powers of two); `predict_hierarchy`
    (default: the smallest) is the hierarchy the others merge into after every layer and whose
    embeddings predict the next token (all hierarchies with `predict_use_all_hierarchy`);
    `hierarchy_merge_all` merges back into every hierarchy instead. Losses: next-token
    cross-entropy, `recon_loss_weight` x reconstruction of the tokens each compressed token covers,
    `hierarchical_ar_loss_weight` x cosine loss of predicting each compressed hierarchy's next
    chunk embedding. Attention always runs on `F.scaled_dot_product_attention`; `use_flash_attn` is
    accepted for compatibility and changes nothing.

    For training tasks (`hiertrans.protocols.CausalLM`): `model(ids, return_aux_losses=True)`
    returns `(logits, aux)`, `aux` the unweighted scalar auxiliary losses named in
    `aux_loss_weights` (`recon`, `hier_ar`: those with a weight > 0 that a compressed hierarchy
    produces); the task computes the cross-entropy itself and adds `sum(weight * aux[name])`.
    `return_loss=True` computes that same total here, the cross-entropy skipping `ignore_index`.

    The forward has no host syncs and compiles with `torch.compile(fullgraph=True)`: token-id
    values are checked only in debug mode (`hiertrans.set_debug`), and always in `generate`.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: IntOrTuple,
        depth: int,
        seq_len: int = 2048,
        dim_head: IntOrTuple = 64,
        heads: IntOrTuple = 8,
        ff_mult: IntOrTuple = 4,
        hierarchies: IntOrTuple = 1,
        window_sizes: int | None | Sequence[int | None] = None,
        hierarchical_stride: IntOrTuple = 1,
        hierarchy_merge_all: bool = False,
        predict_hierarchy: int | None = None,
        predict_use_all_hierarchy: bool = False,
        recon_loss_weight: float = 0.1,
        hierarchical_ar_loss_weight: float = 0.25,
        ignore_index: int = 0,
        use_flash_attn: bool = False,
    ):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("depth", depth), ("seq_len", seq_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        hierarchies = tuple(hierarchies) if isinstance(hierarchies, (list, tuple)) else (hierarchies,)
        if not hierarchies or not all(map(is_power_of_two, hierarchies)) or len(set(hierarchies)) != len(hierarchies):
            raise ValueError(f"hierarchies must be unique powers of two such as (1, 2, 4), got {hierarchies}")
        count = len(hierarchies)
        dims = per_hierarchy(dim, count, "dim")
        heads = per_hierarchy(heads, count, "heads")
        dim_heads = per_hierarchy(dim_head, count, "dim_head")
        ff_mults = per_hierarchy(ff_mult, count, "ff_mult")
        window_sizes = per_hierarchy(window_sizes, count, "window_sizes")
        strides = per_hierarchy(hierarchical_stride, count, "hierarchical_stride")
        for h, d, nh, s in zip(hierarchies, dims, heads, strides):
            if not isinstance(d, int) or not isinstance(nh, int) or d < 1 or nh < 1 or d % nh:
                raise ValueError(f"dim={d} of hierarchy {h} must be a positive multiple of heads={nh}")
            if not is_power_of_two(s) or s > h:
                raise ValueError(f"hierarchical_stride {s} of hierarchy {h} must be a power of two no larger "
                                 f"than the hierarchy's compression factor {h}")
        predict_hierarchy = min(hierarchies) if predict_hierarchy is None else predict_hierarchy
        if predict_hierarchy not in hierarchies:
            raise ValueError(f"predict_hierarchy must be one of hierarchies {hierarchies}, got {predict_hierarchy}")
        self.predict_index = hierarchies.index(predict_hierarchy)
        if strides[self.predict_index] != 1 and not hierarchy_merge_all:
            raise ValueError(f"the predicting hierarchy {predict_hierarchy} has hierarchical_stride "
                             f"{strides[self.predict_index]}; it must be 1 unless hierarchy_merge_all=True")
        for name, w in (("recon_loss_weight", recon_loss_weight),
                        ("hierarchical_ar_loss_weight", hierarchical_ar_loss_weight)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")

        self.num_tokens, self.seq_len, self.ignore_index = num_tokens, seq_len, ignore_index
        self.hierarchies, self.dims, self.strides = hierarchies, dims, strides
        self.hierarchy_merge_all = hierarchy_merge_all
        self.predict_use_all_hierarchy = predict_use_all_hierarchy
        self.recon_loss_weight = recon_loss_weight
        self.hierarchical_ar_loss_weight = hierarchical_ar_loss_weight

        dim_emb = max(dims)
        self.token_emb = nn.Embedding(num_tokens, dim_emb)
        self.compressors = nn.ModuleList([
            Compress(dim_emb, d, h, s, num_tokens, reconstruct=recon_loss_weight > 0)
            for d, h, s in zip(dims, hierarchies, strides)
        ])
        self.post_emb_norms = nn.ModuleList([RMSNorm(d) for d in dims])
        self.layers = nn.ModuleList([
            nn.ModuleList([
                HierarchicalBlock(d, dh, nh, w, h, s, ff)
                for d, dh, nh, w, h, s, ff in zip(dims, dim_heads, heads, window_sizes, hierarchies, strides, ff_mults)
            ])
            for _ in range(depth)
        ])
        merge_dim = sum(dims) if hierarchy_merge_all else dims[self.predict_index]
        self.merges = nn.ModuleList(
            [HierarchicalMerge(dims, merge_dim, strides) for _ in range(depth)] if count > 1 else []
        )
        self.norms = nn.ModuleList([RMSNorm(d) for d in dims])
        self.to_logits = nn.Linear(sum(dims) if predict_use_all_hierarchy else dims[self.predict_index],
                                   num_tokens, bias=False)
        self.to_hierarchical_preds = nn.ModuleList([
            nn.Linear(d, d) if h > 1 and hierarchical_ar_loss_weight > 0 else nn.Identity()
            for d, h in zip(dims, hierarchies)
        ])

    def check_ids(self, ids: Tensor, values: bool | None = None) -> None:
        """Raise a TypeError/ValueError for ids the model cannot take: dtype, shape and length always,
        token-id values with `values` (default: in debug mode, `hiertrans.set_debug`)."""
        check_token_ids(ids, self.num_tokens, self.seq_len, values)

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weights of the auxiliary losses `forward(..., return_aux_losses=True)` returns."""
        weights = {"recon": self.recon_loss_weight, "hier_ar": self.hierarchical_ar_loss_weight}
        compressed = max(self.hierarchies) > 1  # only compressed hierarchies reconstruct or predict chunks
        return {name: w for name, w in weights.items() if w > 0 and compressed}

    def forward(
        self,
        ids: Tensor,
        return_loss: bool = False,
        return_hierarchical_token_embeds: bool = False,
        return_hierarchical_embeds: bool = False,
        ablate_hierarchical_merge: bool = False,
        labels: Tensor | None = None,
        return_aux_losses: bool = False,
    ):
        """`ids (b, n)` -> logits `(b, n, num_tokens)`; with `return_loss`, `ids` holds n + 1 tokens
        and the result is `(total, (ce, recon, hierarchical_ar))`.

        `labels (b, n)`, if given with `return_loss`, are the targets for `ids (b, n)` instead
        (positions to skip hold `ignore_index`). With `return_aux_losses`: `(logits, aux)`, `aux` a
        dict of the unweighted scalar losses named in `aux_loss_weights`.
        """
        if return_loss and return_aux_losses:
            raise ValueError("return_loss and return_aux_losses exclude each other: return_loss gives the "
                             "weighted total, return_aux_losses the logits and the unweighted auxiliary losses")
        if return_loss:
            ids, labels = next_token_targets(ids, labels)
        self.check_ids(ids)
        n = ids.shape[1]

        x = self.token_emb(ids)
        tokens = [norm(compress(x)) for compress, norm in zip(self.compressors, self.post_emb_norms)]
        if return_hierarchical_token_embeds:
            return tokens

        for blocks, merge in zip_longest(self.layers, self.merges):
            tokens = [block(t) for block, t in zip(blocks, tokens)]
            if merge is None or ablate_hierarchical_merge:
                continue
            pooled = merge(tokens, n)
            if self.hierarchy_merge_all:
                tokens = [t + p[:, ::s] for t, p, s in zip(tokens, pooled.split(self.dims, dim=-1), self.strides)]
            else:
                tokens[self.predict_index] = tokens[self.predict_index] + pooled

        embeds = [norm(t) for norm, t in zip(self.norms, tokens)]
        if return_hierarchical_embeds:
            return embeds

        if self.predict_use_all_hierarchy:
            predict_embed = hierarchical_cat(embeds, self.strides, n)
        else:
            predict_embed = expand_to_tokens(embeds[self.predict_index], self.strides[self.predict_index], n)
        logits = self.to_logits(predict_embed)
        if not (return_loss or return_aux_losses):
            return logits
        zero = logits.new_zeros(())
        aux = self.aux_losses(ids, embeds, zero)
        if return_aux_losses:
            return logits, aux

        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index)
        recon, hier_ar = aux.get("recon", zero), aux.get("hier_ar", zero)
        total = ce + recon * self.recon_loss_weight + hier_ar * self.hierarchical_ar_loss_weight
        return total, (ce, recon, hier_ar)

    def aux_losses(self, ids: Tensor, embeds: Sequence[Tensor], zero: Tensor) -> dict[str, Tensor]:
        """The unweighted auxiliary losses named in `aux_loss_weights`, from the input `ids (b, n)`
        and the final per-hierarchy embeddings; `zero` is the empty sum."""
        weights, losses = self.aux_loss_weights, {}
        if "recon" in weights:
            losses["recon"] = sum((c.recon_loss(e, ids, self.ignore_index) for c, e in zip(self.compressors, embeds)),
                                  zero)
        if "hier_ar" in weights:
            hier_ar = zero
            for h, s, embed, to_pred in zip(self.hierarchies, self.strides, embeds, self.to_hierarchical_preds):
                a = h // s  # the next chunk, not overlapping this one, is a steps ahead
                if h > 1 and embed.shape[1] > a:
                    hier_ar = hier_ar + cosine_sim_loss(to_pred(embed[:, :-a]), embed[:, a:])
            losses["hier_ar"] = hier_ar
        return losses

    def init_cache(self) -> HierarchicalCache:
        """An empty decoding state for `decode` (its tensors are allocated at the first call)."""
        capacities = [-(-self.seq_len // s) for s in self.strides]  # compressed tokens per hierarchy
        count = len(self.hierarchies)
        return HierarchicalCache(
            blocks=[[block.init_cache(c) for block, c in zip(blocks, capacities)] for blocks in self.layers],
            latest=[[None] * count for _ in self.layers], history=[None] * count, latest_embeds=[None] * count)

    def decode(self, ids: Tensor, cache: HierarchicalCache) -> Tensor:
        """Incremental forward: `ids (b, n)` continue the sequence `cache` holds (a prompt into an empty
        cache, then one token per call) -> their logits `(b, n, num_tokens)`, equal to the full
        forward's at those positions.

        A hierarchy of stride s gains compressed token j when position j * s arrives, computed
        through every layer then; between two, the merges and the prediction read its newest one
        (`expand_new_tokens`, as `expand_to_tokens` does). Each block only sees its new tokens,
        each going to its interleaved sub-sequence's cache (`HierarchicalBlock`).
        """
        check_continuation(ids, cache.length, self.num_tokens, self.seq_len)
        start, n = cache.length, ids.shape[1]
        x = self.token_emb(ids)
        tokens = []
        for i, (compress, norm) in enumerate(zip(self.compressors, self.post_emb_norms)):
            new, cache.history[i] = compress.extend(x, cache.history[i], start)
            tokens.append(norm(new))

        for blocks, merge, block_caches, latest in zip_longest(self.layers, self.merges, cache.blocks, cache.latest):
            tokens = [block(t, c) for block, t, c in zip(blocks, tokens, block_caches)]
            if merge is None:
                continue
            per_position = [expand_new_tokens(old, t, s, start, n) for old, t, s in zip(latest, tokens, self.strides)]
            latest[:] = [newest(old, t) for old, t in zip(latest, tokens)]
            pooled = merge.net(torch.cat(per_position, dim=-1))
            if self.hierarchy_merge_all:  # compressed token j takes the merge at position j * s
                tokens = [t + p[:, -start % s :: s][:, : t.shape[1]]
                          for t, p, s in zip(tokens, pooled.split(self.dims, dim=-1), self.strides)]
            else:
                tokens[self.predict_index] = tokens[self.predict_index] + pooled

        embeds = [norm(t) for norm, t in zip(self.norms, tokens)]
        per_position = [expand_new_tokens(old, e, s, start, n)
                        for old, e, s in zip(cache.latest_embeds, embeds, self.strides)]
        cache.latest_embeds = [newest(old, e) for old, e in zip(cache.latest_embeds, embeds)]
        cache.length += n
        if self.predict_use_all_hierarchy:
            return self.to_logits(torch.cat(per_position, dim=-1))
        return self.to_logits(per_position[self.predict_index])
