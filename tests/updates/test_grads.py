"""Per-sequence gradients (deltaH.updates.grads) against plain per-row autograd.

Reference (``ref_row_grads``): for each row, the unpadded tokens go through ``model(...).logits``,
``S_i = Σ_{t∈R_i} log_softmax(logits_t / τ)[y_t]``, and ``torch.autograd.grad`` gives ``∇S_i`` for
the model's trainable parameters (LoRA factors, every weight of a full model, a tied embedding
that is also the LM head). The batched twin (``test_weighted_sum_equals_ordinary_backward``) runs
the whole padded batch through the model once, with its attention mask, and calls ``backward``.

Tolerances: the models are float64 end to end (conftest: HF's float32 RMSNorm, rotary and softmax
islands replaced), so only float64 round-off separates the paths, on every CPU kernel set.
Row by row and batched, deltaH and the references agree to ≤ 1e-12: rtol 1e-7, atol 1e-9 × the
largest gradient entry (a wrong coefficient or a missing term is O(1)).
"""

from __future__ import annotations

import pytest
import torch
from _refs import ref_row_grads, trainable
from conftest import build_batch, tiny_llama, tiny_qwen2, with_lora
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaH as dh
from deltaH.updates import logprob_sums, loss_coefficients, sequence_logprob_grads

TAU = 0.7
RTOL = 1e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _close_tree(got: dict, ref: dict, rtol: float = RTOL, atol: float = 1e-9) -> None:
    """Leaf-wise closeness; ``atol`` is relative to the largest entry of the reference tree."""
    assert set(got) == set(ref)
    scale = max(float(t.abs().max()) for t in ref.values())
    for n in ref:
        torch.testing.assert_close(
            got[n], ref[n], rtol=rtol, atol=atol * scale, msg=lambda m, n=n: f"{n}: {m}"
        )


def random_rows(n: int, seed: int, vocab: int = 32) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lp, lr = (int(x) for x in torch.randint(1, 6, (2,), generator=g))
        out.append(
            (
                torch.randint(4, vocab, (lp,), generator=g).tolist(),
                torch.randint(0, vocab, (lr,), generator=g).tolist(),
            )
        )
    return out


class Case:
    def __init__(self, model: torch.nn.Module, n: int = 7, seed: int = 0) -> None:
        self.model = model
        self.lm = dh.FunctionalLM.from_model(model)
        self.rows = random_rows(n, seed)
        gen = torch.Generator().manual_seed(seed)
        self.batch = build_batch(self.rows, side="mixed", pad=2, generator=gen)
        self.ref_g, self.ref_s = ref_row_grads(model, self.batch, TAU)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    return {
        "lora": Case(with_lora(tiny_qwen2(seed=5))),
        "full": Case(tiny_qwen2(seed=6), seed=1),
        "tied": Case(tiny_llama(tie=True, seed=7), seed=2),
    }


@pytest.mark.parametrize("which", ["lora", "full", "tied"])
def test_matches_per_row_autograd(cases: dict[str, Case], which: str) -> None:
    c = cases[which]
    g, s = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, seq_chunk=3)
    assert set(g) == set(c.lm.params)
    for n, t in g.items():
        assert t.shape == (len(c.batch), *c.lm.params[n].shape) and t.dtype == torch.float64
    _close_tree(g, c.ref_g)
    torch.testing.assert_close(s, c.ref_s, rtol=RTOL, atol=1e-9)
    torch.testing.assert_close(
        logprob_sums(c.lm, c.lm.params, c.batch, temperature=TAU), c.ref_s, rtol=RTOL, atol=1e-9
    )
    if which == "tied":  # one name carries both the embedding and the head gradient
        assert "model.embed_tokens.weight" in g and "lm_head.weight" not in g
    if which == "lora":
        assert all("lora_" in n for n in g)
    # every sequence has its own, non-trivial gradient
    flat = torch.cat([t.flatten(1) for t in g.values()], 1)
    assert torch.linalg.matrix_rank(flat) == len(c.batch)


