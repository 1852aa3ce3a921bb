"""Every notebook in notebooks/ executes top to bottom (kernel python3, cwd = notebooks/), so none can rot."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = ["lm_quickstart.ipynb", "vit_attention_maps.ipynb"]  # hierarchy_reduction.ipynb too, when present


@pytest.mark.parametrize("name", sorted({*EXPECTED, *(p.name for p in NOTEBOOKS.glob("*.ipynb"))}))
def test_notebook_runs(name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = NOTEBOOKS / name
    assert path.is_file(), f"{name} is missing: run python notebooks/build_notebooks.py"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: clear its outputs"
    # the kernel inherits the environment: one thread (matplotlib uses the kernel's inline backend)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if name in EXPECTED:  # ours show a figure (the loss curve, the attention maps)
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure was displayed"
