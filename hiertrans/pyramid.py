"""The one vision pyramid: a stage description, the registries of token mixers and feed-forwards,
the block and the stage that every vision model here is built from.

`HierarchialViT`'s PVT-style arguments, its presets (`hiertrans.vit`) and config-built hierarchies
(`hiertrans.hierarchical_configs`) are three ways to write a list of `StageConfig`s; `HierarchicalStage`
builds each one. A stage embeds its input map into patches (a conv: `patch_size`, `stride`,
`padding`), optionally adds a learned position embedding, then runs `depth` MetaFormer blocks:
`x + TokenMixer(Norm(x))`, `x + FeedForward(Norm(x))`.

Extending: register a token mixer or a feed-forward by name (`register_token_mixer`,
`register_feedforward`); the contract each must meet is written next to the registry below.

Imports only `hiertrans.layers`; the models import this module, never the other way round.
einops notation: b batch, n tokens, m key/value tokens, c channels, h/w grid height/width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import DropPath, attend, attention_probs, make_norm, merge_heads
from .layers.spatial import (
    AxialRotaryEmbedding,
    DWConvFeedForward,
    GroupNorm1,
    LayerScale,
    Pooling,
    PosConv,
    TokenFeedForward,
    to_map,
)

IntOrPair = int | Sequence[int]
NORMALIZATIONS = ("layernorm", "rmsnorm", "groupnorm")
POSITION_EMBEDDINGS = ("learned", "rotary", "none")
RESIDUAL_NORM_STYLES = ("pre", "post")


def to_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """`7 -> (7, 7)`; `(h, w)` passes through. Rejects anything that is not one or two ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return pair


def conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution along one axis (may be <= 0: the map vanished)."""
    return (size + 2 * padding - kernel) // stride + 1


# --- the stage description ------------------------------------------------------------------------

@dataclass
class StageConfig:
    """One stage, fully specified: the description every vision model here is built from.

    Patch embedding `(b, in, H, W) -> (b, embedding, h, w)` with `h = (H + 2 padding - patch_size)
    // stride + 1`; then `depth` blocks of `token_mixer` (heads `num_heads`, options
    `mixer_kwargs`, e.g. `{sr_ratio: 2}`) and `feedforward` (hidden `embedding * mlp_multiplier`).
    `seq_len` is the stage's token count `h * w` for the image size the model is built for
    (checked at build time; None: not checked). `position_embedding`: `learned` (a table added
    after the patch embedding, resized for other input sizes), `rotary` (2-D axial, attention
    mixers only) or `none` (position from the convolutions). `pos_conv` adds a conditional
    position encoding (CPVT's PEG) after the first block.
    """

    embedding: int
    token_mixer: str
    feedforward: str
    patch_size: int
    stride: int
    padding: int
    seq_len: int | None = None
    depth: int = 1
    num_heads: int = 1
    mlp_multiplier: float = 4.0
    normalization: str = "layernorm"
    position_embedding: str = "learned"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    pos_conv: bool = False

    @property
    def sr_ratio(self) -> int:
        """The spatial reduction the geometry check holds the stage's grid to (1: none)."""
        return int(self.mixer_kwargs.get("sr_ratio", 1))


# --- registries -------------------------------------------------------------------------------------
#
# The extension point. A token mixer factory is called as
#     factory(dim, *, num_heads, rotary, **mixer_kwargs) -> module
# and the module maps `(b, prefix + h*w, dim), height, width -> same shape`. `prefix` is 0, or 1
# when the model pools a class token (a mixer that cannot take one raises a ValueError saying so).
# Mixers registered with `attention=True` get `rotary=True` when the stage asks for rotary
# positions (others always get False), a `qkv_bias` keyword, and `attn_drop` / `proj_drop`
# keywords when the model sets dropout. A `sr_ratio` mixer keyword is what the geometry check
# holds each stage's grid to.
# A feed-forward factory is called as `factory(dim, hidden_dim, *, dropout) -> module`, and the
# module maps `(b, prefix + h*w, dim), height, width -> same shape`.
# Names are case-insensitive; registering an existing name replaces it.


@dataclass(frozen=True)
class _MixerEntry:
    factory: Callable[..., nn.Module]
    attention: bool  # takes rotary position embeddings and attention dropout


TOKEN_MIXERS: dict[str, _MixerEntry] = {}
FEEDFORWARDS: dict[str, Callable[..., nn.Module]] = {}


def register_token_mixer(name: str, *, attention: bool = False):
    """Decorator: register a token-mixer factory as `name` (contract above)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        TOKEN_MIXERS[name.lower()] = _MixerEntry(factory, attention)
        return factory

    return decorator


def register_feedforward(name: str):
    """Decorator: register a feed-forward factory as `name` (contract above)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        FEEDFORWARDS[name.lower()] = factory
        return factory

    return decorator


def lookup(registry: Mapping[str, Any], kind: str, name: str) -> Any:
    """The entry `name` of a registry, or a ValueError listing the known names."""
    if not isinstance(name, str) or name.lower() not in registry:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))} "
                         f"(add your own with register_{kind.replace(' ', '_')})")
    return registry[name.lower()]


