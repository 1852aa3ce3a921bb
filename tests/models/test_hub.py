"""Hugging Face-style weights: save_pretrained / from_pretrained round trips with identical outputs,
offline from a local folder, for every model family; fine-tuning weights with a new head."""

import json

import pytest
import torch

from hiertrans import HierarchialViT, create_model
from hiertrans.hierarchical_configs import metaformer_cifar_config
from hiertrans.vit import pretrained

VISION = {
    "preset": lambda: create_model("hvit_cifar", embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4)),
    "arguments": lambda: HierarchialViT(img_size=32, embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1),
                                        depths=(1, 1, 1, 1), sr_ratios=(2, 1, 1, 1), num_classes=4),
    "config-built": lambda: HierarchialViT.from_config(metaformer_cifar_config(), num_classes=7),
}


@pytest.mark.parametrize("build", VISION.values(), ids=VISION.keys())
def test_vision_round_trip_gives_identical_outputs(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json"}
    json.loads((tmp_path / "config.json").read_text())  # plain JSON
    loaded = HierarchialViT.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert loaded.hierarchical_config == model.hierarchical_config


def test_fine_tuning_weights_get_a_new_head(tmp_path):
    model = VISION["preset"]().eval()
    model.save_pretrained(tmp_path)
    tuned = pretrained(str(tmp_path), num_classes=3, drop_path_rate=0.1)
    assert tuned.training and tuned.num_classes == 3 and tuned(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in body.items())


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        HierarchialViT.from_pretrained(tmp_path)
