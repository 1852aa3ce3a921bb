"""Informational hierarchy reduction: packed segments of one level reduce to the next level's values.

A level is kept packed: `values (n, dim)` plus segment boundaries that split its rows into
consecutive segments (bytes into words, words into sentences, sentences into documents). Reducing
every segment to one row gives the next level's values; repeating that ends with one vector per
document, whatever the documents' lengths.

The seed sketch (seed 004) built a `torch.nested.nested_tensor` from a Python list of slices, which
copies the data and detaches it from the graph. Here the named reducers are one vectorised pass over
a segment-id vector (`index_add_`, `segment_reduce`), differentiable end to end, on any device.

Boundaries come in three equivalent forms, each over the first axis of the values:
  slices  `(s, 2)` (start, end) pairs, as in the sketch
  offsets `(s + 1,)` CSR style: segment i is rows offsets[i]:offsets[i + 1]
  lengths `(s,)`

einops notation: n rows of a level, s segments, d feature dim, h pooling heads, g groups, l padded
group length.
"""

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import Attention, FeedForward, make_norm

NAMED_REDUCERS = ("sum", "mean", "max", "attention")


# ---------------------------------------------------------------------------------------------
# boundaries: parsing and validation


def _as_index(x, name: str, device: torch.device) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.tensor(list(x))
    if t.numel() == 0:
        t = t.long()  # torch.tensor([]) is float
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _segments(total: int, slices, offsets, lengths, device: torch.device) -> tuple[Tensor, Tensor, Callable]:
    """Any of the three forms -> `starts (s,)`, `ends (s,)` and a describer of segment i for errors."""
    forms = (("slices", slices), ("offsets", offsets), ("lengths", lengths))
    given = [name for name, v in forms if v is not None]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise ValueError(f"give exactly one of slices, offsets= or lengths=; got {got}")
    if slices is not None:
        t = _as_index(slices, "slices", device)
        t = t.reshape(0, 2) if t.numel() == 0 else t
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"slices must be (num_segments, 2) (start, end) pairs, "
                             f"got shape {tuple(t.shape)}")
        starts, ends = t.unbind(1)
        return starts, ends, lambda i, s, e: f"slice {i} = ({s}, {e})"
    if offsets is not None:
        t = _as_index(offsets, "offsets", device)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(f"offsets must be 1-D (num_segments + 1,) with offsets[0] == 0 and "
                             f"offsets[-1] == {total}, got shape {tuple(t.shape)}")
        return t[:-1], t[1:], lambda i, s, e: f"segment {i} = (offsets[{i}], offsets[{i + 1}]) = ({s}, {e})"
    t = _as_index(lengths, "lengths", device)
    if t.ndim != 1:
        raise ValueError(f"lengths must be 1-D (num_segments,), got shape {tuple(t.shape)}")
    ends = t.cumsum(0)
    return ends - t, ends, lambda i, s, e: f"segment {i} (lengths[{i}] = {e - s}, rows {s}..{e})"


