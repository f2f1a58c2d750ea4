"""The orchestrator: a config and a checkpoint (or several) to a results folder.

:func:`analyse_checkpoint` reads as the data flow of one checkpoint; every stage after loading
goes through the run's :class:`~deltaH.runner.cache.StageCache`, keyed by the config slice it
reads, so ``--resume`` recomputes only what did not finish.

In a distributed run (``torch.distributed`` initialised: :mod:`deltaH.runner.distributed`) every
rank calls :func:`run` and the stages; rank 0 alone samples E and U (broadcast to the others),
owns the results folder and the cache, and writes; the others hold ``rd = None``.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from deltaH.config import Config
from deltaH.errors import CheckpointError, ConfigError, ResumeError
from deltaH.io.results import ResultsDir, run_guard, to_jsonable
from deltaH.io.schema import RunSummary
from deltaH.runner import distributed
from deltaH.runner import stages as st
from deltaH.runner import token_stages as ts
from deltaH.runner.cache import StageCache, fingerprint, stage_key
from deltaH.runner.controls import controls as controls_stage
from deltaH.runner.resume import check_same_results
from deltaH.runner.shard import check_world
from deltaH.runner.summary import summarise
from deltaH.runner.write import write_analyses, write_batches, write_summary_and_report, write_sweep

log = logging.getLogger("deltaH.runner")
T = TypeVar("T")
OnStage = Callable[[str, str], None]

# stage -> (config keys it reads, stages it consumes); the checkpoint's fingerprint enters "batches".
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "batches": (
        ("checkpoint.base_model", "checkpoint.dtype", "data", "policy", "eval_batch", "update_batch", "seed"),
        (),
    ),  # + the checkpoint's fingerprint and the record's (a recorded U)
    "theta_stats": ((), ("batches",)),
    "directions": (
        ("loss", "checkpoint.max_grad_norm", "checkpoint.optimizer", "eta.reference"),
        ("batches",),
    ),
    # the choice is timed once and kept, so a resumed run uses it; compute.* keys are free on resume
    "dir_chunk": (("compute",), ("directions",)),
    "first_order": (("analyses.entropy_mode",), ("directions", "theta_stats")),
    "eta_grid": (("eta",), ("first_order",)),
    "true_sweep": ((), ("eta_grid",)),
    "second_order": ((), ("eta_grid",)),
    "influence": ((), ("first_order",)),
    "realised": ((), ("directions", "theta_stats")),
    "attribution": ((), ("batches", "first_order", "true_sweep", "influence")),
    "kernel": (
        ("analyses.kernel_method", "analyses.kernel_proj_dim", "analyses.kernel_subspace",
         "analyses.kernel_check_columns"),
        ("directions",),
    ),
    "proxy": ((), ("directions",)),
    "token_influence": ((), ("first_order",)),  # the same inputs as δH₁ (entropy_mode, directions, θ stats)
    "proxies": (("analyses.influence",), ("token_influence", "influence")),
    "controls": (
        ("analyses.entropy_target", "checkpoint.max_grad_norm", "loss", "policy"),
        ("batches", "directions", "first_order"),
    ),
    "diagnostics": ((), ("batches",)),
}


def _slice(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def stage_keys(cfg: Config, ckpt_fingerprint: str, files: dict[str, str] | None = None) -> dict[str, str]:
    """Every stage's cache key (see :data:`STAGES`); ``files`` adds the fingerprints of other inputs
    by stage (the step record to ``batches``, the next checkpoint to ``realised``)."""
    d = to_jsonable(cfg.to_dict())
    keys: dict[str, str] = {}
    for name, (reads, upstream) in STAGES.items():
        conf = {k: _slice(d, k) for k in reads}
        if name == "batches":
            conf["checkpoint"] = ckpt_fingerprint
        if files and name in files:
            conf["files"] = files[name]
        keys[name] = stage_key(name, conf, [keys[u] for u in upstream])
    return keys


def source_fingerprints(src: Any) -> dict[str, str]:
    """Fingerprints of the files a source reads: the step record / rollout file and the next checkpoint."""
    out = {}
    if src.where is not None:
        where = Path(src.where)
        if where.is_dir() and src.step is not None:
            out["batches"] = fingerprint_files(sorted(where.glob(f"step-{src.step}.*")))
        else:
            out["batches"] = fingerprint(where)
    if src.next_checkpoint is not None:
        out["realised"] = fingerprint(src.next_checkpoint)
    return out


def fingerprint_files(files: Sequence[Path]) -> str:
    return stage_key("files", {str(f.name): [f.stat().st_size, f.stat().st_mtime_ns] for f in files})


def resolve_checkpoints(path: str | Sequence[str]) -> list[str]:
    """``toy``, a folder, a list of folders, or a glob (sorted by the trailing step number)."""
    if not isinstance(path, str):
        return [p for item in path for p in resolve_checkpoints(item)]
    if path == "toy":
        from deltaH.toy import toy_checkpoint_path

        return [str(toy_checkpoint_path())]
    if any(ch in path for ch in "*?["):
        hits = glob.glob(path)
        if not hits:
            raise ConfigError(
                f"config key 'checkpoint.path': the glob {path!r} matches no folder", "checkpoint.path"
            )

        def step(p: str) -> tuple[int, str]:
            tail = Path(p).name.rsplit("-", 1)[-1]
            return (int(tail) if tail.isdigit() else -1, p)

        return sorted(hits, key=step)
    if not Path(path).exists():
        raise ConfigError(f"config key 'checkpoint.path': {path!r} does not exist", "checkpoint.path")
    return [path]


def load_inputs(cfg: Config, ckpt_path: str, quiet: bool) -> st.Inputs:
    """Checkpoint (model, tokenizer, AdamW state), prompts, reward and policy."""
    from deltaH.functional import FunctionalLM
    from deltaH.io.checkpoint import load_checkpoint
    from deltaH.policy import SamplingPolicy
    from deltaH.sampling.data import load_prompts
    from deltaH.sampling.rewards import load_reward_fn
    from deltaH.updates.directions import reference_lr

    log.info("loading checkpoint %s", ckpt_path)
    device = cfg.checkpoint.device
    ckpt = load_checkpoint(
        ckpt_path,
        base_model=cfg.checkpoint.base_model,
        dtype=None if cfg.checkpoint.dtype == "auto" else getattr(torch, cfg.checkpoint.dtype),
        device=("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device,
        max_grad_norm=cfg.checkpoint.max_grad_norm,
        optimizer=cfg.checkpoint.optimizer == "saved",
    )
    upcast_from, upcast_trainable = "", False
    if cfg.checkpoint.dtype == "auto":
        half = sorted({str(p.dtype).removeprefix("torch.") for p in ckpt.model.parameters()
                       if p.dtype in (torch.bfloat16, torch.float16)})
        if half:  # benchmarks/bench_precision.py: in bf16, ΔH at a realistic lr is rounding noise
            upcast_from = "/".join(half)
            upcast_trainable = any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
                                   for p in ckpt.model.parameters())
            ckpt.model.to(torch.float32)
            log.info("checkpoint saved in %s: computing in float32 (checkpoint.dtype: auto; half precision "
                     "cannot resolve the entropy change of a realistic step)", "/".join(half))
    if cfg.checkpoint.optimizer == "fresh":
        ckpt = dataclasses.replace(ckpt, optimizer_state=fresh_adamw(ckpt.model, float(cfg.eta.reference)))
    state = ckpt.optimizer_state
    if state is None:
        raise CheckpointError(
            f"checkpoint {ckpt_path} has no optimizer state (optimizer.pt): deltaH needs it to rebuild "
            "the AdamW step; point checkpoint.path at a trainer checkpoint-N folder"
        )
    if ckpt.tokenizer is None:
        raise CheckpointError(
            f"checkpoint {ckpt_path} has no tokenizer files; save the tokenizer beside the model"
        )
    lm = FunctionalLM.from_model(ckpt.model)
    from deltaH.runner.recorded import resolve_update_source

    source = resolve_update_source(cfg, ckpt_path, ckpt.tokenizer)
    lrs = {n: h.lr for n, h in state.hyper.items() if n in lm.params}
    if lrs:  # η_ref resolves (the directions stage uses the same rule): fail before any sampling
        st.eta_reference(cfg.eta.reference, reference_lr(lrs), ckpt.logged_lr, ckpt_path)
    data_path = cfg.data.path
    if data_path == "toy":
        from deltaH.toy import toy_prompts_path

        data_path = str(toy_prompts_path())
    records = load_prompts(
        data_path,
        prompt_field=cfg.data.prompt_field,
        answer_field=cfg.data.answer_field,
        id_field=cfg.data.id_field,
        template=cfg.data.template,
        system_prompt=cfg.data.system_prompt,
        tokenizer=ckpt.tokenizer,
        limit=cfg.data.limit,
    )
    return st.Inputs(
        ckpt=ckpt,
        lm=lm,
        params=lm.params,
        tokenizer=ckpt.tokenizer,
        records=list(records),
        reward_fn=load_reward_fn(cfg.data.reward),
        policy=SamplingPolicy(cfg.policy.temperature, cfg.policy.top_p),
        seeds=st.Seeds.of(cfg.seed),
        quiet=quiet,
        source=source,
        upcast_from=upcast_from,
        upcast_trainable=upcast_trainable,
    )


def fresh_adamw(model: torch.nn.Module, lr: float) -> Any:
    """The state of a new ``torch.optim.AdamW`` over the trainable parameters, with the HF Trainer's
    defaults (betas (0.9, 0.999), eps 1e-8, weight decay 0): every parameter at step 0, zero moments."""
    from deltaH.updates.adamw import AdamWState

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    return AdamWState.from_optimizer(opt, model)


def on_main(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with every reduction local: for a stage rank 0 computes alone on all the rows
    (``where="main"``, then broadcast), so it gets one process's bits whatever the number of ranks."""
    from deltaH import _dist

    with _dist.local():
        return fn(*args)


