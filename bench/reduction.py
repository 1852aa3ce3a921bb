"""Segment reduction: HierarchyReduction1d against the seed's sketch, Python loops and the bandwidth floor.

    PYTHONPATH=. python bench/reduction.py      # 1M tokens in 100k segments, dim 256, float32

One packed level `x (tokens, dim)` split into random segments (some empty), reduced to
`(segments, dim)`; forward, and forward + backward of a random upstream gradient into `x.grad`.
  ours           HierarchyReduction1d("sum" / "mean" / ...), offsets validated (check=True)
  (a) seed       the sketch: list of slices -> torch.nested.nested_tensor (a detached copy) ->
                 transpose(1, 2).contiguous() -> sum(-1, keepdim=True) -> stack(unbind()); strided
                 nested tensors have no mean, so mean = that sum / lengths. Forward only: the nested
                 tensor is detached, there is no backward.
  (b) loop       torch.stack([x[s:e].sum(0) for s, e in slices]); its backward is quadratic (every
                 slice's backward materialises a zero-filled gradient of all of x), so fwd+bwd is
                 measured on small subsets and extrapolated (said so in the output)
  (b') split     the same loop over x.split(lengths): backward is quadratic here too (measured),
                 so it is treated like (b)
  (c) floor      x.sum(0): one full reduction of the same tensor, and its backward (the broadcast
                 gradient written into x.grad); reading and writing x once is the memory floor
  segment_reduce torch.segment_reduce(x, "sum", lengths=...), the other vectorised candidate
Times are medians of alternating rounds; memory is the peak added during one call (RSS on CPU).
"""

import argparse
import ctypes
import gc
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import fmt_ratio, machine, peak_memory_during, timed  # noqa: E402
from hiertrans.reduction import HierarchyReduction1d  # noqa: E402

MiB = 2**20
try:
    TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    TRIM = None
# the seed's strided nested tensors warn that they are a prototype: we know, that is the point
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")


def layout(tokens: int, segments: int, gen: torch.Generator) -> torch.Tensor:
    """Offsets `(segments + 1,)` at uniformly random cut points: geometric-ish lengths, some empty."""
    cuts = torch.randint(0, tokens + 1, (segments - 1,), generator=gen).sort().values
    return torch.cat((torch.tensor([0]), cuts, torch.tensor([tokens])))


class Case:
    """One packed level with its upstream gradient, and the methods to measure on it."""

    def __init__(self, tokens: int, segments: int, dim: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.offsets = layout(tokens, segments, gen)
        self.lengths = self.offsets.diff()
        self.slices = list(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()))
        self.x = torch.randn(tokens, dim, generator=gen).requires_grad_()
        self.grad = torch.randn(segments, dim, generator=gen)
        self.tokens, self.segments = tokens, segments
        names = ("sum", "mean", "max", "attention")
        self.reducers = {name: HierarchyReduction1d(name, dim=dim) for name in names}

    def ours(self, name: str, check: bool = True) -> torch.Tensor:
        return self.reducers[name](self.x, offsets=self.offsets, check=check)

    def seed(self, mean: bool = False) -> torch.Tensor:
        level = torch.nested.nested_tensor([self.x[i:j] for i, j in self.slices])  # copies and detaches
        reduction = level.transpose(1, 2).contiguous()
        reduction = reduction.sum(dim=-1, keepdim=True)  # nested tensors only reduce the last dim
        out = torch.stack(reduction.unbind()).squeeze(-1)
        return out / self.lengths.clamp(min=1)[:, None] if mean else out

    def loop(self) -> torch.Tensor:
        return torch.stack([self.x[s:e].sum(0) for s, e in self.slices])

    def split_loop(self) -> torch.Tensor:
        return torch.stack([p.sum(0) for p in self.x.split(self.lengths.tolist())])

    def floor(self) -> torch.Tensor:
        return self.x.sum(0)

    def segment_reduce(self) -> torch.Tensor:
        return torch.segment_reduce(self.x, "sum", lengths=self.lengths, unsafe=True)

    def run(self, forward: Callable[[], torch.Tensor], backward: bool) -> Callable[[], None]:
        def call():
            self.x.grad = None
            out = forward()
            if backward:
                out.backward(self.grad if out.shape == self.grad.shape else self.grad[0])
        return call


