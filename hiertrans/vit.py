"""HierarchialViT: a PVT v1 style staged vision transformer (Wang et al., 2021).

Each stage embeds its input map into patches (a conv with kernel = stride = patch size: 4, 2, 2, 2
by default), adds a learned position embedding, and runs pre-norm blocks of spatial-reduction
attention (queries from every token, keys/values from a strided conv of the map) and an MLP. The
output tokens are folded back into a map for the next stage, so the network yields features at
strides 4, 8, 16 and 32 like a CNN backbone. The classifier reads a class token (added in the last
stage) or the mean of the last stage's patch tokens.

The constructor's PVT-style arguments, the presets below and config-built hierarchies
(`HierarchialViT.from_config`, `hiertrans.hierarchical_configs`) all become one list of
`hiertrans.pyramid.StageConfig`s (`model.hierarchical_config`), built by `HierarchicalStage`.
Presets register with timm (`timm.create_model("hvit_small")`) through the functions at the end.

einops notation: b batch, n tokens, c channels, h/w map height/width.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from .hierarchical_configs import HierarchicalConfig, as_hierarchical_config, check_sequence_lengths, infer_img_size
from .hub import HubMixin
from .layers import linear_drop_path_rates
from .layers.spatial import PosConv, to_map
from .pyramid import (
    HierarchicalStage,
    IntOrPair,
    MultiScaleAttention,
    PatchEmbed,
    SpatialReductionBlock,
    StageConfig,
    check_geometry,
    conv_out,
    make_token_norm,
    min_input_size,
    stage_geometry,
    to_pair,
)

__all__ = ["PRESETS", "HierarchialViT", "HierarchicalStage", "HierarchicalViT", "MultiScaleAttention",
           "PatchEmbed", "PosConv", "SpatialReductionBlock", "build_hierarchical_model", "conv_out", "create_model",
           "preset", "pretrained", "timm_model"]


def per_stage(value: Any, num_stages: int) -> tuple:
    """One value for every stage, or the per-stage values given (their count is checked by the caller)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * num_stages


def pvt_stages(embed_dims: Sequence[int], num_heads: Sequence[int], mlp_ratios: Sequence[float],
               depths: Sequence[int], sr_ratios: Sequence[int], patch_size: Sequence[int],
               patch_stride: Sequence[int], patch_padding: Sequence[int], qkv_bias: bool,
               pos_embed: Sequence[bool], pos_conv: Sequence[bool], dwconv_mlp: Sequence[bool]) -> list[StageConfig]:
    """HierarchialViT's per-stage arguments as stage descriptions (spatial-reduction attention)."""
    return [
        StageConfig(embedding=dim, token_mixer="spatial_reduction", feedforward="dwconv_mlp" if dw else "mlp",
                    patch_size=k, stride=st, padding=p, depth=depth, num_heads=heads, mlp_multiplier=mlp,
                    position_embedding="learned" if pe else "none", pos_conv=pc,
                    mixer_kwargs={"sr_ratio": sr, "qkv_bias": qkv_bias})
        for dim, heads, mlp, depth, sr, k, st, p, pe, pc, dw in zip(
            embed_dims, num_heads, mlp_ratios, depths, sr_ratios, patch_size, patch_stride, patch_padding,
            pos_embed, pos_conv, dwconv_mlp)
    ]


