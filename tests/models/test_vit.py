import re

import pytest
import timm
import torch
import torch.nn.functional as F

from hiertrans.layers import FeedForward, attention_probs
from hiertrans.layers.spatial import DWConvFeedForward
from hiertrans.pyramid import stage_geometry
from hiertrans.vit import (
    PRESETS,
    HierarchialViT,
    HierarchicalStage,
    HierarchicalViT,
    MultiScaleAttention,
    PatchEmbed,
    PosConv,
    create_model,
)

TINY = dict(img_size=32, patch_size=4, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1), sr_ratios=(2, 1, 1, 1), num_classes=5)



def tiny(**overrides) -> HierarchialViT:
    torch.manual_seed(0)
    return HierarchialViT(**{**TINY, **overrides})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- shapes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("size", [(32, 32), (64, 32), (48, 80), (40, 40)])
def test_output_shape_at_any_input_size(size, global_pool):
    model = tiny(global_pool=global_pool).eval()
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_non_square_img_size():
    model = tiny(img_size=(64, 32))
    assert model.stages[0].grid_size == (16, 8) and model.pos_embed.shape == (1, 128, 16)
    assert model(torch.randn(1, 3, 64, 32)).shape == (1, 5)


def test_feature_maps_and_feature_info():
    model = tiny()
    maps = model.forward_feature_maps(torch.randn(2, 3, 64, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 8), (2, 32, 8, 4), (2, 48, 4, 2), (2, 64, 2, 1)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == [16, 32, 48, 64]
    final, last_two = model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=2)
    assert final.shape == (1, 1 + 1, 64) and [m.shape[1] for m in last_two] == [48, 64]
    nhwc = model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[0], output_fmt="NHWC",
                                       intermediates_only=True)
    assert nhwc[0].shape == (1, 8, 8, 16)


def test_position_embeddings_are_interpolated_for_other_sizes():
    stage = tiny().stages[0]  # 8x8 grid at img_size 32
    assert stage.resized_pos_embed(8, 8) is stage.pos_embed
    resized = stage.resized_pos_embed(12, 6)
    assert resized.shape == (1, 72, 16)
    # bilinear resizing of a constant grid is that constant
    with torch.no_grad():
        stage.pos_embed.fill_(0.5)
    assert torch.allclose(stage.resized_pos_embed(5, 11), torch.full((1, 55, 16), 0.5))


def test_patch_embed_overlapping():
    embed = PatchEmbed(3, 8, patch_size=7, stride=4, padding=2)
    tokens, (h, w) = embed(torch.randn(2, 3, 32, 48))
    assert (h, w) == embed.output_size(32, 48) == (8, 12)
    assert tokens.shape == (2, 96, 8)


def test_hierarchical_stage_standalone():
    stage = HierarchicalStage(16, 2, 4, 2, 2, in_chans=3, patch_size=4, input_size=32, cls_token=True)
    tokens, (h, w) = stage(torch.randn(2, 3, 32, 32))
    assert (h, w) == (8, 8) and tokens.shape == (2, 1 + 64, 16)
    assert len(stage.blocks) == 2 and isinstance(stage.downsample, PatchEmbed)


def test_pos_conv_is_a_depthwise_residual_on_the_grid_only():
    conv = PosConv(4)
    torch.nn.init.zeros_(conv.proj.weight)
    torch.nn.init.zeros_(conv.proj.bias)
    x = torch.randn(2, 1 + 6, 4)
    assert torch.equal(conv(x, 2, 3), x)  # zero conv: identity
    with torch.no_grad():
        conv.proj.weight[:, 0, 1, 1] = 1.0  # centre tap 1: every grid token doubles, the class token not
    out = conv(x, 2, 3)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.allclose(out[:, 1:], 2 * x[:, 1:])
    with torch.no_grad():
        conv.proj.weight.zero_()
        conv.proj.weight[:, 0, 1, 2] = 1.0  # right neighbour: token (i, j) adds token (i, j + 1)
    grid = torch.arange(6.0).repeat(4, 1).T[None]  # (1, 6, 4): token t holds t
    expected = torch.tensor([0 + 1, 1 + 2, 2 + 0, 3 + 4, 4 + 5, 5 + 0]).float()  # zero padding at the border
    assert torch.equal(conv(torch.cat((torch.zeros(1, 1, 4), grid), 1), 2, 3)[0, 1:, 0], expected)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_pos_conv_replaces_position_embeddings(global_pool):
    model = tiny(pos_conv=True, pos_embed=False, global_pool=global_pool)
    assert all(s.pos_embed is None and isinstance(s.pos_conv, PosConv) for s in model.stages)
    assert tiny().stages[0].pos_conv is None  # off by default: PVT v1
    for size in [(32, 32), (48, 80)]:  # any input size, nothing to resize
        assert model(torch.randn(2, 3, *size)).shape == (2, 5)
    per_stage = tiny(pos_conv=(True, False, False, False))
    assert per_stage.stages[0].pos_conv is not None and per_stage.stages[1].pos_conv is None
    with pytest.raises(ValueError, match="pos_conv has 2 entries"):
        tiny(pos_conv=(True, False))


