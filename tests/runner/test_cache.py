"""The run's stage cache: exact round trips, keys that miss when inputs change, safe loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deltaH.batch import SequenceBatch
from deltaH.io.compare import compare_results
from deltaH.io.results import ResultsDir
from deltaH.policy import SamplingPolicy
from deltaH.runner.cache import StageCache, fingerprint, pack, stage_key, unpack


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 2, 3, 0]])
    value = {
        "batch": SequenceBatch(ids, torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0, 1, 1, 0]]).bool()),
        "policy": SamplingPolicy(0.7, 0.9),
        "x": torch.randn(3, dtype=torch.float64),
        "np": np.array([1.5, np.nan]),
        "t": (1, "a", None, 2.5),
        "nested": [{"k": float("inf")}],
    }
    cache = StageCache(tmp_path)
    cache.put("s", "k1", value)
    back = cache.get("s", "k1")
    assert isinstance(back["batch"], SequenceBatch) and torch.equal(back["batch"].input_ids, ids)
    assert back["policy"] == SamplingPolicy(0.7, 0.9)
    assert torch.equal(back["x"], value["x"]) and back["x"].dtype == torch.float64
    np.testing.assert_array_equal(back["np"], value["np"])
    assert back["t"] == (1, "a", None, 2.5) and back["nested"] == [{"k": float("inf")}]


def test_accelerator_tensors_come_back_on_the_runs_device(tmp_path: Path) -> None:
    """A tensor packed from an accelerator is marked; a hit (or a broadcast) puts it on this process's
    device, while CPU tensors stay on the CPU. ``meta`` stands in for ``cuda:LOCAL_RANK`` here (no
    CUDA on the test machine): the mapping is what is tested; the CUDA round trip is below."""
    x = torch.arange(3.0)
    packed = {"__map__": [["gpu", {"__dev__": x}], ["cpu", x]]}
    back = unpack(packed, "meta")
    assert back["gpu"].device.type == "meta" and back["cpu"].device.type == "cpu"
    assert unpack(packed)["gpu"].device.type == "cpu"  # no device given: stays where it was loaded
    cache = StageCache(tmp_path, device="meta")
    cache.put("s", "k", {"x": x})  # a CPU tensor is not marked, so it stays on the CPU
    assert cache.get("s", "k")["x"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path: Path) -> None:
    cache = StageCache(tmp_path, device="cuda:0")
    x = torch.randn(4, device="cuda:0")
    cache.put("s", "k", {"x": x, "c": torch.ones(2)})
    back = cache.get("s", "k")
    assert back["x"].device.type == "cuda" and torch.equal(back["x"], x) and back["c"].device.type == "cpu"


def test_a_changed_key_is_a_miss_and_the_value_is_recomputed(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    calls: list[int] = []
    k1 = stage_key("s", {"policy": {"top_p": 1.0}})
    k2 = stage_key("s", {"policy": {"top_p": 0.9}})
    assert k1 != k2 and k1 == stage_key("s", {"policy": {"top_p": 1.0}})
    assert stage_key("t", {}, [k1]) != stage_key("t", {}, [k2])  # upstream keys propagate
    assert cache.stage("s", k1, lambda: calls.append(1) or 1) == 1
    assert cache.stage("s", k1, lambda: calls.append(1) or 1) == 1
    assert cache.stage("s", k2, lambda: calls.append(1) or 2) == 2
    assert len(calls) == 2 and [e for _, e in cache.events if e != "start"] == [
        "computed",
        "cached",
        "computed",
    ]


def test_an_output_over_the_size_cap_is_recomputed_not_stored(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "c", max_bytes=8 * 100)
    cache.put("small", "k", torch.zeros(100, dtype=torch.float64))  # 800 bytes: stored
    cache.put("big", "k", {"x": torch.zeros(101, dtype=torch.float64)})  # 808 bytes: not stored
    assert cache.get("small", "k") is not None and cache.get("big", "k") is None
    cache.clear()
    assert not (tmp_path / "c").exists()


def test_fingerprint_follows_the_checkpoint_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"12345")
    f1 = fingerprint(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"123456")
    assert fingerprint(tmp_path) != f1


def test_only_deltaH_classes_are_rebuilt() -> None:
    with pytest.raises(TypeError, match="not a deltaH class"):
        unpack({"__dc__": "subprocess:Popen", "args": ["true"]})
    with pytest.raises(TypeError, match="cannot store"):
        pack(object())


def test_compare_results_finds_a_difference(tmp_path: Path) -> None:
    a, b = ResultsDir.create(tmp_path, tmp_path / "a"), ResultsDir.create(tmp_path, tmp_path / "b")
    for rd, v in ((a, 1.0), (b, 1.0)):
        rd.write_json("summary.json", {"h_orig": 2.0, "timings": {"x": v}})
        rd.save_array("delta_h", np.array([1.0, 2.0]), "d")
    assert compare_results(a.path, b.path) == []
    b.save_array("delta_h", np.array([1.0, np.nextafter(2.0, 3.0)]), "d")  # one ulp
    b.write_json("summary.json", {"h_orig": 2.5, "timings": {"x": 9.0}})
    diffs = compare_results(a.path, b.path)
    assert any("arrays/delta_h" in d for d in diffs) and any(d.startswith("h_orig") for d in diffs)
    assert not any("timings" in d for d in diffs)
    assert json.loads((a.path / "summary.json").read_text())["h_orig"] == 2.0


def test_the_attribution_stage_round_trips(tmp_path: Path) -> None:
    """Attributed (tags with numpy arrays and text, nested result records, NaN standard errors) is stored
    and rebuilt equal."""
    from deltaH.attribution import Contributions, UpdateTags, attribute
    from deltaH.runner.stages import Attributed

    t = UpdateTags(advantage=[1.0, -1.0, 1.0, -1.0], reward=[1, 0, 1, 0], group=[0, 0, 1, 1],
                   truncated=[0, 1, 0, 0], length=[1, 2, 3, 4], text=list("abcd"))
    rng = np.random.default_rng(0)
    res = attribute(Contributions(np.arange(4.0), rng.random((5, 4)), 1.0, rng.random(5)),
                    Contributions(np.arange(4.0), None, 1.0), t)
    cache = StageCache(tmp_path)
    cache.put("attribution", "k", Attributed(t, res, 0.1))
    got = cache.get("attribution", "k")
    assert isinstance(got, Attributed) and got.eta == 0.1 and got.tags.text == t.text
    for name in ("advantage", "reward", "group", "truncated", "length"):
        np.testing.assert_array_equal(getattr(got.tags, name), getattr(t, name))
    assert got.result.omitted == res.omitted and got.result.rank_true == res.rank_true
    assert got.result.families[0].groups[0].true == res.families[0].groups[0].true
    np.testing.assert_array_equal(got.result.delta_h_se, res.delta_h_se)
    assert np.isnan(got.result.total.first_order.se)
