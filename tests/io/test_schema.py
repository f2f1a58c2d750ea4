"""The typed results schema: ``RunSummary.from_json`` / ``to_json`` and what an older folder lacks."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from deltaH.io.schema import (
    Decomposition,
    InfluenceInfo,
    RunSummary,
    TrustInfo,
    describe_results,
    missing,
    with_generated_table,
)


def _layout() -> dict[str, Any]:
    """A small summary.json: one decomposition, two η, k̂ undefined (null) at the first."""
    dec = {"delta_h": [1e-6, -2e-4], "delta_h_per_token": [2e-7, -4e-5], "ess": [64.0, 60.5],
           "khat": [None, 0.31], "logw_max": [1e-5, 0.1], "logw_min": [-1e-5, -0.1],
           "retained_mass": [1.0, 0.998], "nucleus_changed": [0.0, 0.01],
           "first_order": {"slope": -0.5, "stderr_slope": 0.1, "delta_h": [-5e-7, -5e-5]},
           "second_order": None,
           "fit": {"slope_origin": -0.4, "r2_origin": 0.9, "slope": -0.4, "intercept": 0.0, "r2": 0.9,
                   "loglog_slope": None, "n_points": 2}}
    return {"deltah_version": "0.1.0", "status": "complete", "eta": [1e-6, 1e-4], "eta_reference": 1e-4,
            "h_orig": 2.0, "decompositions": {"full": dec}, "kernel": None,
            "influence": {"eta": 1e-4, "kind": ["true", "first_order"], "column_delta_h": [0.1, None],
                          "top_update": [{"row": 1, "delta_h": 0.1, "reward": 1.0, "advantage": 0.5,
                                          "prompt": "1+1=", "response": "2"}], "top_eval": []},
            "checkpoint": {"path": "ckpt", "global_step": 3, "max_grad_norm": None}, "warnings": ["w"]}


def test_from_json_types_and_nulls() -> None:
    s = RunSummary.from_json(_layout())
    full = s.decompositions["full"]
    assert isinstance(full, Decomposition) and isinstance(s.influence, InfluenceInfo)
    assert full.khat == [None, 0.31]  # list[float | None]: null stays None
    assert math.isnan(full.fit.loglog_slope)  # a float: null becomes NaN
    assert s.influence.column_delta_h[0] == 0.1 and math.isnan(s.influence.column_delta_h[1])
    assert s.influence.top_update[0].prompt == "1+1=" and s.kernel is None and full.second_order is None
    assert s.checkpoint == {"path": "ckpt", "global_step": 3, "max_grad_norm": None}  # free-form: as is


def test_to_json_writes_back_what_it_read() -> None:
    """Every key of the file comes back with its value; keys it lacked come back filled in."""
    d = json.loads(json.dumps(_layout()))
    out = RunSummary.from_json(d).to_json()

    def check(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and path != "checkpoint":
            for k in a:
                check(a[k], b[k], f"{path}.{k}")
        else:
            assert a == b, path

    check(d, out, "")
    assert out["trust"]["per_eta"] == [] and out["proxy"] is None and math.isnan(
        RunSummary.from_json(out).h_orig_per_token)
    assert RunSummary.from_json(out).to_json() == out  # idempotent
    assert json.loads(json.dumps(out, allow_nan=False)) == out  # NaN was written as null


def test_an_older_folder_loads_with_missing_parts_marked() -> None:
    d = _layout()
    del d["decompositions"]["full"]["nucleus_changed"], d["decompositions"]["full"]["fit"]
    d["influence"]["kind"] = "true"  # a single value where the current layout has a list
    s = RunSummary.from_json(d)  # no trust, batches, update, seeds, ... at all
    full = s.decompositions["full"]
    assert full.nucleus_changed == [] and missing(full.nucleus_changed)
    assert missing(full.fit) and math.isnan(full.fit.slope_origin) and full.fit.n_points is None
    assert isinstance(s.trust, TrustInfo) and missing(s.trust) and s.trust.per_eta == []
    assert missing(s.batches) and missing(s.update) and s.seeds == {}
    assert s.influence is not None and s.influence.kind == ["true"]
    assert not missing(full) and not missing(s.influence) and not missing(0.0) and not missing("")
    assert not missing(dataclasses.replace(s.trust, top_p=False))  # one recorded field is enough


def test_trust_warning_lines_are_analysis_lines() -> None:
    from deltaH.analysis import trust_warnings

    per_eta = [{"eta": 1e-3, "trusted": False, "reasons": {"full": ["sign flip: ΔH = 1 while δH₁ = -1"]}},
               {"eta": 1e-4, "trusted": True, "reasons": {"full": []}}]
    tr = TrustInfo.from_json({"per_eta": per_eta})
    assert tr.warning_lines() == trust_warnings({"per_eta": per_eta})
    assert tr.warning_lines()[0].startswith("full: ΔH untrusted at 1 of 2 η — η = 0.001 (sign flip")


def test_describe_results_lists_every_field_once_with_help() -> None:
    table = describe_results()
    keys = [ln.split("|")[1].strip().strip("`") for ln in table.splitlines()[2:]]
    assert len(keys) == len(set(keys)), "a key is listed twice"
    assert "decompositions.<name>.fit.loglog_slope" in keys and "trust.per_eta[].reasons" in keys
    assert "decompositions.delta_h" not in keys  # records inside a dict are listed once, under <name>
    assert all(ln.rstrip().endswith("|") and ln.split("|")[3].strip() for ln in table.splitlines()[2:])


def test_with_generated_table_replaces_only_between_the_markers() -> None:
    from deltaH.io.schema import BEGIN, END

    text = f"# head\n{BEGIN}\nold table\n{END}\ntail\n"
    assert with_generated_table(text) == f"# head\n{BEGIN}\n{describe_results()}{END}\ntail\n"
    with pytest.raises(ValueError, match="markers"):
        with_generated_table("no markers")