def init_conv_fan_out(conv: nn.Conv2d) -> None:
    """PVT v2's conv init: weights `N(0, 2 / fan_out)` (fan_out = kernel area * out channels / groups),
    zero bias."""
    fan_out = math.prod(conv.kernel_size) * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class HierarchialViT(nn.Module, HubMixin,
                     coders={HierarchicalConfig: (HierarchicalConfig.to_dict, HierarchicalConfig.from_dict)}):
    """Hierarchical (PVT v1 style) vision transformer: `(b, in_chans, H, W) -> (b, num_classes)`.

    Four stages (by default) of patch embedding + position embedding + spatial-reduction
    transformer blocks at strides 4, 8, 16, 32 (`patch_size` for the first stage, 2 after; pass a
    sequence for per-stage sizes). Stochastic depth rises linearly over all blocks. `global_pool`
    `"token"` reads a class token added in the last stage, `"avg"` averages the last stage's patch
    tokens. `img_size` sizes the position embeddings; other input sizes (non-square too) work by
    interpolating them. The geometry is checked when the model is built: a stage whose map
    vanishes or is smaller than its `sr_ratio` is a ValueError naming it.

    Beyond PVT v1: `patch_stride` / `patch_padding` per stage give overlapping patch embeddings
    (PVT v2, PoolFormer: kernel 7 stride 4 padding 2-3, then 3/2/1); `pos_embed=False` (one flag or
    one per stage) drops the learned position embeddings; `pos_conv=True` (one flag or one per
    stage) adds a conditional position encoding (a `PosConv`, PEG) after each stage's first block,
    as Twins-PCPVT does; `dwconv_mlp=True` (one flag or one per stage) gives the blocks PVT v2's
    depthwise-conv MLP; `conv_init="fan_out"` initialises every conv as PVT v2 (and ResNet) do,
    `N(0, 2 / fan_out)` with fan_out per group, instead of PyTorch's default (PVT v1's): for a 3x3
    depthwise conv a 2.5x larger weight, which short training runs notice. `hierarchy` (a
    `HierarchicalConfig` or its dict form) describes the stages instead of the per-stage
    arguments (`from_config` is the documented way).

    Shapes: `forward_features -> (b, prefix + h4*w4, embed_dims[-1])` (final-normed tokens),
    `forward_head -> (b, num_classes)` (or `(b, num_features)` with `pre_logits=True`),
    `forward_feature_maps -> [(b, embed_dims[i], h_i, w_i)]`.

    Weights: `model.save_pretrained(dir)` / `HierarchialViT.from_pretrained(dir)` (`hiertrans.hub`),
    for every way of building one (arguments, presets, configs); `pretrained(dir, num_classes=...)`
    loads them for fine-tuning with a new head.
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
        conv_init: str = "pytorch",
        hierarchy: HierarchicalConfig | dict[str, Any] | None = None,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if conv_init not in ("pytorch", "fan_out"):
            raise ValueError(f"conv_init must be 'pytorch' or 'fan_out', got {conv_init!r}")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
        if hierarchy is None:
            hierarchy = HierarchicalConfig(self._pvt_stages(
                embed_dims, num_heads, mlp_ratios, depths, sr_ratios, patch_size, patch_stride, patch_padding,
                qkv_bias, pos_embed, pos_conv, dwconv_mlp), in_channels=in_chans)
        else:
            hierarchy = as_hierarchical_config(hierarchy)
            if in_chans != hierarchy.in_channels:
                raise ValueError(f"in_chans={in_chans} but the hierarchy has in_channels={hierarchy.in_channels}; "
                                 f"make them equal")
        stages = hierarchy.stages
        self.hierarchical_config = hierarchy
        self.img_size = to_pair(img_size, "img_size")
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, global_pool
        self.embed_dims = tuple(s.embedding for s in stages)
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.num_prefix_tokens = int(global_pool == "token")
        self.patch_sizes = tuple(s.patch_size for s in stages)
        self.patch_strides = tuple(s.stride for s in stages)
        self.patch_paddings = tuple(s.padding for s in stages)
        self.sr_ratios = tuple(s.sr_ratio for s in stages)
        self.min_input_size = min_input_size(stages)
        check_geometry(stages, self.img_size)
        check_sequence_lengths(hierarchy, self.img_size)
        self._warn_single_keys()

        depths = [s.depth for s in stages]
        rates = linear_drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        chans, reduction = in_chans, 1
        for i, (s, (size, _)) in enumerate(zip(stages, stage_geometry(stages, self.img_size))):
            last = i == len(stages) - 1
            self.stages.append(HierarchicalStage.from_config(
                s, in_chans=chans, input_size=size, index=i, drop_path=rates[sum(depths[:i]): sum(depths[: i + 1])],
                cls_token=self.num_prefix_tokens > 0 and last, norm_eps=norm_eps, drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate, residual_norm_style=hierarchy.residual_norm_style,
                layer_scale_init=hierarchy.layer_scale_init,
                # PVT v2 norms every stage's output; the last one's is the model's final norm
                out_norm=make_token_norm(s.normalization, s.embedding, norm_eps)
                if hierarchy.stage_norms and not last else None,
            ))
            chans, reduction = s.embedding, reduction * s.stride
            self.feature_info.append(dict(num_chs=chans, reduction=reduction, module=f"stages.{i}"))
        self.norm = make_token_norm(hierarchy.final_normalization, self.num_features, norm_eps)
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

    @staticmethod
    def _pvt_stages(embed_dims, num_heads, mlp_ratios, depths, sr_ratios, patch_size, patch_stride, patch_padding,
                    qkv_bias, pos_embed, pos_conv, dwconv_mlp) -> list[StageConfig]:
        """The per-stage arguments as stage descriptions, each list checked against `embed_dims`."""
        n = len(embed_dims)
        if n < 1:
            raise ValueError("embed_dims must name at least one stage")
        if isinstance(patch_size, int):
            patch_size = (patch_size,) + (2,) * (n - 1)
        per = dict(num_heads=num_heads, mlp_ratios=mlp_ratios, depths=depths, sr_ratios=sr_ratios,
                   patch_size=patch_size, patch_stride=patch_size if patch_stride is None else patch_stride,
                   patch_padding=(0,) * n if patch_padding is None else patch_padding,
                   pos_embed=per_stage(pos_embed, n), pos_conv=per_stage(pos_conv, n),
                   dwconv_mlp=per_stage(dwconv_mlp, n))
        for name, values in per.items():
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but embed_dims defines {n} stages; give one "
                                 f"entry per stage")
        for i, (dim, heads, depth) in enumerate(zip(embed_dims, num_heads, depths)):
            if heads < 1 or dim % heads:
                raise ValueError(f"stage {i}: embed_dim {dim} is not divisible by num_heads {heads}")
            if depth < 1:
                raise ValueError(f"stage {i}: depth must be >= 1, got {depth}")
        return pvt_stages(embed_dims, qkv_bias=qkv_bias, **{k: tuple(v) for k, v in per.items()})

    def _warn_single_keys(self) -> None:
        """Warn about stages whose spatial reduction leaves a single key/value token at `img_size`."""
        for i, (s, (_, g)) in enumerate(zip(self.hierarchical_config.stages,
                                            stage_geometry(self.hierarchical_config.stages, self.img_size))):
            sr = s.sr_ratio
            if sr > 1 and (g[0] // sr) * (g[1] // sr) == 1:
                warnings.warn(f"stage {i}: sr_ratio {sr} reduces its {g[0]}x{g[1]} feature map to a single key/value "
                              f"token, so attention cannot tell positions apart; use sr_ratio <= "
                              f"{max(1, min(g) // 2)} or a larger img_size / smaller patch_size", stacklevel=3)

    @classmethod
    def from_config(cls, config: Any, num_classes: int = 1000, img_size: IntOrPair | None = None,
                    in_chans: int | None = None, **kwargs: Any) -> HierarchialViT:
        """A model from a hierarchy config (`hiertrans.hierarchical_configs`): a `HierarchicalConfig`,
        its dict/YAML form, or a list of `BasicLayerConfig`s / `StageConfig`s. `img_size` defaults
        to the one implied by stage 0's `seq_len`; every stage's `seq_len` is checked against it.
        Other keywords (`drop_path_rate`, `drop_rate`, `norm_eps`, ...) go to the constructor.
        Mean pooling only: the pooling / conv mixers have no place for a class token."""
        config = as_hierarchical_config(config)
        if kwargs.get("global_pool", "avg") != "avg":
            raise ValueError(f"config-built models pool by the mean of the last stage (global_pool='avg'), got "
                             f"{kwargs['global_pool']!r}")
        if in_chans is not None and in_chans != config.in_channels:
            raise ValueError(f"in_chans={in_chans} but the hierarchy has in_channels={config.in_channels}; "
                             f"make them equal")
        return cls(img_size=infer_img_size(config) if img_size is None else img_size, in_chans=config.in_channels,
                   num_classes=num_classes, hierarchy=config, **{**kwargs, "global_pool": "avg"})

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
        if min(x.shape[-2:]) < self.min_input_size:  # the stage-by-stage walk only to name the culprit
            check_geometry(self.hierarchical_config.stages, tuple(x.shape[-2:]), what="input")

    def _forward_stages(self, x: Tensor, keep: Sequence[int] = (), stop: int | None = None,
                        nhwc: bool = False, norm_last: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Run the stages (up to `stop`), each on the previous one's map: the last tokens and the
        maps `(b, c, h, w)` (or `(b, h, w, c)`) of the stages in `keep` (the last one final-normed
        with `norm_last`)."""
        self._check_input(x)
        maps = []
        for i, stage in enumerate(self.stages[:stop]):
            tokens, (h, w) = stage(x)
            patches = tokens[:, stage.num_prefix_tokens :]
            x = to_map(patches, h, w)  # a view
            if i in keep:
                if norm_last and i == len(self.stages) - 1:
                    patches = self.norm(patches)
                pattern = "b (h w) c -> b h w c" if nhwc else "b (h w) c -> b c h w"
                maps.append(rearrange(patches, pattern, h=h, w=w))
        return tokens, maps

    def forward_features(self, x: Tensor) -> Tensor:
        """`(b, in_chans, H, W) -> (b, prefix + h*w, num_features)`: last stage's normed tokens."""
        return self.norm(self._forward_stages(x)[0])

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
        tokens, maps = self._forward_stages(x, keep=take, stop=stop, nhwc=output_fmt == "NHWC", norm_last=norm)
        if intermediates_only:
            return maps
        return self.norm(tokens), maps

    def forward_feature_maps(self, x: Tensor) -> list[Tensor]:
        """All stages' feature maps `[(b, embed_dims[i], h_i, w_i)]`, strides 4, 8, 16, 32 by default."""
        return self.forward_intermediates(x, intermediates_only=True)