@pytest.mark.parametrize("which", ["lora", "tied"])
def test_weighted_sum_equals_ordinary_backward(cases: dict[str, Case], which: str) -> None:
    """``Σ_i coef_i G_i`` = ``backward`` of ``L = Σ_i coef_i S_i`` computed on the padded batch at once."""
    c = cases[which]
    adv = torch.linspace(-1.0, 1.3, len(c.batch), dtype=torch.float64)
    coef = loss_coefficients(c.batch.n_tokens, adv, loss_type="dapo")
    g, _ = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, seq_chunk=4)
    ours = {n: (coef.view(-1, *[1] * (t.dim() - 1)) * t).sum(0) for n, t in g.items()}

    batch = build_batch(c.rows, side="right", pad=2)  # right padding: no fully-masked attention rows
    am = batch.attention_mask
    params = trainable(c.model)
    for p in params.values():
        p.grad = None
    logits = c.model(
        input_ids=batch.input_ids,
        attention_mask=am.long(),
        position_ids=(am.long().cumsum(1) - 1).clamp(min=0),
    ).logits
    lp = torch.log_softmax(logits[:, :-1].double() / TAU, -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    s = (lp * batch.response_mask[:, 1:]).sum(1)
    (coef * s).sum().backward()
    ref = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    _close_tree(ours, ref)
    # and logprob_sums is differentiable to the same gradient
    leaves = {n: t.clone().requires_grad_(True) for n, t in c.lm.params.items()}
    loss = (coef * logprob_sums(c.lm, leaves, c.batch, temperature=TAU)).sum()
    _close_tree(
        dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True)),
        ours,
    )


