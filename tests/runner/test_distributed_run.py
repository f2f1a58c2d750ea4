"""``deltah run`` on two gloo processes: the same results folder as one process, and failures that end both.

Tolerance: none. The two folders must be bit-identical (``compare_results``: summary.json, every
array, ``batches/*.jsonl``), and that follows from the design rather than from luck: rank 0 samples
E and U exactly as one process does and broadcasts them; each rank's shard of E (and of U's
per-sequence gradients) is a run of whole ``lcm(tf_batch_size, seq_chunk)``-row blocks, so every
forward pass, ``vmap`` call and kernel product sees the rows, shapes and kernels it sees in one
process; every sum over sequences is taken over the gathered rows by one reduction
(``deltaH._dist.sum_rows``), and the other reductions are maxima, integer counts and sorted PSIS
tails, which are exact. What remains is the thread count, pinned to one in every process here
(``OMP_NUM_THREADS=1``; torchrun sets it too). The shards are uneven (E: 3 blocks of 4 rows over 2
ranks; U: 3 blocks) so gathers of unequal sizes are exercised, and top-p is on so the θ-side
nucleus keys are sharded by token offsets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from deltaH.io.compare import compare_results
from deltaH.runner.shard import span

pytestmark = pytest.mark.usefixtures("one_thread")  # and the processes started here: OMP_NUM_THREADS=1
slow = pytest.mark.slow  # two or three Python processes, each importing torch and transformers

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "toy.yaml")
TINY = [
    "eval_batch.total_sequences=12",
    "eval_batch.group_size=4",
    "update_batch.n_prompts=3",
    "update_batch.group_size=4",
    "policy.max_new_tokens=6",
    "policy.top_p=0.9",
    "eta.grid=[1e-5, 1e-4, 1e-3]",
    "analyses.kernel=true",
    "compute.tf_batch_size=4",
    "compute.seq_chunk=4",
    "output.detail=detailed",
]
TIMEOUT_S = 600  # the collective timeout: a failure must end the run long before it


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DELTAH_FAULT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               DELTAH_DIST_TIMEOUT=str(TIMEOUT_S), **extra)
    return env


def _run_args(out: Path) -> list[str]:
    args = ["-m", "deltaH", "-q", "run", CONFIG, "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@given(n=hs.integers(1, 200), unit=hs.integers(1, 20), world=hs.integers(1, 9))
def test_shards_are_contiguous_whole_blocks_in_rank_order(n: int, unit: int, world: int) -> None:
    parts = [span(n, unit, r, world) for r in range(world)]
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))  # a partition, in order
    blocks = -(-n // unit)
    sizes = [p.stop - p.start for p in parts]
    if blocks >= world:  # whole blocks, as even as blocks allow: every chunk is one a single process forms
        assert all(p.start % unit == 0 for p in parts)
        per_rank = [-(-size // unit) for size in sizes]  # blocks (the last one of E may be short)
        assert max(per_rank) - min(per_rank) <= 1 and min(per_rank) > 0
    else:  # fewer blocks than ranks: single rows, so each rank gets one when n allows
        assert max(sizes) - min(sizes) <= 1


@slow
def test_torchrun_two_ranks_write_the_one_process_folder(tmp_path: Path) -> None:
    one = subprocess.Popen([sys.executable, *_run_args(tmp_path / "one")], cwd=tmp_path, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", *_run_args(tmp_path / "two")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    out, err = one.communicate(timeout=TIMEOUT_S)
    assert one.returncode == 0, err
    assert two.returncode == 0, two.stderr[-3000:]
    assert compare_results(tmp_path / "one", tmp_path / "two") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing
    assert two.stdout.count("results:") == 1  # rank 0 alone prints
    assert json.loads((tmp_path / "two" / "progress.json").read_text())["status"] == "complete"
    assert not (tmp_path / "two" / "cache").exists()


@slow
def test_a_failure_on_rank_1_ends_both_ranks(tmp_path: Path) -> None:
    """Rank 1 raises at the first-order stage while rank 0 is inside that stage's collectives: both
    processes exit 1 within seconds (not after the collective timeout), rank 0 marks the folder."""
    port = str(_free_port())
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, *_run_args(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=port, DELTAH_FAULT="1:first_order"),
        )
        for r in range(2)
    ]
    t0 = time.monotonic()
    errs = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in procs] == [1, 1], errs
    assert elapsed < TIMEOUT_S / 4, elapsed  # the watchdog ended it, not the collective timeout
    prog = json.loads((out / "progress.json").read_text())
    assert prog["status"] == "failed"
    assert prog["error"] == "RuntimeError on rank 1: fault injected by DELTAH_FAULT=1:first_order"
    log = (out / "run.log").read_text()
    assert "Traceback" in log and "inject_fault" in log  # rank 1's traceback, written by rank 0
    assert f"deltah: failed: RuntimeError on rank 1: fault injected by DELTAH_FAULT=1:first_order " \
           f"(traceback in {out / 'run.log'})" in errs[0]
    assert "[rank 1] ERROR" in errs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
