"""Run every benchmark (core, updates, probe and recording when present) and write JSON under ``--out``."""

from __future__ import annotations

import argparse
import importlib.util
import os


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--out", default="benchmarks/results",
        help="folder for core.json, updates.json, probe.json, recording.json, replay.json, kernel.json",
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    q = ["--quick"] if args.quick else []
    from benchmarks import bench_core, bench_updates

    bench_core.main(["--out", os.path.join(args.out, "core.json"), *q])
    bench_updates.main(["--out", os.path.join(args.out, "updates.json"), *q])
    if importlib.util.find_spec("benchmarks.bench_probe") is not None:
        from benchmarks import bench_probe  # type: ignore[attr-defined]

        bench_probe.main(["--out", os.path.join(args.out, "probe.json"), *q])
    if importlib.util.find_spec("benchmarks.bench_recording") is not None:
        from benchmarks import bench_recording  # type: ignore[attr-defined]

        bench_recording.main(["--out", os.path.join(args.out, "recording.json"), *q])
    from benchmarks import bench_tokinf

    bench_tokinf.main(["--out", os.path.join(args.out, "tokinf.json"), *q])
    if importlib.util.find_spec("trl") is not None:
        from benchmarks import bench_replay

        bench_replay.main(["--out", os.path.join(args.out, "replay.json"), *q])
    from benchmarks import bench_kernel

    bench_kernel.main(["--out", os.path.join(args.out, "kernel.json"), *q])
    from benchmarks import bench_prompts

    bench_prompts.main(["--out", os.path.join(args.out, "prompts.json"), *q])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
