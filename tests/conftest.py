import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The models under test are tiny: a second intra-op thread mostly spin-waits for the first (and
# on a busy machine for a descheduled peer). Subprocesses (`run_cli`) keep torch's default.
torch.set_num_threads(1)


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m hiertrans ...` in a fresh temporary directory; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, timeout: float = 900, check: bool = True):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "hiertrans", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
        return proc

    return run


def read_scalars(log_dir: Path) -> dict[str, list[float]]:
    """All scalar tags of every TensorBoard event file under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return scalars
