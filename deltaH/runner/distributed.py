"""``deltah run`` on several processes (``torchrun``): the process group, rank 0's decisions, failures.

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE > 1``) the CLI opens a :class:`Session`: it joins
the rendezvous, initialises ``torch.distributed`` (gloo on CPU; NCCL when the run uses CUDA, rank
``r`` on ``cuda:LOCAL_RANK``) with a bounded collective timeout (``DELTAH_DIST_TIMEOUT`` seconds,
default 600), and tears it down at the end. What the ranks share is in
:mod:`deltaH.runner.shard`; rank 0 alone samples E and U, owns the results folder and the stage
cache, and :func:`broadcast` hands its decisions (and cached or sampled stage outputs) to the others.

Failures. A rank that raises must not leave the others blocked in a collective, and a thread blocked
in a gloo or NCCL collective cannot be interrupted, so:

* the failing rank publishes its error (rank, type, first line, traceback, exit code) under the key
  ``error`` of the rendezvous store; the first error published is the run's error;
* a watchdog thread on every rank polls that key (every :data:`POLL_S` seconds). Rank 0 marks its
  open results folders failed with the error (its traceback appended to their ``run.log``; a folder
  it created that holds no result yet is removed after bad input, as one process does), prints the
  CLI's one-line message and sets ``ack``;
* every rank then leaves with ``os._exit(code)``: 2 for bad input (a ``DeltaHError``), 130 for
  Ctrl-C, 1 for anything else. Ranks other than 0 first wait for ``ack`` (at most :data:`ACK_WAIT_S`
  seconds): ``torchrun`` stops every worker once one exits, and must not stop rank 0 before it has
  written the failure;
* a rank that dies without a word (killed, a crash) makes the others' collectives fail (gloo: the
  peer closed its connection) or time out after the collective timeout; ``torchrun`` then sends the
  others SIGTERM, which the session turns into an exception (:class:`Terminated`), so rank 0 still
  marks its folder failed.

``DELTAH_FAULT=RANK:STAGE`` (for tests) makes rank ``RANK`` raise at the start of stage ``STAGE``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from deltaH import _dist
from deltaH.errors import ConfigError, DeltaHError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT_ENV = "DELTAH_DIST_TIMEOUT"
FAULT_ENV = "DELTAH_FAULT"
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.2
ACK_WAIT_S = 60.0
_SESSION: Session | None = None  # the open session of this process (at most one)


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank: the process group's when one is active, else torchrun's ``RANK`` (0 alone)."""
    if _dist.active():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    return int(dist.get_world_size()) if _dist.active() else 1


def is_main() -> bool:
    """Rank 0: the one process that samples, writes the results folder, logs and draws progress bars."""
    return rank() == 0


