"""Progress of long stages: the core reports through ``on_progress(done, total)``, the edge draws bars.

A callback must not change any result, must count up to its total exactly once per call, and the
runner must give every long stage (per-sequence gradients, first order, influence) a bar.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import deltaH as dh
import deltaH.runner as runner
from deltaH.config import load_config
from deltaH.io.progress import progress_bar


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        """Reports rise strictly, keep one total, and end exactly at it."""
        assert self.calls, "on_progress was never called"
        dones = [d for d, _ in self.calls]
        assert {t for _, t in self.calls} == {total}
        assert dones == sorted(set(dones)) and dones[0] > 0 and dones[-1] == total


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Toy-sized work: one torch thread avoids two threads waiting on each other on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy() -> dict:
    from deltaH.toy import load_toy, load_toy_prompts, toy_policy

    ckpt = load_toy()
    lm = dh.FunctionalLM.from_model(ckpt.model)
    tok, recs = ckpt.tokenizer, load_toy_prompts()
    ids = [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in recs[:3]]
    policy = toy_policy()
    batch = dh.sample(lm, lm.params, ids, policy=policy, max_new_tokens=5, n_per_prompt=3,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    adv = torch.linspace(-1, 1, len(batch), dtype=torch.float64)
    return {"ckpt": ckpt, "lm": lm, "policy": policy, "batch": batch, "adv": adv}


def test_update_directions_reports_sequences(toy: dict) -> None:
    lm, batch = toy["lm"], toy["batch"]
    kw = dict(loss_type="dapo", temperature=toy["policy"].temperature, max_grad_norm=1.0, seq_chunk=4)
    rec = Recorder()
    with_cb = dh.update_directions(lm, lm.params, batch, toy["adv"], toy["ckpt"].optimizer_state,
                                   on_progress=rec, **kw)
    rec.check(len(batch))  # 9 sequences in chunks of 4: 4, 8, 9
    assert [d for d, _ in rec.calls] == [4, 8, 9]
    plain = dh.update_directions(lm, lm.params, batch, toy["adv"], toy["ckpt"].optimizer_state, **kw)
    for n in plain.components:
        assert torch.equal(with_cb.components[n], plain.components[n])


@pytest.mark.parametrize("eta", [1e-3, [0.0, 1e-3]], ids=["one-eta", "sweep-with-zero"])
def test_true_reports_direction_eta_pairs(toy: dict, eta: float | list[float]) -> None:
    lm, batch, policy = toy["lm"], toy["batch"], toy["policy"]
    g = torch.Generator().manual_seed(1)
    dirs = {n: 0.1 * torch.randn(5, *p.shape, generator=g) for n, p in list(lm.params.items())[:4]}
    rec = Recorder()
    got = dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=policy, eta=eta, dir_chunk=2,
                                on_progress=rec)
    n_eta = 1 if isinstance(eta, float) else len(eta)
    rec.check(5 * n_eta)
    assert len(rec.calls) == 3 * n_eta  # chunks of 2, 2, 1 directions per η (η = 0 included)
    ref = dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=policy, eta=eta, dir_chunk=2)
    assert torch.equal(got.delta_h, ref.delta_h) and torch.equal(got.per_sequence, ref.per_sequence)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_first_order_reports_work_units(toy: dict, mode: str) -> None:
    lm, batch, policy = toy["lm"], toy["batch"], toy["policy"]
    g = torch.Generator().manual_seed(2)
    dirs = {n: torch.randn(3, *p.shape, generator=g) for n, p in list(lm.params.items())[:4]}
    rec = Recorder()
    kw = dict(lm=lm, policy=policy, eta=1e-3, mode=mode, dir_chunk=2, tf_batch_size=4)
    got = dh.delta_h_first_order(lm.params, dirs, batch, on_progress=rec, **kw)
    n_seq_chunks = 3  # 9 sequences, tf_batch_size 4
    rec.check(2 * n_seq_chunks if mode == "forward" else n_seq_chunks)  # forward: 2 direction chunks
    ref = dh.delta_h_first_order(lm.params, dirs, batch, **kw)
    assert torch.equal(got.delta_h, ref.delta_h)


def test_influence_passes_progress_on(toy: dict) -> None:
    lm, batch, policy = toy["lm"], toy["batch"], toy["policy"]
    g = torch.Generator().manual_seed(3)
    comps = {n: 1e-2 * torch.randn(6, *p.shape, generator=g) for n, p in list(lm.params.items())[:2]}
    rec = Recorder()
    dh.influence_matrix(lm.params, comps, batch, lm=lm, policy=policy, eta=1e-3, kind="true", dir_chunk=4,
                        on_progress=rec)
    rec.check(6)


def test_progress_bar_draws_and_closes(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar("influence, true ΔH", unit="col")
    for done in (2, 4):
        bar(done, 6)
        assert bar._bar.n == done and bar._bar.total == 6
    bar(6, 6)
    assert bar._bar is None  # closed at done == total
    err = capsys.readouterr().err  # tqdm redraws at most every 0.1 s: the first frame is certain
    assert "influence, true ΔH" in err and "/6 " in err and "col" in err
    quiet = progress_bar("hidden", disable=True)
    quiet(1, 2)
    quiet(2, 2)
    assert "hidden" not in capsys.readouterr().err


def test_runner_shows_progress_for_every_long_stage(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config("configs/toy.yaml", [
        "eval_batch.total_sequences=8", "update_batch.n_prompts=2", "update_batch.group_size=4",
        "policy.max_new_tokens=4", "eta.grid=[1e-4]", "output.plots=false", "compute.dir_chunk=4",
    ])
    runner.run(cfg, out=tmp_path / "r", quiet=False)
    err = capfd.readouterr().err  # tqdm draws the first frame (with the total) for certain
    stages = ("per-sequence gradients of U", "first order δH₁", "influence, true ΔH", "influence, first")
    for desc in stages:
        assert desc in err, desc
    assert re.search(r"per-sequence gradients of U:\s+0%\S*\s*\S*\s*0/8 ", err)  # N_U = 2 × 4
    assert re.search(r"influence, true ΔH:\s+0%\S*\s*\S*\s*0/8 ", err)  # one column per update sequence
