"""Where does hierarchy pay? Flat vs lucidrains-style hierarchical vs Hourglass at equal training time.

    python bench/lm_quality.py --context 256 2048 --cpu-minutes 3                 # a quick look, one seed
    python bench/lm_quality.py --context 2048 256 --cpu-minutes 5 --parallel 3 --plot docs/lm_quality.png

Three families at about equal parameters (2.31-2.34M; printed), per context:

- flat: `Transformer`, lm_flat.yaml's network (dim 192, depth 5, full causal attention);
- hierarchical: `HierarchicalTransformer`, lm.yaml's network (dim 128, depth 4, hierarchies (1, 2),
  windows (32, None)); at 2048 bytes its 2x hierarchy takes stride 2 (a token per pair, not per byte);
- hourglass: `HourglassTransformer`, lm_hourglass.yaml's network (dim 160, layers 2-3-2, the middle
  three on pairs); at 2048 bytes the middle layers see quads (average pooling keeps the parameter
  count) and the full-resolution layers attend over a 128-byte window.

One recipe for all, lm.yaml's but a shorter warm-up: AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1
on matrices), 30 warm-up steps then cosine to 0.1x over the run's expected length (from the first steps' speed),
gradient clipping 1.0, 4096 bytes per step (16 x 256, 2 x 2048), the task's loss
(`lit_modules.LanguageModel.losses`: cross-entropy plus the network's weighted auxiliary losses).

Time is CPU time, not wall clock: each run trains until its own process has spent `--cpu-minutes`
of CPU time (`time.process_time`, all its threads together) in training steps, with a fixed number
of torch threads (`--threads`, default 1, printed), in a fresh process of its own. On a shared
machine the wall clock of a run depends on what else runs; the CPU time it needs does much less
(with one thread there is no spin-waiting of idle OpenMP workers to count either), so the runs of
all families can go `--parallel` and still be compared at equal compute. Each run is evaluated on
the whole validation split (bits per byte over every byte of it, exactly, as `val/bpb`) at
`--evals` evenly spaced moments of its training CPU time; evaluation time is not training time.
Wall seconds are recorded beside (they are not what the curves are drawn against).
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, params  # noqa: E402

TOKENS_PER_STEP = 4096
# lm.yaml's recipe, but 30 warm-up steps: a run here is 100-1000 steps, not 700 (a 2048-byte flat run
# on one thread does ~100 in 6 CPU minutes, and would otherwise never leave its warm-up)
RECIPE = dict(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=30, min_lr_ratio=0.1, clip=1.0)


def families(context: int) -> dict[str, tuple[str, dict]]:
    """name -> (class in hiertrans, arguments) at `context` bytes; about 2.3M parameters each."""
    long = context >= 1024
    common = dict(num_tokens=256, seq_len=context)
    return {
        "flat": ("Transformer", dict(common, dim=192, depth=5, heads=6, dim_head=32)),
        "hierarchical": ("HierarchicalTransformer", dict(
            common, dim=128, depth=4, heads=4, dim_head=32, hierarchies=(1, 2), window_sizes=(32, None),
            hierarchical_stride=(1, 2) if long else 1, recon_loss_weight=0.1, hierarchical_ar_loss_weight=0.25,
            ignore_index=-1)),
        "hourglass": ("HourglassTransformer", dict(
            common, dim=160, depths=(2, 3, 2), heads=5, dim_head=32, shorten_factors=(4,) if long else (2,),
            downsample="average" if long else "linear", window_size=128 if long else None)),
    }


def build(family: str, context: int) -> torch.nn.Module:
    import hiertrans

    name, kwargs = families(context)[family]
    return getattr(hiertrans, name)(**kwargs)


@torch.no_grad()
def val_bpb(task, loader) -> float:
    """Bits per byte over every byte of the validation split (weighted as the task's `val/bpb`)."""
    from lit_modules.language_model import IGNORE_INDEX

    task.eval()
    total, count = 0.0, 0
    for batch in loader:
        _, ce, _, labels = task.losses(batch)
        n = int((labels != IGNORE_INDEX).sum())
        total, count = total + float(ce) * n, count + n
    task.train()
    return total / count / math.log(2)


def run(family: str, context: int, seed: int, minutes: float, evals: int, val_fraction: float,
        threads: int) -> dict:
    """One training run (in a process of its own): the curve [(training CPU seconds, steps, val bpb)]."""
    from datamodules import ByteTextDataModule
    from hiertrans.optim import WarmupCosineLR, param_groups
    from lit_modules import LanguageModel

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(seed)
    net = build(family, context)
    task = LanguageModel(net)
    data = ByteTextDataModule(seq_len=context, batch_size=TOKENS_PER_STEP // context, val_fraction=val_fraction,
                              test_fraction=val_fraction, train_samples_per_epoch=10**7, seed=seed)
    data.setup("fit")
    optimizer = torch.optim.AdamW(param_groups(net, RECIPE["weight_decay"], task.no_decay), lr=RECIPE["lr"],
                                  betas=RECIPE["betas"])
    schedule = WarmupCosineLR(optimizer, warmup_steps=RECIPE["warmup_steps"], min_lr_ratio=RECIPE["min_lr_ratio"])
    batches = iter(data.train_dataloader())
    val = data.val_dataloader()

    def step() -> None:
        loss = task.losses(next(batches))[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), RECIPE["clip"])
        optimizer.step()
        schedule.step()

    budget = minutes * 60
    trained, steps, curve, started, wall = 0.0, 0, [], time.perf_counter(), 0.0
    marks = [budget * (i + 1) / evals for i in range(evals)]
    while trained < budget:
        begin, begin_wall = time.process_time(), time.perf_counter()
        step()
        trained += time.process_time() - begin  # this process's CPU time, all threads: the budget
        wall += time.perf_counter() - begin_wall
        steps += 1
        if steps == 10:  # the run's expected length, from its own speed: the cosine ends near the budget
            schedule.set_total_steps(max(steps + 1, round(budget / (trained / steps))))
        if trained >= marks[len(curve)] or trained >= budget:
            curve.append((trained, steps, val_bpb(task, val)))
    return dict(family=family, context=context, seed=seed, params=params(net), steps=steps, threads=threads,
                train_cpu_seconds=trained, train_wall_seconds=wall, wall_seconds=time.perf_counter() - started,
                tokens_per_cpu_sec=steps * TOKENS_PER_STEP / trained, curve=curve, bpb=curve[-1][2])


