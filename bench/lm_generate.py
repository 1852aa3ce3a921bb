"""Generation speed: new bytes/s of our cached `generate` vs simple-hierarchical-transformer's.

    pip install ".[bench]"
    python bench/lm_generate.py                 # lm.yaml's model; 256, 1,024 and 4,096 new bytes; batch 1 and 4
    python bench/lm_generate.py --new 256 --batch 1 --rounds 5
    python bench/lm_generate.py --new 256 --cpu-kernels gelu   # an optional CPU kernel, on every contender
    python bench/lm_generate.py --new 256 --batch 1 --dim 32    # a narrower network (heads of 32 features)

Both models are lm.yaml's network (dim 128, depth 4, hierarchies (1, 2), windows (32, None),
seq_len 256) from the same seed, in eval mode, sampling with the same settings (temperature 1.0,
top 10% of bytes, Gumbel noise) after the same 16-byte prompt of real text. Each contender runs in
a process of its own (`bench.common.StepWorker`), timed alternately round by round; medians.

- ours (cached): `generate` on the key/value caches: the prompt once, then one position per byte;
  past the 256-byte context it drops the oldest 64 bytes and rebuilds the cache from the rest.
- ours (uncached): `generate(..., use_cache=False)`: the whole context (the last 256 bytes) per byte.
- ours (cached, compiled): the same with `compile=True`: the one-byte decode step through
  `torch.compile` (prompts stay eager); its compilation happens in the worker's warm-up (a
  generation past the context, so that every phase and the sliding are compiled) and is printed,
  not timed.
- reference: `simple_hierarchical_transformer.HierarchicalTransformer.generate`, which runs the
  whole context per byte too.
- reference (compiled), with `--compiled-reference`: its `forward` through `torch.compile` at the
  full context only (one static graph; shorter contexts stay eager). Compiled for every length it
  would recompile per length (local-attention's `pad_to_multiple` branches on it; 1-8 minutes each
  on a 2-core CPU) until torch's recompile limit sends the rest back to eager. Its full-context
  steps are what the 1,024 and 4,096 figures extrapolate from, so there the compiled ratio is
  compiled against compiled; its 256-byte row is mostly eager steps (marked).

With `--cpu-kernels [NAMES]`, every contender runs a second time with those `hiertrans.cpu_kernels`
swapped into its model (the same swap on both sides; rows marked `+ kernels`, ratios within them):
`gelu` computes small GELUs outside autograd (a decoding step's) on native kernels instead of
oneDNN's; the reference's full-context GELUs are too large for it and stay as they are.

With `--keep-heap`, every contender runs with glibc keeping the memory it frees (`bench.common.KEEP_HEAP`):
by default a full-context forward maps and page-faults its large temporaries afresh at every byte.

Columns: `cached / this` is eager against eager (ours cached vs this contender); `compiled cached /
this` is ours compiled against this contender: against the eager reference it is not like for like
(labelled so in the docs); against `reference (compiled)` at 1,024 and 4,096 bytes it is.

The uncached loops cost the same per byte once the context is full, so they are timed at 256 new
bytes and at 256 + `--tail` (a sample of full-context steps), and their times at 1,024 and 4,096
are extrapolated from that per-byte cost (printed as such). Ours (cached) is timed at every length.
"""

import argparse
import inspect
import json.decoder
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import KEEP_HEAP, StepWorker, machine, params  # noqa: E402
from hiertrans import HierarchicalTransformer, cpu_kernels  # noqa: E402

LM_YAML = dict(num_tokens=256, dim=128, depth=4, seq_len=256, heads=4, dim_head=32, ff_mult=4, hierarchies=(1, 2),
               window_sizes=(32, None), hierarchical_stride=1)
SAMPLING = dict(temperature=1.0, filter_thres=0.9)
CONTENDERS = ("ours (cached)", "ours (cached, compiled)", "ours (uncached)", "reference")
CACHED = ("ours (cached)", "ours (cached, compiled)")  # timed at every length; the others extrapolated


