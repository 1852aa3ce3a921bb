"""Config-built hierarchies (seed 003): the xformers example, fidelity to timm's PoolFormer-S12 and
PVT v2-b0, the token-mixer registry, validation messages, YAML round trips and a CLI fit."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from hiertrans.hierarchical_configs import (
    FEEDFORWARDS,
    TOKEN_MIXERS,
    BasicLayerConfig,
    HierarchicalConfig,
    LocalWindowAttention,
    StageConfig,
    get_hierarchical_configuration,
    make_token_mixer,
    metaformer_cifar_config,
    poolformer_s12_config,
    pvt_v2_b0_config,
    register_token_mixer,
)
from hiertrans.layers.rotary import apply_rotary
from hiertrans.layers.spatial import AxialRotaryEmbedding
from hiertrans.vit import HierarchialViT, build_hierarchical_model

ROOT = Path(__file__).resolve().parents[2]



def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_layers(image_size: int, mechanism: str = "scaled_dot_product") -> list[BasicLayerConfig]:
    """Seed 003's three stages, as written there."""
    return [
        BasicLayerConfig(
            embedding=64,  # the dimensions just have to match along the layers
            attention_mechanism=mechanism,  # anything you like
            patch_size=7,
            stride=4,
            padding=2,
            seq_len=image_size * image_size // 16,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=128,
            attention_mechanism=mechanism,
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 64,
            feedforward="MLP",
        ),
        BasicLayerConfig(
            embedding=320,
            attention_mechanism=mechanism,
            patch_size=3,
            stride=2,
            padding=1,
            seq_len=image_size * image_size // 256,
            feedforward="MLP",
        ),
    ]


def small_config(**overrides) -> HierarchicalConfig:
    """Two tiny stages on 16 px images: maps 4x4 then 2x2."""
    layers = [BasicLayerConfig(16, overrides.pop("mixer0", "scaled_dot_product"), 4, 4, 0, 16, "mlp"),
              BasicLayerConfig(32, overrides.pop("mixer1", "scaled_dot_product"), 2, 2, 0, 4, "mlp")]
    return get_hierarchical_configuration(layers, dim_head=8, **overrides)


# --- the seed ------------------------------------------------------------------------------------------

def test_seed_example_runs_as_written_and_builds_a_working_model():
    image_size = 64
    base_hierarchical_configs = seed_layers(image_size)
    # Fill in the gaps in the config
    xformer_config = get_hierarchical_configuration(
        base_hierarchical_configs,
        residual_norm_style="pre",
        use_rotary_embeddings=False,
        mlp_multiplier=4,
        dim_head=32,
    )
    assert isinstance(xformer_config, HierarchicalConfig)
    assert len(xformer_config) == 3 and xformer_config[1].embedding == 128  # list-like, as xformers' list
    assert [s.num_heads for s in xformer_config.stages] == [2, 4, 10]
    assert [s.position_embedding for s in xformer_config.stages] == ["learned"] * 3
    assert [s.seq_len for s in xformer_config.stages] == [256, 64, 16]

    model = HierarchialViT.from_config(xformer_config, num_classes=10)
    assert model.img_size == (64, 64)  # inferred from stage 0's seq_len: 16x16 tokens at stride 4
    x = torch.randn(2, 3, image_size, image_size)
    assert model(x).shape == (2, 10)
    maps = model.forward_feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 320, 4, 4)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16]


@pytest.mark.parametrize("style", ["pre", "post"])
@pytest.mark.parametrize("rotary", [True, False])
def test_every_mixer_and_feedforward_trains(style, rotary):
    layers = [
        BasicLayerConfig(16, "pooling", 3, 2, 1, 64, "dwconv_mlp", normalization="groupnorm"),
        BasicLayerConfig(16, "spatial_reduction", 3, 2, 1, 16, "mlp", mixer_kwargs={"sr_ratio": 2}),
        BasicLayerConfig(32, "local", 1, 1, 0, 16, "dwconv_mlp", mixer_kwargs={"window_size": 3},
                         normalization="rmsnorm"),
        BasicLayerConfig(32, "scaled_dot_product", 2, 2, 0, 4, "mlp", repeat_layer=2),
    ]
    config = get_hierarchical_configuration(layers, residual_norm_style=style, use_rotary_embeddings=rotary,
                                            dim_head=8, layer_scale_init=0.1)
    assert [s.position_embedding for s in config.stages] == (
        ["learned", "rotary", "rotary", "rotary"] if rotary else ["learned"] * 4)
    model = build_hierarchical_model(config, num_classes=5, img_size=16, drop_path_rate=0.1)
    x = torch.randn(2, 3, 16, 16)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(torch.randn(1, 3, 24, 20)).shape == (1, 5)  # other (non-square) sizes too


