"""Distributed reductions: two gloo ranks, each passing its shard, reproduce the one-process result.

DESIGN.md §2: when ``torch.distributed`` is initialised every returned scalar is the global value
(sums, counts, maxima and the PSIS tail reduced across ranks), and ``per_sequence`` holds this
rank's sequences. The shards are uneven (14 + 12 of 26) so gathers of unequal sizes are
exercised. Both sides run the same kernels on the same float64 rows; only the summation order
differs, so the conftest's ``ATOL/RTOL`` hold (observed gaps ~1e-15).
"""

from __future__ import annotations

import datetime
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ATOL, RTOL, build_batch, sample_responses, tiny_qwen2

import deltaH as dh
from deltaH._choices import ENTROPY_MODES as MODES
from deltaH.estimators.true import base_stats

SPLIT = ((0, 14), (14, 26))
ETAS = [0.0, 0.05, 0.3]
POLICY = dict(temperature=0.9, top_p=0.9, topk_prefix=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _problem(tmp: Path) -> None:
    """Model weights, batch and directions, saved once so every process sees identical tensors."""
    model = tiny_qwen2(seed=31)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 5, (26,), generator=g).tolist()
    prompts = [torch.randint(4, 32, (k,), generator=g).tolist() for k in lens]
    rows = sample_responses(model, prompts, POLICY["temperature"], POLICY["top_p"], 5, 3, g)
    b = build_batch(rows, side="mixed", generator=g)
    params = dict(model.named_parameters())
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"]
    dirs = {n: 0.1 * torch.randn((3, *params[n].shape), generator=g, dtype=torch.float64) for n in names}
    for t in dirs.values():
        t[1] = 0  # a zero direction: ΔH = 0, ESS = N, k̂ NaN — globally
    torch.save({"state": model.state_dict(), "batch": (b.input_ids, b.attention_mask, b.response_mask),
                "dirs": dirs}, tmp / "problem.pt")


def _run(tmp: Path, rows: slice | None) -> dict[str, dict[str, torch.Tensor]]:
    prob = torch.load(tmp / "problem.pt", weights_only=True)
    model = tiny_qwen2(seed=0)
    model.load_state_dict(prob["state"])
    lm = dh.FunctionalLM.from_model(model)
    batch = dh.SequenceBatch(*prob["batch"])
    if rows is not None:
        batch = batch.select(rows)
    policy = dh.SamplingPolicy(**POLICY)
    base = base_stats(lm, lm.params, batch, policy)  # this rank's θ-side stats, shared by both modes
    out = {}
    for mode in MODES:
        res = dh.delta_h_true_multi(lm.params, prob["dirs"], batch, lm=lm, policy=policy, eta=ETAS,
                                    entropy_mode=mode, dir_chunk=2, base=base)
        out[mode] = {f.name: getattr(res, f.name) for f in fields(res)}
    return out


def _worker(rank: int, world: int, tmp: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=world,
                            # generous: on a loaded 2-core machine a rank can wait minutes for its peer,
                            # and a gloo timeout aborts the process (SIGABRT) instead of raising
                            timeout=datetime.timedelta(seconds=600))
    try:
        lo, hi = SPLIT[rank]
        torch.save(_run(tmp, slice(lo, hi)), tmp / f"rank{rank}.pt")
        # Tear down together: a gloo rank that exits while its peer still talks to it can abort
        # ("terminate called without an active exception"), seen once on a loaded 2-core machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    _problem(tmp_path)
    ctx = mp.spawn(_worker, args=(2, tmp_path), nprocs=2, join=False)
    single = _run(tmp_path, None)  # while the ranks start up
    while not ctx.join():
        pass
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for mode in MODES:
        want, got = single[mode], [r[mode] for r in ranks]
        assert torch.isfinite(want["khat"][1:, [0, 2]]).all()  # the PSIS tail is really gathered
        assert (want["ess"][-1, [0, 2]] < 25).all()  # weights really vary
        for name, value in want.items():
            if name in ("per_sequence", "loo"):  # this rank's sequences
                cat = torch.cat([g[name] for g in got], dim=-1)
                torch.testing.assert_close(cat, value, atol=ATOL, rtol=RTOL)
                assert got[0][name].shape[-1] == 14 and got[1][name].shape[-1] == 12
                continue
            for g in got:  # every rank returns the global value
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(g[name], value, atol=ATOL, rtol=RTOL, equal_nan=True,
                                               msg=f"{mode} {name}")
                else:
                    assert g[name] == value, (mode, name)
        # the zero direction stays exact across ranks
        assert (want["delta_h"][:, 1] == 0).all() and (got[0]["ess"][:, 1] == 26).all()