def analyse_checkpoint(
    cfg: Config, ckpt_path: str, rd: ResultsDir | None, quiet: bool = False, on_stage: OnStage | None = None
) -> RunSummary | None:
    """One checkpoint's analyses into ``rd``; returns the summary (None on ranks other than 0 of a
    distributed run, which pass ``rd = None`` and write nothing)."""
    t0, timings = time.perf_counter(), {}
    torch.manual_seed(cfg.seed)
    inp = load_inputs(cfg, ckpt_path, quiet or not distributed.is_main())
    timings["load"] = time.perf_counter() - t0
    cache = StageCache(None if rd is None else rd.path / "cache", on_stage, device=inp.lm.device)
    keys = stage_keys(cfg, fingerprint(ckpt_path), source_fingerprints(inp.source))

    def stage(name: str, fn: Callable[[], Any], enabled: bool = True, where: str = "all") -> Any:
        """Stage ``name`` through the cache; ``where`` computes it (see ``StageCache.stage``): the
        estimator stages on every rank, sampling on rank 0 (broadcast), reporting stages on rank 0."""
        if not enabled:
            return None
        distributed.inject_fault(name)
        t = time.perf_counter()
        out = cache.stage(name, keys[name], fn, where)
        timings[name] = time.perf_counter() - t
        return out

    a = cfg.analyses
    bt = stage("batches", lambda: st.build_batches(cfg, inp), where="main").to(inp.lm.device)
    base = stage("theta_stats", lambda: st.theta_stats(cfg, inp, bt))
    dr = stage("directions", lambda: st.directions(cfg, inp, bt))
    # rank 0 times it with collectives off; every rank uses its choice
    chunk = stage("dir_chunk", lambda: on_main(st.dir_chunk, cfg, inp, bt, dr), where="main")
    inp = dataclasses.replace(inp, dir_chunk=chunk.value)
    fo = stage("first_order", lambda: st.first_order(cfg, inp, bt, dr, base))
    # rank 0's grid for every rank: the number of η values sets the number of collectives that follow
    grid = distributed.broadcast(stage("eta_grid", lambda: st.eta_grid(cfg, inp, bt, dr, base, fo)))
    sw = stage("true_sweep", lambda: st.true_sweep(cfg, inp, bt, dr, base, grid))
    so = stage("second_order", lambda: st.second_order(cfg, inp, bt, dr, base, grid), a.second_order)
    has_kl = dr.replay is not None and dr.replay.grad_kl is not None
    real = stage(
        "realised",
        lambda: st.realised(cfg, inp, bt, dr, base),
        inp.source.next_checkpoint is not None or has_kl,
    )
    inf = stage("influence", lambda: st.influence(cfg, inp, bt, dr, base), a.influence)
    att = stage("attribution", lambda: st.attribution(cfg, inp, bt, dr, fo, grid, sw, inf), inf is not None,
                "main_only")
    kern = stage("kernel", lambda: on_main(st.kernel, cfg, inp, bt, dr), a.kernel, "main")
    px = stage("proxy", lambda: st.proxy(cfg, inp, bt, dr), a.proxy, "main_only")
    # one pass over all of E on rank 0 (collectives off), broadcast: the same bits whatever the ranks
    tok = stage("token_influence", lambda: ts.token_influence_local(cfg, inp, bt, dr, base),
                a.token_influence, "main")
    pxs = stage("proxies", lambda: ts.proxies_stage(cfg, inp, bt, dr, tok, inf), tok is not None, "main_only")
    ctl = stage("controls", lambda: on_main(controls_stage, cfg, inp, bt, dr, base, fo), a.controls, "main")
    debug = cfg.output.detail == "debug"
    diag = stage("diagnostics", lambda: st.diagnostics(cfg, inp, bt), debug)
    timings["total"] = time.perf_counter() - t0
    if rd is None:  # another rank of a distributed run: rank 0 writes
        distributed.after_main()
        return None

    summary = summarise(cfg, inp, bt, dr, fo, grid, sw, so, inf, kern, px, timings, att, real, ctl, chunk)
    if tok is not None:
        summary = dataclasses.replace(summary, proxies=ts.proxies_summary(inp, bt, dr, tok, pxs))
    write_batches(rd, cfg, bt, base, diag, att, lambda rows: ts.token_rows(rows, bt, dr, tok, pxs))
    write_sweep(rd, cfg, grid.etas, sw, fo.slope)
    write_analyses(rd, cfg, inf, kern, att)
    ts.write_token_arrays(rd, dr, tok, pxs)
    summary = write_summary_and_report(rd, cfg, summary)  # as written (a plots-skipped warning included)
    rd.mark_done("report")
    cache.clear()  # the results folder now holds everything; the cache only served --resume
    distributed.after_main()
    return summary


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(to_jsonable(d), sort_keys=False))


