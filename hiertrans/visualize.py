"""Attention maps of a HierarchialViT: which part of each stage's (spatially reduced) key grid one
query looks at, as tensors, as a matplotlib figure (for TensorBoard) or as a PNG file.

No pyplot: figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas, so nothing here
touches matplotlib's global state or needs a display.
"""

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from .io import atomic_write
from .layers import attention_probs
from .pyramid import MultiScaleAttention
from .vit import HierarchialViT

__all__ = ["attention_figure", "attention_maps", "visualize_attention"]


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList) or not all(
        hasattr(s, "blocks") and isinstance(s.blocks[-1].attn, MultiScaleAttention) for s in stages
    ):
        raise TypeError(f"expected a HierarchialViT (stages of MultiScaleAttention blocks), got "
                        f"{type(model).__name__}")
    return model


def _as_batch(model: nn.Module, image: Tensor) -> Tensor:
    """`(C, H, W)` or `(1, C, H, W)` -> `(1, C, H, W)` on the model's device and dtype."""
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a tensor, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    in_chans = getattr(model, "in_chans", image.shape[0] if image.ndim == 3 else None)
    if image.ndim != 3 or image.shape[0] != in_chans:
        raise ValueError(f"image must have shape ({in_chans}, H, W) or (1, {in_chans}, H, W), got "
                         f"{tuple(image.shape)}")
    param = next(model.parameters())
    return image[None].to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def attention_maps(model: HierarchialViT, image: Tensor) -> list[Tensor]:
    """Per stage, the attention of one query over the stage's key grid in its last block.

    The query is the class token in the stage that has one, else the centre patch. Each map is
    `(h_i // sr_i, w_i // sr_i)` (float32, CPU), averaged over heads; a class token's attention to
    itself is left out, so that stage's map sums to slightly less than 1.
    """
    model = _unwrap(model)
    batch = _as_batch(model, image)
    captured: dict[int, tuple[Tensor, int, int]] = {}

    def capture(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[index] = args[:3]

        return hook

    attns = [stage.blocks[-1].attn for stage in model.stages]
    handles = [attn.register_forward_pre_hook(capture(i)) for i, attn in enumerate(attns)]
    was_training = model.training
    try:
        model.eval()
        model.forward_features(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    maps = []
    for i, attn in enumerate(attns):
        x, h, w = captured[i]
        prefix = x.shape[1] - h * w
        query = 0 if prefix else prefix + (h // 2) * w + w // 2
        q, k, _ = attn.project(x, h, w)
        probs = attention_probs(q[:, :, query : query + 1], k)  # (1, heads, 1, prefix + kh * kw)
        kh, kw = attn.key_grid(h, w)
        maps.append(probs[0, :, 0, prefix:].mean(dim=0).reshape(kh, kw).float().cpu())
    return maps


def _displayable(image: Tensor) -> Tensor:
    """`(C, H, W)` -> `(H, W, 3)` in [0, 1] (min-max normalised; one channel as grey, others averaged)."""
    image = image.detach().float().cpu()
    image = image if image.shape[0] == 3 else image.mean(dim=0, keepdim=True).expand(3, -1, -1)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
    return image.permute(1, 2, 0)


def attention_figure(model: HierarchialViT, image: Tensor, panel_inches: float = 2.0) -> Figure:
    """The image and, per stage, its attention map (`attention_maps`) upsampled over the image."""
    model = _unwrap(model)
    batch = _as_batch(model, image)
    maps = attention_maps(model, batch)
    shown = _displayable(batch[0])
    size = shown.shape[:2]

    fig = Figure(figsize=(panel_inches * (len(maps) + 1), panel_inches * 1.1), dpi=80)
    FigureCanvasAgg(fig)  # attach the Agg canvas: savefig/draw never consult pyplot's backend
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(shown.numpy())
    axes[0].set_title("input", fontsize=8)
    for i, (ax, amap) in enumerate(zip(axes[1:], maps)):
        query = "cls" if model.stages[i].num_prefix_tokens else "centre"
        overlay = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(shown.numpy())
        ax.imshow(overlay.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(f"stage {i} ({query}, {amap.shape[0]}x{amap.shape[1]} keys)", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def visualize_attention(model: HierarchialViT, image: Tensor, save_path: str) -> None:
    """Write `attention_figure(model, image)` to `save_path` as a PNG.

    `image`: `(C, H, W)` or `(1, C, H, W)`, normalised or not. Missing parent directories are
    created; the file appears atomically (written next to it, then renamed), so a failure never
    leaves a half-written PNG behind.
    """
    fig = attention_figure(model, image)
    with atomic_write(save_path, "wb") as f:
        fig.savefig(f, format="png")
