"""``compute.dir_chunk: auto``: the choice (timed), where it is recorded, and that it changes no result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltaH.runner as runner
from deltaH.config import load_config
from deltaH.io.compare import compare_results
from deltaH.io.results import ResultsDir
from deltaH.runner.cache import unpack
from deltaH.runner.calibrate import calibrate_dir_chunk, candidates_for, pick

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "eval_batch.total_sequences=8",
    "eval_batch.group_size=4",
    "update_batch.n_prompts=2",
    "update_batch.group_size=4",
    "policy.max_new_tokens=5",
    "eta.grid=[1e-5, 1e-4]",
    "output.plots=false",
]


def test_candidates_are_capped_at_k_and_ties_go_to_the_smaller_chunk() -> None:
    assert candidates_for(1) == [1]
    assert candidates_for(4) == [1, 2, 4]
    assert candidates_for(6) == [1, 2, 4, 6]
    assert candidates_for(40) == [1, 2, 4, 8, 16]
    assert pick([1, 2, 4], [3.0, 1.0, 2.0]) == 2
    assert pick([1, 2, 4], [1.0, 1.0, 1.0]) == 1


def test_the_median_of_the_timed_calls_decides(tiny_lm_case: tuple) -> None:
    """A scripted clock: chunk 2 is slowest on its warm-up and one outlier call, fastest in median."""
    lm, policy, batch, dirs = tiny_lm_case
    # per call (warm-up 1, 2, 4; then 3 rounds of 1, 2, 4): durations
    durations = [9.0, 9.0, 9.0, 5.0, 1.0, 4.0, 5.0, 50.0, 4.0, 5.0, 1.0, 4.0]
    ticks: list[float] = []
    for d in durations:
        start = ticks[-1] if ticks else 0.0
        ticks += [start, start + d]
    it = iter(ticks)
    got = calibrate_dir_chunk(lm.params, dirs, batch, lm=lm, policy=policy, eta=1e-3, tf_batch_size=4,
                              repeats=3, clock=lambda: next(it))
    assert (got.value, got.candidates, got.seconds) == (2, [1, 2, 4], [5.0, 1.0, 4.0])
    assert (got.k, got.n_sequences, got.repeats, got.source) == (4, 4, 3, "calibrated")


@pytest.fixture(scope="module")
def tiny_lm_case() -> tuple:
    from conftest import build_batch, sample_responses, tiny_qwen2, with_lora

    import deltaH as dh

    model = with_lora(tiny_qwen2(seed=41))
    lm = dh.FunctionalLM.from_model(model)
    policy = dh.SamplingPolicy(0.8, 1.0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 32, (3,), generator=g).tolist() for _ in range(6)]
    batch = build_batch(sample_responses(model, prompts, 0.8, 1.0, 4, 2, g), side="left", pad=1)
    dirs = {n: torch.randn((4, *p.shape), generator=g, dtype=p.dtype) for n, p in lm.params.items()}
    return lm, policy, batch, dirs


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("auto") / "auto"
    runner.run(load_config("configs/toy.yaml", TINY), out=out, quiet=True)
    return out


def test_auto_records_its_choice_and_timings(auto_run: Path) -> None:
    s = json.loads((auto_run / "summary.json").read_text())
    c = s["compute"]
    assert s["config"]["compute"]["dir_chunk"] == "auto"
    assert c["dir_chunk_source"] == "calibrated" and c["k"] == 4 and c["repeats"] == 3
    assert c["candidates"] == [1, 2, 4] and len(c["seconds"]) == 3 and min(c["seconds"]) > 0
    assert c["dir_chunk"] == pick(c["candidates"], c["seconds"])
    assert c["n_sequences"] == min(8, load_config("configs/toy.yaml", TINY).compute.tf_batch_size)
    line = next(ln for ln in (auto_run / "report.md").read_text().splitlines() if "**Compute:**" in ln)
    assert f"dir_chunk {c['dir_chunk']}" in line and "calibrated" in line and "ms" in line


@pytest.mark.parametrize("explicit", ["same", 1])
def test_auto_gives_the_same_results_as_an_explicit_chunk(auto_run: Path, tmp_path: Path, explicit) -> None:
    """Same chunk: every number bit-equal (compare semantics, the compute record aside). The loop
    (dir_chunk 1) against a vmap choice: the forward-mode δH₁ can differ by float32 rounding (vmap's
    batched products sum in another order: tests/estimators/test_dir_chunk.py); its arrays are compared
    to 1e-4 of each array's largest entry: float32 eps 6e-8 times the cancellation in a slope, a mean of
    per-sequence terms of either sign up to ~10³ times larger than it (seen here: 2e-5)."""
    chosen = json.loads((auto_run / "summary.json").read_text())["compute"]["dir_chunk"]
    c = chosen if explicit == "same" else explicit
    other = tmp_path / "explicit"
    runner.run(load_config("configs/toy.yaml", [*TINY, f"compute.dir_chunk={c}"]), out=other, quiet=True)
    rec = json.loads((other / "summary.json").read_text())["compute"]
    assert (rec["dir_chunk"], rec["dir_chunk_source"], rec["candidates"]) == (c, "config", [])
    diffs = compare_results(auto_run, other, ignore=("config.compute.dir_chunk",))
    if c == chosen:
        assert diffs == []
        return
    a, b = ResultsDir.open(auto_run).load_arrays(), ResultsDir.open(other).load_arrays()
    for name in a:
        x, y = torch.as_tensor(a[name]), torch.as_tensor(b[name])
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=0, atol=1e-4 * float(x.abs().nan_to_num().max()),
                                       equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(x, y), name


def test_resume_reuses_the_recorded_choice(tmp_path: Path) -> None:
    cfg = load_config("configs/toy.yaml", TINY)
    out = tmp_path / "r"

    def stop(name: str, event: str) -> None:
        if (name, event) == ("first_order", "start"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, out=out, quiet=True, on_stage=stop)
    saved = unpack(torch.load(out / "cache" / "dir_chunk.pt", weights_only=True)["value"])
    events: list[tuple[str, str]] = []
    runner.run(cfg, resume=out, quiet=True, on_stage=lambda n, e: events.append((n, e)))
    assert ("dir_chunk", "cached") in events
    c = json.loads((out / "summary.json").read_text())["compute"]
    assert (c["dir_chunk"], c["seconds"]) == (saved.value, saved.seconds)  # not re-timed


def test_share_prompts_on_matches_off_through_the_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compute.share_prompts reaches the estimators: ``on`` runs the shared forward (counted), ``off``
    only in the model's construction probe, and their folders agree. The toy runs in float32, so the
    two paths' hidden states differ by float32 rounding (attention sums over other masked slots, in
    other blocks): a few eps32 (6e-8) of each token's log q and entropy, summed over ≤ 5 response
    tokens. Every estimate is built from those values — the true ΔH is a difference of entropies of
    size up to max H — so each array is compared to 1e-5 of the larger of its own largest entry and
    E's largest entropy (eps32 × 5 tokens × a chain factor < 30; seen: 6.4e-7 of max H)."""
    import deltaH as dh

    calls = {"n": 0}
    real = dh.FunctionalLM.backbone_shared

    def counted(self, params, plan):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self, params, plan)

    monkeypatch.setattr(dh.FunctionalLM, "backbone_shared", counted)
    runs = {}
    for mode in ("off", "on"):
        calls["n"] = 0
        runs[mode] = tmp_path / mode
        cfg = load_config("configs/toy.yaml", [*TINY, "compute.dir_chunk=1", f"compute.share_prompts={mode}"])
        runner.run(cfg, out=runs[mode], quiet=True)
        # off: only FunctionalLM.from_model's probe of the shared forward (one call)
        assert (calls["n"] > 1 if mode == "on" else calls["n"] == 1), (mode, calls)
        rec = json.loads((runs[mode] / "summary.json").read_text())["compute"]
        assert (rec["share_prompts"], rec["share_unsupported"]) == (mode, "")
    a, b = ResultsDir.open(runs["off"]).load_arrays(), ResultsDir.open(runs["on"]).load_arrays()
    assert set(a) == set(b)
    h_max = float(torch.as_tensor(a["eval_entropy"]).abs().max())
    for name in a:
        x, y = torch.as_tensor(a[name]), torch.as_tensor(b[name])
        if x.is_floating_point():
            scale = max(float(x.abs().nan_to_num().max()), h_max)
            torch.testing.assert_close(y, x, rtol=0, atol=1e-5 * scale, equal_nan=True,
                                       msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(x, y), name
