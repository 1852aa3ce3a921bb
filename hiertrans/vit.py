"""HierarchialViT: a PVT v1 style staged vision transformer (Wang et al., 2021).

Each stage embeds its input map into patches (a conv with kernel = stride = patch size: 4, 2, 2, 2
by default), adds a learned position embedding, and runs pre-norm blocks of spatial-reduction
attention (queries from every token, keys/values from a strided conv of the map) and an MLP. The
output tokens are folded back into a map for the next stage, so the network yields features at
strides 4, 8, 16 and 32 like a CNN backbone. The classifier reads a class token (added in the last
stage) or the mean of the last stage's patch tokens.

einops notation: b batch, n tokens, m key/value tokens, c channels, h/w map height/width,
heads attention heads, d head dim.
"""

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    DropPath,
    FeedForward,
    attend,
    attention_probs,
    linear_drop_path_rates,
    make_norm,
    merge_heads,
)
from .layers.spatial import DWConvFeedForward, on_grid, to_map

__all__ = [
    "HierarchialViT",
    "HierarchicalStage",
    "HierarchicalViT",
    "MultiScaleAttention",
    "PatchEmbed",
    "PRESETS",
    "SpatialReductionBlock",
    "create_model",
]

IntOrPair = int | Sequence[int]
BlockFactory = Callable[[float], nn.Module]  # drop-path rate -> block with forward(x, height, width)


def to_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """`7 -> (7, 7)`; `(h, w)` passes through. Rejects anything that is not one or two ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    return pair


def conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output length of a convolution along one axis (may be <= 0: the map vanished)."""
    return (size + 2 * padding - kernel) // stride + 1


