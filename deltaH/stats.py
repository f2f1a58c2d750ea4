"""Per-sequence statistics by teacher forcing: ``log q``, RB entropy, surprisal, token counts.

For sequence ``n`` with scored positions ``R_n`` (docs/math.md#per-sequence-statistics)::

    logq_n      = Σ_{t∈R_n} log q(y_t | y_<t)
    entropy_n   = Σ_{t∈R_n} H(q(· | y_<t))          (Rao–Blackwellised)
    surprisal_n = −logq_n
    n_tokens_n  = |R_n|

Sequences run in chunks of ``tf_batch_size``; logits exist only for ``head_chunk`` scored
positions at a time (never ``[N, T, V]``). With stacked directions ``dirs [K, ...]`` and a step
``η``, the backbone runs under ``vmap`` over the K shifted parameter sets ``θ + η·v_k`` (ids and
masks stay unbatched, frozen weights are shared), and the head runs on ``[K, P, D]`` hidden
states: one GEMM when the head is not perturbed. Sums are float64.

Shared prompts (``share_prompts``, :func:`share_mode`): where rows of a chunk have the same prompt
(the tokens before the first scored one), the prompt runs once and its keys and values serve every
row's response (:meth:`FunctionalLM.hidden`); the scored positions see the same keys and values
as in the plain forward, so the statistics are the same up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH._choices import check_choice
from deltaH.batch import SHARE_MODES, Compact, SequenceBatch, compact
from deltaH.errors import ArgumentError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, scaled_logits

# Elements of one [rows, V] logits chunk (rows across directions); a few temporaries of this
# size exist at once inside the policy math.
_HEAD_ELEMENTS = 2**24


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence statistics, float64: ``logq``, ``entropy``, ``surprisal`` shaped ``[N]``
    (or ``[K, N]`` for K directions); ``n_tokens [N]`` int64.

    ``nucleus_key`` (optional, top-p only): the nucleus key ``[P, 2]`` int64 of every scored
    position in batch order (:meth:`SamplingPolicy.token_stats_keyed`), so that a step's moved
    nucleus boundaries can be counted without storing masks; ``None`` when ``p = 1`` or not computed.
    """

    logq: Tensor
    entropy: Tensor
    surprisal: Tensor
    n_tokens: Tensor
    nucleus_key: Tensor | None = None

    @staticmethod
    def pick(entropy: Tensor, surprisal: Tensor, entropy_mode: str) -> Tensor:
        """``e``, the per-sequence entropy the estimators average: the RB ``entropy`` for
        ``entropy_mode="rb"``, the ``surprisal`` (``−logq``) for ``"naive"`` (module docstring).

        Works for any values that follow the rule: statistics at θ', token sums, derivatives.
        """
        return entropy if entropy_mode == "rb" else surprisal

    def e(self, entropy_mode: str) -> Tensor:
        """:meth:`pick` of these statistics."""
        return self.pick(self.entropy, self.surprisal, entropy_mode)


def share_mode(lm: FunctionalLM, share_prompts: str) -> str:
    """``share_prompts`` (``auto | on | off``) resolved for ``lm``: ``auto`` becomes ``off`` on a model
    whose prompts cannot be shared (:attr:`FunctionalLM.share_unsupported`), where ``on`` raises.

    ``auto`` shares a chunk's prompts where that saves at least a tenth of its token-forwards,
    ``on`` wherever two rows of a chunk have the same prompt (:func:`deltaH.batch.compact`).
    """
    check_choice("share_prompts", share_prompts, SHARE_MODES)
    if share_prompts == "off" or not lm.share_unsupported:
        return share_prompts
    if share_prompts == "on":
        raise ArgumentError(
            f"share_prompts='on' but this model cannot share prompts: {lm.share_unsupported}; "
            "use share_prompts='auto' or 'off' (compute.share_prompts in a config)"
        )
    return "off"


def chunks_of(batch: SequenceBatch, tf_batch_size: int, share: str = "off") -> list[Compact]:
    """The batch as compacted chunks of at most ``tf_batch_size`` sequences; ``share`` (already
    resolved by :func:`share_mode`) gives chunks with repeated prompts a shared-prompt plan."""
    if int(tf_batch_size) < 1:
        raise ArgumentError(f"tf_batch_size must be >= 1, got {tf_batch_size!r}")
    n = len(batch)
    return [compact(batch.select(slice(s, s + tf_batch_size)), share) for s in range(0, n, tf_batch_size)]