@settings(max_examples=8)
@given(
    seq_chunk=st.integers(1, 9),
    side=st.sampled_from(["left", "right", "mixed"]),
    extra=st.integers(0, 3),
    pad=st.integers(0, 31),
    seed=st.integers(0, 100),
)
def test_chunk_and_padding_invariance(
    cases: dict[str, Case], seq_chunk: int, side: str, extra: int, pad: int, seed: int
) -> None:
    c = cases["lora"]
    gen = torch.Generator().manual_seed(seed)
    batch = build_batch(c.rows, side=side, pad=pad, extra=extra, generator=gen)
    g, s = sequence_logprob_grads(c.lm, c.lm.params, batch, temperature=TAU, seq_chunk=seq_chunk)
    _close_tree(g, c.ref_g)
    torch.testing.assert_close(s, c.ref_s, rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("policy", [None, dh.SamplingPolicy(TAU, 0.9)])
def test_head_runs_on_scored_positions_only(cases: dict[str, Case], policy: dh.SamplingPolicy | None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With LoRA (no head parameter differentiated) the head sees each scored position once, in
    chunks, outside ``vmap``: memory does not grow with ``T·V`` (no ``[L, V]`` logits per sequence)."""
    c = cases["lora"]
    rows: list[int] = []
    head = c.lm.head

    def counting_head(params: dict, x: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[:-1].numel())
        return head(params, x)

    monkeypatch.setattr(c.lm, "head", counting_head)
    g, s = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, seq_chunk=3, policy=policy)
    assert sum(rows) == int(c.batch.n_tokens.sum())
    if policy is None:  # (the top-p values are checked against autograd in tests/estimators/test_kernel.py)
        _close_tree(g, c.ref_g)


def test_names_restrict_the_gradient(cases: dict[str, Case]) -> None:
    c = cases["full"]
    names = ["lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    g, s = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, names=names)
    assert list(g) == names
    _close_tree(g, {n: c.ref_g[n] for n in names})
    torch.testing.assert_close(s, c.ref_s, rtol=RTOL, atol=1e-9)


def test_temperature_matters(cases: dict[str, Case]) -> None:
    """The comparison above can fail: τ = 1 gives other gradients than τ = 0.7."""
    c = cases["lora"]
    g, _ = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=1.0)
    n = next(iter(g))
    assert (g[n] - c.ref_g[n]).abs().max() > 1e-3 * c.ref_g[n].abs().max()


def test_errors(cases: dict[str, Case]) -> None:
    c = cases["full"]
    with pytest.raises(ValueError, match="seq_chunk"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, seq_chunk=0)
    with pytest.raises(KeyError, match="wieght"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, names=["model.layers.0.mlp.up_proj.wieght"])


def test_bad_name_gets_the_explanatory_error(cases: dict[str, Case]) -> None:
    c = cases["full"]
    with pytest.raises(KeyError, match="not a trainable parameter"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, names=["model.layers.0.mlp.up_proj.wieght"])
    t = cases["tied"]
    with pytest.raises(ValueError, match="tied to 'model.embed_tokens.weight'"):
        sequence_logprob_grads(t.lm, t.lm.params, t.batch, names=["lm_head.weight"])


# ------------------------------------------------------------------------------ per-token weights
def ref_row_weighted_grads(model: torch.nn.Module, batch: dh.SequenceBatch, w: torch.Tensor,
                           tau: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``∇_θ Σ_k w[i, k] log π(y_{t_k})`` row by row (``t_k``: the k-th scored position), plain autograd."""
    params = trainable(model)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    sums = []
    for i in range(len(batch)):
        am = batch.attention_mask[i]
        ids = batch.input_ids[i][am]
        pos = batch.response_mask[i][am].nonzero().flatten()
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        lp = torch.log_softmax(logits[pos - 1].double() / tau, dim=-1)
        s = (w[i, : len(pos)] * lp.gather(-1, ids[pos].unsqueeze(-1))[:, 0]).sum()
        for n, g in zip(params, torch.autograd.grad(s, list(params.values())), strict=True):
            grads[n].append(g)
        sums.append(s.detach())
    return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(sums)


@pytest.mark.parametrize("which", ["lora", "tied"])
def test_token_weights_match_per_row_autograd(cases: dict[str, Case], which: str) -> None:
    """Random per-token weights (one and two weightings at once) on mixed padding, chunks of 3."""
    c = cases[which]
    n_tok = c.batch.n_tokens
    t_max = int(n_tok.max()) + 2  # wider than needed: zero padding is allowed
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(len(c.batch), 2, t_max, generator=gen, dtype=torch.float64)
    w = w * (torch.arange(t_max) < n_tok.view(-1, 1, 1))
    ref = [ref_row_weighted_grads(c.model, c.batch, w[:, k], TAU) for k in range(2)]
    g1, s1 = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, seq_chunk=3,
                                    token_weights=w[:, 0])
    _close_tree(g1, ref[0][0])
    torch.testing.assert_close(s1, ref[0][1], rtol=RTOL, atol=1e-9)
    g2, s2 = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, seq_chunk=3, token_weights=w)
    assert s2.shape == (len(c.batch), 2)
    for k in range(2):
        _close_tree({n: t[:, k] for n, t in g2.items()}, ref[k][0])
        torch.testing.assert_close(s2[:, k], ref[k][1], rtol=RTOL, atol=1e-9)
    # all-ones weights are the unweighted sum
    ones = (torch.arange(t_max) < n_tok.view(-1, 1)).double()
    g0, s0 = sequence_logprob_grads(c.lm, c.lm.params, c.batch, temperature=TAU, token_weights=ones)
    _close_tree(g0, c.ref_g)
    torch.testing.assert_close(s0, c.ref_s, rtol=RTOL, atol=1e-9)


def test_token_weights_are_checked(cases: dict[str, Case]) -> None:
    c = cases["lora"]
    n_max = int(c.batch.n_tokens.max())
    w = torch.zeros(len(c.batch), n_max, dtype=torch.float64)
    with pytest.raises(ValueError, match="token_weights has shape"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, token_weights=w[:, :-1])
    with pytest.raises(ValueError, match="token_weights has shape"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, token_weights=w[:-1])
    with pytest.raises(ValueError, match="non-zero weights beyond"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, token_weights=w + 1)
    with pytest.raises(ValueError, match="floating tensor"):
        sequence_logprob_grads(c.lm, c.lm.params, c.batch, token_weights=w.long())