def network(dim: int = LM_YAML["dim"]) -> dict:
    """lm.yaml's network, or the same at another width `dim` (heads of 32 features each)."""
    if dim < 1 or dim % LM_YAML["dim_head"]:
        raise ValueError(f"--dim must be a positive multiple of dim_head={LM_YAML['dim_head']}, got {dim}")
    return {**LM_YAML, "dim": dim, "heads": dim // LM_YAML["dim_head"]}


def build(name: str, dim: int = LM_YAML["dim"]) -> torch.nn.Module:
    """A contender's model: `network(dim)` from the same seed."""
    torch.manual_seed(0)
    config = network(dim)
    if name.startswith("reference"):
        from simple_hierarchical_transformer import HierarchicalTransformer as Reference

        return Reference(**config).eval()
    return HierarchicalTransformer(**config, ignore_index=-1).eval()


def prompt(batch: int, length: int) -> torch.Tensor:
    text = inspect.getsource(json.decoder).encode()[:length]
    return torch.tensor(list(text), dtype=torch.long).expand(batch, -1).contiguous()


def compiled_at_context(forward, context: int):
    """`forward` through one static torch.compile graph for inputs of the full context, eager otherwise.

    The reference's generate passes `out[:, -context:]`, a view whose row stride grows by one per byte:
    a static graph would recompile for every stride (at batch 1 too, where the view counts as contiguous),
    so the compiled path gets a copy with standard strides."""
    compiled = torch.compile(forward, dynamic=False)

    def call(x: torch.Tensor, **kwargs):
        if x.shape[-1] != context:
            return forward(x, **kwargs)
        return compiled(x.clone(memory_format=torch.contiguous_format), **kwargs)

    return call


def make_generate(name: str, new: int, batch: int, prompt_len: int, kernels: tuple[str, ...] | None = None,
                  dim: int = LM_YAML["dim"]):
    """Runs in a worker process: one call generates `new` bytes after the prompt; `kernels`: the
    `hiertrans.cpu_kernels` swapped into the model (any contender's, through the same swap)."""
    model, ids = build(name, dim), prompt(batch, prompt_len)
    if kernels is not None:
        cpu_kernels.apply(model, kernels=kernels)
    options = {"ours (uncached)": dict(use_cache=False), "ours (cached, compiled)": dict(compile=True)}.get(name, {})
    warmup = 8
    if "compiled" in name:  # compile every phase and the sliding context now, not in a timed call
        warmup = new + LM_YAML["seq_len"]
        if name == "reference (compiled)":
            model.forward = compiled_at_context(model.forward, LM_YAML["seq_len"])

    def generate():
        torch.manual_seed(0)
        return model.generate(ids, new, **SAMPLING, **options)

    start = time.perf_counter()
    model.generate(ids, warmup, **SAMPLING, **options)  # warm-up: allocator, caches, compilation
    if "compiled" in name:
        print(f"  {name}, batch {batch}, {new} new bytes: warm-up with compilation {time.perf_counter() - start:.0f} s",
              flush=True)
    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, nargs="+", default=[256, 1024, 4096], help="new bytes per call")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tail", type=int, default=64, help="full-context steps timed for the uncached loops")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                        help="a subset to time (ours (cached) always runs: every ratio is against it)")
    parser.add_argument("--compiled-reference", action="store_true",
                        help="also time the reference with its forward compiled (slow to compile)")
    parser.add_argument("--cpu-kernels", nargs="*", choices=tuple(cpu_kernels.KERNELS), default=None,
                        help="swap these hiertrans.cpu_kernels (none named: all) into every contender's model")
    parser.add_argument("--dim", type=int, default=LM_YAML["dim"],
                        help="model width for every contender (heads of 32 features; default lm.yaml's 128)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="every contender with glibc keeping freed memory (bench.common.KEEP_HEAP)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    context = LM_YAML["seq_len"]
    print(machine())
    width = "" if args.dim == LM_YAML["dim"] else f" at dim {args.dim} ({network(args.dim)['heads']} heads)"
    print(f"model: lm.yaml's HierarchicalTransformer{width} ({params(build('ours', args.dim)):,} parameters; the "
          f"reference {params(build('reference', args.dim)):,}), seq_len {context}, eval mode; sampling {SAMPLING} "
          f"after a {args.prompt_len}-byte prompt; one process per contender, {args.rounds} alternating rounds")

    # (contender, batch, new bytes, kernels) -> worker; the uncached loops at 256 and 256 + tail only
    uncached_lengths = sorted({min(n, context) for n in args.new} | {context + args.tail})
    chosen = set(args.contenders) | {"ours (cached)"}
    contenders = tuple(c for c in CONTENDERS if c in chosen)
    contenders += ("reference (compiled)",) if args.compiled_reference else ()
    kernels = None if args.cpu_kernels is None else tuple(args.cpu_kernels or cpu_kernels.KERNELS)
    variants = (None,) + ((kernels,) if kernels else ())  # plain, and with the kernels on every contender
    if args.keep_heap:
        print(f"every contender with glibc keeping freed memory: {KEEP_HEAP}")
    if kernels:
        print(f"rows '+ kernels': every contender with hiertrans.cpu_kernels {', '.join(kernels)} (the same swap)")
    jobs = [(name, batch, new, variant) for batch in args.batch for variant in variants for name in contenders
            for new in (args.new if name in CACHED else uncached_lengths)]
    env = KEEP_HEAP if args.keep_heap else None
    workers = {job: StepWorker(partial(make_generate, job[0], job[2], job[1], args.prompt_len, job[3], args.dim),
                               "cpu", args.threads, warmup=0, env=env) for job in jobs}
    seconds: dict[tuple, list[float]] = {job: [] for job in jobs}
    for _ in range(args.rounds):
        for job, worker in workers.items():
            seconds[job].append(worker.time())
    faulted = {job: worker.faulted_bytes() / 2**20 for job, worker in workers.items()}  # MiB per call
    for worker in workers.values():
        worker.close()
    median = {job: statistics.median(s) for job, s in seconds.items()}

    def estimate(name: str, batch: int, new: int, variant) -> tuple[float, bool]:
        """Seconds for `new` bytes, and whether extrapolated from the full-context per-byte cost."""
        if (name, batch, new, variant) in median:
            return median[(name, batch, new, variant)], False
        at_context = median[(name, batch, context, variant)]
        longer = median[(name, batch, context + args.tail, variant)]
        return at_context + (new - context) * (longer - at_context) / args.tail, True

    def label(name: str, variant) -> str:
        return name if variant is None else f"{name} + kernels"

    print(f"\n{'batch':>5} {'new bytes':>9} {'contender':<34}{'seconds':>9}{'new bytes/s':>13}"
          f"{'cached / this':>15}{'compiled cached / this':>24}")
    for batch in args.batch:
        for new in args.new:
            for variant in variants:  # ratios within a variant: the same kernels on both sides
                cached, _ = estimate("ours (cached)", batch, new, variant)
                compiled = estimate(CACHED[1], batch, new, variant)[0] if CACHED[1] in chosen else None
                for name in contenders:
                    s, extrapolated = estimate(name, batch, new, variant)
                    eager_ratio = "" if name in CACHED or name == "reference (compiled)" else f"{s / cached:.1f}x"
                    compiled_ratio = ("" if name in CACHED or name == "ours (uncached)" or compiled is None
                                      else f"{s / compiled:.1f}x")
                    mark = " (extrapolated)" if extrapolated else ""
                    if name == "reference (compiled)" and not extrapolated:
                        mark = " (mostly eager: below the context)"
                    print(f"{batch:>5} {new:>9} {label(name, variant):<34}{s:>9.2f}{batch * new / s:>13.0f}"
                          f"{eager_ratio:>15}{compiled_ratio:>24}{mark}")
    print("\nper round (s): " + "; ".join(f"{label(name, variant)} b{batch} {new}: "
                                         + "/".join(f"{t:.2f}" for t in seconds[(name, batch, new, variant)])
                                         for name, batch, new, variant in jobs))
    print("faulted MiB per call (page faults of freshly mapped memory): " + "; ".join(
        f"{label(name, variant)} b{batch} {new}: {faulted[(name, batch, new, variant)]:.0f}"
        for name, batch, new, variant in jobs))
    print(machine().rsplit("; ", 1)[-1] + " at the end")


if __name__ == "__main__":
    main()
