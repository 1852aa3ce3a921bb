"""Config-built hierarchical vision transformers: the maintained successor of xformers'
`BasicLayerConfig` / `get_hierarchical_configuration` helper (removed from xformers in 0.0.29).

A hierarchy is a list of stages. Each stage embeds its input map into patches (a conv with
`patch_size`, `stride`, `padding`), so the sequence length shrinks while the embedding grows,
then runs `repeat_layer` MetaFormer blocks: `x + TokenMixer(Norm(x))`, `x + FeedForward(Norm(x))`
(pre-norm; or post-norm). The token mixer and the feed-forward are chosen by name from
registries that users can extend:

    token mixers    scaled_dot_product  full multi-head attention (on `hiertrans.layers.attend`)
                    spatial_reduction   PVT attention: keys/values from the map pooled by a strided
                                        conv (`mixer_kwargs: {sr_ratio: 8}`)
                    local               attention inside non-overlapping 2-D windows of the map
                                        (`mixer_kwargs: {window_size: 7}`; Swin without the shift)
                    pooling             PoolFormer: AvgPool2d(3, 1, 1, count_include_pad=False)(x) - x
    feed-forwards   mlp                 fc1 -> GELU -> fc2 (`hiertrans.layers.FeedForward`)
                    dwconv_mlp          PVT v2: fc1 -> 3x3 depthwise conv -> GELU -> fc2

Names are case-insensitive ("MLP" as in the seed works). Position information: `rotary` is a
2-D axial rotary embedding applied to queries and keys of the attention mixers (rows on half of
each head's features, columns on the other half; pooled keys sit at the centres of their cells);
`learned` is the PVT v1 learned table added after the patch embedding (resized for other input
sizes); `none` relies on the convolutions (PoolFormer, PVT v2). `use_rotary_embeddings=True`
gives `rotary` to attention stages and `learned` to the others.

    layers = [BasicLayerConfig(embedding=64, attention_mechanism="scaled_dot_product", patch_size=7,
                               stride=4, padding=2, seq_len=56 * 56, feedforward="MLP"), ...]
    config = get_hierarchical_configuration(layers, use_rotary_embeddings=False, dim_head=32)
    model = HierarchialViT.from_config(config, num_classes=10)        # img_size inferred: 224
    yaml_text = config.to_yaml(); HierarchicalConfig.from_yaml(yaml_text) == config

(`HierarchialViT.from_config` takes the place of the seed's `xFormerConfig(...)` / `xFormer`.)
Norms per stage: `layernorm`, `rmsnorm` or `groupnorm` (one group, PoolFormer); optional layer
scale (`layer_scale_init`). The built model is a `HierarchialViT` (same stage machinery,
`forward_features`, `forward_feature_maps`, `forward_intermediates`, `reset_classifier`, ...),
pooled by the mean of the last stage's tokens. `poolformer_s12_config()` and `pvt_v2_b0_config()`
match timm's `poolformer_s12` / `pvt_v2_b0` in parameter count (within 0.02%) and output shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pyramid import (
    FEEDFORWARDS,
    NORMALIZATIONS,
    POSITION_EMBEDDINGS,
    RESIDUAL_NORM_STYLES,
    TOKEN_MIXERS,
    AttentionMixer,
    LocalWindowAttention,
    MetaFormerBlock,
    StageConfig,
    check_geometry,
    is_attention_mixer,
    lookup,
    make_feedforward,
    make_token_mixer,
    make_token_norm,
    register_feedforward,
    register_token_mixer,
    stage_geometry,
)

__all__ = [  # the registries, mixers and the block live in hiertrans.pyramid; re-exported here
    "FEEDFORWARDS",
    "NORMALIZATIONS",
    "POSITION_EMBEDDINGS",
    "TOKEN_MIXERS",
    "AttentionMixer",
    "BasicLayerConfig",
    "HierarchicalConfig",
    "LocalWindowAttention",
    "MetaFormerBlock",
    "StageConfig",
    "as_hierarchical_config",
    "check_sequence_lengths",
    "get_hierarchical_configuration",
    "infer_img_size",
    "is_attention_mixer",
    "make_feedforward",
    "make_token_mixer",
    "make_token_norm",
    "metaformer_cifar_config",
    "poolformer_s12_config",
    "pvt_v2_b0_config",
    "register_feedforward",
    "register_token_mixer",
    "stage_grids",
    "validate_config",
]


# --- configs ---------------------------------------------------------------------------------------------

@dataclass
class BasicLayerConfig:
    """One stage as the user writes it (xformers' fields; the extras are optional).

    `seq_len` is the stage's token count (`h * w` after its patch embedding) for the image size
    the model is built for, checked at build time (None: not checked). `repeat_layer` is the
    stage's depth. Extras: `num_heads` (default `embedding // dim_head`, or 1 without dim_head),
    `mlp_multiplier` (default: the global one), `mixer_kwargs` (e.g. `{"sr_ratio": 8}`),
    `position_embedding` (`learned` / `rotary` / `none`; default from `use_rotary_embeddings`).
    """

    embedding: int
    attention_mechanism: str
    patch_size: int
    stride: int
    padding: int
    seq_len: int | None
    feedforward: str
    normalization: str = "layernorm"
    repeat_layer: int = 1
    num_heads: int | None = None
    mlp_multiplier: float | None = None
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    position_embedding: str | None = None


@dataclass
class HierarchicalConfig:
    """A whole hierarchy as plain data (YAML/JSON-able through `to_dict` / `from_dict`).

    `stages` in order; `in_channels` of the images; `residual_norm_style` `pre` or `post`;
    `layer_scale_init` (None: no layer scale; PoolFormer 1e-5); `final_normalization` before the head;
    `stage_norms`: also normalise the output of every other stage (PVT v2), with each stage's norm.
    """

    stages: list[StageConfig]
    in_channels: int = 3
    residual_norm_style: str = "pre"
    layer_scale_init: float | None = None
    final_normalization: str = "layernorm"
    stage_norms: bool = False

    # list-like over the stages, as xformers' helper returned a list of per-stage configs
    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> StageConfig:
        return self.stages[index]

    def __iter__(self):
        return iter(self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HierarchicalConfig:
        """From `to_dict` output (`stages: [...]`), or from the short form `layers: [BasicLayerConfig
        fields...]` plus `get_hierarchical_configuration` keywords."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a hierarchy must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if "layers" in data:
            if "stages" in data:
                raise ValueError("give either 'stages' (full form) or 'layers' (short form), not both")
            layers = [_from_mapping(BasicLayerConfig, layer, f"layers[{i}]")
                      for i, layer in enumerate(_as_list(data.pop("layers"), "layers"))]
            _check_keys(data, _GET_CONFIG_KEYS, "hierarchy (short form)")
            return get_hierarchical_configuration(layers, **data)
        if "stages" not in data:
            raise ValueError("a hierarchy needs 'stages' (a list of stage mappings) or 'layers' "
                             "(BasicLayerConfig mappings)")
        stages = [_from_mapping(StageConfig, stage, f"stages[{i}]")
                  for i, stage in enumerate(_as_list(data.pop("stages"), "stages"))]
        _check_keys(data, {f.name for f in dataclasses.fields(cls)} - {"stages"}, "hierarchy")
        config = cls(stages=stages, **data)
        validate_config(config)
        return config

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> HierarchicalConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text))