def test_dwconv_mlp_per_stage_and_with_a_class_token():
    model = tiny(dwconv_mlp=(True, True, False, False), global_pool="token")
    kinds = [isinstance(s.blocks[0].mlp, DWConvFeedForward) for s in model.stages]
    assert kinds == [True, True, False, False] and isinstance(model.stages[3].blocks[0].mlp, FeedForward)
    assert model(torch.randn(2, 3, 48, 80)).shape == (2, 5)
    with pytest.raises(ValueError, match="dwconv_mlp has 3 entries"):
        tiny(dwconv_mlp=(True, True, False))
    # the class token goes through the MLP but not through the conv: it has no place on the grid
    mlp = DWConvFeedForward(4, 8)
    x = torch.randn(2, 1 + 6, 4)
    assert torch.allclose(mlp(x, 2, 3)[:, :1], mlp.fc2(mlp.act(mlp.fc1(x[:, :1]))))
    assert torch.allclose(mlp(x, 2, 3)[:, 1:], mlp(x[:, 1:], 2, 3))


def test_fan_out_conv_init_reaches_every_conv():
    model = tiny(dwconv_mlp=True, pos_conv=True, conv_init="fan_out")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {"dwconv", "proj", "sr"} <= {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m in convs}
    for conv in convs:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        assert not conv.bias.any()
        if conv.weight.numel() >= 1000:  # enough samples for the spread to show
            assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    default = tiny(dwconv_mlp=True)  # PyTorch's (PVT v1's) init: a narrower depthwise kernel
    assert default.stages[0].blocks[0].mlp.dwconv.weight.std() < 0.6 * (2 / 9) ** 0.5


def test_class_token_with_spatial_reduction():
    # the class token stays an unreduced key when the last stage also reduces its map
    model = tiny(img_size=128, sr_ratios=(2, 2, 2, 2))
    assert model(torch.randn(1, 3, 128, 128)).shape == (1, 5)


def test_seed_attributes_and_alias():
    model = tiny()
    assert HierarchicalViT is HierarchialViT
    assert model.patch_embed is model.stages[0].downsample
    assert model.pos_embed is model.stages[0].pos_embed
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.head.out_features == 5
    assert model.num_features == 64


# --- attention --------------------------------------------------------------------------------------