def is_attention_mixer(name: str) -> bool:
    return lookup(TOKEN_MIXERS, "token mixer", name).attention


def make_token_mixer(name: str, dim: int, *, num_heads: int = 1, rotary: bool = False,
                     **kwargs: Any) -> nn.Module:
    """The registered token mixer `name` for width `dim` (ValueError listing the known names)."""
    entry = lookup(TOKEN_MIXERS, "token mixer", name)
    try:
        return entry.factory(dim, num_heads=num_heads, rotary=rotary and entry.attention, **kwargs)
    except TypeError as exc:
        raise TypeError(f"token mixer {name!r} rejected mixer_kwargs {kwargs}: {exc}") from exc


def make_feedforward(name: str, dim: int, hidden_dim: int, **kwargs: Any) -> nn.Module:
    """The registered feed-forward `name`, `dim -> hidden_dim -> dim` (ValueError listing the known names)."""
    return lookup(FEEDFORWARDS, "feedforward", name)(dim, hidden_dim, **kwargs)


def make_token_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """`layernorm` / `rmsnorm` (`hiertrans.layers.make_norm`) or `groupnorm` (one group, PoolFormer)."""
    if not isinstance(kind, str) or kind.lower() not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {kind!r}; known: {', '.join(NORMALIZATIONS)}")
    kind = kind.lower()
    return GroupNorm1(dim, eps=1e-5) if kind == "groupnorm" else make_norm(kind, dim, eps=eps)


# --- token mixers -------------------------------------------------------------------------------------