_GET_CONFIG_KEYS = {"residual_norm_style", "use_rotary_embeddings", "mlp_multiplier", "in_channels", "dim_head",
                    "layer_scale_init", "final_normalization", "stage_norms"}


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list, got {value!r}")
    return list(value)


def _check_keys(data: Mapping[str, Any], valid: set[str], what: str) -> None:
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; valid keys: {', '.join(sorted(valid))}")


def _from_mapping(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{where} must be a mapping of {cls.__name__} fields, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    _check_keys(value, fields, where)
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(value))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    return cls(**value)


def get_hierarchical_configuration(
    layer_base_configs: Sequence[BasicLayerConfig],
    residual_norm_style: str = "pre",
    use_rotary_embeddings: bool = True,
    mlp_multiplier: float = 4,
    in_channels: int = 3,
    dim_head: int | None = None,
    *,
    layer_scale_init: float | None = None,
    final_normalization: str = "layernorm",
    stage_norms: bool = False,
) -> HierarchicalConfig:
    """Fill in the gaps of `BasicLayerConfig`s: a validated `HierarchicalConfig`.

    Heads per stage: `embedding // dim_head` (ValueError when it does not divide), 1 without
    `dim_head` (as xformers). Position: `rotary` on attention mixers with
    `use_rotary_embeddings`, `learned` otherwise (a layer's `position_embedding` wins).
    """
    layers = _as_list(layer_base_configs, "layer_base_configs")
    if dim_head is not None and (not isinstance(dim_head, int) or dim_head < 1):
        raise ValueError(f"dim_head must be an int >= 1 or None, got {dim_head!r}")
    stages = []
    for i, layer in enumerate(layers):
        layer = _from_mapping(BasicLayerConfig, layer, f"layer {i}")
        if layer.num_heads is not None:
            heads = layer.num_heads
        elif dim_head is not None:
            if layer.embedding % dim_head:
                raise ValueError(f"stage {i}: embedding {layer.embedding} is not divisible by dim_head "
                                 f"{dim_head}; use a dim_head that divides every embedding (e.g. "
                                 f"{math.gcd(*(lay.embedding for lay in layers))}) or set num_heads")
            heads = layer.embedding // dim_head
        else:
            heads = 1
        position = layer.position_embedding
        if position is None:
            rotary = use_rotary_embeddings and is_attention_mixer(layer.attention_mechanism)
            position = "rotary" if rotary else "learned"
        stages.append(StageConfig(
            embedding=layer.embedding, token_mixer=layer.attention_mechanism, feedforward=layer.feedforward,
            patch_size=layer.patch_size, stride=layer.stride, padding=layer.padding, seq_len=layer.seq_len,
            depth=layer.repeat_layer, num_heads=heads,
            mlp_multiplier=mlp_multiplier if layer.mlp_multiplier is None else layer.mlp_multiplier,
            normalization=layer.normalization, position_embedding=position,
            mixer_kwargs=_mixer_kwargs(layer.mixer_kwargs, i),
        ))
    config = HierarchicalConfig(stages, in_channels=in_channels, residual_norm_style=residual_norm_style,
                                layer_scale_init=layer_scale_init, final_normalization=final_normalization,
                                stage_norms=stage_norms)
    validate_config(config)
    return config


