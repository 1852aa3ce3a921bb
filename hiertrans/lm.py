"""Token-level hierarchical transformer language model.

The design of simple-hierarchical-transformer (lucidrains): the token embeddings are compressed
causally into several hierarchies (compression factors 1, 2, 4, ...), each hierarchy runs its own
transformer blocks, and after every layer all hierarchies are merged into the one that predicts
the next token. Strict causality holds throughout: logits at position t depend only on tokens
0..t.

einops notation: b batch, n tokens, a axial factor (compression / stride), d feature dim.
"""

from collections.abc import Sequence
from itertools import zip_longest

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import CausalBlock, RMSNorm, check_token_ids

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

    def forward(self, x: Tensor) -> Tensor:
        n, a = x.shape[-2], self.axial
        if a == 1:
            return super().forward(x)
        x = rearrange(pad_to_multiple(x, a), "b (n a) d -> (b a) n d", a=a)
        x = super().forward(x)
        return rearrange(x, "(b a) n d -> b (n a) d", a=a)[:, :n]


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


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the top (1 - thres) fraction of logits (at least one), the rest set to -inf."""
    k = max(1, int((1 - thres) * logits.shape[-1]))
    val, ind = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ind, val)


def gumbel_sample(logits: Tensor, temperature: float = 1.0) -> Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    uniform = torch.rand_like(logits).clamp(1e-20, 1.0)
    noise = -torch.log((-torch.log(uniform)).clamp(min=1e-20))
    return (logits / temperature + noise).argmax(dim=-1)


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


@torch.no_grad()
def sample(model: nn.Module, prompt: Tensor, seq_len: int, temperature: float = 1.0,
           filter_thres: float = 0.9) -> Tensor:
    """Sample `seq_len` tokens after `prompt` (`(b, t)` or `(t,)`) with top-k and Gumbel noise, from
    any causal LM `ids (b, n) -> logits (b, n, num_tokens)` with `num_tokens` and `seq_len`
    attributes (`hiertrans.protocols.CausalLM`).

    The context slides over the last `model.seq_len` tokens. Runs in eval mode and restores the
    training flag afterwards. Returns the new tokens only: `(b, seq_len)` or `(seq_len,)`.
    """
    if not 0.0 <= filter_thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    squeeze = prompt.ndim == 1
    out = prompt[None] if squeeze else prompt
    check_token_ids(out, model.num_tokens, model.seq_len, values=True)  # eager: one sync per call is nothing
    was_training = model.training
    model.eval()
    try:
        start = out.shape[1]
        for _ in range(seq_len):
            logits = model(out[:, -model.seq_len:])[:, -1]
            next_token = gumbel_sample(top_k(logits, filter_thres), temperature)
            out = torch.cat((out, next_token[:, None].to(out.dtype)), dim=-1)
    finally:
        model.train(was_training)
    out = out[:, start:]
    return out[0] if squeeze else out


def cosine_sim_loss(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()


class HierarchicalTransformer(nn.Module):
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

    def generate(self, prompt: Tensor, seq_len: int, temperature: float = 1.0, filter_thres: float = 0.9) -> Tensor:
        """Sample `seq_len` tokens after `prompt` (`(b, t)` or `(t,)`) with top-k and Gumbel noise
        (`sample`). Runs in eval mode and restores the training flag afterwards. Returns the new
        tokens only."""
        return sample(self, prompt, seq_len, temperature, filter_thres)
