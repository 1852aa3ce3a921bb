import os

import pytest
import torch
from matplotlib.figure import Figure

from hiertrans.visualize import attention_figure, attention_maps, visualize_attention
from hiertrans.vit import HierarchialViT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HierarchialViT(img_size=64, patch_size=4, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
                          mlp_ratios=(2, 2, 2, 2), depths=(1, 2, 1, 1), sr_ratios=(4, 2, 1, 1), num_classes=3)


def test_maps_have_the_reduced_key_grids_and_sum_to_one(model):
    maps = attention_maps(model, torch.randn(3, 64, 64))
    # maps 16, 8, 4, 2 reduced by 4, 2, 1, 1
    assert [tuple(m.shape) for m in maps] == [(4, 4), (4, 4), (4, 4), (2, 2)]
    for m in maps[:3]:  # a patch query: its row covers the whole key grid
        assert m.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < maps[3].sum().item() < 1  # the class token's attention to itself is left out
    assert all((m >= 0).all() for m in maps)


def test_probabilities_sum_to_one_over_keys_before_averaging(model):
    captured = {}
    attn = model.stages[0].blocks[-1].attn
    handle = attn.register_forward_pre_hook(lambda mod, args: captured.setdefault("args", args))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        handle.remove()
        probs = attn.attention_probs(*captured["args"])
    assert probs.shape == (1, 1, 16 * 16, 4 * 4)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 1, 256), atol=1e-5)


def test_restores_training_mode_and_removes_hooks(model):
    model.train()
    attention_maps(model, torch.randn(1, 3, 64, 64))
    assert model.training
    assert all(not block.attn._forward_pre_hooks for s in model.stages for block in s.blocks)
    model.eval()
    attention_maps(model, torch.randn(3, 64, 64))
    assert not model.training


def test_figure_has_the_image_and_one_panel_per_stage(model):
    fig = attention_figure(model, torch.rand(3, 48, 80))  # another size, non-square
    assert isinstance(fig, Figure) and len(fig.axes) == 1 + 4


def test_visualize_attention_writes_a_png(model, tmp_path):
    path = tmp_path / "missing" / "dir" / "attention.png"
    assert visualize_attention(model, torch.randn(1, 3, 64, 64) * 3 + 1, str(path)) is None
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(path.parent) == ["attention.png"]  # no temporary file left behind


@pytest.mark.parametrize("shape", [(64, 64), (2, 3, 64, 64), (1, 64, 64), (4, 64, 64)])
def test_invalid_image_shape(model, tmp_path, shape):
    with pytest.raises(ValueError, match=r"image must have shape \(3, H, W\)"):
        visualize_attention(model, torch.randn(*shape), str(tmp_path / "a.png"))
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_nothing(model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(OSError, match="disk full"):
        visualize_attention(model, torch.randn(3, 64, 64), str(tmp_path / "a.png"))
    assert not any(tmp_path.iterdir())