def _check_tiling(starts: Tensor, ends: Tensor, total: int, describe: Callable, form: str) -> None:
    """Segments must tile rows 0..total exactly: in order, contiguous, non-overlapping, no gaps.

    One vectorised pass over the `(s,)` bounds, in numpy on the host: the check needs a host sync
    anyway, and a dozen tiny torch ops would each open a parallel region (measured on the shared
    2-core machine here: 1.6 ms with one thread, 270 ms with two busy-waiting threads).
    """
    starts, ends = starts.cpu().numpy(), ends.cpu().numpy()
    prev_starts = np.concatenate(([0], starts[:-1]))
    prev_ends = np.concatenate(([0], ends[:-1]))  # segment 0 has to start at row 0
    problems = np.stack((
        (starts < 0) | (ends < 0),
        ends < starts,
        np.maximum(starts, ends) > total,
        starts < prev_starts,
        starts < prev_ends,
        starts > prev_ends,
    )).reshape(6, -1)
    flags = [*problems.any(1).tolist(), (int(ends[-1]) if len(ends) else 0) != total]
    if not any(flags):
        return
    kind = flags.index(True)
    prefix = f"invalid {form}: "
    if kind == len(flags) - 1:
        if len(ends) == 0:
            raise ValueError(prefix + f"no segments given but the input has {total} rows")
        i = len(ends) - 1
        s, e = int(starts[i]), int(ends[i])
        raise ValueError(prefix + f"the last {describe(i, s, e)} ends at {e}, leaving rows {e}..{total} "
                                  f"uncovered; expected the last segment to end at {total}")
    i = int(problems[kind].argmax())
    s, e = int(starts[i]), int(ends[i])
    here = describe(i, s, e)
    before = describe(i - 1, int(starts[i - 1]), int(ends[i - 1])) if i else ""
    pe = int(ends[i - 1]) if i else 0
    gap = (f"{here} leaves a gap after {before}: rows {pe}..{s} are not covered; expected it to start at {pe}"
           if i
           else f"{here} leaves a gap: rows 0..{s} are not covered; expected the first segment to start at 0")
    message = [
        f"{here} has a negative bound; bounds must lie in [0, {total}]",
        f"{here} has end < start; expected start <= end (start == end is an empty segment)",
        f"{here} is out of range: the input has {total} rows along its first axis",
        f"{here} is not in increasing order: it starts before {before}",
        f"{here} overlaps {before}; expected it to start at {pe}",
        gap,
    ][kind]
    raise ValueError(prefix + message)


def _check_offsets(offsets: Tensor, rows: int, form: str) -> None:
    starts, ends, describe = _segments(rows, None, offsets, None, offsets.device)
    _check_tiling(starts, ends, rows, describe, form)


