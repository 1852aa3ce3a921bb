"""ONNX export (`pip install ".[export]"`): the vision model and the language model's forward export with
`torch.onnx.export` and onnxruntime agrees with PyTorch within 1e-4. Skipped where the extra is absent."""

import pytest
import torch

from hiertrans import HierarchicalTransformer, create_model

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the export extra: pip install '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the export extra: pip install '.[export]'")
pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript: pip install '.[export]'")

MODELS = {
    "vit": (lambda: create_model("hvit_cifar", embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4)),
            lambda: torch.randn(2, 3, 32, 32)),
    "lm": (lambda: HierarchicalTransformer(num_tokens=256, dim=32, depth=1, seq_len=64, heads=2, dim_head=16,
                                           hierarchies=(1, 2), window_sizes=(8, None)),
           lambda: torch.randint(0, 256, (2, 40))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_agrees_with_pytorch(name, tmp_path):
    torch.manual_seed(0)
    build, make_input = MODELS[name]
    model, x = build().eval(), make_input()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)
