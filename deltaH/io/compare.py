"""Compare two results folders: the "no change in results" check of a refactor.

``python -m deltaH.io.compare OLD NEW`` exits 0 when ``summary.json`` agrees exactly (ignoring the
keys that describe the run rather than its results: timings, dates, revision, versions, and
``compute``: the dir_chunk used and its calibration timings), every
array in ``arrays/`` is bit-equal, ``batches/*.jsonl`` are equal and ``report.md`` agrees but for
its timing lines. Otherwise it lists each difference and exits 1. Typical use: run
``deltah run configs/toy.yaml --out OLD`` at one commit and ``--out NEW`` at another.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.io.results import ResultsDir

IGNORED = ("timings", "created", "git_revision", "versions", "deltah_version", "compute")


def _diff(a: Any, b: Any, path: str, out: list[str], ignore: Sequence[str]) -> None:
    if path in ignore:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else k
            if k not in a or k not in b:
                if sub not in ignore:
                    out.append(f"{sub}: only in {'new' if k in b else 'old'}")
            else:
                _diff(a[k], b[k], sub, out, ignore)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _diff(x, y, f"{path}[{i}]", out, ignore)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        out.append(f"{path}: {a!r} != {b!r}")


def _report_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    # Timing lines and the creation date describe the run, not its results.
    # So does the setup's compute line (the dir_chunk used: speed, never results).
    drop = re.compile(r"(\b\d+(\.\d+)? ?s\b|seconds|took|created|revision|timing|\*\*Compute:\*\*)", re.I)
    return [ln for ln in path.read_text().splitlines() if not drop.search(ln)]


def compare_results(old: str | Path, new: str | Path, ignore: Sequence[str] = ()) -> list[str]:
    """Every difference between two results folders (empty: the same results)."""
    a, b = ResultsDir(Path(old)), ResultsDir(Path(new))
    out: list[str] = []
    _diff(a.read_json("summary.json"), b.read_json("summary.json"), "", out, [*IGNORED, *ignore])
    aa, ab = a.load_arrays(), b.load_arrays()
    for name in sorted(set(aa) | set(ab)):
        if name not in aa or name not in ab:
            out.append(f"arrays/{name}: only in {'new' if name in ab else 'old'}")
        elif aa[name].dtype != ab[name].dtype or aa[name].shape != ab[name].shape:
            out.append(f"arrays/{name}: {aa[name].dtype}{aa[name].shape} != {ab[name].dtype}{ab[name].shape}")
        elif aa[name].tobytes() != ab[name].tobytes():
            n = int(np.sum(aa[name] != ab[name]))
            out.append(f"arrays/{name}: {n} element(s) differ")
    for rel in ("batches/eval.jsonl", "batches/update.jsonl"):
        pa, pb = a.path / rel, b.path / rel
        if pa.is_file() != pb.is_file() or (pa.is_file() and pa.read_bytes() != pb.read_bytes()):
            out.append(f"{rel} differs")
    ra, rb = _report_lines(a.path / "report.md"), _report_lines(b.path / "report.md")
    if ra != rb:
        diff = [f"- {x}" for x in ra if x not in rb][:5] + [f"+ {y}" for y in rb if y not in ra][:5]
        out.append("report.md differs:\n  " + "\n  ".join(diff))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltaH.io.compare", description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY.PATH",
        help="a summary.json key to leave out (repeatable), e.g. --ignore trust.per_eta",
    )
    args = ap.parse_args(argv)
    diffs = compare_results(args.old, args.new, args.ignore)
    for d in diffs:
        print(d)
    print("same results" if not diffs else f"{len(diffs)} difference(s)")
    return 0 if not diffs else 1


if __name__ == "__main__":
    raise SystemExit(main())
