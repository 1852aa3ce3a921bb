"""hiertrans: hierarchical transformers for text and images.

Importing it registers the `hvit_*` presets with timm (`timm.create_model("hvit_small")`).
"""

from . import cpu_kernels
from .hierarchical_configs import (
    FEEDFORWARDS,
    TOKEN_MIXERS,
    BasicLayerConfig,
    HierarchicalConfig,
    MetaFormerBlock,
    StageConfig,
    get_hierarchical_configuration,
    metaformer_cifar_config,
    poolformer_s12_config,
    pvt_v2_b0_config,
    register_feedforward,
    register_token_mixer,
)
from .hourglass import HourglassTransformer
from .layers import Attention, FeedForward, RMSNorm, set_debug
from .lm import HierarchicalBlock, HierarchicalTransformer
from .metrics import calculate_metrics
from .protocols import CausalLM
from .reduction import HierarchicalEncoder, HierarchyReduction1d, text_boundaries
from .transformer import Transformer
from .vit import (
    PRESETS,
    HierarchialViT,
    HierarchicalStage,
    HierarchicalViT,
    MultiScaleAttention,
    PatchEmbed,
    SpatialReductionBlock,
    build_hierarchical_model,
    create_model,
    preset,
    timm_model,
)

_LAZY = {  # heavy imports (matplotlib, Lightning Fabric) only when asked for
    "visualize_attention": "visualize",
    "attention_maps": "visualize",
    "attention_figure": "visualize",
    "HViTTrainer": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hiertrans' has no attribute {name!r}")


__all__ = [
    "FEEDFORWARDS",
    "PRESETS",
    "TOKEN_MIXERS",
    "BasicLayerConfig",
    "HierarchicalConfig",
    "MetaFormerBlock",
    "StageConfig",
    "build_hierarchical_model",
    "get_hierarchical_configuration",
    "metaformer_cifar_config",
    "poolformer_s12_config",
    "pvt_v2_b0_config",
    "register_feedforward",
    "register_token_mixer",
    "Attention",
    "CausalLM",
    "FeedForward",
    "HViTTrainer",
    "HierarchialViT",
    "HierarchicalBlock",
    "HierarchicalEncoder",
    "HierarchicalStage",
    "HierarchicalTransformer",
    "HierarchicalViT",
    "HourglassTransformer",
    "HierarchyReduction1d",
    "MultiScaleAttention",
    "PatchEmbed",
    "RMSNorm",
    "SpatialReductionBlock",
    "Transformer",
    "attention_figure",
    "attention_maps",
    "calculate_metrics",
    "cpu_kernels",
    "create_model",
    "preset",
    "timm_model",
    "set_debug",
    "text_boundaries",
    "visualize_attention",
]
__version__ = "0.1.0"
