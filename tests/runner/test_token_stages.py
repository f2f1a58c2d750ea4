"""``deltah run`` with the token-level stages: token influence, the rules' scoreboard, their arrays,
per-token rows, summary section, report and study columns (deltaH.runner.token_stages).

Reference: the run's own δH₁ along ``grad`` (forward mode, the ``first_order`` stage) and along each
update sequence's component (the first-order influence matrix): the token influence comes from a
different algorithm (one reverse pass over E, one jvp over U) and must sum to them. The toy is
float32, so the two sides differ by float32 rounding of two different derivative computations
over ~16k parameters: observed ≤ 2e-5 relative; ``RTOL`` = 1e-3 (a wrong sign, clip or weight is
O(1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import deltaH.runner as runner
from deltaH.config import load_config
from deltaH.estimators.proxies import PROXIES
from deltaH.io.report import format_summary_table
from deltaH.io.results import ResultsDir
from deltaH.io.schema import RunSummary
from deltaH.runner.study import study_row

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-3
TINY = ["eval_batch.total_sequences=16", "eval_batch.group_size=4", "update_batch.n_prompts=2",
        "update_batch.group_size=4", "policy.max_new_tokens=6", "eta.grid=[1e-4]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    cfg = load_config("configs/toy.yaml", [*TINY, "output.detail=detailed"])
    return Path(runner.run(cfg, out=tmp_path_factory.mktemp("tok") / "r", quiet=True))


def test_tokens_sum_to_the_runs_first_order_values(run_dir: Path) -> None:
    s = json.loads((run_dir / "summary.json").read_text())
    tok = np.load(run_dir / "arrays" / "token_influence.npy")
    eta = s["eta_reference"]
    grad = eta * s["decompositions"]["grad"]["first_order"]["slope"]
    assert tok.sum() == pytest.approx(grad, rel=RTOL)
    assert s["proxies"]["delta_h1_grad"] == pytest.approx(tok.sum(), rel=1e-12)
    per_seq = np.load(run_dir / "arrays" / "update_delta_h1.npy")  # first-order influence columns at η_ref
    np.testing.assert_allclose(tok.sum(1), per_seq, rtol=0, atol=RTOL * np.abs(per_seq).max())


def test_proxies_section_arrays_and_rows(run_dir: Path) -> None:
    rd = ResultsDir(run_dir)
    summary = RunSummary.from_json(rd.read_json("summary.json"))
    p = summary.proxies
    assert p is not None and p.measured and p.n_boot > 0
    assert [r.name for r in p.rules] == [q.name for q in PROXIES]
    for r in p.rules:
        assert -1 <= r.spearman.value <= 1 and r.spearman.se >= 0
        assert [t.budget for t in r.topk] == [0.0002, 0.002, 0.02] and all(t.k >= 1 for t in r.topk)
    assert "entropy_polarity" in p.not_implemented
    tok = np.load(run_dir / "arrays" / "token_influence.npy")
    preds = np.load(run_dir / "arrays" / "token_proxies.npy")
    assert preds.shape == (len(p.rules), *tok.shape)
    rows = [json.loads(x) for x in (run_dir / "batches" / "update.jsonl").read_text().splitlines()]
    assert p.n_tokens == sum(r["n_tokens"] for r in rows)
    for i, r in enumerate(rows):
        n = r["n_tokens"]
        assert len(r["token_ids"]) == len(r["token_delta_h1"]) == len(r["token_weight"]) == n
        assert sum(r["token_delta_h1"]) == pytest.approx(tok[i].sum(), rel=1e-9, abs=1e-15)
        assert set(r["token_proxies"]) == {q.name for q in PROXIES}
    top = p.top_tokens[0]
    assert abs(top.delta_h1) == pytest.approx(np.abs(tok).max())
    assert rows[top.row]["token_ids"][top.index] == top.token_id
    report = (run_dir / "report.md").read_text()
    assert "## Token influence and the published rules" in report and "plots/token_influence.png" in report
    assert (run_dir / "plots" / "token_influence.png").is_file()
    assert "token influence: done" in format_summary_table(summary)
    row = study_row(str(run_dir), rd.read_json("summary.json"))
    assert {f"spearman_{q.name}" for q in PROXIES} <= set(row)
    assert row["spearman_covariance"] == pytest.approx(p.rules[0].spearman.value)


def test_switched_off(tmp_path: Path) -> None:
    off = ["analyses.token_influence=false", "analyses.influence=false", "output.plots=false"]
    cfg = load_config("configs/toy.yaml", [*TINY, *off])
    out = Path(runner.run(cfg, out=tmp_path / "off", quiet=True))
    s = RunSummary.from_json(ResultsDir(out).read_json("summary.json"))
    assert s.proxies is None and not (out / "arrays" / "token_influence.npy").exists()
    report = (out / "report.md").read_text()
    assert "Token influence and the scoreboard of token-level rules: not run." in report


def test_stage_outputs_survive_the_cache(tmp_path: Path) -> None:
    """``--resume`` reloads both stages from ``cache/<stage>.pt`` as they were computed."""
    import torch

    from deltaH.estimators.token_influence import TokenInfluence
    from deltaH.runner.cache import StageCache
    from deltaH.runner.token_stages import ProxyScores
    from deltaH.scoreboard import scoreboard

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    t = [torch.randn(2, 3, generator=g, dtype=torch.float64) * mask for _ in range(7)]
    ti = TokenInfluence(*t, mask=mask, temperature=0.7)
    board = scoreboard(t[0].numpy(), {"a": t[1].numpy()}, mask.numpy(), np.array([0.1, -0.2]), n_boot=5)
    px = ProxyScores(["a"], t[1][None], board, True)
    cache = StageCache(tmp_path / "cache")
    for name, value in (("token_influence", ti), ("proxies", px)):
        cache.put(name, "k", value)
        back = cache.get(name, "k")
        assert type(back) is type(value)
    back_ti, back_px = cache.get("token_influence", "k"), cache.get("proxies", "k")
    assert all(torch.equal(getattr(back_ti, f), getattr(ti, f)) for f in ("influence", "logp", "mask"))
    assert back_px.board == px.board and back_px.names == ["a"]
    assert torch.equal(back_px.predictions, px.predictions)