HierarchicalViT = HierarchialViT  # the seed's spelling is kept as the primary name


def build_hierarchical_model(hierarchy: Any, num_classes: int = 1000, img_size: int | None = None,
                             in_chans: int | None = None, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                             norm_eps: float = 1e-6) -> HierarchialViT:
    """`HierarchialViT.from_config` as a function with its settings spelled out: the `net` class path
    `hiertrans.build_hierarchical_model` of the configs, `hierarchy` in the dict/YAML form of
    `hiertrans.hierarchical_configs` (`layers:` or `stages:`)."""
    return HierarchialViT.from_config(hierarchy, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                                      drop_path_rate=drop_path_rate, drop_rate=drop_rate, norm_eps=norm_eps)


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
    # b0's 3.41M at 10 classes. Mean pooling, as b0: a class token would only double the 1x1 last
    # stage's tokens. Speed and accuracy against pvt_v2_b0: docs/benchmarks.md.
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


def preset(name: str, num_classes: int | None = None, img_size: int | None = None, in_chans: int | None = None,
           drop_path_rate: float = 0.0, drop_rate: float = 0.0,
           overrides: dict[str, Any] | None = None) -> HierarchialViT:
    """A preset by name with the settings a config usually changes spelled out (the `net` class path
    `hiertrans.vit.preset` in configs); None keeps the preset's value; `overrides` sets any other
    constructor argument (e.g. `{depths: [1, 1, 2, 1]}`)."""
    given = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    return create_model(name, drop_path_rate=drop_path_rate, drop_rate=drop_rate,
                        **{k: v for k, v in given.items() if v is not None}, **(overrides or {}))