class MultiScaleAttention(nn.Module):
    """Spatial-reduction attention (PVT v1): `(b, n, dim), H, W -> (b, n, dim)`.

    Queries come from all `n` tokens; keys and values from the `H x W` map shrunk by a conv with
    kernel = stride = `sr_ratio` (then LayerNorm), i.e. `m = (H // sr) * (W // sr)` tokens, which
    cuts the cost of attention by `sr_ratio ** 2`; `sr_ratio=1` is full attention. Tokens in front
    of the map (a class token) stay unreduced extra keys. `qkv` holds the query, key and value
    projections in one matrix (one product when nothing is reduced). `rotary=True` adds 2-D axial
    rotary embeddings: queries at the grid cells, pooled keys at the centres of their `sr x sr`
    cells. The attention runs on `hiertrans.layers.attend` (SDPA); `attention_probs` materialises
    the `(b, heads, n, m)` matrix for inspection only.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1, rotary: bool = False):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5  # what SDPA applies by default
        self.sr_ratio, self.attn_drop = sr_ratio, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = make_norm("layernorm", dim, eps=1e-5) if sr_ratio > 1 else None
        self.rotary = AxialRotaryEmbedding(self.head_dim) if rotary else None

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` grid of key/value tokens for an `height` x `width` map."""
        return height // self.sr_ratio, width // self.sr_ratio

    def reduce(self, x: Tensor, height: int, width: int) -> Tensor:
        """Key/value source tokens `(b, prefix + m, dim)`: the map shrunk by `sr_ratio`."""
        prefix = x.shape[1] - height * width
        grid = self.sr(to_map(x[:, prefix:], height, width))
        grid = self.norm(rearrange(grid, "b c h w -> b (h w) c"))
        return torch.cat((x[:, :prefix], grid), dim=1) if prefix else grid

    def project(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries `(b, heads, n, d)` and keys/values `(b, heads, m, d)`."""
        split = "b n (qkv heads d) -> qkv b heads n d"
        if self.sr is None:
            q, k, v = rearrange(self.qkv(x), split, qkv=3, heads=self.num_heads)
        else:
            w_q, w_kv = self.qkv.weight.split((self.dim, 2 * self.dim))
            b_q, b_kv = self.qkv.bias.split((self.dim, 2 * self.dim)) if self.qkv.bias is not None else (None, None)
            (q,) = rearrange(F.linear(x, w_q, b_q), split, qkv=1, heads=self.num_heads)
            k, v = rearrange(F.linear(self.reduce(x, height, width), w_kv, b_kv), split, qkv=2, heads=self.num_heads)
        if self.rotary is not None:
            if x.shape[1] != height * width:
                raise ValueError("rotary embeddings need a grid of patch tokens only (no class token): "
                                 "use global_pool='avg'")
            sr = self.sr_ratio
            q = self.rotary.rotate(q, height, width)
            k = self.rotary.rotate(k, *self.key_grid(height, width), step=sr, offset=(sr - 1) / 2)
        return q, k, v

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        q, k, v = self.project(x, height, width)
        out = attend(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(merge_heads(out)))

    def attention_probs(self, x: Tensor, height: int, width: int) -> Tensor:
        """The attention matrix `(b, heads, n, m)` that `forward` applies (rows sum to 1)."""
        q, k, _ = self.project(x, height, width)
        return attention_probs(q, k)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, rotary={self.rotary is not None}"


AttentionMixer = MultiScaleAttention  # the config-built name of the same mixer


class LocalWindowAttention(nn.Module):
    """Attention inside non-overlapping `window_size x window_size` windows of the grid.

    `(b, h*w, dim), height, width -> (b, h*w, dim)`; cost linear in the number of tokens.
    Windows are clipped to the grid (a 4x4 map with window 7 is one 4x4 window); a grid that is
    not a multiple of the window is zero-padded at the bottom/right and cropped after, as in Swin
    (padded tokens are visible as keys there too). Rotary positions are window-relative.
    """

    def __init__(self, dim: int, num_heads: int = 1, window_size: int = 7, rotary: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
        self.window_size = window_size
        self.attn = MultiScaleAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, rotary=rotary)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        if x.shape[1] != height * width:
            raise ValueError("local window attention takes patch tokens only (no class token): use global_pool='avg'")
        wh, ww = min(self.window_size, height), min(self.window_size, width)
        grid = rearrange(x, "b (h w) c -> b h w c", h=height, w=width)
        pad_h, pad_w = -height % wh, -width % ww
        if pad_h or pad_w:
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        windows = rearrange(grid, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=wh, ww=ww)
        out = self.attn(windows, wh, ww)
        out = rearrange(out, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", b=x.shape[0],
                        nh=(height + pad_h) // wh, wh=wh)
        return out[:, :height, :width].reshape(x.shape)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}"


@register_token_mixer("scaled_dot_product", attention=True)
def _scaled_dot_product(dim: int, *, num_heads: int, rotary: bool, qkv_bias: bool = True, attn_drop: float = 0.0,
                        proj_drop: float = 0.0) -> nn.Module:
    return MultiScaleAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, rotary=rotary)


@register_token_mixer("spatial_reduction", attention=True)
def _spatial_reduction(dim: int, *, num_heads: int, rotary: bool, sr_ratio: int = 1, qkv_bias: bool = True,
                       attn_drop: float = 0.0, proj_drop: float = 0.0) -> nn.Module:
    return MultiScaleAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop, sr_ratio, rotary)


@register_token_mixer("local", attention=True)
def _local(dim: int, *, num_heads: int, rotary: bool, window_size: int = 7, qkv_bias: bool = True,
           attn_drop: float = 0.0, proj_drop: float = 0.0) -> nn.Module:
    return LocalWindowAttention(dim, num_heads, window_size, rotary, qkv_bias, attn_drop, proj_drop)


@register_token_mixer("pooling")
def _pooling(dim: int, *, num_heads: int, rotary: bool, pool_size: int = 3) -> nn.Module:
    return Pooling(pool_size)


@register_feedforward("mlp")
def _mlp(dim: int, hidden_dim: int, *, dropout: float = 0.0) -> nn.Module:
    return TokenFeedForward(dim, hidden_dim, dropout=dropout)


@register_feedforward("dwconv_mlp")
def _dwconv_mlp(dim: int, hidden_dim: int, *, dropout: float = 0.0) -> nn.Module:
    return DWConvFeedForward(dim, hidden_dim, dropout=dropout)


# --- the block ----------------------------------------------------------------------------------------

class MetaFormerBlock(nn.Module):
    """The one block of every vision model here: `(b, prefix + h*w, dim), height, width -> same`.

    Pre-norm: `x + DropPath(LS(mixer(norm1(x))))`, then `x + DropPath(LS(mlp(norm2(x))))`.
    Post-norm: `norm1(x + DropPath(LS(mixer(x))))`, then `norm2(x + DropPath(LS(mlp(x))))`.
    `LS` is a per-channel layer scale (PoolFormer: 1e-5) when `layer_scale_init` is set, else
    identity. With a `MultiScaleAttention` mixer and an MLP this is PVT's block
    (`SpatialReductionBlock`). The mixer is also reachable as `attn` (what `hiertrans.visualize` reads).
    """

    def __init__(self, dim: int, token_mixer: nn.Module, mlp: nn.Module, normalization: str = "layernorm",
                 residual_norm_style: str = "pre", drop_path: float = 0.0,
                 layer_scale_init: float | None = None, norm_eps: float = 1e-6):
        super().__init__()
        if residual_norm_style not in RESIDUAL_NORM_STYLES:
            raise ValueError(f"residual_norm_style must be one of {RESIDUAL_NORM_STYLES}, got {residual_norm_style!r}")
        self.pre_norm = residual_norm_style == "pre"
        self.norm1 = make_token_norm(normalization, dim, norm_eps)
        self.token_mixer = token_mixer
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = make_token_norm(normalization, dim, norm_eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    @property
    def attn(self) -> nn.Module:
        return self.token_mixer

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        if self.pre_norm:
            x = x + self.drop_path(self.ls1(self.token_mixer(self.norm1(x), height, width)))
            return x + self.drop_path(self.ls2(self.mlp(self.norm2(x), height, width)))
        x = self.norm1(x + self.drop_path(self.ls1(self.token_mixer(x, height, width))))
        return self.norm2(x + self.drop_path(self.ls2(self.mlp(x, height, width))))


def SpatialReductionBlock(dim: int, num_heads: int, mlp_ratio: float = 4.0, sr_ratio: int = 1,  # noqa: N802
                          qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                          norm_eps: float = 1e-6, dwconv_mlp: bool = False) -> MetaFormerBlock:
    """PVT's pre-norm block: `MetaFormerBlock(MultiScaleAttention, MLP)`; `dwconv_mlp=True` gives the
    MLP PVT v2's 3x3 depthwise conv after its first layer."""
    mixer = MultiScaleAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
    mlp = make_feedforward("dwconv_mlp" if dwconv_mlp else "mlp", dim, int(dim * mlp_ratio), dropout=drop)
    return MetaFormerBlock(dim, mixer, mlp, drop_path=drop_path, norm_eps=norm_eps)


# --- the stage ----------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Image or feature map to patch tokens: conv (kernel `patch_size`, `stride`, `padding`) + LayerNorm.

    `(b, in_chans, H, W) -> (tokens (b, h*w, embed_dim), (h, w))`. `stride` defaults to the patch
    size (non-overlapping patches, as in PVT v1); a larger kernel with padding gives overlapping
    embeddings (PVT v2: kernel 7, stride 4, padding 3).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: IntOrPair, stride: IntOrPair | None = None,
                 padding: IntOrPair = 0, eps: float = 1e-5):
        super().__init__()
        self.patch_size = to_pair(patch_size, "patch_size")
        self.stride = to_pair(stride if stride is not None else patch_size, "stride")
        self.padding = to_pair(padding, "padding")
        if min(self.patch_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"patch_size and stride must be >= 1 and padding >= 0, got patch_size="
                             f"{self.patch_size}, stride={self.stride}, padding={self.padding}")
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride, self.padding)
        self.norm = make_norm("layernorm", embed_dim, eps=eps)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid `(h, w)` for an input of `height` x `width` (entries < 1: nothing left)."""
        return tuple(conv_out(s, k, st, p) for s, k, st, p in
                     zip((height, width), self.patch_size, self.stride, self.padding))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(rearrange(x, "b c h w -> b (h w) c")), (h, w)


class HierarchicalStage(nn.Module):
    """One stage: `(b, in_chans, H, W) -> (tokens (b, prefix + h*w, dim), (h, w))`.

    `downsample` (a `PatchEmbed`: kernel `patch_size`, stride `patch_stride` (default: the kernel,
    non-overlapping), `patch_padding`) embeds the input map, a learned `pos_embed` (sized for an
    `input_size` input, resized bilinearly otherwise; `pos_embed=False`: none) is added, then
    `depth` `MetaFormerBlock`s run: `token_mixer` (default PVT's `spatial_reduction` with
    `sr_ratio`, `num_heads`, `qkv_bias`) and `feedforward` (default `mlp`, or `dwconv_mlp` with
    `dwconv_mlp=True`, hidden width `dim * mlp_ratio`). With `cls_token=True` a class token is
    prepended (prefix = 1) with its own position embedding, as in PVT v1. `pos_conv=True` adds a
    `PosConv` (PEG) after the first block (Twins-PCPVT). `out_norm` (optional) normalises the
    stage's output tokens (PVT v2). `from_config` builds a stage from a `StageConfig`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        depth: int,
        sr_ratio: int,
        *,
        in_chans: int | None = None,
        patch_size: IntOrPair = 2,
        patch_stride: IntOrPair | None = None,
        patch_padding: IntOrPair = 0,
        input_size: IntOrPair = 56,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        cls_token: bool = False,
        norm_eps: float = 1e-6,
        index: int = 0,
        pos_embed: bool = True,
        pos_conv: bool = False,
        dwconv_mlp: bool = False,
        out_norm: nn.Module | None = None,
        token_mixer: str = "spatial_reduction",
        feedforward: str | None = None,
        mixer_kwargs: Mapping[str, Any] | None = None,
        normalization: str = "layernorm",
        rotary: bool = False,
        residual_norm_style: str = "pre",
        layer_scale_init: float | None = None,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"stage {index}: depth must be >= 1, got {depth}")
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        if len(rates) != depth:
            raise ValueError(f"stage {index}: {len(rates)} drop_path rates for {depth} blocks")
        self.index, self.sr_ratio = index, sr_ratio
        self.downsample = PatchEmbed(in_chans or dim, dim, patch_size, patch_stride, patch_padding)
        self.input_size = to_pair(input_size, "input_size")
        self.grid_size = self.downsample.output_size(*self.input_size)
        self.num_prefix_tokens = int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.num_prefix_tokens + math.prod(self.grid_size), dim))
                          if pos_embed else None)
        self.pos_drop = nn.Dropout(drop_rate)

        kwargs = dict(mixer_kwargs or {})
        if sr_ratio != 1:
            kwargs["sr_ratio"] = sr_ratio
        if is_attention_mixer(token_mixer):
            kwargs.setdefault("qkv_bias", qkv_bias)
            for name, rate in (("attn_drop", attn_drop_rate), ("proj_drop", drop_rate)):
                if rate > 0:  # only when asked for: user mixers need not take dropout keywords
                    kwargs.setdefault(name, rate)
        feedforward = feedforward or ("dwconv_mlp" if dwconv_mlp else "mlp")
        self.blocks = nn.ModuleList(
            MetaFormerBlock(
                dim, make_token_mixer(token_mixer, dim, num_heads=num_heads, rotary=rotary, **kwargs),
                make_feedforward(feedforward, dim, int(dim * mlp_ratio), dropout=drop_rate),
                normalization, residual_norm_style, rate, layer_scale_init, norm_eps)
            for rate in rates
        )
        self.pos_conv = PosConv(dim) if pos_conv else None
        self.norm = out_norm  # PVT v2 norms each stage's output tokens before the next stage
        self.grad_checkpointing = False

    @classmethod
    def from_config(cls, stage: StageConfig, **kwargs: Any) -> HierarchicalStage:
        """A stage from its description; `kwargs` are the model-level settings (`in_chans`,
        `input_size`, `drop_path`, `cls_token`, `index`, `norm_eps`, `drop_rate`, ...)."""
        mixer_kwargs = {k: v for k, v in stage.mixer_kwargs.items() if k != "sr_ratio"}
        return cls(stage.embedding, stage.num_heads, stage.mlp_multiplier, stage.depth, stage.sr_ratio,
                   patch_size=stage.patch_size, patch_stride=stage.stride, patch_padding=stage.padding,
                   pos_embed=stage.position_embedding == "learned", pos_conv=stage.pos_conv,
                   token_mixer=stage.token_mixer, feedforward=stage.feedforward, mixer_kwargs=mixer_kwargs,
                   normalization=stage.normalization, rotary=stage.position_embedding == "rotary", **kwargs)

    def resized_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embeddings for an `h x w` grid: bilinear resize of the learned grid, prefix kept."""
        if self.pos_embed is None:
            raise ValueError(f"stage {self.index} has no learned position embedding (pos_embed=False)")
        if (h, w) == self.grid_size:
            return self.pos_embed
        p = self.num_prefix_tokens
        prefix, grid = self.pos_embed[:, :p], self.pos_embed[:, p:]
        grid = F.interpolate(to_map(grid, *self.grid_size), size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat((prefix, rearrange(grid, "b c h w -> b (h w) c")), dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, (h, w) = self.downsample(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.resized_pos_embed(h, w)
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, h, w, use_reentrant=False)
            else:
                x = block(x, h, w)
            if i == 0 and self.pos_conv is not None:
                x = self.pos_conv(x, h, w)
        if self.norm is not None:
            x = self.norm(x)
        return x, (h, w)


# --- geometry: computed and checked once, when a model is built ---------------------------------------

Size = tuple[int, int]


def stage_geometry(stages: Sequence[StageConfig], size: Size) -> list[tuple[Size, Size]]:
    """`(input map size, token grid)` of each stage for a `size` input; stops after a map vanishes."""
    out = []
    for s in stages:
        grid = tuple(conv_out(side, s.patch_size, s.stride, s.padding) for side in size)
        out.append((size, grid))
        if min(grid) < 1:
            break
        size = grid
    return out


def min_input_size(stages: Sequence[StageConfig]) -> int:
    """The smallest input side for which every stage's grid side is >= max(1, its sr_ratio).

    Walked back from the last stage: a stage whose grid must be >= `need` needs an input side
    >= (need - 1) * stride + kernel - 2 * padding (and >= 1). With non-overlapping patches this is
    max over stages of sr * (product of the patch sizes up to it), as in PVT v1. Each axis is
    independent, so an input is valid exactly when both its sides reach this.
    """
    need = 1
    for s in reversed(stages):
        need = max(need, s.sr_ratio, 1)
        need = max(1, (need - 1) * s.stride + s.patch_size - 2 * s.padding)
    return need


def check_geometry(stages: Sequence[StageConfig], size: tuple[int, int], what: str = "img_size") -> None:
    """Raise a ValueError naming the first stage whose map vanishes or is smaller than its sr_ratio,
    and the smallest valid input; `what` says whether `size` is the model's `img_size` or an input."""
    geometry = stage_geometry(stages, size)
    for i, (s, (in_size, grid)) in enumerate(zip(stages, geometry)):
        where = (f"stage {i} gets a {in_size[0]}x{in_size[1]} input map and a {grid[0]}x{grid[1]} token grid "
                 f"(patch {s.patch_size}, stride {s.stride}, padding {s.padding})")
        if min(grid) < 1:
            problem = "the feature map vanishes"
        elif s.sr_ratio > min(grid):
            problem = (f"its sr_ratio {s.sr_ratio} exceeds the feature map; the largest valid sr_ratio for this "
                       f"stage is {min(grid)}")
        else:
            continue
        context = (f"{what} {size[0]}x{size[1]}, patch sizes {tuple(t.patch_size for t in stages)}, strides "
                   f"{tuple(t.stride for t in stages)}, paddings {tuple(t.padding for t in stages)}, sr_ratios "
                   f"{tuple(t.sr_ratio for t in stages)}")
        need = min_input_size(stages)
        fix = (f"use an img_size with both sides >= {need}, a smaller patch_size, or smaller sr_ratios"
               if what == "img_size" else f"inputs need both sides >= {need}")
        raise ValueError(f"{where}: {problem} ({context}): {fix}.")
