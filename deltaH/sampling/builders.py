"""The evaluation batch ``E`` and the update batch ``U``, each with its provenance.

``E`` (docs/math.md#true-entropy-change-snis) is ``E_total_sequences = N`` draws from ``q_θ``:
``N / G`` prompts drawn from the records *with replacement* (``prompts="replacement"``, the default)
or *distinct* (``prompts="distinct"``), ``G`` responses each; optionally followed by ``G`` more
responses for each prompt of an update batch (``update_prompts_of``), so that E and U share
prompts (the kernel's same-prompt pairs, docs/math.md#fisher-kernel). ``U`` is a GRPO
generation batch: ``B_U`` *distinct* prompts, ``G`` responses each, rewarded and turned into
advantages as TRL's ``GRPOTrainer`` does (``grpo_trainer.py``, TRL 1.x)::

    A[b, g] = r[b, g] − mean_g r[b, :]                                   [B_U, G]
    A      /= std_g r[b, :] + 1e-4        scale_rewards="group" (TRL's default)
    A      /= std r[:, :] + 1e-4          scale_rewards="batch"
                                          scale_rewards="none": no division

``std`` is the unbiased ``torch.std`` (as in TRL); rewards and advantages are float32 (as in TRL).
A group whose ``G`` rewards are all equal has zero advantage and no gradient; such groups in ``U``
get fresh responses (same prompts) up to ``max_resample_attempts`` times, then a ``DataError``.

Rows are group-major (group ``k`` is rows ``k·G .. k·G + G − 1``). All randomness comes from one
``torch.Generator`` seeded with ``seed``: the prompt draw first, then the sampler, then any
re-draws, so a batch is a pure function of its arguments. E's extra rows for U's prompts are drawn
after its own rows from the same generator, so its own rows are those it has without them.
Prompts are tokenized with ``add_special_tokens=False`` by default (TRL does the same for its
prompts); responses are decoded with ``skip_special_tokens=True``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from deltaH._choices import EVAL_PROMPTS, check_choice
from deltaH._choices import SCALE_REWARDS as SCALE_REWARDS
from deltaH._choices import ScaleRewards as ScaleRewards
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, CheckpointError, DataError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.sampling.sampler import pack, sample
from deltaH.updates.losses import advantages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from deltaH.sampling.data import PromptRecord
    from deltaH.sampling.rewards import RewardFn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Drawn:
    """What ``E`` and ``U`` share: ``N`` sequences drawn from ``q`` with their provenance (per-row
    fields are ``[N]``).

    ``prompt_index`` indexes the ``records`` the batch was built from; ``group`` numbers the
    prompt draws (a prompt drawn twice forms two groups).
    """

    batch: SequenceBatch
    prompt_index: Tensor
    group: Tensor
    record_ids: list[str]
    prompts: list[str]
    responses: list[str]
    group_size: int
    seed: int
    policy: SamplingPolicy
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.batch)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready provenance dict per row."""
        n_tok = self.batch.n_tokens.tolist()
        return [
            dict(row=i, group=int(self.group[i]), prompt_index=int(self.prompt_index[i]),
                 record_id=self.record_ids[i], prompt=self.prompts[i], response=self.responses[i],
                 n_tokens=n_tok[i], seed=self.seed)
            for i in range(len(self.batch))
        ]