class PatchEmbed(nn.Module):
    """Image or feature map to patch tokens: conv (kernel `patch_size`, `stride`, `padding`) + LayerNorm.

    `(b, in_chans, H, W) -> (tokens (b, h*w, embed_dim), (h, w))`. `stride` defaults to the patch
    size (non-overlapping patches, as in PVT v1); a larger kernel with padding gives overlapping
    embeddings (PVT v2: kernel 7, stride 4, padding 3).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: IntOrPair,
        stride: IntOrPair | None = None,
        padding: IntOrPair = 0,
        eps: float = 1e-5,
    ):
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


class MultiScaleAttention(nn.Module):
    """Spatial-reduction attention (PVT v1): `(b, n, dim), H, W -> (b, n, dim)`.

    Queries come from all `n` tokens; keys and values from the `H x W` map shrunk by a conv with
    kernel = stride = `sr_ratio` (then LayerNorm), i.e. `m = (H // sr) * (W // sr)` tokens, which
    cuts the cost of attention by `sr_ratio ** 2`. Tokens in front of the map (a class token) are
    kept unreduced as extra keys. The attention itself runs on `hiertrans.layers.attend` (SDPA);
    `attention_probs` materialises the `(b, heads, n, m)` matrix for inspection only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be an int >= 1, got {sr_ratio!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # what SDPA applies by default
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = make_norm("layernorm", dim, eps=1e-5)
        else:
            self.sr = self.norm = None

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` grid of key/value tokens for an `height` x `width` map."""
        return height // self.sr_ratio, width // self.sr_ratio

    def reduce(self, x: Tensor, height: int, width: int) -> Tensor:
        """Key/value source tokens `(b, prefix + m, dim)`: the map shrunk by `sr_ratio`."""
        if self.sr is None:
            return x
        prefix = x.shape[1] - height * width
        grid = self.sr(to_map(x[:, prefix:], height, width))
        grid = self.norm(rearrange(grid, "b c h w -> b (h w) c"))
        return torch.cat((x[:, :prefix], grid), dim=1) if prefix else grid

    def project(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries `(b, heads, n, d)` and keys/values `(b, heads, m, d)`."""
        q = rearrange(self.q(x), "b n (heads d) -> b heads n d", heads=self.num_heads)
        kv = self.kv(self.reduce(x, height, width))
        k, v = rearrange(kv, "b m (two heads d) -> two b heads m d", two=2, heads=self.num_heads)
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
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}"


class SpatialReductionBlock(nn.Module):
    """Pre-norm transformer block: `(b, n, dim), H, W -> (b, n, dim)`.

    `x + DropPath(MultiScaleAttention(LN(x)))`, then `x + DropPath(FeedForward(LN(x)))`.
    `dwconv_mlp=True` puts a 3x3 depthwise conv after the MLP's first layer (PVT v2's
    `DWConvFeedForward`): locality for 9 weights per hidden channel.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 1,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        dwconv_mlp: bool = False,
    ):
        super().__init__()
        self.norm1 = make_norm("layernorm", dim, eps=norm_eps)
        self.attn = MultiScaleAttention(dim, num_heads, qkv_bias, attn_drop, drop, sr_ratio)
        self.norm2 = make_norm("layernorm", dim, eps=norm_eps)
        mlp = DWConvFeedForward if dwconv_mlp else FeedForward
        self.mlp = mlp(dim, int(dim * mlp_ratio), dropout=drop)
        self.dwconv_mlp = dwconv_mlp
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        grid = (height, width) if self.dwconv_mlp else ()
        return x + self.drop_path(self.mlp(self.norm2(x), *grid))


def check_stage_geometry(
    index: int, in_size: tuple[int, int], grid: tuple[int, int], sr_ratio: int, hint: str = ""
) -> None:
    """Raise a ValueError if stage `index`'s token grid vanished or is smaller than its sr_ratio."""
    h, w = grid
    where = f"stage {index} gets a {in_size[0]}x{in_size[1]} input map and a {h}x{w} token grid"
    if h < 1 or w < 1:
        raise ValueError(f"{where}: the feature map vanishes. {hint}".rstrip())
    if sr_ratio > min(h, w):
        raise ValueError(f"{where}: its sr_ratio {sr_ratio} exceeds the feature map; the largest valid "
                         f"sr_ratio for this stage is {min(h, w)}. {hint}".rstrip())


class PosConv(nn.Module):
    """Conditional position encoding (CPVT's PEG, as in Twins-PCPVT): `x + DWConv3x3(x)` over the
    token map, `(b, prefix + h*w, dim), H, W -> same`; prefix tokens (a class token) pass through.

    Position comes from the zero padding at the borders, so it follows any input size without
    resizing, and the 3x3 neighbourhood gives every stage some locality for 9 weights per channel.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return on_grid(x, height, width, lambda grid: grid + self.proj(grid))


class HierarchicalStage(nn.Module):
    """One PVT stage: `(b, in_chans, H, W) -> (tokens (b, prefix + h*w, dim), (h, w))`.

    `downsample` (a `PatchEmbed`: kernel `patch_size`, stride `patch_stride` (default: the kernel,
    non-overlapping), `patch_padding`) embeds the input map, a learned `pos_embed` (sized for an
    `input_size` input, resized bilinearly otherwise; `pos_embed=False`: none, for models whose
    mixers or convs carry position) is added, then `depth` blocks run. With `cls_token=True` a class
    token is prepended (prefix = 1); it gets its own position embedding, as in PVT v1.
    `pos_conv=True` adds a `PosConv` (PEG) after the first block (Twins-PCPVT); `dwconv_mlp=True`
    gives the default blocks PVT v2's depthwise-conv MLP.

    `out_norm` (optional) normalises the stage's output tokens (PVT v2).
    `block_fn(drop_path) -> block` builds each block (any module with `forward(x, height, width)`,
    e.g. the config-built `MetaFormerBlock`); by default a `SpatialReductionBlock` from `num_heads`,
    `mlp_ratio` and `sr_ratio`. `sr_ratio` is also what the geometry check holds the grid to.
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
        block_fn: BlockFactory | None = None,
        out_norm: nn.Module | None = None,
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
        check_stage_geometry(index, self.input_size, self.grid_size, sr_ratio)
        self.num_prefix_tokens = int(cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.num_prefix_tokens + math.prod(self.grid_size), dim))
                          if pos_embed else None)
        self.pos_drop = nn.Dropout(drop_rate)
        if block_fn is None:
            def block_fn(rate: float) -> nn.Module:
                return SpatialReductionBlock(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop_rate,
                                             attn_drop_rate, rate, norm_eps, dwconv_mlp)
        self.blocks = nn.ModuleList(block_fn(rate) for rate in rates)
        self.pos_conv = PosConv(dim) if pos_conv else None
        self.norm = out_norm  # PVT v2 norms each stage's output tokens before the next stage
        self.grad_checkpointing = False

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
        in_size = tuple(x.shape[-2:])
        # checked before the convs run, which would fail with a message that names no stage
        check_stage_geometry(self.index, in_size, self.downsample.output_size(*in_size), self.sr_ratio,
                             "Use a larger input image.")
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


def per_stage_flag(flag: bool | Sequence[bool], num_stages: int) -> tuple[bool, ...]:
    """One flag for every stage, or the per-stage flags given (their count is checked by the caller)."""
    return (flag,) * num_stages if isinstance(flag, bool) else tuple(flag)


def init_conv_fan_out(conv: nn.Conv2d) -> None:
    """PVT v2's conv init: weights `N(0, 2 / fan_out)` (fan_out = kernel area * out channels / groups),
    zero bias."""
    fan_out = math.prod(conv.kernel_size) * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class HierarchialViT(nn.Module):
    """Hierarchical (PVT v1 style) vision transformer: `(b, in_chans, H, W) -> (b, num_classes)`.

    Four stages (by default) of patch embedding + position embedding + spatial-reduction
    transformer blocks at strides 4, 8, 16, 32 (`patch_size` for the first stage, 2 after; pass a
    sequence for per-stage sizes). Stochastic depth rises linearly over all blocks. `global_pool`
    `"token"` reads a class token added in the last stage, `"avg"` averages the last stage's patch
    tokens. `img_size` sizes the position embeddings; other input sizes (non-square too) work by
    interpolating them.

    Beyond PVT v1 (used by `from_config` for config-built hierarchies, see
    `hiertrans.hierarchical_configs`): `patch_stride` / `patch_padding` per stage give overlapping
    patch embeddings (PVT v2, PoolFormer: kernel 7 stride 4 padding 2-3, then 3/2/1), and all
    geometry then follows `conv_out`; `pos_embed=False` (one flag or one per stage) drops the learned
    position embeddings; `pos_conv=True` (one flag or one per stage) adds a conditional position
    encoding (a `PosConv`, PEG) after each stage's first block, as Twins-PCPVT does;
    `dwconv_mlp=True` (one flag or one per stage) gives the blocks PVT v2's depthwise-conv MLP;
    `block_fn(stage_index, drop_path) -> block` replaces the spatial-reduction blocks;
    `norm_layer(dim)` replaces the final LayerNorm; `stage_norm_layer(stage_index, dim)` adds a norm
    to the output of every stage but the last (PVT v2; the last one has the final norm).
    `conv_init="fan_out"` initialises every conv as PVT v2 (and ResNet) do, `N(0, 2 / fan_out)`
    with fan_out per group, instead of PyTorch's default (PVT v1's): for a 3x3 depthwise conv that
    is a 2.5x larger weight, which short training runs notice.

    Shapes: `forward_features -> (b, prefix + h4*w4, embed_dims[-1])` (final-normed tokens),
    `forward_head -> (b, num_classes)` (or `(b, num_features)` with `pre_logits=True`),
    `forward_feature_maps -> [(b, embed_dims[i], h_i, w_i)]`.
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: int | Sequence[int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        norm_eps: float = 1e-6,
        *,
        patch_stride: Sequence[int] | None = None,
        patch_padding: Sequence[int] | None = None,
        pos_embed: bool | Sequence[bool] = True,
        pos_conv: bool | Sequence[bool] = False,
        dwconv_mlp: bool | Sequence[bool] = False,
        block_fn: Callable[[int, float], nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        stage_norm_layer: Callable[[int, int], nn.Module] | None = None,
        conv_init: str = "pytorch",
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if conv_init not in ("pytorch", "fan_out"):
            raise ValueError(f"conv_init must be 'pytorch' or 'fan_out', got {conv_init!r}")
        num_stages = len(embed_dims)
        if num_stages < 1:
            raise ValueError("embed_dims must name at least one stage")
        if isinstance(patch_size, int):
            patch_size = (patch_size,) + (2,) * (num_stages - 1)
        patch_stride = tuple(patch_size) if patch_stride is None else tuple(patch_stride)
        patch_padding = (0,) * num_stages if patch_padding is None else tuple(patch_padding)
        pos_embed, pos_conv, dwconv_mlp = (per_stage_flag(flag, num_stages)
                                           for flag in (pos_embed, pos_conv, dwconv_mlp))
        per_stage = dict(num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths, sr_ratios=sr_ratios,
                         patch_size=patch_size, patch_stride=patch_stride, patch_padding=patch_padding,
                         pos_embed=pos_embed, pos_conv=pos_conv, dwconv_mlp=dwconv_mlp)
        for name, values in per_stage.items():
            if len(values) != num_stages:
                raise ValueError(f"{name} has {len(values)} entries but embed_dims defines {num_stages} "
                                 f"stages; give one entry per stage")
        for i, (dim, heads) in enumerate(zip(embed_dims, num_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(f"stage {i}: embed_dim {dim} is not divisible by num_heads {heads}")
        for i, depth in enumerate(depths):
            if depth < 1:
                raise ValueError(f"stage {i}: depth must be >= 1, got {depth}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")

        self.img_size = to_pair(img_size, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_prefix_tokens = int(global_pool == "token")
        self.patch_sizes, self.sr_ratios = tuple(patch_size), tuple(sr_ratios)
        self.patch_strides, self.patch_paddings = patch_stride, patch_padding
        self.min_input_size = self._min_input_size()
        self._check_geometry(self.img_size, at_init=True)

        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        size, chans, reduction = self.img_size, in_chans, 1
        for i in range(num_stages):
            stage = HierarchicalStage(
                embed_dims[i], num_heads[i], mlp_ratios[i], depths[i], sr_ratios[i],
                in_chans=chans, patch_size=patch_size[i], patch_stride=patch_stride[i],
                patch_padding=patch_padding[i], input_size=size, qkv_bias=qkv_bias,
                drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                cls_token=self.num_prefix_tokens > 0 and i == num_stages - 1, norm_eps=norm_eps, index=i,
                pos_embed=pos_embed[i], pos_conv=pos_conv[i], dwconv_mlp=dwconv_mlp[i],
                block_fn=None if block_fn is None else functools.partial(block_fn, i),
                # the last stage's output goes through the model's final norm instead
                out_norm=stage_norm_layer(i, embed_dims[i]) if stage_norm_layer and i < num_stages - 1 else None,
            )
            self.stages.append(stage)
            size, chans, reduction = stage.grid_size, embed_dims[i], reduction * patch_stride[i]
            self.feature_info.append(dict(num_chs=chans, reduction=reduction, module=f"stages.{i}"))
        self.norm = (make_norm("layernorm", self.num_features, eps=norm_eps) if norm_layer is None
                     else norm_layer(self.num_features))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if conv_init == "fan_out":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    init_conv_fan_out(m)
        for stage in self.stages:
            if stage.pos_embed is not None:
                nn.init.trunc_normal_(stage.pos_embed, std=0.02)
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    def _stage_grids(self, size: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """`(input map size, token grid)` of each stage for a `size` input (`conv_out` of each patch
        embedding: kernel `patch_size`, `patch_stride`, `patch_padding`)."""
        out = []
        for k, st, p in zip(self.patch_sizes, self.patch_strides, self.patch_paddings):
            grid = (conv_out(size[0], k, st, p), conv_out(size[1], k, st, p))
            out.append((size, grid))
            if min(grid) < 1:  # the map vanished: later stages have nothing to work on
                break
            size = grid
        return out

    def _min_input_size(self) -> int:
        """The smallest input side for which every stage's grid side is >= max(1, its sr_ratio).

        Walked back from the last stage: a stage whose grid must be >= `need` needs an input side
        >= (need - 1) * stride + kernel - 2 * padding (and >= 1). With non-overlapping patches
        this is max over stages of sr * (product of the patch sizes up to it), as in PVT v1.
        """
        need = 1
        for k, st, p, sr in reversed(list(zip(self.patch_sizes, self.patch_strides, self.patch_paddings,
                                              self.sr_ratios))):
            need = max(need, sr, 1)
            need = max(1, (need - 1) * st + k - 2 * p)
        return need

    def _check_geometry(self, size: tuple[int, int], at_init: bool = False) -> None:
        """Raise a ValueError naming the stage if any stage's map vanishes or is smaller than its
        sr_ratio; at construction also warn about stages reduced to a single key/value token."""
        grids = self._stage_grids(size)
        if len(grids) == len(self.sr_ratios) and all(min(g) >= max(1, sr) for (_, g), sr in
                                                      zip(grids, self.sr_ratios)):
            for i, ((_, g), sr) in enumerate(zip(grids, self.sr_ratios)):
                if at_init and sr > 1 and (g[0] // sr) * (g[1] // sr) == 1:
                    warnings.warn(f"stage {i}: sr_ratio {sr} reduces its {g[0]}x{g[1]} feature map to a "
                                  f"single key/value token, so attention cannot tell positions apart; use "
                                  f"sr_ratio <= {max(1, min(g) // 2)} or a larger img_size / smaller "
                                  f"patch_size", stacklevel=3)
            return
        what = "img_size" if at_init else "input"
        overlapping = self.patch_strides != self.patch_sizes or any(self.patch_paddings)
        context = (f"({what} {size[0]}x{size[1]}, patch sizes {self.patch_sizes}, "
                   + (f"strides {self.patch_strides}, paddings {self.patch_paddings}, " if overlapping else "")
                   + f"sr_ratios {self.sr_ratios})")
        hint = (f"{context}: use an img_size with both sides >= {self.min_input_size}, a smaller "
                f"patch_size, or smaller sr_ratios."
                if at_init else f"{context}: inputs need both sides >= {self.min_input_size}.")
        for i, ((in_size, grid), sr) in enumerate(zip(grids, self.sr_ratios)):
            check_stage_geometry(i, in_size, grid, sr, hint)

    @classmethod
    def from_config(
        cls,
        config: Any,
        num_classes: int = 1000,
        img_size: IntOrPair | None = None,
        in_chans: int | None = None,
        **kwargs: Any,
    ) -> "HierarchialViT":
        """A model from a hierarchy config (`hiertrans.hierarchical_configs`): a `HierarchicalConfig`,
        its dict/YAML form, or a list of `BasicLayerConfig`s. `img_size` defaults to the one implied
        by stage 0's `seq_len`; every stage's `seq_len` is checked against it. Other keywords
        (`drop_path_rate`, `drop_rate`, ...) go to `build_hierarchical_model`."""
        from .hierarchical_configs import build_hierarchical_model  # imports this module

        return build_hierarchical_model(config, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                                        **kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- seed attribute names -----------------------------------------------------------------
    @property
    def patch_embed(self) -> PatchEmbed:
        """The first stage's patch embedding (each stage has its own, as `stages[i].downsample`)."""
        return self.stages[0].downsample

    @property
    def pos_embed(self) -> nn.Parameter | None:
        """The first stage's position embedding (None when built with `pos_embed=False`)."""
        return self.stages[0].pos_embed

    # --- timm model contract --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: position embeddings and the class token."""
        return {name for name, _ in self.named_parameters() if name.endswith(("pos_embed", "cls_token"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        stem = r"^stages\.0\.(?:downsample|pos_embed)"  # groups must capture numbers only
        if coarse:
            return dict(stem=stem, blocks=r"^stages\.(\d+)")
        return dict(
            stem=stem,
            blocks=[
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.(?:downsample|pos_embed|cls_token|norm)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for `num_classes` (0: none, `forward` returns pooled features)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            if global_pool == "token" and self.num_prefix_tokens == 0:
                raise ValueError("global_pool='token' needs the class token, which this model was built "
                                 "without (global_pool='avg'); rebuild it with global_pool='token'")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        self._check_geometry(tuple(x.shape[-2:]))

    def _run_stages(self, x: Tensor, stop: int | None = None):
        """Yield `(tokens, (h, w))` of each stage, feeding each stage's map to the next."""
        self._check_input(x)
        for stage in self.stages[:stop]:
            tokens, (h, w) = stage(x)
            yield tokens, (h, w)
            x = to_map(tokens[:, stage.num_prefix_tokens :], h, w)

    def forward_features(self, x: Tensor) -> Tensor:
        """`(b, in_chans, H, W) -> (b, prefix + h*w, num_features)`: last stage's normed tokens."""
        self._check_input(x)
        for stage in self.stages:
            tokens, (h, w) = stage(x)
            x = to_map(tokens[:, stage.num_prefix_tokens :], h, w)  # a view: free for the last stage
        return self.norm(tokens)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens of `forward_features`, then classify: `-> (b, num_classes)`."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Per-stage feature maps (timm API): `[(b, embed_dims[i], h_i, w_i)]` for the chosen stages.

        `indices`: the last n stages (int) or stage indices (None: all). `norm` applies the final
        norm to the last stage's map. Returns the maps alone (`intermediates_only`) or
        `(forward_features output, maps)`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.stages)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        if not take or not all(0 <= i < n for i in take):
            raise ValueError(f"indices {indices!r} must select among the {n} stages")
        stop = max(take) + 1 if stop_early or intermediates_only else None
        maps = []
        for i, (tokens, (h, w)) in enumerate(self._run_stages(x, stop)):
            if i in take:
                patches = tokens[:, self.stages[i].num_prefix_tokens :]
                if norm and i == n - 1:
                    patches = self.norm(patches)
                maps.append(to_map(patches, h, w) if output_fmt == "NCHW" else
                            rearrange(patches, "b (h w) c -> b h w c", h=h, w=w))
        if intermediates_only:
            return maps
        return self.norm(tokens), maps

    def forward_feature_maps(self, x: Tensor) -> list[Tensor]:
        """All stages' feature maps `[(b, embed_dims[i], h_i, w_i)]`, strides 4, 8, 16, 32 by default."""
        return self.forward_intermediates(x, intermediates_only=True)


HierarchicalViT = HierarchialViT  # the seed's spelling is kept as the primary name


# --- presets (timm style: named configs, overridable) ----------------------------------------------

_PVT_V1 = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1), qkv_bias=True, norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    # PVT v1 Tiny / Small / Medium / Large: 13.23M / 24.49M / 44.21M / 61.37M params at 224 px, 1000 classes
    "hvit_tiny": dict(_PVT_V1, depths=(2, 2, 2, 2)),
    "hvit_small": dict(_PVT_V1, depths=(3, 4, 6, 3)),
    "hvit_medium": dict(_PVT_V1, depths=(3, 4, 18, 3)),
    "hvit_large": dict(_PVT_V1, depths=(3, 8, 27, 3)),
    # CIFAR size (32 px): maps 8, 4, 2, 1. The first stage's sr 2 leaves a 4x4 key grid (sr 8 would
    # leave one key); the later maps are small enough for full attention. pvt_v2_b0's widths and
    # depths plus one block in the last stage. From PVT v2: the depthwise-conv MLP in the two stages
    # whose maps are big enough for a 3x3 neighbourhood to mean something (8x8, 4x4), at MLP ratio 4;
    # overlapping 3x3 stride-2 downsampling between stages; its fan-out conv init. 3.62M params vs
    # b0's 3.41M at 10 classes, 1.7x its training img/s on this CPU (1.4x where our linears, too,
    # take PyTorch's default matmul: layers.Linear); each of the three learns faster at equal wall
    # clock (docs/benchmarks.md). Mean pooling, as b0: a class token would only double the 1x1 last
    # stage's tokens.
    "hvit_cifar": dict(img_size=32, num_classes=10, patch_size=(4, 3, 3, 3), patch_stride=(4, 2, 2, 2),
                       patch_padding=(0, 1, 1, 1), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8),
                       mlp_ratios=(4, 4, 4, 4), depths=(2, 2, 2, 3), sr_ratios=(2, 1, 1, 1),
                       dwconv_mlp=(True, True, False, False), conv_init="fan_out", qkv_bias=True,
                       global_pool="avg", norm_eps=1e-6),
}


def create_model(name: str, **overrides: Any) -> HierarchialViT:
    """Build a preset by name (`hvit_tiny`, `hvit_small`, ...), any constructor argument overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return HierarchialViT(**{**PRESETS[name], **overrides})


def _register_with_timm() -> None:
    """Make `timm.create_model("hvit_small", ...)` work; idempotent (a reload registers nothing twice)."""
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except ImportError:  # timm is optional for the library itself
        return

    def entrypoint(name: str):
        def fn(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
            if pretrained:
                raise ValueError(f"{name} has no pretrained weights")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            model = create_model(name, **kwargs)
            # what timm.data.resolve_model_data_config reads; no weights, so only the input spec
            model.pretrained_cfg = dict(
                architecture=name, input_size=(model.in_chans, *model.img_size),
                num_classes=model.num_classes, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                interpolation="bicubic", crop_pct=0.9, first_conv="stages.0.downsample.proj",
                classifier="head",
            )
            return model

        fn.__name__ = fn.__qualname__ = name
        fn.__module__ = __name__
        fn.__doc__ = f"{name}: HierarchialViT preset {PRESETS[name]}"
        return fn

    for name in PRESETS:
        if is_model(name) and getattr(model_entrypoint(name), "__module__", None) == __name__:
            continue
        globals()[name] = register_model(entrypoint(name))


_register_with_timm()