def timm_model(name: str, num_classes: int = 1000, img_size: int | None = None, in_chans: int = 3,
               drop_path_rate: float = 0.0, drop_rate: float = 0.0, pretrained: bool = False,
               kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Any model timm knows by name (`pvt_v2_b0`, `resnet18`, and the `hvit_*` presets), for configs
    (`hiertrans.vit.timm_model`). `img_size` is passed only to models that take it (ViTs);
    convolutional and size-agnostic models (pvt_v2) do without. `kwargs`: further timm arguments."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() (hiertrans presets: "
                         f"{', '.join(PRESETS)})")
    args = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                drop_rate=drop_rate, **(kwargs or {}))
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **args)
        except TypeError as exc:  # size-agnostic models take no img_size
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **args)


def pretrained(path: str, num_classes: int | None = None, drop_path_rate: float | None = None,
               drop_rate: float | None = None) -> HierarchialViT:
    """Weights written by `save_pretrained` (or `python -m hiertrans export`) for fine-tuning: the
    saved model in training mode, with a fresh head when `num_classes` differs from the saved one,
    and stochastic depth / dropout set anew when given (the `net` class path
    `hiertrans.vit.pretrained` in configs)."""
    overrides = {k: v for k, v in (("drop_path_rate", drop_path_rate), ("drop_rate", drop_rate)) if v is not None}
    model = HierarchialViT.from_pretrained(path, **overrides)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model.train()