def test_attention_matches_its_probabilities():
    torch.manual_seed(0)
    attn = MultiScaleAttention(32, num_heads=4, qkv_bias=True, sr_ratio=2).eval()
    x = torch.randn(2, 1 + 8 * 6, 32)  # a class token in front of an 8x6 map
    probs = attn.attention_probs(x, 8, 6)
    assert probs.shape == (2, 4, 49, 1 + 4 * 3)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 49), atol=1e-5)
    _, _, v = attn.project(x, 8, 6)
    manual = attn.proj((probs @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(attn(x, 8, 6), manual, atol=1e-5)
    assert attn.scale == 8**-0.5


def test_attention_without_reduction_is_plain_attention():
    attn = MultiScaleAttention(16, num_heads=2, sr_ratio=1)
    assert attn.sr is None and attn.key_grid(5, 7) == (5, 7)
    x = torch.randn(1, 35, 16)
    q, k, v = attn.project(x, 5, 7)
    assert q.shape == k.shape == v.shape == (1, 2, 35, 8)
    assert torch.allclose(attn.attention_probs(x, 5, 7), attention_probs(q, k))


# --- validation -------------------------------------------------------------------------------------

def test_sr_ratio_larger_than_feature_map_names_the_stage():
    with pytest.raises(ValueError) as err:
        HierarchialViT(img_size=16, patch_size=8, depths=(1, 1, 1, 1))
    msg = str(err.value)
    assert "stage 0" in msg and "2x2" in msg and "sr_ratio 8" in msg
    assert "largest valid sr_ratio for this stage is 2" in msg
    assert "img_size with both sides >= 64" in msg


def test_vanishing_feature_map_names_the_stage():
    expected = re.escape("stage 3 gets a 1x1 input map and a 0x0 token grid")
    with pytest.raises(ValueError, match=expected) as err:
        HierarchialViT(img_size=16, patch_size=4, sr_ratios=(1, 1, 1, 1), depths=(1, 1, 1, 1))
    assert "vanishes" in str(err.value) and ">= 32" in str(err.value)


def test_too_small_input_at_forward_names_the_stage():
    model = tiny()
    with pytest.raises(ValueError, match="stage 3.*vanishes.*both sides >= 32"):
        model(torch.randn(1, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_single_key_reduction_warns():
    with torch.device("meta"), pytest.warns(UserWarning) as record:
        HierarchialViT(patch_size=16)  # the seed's default: maps 14, 7, 3, 1 reduced by 8, 4, 2, 1
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert "stage 0: sr_ratio 8 reduces its 14x14 feature map to a single key" in messages[0]
    assert "stage 2: sr_ratio 2 reduces its 3x3" in messages[2]


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=(1, 2, 4)), "num_heads has 3 entries but embed_dims defines 4 stages"),
    (dict(depths=(1, 1)), "depths has 2 entries"),
    (dict(num_heads=(1, 2, 5, 4)), "stage 2: embed_dim 48 is not divisible by num_heads 5"),
    (dict(global_pool="max"), "global_pool must be 'token' or 'avg'"),
    (dict(patch_size=(4, 2)), "patch_size has 2 entries"),
    (dict(conv_init="xavier"), "conv_init must be 'pytorch' or 'fan_out', got 'xavier'"),
])
def test_invalid_configurations(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="hvit_cifar.*hvit_large.*hvit_medium.*hvit_small.*hvit_tiny"):
        create_model("hvit_huge")


# --- presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, reference", [
    ("hvit_tiny", 13.23e6), ("hvit_small", 24.49e6), ("hvit_medium", 44.21e6), ("hvit_large", 61.37e6)])
def test_pvt_v1_parameter_counts(name, reference):
    with torch.device("meta"):  # counts without allocating or initialising weights
        model = create_model(name)
    assert abs(n_params(model) / reference - 1) < 0.005