# --- fidelity to timm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_config, timm_name", [(poolformer_s12_config, "poolformer_s12"),
                                                    (pvt_v2_b0_config, "pvt_v2_b0")])
def test_fidelity_to_timm(make_config, timm_name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours, ref = HierarchialViT.from_config(make_config(), num_classes=1000), timm.create_model(timm_name)
    assert abs(n_params(ours) - n_params(ref)) <= 0.01 * n_params(ref)
    assert ours.img_size == (224, 224)

    # shapes at 64 px (real tensors, cheap): logits and per-stage feature maps
    ours = HierarchialViT.from_config(make_config(img_size=64), num_classes=1000).eval()
    ref = timm.create_model(timm_name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert ours(x).shape == ref(x).shape == (1, 1000)
        ref_maps = ref.forward_intermediates(x, intermediates_only=True)
        assert [m.shape for m in ours.forward_feature_maps(x)] == [m.shape for m in ref_maps]


def test_pvt_v2_b0_config_computes_timms_function():
    """Same parameters, one renaming of keys: timm's pvt_v2_b0 weights give the same logits."""
    timm = pytest.importorskip("timm")
    ours = HierarchialViT.from_config(pvt_v2_b0_config(img_size=64)).eval()
    ref = timm.create_model("pvt_v2_b0").eval()
    assert n_params(ours) == n_params(ref) == 3_666_760

    def rename(key: str) -> str:
        key = re.sub(r"^patch_embed\.", "stages.0.downsample.", key)  # timm's stage 0 embedding
        key = re.sub(r"^stages\.3\.norm\.", "norm.", key)  # the last stage's norm is our final norm
        return key.replace(".attn.", ".token_mixer.")

    state = {rename(k): v for k, v in ref.state_dict().items()}
    for key in [k for k in state if k.endswith((".q.weight", ".q.bias"))]:  # our qkv holds q and kv in one matrix
        kv = key.replace(".q.", ".kv.")
        state[key.replace(".q.", ".qkv.")] = torch.cat((state.pop(key), state.pop(kv)))
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def test_named_configs_are_what_they_claim():
    pool, pvt = poolformer_s12_config(), pvt_v2_b0_config()
    assert [s.depth for s in pool.stages] == [2, 2, 6, 2] and pool.layer_scale_init == 1e-5
    assert {s.token_mixer for s in pool.stages} == {"pooling"}
    assert {s.normalization for s in pool.stages} == {"groupnorm"}
    assert [s.mixer_kwargs["sr_ratio"] for s in pvt.stages] == [8, 4, 2, 1]
    assert [s.num_heads for s in pvt.stages] == [1, 2, 5, 8]
    assert [s.seq_len for s in pvt.stages] == [56 * 56, 28 * 28, 14 * 14, 7 * 7]


# --- registry ------------------------------------------------------------------------------------------

def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown token mixer 'fourier'") as info:
        get_hierarchical_configuration([BasicLayerConfig(16, "fourier", 4, 4, 0, 16, "mlp")])
    for name in ("scaled_dot_product", "spatial_reduction", "pooling", "local"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown feedforward 'moe'.*dwconv_mlp.*mlp"):
        get_hierarchical_configuration([BasicLayerConfig(16, "pooling", 4, 4, 0, 16, "moe")])
    with pytest.raises(ValueError, match="unknown normalization 'batchnorm'.*layernorm, rmsnorm, groupnorm"):
        get_hierarchical_configuration([BasicLayerConfig(16, "pooling", 4, 4, 0, 16, "mlp", "batchnorm")])
    with pytest.raises(TypeError, match="'pooling' rejected mixer_kwargs"):
        make_token_mixer("pooling", 16, window_size=3)


def test_a_user_registered_mixer_works():
    class DepthwiseMixer(torch.nn.Module):
        def __init__(self, dim: int, kernel_size: int):
            super().__init__()
            self.conv = torch.nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

        def forward(self, x, height, width):
            grid = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            return self.conv(grid).flatten(2).transpose(1, 2)

    @register_token_mixer("DepthwiseConv")
    def depthwise(dim, *, num_heads, rotary, kernel_size=5):
        return DepthwiseMixer(dim, kernel_size)

    try:
        layers = [BasicLayerConfig(16, "depthwiseconv", 4, 4, 0, 16, "mlp", mixer_kwargs={"kernel_size": 3}),
                  BasicLayerConfig(32, "scaled_dot_product", 2, 2, 0, 4, "mlp")]
        config = get_hierarchical_configuration(layers, dim_head=8)
        assert config.stages[0].position_embedding == "learned"  # not an attention mixer: no rotary
        model = HierarchialViT.from_config(config, num_classes=3)
        assert isinstance(model.stages[0].blocks[0].token_mixer, DepthwiseMixer)
        assert model.stages[0].blocks[0].token_mixer.conv.kernel_size == (3, 3)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
        with pytest.raises(ValueError, match="depthwiseconv"):
            get_hierarchical_configuration([BasicLayerConfig(16, "nope", 4, 4, 0, 16, "mlp")])
    finally:
        TOKEN_MIXERS.pop("depthwiseconv")
    assert "mlp" in FEEDFORWARDS


# --- validation ----------------------------------------------------------------------------------------

def test_embedding_not_divisible_by_dim_head():
    with pytest.raises(ValueError, match=r"stage 0: embedding 64 is not divisible by dim_head 48; use a "
                                         r"dim_head that divides every embedding \(e.g. 64\)"):
        get_hierarchical_configuration(seed_layers(224), dim_head=48)
    layers = seed_layers(224)
    layers[2].embedding = 336
    with pytest.raises(ValueError, match=r"stage 2: embedding 336 is not divisible by dim_head 32;.*e.g. 16"):
        get_hierarchical_configuration(layers, dim_head=32)


def test_seq_len_mismatch_names_the_expected_value():
    layers = seed_layers(224)
    layers[0].seq_len = 4096
    config = get_hierarchical_configuration(layers, use_rotary_embeddings=False, dim_head=32)
    expected = "stage 0: seq_len=4096 but a 224x224 input with patch 7 stride 4 padding 2 gives 56x56=3136 tokens"
    with pytest.raises(ValueError, match=re.escape(expected)):
        HierarchialViT.from_config(config, img_size=224)
    layers = seed_layers(224)  # a later stage: the message names its input map and the image size
    layers[2].seq_len = 100
    config = get_hierarchical_configuration(layers, dim_head=32)
    with pytest.raises(ValueError, match=re.escape("stage 2: seq_len=100 but its 28x28 input map (from a "
                                                   "224x224 image) with patch 3 stride 2 padding 1 gives "
                                                   "14x14=196 tokens")):
        HierarchialViT.from_config(config)
    # seq_len is relative to the image size: the seed's 224 px config does not fit 64 px images
    with pytest.raises(ValueError, match="stage 0: seq_len=3136 but a 64x64 input"):
        HierarchialViT.from_config(get_hierarchical_configuration(seed_layers(224), dim_head=32), img_size=64)
    with pytest.raises(ValueError, match="cannot infer img_size from stage 0's seq_len=3000"):
        HierarchialViT.from_config([StageConfig(16, "pooling", "mlp", 4, 4, 0, seq_len=3000)])


def test_vanishing_maps_and_oversized_reductions_are_rejected():
    layers = seed_layers(8) + [BasicLayerConfig(320, "pooling", 3, 2, 0, None, "mlp")]
    for layer in layers:
        layer.seq_len = None  # not checked: the geometry alone must fail
    config = get_hierarchical_configuration(layers, dim_head=32)
    with pytest.raises(ValueError, match=r"stage 3 gets a 1x1 input map and a 0x0 token grid \(patch 3, stride 2, "
                                         r"padding 0\): the feature map vanishes \(img_size 8x8"):
        HierarchialViT.from_config(config, img_size=8)
    # PVT v2-b0 at 16 px: stage 0's 4x4 map cannot be pooled by its sr_ratio 8
    with pytest.raises(ValueError, match=re.escape("stage 0 gets a 16x16 input map and a 4x4 token grid (patch 7, "
                                                   "stride 4, padding 3): its sr_ratio 8 exceeds the feature map; "
                                                   "the largest valid sr_ratio for this stage is 4")):
        HierarchialViT.from_config(pvt_v2_b0_config(img_size=16))
    # overlapping embeddings: the smallest input walks back through kernels, strides and paddings
    model = HierarchialViT.from_config(pvt_v2_b0_config(img_size=64)).eval()
    assert model.min_input_size == 29  # stage 0 needs an 8x8 grid: (8 - 1) * 4 + 7 - 2 * 3
    with pytest.raises(ValueError, match=r"stage 0 gets a 28x28 input map and a 7x7 token grid.*strides \(4, 2, 2, "
                                         r"2\), paddings \(3, 1, 1, 1\).*inputs need both sides >= 29"):
        model(torch.randn(1, 3, 28, 28))
    assert model(torch.randn(1, 3, 29, 29)).shape == (1, 1000)


def test_other_config_errors():
    with pytest.raises(ValueError, match="rotary position embeddings need an attention mixer, not 'pooling'"):
        get_hierarchical_configuration([BasicLayerConfig(16, "pooling", 4, 4, 0, 16, "mlp",
                                                         position_embedding="rotary")])
    with pytest.raises(ValueError, match="head dim divisible by 4, got 18 / 1 heads = 18"):
        get_hierarchical_configuration([BasicLayerConfig(18, "local", 4, 4, 0, 16, "mlp")])
    with pytest.raises(ValueError, match="residual_norm_style must be one of \\('pre', 'post'\\), got 'sandwich'"):
        small_config(residual_norm_style="sandwich")
    with pytest.raises(ValueError, match="stage 0: padding must be an int >= 0, got -1"):
        get_hierarchical_configuration([BasicLayerConfig(16, "pooling", 4, 4, -1, 16, "mlp")])
    with pytest.raises(ValueError, match="in_chans=1 but the hierarchy has in_channels=3"):
        HierarchialViT.from_config(small_config(), in_chans=1)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        HierarchialViT.from_config(small_config(), global_pool="token")
    with pytest.raises(ValueError, match=r"stages\[0\]: unknown keys \['heads'\]; valid keys: .*num_heads"):
        HierarchicalConfig.from_dict({"stages": [{**small_config().to_dict()["stages"][0], "heads": 2}]})
    with pytest.raises(ValueError, match=r"layers\[0\]: missing keys \['seq_len'\]"):
        HierarchicalConfig.from_dict({"layers": [dict(embedding=16, attention_mechanism="pooling", patch_size=4,
                                                      stride=4, padding=0, feedforward="mlp")]})


# --- YAML ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_config", [pvt_v2_b0_config, poolformer_s12_config,
                                         lambda: get_hierarchical_configuration(seed_layers(224), dim_head=32)])
def test_yaml_round_trip(make_config):
    config = make_config()
    text = config.to_yaml()
    again = HierarchicalConfig.from_yaml(text)
    assert again == config and isinstance(again.stages[0], StageConfig)
    with torch.device("meta"):
        assert n_params(HierarchialViT.from_config(again)) == n_params(HierarchialViT.from_config(config))


def test_short_yaml_form_is_get_hierarchical_configuration():
    text = """
    residual_norm_style: post
    use_rotary_embeddings: false
    dim_head: 32
    layers:
      - {embedding: 64, attention_mechanism: local, patch_size: 7, stride: 4, padding: 2, seq_len: 3136,
         feedforward: MLP, mixer_kwargs: {window_size: 7}, repeat_layer: 2}
      - {embedding: 128, attention_mechanism: pooling, patch_size: 3, stride: 2, padding: 1, seq_len: 784,
         feedforward: dwconv_mlp, mixer_kwargs: null, position_embedding: none}
    """
    config = HierarchicalConfig.from_yaml(text)
    layers = [BasicLayerConfig(64, "local", 7, 4, 2, 3136, "MLP", mixer_kwargs={"window_size": 7}, repeat_layer=2),
              BasicLayerConfig(128, "pooling", 3, 2, 1, 784, "dwconv_mlp", position_embedding="none")]
    assert config == get_hierarchical_configuration(layers, residual_norm_style="post", use_rotary_embeddings=False,
                                                    dim_head=32)
    assert HierarchicalConfig.from_yaml(config.to_yaml()) == config


def test_shipped_yaml_hierarchies_build():
    def net_args(name: str) -> dict:
        net = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["init_args"]["net"]
        assert net["class_path"] == "hiertrans.build_hierarchical_model"
        return net["init_args"]

    spec = net_args("metaformer_cifar10.yaml")
    model = build_hierarchical_model(**spec)
    reference = HierarchialViT.from_config(metaformer_cifar_config(), num_classes=10)
    assert n_params(model) == n_params(reference)
    assert HierarchicalConfig.from_dict(spec["hierarchy"]) == metaformer_cifar_config()
    model = build_hierarchical_model(**net_args("metaformer_digits.yaml"))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- mixer properties -------------------------------------------------------------------------------

def test_axial_rotary_depends_on_the_2d_offset_only():
    rotary = AxialRotaryEmbedding(16)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    # grid 5x5: cell (1, 2) vs (3, 0), and the same offset shifted by (1, 2): (2, 4) vs (4, 2)
    rot = rotary.rotation(5, 5)

    def score(a, b):
        return (apply_rotary(q, rot[a]) * apply_rotary(k, rot[b])).sum()

    assert torch.allclose(score(1 * 5 + 2, 3 * 5 + 0), score(2 * 5 + 4, 4 * 5 + 2), atol=1e-5)
    assert not torch.allclose(score(1 * 5 + 2, 3 * 5 + 0), score(1 * 5 + 2, 0 * 5 + 3), atol=1e-3)


def test_local_windows_keep_tokens_apart():
    mixer = LocalWindowAttention(16, num_heads=2, window_size=2, rotary=True).eval()
    x = torch.randn(1, 5 * 4, 16)  # 5x4 grid: windows 2x2, the last row padded
    out = mixer(x, 5, 4)
    y = x.clone().view(1, 5, 4, 16)
    y[:, 2:, :] += 1.0  # change everything outside the top two rows
    assert torch.allclose(mixer(y.view(1, 20, 16), 5, 4).view(1, 5, 4, 16)[:, :2], out.view(1, 5, 4, 16)[:, :2])
    # a window covering the whole grid is full attention
    full = LocalWindowAttention(16, num_heads=2, window_size=8).eval()
    assert torch.allclose(full(x, 5, 4), full.attn(x, 5, 4), atol=1e-6)


def test_attention_maps_of_config_built_attention_models():
    from hiertrans.visualize import attention_maps

    layers = [BasicLayerConfig(16, "spatial_reduction", 4, 4, 0, 16, "mlp", mixer_kwargs={"sr_ratio": 2}),
              BasicLayerConfig(32, "scaled_dot_product", 2, 2, 0, 4, "mlp")]
    model = HierarchialViT.from_config(get_hierarchical_configuration(layers, dim_head=8), num_classes=3)
    maps = attention_maps(model, torch.randn(3, 16, 16))
    assert [tuple(m.shape) for m in maps] == [(2, 2), (2, 2)]
    assert all(torch.allclose(m.sum(), torch.tensor(1.0), atol=1e-5) for m in maps)


# --- training through the CLI -------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_fit_on_the_embedded_digits(run_cli, tmp_path, monkeypatch):
    """`python -m hiertrans fit --config metaformer_cifar10.yaml` on the digits, 3 steps of 16 images."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # busy shared cores: more threads only spin-wait
    # limit_val_batches=1 would parse as the float 1.0 (= all batches): ask for 2 batches
    run_cli("fit", "--config", "metaformer_cifar10.yaml", "--data.init_args.root=null",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=16", "--data.init_args.randaugment=false",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")
    run = tmp_path / "runs" / "metaformer_cifar10" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["net"]["init_args"]["hierarchy"]["layers"][0]["attention_mechanism"] == "pooling"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("net.stages.3.blocks.1.token_mixer.") for k in checkpoint["state_dict"])
    from lit_modules.classifier import ImageClassifier

    module = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.net.hierarchical_config == metaformer_cifar_config()  # rebuilt from the saved hierarchy
    assert module.eval_model()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
