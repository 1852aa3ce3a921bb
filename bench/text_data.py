"""Text corpora of any size (issue 15): peak memory, start-up and loader throughput on big files.

    python bench/text_data.py                           # everything: 3 GiB file, 10 GiB directory, 512 MiB data sets
    python bench/text_data.py --only loader startup     # parts: memory, ddp, startup, loader, datasets
    python bench/text_data.py --rss-gib 1 --startup-gib 2   # smaller files, same code paths

Targets and what measures them:
- memory: `python -m hiertrans fit --config lm.yaml --data.init_args.path big.txt --trainer.max_steps 5`
  on a 3 GiB text file stays under 1.5 GiB peak RSS (the process and any children, sampled every
  0.1 s with psutil), and again with `--model.init_args.grad_checkpointing=true` (the training
  step's activations recomputed in the backward instead of kept); `ddp`: the same on two DDP ranks
  adds no second copy of the corpus (the sum of the ranks' unique memory (USS) and proportional
  memory (PSS), and their anonymous memory, against the one-process run).
- startup: a 10 GiB corpus (a directory of 1 GiB files, so it goes through the cache) reaches its
  first training step within 10 s once the cache exists: the CLI run is timed from process start
  to the first `on_train_batch_start` (a callback of this file), after a first run that built the cache.
- loader: the training loader alone (lm.yaml's batch settings: 8 x 257 bytes, no workers) reads
  >= 20x the bytes per second the default LM consumes; the LM's figure is measured here (fwd + bwd +
  AdamW of lm.yaml's model on this machine) and the README's stated 12,500 bytes/s (idle, 2 threads)
  is shown beside it.
- datasets: encoding rate of a `.jsonl`, a `.parquet` and a `save_to_disk` folder into the cache.

Big files go to a temporary directory (`--workdir`, default under /tmp), with HIERTRANS_CACHE pointed
inside it, and are deleted at the end (`--keep` keeps them). Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine  # noqa: E402

GIB, MIB = 1 << 30, 1 << 20
STATED_LM_BYTES_PER_S = 12_500  # README: lm.yaml on an idle AVX-512 machine, two threads (an upper bound)
# short runs: two validation batches, no sanity check, an 8-byte text sample instead of 200 autoregressive steps
CLI_SHORT = ["--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--model.init_args.sample_length=8"]
BASELINE_BYTES = 1 * MIB  # the same runs on a 1 MiB corpus: what the process needs whatever the corpus
FIRST_STEP_MARK = "BENCH_FIRST_STEP"


class FirstStep(Callback):
    """Prints the seconds from process start to the first training batch (rank zero), for `startup`."""

    def __init__(self) -> None:
        self.seen = False

    def on_train_batch_start(self, trainer, *args) -> None:
        if not self.seen and trainer.global_rank == 0:
            started = psutil.Process().create_time()
            print(f"{FIRST_STEP_MARK} {time.time() - started:.2f}", flush=True)
        self.seen = True


# ---------------------------------------------------------------------------------------------
# big files


def text_block(size: int = 64 * MIB) -> bytes:
    """Real text to repeat: the stdlib corpus (Python source), cut to `size` bytes."""
    from datamodules.corpus import load_corpus

    stdlib = load_corpus(None)
    block = bytes(stdlib[: min(size, len(stdlib))].numpy())
    return (block * (size // len(block) + 1))[:size]


def write_text_file(path: Path, size: int, block: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    return path


# ---------------------------------------------------------------------------------------------
# process-tree memory


def _anon_bytes(pid: int) -> int:
    """RssAnon: memory that belongs to the process alone (a copy of the corpus would show here)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak memory of a process and its descendants, sampled every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak = {"rss_max_process": 0, "rss_sum": 0, "uss_sum": 0, "pss_sum": 0, "anon_sum": 0, "processes": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            sample = {"rss_max_process": 0, "rss_sum": 0, "uss_sum": 0, "pss_sum": 0, "anon_sum": 0,
                      "processes": len(procs)}
            for p in procs:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                sample["rss_max_process"] = max(sample["rss_max_process"], info.rss)
                sample["rss_sum"] += info.rss
                sample["uss_sum"] += info.uss
                sample["pss_sum"] += getattr(info, "pss", 0)
                sample["anon_sum"] += _anon_bytes(p.pid)
            for key, value in sample.items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {k: (round(v / GIB, 3) if k != "processes" else v) for k, v in self.peak.items()}


def run_cli(cwd: Path, env: dict, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, dict, float]:
    """`python -m hiertrans <args>` in `cwd`; returns the process, its tree's peak memory (GiB) and wall time."""
    cmd = [sys.executable, "-m", "hiertrans", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        peak = memory.stop()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{err[-3000:]}")
    return result, peak, time.perf_counter() - start


def first_step_seconds(stdout: str) -> float | None:
    return next((float(line.split()[1]) for line in stdout.splitlines() if line.startswith(FIRST_STEP_MARK)), None)


# ---------------------------------------------------------------------------------------------
# the parts


def bench_memory(work: Path, env: dict, corpus: Path, ddp: bool, *extra: str) -> dict:
    args = ["fit", "--config", "lm.yaml", f"--data.init_args.path={corpus}", "--trainer.max_steps=5", *CLI_SHORT,
            *extra]
    if ddp:
        args += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    _, peak, seconds = run_cli(run_dir, env, *args)
    return {"corpus_gib": round(corpus.stat().st_size / GIB, 3), "ranks": 2 if ddp else 1,
            "wall_s": round(seconds, 1), **{f"peak_{k}_gib" if k != "processes" else k: v for k, v in peak.items()}}


def bench_startup(work: Path, env: dict, directory: Path) -> dict:
    """First run builds the cache (timed); the second is the start-up with the cache in place."""
    from datamodules.corpus import cache_entry, find_source

    args = ["fit", "--config", "lm.yaml", f"--data.init_args.path={directory}", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", *CLI_SHORT[1:], "--trainer.callbacks+=bench.text_data.FirstStep"]
    size = sum(f.stat().st_size for f in directory.iterdir())
    run_dir = work / "run_startup"
    run_dir.mkdir(exist_ok=True)
    build = time.perf_counter()
    os.environ["HIERTRANS_CACHE"] = env["HIERTRANS_CACHE"]
    from datamodules.corpus import load_corpus

    load_corpus(directory)  # the one-time build, in this process
    build = time.perf_counter() - build
    entry = cache_entry(find_source(directory))
    results = {"corpus_gib": round(size / GIB, 2), "files": len(list(directory.iterdir())),
               "cache_build_s": round(build, 1), "cache_build_mib_per_s": round(size / MIB / build, 1),
               "cache_entry": entry.name}
    # in-process: the datamodule's share of the start-up (find, fingerprint, map, split, first batch)
    code = (f"import time, sys; sys.path.insert(0, {str(ROOT)!r}); from datamodules import ByteTextDataModule;"
            f"t = time.perf_counter(); dm = ByteTextDataModule({str(directory)!r}); dm.setup('fit');"
            "b = next(iter(dm.train_dataloader())); print(round(time.perf_counter() - t, 3), len(dm.data))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    results["setup_and_first_batch_s"] = float(out.split()[0])
    proc, peak, wall = run_cli(run_dir, env, *args)
    results.update(cli_first_step_s=first_step_seconds(proc.stdout), cli_wall_s=round(wall, 1),
                   cli_peak_rss_gib=peak["rss_max_process"])
    # the floor: the same command on a 1 MiB file (imports, model, first step; no corpus to speak of)
    small = write_text_file(work / "small.txt", BASELINE_BYTES, text_block(BASELINE_BYTES))
    proc, _, _ = run_cli(run_dir, env, *[a if not a.startswith("--data.init_args.path=") else
                                         f"--data.init_args.path={small}" for a in args])
    results["cli_first_step_s_1mib_corpus"] = first_step_seconds(proc.stdout)
    return results


def measure_lm_bytes_per_s(steps: int = 4) -> float | None:
    """Bytes/s the default LM (configs/lm.yaml's model and batch) trains at here: fwd + bwd + AdamW."""
    import yaml

    from hiertrans import HierarchicalTransformer

    cfg = yaml.safe_load((ROOT / "configs" / "lm.yaml").read_text())
    model_args = cfg["model"]["init_args"]["net"]["init_args"]  # the network the task trains
    data_args = cfg["data"]["init_args"]
    model = HierarchicalTransformer(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in model_args.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (data_args["batch_size"], data_args["seq_len"] + 1))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss, _ = model(batch, return_loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return data_args["batch_size"] * data_args["seq_len"] / (sum(times) / len(times))


def bench_loader(big: Path, batches: int) -> dict:
    """The train loader alone, lm.yaml's batch settings, over random crops of the big file."""
    import yaml

    from datamodules import ByteTextDataModule

    data_args = yaml.safe_load((ROOT / "configs" / "lm.yaml").read_text())["data"]["init_args"]
    dm = ByteTextDataModule(str(big), seq_len=data_args["seq_len"], batch_size=data_args["batch_size"],
                            num_workers=data_args["num_workers"], val_fraction=data_args["val_fraction"],
                            test_fraction=data_args["test_fraction"],
                            train_samples_per_epoch=batches * data_args["batch_size"])
    dm.setup("fit")
    loader = dm.train_dataloader()
    start, seen, count = time.perf_counter(), 0, 0
    for batch in loader:
        seen += batch[:, 1:].numel()  # target bytes: what the LM consumes per step
        count += 1
    seconds = time.perf_counter() - start
    result = {"batches": count, "batch_shape": list(batch.shape), "loader_bytes_per_s": round(seen / seconds),
              "loader_batches_per_s": round(count / seconds, 1)}
    try:
        lm = measure_lm_bytes_per_s()
    except Exception as err:  # the model API may move under us: the stated figure still stands
        print(f"(could not measure the LM: {err})")
        lm = None
    result["lm_bytes_per_s_measured"] = round(lm) if lm else None
    result["lm_bytes_per_s_stated"] = STATED_LM_BYTES_PER_S
    reference = max(lm or 0, STATED_LM_BYTES_PER_S)
    result["loader_vs_lm"] = round(seen / seconds / reference, 1)
    result["reference"] = "max(measured, stated)"
    return result


def bench_datasets(work: Path, size: int, block: bytes) -> dict:
    """Encode a .jsonl, a .parquet and a save_to_disk folder of ~`size` bytes of 4 KiB documents."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamodules import corpus

    doc = 4096
    texts = [block[i : i + doc].decode("utf-8", errors="ignore") for i in range(0, len(block) - doc, doc)]
    rows = (texts * (size // len(block) + 1))[: max(1, size // doc)]
    with open(work / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    pq.write_table(pa.table({"text": rows}), work / "docs.parquet")
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(work / "docs_saved"))
    out = {}
    for name in ("docs.jsonl", "docs.parquet", "docs_saved"):
        path = work / name
        start = time.perf_counter()
        data = corpus.load_corpus(path)
        seconds = time.perf_counter() - start
        out[name] = {"rows": len(rows), "corpus_mib": round(len(data) / MIB, 1), "encode_s": round(seconds, 1),
                     "mib_per_s": round(len(data) / MIB / seconds, 1)}
        corpus._MAPS.clear()  # as in a new process (dropping earlier maps is not part of the load)
        start = time.perf_counter()
        corpus.load_corpus(path)
        out[name]["cached_load_s"] = round(time.perf_counter() - start, 4)
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=["memory", "ddp", "startup", "loader", "datasets"],
                        choices=["memory", "ddp", "startup", "loader", "datasets"])
    parser.add_argument("--rss-gib", type=float, default=3.0, help="size of the text file of memory/ddp/loader")
    parser.add_argument("--startup-gib", type=float, default=10.0, help="size of the directory corpus of startup")
    parser.add_argument("--datasets-mib", type=float, default=512.0, help="size of each data set of datasets")
    parser.add_argument("--loader-batches", type=int, default=3000)
    parser.add_argument("--workdir", type=Path, default=None, help="where big files go (default: a new /tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the big files and caches")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hiertrans-text-bench-", dir=args.workdir))
    env = {**os.environ, "HIERTRANS_CACHE": str(work / "cache"), "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    os.environ["HIERTRANS_CACHE"] = env["HIERTRANS_CACHE"]
    results: dict = {"machine": machine(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}
    print(f"{results['machine']}; {results['ram_gib']} GiB RAM", flush=True)
    try:
        block = text_block()
        big = work / "big.txt"
        if {"memory", "ddp", "loader"} & set(args.only):
            write_text_file(big, int(args.rss_gib * GIB), block)
        small = write_text_file(work / "small.txt", BASELINE_BYTES, text_block(BASELINE_BYTES))
        for part, ddp in (("memory", False), ("ddp", True)):
            if part not in args.only:
                continue
            for name, corpus in (("1 MiB corpus (baseline)", small), (f"{args.rss_gib:g} GiB corpus", big)):
                key = f"{part}_{'2_ranks' if ddp else '1_process'}_{corpus.stem}"
                results[key] = bench_memory(work, env, corpus, ddp=ddp)
                print(f"memory, {'2 DDP ranks' if ddp else '1 process'}, {name}:", json.dumps(results[key]),
                      flush=True)
            if not ddp:  # the training step's share: the same run with the blocks recomputed in the backward
                key = f"memory_1_process_{big.stem}_grad_checkpointing"
                results[key] = bench_memory(work, env, big, False, "--model.init_args.grad_checkpointing=true")
                print(f"memory, 1 process, {args.rss_gib:g} GiB corpus, grad_checkpointing:", json.dumps(results[key]),
                      flush=True)
        if "loader" in args.only:
            results["loader"] = bench_loader(big, args.loader_batches)
            print("loader:", json.dumps(results["loader"]), flush=True)
        big.unlink(missing_ok=True)
        if "startup" in args.only:
            directory = work / "corpus_dir"
            n_files = max(1, round(args.startup_gib))
            for i in range(n_files):
                write_text_file(directory / f"part{i:03d}.txt", int(args.startup_gib * GIB / n_files), block)
            results["startup"] = bench_startup(work, env, directory)
            print("startup:", json.dumps(results["startup"]), flush=True)
            shutil.rmtree(directory)
        if "datasets" in args.only:
            results["datasets"] = bench_datasets(work, int(args.datasets_mib * MIB), block)
            print("datasets:", json.dumps(results["datasets"]), flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