# --- timm registration: `timm.create_model("hvit_small", num_classes=10)` ---------------------------

def _pretrained_cfg(name: str) -> dict[str, Any]:
    """What `timm.data.resolve_model_data_config` reads (input size, normalisation) and where
    `load_pretrained` finds the stem and the head. No weights are hosted: a user's own come in through
    `pretrained_cfg_overlay=dict(file=...)`: a `.safetensors`/`.pth` file, or with `source="local-dir"`
    a `save_pretrained` folder."""
    model_args = PRESETS[name]
    size = model_args.get("img_size", 224)
    return dict(input_size=(model_args.get("in_chans", 3), size, size), num_classes=model_args.get("num_classes", 1000),
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.9,
                first_conv="stages.0.downsample.proj", classifier="head", license="apache-2.0")


# timm's register_model picks up this module's `default_cfgs`, one per preset
default_cfgs = generate_default_cfgs({name: _pretrained_cfg(name) for name in PRESETS})


def _timm_model(name: str, pretrained: bool, **kwargs: Any) -> HierarchialViT:
    """A preset through timm's builder: `pretrained=True` loads the weights `pretrained_cfg_overlay`
    points at, with timm's head reset when `num_classes` differs and stem adaptation for `in_chans`."""
    sources = ("file", "state_dict", "hf_hub_id", "url")
    given = {**(kwargs.get("pretrained_cfg") or {}), **(kwargs.get("pretrained_cfg_overlay") or {})}
    if pretrained and not any(given.get(key) for key in sources):
        raise ValueError(f"{name} has no hosted pretrained weights: with pretrained=True pass your own through "
                         f"pretrained_cfg_overlay=dict(file='model.safetensors') or dict(source='local-dir', "
                         f"file='a save_pretrained folder')")
    return build_model_with_cfg(HierarchialViT, name, pretrained, **{**PRESETS[name], **kwargs})


@register_model
def hvit_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
    """PVT v1 Tiny: depths 2-2-2-2, 13.23M parameters at 224 px and 1000 classes."""
    return _timm_model("hvit_tiny", pretrained, **kwargs)


@register_model
def hvit_small(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
    """PVT v1 Small: depths 3-4-6-3, 24.49M parameters."""
    return _timm_model("hvit_small", pretrained, **kwargs)


@register_model
def hvit_medium(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
    """PVT v1 Medium: depths 3-4-18-3, 44.21M parameters."""
    return _timm_model("hvit_medium", pretrained, **kwargs)


@register_model
def hvit_large(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
    """PVT v1 Large: depths 3-8-27-3, 61.37M parameters."""
    return _timm_model("hvit_large", pretrained, **kwargs)


@register_model
def hvit_cifar(pretrained: bool = False, **kwargs: Any) -> HierarchialViT:
    """The 32 px preset (3.62M parameters at 10 classes), see `PRESETS`."""
    return _timm_model("hvit_cifar", pretrained, **kwargs)
