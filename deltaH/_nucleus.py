"""HF's top-p kept sets without sorting the vocabulary (the selection behind ``SamplingPolicy``).

For float32 scores ``z [R, V]`` (logits / τ) and ``thr = float32(1 − p)``, ``transformers``'
``TopPLogitsWarper`` keeps a token iff its *ascending* cumulative softmax mass (the mass of the token
and of every token ranked below it) is ``> thr``, and always keeps the top token. Writing ``asc_j``
for that mass at the ``j``-th largest token, the kept set is a top set ``{z ≥ z_last}``.

Each row is decided by the first of these rules that applies:

1. **prefix**: the exact top-``k`` of the row (from group maxima: the top-``k`` tokens lie in the
   ``k`` groups of 16 with the largest maxima, so only ``16·k`` tokens are ranked), when the nucleus
   ends inside it (peaked rows);
2. **histogram**: per-row masses of ``w = max z − z`` bucketed by the high bits of its float32 pattern
   (monotone in ``w``), the bucket where the descending cumulative mass reaches ``p``, and a sort of
   that bucket's tokens only (nuclei of any length);
3. **exact**: HF's own arithmetic (``softmax`` and ``cumsum`` of the ascending values: the same
   kernels on the same values, so the same bits) after a sort of the row's values only;
4. HF's ``TopPLogitsWarper`` code itself (:func:`hf_top_p_keep`) for rows with a tie at the boundary
   (HF's index order among equal values decides) and rows with NaN or infinite masses.

Rules 1-2 estimate ``asc`` in float64 from ``softmax(z)`` (float32, ~1e-7 relative per token) and
decide a row only if the last kept and the first dropped token are ``≥ _MARGIN`` from ``thr`` and
not tied (the rule the previous sort-based code applied to its top-k prefixes); every other row
goes to rule 3. HF's float32 ``asc`` differs from the exact value by its float32 softmax normaliser,
summed in the *sorted* order: up to 4.1e-6 at V = 151,936 with the AVX2 and portable kernels, 7.9e-7
with AVX-512 (measured over rows of every kind), so rules 1-2 decide as HF does. Rule 3 is needed
when the boundary tokens are lighter than ``2·_MARGIN``, as in flat rows of a large vocabulary:
there HF's decision depends on the rounding of its normaliser, which only its own summation order
reproduces, so rule 3 sorts (the values only: ~1/3 of HF's sort with indices).

A row decided by rules 1-2 is ``(idx [k], n_keep)`` (keep the first ``n_keep`` of its candidates),
one decided by rule 3 a cut ``z_last`` (keep ``{z ≥ z_last}``), one by rule 4 a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

# Rows whose boundary lies within this cumulative mass of the threshold take the exact rule (as the
# previous code did). HF's asc and ours differ by ≤ 4.1e-6 (HF's float32 normaliser, AVX2) + ~1e-7.
_MARGIN = 1e-5
_GROUP = 16  # tokens per group of the group-max top-k
_CHUNK = 1 << 19  # elements of [rows, V] per chunk: the chunk's buffers stay in cache
_HIST_BINS = 1 << 21  # rows × buckets of one histogram call


def hf_top_p_keep(z32: Tensor, top_p: float) -> Tensor:
    """HF's ``TopPLogitsWarper`` rule (min_tokens_to_keep=1) on float32 scores ``[R, V]``."""
    sorted_z, sorted_idx = torch.sort(z32, descending=False)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_idx, remove)


def threshold32(top_p: float) -> float:
    """``1 − p`` as HF compares it: the Python float rounded to float32 (the cumsum's dtype)."""
    return float(torch.tensor(1 - top_p, dtype=torch.float32))