def _mixer_kwargs(value: Any, index: int) -> dict[str, Any]:
    if value is None:  # YAML `mixer_kwargs: null`
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"stage {index}: mixer_kwargs must be a mapping such as {{sr_ratio: 2}}, got {value!r}")
    return dict(value)


def as_hierarchical_config(config: Any) -> HierarchicalConfig:
    """A `HierarchicalConfig` from itself, its `to_dict` form (or the short `layers:` form), or a
    list of `StageConfig`s / `BasicLayerConfig`s (the latter through `get_hierarchical_configuration`)."""
    if isinstance(config, HierarchicalConfig):
        validate_config(config)
        return config
    if isinstance(config, Mapping):
        return HierarchicalConfig.from_dict(config)
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)) and config:
        if all(isinstance(s, BasicLayerConfig) for s in config):
            return get_hierarchical_configuration(config)
        if all(isinstance(s, StageConfig) for s in config):
            return as_hierarchical_config(HierarchicalConfig(list(config)))
    raise TypeError(f"expected a HierarchicalConfig, its dict form, or a list of StageConfig / BasicLayerConfig, "
                    f"got {type(config).__name__}")


def _positive_int(value: Any, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def validate_config(config: HierarchicalConfig) -> None:
    """Image-size independent checks; ValueErrors name the stage, the bad value and what is valid."""
    if not config.stages:
        raise ValueError("a hierarchy needs at least one stage")
    _positive_int(config.in_channels, "in_channels")
    if config.residual_norm_style not in RESIDUAL_NORM_STYLES:
        raise ValueError(f"residual_norm_style must be one of {RESIDUAL_NORM_STYLES}, got "
                         f"{config.residual_norm_style!r}")
    make_token_norm(config.final_normalization, 1)  # raises for unknown names
    for i, s in enumerate(config.stages):
        for name in ("embedding", "patch_size", "stride", "depth", "num_heads"):
            _positive_int(getattr(s, name), f"stage {i}: {name}")
        _positive_int(s.padding, f"stage {i}: padding", minimum=0)
        if s.seq_len is not None:
            _positive_int(s.seq_len, f"stage {i}: seq_len")
        if s.embedding % s.num_heads:
            raise ValueError(f"stage {i}: embedding {s.embedding} is not divisible by num_heads {s.num_heads}")
        if not s.mlp_multiplier > 0:
            raise ValueError(f"stage {i}: mlp_multiplier must be > 0, got {s.mlp_multiplier!r}")
        attention = is_attention_mixer(s.token_mixer)
        lookup(FEEDFORWARDS, "feedforward", s.feedforward)
        if not isinstance(s.normalization, str) or s.normalization.lower() not in NORMALIZATIONS:
            raise ValueError(f"stage {i}: unknown normalization {s.normalization!r}; known: "
                             f"{', '.join(NORMALIZATIONS)}")
        if s.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"stage {i}: position_embedding must be one of {POSITION_EMBEDDINGS}, got "
                             f"{s.position_embedding!r}")
        if s.position_embedding == "rotary":
            head = s.embedding // s.num_heads
            if not attention:
                raise ValueError(f"stage {i}: rotary position embeddings need an attention mixer, not "
                                 f"{s.token_mixer!r}; use position_embedding 'learned' or 'none'")
            if head % 4:
                raise ValueError(f"stage {i}: 2-D rotary embeddings need a head dim divisible by 4, got "
                                 f"{s.embedding} / {s.num_heads} heads = {head}")
        if not isinstance(s.pos_conv, bool):
            raise ValueError(f"stage {i}: pos_conv must be true or false, got {s.pos_conv!r}")
        if not isinstance(s.mixer_kwargs, Mapping):
            raise ValueError(f"stage {i}: mixer_kwargs must be a mapping, got {s.mixer_kwargs!r}")
        _positive_int(s.sr_ratio, f"stage {i}: sr_ratio")