@dataclass(frozen=True)
class EvalBatch(_Drawn):
    """``E``: ``N`` sequences with their provenance (the fields of every drawn batch, no rewards).

    ``update_prompt [N]`` (bool; None when E was built without ``update_prompts_of``) marks the rows
    drawn for the update batch's prompts; their ``prompt_index`` is U's (−1 for a recorded U).
    """

    update_prompt: Tensor | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready provenance dict per row (with ``update_prompt`` when E has such rows)."""
        out = super().rows()
        if self.update_prompt is not None:
            for d, u in zip(out, self.update_prompt.tolist(), strict=True):
                d["update_prompt"] = bool(u)
        return out


@dataclass(frozen=True)
class UpdateBatch(_Drawn):
    """``U``: ``N = B_U · G`` sequences, their rewards and advantages (float32 ``[N]``) and provenance.

    ``source``: ``sampled`` (drawn here), ``recorded`` (a trainer's recorded step) or ``file``
    (another trainer's rollouts); the last two have ``prompt_index`` −1, ``seed`` −1 and NaN rewards
    unless the record carries them.

    ``resampled [B_U]`` counts how many times each group's responses were drawn again because all
    its rewards were equal.
    """

    rewards: Tensor
    advantages: Tensor
    resampled: Tensor
    scale_rewards: str
    source: str = "sampled"

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready provenance dict per row (with ``reward`` and ``advantage``; a reward the
        source does not know, as in a trainer's recorded batch, is ``None``)."""
        out = super().rows()
        for d, r, a in zip(out, self.rewards.tolist(), self.advantages.tolist(), strict=True):
            d.update(reward=None if r != r else r, advantage=a)
        return out


def grpo_advantages(rewards: Tensor, group_size: int, scale_rewards: ScaleRewards = "group") -> Tensor:
    """TRL's GRPO advantages of group-major ``rewards [B·G]`` (:func:`deltaH.updates.losses.advantages`)."""
    return advantages(rewards.reshape(-1, group_size), scale_rewards).reshape(-1).to(rewards.dtype)


def build_eval_batch(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    records: Sequence[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    *,
    policy: SamplingPolicy,
    total_sequences: int,
    group_size: int,
    max_new_tokens: int,
    seed: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    batch_size: int | None = None,
    add_special_tokens: bool = False,
    prompts: str = "replacement",
    update_prompts_of: UpdateBatch | None = None,
) -> EvalBatch:
    """``E``: ``total_sequences / group_size`` prompts, ``group_size`` responses each.

    ``prompts``: ``"replacement"`` draws the prompts with replacement (a prompt may repeat),
    ``"distinct"`` draws distinct ones (a ``DataError`` when the records are fewer than
    ``total_sequences / group_size``). ``update_prompts_of``: an update batch whose prompts get
    ``group_size`` responses each as well, drawn after E's own rows (one group per prompt group of
    U, in U's group order; U's rows themselves are not reused): ``N = total_sequences + B_U ·
    group_size``. ``eos_token_id`` / ``pad_token_id`` default to the tokenizer's (pad falls back to
    EOS); ``batch_size`` is the sampler's chunk size. Returns an :class:`EvalBatch` of ``N`` rows,
    group-major.
    """
    _check_records(records)
    _check_int("group_size", group_size, 1)
    _check_int("total_sequences", total_sequences, 1)
    check_choice("prompts", prompts, EVAL_PROMPTS)
    if total_sequences % group_size:
        raise ArgumentError(
            f"total_sequences={total_sequences} is not a multiple of group_size={group_size}: E is made "
            f"of whole groups; use e.g. total_sequences={-(-total_sequences // group_size) * group_size}"
        )
    n_groups = total_sequences // group_size
    if prompts == "distinct" and n_groups > len(records):
        raise DataError(
            f"E needs {n_groups} distinct prompts (total_sequences / group_size) but there are "
            f"{len(records)} records: set eval_batch.prompts to replacement, lower "
            "eval_batch.total_sequences or raise eval_batch.group_size, or load more prompts (data.path, "
            "data.limit)"
        )
    eos, pad = _special_ids(tokenizer, eos_token_id, pad_token_id)
    g = torch.Generator().manual_seed(_check_int("seed", seed, None))
    if prompts == "distinct":
        draws = torch.randperm(len(records), generator=g)[:n_groups].tolist()
    else:
        draws = torch.randint(len(records), (n_groups,), generator=g).tolist()
    prompt_ids = _encode(lm, records, draws, tokenizer, add_special_tokens)
    batch = sample(lm, params, prompt_ids, policy=policy, max_new_tokens=max_new_tokens,
                   n_per_prompt=group_size, eos_token_id=eos, pad_token_id=pad, generator=g,
                   batch_size=batch_size)
    index = [i for i in draws for _ in range(group_size)]
    ids = [records[i].id for i in index]
    texts = [records[i].prompt for i in index]
    flag = None
    if update_prompts_of is not None:
        extra = _update_prompts(update_prompts_of)
        more = sample(lm, params, [e[0] for e in extra], policy=policy, max_new_tokens=max_new_tokens,
                      n_per_prompt=group_size, eos_token_id=eos, pad_token_id=pad, generator=g,
                      batch_size=batch_size)
        rows = [p for p in prompt_ids for _ in range(group_size)]
        rows += [e[0] for e in extra for _ in range(group_size)]
        batch = pack(rows, _responses(batch) + _responses(more), pad, device=lm.device)
        index += [e[1] for e in extra for _ in range(group_size)]
        ids += [e[2] for e in extra for _ in range(group_size)]
        texts += [e[3] for e in extra for _ in range(group_size)]
        flag = torch.arange(len(index)) >= total_sequences
    return EvalBatch(
        batch=batch,
        prompt_index=torch.tensor(index, dtype=torch.long),
        group=torch.arange(len(index) // group_size).repeat_interleave(group_size),
        record_ids=ids,
        prompts=texts,
        responses=_decode(tokenizer, _responses(batch)),
        group_size=group_size,
        seed=seed,
        policy=policy,
        max_new_tokens=max_new_tokens,
        update_prompt=flag,
    )


def prompt_tokens(batch: SequenceBatch) -> list[tuple[int, ...]]:
    """Each row's prompt: its attended token ids before the first scored (response) token."""
    out = []
    for ids, am, rm in zip(batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.response_mask.cpu(),
                           strict=True):
        first = int(rm.nonzero()[0]) if bool(rm.any()) else len(ids)
        out.append(tuple(ids[:first][am[:first]].tolist()))
    return out


def _update_prompts(up: UpdateBatch) -> list[tuple[list[int], int, str, str]]:
    """``(prompt ids, prompt_index, record id, prompt text)`` of each prompt group of ``up``, in
    group order (the group's first row)."""
    toks = prompt_tokens(up.batch)
    first: dict[int, int] = {}
    for r, k in enumerate(up.group.tolist()):
        first.setdefault(int(k), r)
    return [(list(toks[r]), int(up.prompt_index[r]), up.record_ids[r], up.prompts[r])
            for _, r in sorted(first.items())]


def build_update_batch(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    records: Sequence[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    reward_fn: RewardFn,
    *,
    policy: SamplingPolicy,
    n_prompts: int,
    group_size: int,
    max_new_tokens: int,
    seed: int,
    scale_rewards: ScaleRewards = "group",
    max_resample_attempts: int = 4,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    batch_size: int | None = None,
    add_special_tokens: bool = False,
) -> UpdateBatch:
    """``U``: ``n_prompts`` (``B_U``) distinct prompts, ``group_size`` (``G``) responses each, rewarded.

    ``reward_fn(completions, records)`` gets the decoded responses and the row's records (``N``
    each) and returns ``N`` finite rewards. Groups whose rewards are all equal are drawn again
    (fresh responses, same prompt) up to ``max_resample_attempts`` times; if any is still
    degenerate a ``DataError`` says how many. Returns an :class:`UpdateBatch` of ``N = B_U · G``
    rows, group-major.
    """
    _check_update_args(records, n_prompts, group_size, max_resample_attempts, scale_rewards)
    eos, pad = _special_ids(tokenizer, eos_token_id, pad_token_id)
    g = torch.Generator().manual_seed(_check_int("seed", seed, None))
    chosen = torch.randperm(len(records), generator=g)[:n_prompts].tolist()
    prompt_ids = _encode(lm, records, chosen, tokenizer, add_special_tokens)
    G = group_size
    index = [i for i in chosen for _ in range(G)]
    row_records = [records[i] for i in index]

    def draw(groups: list[int]) -> tuple[list[list[int]], list[str], list[float]]:
        """Fresh responses of ``groups`` (prompt-major rows), decoded and rewarded."""
        resp = _responses(sample(lm, params, [prompt_ids[k] for k in groups], policy=policy,
                                 max_new_tokens=max_new_tokens, n_per_prompt=G, eos_token_id=eos,
                                 pad_token_id=pad, generator=g, batch_size=batch_size))
        texts = _decode(tokenizer, resp)
        rows = [row_records[k * G + j] for k in groups for j in range(G)]
        return resp, texts, _rewards(reward_fn, texts, rows)

    responses, texts, rewards, resampled = _draw_until_rewards_differ(
        draw, n_prompts, G, max_resample_attempts, [records[k].id for k in chosen]
    )
    r_t = torch.tensor(rewards, dtype=torch.float32)
    return UpdateBatch(
        batch=pack([prompt_ids[k // G] for k in range(len(index))], responses, pad, device=lm.device),
        prompt_index=torch.tensor(index, dtype=torch.long),
        group=torch.arange(n_prompts).repeat_interleave(G),
        record_ids=[rec.id for rec in row_records],
        prompts=[rec.prompt for rec in row_records],
        responses=texts,
        rewards=r_t,
        advantages=grpo_advantages(r_t, G, scale_rewards),
        resampled=resampled,
        scale_rewards=scale_rewards,
        group_size=G,
        seed=seed,
        policy=policy,
        max_new_tokens=max_new_tokens,
    )


# -- helpers ---------------------------------------------------------------------------------
def _check_update_args(
    records: Sequence[PromptRecord], n_prompts: int, group_size: int, max_resample_attempts: int,
    scale_rewards: str,
) -> None:
    """The checks of :func:`build_update_batch` that need no model."""
    _check_records(records)
    _check_int("n_prompts", n_prompts, 1)
    if n_prompts > len(records):
        raise DataError(
            f"n_prompts={n_prompts} exceeds the {len(records)} records: U needs distinct prompts; "
            "lower n_prompts (config key update_batch.n_prompts) or load more prompts (data.path, "
            "data.limit)"
        )
    if _check_int("group_size", group_size, 1) < 2:
        raise ArgumentError(
            f"group_size={group_size}: a GRPO group needs >= 2 responses (one response has zero advantage)"
        )
    _check_int("max_resample_attempts", max_resample_attempts, 0)
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)


def _draw_until_rewards_differ(
    draw: Callable[[list[int]], tuple[list[list[int]], list[str], list[float]]],
    n_groups: int,
    group_size: int,
    max_attempts: int,
    group_ids: list[str],
) -> tuple[list[list[int]], list[str], list[float], Tensor]:
    """Draw every group once, then re-draw the groups whose rewards are all equal, up to
    ``max_attempts`` times: ``(responses, texts, rewards, resampled [n_groups])``, rows group-major.

    ``draw(groups)`` samples and rewards the given groups; ``group_ids`` name them in the error.
    """
    G = group_size
    responses, texts, rewards = draw(list(range(n_groups)))
    resampled = torch.zeros(n_groups, dtype=torch.long)
    for attempt in range(max_attempts + 1):
        flat = _degenerate(rewards, G)
        if not flat or attempt == max_attempts:
            break
        logger.info("U: %d of %d groups have equal rewards; drawing them again (attempt %d of %d)",
                    len(flat), n_groups, attempt + 1, max_attempts)
        rows = [k * G + j for k in flat for j in range(G)]
        for r, resp, text, rew in zip(rows, *draw(flat), strict=True):
            responses[r], texts[r], rewards[r] = resp, text, rew
        resampled[flat] += 1
    if flat:
        ids = [group_ids[k] for k in flat]
        more = " ..." if len(ids) > 10 else ""
        raise DataError(
            f"{len(flat)} of {n_groups} groups in U still have identical rewards for all {G} responses "
            f"after {max_attempts} re-draws (record ids {ids[:10]}{more}); "
            "their advantages are zero. Use a larger group_size, different prompts (or seed), or a "
            "higher max_resample_attempts (config keys update_batch.group_size, seed, "
            "update_batch.max_resample_attempts)"
        )
    return responses, texts, rewards, resampled


def _check_int(name: str, value: int, low: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ArgumentError(f"{name} must be an int{bound}, got {value!r}")
    return value


def _check_records(records: Sequence[PromptRecord]) -> None:
    if len(records) == 0:
        raise ArgumentError("records is empty: load at least one prompt (deltaH.sampling.data.load_prompts)")


def _special_ids(
    tokenizer: PreTrainedTokenizerBase, eos: int | Sequence[int] | None, pad: int | None
) -> tuple[int | list[int], int]:
    """EOS id(s) and pad id: the given ones, else the tokenizer's (pad falls back to the first EOS)."""
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise CheckpointError(
                "the tokenizer has no eos_token_id: set it in the checkpoint's tokenizer files, or (API) "
                "pass eos_token_id explicitly"
            )
    eos_out: int | list[int] = eos if isinstance(eos, int) else list(eos)
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = eos_out if isinstance(eos_out, int) else eos_out[0]
    return eos_out, pad


def _encode(
    lm: FunctionalLM,
    records: Sequence[PromptRecord],
    chosen: list[int],
    tokenizer: PreTrainedTokenizerBase,
    add_special_tokens: bool,
) -> list[list[int]]:
    """Token ids of the chosen records' prompts (each record encoded once)."""
    cache: dict[int, list[int]] = {}
    for i in dict.fromkeys(chosen):
        ids = list(tokenizer.encode(records[i].prompt, add_special_tokens=add_special_tokens))
        if not ids:
            raise DataError(
                f"record {records[i].id!r}: the prompt encodes to no tokens; the sampler needs at least "
                "one (fix the prompt in the data file, data.path; API: add_special_tokens=True prepends BOS)"
            )
        if max(ids) >= lm.vocab_size:
            raise CheckpointError(
                f"record {records[i].id!r}: token id {max(ids)} is outside the model's vocabulary "
                f"({lm.vocab_size}); the tokenizer does not belong to this model"
            )
        cache[i] = ids
    return [cache[i] for i in chosen]


def _responses(batch: SequenceBatch) -> list[list[int]]:
    """Response token ids of every row (the ``response_mask`` positions)."""
    return [ids[m].tolist() for ids, m in zip(batch.input_ids, batch.response_mask, strict=True)]


def _decode(tokenizer: PreTrainedTokenizerBase, responses: list[list[int]]) -> list[str]:
    return list(tokenizer.batch_decode(responses, skip_special_tokens=True))


def _rewards(reward_fn: RewardFn, texts: list[str], records: list[PromptRecord]) -> list[float]:
    """Call ``reward_fn`` and check it returned one finite number per completion."""
    out = reward_fn(list(texts), list(records))
    try:
        vals = [float(r) for r in out]
    except (TypeError, ValueError) as e:
        raise TypeError(f"reward_fn must return a list of numbers, got {type(out).__name__} ({e})") from None
    if len(vals) != len(texts):
        raise ValueError(f"reward_fn returned {len(vals)} rewards for {len(texts)} completions")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        shown = [vals[i] for i in bad[:5]]
        raise ValueError(f"reward_fn returned non-finite rewards at rows {bad[:5]}: {shown}")
    return vals


def _degenerate(rewards: list[float], group_size: int) -> list[int]:
    """Groups whose rewards are all equal (zero advantage under every ``scale_rewards``)."""
    groups = [rewards[k : k + group_size] for k in range(0, len(rewards), group_size)]
    return [k for k, r in enumerate(groups) if max(r) == min(r)]