def segment_ids(lengths: Tensor, total: int) -> Tensor:
    """`(s,)` segment lengths -> `(total,)` id of the segment each row belongs to (no host sync)."""
    ids = torch.arange(len(lengths), device=lengths.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


# ---------------------------------------------------------------------------------------------
# the reduction


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    # index_add_ accumulates in the tensor's dtype: half precision loses long segments' sums
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class HierarchyReduction1d(nn.Module):
    """Reduce each segment of a packed level to one row: `(n, dim) -> (num_segments, dim)`.

    `forward(input, slices)` with `input (n, dim)` (any trailing shape for sum/mean/max) and
    `slices` as `(start, end)` pairs (list of tuples or a `(num_segments, 2)` long tensor), or
    keyword-only `offsets=(num_segments + 1,)` (CSR) or `lengths=(num_segments,)`. Row i of the
    result reduces `input[start_i:end_i]`, in slice order, ready to be the next level's values.
    Segments of many documents can be packed together: each segment is reduced on its own.

    Reducers:
      "sum", "mean", "max"  vectorised: `index_add_` over a segment-id vector for sum and mean
                            (forward ~8x faster than `torch.segment_reduce` on CPU here);
                            `torch.segment_reduce` for max (its backward is several times faster
                            and lighter than `index_reduce`'s or `scatter_reduce`'s). Max gradients
                            split evenly between ties.
      "attention"           learned pooling: a per-token score (`nn.Linear(dim, heads)`, a learned
                            query per head), softmax over each segment's tokens, weighted sum; needs
                            `dim=`. The query starts at zero, so pooling starts as the mean.
      nn.Module / callable  `(len, dim) -> (dim,)`, called once per segment in a Python loop (it is
                            arbitrary, so it cannot be vectorised); it sees `(0, dim)` for empty
                            segments and its parameters are registered if it is a Module.

    Empty segments (start == end) are allowed: sum, mean, max and attention all give 0 there (not
    NaN or -inf), with zero gradient. Half-precision sums accumulate in float32.

    The segments must tile the input exactly (increasing, contiguous, no overlap, no gap, in range);
    otherwise `ValueError` names the first offending segment. `check=False` skips that validation
    (one vectorised pass over the bounds on the host, ~2 ms for 100k segments) in hot loops; invalid
    segments are then undefined behaviour.

    Example (characters -> words -> sentences):
        >>> reduce = HierarchyReduction1d("mean")
        >>> chars = torch.randn(9, 16)                        # "the cat. a dog"-like: 9 characters
        >>> words = reduce(chars, [(0, 3), (3, 6), (6, 7), (7, 9)])    # (4, 16)
        >>> sentences = reduce(words, offsets=torch.tensor([0, 2, 4]))  # (2, 16)
    """

    def __init__(self, reducer: str | Callable[[Tensor], Tensor] = "sum", dim: int | None = None,
                 heads: int = 1):
        super().__init__()
        self.fn = None
        if callable(reducer):
            self.fn, self.reducer = reducer, "custom"
            return
        if reducer not in NAMED_REDUCERS:
            raise ValueError(f"unknown reducer {reducer!r}; expected one of {NAMED_REDUCERS} or a callable")
        self.reducer = reducer
        if reducer == "attention":
            if dim is None:
                raise ValueError('the "attention" reducer learns a query: give dim=, e.g. '
                                 'HierarchyReduction1d("attention", dim=256)')
            if dim % heads:
                raise ValueError(f"dim {dim} must be divisible by heads {heads}")
            self.heads = heads
            self.to_score = nn.Linear(dim, heads, bias=False)  # a bias would cancel in the softmax
            nn.init.zeros_(self.to_score.weight)

    def forward(self, input: Tensor, slices=None, *, offsets=None, lengths=None,
                check: bool = True) -> Tensor:
        total = input.shape[0]
        starts, ends, describe = _segments(total, slices, offsets, lengths, input.device)
        if check:
            form = "slices" if slices is not None else "offsets" if offsets is not None else "lengths"
            _check_tiling(starts, ends, total, describe, form)
        if self.fn is not None:
            return self._loop(input, starts, ends)
        counts = ends - starts
        if self.reducer == "max":
            # no `initial`: segment_reduce folds it into every segment, so max(-3, initial=0) = 0
            out = torch.segment_reduce(input, "max", lengths=counts, unsafe=True)
            return out.masked_fill(rearrange(counts == 0, "s -> s" + " 1" * (input.ndim - 1)), 0)
        seg = segment_ids(counts, total)
        if self.reducer == "attention":
            return self._attention_pool(input, seg, len(counts))
        acc = _accumulator(input.dtype)
        out = input.new_zeros((len(counts), *input.shape[1:]), dtype=acc).index_add_(0, seg, input.to(acc))
        if self.reducer == "mean":
            out = out.div_(rearrange(counts.clamp(min=1).to(acc), "s -> s" + " 1" * (input.ndim - 1)))
        return out.to(input.dtype)

    def _attention_pool(self, x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
        acc = _accumulator(x.dtype)
        scores = self.to_score(x).to(acc)  # (n, h)
        # segment softmax: subtract each segment's max for stability; detached, since softmax is
        # shift-invariant its gradient would cancel exactly
        peak = scores.new_full((num_segments, self.heads), float("-inf"))
        peak = peak.scatter_reduce_(0, rearrange(seg, "n -> n 1").expand_as(scores), scores.detach(), "amax")
        weights = (scores - peak.index_select(0, seg)).exp()
        total = scores.new_zeros(num_segments, self.heads).index_add_(0, seg, weights)
        weights = weights / total.index_select(0, seg)  # empty segments have no rows to divide
        values = rearrange(x.to(acc), "n (h d) -> n h d", h=self.heads) * rearrange(weights, "n h -> n h 1")
        out = values.new_zeros(num_segments, *values.shape[1:]).index_add_(0, seg, values)
        return rearrange(out, "s h d -> s (h d)").to(x.dtype)

    def _loop(self, x: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
        rows = [self.fn(x[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]
        return torch.stack(rows) if rows else x.new_zeros(0, *x.shape[1:])

    def extra_repr(self) -> str:
        return f"reducer={self.reducer!r}" + (f", heads={self.heads}" if self.reducer == "attention" else "")


# ---------------------------------------------------------------------------------------------
# level-by-level encoder


def group_buckets(offsets: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Lay the non-empty groups `offsets (g + 1,)` out as padded batches of similar length.

    Returns `[(index (g_b, l_b), mask (g_b, l_b))]`: `index` holds the row of each group member
    (padding reads row 0), `mask` is True on real members. Groups are bucketed by
    `ceil(log2(length))`, so padding at most doubles the work however skewed the lengths are (one
    200-byte "word" does not pad 10,000 short ones), at a handful of batches per level.
    """
    starts, lengths = offsets[:-1], offsets.diff()
    keys = torch.ceil(torch.log2(lengths.clamp(min=1).float())).long().masked_fill(lengths == 0, -1)
    buckets = []
    for key in keys.unique().tolist():
        if key < 0:
            continue  # empty groups have no members to encode
        groups = (keys == key).nonzero().squeeze(1)
        size = lengths[groups]
        pos = torch.arange(int(size.max()), device=offsets.device)
        mask = pos < rearrange(size, "g -> g 1")
        buckets.append(((rearrange(starts[groups], "g -> g 1") + pos).masked_fill(~mask, 0), mask))
    return buckets


class GroupBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention inside each padded group.

    `(g, l, dim), mask (g, l) -> (g, l, dim)`; rotary positions count from each group's start.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int = 4, norm: str = "rmsnorm"):
        super().__init__()
        self.attn_norm, self.ff_norm = make_norm(norm, dim), make_norm(norm, dim)
        self.attn = Attention(dim, heads, dim_head, rotary=True)
        self.ff = FeedForward(dim, dim * ff_mult)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), mask=rearrange(mask, "g l -> g 1 1 l"))
        return x + self.ff(self.ff_norm(x))


class LevelEncoder(nn.Module):
    """`depth` GroupBlocks over one level: `(n, dim), offsets (g + 1,) -> (n, dim)`.

    Each row attends only to the rows of its own group (its segment of the next level).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4,
                 norm: str = "rmsnorm"):
        super().__init__()
        self.blocks = nn.ModuleList(GroupBlock(dim, heads, dim_head, ff_mult, norm) for _ in range(depth))

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        if not self.blocks or x.shape[0] == 0:
            return x
        rows, outs = [], []
        for index, mask in group_buckets(offsets):
            h = x[index]  # (g, l, dim)
            for block in self.blocks:
                h = block(h, mask)
            rows.append(index[mask])
            outs.append(h[mask])
        return torch.zeros_like(x).index_copy(0, torch.cat(rows), torch.cat(outs))


class HierarchicalEncoder(nn.Module):
    """Bytes -> words -> sentences -> documents, one level at a time.

    Level 0 embeds the byte ids. At each level a small transformer (`depth_per_level` blocks of
    bidirectional attention restricted to each group of the next level, e.g. bytes within their
    word, plus feed-forward) encodes the rows, then `HierarchyReduction1d(reducer)` turns every group
    into one row of the next level. The top level is one vector per document.

    `levels`: the number of reductions, or the names of the levels above bytes (default 3:
    words, sentences, documents — what `text_boundaries` produces).

    `forward(byte_ids (n_0,), boundaries)` with `boundaries[i]` the offsets `(n_{i+1} + 1,)` that
    group level i's rows into level i+1 -> a list of `len(levels) + 1` tensors, `(n_i, dim)` each:
    the encoded bytes, words, sentences, and finally the documents `(num_documents, dim)`.
    """

    def __init__(
        self,
        dim: int,
        levels: int | Sequence[str] = 3,
        depth_per_level: int | Sequence[int] = 1,
        heads: int = 4,
        dim_head: int = 32,
        reducer: str | Callable[[Tensor], Tensor] = "attention",
        vocab_size: int = 256,
        ff_mult: int = 4,
        norm: str = "rmsnorm",
    ):
        super().__init__()
        if isinstance(levels, int):
            default = ("words", "sentences", "documents")
            levels = default if levels == 3 else [f"level{i}" for i in range(1, levels + 1)]
        if len(levels) < 1:
            raise ValueError("need at least one level above bytes")
        self.level_names = ("bytes", *levels)
        count = len(levels)
        depths = list(depth_per_level) if isinstance(depth_per_level, Sequence) else [depth_per_level] * count
        if len(depths) != count:
            raise ValueError(f"depth_per_level has {len(depths)} entries but there are {count} levels")
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoders = nn.ModuleList(LevelEncoder(dim, d, heads, dim_head, ff_mult, norm) for d in depths)
        self.reducers = nn.ModuleList(HierarchyReduction1d(reducer, dim=dim) for _ in range(count))
        self.norms = nn.ModuleList(make_norm(norm, dim) for _ in range(count + 1))

    def forward(self, byte_ids: Tensor, boundaries: Sequence[Tensor], check: bool = True) -> list[Tensor]:
        if len(boundaries) != len(self.encoders):
            raise ValueError(f"got {len(boundaries)} boundary tensors for {len(self.encoders)} levels "
                             f"({', '.join(self.level_names[1:])})")
        device = byte_ids.device
        boundaries = [_as_index(b, f"boundaries[{i}]", device) for i, b in enumerate(boundaries)]
        if check:  # once here, so the encoders and reductions below can trust them
            rows = byte_ids.shape[0]
            for name, offsets in zip(self.level_names[1:], boundaries):
                _check_offsets(offsets, rows, f"{name} offsets")
                rows = len(offsets) - 1
        x = self.embed(byte_ids)
        outputs = []
        for encoder, reduce, norm, offsets in zip(self.encoders, self.reducers, self.norms, boundaries):
            x = norm(encoder(x, offsets))
            outputs.append(x)
            x = reduce(x, offsets=offsets, check=False)
        outputs.append(self.norms[-1](x))
        return outputs


# ---------------------------------------------------------------------------------------------
# boundaries from raw text

_WORD = re.compile(rb"\s+|\S+\s*")  # whitespace stays on the word before it; only a text's lead is alone


def _ends_sentence(word: bytes) -> bool:
    core = word.rstrip()
    gap = word[len(core):]
    return bool(core) and bool(gap) and (core[-1:] in (b".", b"!", b"?") or gap.count(b"\n") >= 2)


def text_boundaries(texts: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """UTF-8 bytes and word / sentence / document offsets of `texts`, for `HierarchicalEncoder`.

    Returns `byte_ids (n_bytes,)` (all texts concatenated) and `[words (n_words + 1,),
    sentences (n_sentences + 1,), documents (len(texts) + 1,)]`, each level's offsets over the rows
    of the level below, tiling it exactly:
      words      runs of non-whitespace with the whitespace after them (a text's leading whitespace
                 is a word of its own), so the words' bytes are exactly the text's bytes
      sentences  end after a word ending in `.`, `!` or `?` followed by whitespace, after a paragraph
                 break (whitespace holding two newlines), and at the end of each text
      documents  one per text; an empty text is a document with no sentences
    """
    data, words, sentences, documents = bytearray(), [0], [0], [0]
    for text in texts:
        raw = text.encode("utf-8")
        start = len(data)
        data += raw
        found = [m.group() for m in _WORD.finditer(raw)]
        for j, word in enumerate(found):
            words.append(words[-1] + len(word))
            if _ends_sentence(word) or j == len(found) - 1:
                sentences.append(len(words) - 1)
        documents.append(len(sentences) - 1)
        assert words[-1] == start + len(raw), "word segments must tile the text"
    byte_ids = torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    offsets = [torch.tensor(o) for o in (words, sentences, documents)]
    rows = len(byte_ids)
    for name, o in zip(("words", "sentences", "documents"), offsets):
        _check_offsets(o, rows, f"{name} offsets")
        rows = len(o) - 1
    return byte_ids, offsets