def open_results(cfg: Config, out: str | Path | None, resume: str | Path | None) -> ResultsDir:
    """A new results folder (with the config saved), or the folder to resume after checking the
    config leaves its results unchanged. ``config.yaml`` is written once, at creation."""
    if resume is None:
        rd = ResultsDir.create(cfg.output.dir, out)
        rd.write_text("config.yaml", _yaml(cfg.to_dict()))
        return rd
    if out is not None:
        raise ResumeError("--out cannot be combined with --resume: a resumed run continues in its own folder")
    rd = ResultsDir.open(resume)
    check_same_results(rd.path, cfg)
    return rd


def run(
    cfg: Config,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    on_stage: OnStage | None = None,
) -> Path:
    """Run the plan of ``cfg``; returns the results folder. A complete run given to ``resume`` is
    returned untouched. ``on_stage(name, event)`` sees each stage start and finish ("computed" or
    "cached").

    Several checkpoints make a study (:func:`deltaH.runner.study.run_study`): a checkpoint that fails
    is recorded in ``study.json`` and the others go on; the folder then ends with status ``partial``
    in ``progress.json`` (its ``error`` names the failed checkpoints), and ``resume`` retries only the
    checkpoints that did not complete. If every checkpoint fails, the first failure is raised.

    In a distributed run every rank calls it; rank 0 returns the folder it wrote, the others the
    same path (they write nothing), and a failing checkpoint of a study ends the run (one rank cannot
    go on to the next checkpoint while another is blocked in the failed one's collectives)."""
    paths = resolve_checkpoints(cfg.checkpoint.path)
    from deltaH.preflight import preflight

    preflight(cfg, paths)  # bad input fails here (on every rank), before a results folder exists
    check_world(cfg, distributed.world())
    if not distributed.is_main():
        return _follow(cfg, paths, quiet, on_stage)
    rd = open_results(cfg, out, resume)
    done = resume is not None and rd.progress().get("status") == "complete"
    distributed.broadcast((str(rd.path), done))  # what the other ranks do next (see _follow)
    if done:
        log.info("%s is already complete: nothing to do", rd.path)
        return rd.path
    rd.set_progress(status="running", error=None)
    failed: list[str] = []
    with run_guard(rd):  # run.log, status on failure, removal of a folder a failed run left empty
        if distributed.world() > 1:
            log.info("one run on %d processes; this is rank 0, which writes", distributed.world())
        if len(paths) == 1:
            analyse_checkpoint(cfg, paths[0], rd, quiet, on_stage)
        else:
            from deltaH.runner.study import run_study

            failed = run_study(cfg, paths, rd, quiet, on_stage)  # each failure logged as it happens
    if failed:
        rd.set_progress(status="partial", error=f"{len(failed)} of {len(paths)} checkpoints failed: "
                        f"{', '.join(failed)} (errors in study.json, tracebacks in run.log); retry them "
                        "with --resume")
    else:
        rd.set_progress(status="complete", error=None)
    return rd.path


def _follow(cfg: Config, paths: list[str], quiet: bool, on_stage: OnStage | None) -> Path:
    """:func:`run` on a rank other than 0: the same stages without a folder, rank 0's folder and
    decisions received by broadcast."""
    path, done = cast(tuple[str, bool], distributed.broadcast(None))
    if not done:
        if len(paths) == 1:
            analyse_checkpoint(cfg, paths[0], None, quiet, on_stage)
        else:
            from deltaH.runner.study import run_study

            run_study(cfg, paths, None, quiet, on_stage)
    return Path(path)
