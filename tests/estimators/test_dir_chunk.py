"""``dir_chunk`` (directions per vmap call) changes the speed, not the estimates.

``dir_chunk = 1`` is a plain call per direction (no vmap, nothing mutated); larger chunks run the
backbone under ``torch.func.vmap``, whose batched products (``bmm``) sum in a different order than
the single ones (``mm``). So the outputs are not always bitwise equal (on one CPU: the tied Llama's
full-parameter true ΔH was, LoRA directions and forward-mode slopes differed in the last bits; which
depends on the kernels). The
tolerance covers that rounding alone: each product is within ``~D · eps`` relative of the exact one
(D ≤ 64 inner dimension of these models, eps = 2.2e-16 in float64: 1.4e-14), carried through two
layers, the softmax and the SNIS sums (a factor < 8): ``REL = 1e-13`` of the largest magnitude of a
field (the entropy the ΔH is a difference of, for the true estimator). A real bug — a direction
assigned to the wrong slot, a chunk dropped or counted twice — moves the results by O(1) of their
scale, which the last test checks the comparison can see.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_batch, sample_responses, tiny_llama, tiny_qwen2, with_lora

import deltaH as dh

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, TAU, K = 2, 0.8, 5
REL = 1e-13
CHUNKS = (1, 2, 8)  # the loop, vmap with a partial last chunk (5 = 2 + 2 + 1), all five in one vmap
TRUE_FIELDS = ("delta_h", "h_upd", "per_sequence", "loo", "ess", "khat", "logw_max", "logw_min",
               "retained_mass", "nucleus_changed", "delta_h_per_token")


class Case:
    def __init__(self, model: torch.nn.Module, scale: float, seed: int) -> None:
        self.lm = dh.FunctionalLM.from_model(model)
        self.policy = dh.SamplingPolicy(TAU, 0.9)
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(4, 32, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(8)]
        self.batch = build_batch(sample_responses(model, prompts, TAU, 0.9, 5, EOS, g), side="mixed", pad=1,
                                 generator=g)
        self.dirs = {n: scale * torch.randn((K, *p.shape), generator=g, dtype=torch.float64)
                     for n, p in self.lm.params.items()}

    def true(self, c: int) -> dh.TrueDeltaH:
        return dh.delta_h_true_multi(self.lm.params, self.dirs, self.batch, lm=self.lm, policy=self.policy,
                                     eta=0.05, dir_chunk=c)

    def first(self, c: int, mode: str) -> dh.FirstOrder:
        return dh.delta_h_first_order(self.lm.params, self.dirs, self.batch, lm=self.lm, policy=self.policy,
                                      eta=1.0, mode=mode, dir_chunk=c, per_sequence=True)


_CASES: dict[str, Case] = {}


def case(which: str) -> Case:
    if which not in _CASES:
        model = with_lora(tiny_qwen2(seed=31)) if which == "lora" else tiny_llama(tie=True, seed=32)
        _CASES[which] = Case(model, 0.1 if which == "lora" else 0.05, seed=3)
    return _CASES[which]


def _same(got: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    torch.testing.assert_close(got, ref, rtol=0, atol=REL * max(scale, 1e-300), equal_nan=True)


@pytest.mark.parametrize("which", ["lora", "tied"])
def test_true_delta_h_does_not_depend_on_dir_chunk(which: str) -> None:
    s = case(which)
    ref = s.true(1)
    scale = float(ref.h_upd.abs().max())  # ΔH, ESS, log w are differences/ratios of sums of this size
    for c in CHUNKS[1:]:
        got = s.true(c)
        for f in TRUE_FIELDS:
            _same(getattr(got, f), getattr(ref, f), scale)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("which", ["lora", "tied"])
def test_first_order_does_not_depend_on_dir_chunk(which: str, mode: str) -> None:
    s = case(which)
    ref = s.first(1, mode)
    for c in CHUNKS[1:]:
        got = s.first(c, mode)
        for f in ("slope", "per_sequence", "stderr"):
            r = getattr(ref, f)
            _same(getattr(got, f), r, float(r.abs().max()))


def test_the_comparison_sees_a_misplaced_direction() -> None:
    """Swapping two directions (what a chunk-indexing bug does) fails the same check."""
    s = case("lora")
    ref = s.true(1)
    swapped = dict(s.dirs)
    s.dirs = {n: t[[1, 0, 2, 3, 4]] for n, t in swapped.items()}
    try:
        got = s.true(2)
    finally:
        s.dirs = swapped
    with pytest.raises(AssertionError):
        _same(got.delta_h, ref.delta_h, float(ref.h_upd.abs().max()))