def measure(case: Case, methods: dict, rounds: int, device, warmup: bool = True) -> dict:
    """Median seconds per method over `rounds` alternating rounds (after one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values() if warmup else ():
        fn()
    order = list(methods.items())
    for r in range(rounds):  # rotate the order, so no method always runs right after the same one
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            times[name].append(timed(fn, device))
    case.x.grad = None
    return {name: statistics.median(t) for name, t in times.items()}


def memory(case: Case, fn: Callable[[], None], device) -> float:
    case.x.grad = None
    # hand freed heap back to the OS first: the Python loops leave ~100 MB of free chunks in the
    # heap, which malloc would reuse for the next tensors without the RSS growing
    gc.collect()
    if TRIM is not None:
        TRIM(0)
    _, peak = peak_memory_during(fn, device)
    case.x.grad = None
    return peak / MiB


def full_size(args, device) -> tuple[dict, dict]:
    """Median times and peak memory of every method at the full size."""
    case = Case(args.tokens, args.segments, args.dim)
    # sanity: every sum-like method agrees before anything is timed
    ref = case.ours("sum").detach()
    for name, out in (("seed", case.seed()), ("split loop", case.split_loop()),
                      ("segment_reduce", case.segment_reduce())):
        torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-3, msg=f"{name} disagrees")
    run = case.run
    fast = {
        ("ours sum", "fwd"): run(partial(case.ours, "sum"), False),
        ("ours sum, check=False", "fwd"): run(partial(case.ours, "sum", check=False), False),
        ("ours mean", "fwd"): run(partial(case.ours, "mean"), False),
        ("(c) floor x.sum(0)", "fwd"): run(case.floor, False),
        ("ours sum", "fwd+bwd"): run(partial(case.ours, "sum"), True),
        ("ours mean", "fwd+bwd"): run(partial(case.ours, "mean"), True),
        ("(c) floor x.sum(0)", "fwd+bwd"): run(case.floor, True),
        ("segment_reduce sum", "fwd+bwd"): run(case.segment_reduce, True),
    }
    slow = {  # seconds per call: fewer rounds, no warm-up
        ("ours max", "fwd+bwd"): run(partial(case.ours, "max"), True),
        ("ours attention", "fwd+bwd"): run(partial(case.ours, "attention"), True),
        ("(a) seed nested sum", "fwd"): run(case.seed, False),
        ("(a) seed nested mean", "fwd"): run(partial(case.seed, mean=True), False),
        ("(b) loop x[s:e].sum(0)", "fwd"): run(case.loop, False),
    }
    times = measure(case, fast, args.rounds, device)
    times |= measure(case, slow, args.slow_rounds, device, warmup=False)
    peaks = {key: memory(case, fn, device) for key, fn in (fast | slow).items()}
    return times, peaks


def loop_backward(method: str, tokens: int, mean_len: float, dim: int, device) -> tuple[int, int, float]:
    """A Python loop's fwd+bwd at a small size: its backward is quadratic, so it is only run small."""
    sub = Case(tokens, max(1, round(tokens / mean_len)), dim, seed=1)
    fn = sub.run(getattr(sub, method), True)
    return tokens, sub.segments, measure(sub, {method: fn}, 3, device)[method]


def extrapolate(points: list[tuple[int, int, float]], tokens: int) -> tuple[float, float, float, float]:
    """Extrapolate from the larger point to `tokens` with the growth exponent measured between the two
    points (clamped to [1, 2]), linearly (a lower bound) and quadratically (an upper bound: every
    slice's backward writes a gradient as big as all of x)."""
    (t1, _, sec1), (t2, _, sec2) = points
    exponent = math.log(sec2 / sec1) / math.log(t2 / t1)
    fitted = sec2 * (tokens / t2) ** min(2.0, max(1.0, exponent))
    return fitted, sec2 * tokens / t2, sec2 * (tokens / t2) ** 2, exponent


