"""Ancestral sampling from the policy ``q`` (docs/math.md#policy) with a KV cache.

At every step each unfinished row draws its next token from::

    q(· | y_<t) = TopP_p( softmax(z_t / τ) )        z_t = last-position logits [n, V]

with the kept set from :meth:`SamplingPolicy.nucleus_mask` (HF's ``TopPLogitsWarper`` rule,
decided in float32 as ``generate`` does) and the probabilities in float32 (float64 for a float64
model, as :meth:`SamplingPolicy.token_stats`), so the draws follow the ``q`` that
:func:`deltaH.sequence_stats` scores.

Per-row randomness. The generator is used once per call: ``u = rand([N, max_new_tokens])``
(float64, on the generator's device), and row ``r`` takes its ``t``-th token by inverse CDF::

    y_t = min{ v : Σ_{w ≤ v} q_w > u[r, t] · Σ_w q_w }        (float64 cumulative sum)

which is an exact draw from ``q`` (tokens outside the nucleus have zero width and are never
chosen). Row ``r`` therefore depends only on its prompt, ``u[r]`` and the parameters: the result
does not depend on ``batch_size`` (a memory knob) or on the other prompts, up to round-off in the
logits of differently padded chunks, and the generator's state after the call does not depend on
when rows stop. A CPU generator works for a model on any device.

Decoding layout (see ``_decode_chunk``): the KV cache is filled from right-padded prompts with
``position_ids = cumsum(attention_mask) − 1``, so no query is ever fully masked (HF eager
attention returns NaN for fully masked left-padding rows of a float64 model, and ``generate``
fails there). Models with sliding-window attention are decoded in chunks of equal prompt length.

Layout of the returned :class:`SequenceBatch` ``[N, P + T]``: ``N = len(prompt_ids) ·
n_per_prompt`` rows, prompt-major (prompt 0's ``n_per_prompt`` responses first); prompts
left-padded to the longest prompt ``P``; responses right-padded to the longest response ``T``.
``response_mask`` is True at the generated tokens up to and including the first EOS; after a
row's EOS every position is ``pad_token_id`` with ``attention_mask`` and ``response_mask``
False.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, scaled_logits


def sample(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    prompt_ids: Sequence[Sequence[int]],
    *,
    policy: SamplingPolicy,
    max_new_tokens: int = 64,
    n_per_prompt: int = 8,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
    batch_size: int | None = None,
) -> SequenceBatch:
    """Draw ``n_per_prompt`` responses per prompt from ``q_θ`` (docs/math.md#policy) at ``params``.

    Args:
        lm, params: the model and the parameters ``θ`` to sample at.
        prompt_ids: ``M`` non-empty prompts as token-id lists.
        policy: temperature and nucleus mass.
        max_new_tokens: at most this many generated tokens per row (EOS included).
        n_per_prompt: responses per prompt.
        eos_token_id: one id or several; a row stops after emitting any of them.
        pad_token_id: filler for padding (never attended, never scored).
        generator: the only source of randomness (used once, see the module docstring).
        batch_size: rows decoded together (default: all ``N``); a memory knob only.

    Returns:
        ``SequenceBatch`` with ``input_ids``, ``attention_mask``, ``response_mask`` ``[N, P + T]``,
        rows prompt-major.

    >>> b = sample(lm, lm.params, [[1, 2], [3]], policy=SamplingPolicy(0.7, 0.9), max_new_tokens=8,
    ...            n_per_prompt=4, eos_token_id=0, pad_token_id=0,
    ...            generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """
    vocab = int(lm.vocab_size)
    prompts = _check_prompts(prompt_ids, vocab)
    eos = _check_ids("eos_token_id", eos_token_id, vocab)
    (pad,) = _check_ids("pad_token_id", pad_token_id, vocab, single=True)
    for name, val in (("max_new_tokens", max_new_tokens), ("n_per_prompt", n_per_prompt)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ArgumentError(f"{name} must be an int >= 1, got {val!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ArgumentError(f"batch_size must be an int >= 1 or None (all rows at once), got {batch_size!r}")
    if not isinstance(policy, SamplingPolicy):
        raise TypeError(f"policy must be a deltaH.SamplingPolicy, got {type(policy).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    lm.check_names(params)

    rows = [p for p in prompts for _ in range(n_per_prompt)]  # prompt-major
    n = len(rows)
    u = torch.rand(n, max_new_tokens, generator=generator, dtype=torch.float64, device=generator.device)
    u = u.to(lm.device)
    responses: list[list[int]] = [[] for _ in range(n)]
    with torch.no_grad():
        for idx in _chunks(rows, n if batch_size is None else batch_size, _windowed(lm)):
            got = _decode_chunk(lm, params, [rows[r] for r in idx], u[idx], policy, eos, pad)
            for r, resp in zip(idx, got, strict=True):
                responses[r] = resp
    return pack(rows, responses, pad, eos, device=lm.device)


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    eos_token_id: int | Sequence[int] = (),
    device: torch.device | str | None = None,
) -> SequenceBatch:
    """Lay out ``N`` (prompt, response) pairs as a ``SequenceBatch [N, P + T]``.

    Prompts are left-padded to the longest prompt ``P``, responses right-padded to the longest
    response ``T``; each response is cut after its first EOS (if ``eos_token_id`` is given).
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    cut = []
    for r in responses:
        stop = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        cut.append(list(r[:stop]))
    n, p_len, t_len = len(prompts), max(len(p) for p in prompts), max(len(r) for r in cut)
    ids = torch.full((n, p_len + t_len), pad_token_id, dtype=torch.long)
    am = torch.zeros(n, p_len + t_len, dtype=torch.bool)
    rm = torch.zeros(n, p_len + t_len, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, cut, strict=True)):
        lo, hi = p_len - len(p), p_len + len(r)
        ids[i, lo:p_len] = torch.as_tensor(list(p), dtype=torch.long)
        ids[i, p_len:hi] = torch.as_tensor(r, dtype=torch.long)
        am[i, lo:hi] = True
        rm[i, p_len:hi] = True
    return SequenceBatch(ids.to(device), am.to(device), rm.to(device))


def _windowed(lm: FunctionalLM) -> bool:
    """Whether some attention layer has a window (sliding / chunked) counted in cache columns."""
    cfg = getattr(lm.model, "config", None)  # peft models forward ``config`` to the base model
    types = getattr(cfg, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    return getattr(cfg, "sliding_window", None) is not None


def _chunks(rows: Sequence[list[int]], size: int, same_length: bool) -> list[list[int]]:
    """Row indices per decoding chunk: consecutive runs of ``size`` rows, or, when ``same_length``,
    runs of rows sharing one prompt length (no padding at all), at most ``size`` each."""
    if not same_length:
        return [list(range(s, min(s + size, len(rows)))) for s in range(0, len(rows), size)]
    by_len: dict[int, list[int]] = {}
    for r, p in enumerate(rows):
        by_len.setdefault(len(p), []).append(r)
    return [g[s : s + size] for g in by_len.values() for s in range(0, len(g), size)]


def _decode_chunk(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    prompts: Sequence[list[int]],
    u: Tensor,
    policy: SamplingPolicy,
    eos: tuple[int, ...],
    pad: int,
) -> list[list[int]]:
    """Generate one chunk of ``n`` rows (``u [n, max_new_tokens]``); returns the response ids.

    The KV cache is filled from the *right*-padded prompts, so every query has an attended key
    (column 0 is a real token); a left-padded prefill gives fully masked pad queries, which HF
    eager attention turns into NaN on float64 models and spreads through the padded row. When
    lengths differ, each row's last prompt token is then fed again as one new column (its first
    copy masked), so the last column is real in every row and its logits predict ``y_1``. Position
    ids are ``cumsum(attention_mask) − 1`` throughout, so every real token keeps its position.
    The masked gap would shrink a sliding window (HF counts windows in cache columns), so for such
    models :func:`sample` only builds chunks of equal prompt lengths, which need no padding.
    """
    n, steps, dev = len(prompts), u.shape[1], lm.device
    lens = torch.as_tensor([len(p) for p in prompts], device=dev)
    p_len = int(lens.max())
    ids = torch.full((n, p_len), pad, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    am = (torch.arange(p_len, device=dev) < lens.unsqueeze(1)).long()  # [n, P], right-padded
    logits, cache = lm.step(params, ids, (am.cumsum(1) - 1).clamp(min=0), am, None)
    if int(lens.min()) != p_len:
        last = ids.gather(1, (lens - 1).unsqueeze(1))  # [n, 1]
        am = am.scatter(1, (lens - 1).unsqueeze(1), 0)
        am = torch.cat([am, torch.ones_like(last)], dim=1)
        logits, cache = lm.step(params, last, am.sum(1, keepdim=True) - 1, am, cache)
    eos_t = torch.as_tensor(eos, dtype=torch.long, device=dev)
    out = torch.full((n, steps), pad, dtype=torch.long, device=dev)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    length = torch.full((n,), steps, dtype=torch.long, device=dev)  # generated tokens, EOS included
    for t in range(steps):
        if bool(torch.isnan(logits[active]).any()):
            raise FloatingPointError(
                f"the model returned NaN logits at generation step {t}; check the model and its dtype"
            )
        tok = torch.where(active, _draw(logits, u[:, t], policy), pad)  # [n]
        out[:, t] = tok
        done_now = active & torch.isin(tok, eos_t)
        length[done_now] = t + 1
        active = active & ~done_now
        if t + 1 == steps or not bool(active.any()):
            break
        # A finished row keeps decoding pads that nothing attends to (its logits are ignored).
        am = torch.cat([am, active.long().unsqueeze(1)], dim=1)
        pos = (am.sum(1, keepdim=True) - 1).clamp(min=0)
        logits, cache = lm.step(params, tok.unsqueeze(1), pos, am, cache)
    return [out[i, :k].tolist() for i, k in enumerate(length.tolist())]


def _draw(logits: Tensor, u: Tensor, policy: SamplingPolicy) -> Tensor:
    """One token per row of ``logits [n, V]`` from ``q`` by inverse CDF at uniforms ``u [n]``."""
    keep = policy.nucleus_mask(logits)  # decided in float32, as generate does
    prob = torch.softmax(scaled_logits(logits, policy.temperature, keep), dim=-1)  # as token_stats
    cdf = prob.cumsum(-1, dtype=torch.float64)  # non-decreasing: zero-mass tokens have zero width
    x = (u * cdf[:, -1]).unsqueeze(1)
    tok = torch.searchsorted(cdf, x, right=True).squeeze(1)
    # x can round up to the total mass (probability ~1e-16): take the last token with mass.
    last = prob.shape[-1] - 1 - (prob > 0).flip(-1).int().argmax(-1)
    return torch.minimum(tok, last)


def _check_prompts(prompt_ids: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    """Validate ``prompt_ids`` as non-empty lists of ids in ``[0, vocab)``."""
    if isinstance(prompt_ids, (str, bytes, Tensor)) or not isinstance(prompt_ids, Sequence):
        raise TypeError(f"prompt_ids must be a list of lists of token ids, got {type(prompt_ids).__name__}")
    if len(prompt_ids) == 0:
        raise ArgumentError("prompt_ids is empty: pass at least one prompt")
    out = []
    for i, p in enumerate(prompt_ids):
        try:
            ids = [operator.index(t) for t in p]
        except TypeError as e:
            raise TypeError(f"prompt_ids[{i}] must be a sequence of int token ids ({e})") from None
        if not ids:
            raise ArgumentError(
                f"prompt_ids[{i}] is empty: every prompt needs at least one token (e.g. a BOS token)"
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ArgumentError(f"prompt_ids[{i}] has ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        out.append(ids)
    return out


def _check_ids(name: str, value: Any, vocab: int, single: bool = False) -> tuple[int, ...]:
    """Validate one token id (or, unless ``single``, a non-empty list of them) against the vocabulary."""
    ids: tuple[int, ...] | None = None
    if not isinstance(value, (str, bytes)):
        try:
            ids = (operator.index(value),)
        except TypeError:
            if not single:
                with contextlib.suppress(TypeError):
                    ids = tuple(operator.index(t) for t in value)
    if ids is None:
        want = "an int token id" if single else "an int token id or a list of them"
        raise TypeError(f"{name} must be {want}, got {value!r}")
    if not ids:
        raise ArgumentError(f"{name} is empty: pass at least one token id")
    if any(not 0 <= t < vocab for t in ids):
        raise ArgumentError(f"{name}={value!r} is outside the vocabulary [0, {vocab})")
    return ids
