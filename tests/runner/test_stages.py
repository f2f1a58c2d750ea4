"""Stage-level tests of the runner: each stage called on its own, and the cache keys it is stored under."""

from __future__ import annotations

import pytest
import torch

from deltaH.config import load_config
from deltaH.runner import stages as st
from deltaH.runner.orchestrate import STAGES, load_inputs, resolve_checkpoints, stage_keys

TINY = [
    "eval_batch.total_sequences=8",
    "eval_batch.group_size=4",
    "update_batch.n_prompts=2",
    "update_batch.group_size=4",
    "policy.max_new_tokens=4",
    "eta.grid=[1e-4]",
]


def _keys(*overrides: str) -> dict[str, str]:
    return stage_keys(load_config("configs/toy.yaml", [*TINY, *overrides]), "ckpt-fingerprint")


def _downstream(name: str) -> set[str]:
    out = {name}
    changed = True
    while changed:
        changed = False
        for stage, (_, upstream) in STAGES.items():
            if stage not in out and out & set(upstream):
                out.add(stage)
                changed = True
    return out


@pytest.mark.parametrize(
    ("override", "first"),
    [
        ("policy.top_p=0.9", "batches"),
        ("seed=3", "batches"),
        ("loss.type=grpo", "directions"),
        ("analyses.entropy_mode=naive", "first_order"),
        ("eta.n_points=5", "eta_grid"),
        ("analyses.kernel_method=projection", "kernel"),
        ("analyses.kernel_subspace=4", "kernel"),
        ("analyses.kernel_check_columns=2", "kernel"),
        ("eval_batch.include_update_prompts=true", "batches"),
        ("eval_batch.prompts=distinct", "batches"),
        ("analyses.entropy_target=0.1", "controls"),
    ],
)
def test_a_config_change_invalidates_exactly_its_stage_and_what_follows(override: str, first: str) -> None:
    base, changed = _keys(), _keys(override)
    stale = {name for name in base if base[name] != changed[name]}
    assert stale == _downstream(first)


def test_chunk_sizes_and_device_never_invalidate_a_stage() -> None:
    """...but for the dir_chunk choice itself (compute.dir_chunk auto is timed at these chunk sizes)."""
    base, changed = _keys(), _keys("compute.tf_batch_size=3", "compute.dir_chunk=1", "checkpoint.device=cpu")
    assert {n for n in base if base[n] != changed[n]} == {"dir_chunk"}
    assert _keys() == _keys("checkpoint.device=cpu")


def test_another_checkpoint_invalidates_everything() -> None:
    cfg = load_config("configs/toy.yaml", TINY)
    a, b = stage_keys(cfg, "one"), stage_keys(cfg, "two")
    assert all(a[n] != b[n] for n in a)


def test_the_first_stages_on_the_toy() -> None:
    cfg = load_config("configs/toy.yaml", TINY)
    inp = load_inputs(cfg, resolve_checkpoints(cfg.checkpoint.path)[0], quiet=True)
    bt = st.build_batches(cfg, inp)
    assert len(bt.eval) == 8 and len(bt.update) == 8
    assert torch.equal(bt.eval.batch.input_ids, st.build_batches(cfg, inp).eval.batch.input_ids)  # seeded
    base = st.theta_stats(cfg, inp, bt)
    assert base.logq.shape == (8,) and bool(torch.isfinite(base.logq).all())
    dr = st.directions(cfg, inp, bt)
    assert dr.eta_ref == dr.update.lr_ref > 0 and set(dr.stacked) == set(inp.params)
    grid = st.eta_grid(cfg, inp, bt, dr, base, st.first_order(cfg, inp, bt, dr, base))
    assert grid.etas == sorted([1e-4, dr.eta_ref]) and grid.probe is None  # η_ref joins a given grid