def row_step(vocab: int) -> int:
    """Rows per chunk: ``_CHUNK`` elements of ``[rows, V]`` at a time."""
    return max(1, _CHUNK // max(vocab, 1))


class Workspace:
    """``[rows, V]`` buffers reused chunk after chunk: a fresh tensor of a few MB costs page faults
    (zeroed pages) that take longer than the arithmetic on it."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.prob = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.w = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.tmp = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.key = torch.empty(rows, vocab, dtype=torch.int32, device=device)
        self.mask = torch.empty(rows, vocab, dtype=torch.bool, device=device)

    def scores(self, z: Tensor, with_mass: bool = True) -> Scores:
        """``softmax`` and ``max − z`` of the chunk ``z [c, V]`` into the first ``c`` rows of the buffers
        (and ``mass``, unless ``with_mass`` is false)."""
        c = z.shape[0]
        prob = torch.ops.aten._softmax.out(z, -1, False, out=self.prob[:c])
        w = torch.sub(z.amax(-1, keepdim=True), z, out=self.w[:c])
        mass = mass64(prob) if with_mass else prob.new_empty(0)
        return Scores(z, prob, w, mass, self.key[:c], self.mask[:c])


@dataclass
class Scores:
    """One chunk: scores ``z [c, V]``, ``prob = softmax(z)``, ``w = max z − z`` (``≥ +0``, monotone
    non-increasing in ``z``), ``mass = Σ prob`` (float64), and int32 / bool scratch of the same shape."""

    z: Tensor
    prob: Tensor
    w: Tensor
    mass: Tensor
    key: Tensor
    mask: Tensor

    def take(self, rows: Tensor) -> Scores:
        """The scores of ``rows`` (distinct): copies, unless they are all the rows in order."""
        in_order = rows == torch.arange(rows.numel(), device=rows.device)
        if rows.numel() == self.z.shape[0] and bool(in_order.all()):
            return self
        r = rows.numel()
        z, prob, w, mass = self.z[rows], self.prob[rows], self.w[rows], self.mass[rows]
        return Scores(z, prob, w, mass, self.key[:r], self.mask[:r])


def mass64(prob: Tensor) -> Tensor:
    """Row sums ``[c]`` float64 of ``prob [c, V]``: float32 sums of 16 strided terms, then float64."""
    c, v = prob.shape
    g = v // _GROUP
    out = prob[:, g * _GROUP :].sum(-1, dtype=torch.float64)
    if g:
        part = prob.as_strided((c, _GROUP, g), (prob.stride(0), g, 1)).sum(1)
        out = out + part.sum(-1, dtype=torch.float64)
    return out


@dataclass
class Nucleus:
    """Kept sets of ``R`` rows: ``sparse`` groups ``(rows [r], idx [r, k], n_keep [r])`` keep the
    first ``n_keep`` of their top-``k`` indices; ``cut_rows`` keep ``{z ≥ cut}``; ``dense_rows``
    have a full mask ``dense_keep``."""

    sparse: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    cut_rows: list[Tensor] = field(default_factory=list)
    cut: list[Tensor] = field(default_factory=list)
    dense_rows: list[Tensor] = field(default_factory=list)
    dense_keep: list[Tensor] = field(default_factory=list)

    def add(self, other: Nucleus, offset: int) -> None:
        """Append the kept sets of ``other`` (a chunk of rows starting at row ``offset``)."""
        self.sparse += [(r + offset, i, n) for r, i, n in other.sparse]
        self.cut_rows += [r + offset for r in other.cut_rows]
        self.cut += other.cut
        self.dense_rows += [r + offset for r in other.dense_rows]
        self.dense_keep += other.dense_keep

    def mask(self, z32: Tensor) -> Tensor:
        """The boolean kept mask ``[R, V]`` (``z32`` are the scores the sets were decided on)."""
        keep = torch.zeros_like(z32, dtype=torch.bool)
        for rows, idx, n_keep in self.sparse:
            in_s = torch.arange(idx.shape[1], device=z32.device) < n_keep.unsqueeze(-1)
            r, j = in_s.nonzero(as_tuple=True)
            keep[rows[r], idx[r, j]] = True  # (idx may repeat past n_keep: padding)
        for rows, cut in zip(self.cut_rows, self.cut, strict=True):
            keep[rows] = z32[rows] >= cut.unsqueeze(-1)
        for rows, dense in zip(self.dense_rows, self.dense_keep, strict=True):
            keep[rows] = dense
        return keep


def nucleus(z32: Tensor, top_p: float, k0: int) -> Nucleus:
    """HF's top-p kept sets of the float32 scores ``z32 [R, V]`` (``k0``: the prefix length)."""
    out = Nucleus()
    step = max(1, min(row_step(z32.shape[-1]), z32.shape[0]))
    ws = Workspace(step, z32.shape[-1], torch.float32, z32.device)
    for s in range(0, z32.shape[0], step):
        out.add(decide(ws.scores(z32[s : s + step]), top_p, k0), s)
    return out


def decide(sc: Scores, top_p: float, k0: int) -> Nucleus:
    """Kept sets of one chunk of float32 scores (rules 1-4 of the module docstring)."""
    c, v = sc.z.shape
    thr = threshold32(top_p)
    out = Nucleus()
    rows = torch.arange(c, device=sc.z.device)
    finite = torch.isfinite(sc.mass) & (sc.mass > 0)  # NaN / +inf / all −inf rows: rule 4
    todo = rows if bool(finite.all()) else rows[finite]
    exact = todo[:0]
    hist = todo[:0]
    k_long = 8 * k0 if 8 * k0 * _GROUP * 4 <= v else 0  # a second, longer prefix: large V only
    for k in (min(k0, v), k_long):
        if not (k and todo.numel()):
            break
        top_z, top_idx = topk(sc.z, k, None if todo.numel() == c else todo)
        top_m = sc.prob[todo.unsqueeze(-1), top_idx].double() / sc.mass[todo].unsqueeze(-1)
        n_keep, decided, inside = _prefix_rule(top_z, top_m, thr)
        if bool(decided.any()):
            out.sparse.append((todo[decided], top_idx[decided], n_keep[decided]))
        # Rows only the exact rule can decide: the boundary is in the prefix but too close to thr or
        # tied, or every token past the prefix is lighter than 2·_MARGIN (then so is the last kept
        # one, and asc_last − asc_next < 2·_MARGIN).
        hopeless = ~decided & (inside | (top_m[:, -1] < 2 * _MARGIN))
        exact = torch.cat([exact, todo[hopeless]])
        rest = ~decided & ~hopeless
        if k < k_long:  # the longer prefix, where it can hold mass 1 − thr: (mass of the top k_long)
            # ≤ (mass of the top k) + (k_long − k)·(mass of the k-th)
            reach = top_m.sum(-1) + (k_long - k) * top_m[:, -1] >= 1.0 - thr
            hist = torch.cat([hist, todo[rest & ~reach]])
            todo = todo[rest & reach]
        else:
            hist = torch.cat([hist, todo[rest]])
            todo = todo[:0]
    todo = torch.sort(hist).values
    if todo.numel():
        step = max(1, _HIST_BINS // _buckets(v)[0])
        for s in range(0, todo.numel(), step):
            part_rows = todo[s : s + step]
            part = sc.take(part_rows)
            top_z, top_idx, heavy = _histogram_prefix(part, thr)
            # padding has z = −inf: its mass is 0, so it never holds the boundary of a decided row
            top_m = part.prob.gather(-1, top_idx).double().masked_fill(top_z == float("-inf"), 0.0)
            n_keep, decided, _ = _prefix_rule(top_z, top_m / part.mass.unsqueeze(-1), thr)
            decided &= heavy
            out.sparse.append((part_rows[decided], top_idx[decided], n_keep[decided]))
            exact = torch.cat([exact, part_rows[~decided]])
    hf = rows[~finite]
    if exact.numel():
        tied, cut = _exact_rule(sc.z[exact], top_p)
        out.cut_rows.append(exact[~tied])
        out.cut.append(cut[~tied])
        hf = torch.cat([hf, exact[tied]])
    if hf.numel():
        out.dense_rows.append(hf)
        out.dense_keep.append(hf_top_p_keep(sc.z[hf], top_p))
    return out


def topk(z: Tensor, k: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``torch.topk(z[rows], k)`` (descending values, their indices) of ``z [c, V]``, ranking ``16·k``
    tokens per row (``rows``: all by default; the rows of ``z`` are not copied).

    Split each row into ``g = V // 16`` strided groups ``{j, j + g, …, j + 15g}`` (plus the ``V mod
    16`` last tokens, always candidates). The ``i``-th largest value of the row has ``i`` tokens at
    or above it; either all are in the ``k`` groups with the largest maxima, or one is outside them,
    and then each of those ``k`` groups holds a token at or above it: so the top-``k`` values of the
    candidates are the row's top-``k`` values. Equal values may come with other indices than
    ``torch.topk``'s (callers treat a tie at the boundary as undecided).
    """
    c, v = z.shape
    g = v // _GROUP
    if k * _GROUP * 4 > v or z.stride(-1) != 1:
        return torch.topk(z if rows is None else z[rows], k, dim=-1)
    gmax = z.as_strided((c, _GROUP, g), (z.stride(0), g, 1)).amax(1)  # [c, g]
    if rows is not None:
        gmax = gmax[rows]
    gi = torch.topk(gmax, k, dim=-1, sorted=False).indices  # [r, k]
    cand = (gi.unsqueeze(1) + g * torch.arange(_GROUP, device=z.device).unsqueeze(-1)).flatten(1)
    if v > g * _GROUP:
        tail = torch.arange(g * _GROUP, v, device=z.device).expand(gi.shape[0], -1)
        cand = torch.cat([cand, tail], dim=-1)
    cz = z.gather(-1, cand) if rows is None else z[rows.unsqueeze(-1), cand]
    top_z, pos = torch.topk(cz, k, dim=-1)
    return top_z, cand.gather(-1, pos)


def _prefix_rule(top_z: Tensor, top_m: Tensor, thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Decide each row from its top-``k`` prefix ``top_z [R, k]`` with masses ``top_m`` (float64).

    Returns ``(n_keep, decided, inside)``: ``inside`` when the nucleus ends inside the prefix;
    ``decided`` when, besides, the last kept and first dropped token are ``≥ _MARGIN`` from ``thr``
    and not tied. The kept set is then the first ``n_keep`` tokens of the prefix.
    """
    k = top_z.shape[-1]
    asc = 1.0 - (torch.cumsum(top_m, dim=-1) - top_m)  # [R, k], decreasing along the prefix
    kept = asc > thr
    kept[:, 0] = True
    n_keep = kept.sum(-1)
    inside = ~kept[:, -1]
    last_pos, nxt_pos = (n_keep - 1).unsqueeze(-1), n_keep.clamp(max=k - 1).unsqueeze(-1)
    far = (asc.gather(-1, last_pos) - thr).abs() >= _MARGIN
    far &= (asc.gather(-1, nxt_pos) - thr).abs() >= _MARGIN
    tied = top_z.gather(-1, last_pos) == top_z.gather(-1, nxt_pos)
    return n_keep, inside & (far & ~tied).squeeze(-1), inside  # NaN masses fail ``>= _MARGIN``


def _buckets(v: int) -> tuple[int, int]:
    """``(buckets, shift)``: the bucket of ``w ≥ +0`` is ``bits(w) >> shift``, about ``V / 4`` of them
    (between 64 and 32,768) so that a bucket holds few tokens whatever V."""
    n_bits = min(max(int(v).bit_length() - 2, 6), 15)
    return 1 << n_bits, 31 - n_bits


def _histogram_prefix(sc: Scores, thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's smallest bucket-aligned top set holding mass ``> 1 − thr`` plus one more bucket,
    sorted by ``z`` (descending): ``(top_z [r, n], top_idx [r, n], heavy [r])``, padded with ``−inf``;
    rows not ``heavy`` (boundary tokens too light to certify) get no candidates.

    Bucket ``b(w) = bits(w) >> shift`` (non-negative floats order like their bit patterns, so ``b``
    is monotone non-increasing in ``z`` and ``{b ≤ B}`` is a top set: the exact top-``n`` tokens).
    A float32 histogram of the masses locates the bucket ``b*`` where the descending cumulative mass
    reaches ``1 − thr``; the set is every token up to the next non-empty bucket after ``b*``. The
    histogram only chooses the set: :func:`_prefix_rule` decides from float64 masses, and never
    decides a row whose set turns out too short.
    """
    r, v = sc.z.shape
    dev = sc.z.device
    nb, shift = _buckets(v)
    offset = (torch.arange(r, device=dev, dtype=torch.int32) * nb).unsqueeze(-1)
    key = torch.bitwise_right_shift(sc.w.view(torch.int32), shift, out=sc.key).add_(offset)
    hist = torch.zeros(r * nb, device=dev).index_add_(0, key.view(-1), sc.prob.reshape(-1)).view(r, nb)
    d = hist.double().cumsum(-1) / sc.mass.unsqueeze(-1)  # ≈ mass of the buckets ≤ b
    bins = torch.arange(nb, device=dev)
    b_star = (d < 1.0 - thr).sum(-1, keepdim=True)
    after = torch.where((hist > 0) & (bins > b_star), bins, nb).amin(-1, keepdim=True)
    last = torch.where(after < nb, after, b_star.clamp(max=nb - 1))
    # The last kept token is in bucket b*, so its mass is ≤ that of w = the bucket's lower edge: when
    # that is < 2·_MARGIN, no estimate can certify the row (see decide); leave it to the exact rule.
    w_lo = torch.bitwise_left_shift(b_star.clamp(max=nb - 1).to(torch.int32), shift).view(torch.float32)
    top_mass = sc.prob.amax(-1, keepdim=True).double() * torch.exp(-w_lo.double())
    heavy = top_mass >= 2 * _MARGIN * sc.mass.unsqueeze(-1)
    last = torch.where(heavy, last, -1)  # no candidates
    rr, cc = torch.le(key, (last + offset).to(torch.int32), out=sc.mask).nonzero(as_tuple=True)
    cnt = torch.bincount(rr, minlength=r)
    pos = torch.arange(rr.numel(), device=dev) - (cnt.cumsum(0) - cnt)[rr]
    top_z = sc.z.new_full((r, max(int(cnt.max()), 1)), float("-inf"))
    top_z[rr, pos] = sc.z[rr, cc]
    top_idx = torch.zeros(top_z.shape, dtype=torch.int64, device=dev)
    top_idx[rr, pos] = cc
    top_z, order = torch.sort(top_z, dim=-1, descending=True, stable=True)  # padding (−inf) stays last
    return top_z, top_idx.gather(-1, order), heavy.squeeze(-1)


def _exact_rule(z: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """HF's own arithmetic on the sorted *values* of ``z [r, V]``: ``(tied [r], cut [r])``.

    ``softmax`` and ``cumsum`` of the ascending values are HF's bit for bit (the same kernels on the
    same values; HF's float32 normaliser depends on their order, which is why this rule sorts). HF
    drops the first ``n`` of them; unless the ``n``-th and ``n+1``-th values are equal (``tied``:
    then HF's index order among equal values decides), its kept set is ``{z ≥ cut}``,
    ``cut`` = the ``n+1``-th value. Sorting values only (numpy on CPU) costs ~1/3 of HF's sort.
    """
    if z.device.type == "cpu":
        s = torch.from_numpy(np.sort(z.numpy(), axis=-1))
    else:
        s = torch.sort(z, dim=-1).values
    cum = s.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    n = remove.sum(-1, keepdim=True)
    cut = s.gather(-1, n).squeeze(-1)
    below = s.gather(-1, (n - 1).clamp(min=0)).squeeze(-1)
    return (n.squeeze(-1) > 0) & (below == cut), cut