def stage_grids(config: HierarchicalConfig, img_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """Each stage's token grid `(h, w)` for an `img_size` input; a ValueError naming the stage when a
    map vanishes or is smaller than its sr_ratio (`hiertrans.pyramid.check_geometry`)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    check_geometry(config.stages, size)
    return [grid for _, grid in stage_geometry(config.stages, size)]


def check_sequence_lengths(config: HierarchicalConfig, img_size: int | Sequence[int]) -> None:
    """ValueError when a stage's `seq_len` is not what `img_size`, the strides and paddings give
    (for a geometry `check_geometry` accepted)."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    image = f"{size[0]}x{size[1]}"
    for i, (s, (in_size, grid)) in enumerate(zip(config.stages, stage_geometry(config.stages, size))):
        if s.seq_len is not None and s.seq_len != grid[0] * grid[1]:
            source = (f"a {image} input" if i == 0 else
                      f"its {in_size[0]}x{in_size[1]} input map (from a {image} image)")
            raise ValueError(f"stage {i}: seq_len={s.seq_len} but {source} with patch {s.patch_size} stride "
                             f"{s.stride} padding {s.padding} gives {grid[0]}x{grid[1]}={grid[0] * grid[1]} tokens")


def infer_img_size(config: HierarchicalConfig) -> int:
    """The square image side implied by the first stage's `seq_len` (its grid side times its stride)."""
    seq_len = config.stages[0].seq_len
    side = math.isqrt(seq_len) if seq_len else 0
    if not seq_len or side * side != seq_len:
        raise ValueError(f"cannot infer img_size from stage 0's seq_len={seq_len!r} (needs a square number "
                         f"of tokens); pass img_size")
    return side * config.stages[0].stride


# --- named configurations ---------------------------------------------------------------------------

def poolformer_s12_config(img_size: int = 224) -> HierarchicalConfig:
    """PoolFormer-S12 (Yu et al., 2022): depths 2/2/6/2, dims 64/128/320/512, pooling mixer, MLP x4,
    GroupNorm(1), layer scale 1e-5, patch 7/3/3/3 stride 4/2/2/2 padding 2/1/1/1, no position
    embedding. 11.92M parameters at 1000 classes, like `timm.create_model("poolformer_s12")`
    (ours adds a LayerNorm to each patch embedding: +2k)."""
    return _four_stages(img_size, dims=(64, 128, 320, 512), depths=(2, 2, 6, 2), mixer="pooling",
                        feedforward="mlp", mlp=(4, 4, 4, 4), heads=(1, 1, 1, 1), padding=(2, 1, 1, 1),
                        normalization="groupnorm", layer_scale_init=1e-5)


def pvt_v2_b0_config(img_size: int = 224) -> HierarchicalConfig:
    """PVT v2-b0 (Wang et al., 2022): dims 32/64/160/256, heads 1/2/5/8, depths 2/2/2/2, spatial
    reduction 8/4/2/1, depthwise-conv MLP x8/8/4/4, overlapping patch embeds 7/3/3/3 (stride
    4/2/2/2, padding 3/1/1/1), no position embedding, a LayerNorm on every stage's output: the same
    3,666,760 parameters as `timm.create_model("pvt_v2_b0")` at 1000 classes, and the same function
    (timm's weights load with a renaming of keys, see the tests)."""
    return _four_stages(img_size, dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mixer="spatial_reduction",
                        feedforward="dwconv_mlp", mlp=(8, 8, 4, 4), heads=(1, 2, 5, 8), padding=(3, 1, 1, 1),
                        sr=(8, 4, 2, 1), stage_norms=True)


def metaformer_cifar_config(img_size: int = 32) -> HierarchicalConfig:
    """A small PoolFormer/PVT v2 hybrid for 32 px images (maps 8, 4, 2, 1; the hierarchy of
    `configs/metaformer_cifar10.yaml`): pooling mixers and depthwise-conv MLPs in the two early
    stages (position from the convs), full attention with 2-D rotary embeddings in the two late
    ones, PVT v2-b0 widths; 2.86M parameters at 10 classes."""
    layers = [
        BasicLayerConfig(32, "pooling", 7, 4, 3, None, "dwconv_mlp", repeat_layer=2, mlp_multiplier=8,
                         position_embedding="none"),
        BasicLayerConfig(64, "pooling", 3, 2, 1, None, "dwconv_mlp", repeat_layer=2, mlp_multiplier=8,
                         position_embedding="none"),
        BasicLayerConfig(160, "scaled_dot_product", 3, 2, 1, None, "mlp", repeat_layer=2),
        BasicLayerConfig(256, "scaled_dot_product", 3, 2, 1, None, "mlp", repeat_layer=2),
    ]
    config = get_hierarchical_configuration(layers, use_rotary_embeddings=True, dim_head=32)
    for stage, grid in zip(config.stages, stage_grids(config, img_size)):
        stage.seq_len = grid[0] * grid[1]
    return config


def _four_stages(img_size: int, *, dims, depths, mixer, feedforward, mlp, heads, padding, sr=(1, 1, 1, 1),
                 normalization="layernorm", layer_scale_init=None, stage_norms=False) -> HierarchicalConfig:
    stages = [
        StageConfig(embedding=d, token_mixer=mixer, feedforward=feedforward, patch_size=k, stride=st,
                    padding=p, depth=n, num_heads=h, mlp_multiplier=m, normalization=normalization,
                    position_embedding="none", mixer_kwargs={"sr_ratio": r} if mixer == "spatial_reduction" else {})
        for d, n, m, h, k, st, p, r in zip(dims, depths, mlp, heads, (7, 3, 3, 3), (4, 2, 2, 2), padding, sr)
    ]
    config = HierarchicalConfig(stages, layer_scale_init=layer_scale_init, stage_norms=stage_norms)
    for stage, grid in zip(config.stages, stage_grids(config, img_size)):
        stage.seq_len = grid[0] * grid[1]
    validate_config(config)
    return config