def run_all(jobs: list[tuple], parallel: int):
    """`run(*job)` for every job, each in a fresh spawned process (no heap or thread-pool state carried
    over), `parallel` at a time; yields the results as they finish."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        for future in as_completed([pool.submit(run, *job) for job in jobs]):
            yield future.result()


def plot(results: list[dict], path: Path) -> None:
    """Bits per byte against training minutes, one panel per context, one colour per family."""
    from matplotlib.figure import Figure

    from hiertrans.io import atomic_write

    contexts = sorted({r["context"] for r in results})
    colours = {"flat": "tab:gray", "hierarchical": "tab:blue", "hourglass": "tab:orange"}
    figure = Figure(figsize=(5.5 * len(contexts), 4.2), layout="constrained")
    for axes, context in zip(figure.subplots(1, len(contexts), squeeze=False)[0], contexts):
        labelled = set()
        for r in (r for r in results if r["context"] == context):
            minutes = [t / 60 for t, _, _ in r["curve"]]  # training CPU minutes
            label = None if r["family"] in labelled else f"{r['family']} ({r['params'] / 1e6:.2f}M)"
            labelled.add(r["family"])
            axes.plot(minutes, [bpb for _, _, bpb in r["curve"]], marker="o", markersize=3,
                      color=colours.get(r["family"]), label=label, alpha=0.85)
        axes.set(title=f"context {context} bytes", ylabel="validation bits per byte",
                 xlabel=f"training CPU minutes ({results[0]['threads']} torch thread(s) per run)")
        axes.grid(alpha=0.3)
        axes.legend()
    with atomic_write(path) as f:
        figure.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[256, 2048], help="bytes of context")
    parser.add_argument("--models", nargs="+", default=["flat", "hierarchical", "hourglass"],
                        choices=["flat", "hierarchical", "hourglass"])
    parser.add_argument("--cpu-minutes", type=float, default=10.0, help="training CPU time per run")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (each in its own process)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--evals", type=int, default=8, help="validations per run (the curve's points)")
    parser.add_argument("--val-fraction", type=float, default=0.005)
    parser.add_argument("--plot", type=Path, default=Path("docs/lm_quality.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write every curve here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (fixed)")
    args = parser.parse_args()
    print(machine())
    print(f"{args.cpu_minutes} training CPU minutes per run (time.process_time of the run's process), "
          f"{args.threads} torch thread(s) per run, {args.parallel} run(s) at once, seeds {args.seeds}, contexts "
          f"{args.context}, {TOKENS_PER_STEP} bytes a step, {args.evals} validations per run, one process per run")
    for context in args.context:
        for family in args.models:
            name, kwargs = families(context)[family]
            print(f"  {context:>5} {family:<13} {params(build(family, context)):>10,}  {name}({kwargs})")

    # seeds outermost: a whole comparison lands early
    jobs = [(family, context, seed, args.cpu_minutes, args.evals, args.val_fraction, args.threads)
            for seed in args.seeds for context in args.context for family in args.models]
    results = []
    for result in run_all(jobs, args.parallel):
        results.append(result)
        print(f"done: {result['family']} @ {result['context']}, seed {result['seed']}: {result['steps']} steps, "
              f"{result['tokens_per_cpu_sec']:.0f} bytes per CPU second, {result['train_wall_seconds']:.0f} s wall "
              f"in training, val bpb {result['bpb']:.4f}; curve (CPU minutes: val bpb) "
              + ", ".join(f"{t / 60:.1f}: {bpb:.3f}" for t, _, bpb in result["curve"]), flush=True)
        save(results, args)  # after every run: a long sweep stopped early keeps what it measured

    print(f"\n{'context':>7} {'model':<13}{'params':>11}{'steps':>8}{'B/CPU-s':>9}{'val bpb':>9}{'seeds':>25}"
          f"{'vs flat':>9}")
    for context in args.context:
        flat = [r["bpb"] for r in results if r["context"] == context and r["family"] == "flat"]
        for family in args.models:
            runs = [r for r in results if r["context"] == context and r["family"] == family]
            bpb = statistics.mean(r["bpb"] for r in runs)
            versus = f"{bpb / statistics.mean(flat) - 1:+.1%}" if flat else ""
            per_seed = " ".join(f"{r['bpb']:.4f}" for r in runs)
            print(f"{context:>7} {family:<13}{runs[0]['params']:>11,}{statistics.mean(r['steps'] for r in runs):>8.0f}"
                  f"{statistics.mean(r['tokens_per_cpu_sec'] for r in runs):>9.0f}{bpb:>9.4f}{per_seed:>25}{versus:>9}")
    print("curves (training CPU minutes: val bpb):")
    for r in results:
        print(f"  {r['family']} @ {r['context']} seed {r['seed']}: "
              + ", ".join(f"{t / 60:.1f}: {bpb:.3f}" for t, _, bpb in r["curve"]))
    print(f"curves drawn to {args.plot}" + (f", every curve in {args.json}" if args.json else ""))
    print(machine().rsplit("; ", 1)[-1] + " at the end")


def save(results: list[dict], args) -> None:
    plot(results, args.plot)
    if args.json:
        from hiertrans.io import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