def test_cifar_preset_matches_pvt_v2_b0_size():
    with torch.device("meta"):
        ours = create_model("hvit_cifar")
        theirs = timm.create_model("pvt_v2_b0", num_classes=10)
    assert abs(n_params(ours) / n_params(theirs) - 1) < 0.10
    # every reducing stage keeps more than one key at 32 px
    for (_, grid), sr in zip(stage_geometry(ours.hierarchical_config.stages, (32, 32)), ours.sr_ratios):
        assert sr == 1 or (grid[0] // sr) * (grid[1] // sr) > 1


def test_preset_overrides():
    model = create_model("hvit_cifar", img_size=64, in_chans=1, num_classes=3, drop_path_rate=0.1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


# --- timm contract ----------------------------------------------------------------------------------

def test_forward_features_and_head():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 1, 64)  # class token + the 1x1 last map
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0, global_pool="avg")
    assert model.global_pool == "avg" and model(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    with pytest.raises(ValueError, match="class token"):
        tiny(global_pool="avg").reset_classifier(3, global_pool="token")


def test_grad_checkpointing_gives_identical_results():
    model = tiny(drop_path_rate=0.2, drop_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_no_weight_decay_and_group_matcher():
    from timm.models import group_parameters

    model = tiny()
    assert model.no_weight_decay() == {f"stages.{i}.pos_embed" for i in range(4)} | {"stages.3.cls_token"}
    groups = group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 6  # stem, 4 stages, norm + head


def test_timm_create_model_and_registration():
    import hiertrans.vit

    assert set(PRESETS) <= set(timm.list_models("hvit_*"))
    for name in PRESETS:  # registered by the module's own functions, one per preset
        assert timm.models.model_entrypoint(name) is getattr(hiertrans.vit, name)
    model = timm.create_model("hvit_cifar", num_classes=7, drop_path_rate=0.1)
    assert isinstance(model, HierarchialViT) and model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with torch.device("meta"):
        assert timm.create_model("hvit_small", num_classes=10).head.out_features == 10
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="no hosted pretrained weights.*pretrained_cfg_overlay"):
        timm.create_model("hvit_tiny", pretrained=True)


def test_timm_pretrained_from_local_weights(tmp_path):
    """timm's `pretrained=True` with a local `pretrained_cfg_overlay`: a file or a save_pretrained folder;
    a different class count gets a fresh head and keeps every other weight."""
    torch.manual_seed(0)
    source = timm.create_model("hvit_cifar", depths=(1, 1, 1, 1)).eval()
    source.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    for overlay in (dict(file=str(tmp_path / "model.safetensors")), dict(source="local-dir", file=str(tmp_path))):
        loaded = timm.create_model("hvit_cifar", pretrained=True, pretrained_cfg_overlay=overlay,
                                   depths=(1, 1, 1, 1)).eval()
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    tuned = timm.create_model("hvit_cifar", pretrained=True, num_classes=3, depths=(1, 1, 1, 1),
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    assert tuned.head.out_features == 3
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    for key, value in body.items():
        torch.testing.assert_close(tuned.state_dict()[key], value, rtol=0, atol=0)
    assert tuned.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_autocast_bfloat16():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out.float()).all()


# --- learning ---------------------------------------------------------------------------------------

def test_tiny_model_fits_a_fixed_batch():
    model = tiny(num_classes=4)
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- plain PyTorch, compile -------------------------------------------------------------------------

def test_default_forward_and_backward_run_plain_pytorch():
    from helpers import assert_plain_pytorch

    from hiertrans.hierarchical_configs import metaformer_cifar_config

    x = torch.randn(2, 3, 32, 32)
    for model in (tiny(dwconv_mlp=True, pos_conv=True), HierarchialViT.from_config(metaformer_cifar_config())):
        assert_plain_pytorch(lambda model=model: model(x).sum().backward())


def test_compiles_fullgraph_forward_and_backward():
    """No graph breaks: `torch.compile(fullgraph=True)` takes the training step, with inductor for the
    PVT path (what GPU users run) and with the cheaper aot_eager backend for every config-built mixer."""
    from hiertrans.hierarchical_configs import metaformer_cifar_config

    x = torch.randn(2, 3, 32, 32)
    for model, backend in ((tiny(dwconv_mlp=(True, False, False, False), pos_conv=True), "inductor"),
                           (HierarchialViT.from_config(metaformer_cifar_config(), num_classes=3), "aot_eager")):
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        eager = model(x)
        eager.square().sum().backward()
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
        for got, p in zip(grads, model.parameters()):
            torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-4)


def test_layer_decay_groups_follow_group_matcher():
    """Layer-wise LR decay (fine-tuning): groups per depth from `group_matcher`, the head at full LR,
    the stem at layer_decay ** deepest; weight decay still off for norms, biases and position embeddings;
    WarmupCosineLR applies each group's lr_scale."""
    from hiertrans.optim import WarmupCosineLR, layer_ids, no_weight_decay_names, param_groups

    model = create_model("hvit_cifar", depths=(1, 1, 1, 1))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    depth = layer_ids(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    deepest = max(depth.values())
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(names["stages.0.downsample.proj.weight"])]["lr_scale"] == 0.5 ** deepest
    skip = no_weight_decay_names(model)
    for name, param in names.items():
        assert by_param[id(param)]["weight_decay"] == (0.0 if name in skip else 0.05), name
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    WarmupCosineLR(optimizer, warmup_steps=0, total_steps=10)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    with pytest.raises(ValueError, match="layer_decay must be in"):
        param_groups(model, layer_decay=1.5)