def head_rows(lm: FunctionalLM, k: int, head_chunk: int | None) -> int:
    """Scored positions per head call for ``k`` directions at once."""
    if head_chunk is not None:
        if int(head_chunk) < 1:
            raise ArgumentError(f"head_chunk must be >= 1, got {head_chunk!r}")
        return int(head_chunk)
    vocab = int(lm.vocab_size)
    return max(1, _HEAD_ELEMENTS // (vocab * max(k, 1)))


def chunk_token_stats(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    shifted: Mapping[str, Tensor] | None,
    c: Compact,
    policy: SamplingPolicy,
    head_chunk: int | None = None,
    keyed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token-level ``log q`` and entropy ``[K, P]`` of one compacted chunk, and with ``keyed`` the
    nucleus key ``[K, P, 2]`` of every scored position (:meth:`SamplingPolicy.token_stats_keyed`;
    ``None`` when ``p = 1`` or ``keyed`` is false).

    ``shifted`` is ``None`` (θ itself, K = 1) or a stacked tree ``[K, ...]`` of the parameters
    that differ from ``params``. Values are float64 (:meth:`SamplingPolicy.token_stats`).
    """
    if shifted is None:
        hidden = lm.hidden(params, c).unsqueeze(0)  # [1, n, L, D]
    elif next(iter(shifted.values())).shape[0] == 1:
        # One direction: a plain call (no vmap). On CPU, vmap's batched LoRA products (bmm with a
        # small rank) cost more than they save, so dir_chunk=1 is the loop without any mutation.
        one = {k: v[0] for k, v in shifted.items()}
        hidden = lm.hidden({**params, **one}, c).unsqueeze(0)
    else:
        base = {k: v for k, v in params.items() if k not in shifted}

        def run(sp: Mapping[str, Tensor]) -> Tensor:
            return lm.hidden({**base, **sp}, c)

        hidden = torch.func.vmap(run)(dict(shifted))  # [K, n, L, D]
    k = hidden.shape[0]
    h = hidden[:, c.rows, c.pred_pos]  # [K, P, D]: positions that predict a scored token
    head_shifted = {n: t for n, t in (shifted or {}).items() if n in lm.head_names}
    step = head_rows(lm, k, head_chunk)
    lq_parts, en_parts, key_parts = [], [], []
    head_base = {n: t for n, t in params.items() if n not in head_shifted}

    def head(sp: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return lm.head({**head_base, **sp}, x)

    for s in range(0, h.shape[1], step):
        hc = h[:, s : s + step]
        if head_shifted:
            logits = torch.func.vmap(head)(head_shifted, hc)
        else:
            logits = lm.head(params, hc)
        tgt = c.targets[s : s + step].expand(k, -1)
        if keyed:
            lq, en, key = policy.token_stats_keyed(logits, tgt)
            if key is not None:
                key_parts.append(key)
        else:
            lq, en = policy.token_stats(logits, tgt)
        lq_parts.append(lq)
        en_parts.append(en)
    keys = torch.cat(key_parts, dim=1) if key_parts else None
    return torch.cat(lq_parts, dim=1), torch.cat(en_parts, dim=1), keys


def stats_of_chunks(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    shifted: Mapping[str, Tensor] | None,
    chunks: Sequence[Compact],
    policy: SamplingPolicy,
    head_chunk: int | None = None,
    keyed: bool = False,
    base_key: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sequence ``(logq, entropy, keys)`` over all chunks; ``logq, entropy`` are ``[K, N]`` float64.

    ``keys`` is ``None`` unless ``keyed`` or ``base_key`` is given (and ``None`` when ``p = 1``).
    With ``keyed``, it is every scored position's nucleus key ``[K, P, 2]`` (positions in batch
    order: sequence-major, whatever the chunking). With ``base_key [P, 2]`` (θ's keys), it is
    instead the number of positions whose nucleus differs from θ's, ``[K]`` int64 (no
    per-position tensor is kept).
    """
    keyed = keyed or base_key is not None
    lq_all, en_all, key_all = [], [], []
    changed: Tensor | None = None
    offset = 0
    for c in chunks:
        lq, en, key = chunk_token_stats(lm, params, shifted, c, policy, head_chunk, keyed)
        lq_all.append(c.per_sequence(lq))
        en_all.append(c.per_sequence(en))
        if key is not None and base_key is not None:
            ref = base_key[offset : offset + key.shape[1]].to(key.device)
            diff = (key != ref.unsqueeze(0)).any(-1).sum(-1)  # [K]
            changed = diff if changed is None else changed + diff
        elif key is not None:
            key_all.append(key)
        offset += int(c.rows.numel())
    keys = changed if base_key is not None else (torch.cat(key_all, dim=1) if key_all else None)
    return torch.cat(lq_all, dim=1), torch.cat(en_all, dim=1), keys


def sequence_stats(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    policy: SamplingPolicy,
    tf_batch_size: int = 16,
    head_chunk: int | None = None,
    nucleus_keys: bool = False,
    share_prompts: str = "auto",
) -> SequenceStats:
    """Per-sequence ``log q``, RB entropy, surprisal and token counts at ``params`` (``[N]`` each).

    With ``nucleus_keys`` (top-p only) the result also carries every scored position's nucleus key.
    ``share_prompts`` (``auto | on | off``, :func:`share_mode`): run each chunk's repeated prompts once.

    >>> st = sequence_stats(lm, lm.params, batch, policy=SamplingPolicy(0.7, 0.9))  # doctest: +SKIP
    """
    lm.check_names(params)
    chunks = chunks_of(batch, tf_batch_size, share_mode(lm, share_prompts))
    lq, en, key = stats_of_chunks(lm, params, None, chunks, policy, head_chunk, keyed=nucleus_keys)
    return SequenceStats(logq=lq[0], entropy=en[0], surprisal=-lq[0], n_tokens=batch.n_tokens,
                         nucleus_key=None if key is None else key[0])


def token_cotangents(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    h: Tensor,
    targets: Tensor,
    temperature: float,
    policy: SamplingPolicy | None = None,
    entropy: bool = False,
    head_chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token log-probs and the gradients of log-prob and entropy w.r.t. the hidden states, without
    an autograd graph through the head: ``(lp [P], c_lp [P, D], c_H [P, D] or None)``.

    For hidden states ``h [P, D]``, ``z = head(h)/τ`` and ``q = softmax_S(z)`` over the kept set
    ``S`` (the nucleus of ``policy``, decided at these logits and held fixed; every token without a
    top-p ``policy``)::

        lp_t  = z_t[y_t] − logsumexp_S(z_t)                 (−inf when y_t ∉ S)
        c_lp  = J_headᵀ (onehot(y_t)·[y_t ∈ S] − q_t) / τ
        c_H   = J_headᵀ (−q_t ⊙ (z_t − Σ_S q_t z_t)) / τ    (with ``entropy``: the RB entropy's)

    The head runs on ``head_chunk`` rows at a time (:func:`head_rows`), so memory does not grow
    with ``P·V``; ``lp`` is in the compute dtype, the cotangents in ``h``'s dtype. The caller
    chains them through the backbone (``∇_θ Σ_t ⟨h_t(θ), c_t⟩``).
    """
    step = head_rows(lm, 1, head_chunk)
    lps, c_lp, c_h = [], [], []
    for s in range(0, h.shape[0], step):
        x = h[s : s + step].detach().requires_grad_(True)
        with torch.enable_grad():  # a one-chunk graph: the head's vjp, nothing [rows, V] kept
            logits = lm.head({n: t.detach() for n, t in params.items()}, x)

        def vjp(ct: Tensor, last: bool, x: Tensor = x, logits: Tensor = logits) -> tuple[Tensor]:
            return torch.autograd.grad(logits, x, grad_outputs=ct, retain_graph=not last)  # type: ignore[return-value]

        keep = policy.nucleus_mask(logits) if policy is not None else None
        z = scaled_logits(logits.detach(), temperature, keep)
        logp = torch.log_softmax(z, dim=-1)
        y = targets[s : s + step].unsqueeze(-1)
        lps.append(logp.gather(-1, y).squeeze(-1))
        q = logp.exp()  # 0 outside S
        inside = torch.ones_like(y, dtype=q.dtype) if keep is None else keep.gather(-1, y).to(q.dtype)
        (c,) = vjp(((-q).scatter_add(-1, y, inside) / temperature).to(logits.dtype), not entropy)
        c_lp.append(c)
        if entropy:
            zs = z if keep is None else z.masked_fill(~keep, 0.0)
            dz = -q * (zs - (q * zs).sum(-1, keepdim=True))
            (c,) = vjp((dz / temperature).to(logits.dtype), True)
            c_h.append(c)
    return torch.cat(lps), torch.cat(c_lp), torch.cat(c_h) if entropy else None


@dataclass(frozen=True)
class TokenDiagnostics:
    """Per scored token (flattened, ``[P]``): its sequence ``row``, ``position`` in the compacted row,
    ``logq``, RB ``entropy``, the ``top1`` probability, the ``nucleus`` size and ``eos`` probability
    under ``q``."""

    row: Tensor
    position: Tensor
    logq: Tensor
    entropy: Tensor
    top1: Tensor
    nucleus: Tensor
    eos: Tensor


def token_diagnostics(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    policy: SamplingPolicy,
    eos_token_ids: Sequence[int] = (),
    tf_batch_size: int = 16,
    share_prompts: str = "auto",
) -> TokenDiagnostics:
    """Per-token diagnostics of ``q`` at ``params`` on every scored token (no gradients);
    ``share_prompts`` as in :func:`sequence_stats`."""
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("row", "position", "logq", "entropy", "top1", "nucleus", "eos")
    }
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long)
    offset = 0
    with torch.no_grad():
        for c in chunks_of(batch, tf_batch_size, share_mode(lm, share_prompts)):
            h = lm.hidden(params, c)[c.rows, c.pred_pos]
            logits = lm.head(params, h)
            lq, en = policy.token_stats(logits, c.targets)
            keep = policy.nucleus_mask(logits)
            z = logits.double() / policy.temperature
            if keep is not None:
                z = z.masked_fill(~keep, float("-inf"))
            q = torch.softmax(z, dim=-1)
            parts["row"].append(c.rows + offset)
            parts["position"].append(c.pred_pos + 1)
            parts["logq"].append(lq.double())
            parts["entropy"].append(en.double())
            parts["top1"].append(q.amax(-1))
            parts["nucleus"].append(
                keep.sum(-1) if keep is not None else torch.full_like(c.rows, q.shape[-1])
            )
            parts["eos"].append(
                q[:, eos.to(q.device)].sum(-1) if eos.numel() else torch.zeros_like(lq.double())
            )
            offset += c.n
    return TokenDiagnostics(**{k: torch.cat(v) for k, v in parts.items()})