def quarter_size(args, device) -> dict[str, float]:
    """Peak memory of fwd+bwd at a quarter of the tokens: linear in tokens means ~4x less."""
    case = Case(args.tokens // 4, args.segments // 4, args.dim, seed=2)
    methods = {f"ours {r}": partial(case.ours, r) for r in ("sum", "mean", "max", "attention")}
    methods["(c) floor x.sum(0)"] = case.floor
    return {name: memory(case, case.run(fn, True), device) for name, fn in methods.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--segments", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds for the fast methods")
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds for the seed and the loops")
    parser.add_argument("--loop-subsets", type=int, nargs=2, default=(2_500, 5_000),
                        help="token counts (same mean segment length) for (b) fwd+bwd, quadratic")
    parser.add_argument("--split-subsets", type=int, nargs=2, default=(50_000, 100_000),
                        help="token counts for (b') fwd+bwd, quadratic as well")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: the 2 cores here are shared, and a second thread mostly waits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    mean_len = args.tokens / args.segments
    print(machine())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, dim {args.dim}; "
          f"{args.tokens:,} tokens in {args.segments:,} segments (mean length {mean_len:g}, "
          f"random cut points, so some segments are empty)\n")

    times, peaks = full_size(args, device)
    extrapolated = {}
    for key, method, subsets in ((("(b) loop x[s:e].sum(0)", "fwd+bwd"), "loop", args.loop_subsets),
                                 (("(b') loop over x.split", "fwd+bwd"), "split_loop", args.split_subsets)):
        points = [loop_backward(method, tokens, mean_len, args.dim, device) for tokens in subsets]
        extrapolated[key] = points, *extrapolate(points, args.tokens)
        times[key], peaks[key] = extrapolated[key][1], float("nan")
    quarter_peaks = quarter_size(args, device)

    ours_fwd, ours_fb = times[("ours sum", "fwd")], times[("ours sum", "fwd+bwd")]
    print(f"{'method':<26}{'pass':<9}{'median ms':>11}{'vs ours sum':>13}{'peak MiB':>10}")
    order = sorted(times, key=lambda k: (k[1] != "fwd", not k[0].startswith("ours"), k[0]))
    for key in order:
        name, kind = key
        note = "  <- EXTRAPOLATED, see below" if key in extrapolated else ""
        base = ours_fwd if kind == "fwd" else ours_fb
        peak = peaks[key]
        print(f"{name:<26}{kind:<9}{times[key] * 1e3:>11.1f}{fmt_ratio(times[key], base):>13}"
              f"{'-' if peak != peak else f'{peak:.0f}':>10}{note}")
    print("(a) seed: no backward (torch.nested.nested_tensor copies the slices out of the graph).")
    for (name, _), value in extrapolated.items():
        ((t1, s1, sec1), (t2, s2, sec2)), fitted, linear, quadratic, exponent = value
        print(f"{name} fwd+bwd NOT run at full size. Measured at {t1:,} tokens / {s1:,} segments: "
              f"{sec1:.3f} s, at {t2:,} / {s2:,}: {sec2:.3f} s: time grows as tokens^{exponent:.2f}.\n"
              f"    EXTRAPOLATED to {args.tokens:,} tokens with that exponent (clamped to [1, 2]): "
              f"{fitted:.0f} s (the table's figure); linear {linear:.1f} s, quadratic {quadratic:.0f} s.")

    print("\nTargets")
    seed_fwd = times[("(a) seed nested sum", "fwd")]
    seed_mean_fwd = times[("(a) seed nested mean", "fwd")]
    ours_mean_fwd, ours_mean_fb = times[("ours mean", "fwd")], times[("ours mean", "fwd+bwd")]
    floor_fwd, floor_fb = times[("(c) floor x.sum(0)", "fwd")], times[("(c) floor x.sum(0)", "fwd+bwd")]
    print(f"  faster than (a) seed, forward:            sum {fmt_ratio(seed_fwd, ours_fwd)}, "
          f"mean {fmt_ratio(seed_mean_fwd, ours_mean_fwd)}  (target >= 5x)")
    print(f"  ... our fwd+bwd against seed's fwd alone: sum {fmt_ratio(seed_fwd, ours_fb)}, "
          f"mean {fmt_ratio(seed_mean_fwd, ours_mean_fb)}")
    print(f"  against (c) floor, fwd+bwd:               sum {fmt_ratio(ours_fb, floor_fb)}, "
          f"mean {fmt_ratio(ours_mean_fb, floor_fb)}  (target <= 2x)")
    print(f"  against (c) floor, forward:               sum {fmt_ratio(ours_fwd, floor_fwd)}, "
          f"mean {fmt_ratio(ours_mean_fwd, floor_fwd)}")
    print(f"\nPeak memory of fwd+bwd, {args.tokens // 4:,} vs {args.tokens:,} tokens "
          f"(x alone is {args.tokens * args.dim * 4 / MiB:.0f} MiB at full size; its gradient is as big):")
    for name, small in quarter_peaks.items():
        big = peaks[(name, "fwd+bwd")]
        print(f"  {name:<22}{small:>8.0f} MiB -> {big:>6.0f} MiB  ({fmt_ratio(big, small)} for 4x tokens)")


if __name__ == "__main__":
    main()
