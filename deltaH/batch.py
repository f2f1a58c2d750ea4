"""``SequenceBatch``: N sampled sequences with the response tokens that are scored.

``input_ids [N, T]``, ``attention_mask [N, T]`` and ``response_mask [N, T]`` (True at the
generated tokens, EOS included). Prompt tokens are context only. Left, right or mixed padding
are all accepted: internally every chunk is *compacted* (each row's attended tokens moved to the
left, in order) before the forward pass. Position ids are then ``0..len-1`` — exactly
``cumsum(attention_mask) − 1`` at the attended tokens, as ``generate`` computes them — and causal
attention alone never looks at padding, so padding side cannot change a result and fully-masked
attention rows (NaN in HF eager attention on float64 models) never occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH._choices import SHARE_PROMPTS
from deltaH.errors import ArgumentError, BatchError


@dataclass(frozen=True)
class SequenceBatch:
    """A validated batch of sequences; see the module docstring for the fields."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def __post_init__(self) -> None:
        ids, am, rm = self.input_ids, self.attention_mask, self.response_mask
        for name, t in (("input_ids", ids), ("attention_mask", am), ("response_mask", rm)):
            if not isinstance(t, Tensor):
                raise TypeError(f"SequenceBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 2:
                raise BatchError(f"SequenceBatch.{name} must be 2-D [N, T], got shape {tuple(t.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"SequenceBatch.input_ids must be an integer tensor (int64), got {ids.dtype}")
        if am.shape != ids.shape or rm.shape != ids.shape:
            raise BatchError(
                "SequenceBatch: input_ids, attention_mask and response_mask must have the same shape, "
                f"got {tuple(ids.shape)}, {tuple(am.shape)}, {tuple(rm.shape)}"
            )
        if ids.shape[0] == 0:
            raise BatchError("SequenceBatch is empty (N = 0): pass at least one sequence")
        for name, t in (("attention_mask", am), ("response_mask", rm)):
            if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
                raise BatchError(f"SequenceBatch.{name} must be boolean or 0/1, found other values")
        amb, rmb = am.bool(), rm.bool()
        bad = (rmb & ~amb).any(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise BatchError(
                f"SequenceBatch.response_mask marks tokens that attention_mask excludes (rows {rows}); "
                "response tokens must be attended tokens"
            )
        empty = ~rmb.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten()[:5].tolist()
            raise BatchError(
                f"SequenceBatch rows {rows} have no response token: every row needs at least one "
                "scored token (set response_mask at the generated tokens, EOS included)"
            )
        first_attended = torch.where(amb, torch.arange(amb.shape[1], device=amb.device), amb.shape[1]).amin(1)
        first_resp = torch.where(rmb, torch.arange(rmb.shape[1], device=rmb.device), rmb.shape[1]).amin(1)
        if bool((first_resp <= first_attended).any()):
            rows = (first_resp <= first_attended).nonzero().flatten()[:5].tolist()
            raise BatchError(
                f"SequenceBatch rows {rows} start with a response token: a scored token needs at "
                "least one attended token before it (the prompt, or a BOS token)"
            )
        object.__setattr__(self, "attention_mask", amb)
        object.__setattr__(self, "response_mask", rmb)
        object.__setattr__(self, "input_ids", ids.long())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> Tensor:
        """``[N]`` number of scored response tokens per row."""
        return self.response_mask.sum(1)

    def select(self, rows: Tensor | slice | list[int]) -> SequenceBatch:
        """The sub-batch of the given rows."""
        return SequenceBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows])

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device)
        )