def broadcast(obj: T, device: torch.device | str | None = None) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process; other ranks may pass None).

    Tensors travel on the CPU, packed as the stage cache stores them, so a receiving rank gets what a
    cache hit would give it: tensors rank 0 held on its accelerator arrive on ``device`` (this
    rank's own, e.g. ``cuda:LOCAL_RANK``), CPU tensors on the CPU.
    """
    if not _dist.active():
        return obj
    from deltaH.runner.cache import pack, unpack

    return unpack(broadcast_packed(pack(obj) if dist.get_rank() == 0 else None), device)  # type: ignore[no-any-return]


def broadcast_packed(packed: Any) -> Any:
    """Rank 0's already :func:`~deltaH.runner.cache.pack`-ed value on every rank, still packed."""
    if not _dist.active():
        return packed
    box = [packed if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def after_main() -> None:
    """Hold the other ranks until rank 0 is through work it does alone (sampling, reporting stages,
    writing), by a key in the rendezvous store rather than a collective: a long solo step must not
    run into the collective timeout. A failure meanwhile still ends them (the watchdog). Every rank
    calls it at the same points; nothing happens outside a :class:`Session`."""
    s = _SESSION
    if s is None:
        return
    s.waits += 1
    key = f"after-main/{s.waits}"
    if s.rank == 0:
        s.store.set(key, "1")
        return
    while not s.store.check([key]):  # polled: a blocking wait would time out (and log) while rank 0 works
        time.sleep(POLL_S)


def inject_fault(stage: str) -> None:
    """Raise at ``stage`` on the rank named by ``DELTAH_FAULT=RANK:STAGE`` (tests of failure handling)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{rank()}:{stage}":
        raise RuntimeError(f"fault injected by {FAULT_ENV}={spec}")


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: the collective timeout must be a number of seconds > 0")
    return t


def exit_code(exc: BaseException) -> int:
    """The CLI's exit code for ``exc``: 2 bad input, 130 interrupted, 1 any other failure."""
    if isinstance(exc, DeltaHError):
        return 2
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def first_line(text: str, default: str) -> str:
    return text.splitlines()[0] if text.strip() else default


class Terminated(RuntimeError):
    """SIGTERM during a distributed run (``torchrun`` stops every worker once one of them exits)."""


@dataclass(frozen=True)
class RankError:
    """The error that ends a distributed run, as published in the store."""

    rank: int
    code: int
    type: str
    message: str
    traceback: str

    @classmethod
    def of(cls, exc: BaseException, where: int) -> RankError:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(where, exit_code(exc), type(exc).__name__, first_line(str(exc), type(exc).__name__), tb)

    def line(self) -> str:
        return f"{self.type} on rank {self.rank}: {self.message}"


class Session:
    """The process group of a ``torchrun`` launch, and the failure protocol of the module docstring.

    ``with Session(device):`` around the work; an exception leaving the block ends the process (every
    rank) with the CLI's exit code; a normal exit waits for every rank (a barrier) and tears down.
    ``device`` is the config's ``checkpoint.device``: NCCL when it resolves to CUDA.
    """

    def __init__(self, device: str = "auto", verbose: bool = False) -> None:
        self.device, self.verbose = device, verbose
        self.store: Any = None
        self.rank = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._sigterm: Any = signal.SIG_DFL
        self.waits = 0  # calls of after_main so far (the same on every rank)

    def __enter__(self) -> Session:
        timeout = datetime.timedelta(seconds=timeout_s())
        cuda = self.device != "cpu" and torch.cuda.is_available()
        if cuda and self.device.startswith("cuda:"):
            raise ConfigError(
                f"config key 'checkpoint.device': {self.device!r} under torchrun would put every rank on one "
                "GPU; use auto or cuda (rank r then uses cuda:LOCAL_RANK)",
                "checkpoint.device",
            )
        store, r, w = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        self.rank = int(r)
        device_id = None
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", r))
            torch.cuda.set_device(local)
            device_id = torch.device("cuda", local)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            store=dist.PrefixStore("default_pg", store),
            rank=r,
            world_size=w,
            timeout=timeout,
            device_id=device_id,
        )
        self.store = dist.PrefixStore("deltaH/", store)
        self._watchdog = threading.Thread(target=self._watch, name="deltaH-watchdog", daemon=True)
        self._watchdog.start()
        self._sigterm = signal.signal(signal.SIGTERM, self._terminated)
        global _SESSION
        _SESSION = self
        log.debug("rank %d of %d joined (%s)", r, w, "nccl" if cuda else "gloo")
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._fail(exc)
        try:
            after_main()  # rank 0 may still be writing; a failure there reaches the watchdog meanwhile
            dist.barrier()
        except Exception as err:  # noqa: BLE001 - a peer died without a word: end like any failure
            self._fail(err)
        global _SESSION
        _SESSION = None
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        signal.signal(signal.SIGTERM, self._sigterm)
        dist.destroy_process_group()

    # -- failures ------------------------------------------------------------------------------
    def _terminated(self, signum: int, frame: Any) -> None:
        if not self._lock.locked():  # already leaving: let the exit finish
            raise Terminated(
                "terminated by SIGTERM: torchrun stops every rank once one of them exits (its summary "
                "names the first failure)"
            )

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                failed = bool(self.store.check(["error"]))
            except Exception:  # noqa: BLE001 - the store left with its host: nothing more to watch
                return
            if failed:
                self._fail(None)

    def _publish(self, exc: BaseException) -> RankError:
        """Publish this rank's error unless another rank's came first; returns the run's error."""
        mine = RankError.of(exc, self.rank)
        try:
            if int(self.store.add("n_errors", 1)) == 1:
                self.store.set("error", json.dumps(asdict(mine)))
                return mine
            return RankError(**json.loads(self.store.get("error")))
        except Exception:  # noqa: BLE001 - no store (its host is gone): this rank's error is all we know
            return mine

    def _published(self) -> RankError:
        try:
            return RankError(**json.loads(self.store.get("error")))
        except Exception:  # noqa: BLE001 - the store left with its host
            return RankError(-1, 1, "RuntimeError", "another rank failed (its error was not readable)", "")

    def _fail(self, exc: BaseException | None) -> NoReturn:
        """End this process for the run's error (this rank's ``exc``, or the published one)."""
        self._lock.acquire()  # never released: the main thread and the watchdog end here only once
        self._stop.set()
        err = self._publish(exc) if exc is not None else self._published()
        if self.rank == 0:
            self._record(err, own=exc is not None and err.rank == 0)
            _flush()
            _set_quietly(self.store, "ack")
        else:
            if err.rank == self.rank:
                log.error("%s", err.line())
                if self.verbose:
                    print(err.traceback, file=sys.stderr)
            _flush()
            _wait_quietly(self.store, "ack", ACK_WAIT_S)
        os._exit(err.code)  # not sys.exit: a collective may hold the main thread (module docstring)

    def _record(self, err: RankError, own: bool) -> None:
        """Rank 0: the failure into its open results folders (unless ``run_guard`` already did) and the
        CLI's one-line message."""
        from deltaH.io.results import open_guards, record_failure

        folders = open_guards()
        if not own:
            status = "incomplete" if err.code == 130 else "failed"
            for rd in reversed(folders):
                record_failure(rd, f"{err.type} on rank {err.rank}: {err.message}", err.traceback,
                               bad_input=err.code == 2, status=status)
        if self.verbose:
            print(err.traceback, file=sys.stderr)
        logs = [rd.path / "run.log" for rd in reversed(folders) if (rd.path / "run.log").is_file()]
        if err.code == 130:
            print("interrupted: the results folder is marked incomplete; continue with --resume DIR",
                  file=sys.stderr)
        elif err.code == 2:
            print(f"deltah: error: {err.message}" + ("" if own else f" (rank {err.rank})"), file=sys.stderr)
        else:
            hint = f"traceback in {logs[0]}" if logs else "rerun with --verbose for the traceback"
            what = f"{err.type}: {err.message}" if own else err.line()
            print(f"deltah: failed: {what} ({hint})", file=sys.stderr)


def _set_quietly(store: Any, key: str) -> None:
    try:
        store.set(key, "1")
    except Exception:  # noqa: BLE001 - nobody is left to read it
        pass


def _wait_quietly(store: Any, key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    try:
        while not store.check([key]) and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
    except Exception:  # noqa: BLE001 - rank 0 is gone: leave anyway
        pass


def _flush() -> None:
    """Logs and streams out before ``os._exit``, which skips interpreter shutdown: a collective may
    still hold the main thread, and shutdown with a live process group can abort (gloo: "terminate
    called without an active exception")."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
