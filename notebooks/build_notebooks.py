"""Write `lm_quickstart.ipynb` and `vit_attention_maps.ipynb` (outputs cleared) from the cells below.

    python notebooks/build_notebooks.py

Edit the cells here, not the .ipynb files; `tests/e2e/test_notebooks.py` executes every notebook.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import sys
from pathlib import Path

# make the repository importable when hiertrans is not installed (the kernel starts in notebooks/)
try:
    import hiertrans  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path.cwd().parent))

import torch

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny models: a second thread only adds overhead on a small CPU"""

LM_CELLS = [
    new_markdown_cell("""\
# Hierarchical LM quickstart

Train a tiny byte-level `HierarchicalTransformer` (hierarchies 1x and 2x: local attention over bytes,
full attention over pairs of bytes) on real text for a few dozen steps in a plain PyTorch loop, watch
the loss fall, and sample from it. The full recipe (warm-up, cosine decay, exact validation
bits-per-byte, TensorBoard) is `python -m hiertrans fit --config lm.yaml`."""),
    new_code_cell(SETUP),
    new_markdown_cell("""\
The corpus: the source of Python's own `json` package, as bytes (vocabulary = 256 byte values),
split by position into train and validation."""),
    new_code_cell("""\
import inspect
import json
import json.decoder
import json.encoder

text = "\\n".join(inspect.getsource(m) for m in (json, json.decoder, json.encoder))
data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
split = int(0.9 * len(data))
train, val = data[:split], data[split:]
print(f"{len(data):,} bytes: {len(train):,} train, {len(val):,} validation")"""),
    new_code_cell("""\
from hiertrans import HierarchicalTransformer

SEQ_LEN = 64
model = HierarchicalTransformer(
    num_tokens=256, dim=64, depth=2, seq_len=SEQ_LEN, heads=2, dim_head=32,
    hierarchies=(1, 2),        # bytes, and pairs of bytes
    window_sizes=(16, None),   # local attention over 16 bytes at 1x; full attention at 2x
)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")"""),
    new_code_cell("""\
def batch(source, size=16, generator=None):
    starts = torch.randint(len(source) - SEQ_LEN - 1, (size,), generator=generator)
    return torch.stack([source[s : s + SEQ_LEN + 1] for s in starts])

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(0)
losses = []
for step in range(60):
    loss, (ce, recon, hier_ar) = model(batch(train, generator=g), return_loss=True)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(ce.item())
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}  next-byte ce {ce.item():.3f}")
assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, "the loss should fall"
"""),
    new_code_cell("""\
import math

import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([l / math.log(2) for l in losses])
ax.set_xlabel("step")
ax.set_ylabel("train bits per byte")
ax.set_title("tiny hierarchical LM on json's source")
plt.show()"""),
    new_markdown_cell("Validation bits per byte, then a sample (a few dozen steps teach byte statistics, not Python):"),
    new_code_cell("""\
model.eval()
with torch.no_grad():
    _, (val_ce, _, _) = model(batch(val, size=32, generator=torch.Generator().manual_seed(1)), return_loss=True)
print(f"validation: {val_ce.item() / math.log(2):.2f} bits per byte (uniform: 8)")

prompt = torch.tensor(list(b"def "))
sample = model.generate(prompt, 80, temperature=0.8)
print(bytes((prompt.tolist() + sample.tolist())).decode("utf-8", errors="replace"))"""),
]

VIT_CELLS = [
    new_markdown_cell("""\
# Attention maps of a hierarchical ViT

Train a slim `hvit_cifar` (four PVT stages, spatially reduced keys/values) briefly on the
embedded handwritten digits through `datamodules.ImageDataModule`, then look at what one query attends
to in every stage with `hiertrans.attention_figure` / `visualize_attention`. The full run is
`python -m hiertrans fit --config vit.yaml` (>= 95% accuracy in a few minutes)."""),
    new_code_cell(SETUP),
    new_code_cell("""\
from datamodules import ImageDataModule

data = ImageDataModule(root=None, img_size=32, batch_size=64)   # None: the embedded digits, cached once
data.prepare_data()
data.setup("fit")
print(data.num_classes, "classes:", data.classes)
print(len(data.train_dataset), "train /", len(data.val_dataset), "validation images")"""),
    new_code_cell("""\
from hiertrans import create_model

model = create_model("hvit_cifar", num_classes=10, embed_dims=(16, 32, 64, 64), num_heads=(1, 2, 4, 4),
                     mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 1, 1), sr_ratios=(2, 1, 1, 1))
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")"""),
    new_code_cell("""\
import itertools

import torch.nn.functional as F

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
model.train()
for step, (images, targets) in enumerate(itertools.islice(itertools.cycle(data.train_dataloader()), 40)):
    loss = F.cross_entropy(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}")

model.eval()
correct = total = 0
with torch.no_grad():
    for images, targets in data.val_dataloader():
        correct += (model(images).argmax(-1) == targets).sum().item()
        total += len(targets)
print(f"validation accuracy after 40 steps: {correct / total:.1%} (chance: 10%)")"""),
    new_markdown_cell("""\
One validation image and, for each stage, the attention of its centre query over that stage's key
grid (keys pooled 2x2 in stage 0 by the spatial reduction), upsampled over the image:"""),
    new_code_cell("""\
%matplotlib inline
from IPython.display import display

from hiertrans import attention_figure, attention_maps, visualize_attention

image, label = data.val_dataset[0]
maps = attention_maps(model, image)
print("key grids per stage:", [tuple(m.shape) for m in maps])
figure = attention_figure(model, image)
display(figure)"""),
    new_code_cell("""\
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "attention.png"
    visualize_attention(model, image, str(path))   # the same figure as a PNG file
    print(path.name, path.stat().st_size, "bytes")"""),
]


def write(name: str, cells: list) -> Path:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name, cells in (("lm_quickstart.ipynb", LM_CELLS), ("vit_attention_maps.ipynb", VIT_CELLS)):
        print("wrote", write(name, cells))
