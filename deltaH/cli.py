"""The ``deltah`` command: ``run``, ``inspect``, ``bench``.

Exit codes: 0 success; 2 bad input — a ``deltaH.errors.DeltaHError`` (config, files, arguments) or
an argparse error: one line ``deltah: error: ...``, no traceback; 1 any other failure, a bug or the
user's reward function raising: one line ``deltah: failed: ...``, the traceback in the run's
``run.log`` (or on the console with ``--verbose``); 1 also for a study of several checkpoints some
of which failed (status ``partial``): one line ``deltah: partial: ...`` naming them and the run
folder (``--resume`` retries them); 130 interrupted.

Under ``torchrun --nproc_per_node=N -m deltaH run ...`` the run is shared by N processes
(:mod:`deltaH.runner.distributed`): rank 0 prints, logs and draws progress bars; the others log
warnings only, prefixed with their rank. A failure on any rank ends every rank with the code above.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from deltaH.errors import DeltaHError, NotFoundError, ResumeError

log = logging.getLogger("deltaH")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="deltah", description="How does one optimizer step change the policy's entropy?"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the plan of a YAML config and write a results folder")
    r.add_argument(
        "config", nargs="?", default=None, help="YAML config (default: the embedded toy, configs/toy.yaml)"
    )
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config key (repeatable), e.g. --set policy.top_p=0.95",
    )
    r.add_argument(
        "--out", default=None, help="results folder to create (default: output.dir/run-<timestamp>)"
    )
    r.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue an interrupted run in DIR with the config saved there (changing a result-affecting "
        "key is refused; chunk sizes and the device may change)",
    )
    i = sub.add_parser("inspect", help="print a results folder's summary as a table")
    i.add_argument("results", help="a results folder written by 'deltah run'")
    b = sub.add_parser("bench", help="run the benchmark suite (benchmarks/ in a source checkout)")
    b.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    b.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from deltaH.runner.distributed import rank

    args = _parser().parse_args(argv)
    if rank() > 0:  # another process of a torchrun launch: quiet, its lines marked with its rank
        args.quiet = True
        logging.captureWarnings(True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO),
        format=(f"[rank {rank()}] " if rank() > 0 else "") + "%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Library deprecation chatter (peft/transformers) is not the user's business here.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.quiet:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
    try:
        if args.cmd == "run":
            return _run(args)
        if args.cmd == "inspect":
            return _inspect(args)
        return _bench(args)
    except KeyboardInterrupt:
        print(
            "interrupted: the results folder is marked incomplete; continue with --resume DIR",
            file=sys.stderr,
        )
        return 130
    except DeltaHError as exc:  # bad input: the message names the key or file and the fix
        if args.verbose:
            raise
        print(f"{_rank_tag()}deltah: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failure, not bad input (RewardError included: the user's code failed)
        if args.verbose:
            raise
        where = getattr(exc, "run_log", None)  # set by the results folder's run_guard
        hint = f"traceback in {where}" if where else "rerun with --verbose for the traceback"
        what = f"{type(exc).__name__}: {_first_line(exc)}"
        print(f"{_rank_tag()}deltah: failed: {what} ({hint})", file=sys.stderr)
        return 1


def _rank_tag() -> str:
    """``[rank r] `` before the lines of a torchrun process other than rank 0 (nothing otherwise)."""
    from deltaH.runner.distributed import rank

    return f"[rank {rank()}] " if rank() > 0 else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def _run(args: argparse.Namespace) -> int:
    from deltaH.config import load_config
    from deltaH.runner.distributed import Session, is_main, launched

    if args.resume is not None:
        from deltaH.errors import ResumeError
        from deltaH.io.results import ResultsDir
        from deltaH.runner.resume import resume_config

        if args.out is not None:
            raise ResumeError("--out cannot be combined with --resume: a resumed run continues in its folder")
        rd = ResultsDir.open(args.resume)
        cfg = resume_config(args.resume, args.config, args.overrides)  # the folder's own config.yaml
        if rd.progress().get("status") == "complete":
            from deltaH.runner.resume import check_same_results

            check_same_results(rd.path, cfg)
            if is_main():
                print(f"results: {rd.path} (already complete: nothing was changed)")
            return 0
    else:
        cfg = load_config(args.config, args.overrides)  # validated before any model loads
    from deltaH.runner import run

    if launched():  # torchrun: one run on WORLD_SIZE processes; a failure anywhere ends them all
        with Session(cfg.checkpoint.device, verbose=args.verbose):
            path = Path(run(cfg, out=args.out, resume=args.resume, quiet=args.quiet))
        if not is_main():
            return 0
    else:
        path = Path(run(cfg, out=args.out, resume=args.resume, quiet=args.quiet))
    print(f"results: {path}")
    study = path / "study.json"
    if not study.is_file():
        print(f"report:  {path / 'report.md'}")
        return 0
    print(f"study:   {study} (a report.md per checkpoint in its sub-folder)")
    rows = json.loads(study.read_text())["checkpoints"]
    failed = [r["checkpoint"] for r in rows if r["status"] == "failed"]
    if not failed:
        return 0
    print(f"deltah: partial: {len(failed)} checkpoint(s) failed: {', '.join(failed)} (errors in {study}, "
          f"tracebacks in {path / 'run.log'}); retry them with 'deltah run --resume {path}'", file=sys.stderr)
    return 1


def _inspect(args: argparse.Namespace) -> int:
    from deltaH.io.report import format_summary_table
    from deltaH.io.results import ResultsDir
    from deltaH.io.schema import RunSummary

    rd = ResultsDir.open(args.results, action="inspect")
    summary = rd.read_json("summary.json")  # or summary.json.gz
    if summary is None:
        study = rd.read_json("study.json")
        if study is not None:
            for row in study["checkpoints"]:
                print(row)
            return 0
        prog = rd.progress()
        raise ResumeError(
            f"{args.results} has no summary.json yet (status: {prog.get('status')}); continue that run with "
            f"'deltah run --resume {args.results}'"
        )
    summary.setdefault("status", rd.progress().get("status"))
    print(format_summary_table(RunSummary.from_json(summary)))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    try:
        run_all = importlib.import_module("benchmarks.run_all")  # a source checkout's benchmarks/
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.run_all"):
            raise  # the benchmarks are there but one of their imports failed: not the user's input
        raise NotFoundError(
            "deltah bench needs a source checkout (the benchmarks/ folder); run it from the repo root"
        ) from exc
    return int(run_all.main(["--out", args.out, *(["--quick"] if args.quick else [])]))


if __name__ == "__main__":
    raise SystemExit(main())