@dataclass(frozen=True)
class SharePlan:
    """How a compacted chunk ``[n, L]`` runs with each distinct prompt once (shared prompts).

    The prompt of row ``i`` is its tokens before its first scored position, ``prompt_len [n]``
    long; rows with identical prompts form a group, ``group [n]`` indexes the ``g`` distinct
    prompts. The chunk's hidden states are then, for every row ``i`` and position ``t``::

        h[i, t] = prompt pass  P[group_i, t]               t <  prompt_len_i
                  suffix pass  S[i, t − prompt_len_i]      t >= prompt_len_i

    where the prompt pass runs ``prompt_ids [g, Lp]`` (right-padded, positions ``0..``) once and
    caches its keys and values, and the suffix pass runs ``suffix_ids [n, Ls]`` (positions
    ``prompt_len_i + j``) against row ``i``'s copy of its group's cache under ``keep [n, 1, Ls,
    Lp + Ls]`` (True = attend): the row's own prompt slots ``< prompt_len_i`` and the suffix
    causally. ``gather [n·L]`` indexes the concatenation ``[P.flatten(0, 1), S.flatten(0, 1)]``
    (``[g·Lp + n·Ls, D]``) to give ``h`` in the compact layout.
    """

    prompt_ids: Tensor
    prompt_pos: Tensor
    suffix_ids: Tensor
    suffix_pos: Tensor
    group: Tensor
    prompt_len: Tensor
    keep: Tensor
    gather: Tensor

    @property
    def n_groups(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclass(frozen=True)
class Compact:
    """A chunk in compact right-padded form (see module docstring).

    ``ids [n, L]`` (padding filled with the row's last token id), ``position_ids [n, L]``, and the
    scored positions as flat index tensors: row ``rows [P]``, the position whose logits predict
    the token ``pred_pos [P]``, and the token ``targets [P]``. ``share`` is the chunk's
    :class:`SharePlan` when its prompts run once per group, else ``None`` (one plain forward).
    """

    ids: Tensor
    position_ids: Tensor
    rows: Tensor
    pred_pos: Tensor
    targets: Tensor
    n: int
    share: SharePlan | None = None

    def per_sequence(self, tok: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
        """Sum token values ``[..., P]`` (one per scored position) into sequences ``[..., n]``.

        The sum runs in ``dtype`` (float64 by default; ``None`` keeps ``tok``'s dtype) and is
        differentiable.
        """
        tok = tok if dtype is None else tok.to(dtype)
        out = torch.zeros(*tok.shape[:-1], self.n, dtype=tok.dtype, device=tok.device)
        return out.index_add(tok.dim() - 1, self.rows, tok)


#: ``share`` of :func:`compact`: ``off`` (one plain forward), ``auto`` (share where it saves at
#: least a tenth of the token-forwards), ``on`` (share wherever two rows have the same prompt).
SHARE_MODES = SHARE_PROMPTS


def compact(batch: SequenceBatch, share: str = "off") -> Compact:
    """Move each row's attended tokens to the left, in order, and list the scored positions.

    With ``share`` ``"auto"`` or ``"on"`` (:data:`SHARE_MODES`) the chunk also carries a
    :class:`SharePlan` where two or more rows have the same prompt (``auto``: only where the
    prompt pass plus the suffix pass, ``g·Lp + n·Ls`` token-forwards, cost at most nine tenths of
    the plain ``n·L``).
    """
    if share not in SHARE_MODES:
        raise ArgumentError(f"share_prompts must be one of {SHARE_MODES}, got {share!r}")
    am, rm, ids = batch.attention_mask, batch.response_mask, batch.input_ids
    n = ids.shape[0]
    lengths = am.sum(1)
    length = int(lengths.max())
    # Stable sort puts attended positions first, keeping their order.
    order = torch.sort((~am).to(torch.int8), dim=1, stable=True).indices[:, :length]
    c_ids = ids.gather(1, order)
    c_resp = rm.gather(1, order)
    pos = torch.arange(length, device=ids.device).expand(n, length)
    valid = pos < lengths.unsqueeze(1)
    c_resp = c_resp & valid
    # Padding gets a real token id (never attended by valid positions under causal attention).
    c_ids = torch.where(valid, c_ids, c_ids[:, :1])
    rows, cols = c_resp.nonzero(as_tuple=True)
    plan = None if share == "off" else share_plan(c_ids, c_resp, lengths, share == "on")
    return Compact(
        ids=c_ids,
        position_ids=pos.contiguous(),
        rows=rows,
        pred_pos=cols - 1,
        targets=c_ids[rows, cols],
        n=n,
        share=plan,
    )


def share_plan(ids: Tensor, resp: Tensor, lengths: Tensor, always: bool = False) -> SharePlan | None:
    """The :class:`SharePlan` of a compacted chunk (``ids, resp [n, L]``, ``lengths [n]``), or
    ``None`` when no two rows share a prompt (or, unless ``always``, when sharing would not save a
    tenth of the token-forwards)."""
    n, length = ids.shape
    dev = ids.device
    t = torch.arange(length, device=dev)
    plen = torch.where(resp, t, length).amin(1)  # first scored position = prompt length (>= 1)
    lp = int(plen.max())
    # Distinct prompts: the prompt ids with -1 after each row's prompt, and the length itself.
    key = torch.where(t[:lp] < plen.unsqueeze(1), ids[:, :lp], -1)
    uniq, group = torch.unique(torch.cat([plen.unsqueeze(1), key], 1), dim=0, return_inverse=True)
    g = int(uniq.shape[0])
    ls = int((lengths - plen).max())
    if g == n or (not always and 10 * (g * lp + n * ls) > 9 * n * length):
        return None
    # One row of each group holds its prompt; its padding repeats the prompt's first token.
    first = torch.full((g,), n, dtype=torch.long, device=dev).scatter_reduce(
        0, group, torch.arange(n, device=dev), "amin")
    p_len = plen[first]
    prompt_ids = torch.where(t[:lp] < p_len.unsqueeze(1), ids[first, :lp], ids[first, :1])
    j = torch.arange(ls, device=dev)
    src = (plen.unsqueeze(1) + j).clamp(max=length - 1)  # [n, Ls]; past a row's end: repeats the last
    suffix_ids = ids.gather(1, src)
    # a row's slots past its end (padding, seen only by later padding) keep positions within the plain
    # forward's 0..L-1: position embeddings of any kind see exactly the positions they see there
    suffix_pos = (plen.unsqueeze(1) + j).clamp(max=length - 1)
    causal = j.unsqueeze(1) >= j.unsqueeze(0)  # [Ls, Ls]
    own = t[:lp].unsqueeze(0) < plen.unsqueeze(1)  # [n, Lp]
    keep = torch.cat([own.unsqueeze(1).expand(n, ls, lp), causal.expand(n, ls, ls)], 2).unsqueeze(1)
    tt = t.unsqueeze(0)
    from_prompt = group.unsqueeze(1) * lp + tt.clamp(max=lp - 1)
    row = torch.arange(n, device=dev).unsqueeze(1)
    from_suffix = g * lp + row * ls + (tt - plen.unsqueeze(1)).clamp(0, ls - 1)
    gather = torch.where(tt < plen.unsqueeze(1), from_prompt, from_suffix).flatten()
    return SharePlan(
        prompt_ids=prompt_ids,
        prompt_pos=t[:lp].expand(g, lp).contiguous(),
        suffix_ids=suffix_ids,
        suffix_pos=suffix_pos,
        group=group,
        prompt_len=plen,
        keep=keep,
        gather=gather,
    )
