"""The examples run as written, and the README shows the API example verbatim."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
API_TOY = ROOT / "examples" / "api_toy.py"

# ΔH in a float32 model: per-sequence log q and entropy are sums of <= 8 float32 terms of order 1,
# each rounded to ~6e-8 relative, so the same step computed along two routes (another vmap batch,
# b + Σc instead of Δθ) can differ by ~8 · 6e-8 ≈ 5e-7 nats; 2e-6 covers that with margin.
ATOL_F32 = 2e-6


def _example_body(path: Path) -> str:
    text = path.read_text()
    return text[text.index('"""', 3) + 3 :].strip("\n")


def _readme_block(section: str) -> str:
    readme = (ROOT / "README.md").read_text()
    part = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)\n```", part, re.S)
    assert blocks, f"no python block in the README section {section!r}"
    return blocks[0]


def test_readme_api_block_is_the_example_file() -> None:
    assert _readme_block("Python API") == _example_body(API_TOY), (
        "README's Python API block differs from examples/api_toy.py: paste the file's code (after its "
        "docstring) into the README"
    )


@pytest.fixture(scope="module")
def api_toy() -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ns = runpy.run_path(str(API_TOY), run_name="__main__")
    return {**ns, "_stdout": out.getvalue()}


def test_api_toy_runs_and_its_numbers_hang_together(api_toy: dict) -> None:
    ns = api_toy
    res, fo, one, ud, etas, lr = ns["res"], ns["fo"], ns["one"], ns["ud"], ns["etas"], ns["ckpt"].lr
    n = len(ns["batch"])
    assert res.delta_h.shape == fo.delta_h.shape == res.ess.shape == (len(etas), 4)
    assert res.per_sequence.shape == (len(etas), 4, n)
    assert torch.isfinite(res.delta_h).all() and (res.ess > 1).all() and (res.ess <= n + 1e-9).all()
    # baseline + grad is the full step (the decomposition's check), so their ΔH agree
    torch.testing.assert_close(res.delta_h[:, 3], res.delta_h[:, 0], rtol=0, atol=ATOL_F32)
    # δH₁ is linear in η by definition: η·slope
    torch.testing.assert_close(fo.delta_h, torch.tensor(etas, dtype=torch.float64)[:, None] * fo.slope)
    # one direction alone (no K axis) = column 0 of the stacked call at η = lr
    assert etas[1] == lr and one.delta_h.shape == ()
    torch.testing.assert_close(one.delta_h, res.delta_h[1, 0], rtol=0, atol=ATOL_F32)
    assert set(ud.full) == set(ns["lm"].params)
    out = ns["_stdout"]
    assert "nats per sequence" in out and out.count("baseline+grad") == len(etas)


def test_unstacked_direction_error_says_what_is_expected(api_toy: dict) -> None:
    """The mistake the old README invited: ud.full (one direction) where [K, *shape] is expected."""
    ns = api_toy
    lm, ud = ns["lm"], ns["ud"]
    name = next(iter(ud.full))
    shape = ", ".join(str(s) for s in ud.full[name].shape)
    with pytest.raises(ValueError, match=rf"expected shape \(K, {shape}\)\. For one direction use "
                                         r"delta_h_true\(\.\.\.\).*UpdateDirections\.stacked\(\)"):
        ns["dh"].delta_h_true_multi(lm.params, ud.full, ns["batch"], lm=lm, policy=ns["policy"], eta=1e-3)


def test_api_example_runs_on_a_model_built_in_code(capsys: pytest.CaptureFixture[str]) -> None:
    res = runpy.run_path(str(ROOT / "examples" / "api_example.py"))["main"]()
    out = capsys.readouterr().out
    assert res.delta_h.shape == (4, 4) and bool(torch.isfinite(res.delta_h).all())
    # ΔH shrinks with η along each direction (the sweep is in the linear regime at these steps)
    assert bool((res.delta_h[0].abs() < res.delta_h[-1].abs()).all())
    assert "H(θ) per sequence" in out and "ESS at largest eta" in out
