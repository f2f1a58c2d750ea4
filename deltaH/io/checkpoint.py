"""Load a checkpoint folder: an HF model, a peft adapter, or a HF Trainer / TRL ``checkpoint-N/``.

What a folder is, decided from its files (safetensors weights only):

* ``adapter_config.json`` + ``adapter_model.safetensors`` → a peft adapter on the base model named by
  ``base_model_name_or_path`` (a relative path is resolved against the adapter folder first), or by
  ``base_model=``; loaded with ``is_trainable=True`` so the trainable set is the adapter's;
* ``config.json`` + ``model.safetensors`` (or its index) → a full model, every parameter trainable
  (a checkpoint cannot say which ones a trainer froze; the optimizer file's grouping is checked against
  that assumption);
* either of them + ``optimizer.pt`` / ``trainer_state.json`` → a trainer checkpoint: the AdamW state is
  mapped to parameter names (``deltaH.io._trainer_groups``) and ``lr`` is its param-group lr, which
  the Trainer's scheduler already set for the next step (cross-checked with ``scheduler.pt``'s last lr
  when that file loads with ``weights_only``).

Only ``torch.load(weights_only=True)`` reads a pickle; ``training_args.bin``, ``rng_state*.pth`` and
``scaler.pt`` are never opened, so ``max_grad_norm`` (saved only in ``training_args.bin``) is the caller's
to pass. Anything that does not fit is an error, never a fresh optimizer.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltaH.errors import ArgumentError, CheckpointError, DeviceError, NotFoundError
from deltaH.functional import _check_adapters
from deltaH.io._files import check_safetensors, check_torch_archive, safetensors_files, torch_load
from deltaH.io._trainer_groups import optimizer_state_from_file
from deltaH.updates.adamw import AdamWState

__all__ = [
    "AdapterInfo", "Checkpoint", "check_checkpoint", "check_device", "load_checkpoint", "tokenizer_folder",
]

logger = logging.getLogger(__name__)

Kind = Literal["model", "adapter", "trainer"]
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
_OPTIMIZER, _SCHEDULER, _TRAINER_STATE = "optimizer.pt", "scheduler.pt", "trainer_state.json"
# Messages name the config key and the API argument: the same loader serves the CLI and scripts.
_BASE_FIX = ("set the base model (a local folder or hub id): config key checkpoint.base_model, e.g. "
             "--set checkpoint.base_model=/path/to/base (API: base_model=)")


@dataclass(frozen=True)
class AdapterInfo:
    """One peft adapter: ``r``, ``alpha`` and the LoRA ``scaling`` (``None`` for non-LoRA adapters).

    ``scaling`` is the value every LoRA layer uses (``alpha / r``, or ``alpha / √r`` with rsLoRA), or
    ``None`` when layers differ (``rank_pattern`` / ``alpha_pattern``); ``module_scalings`` has each one.
    """

    peft_type: str
    r: int | None
    alpha: float | None
    scaling: float | None
    module_scalings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint. ``model`` is in eval mode; its ``requires_grad`` parameters are ``θ``.

    ``optimizer_state``: the saved AdamW state by parameter name (``None`` without an optimizer
    file); ``lr``: the param-group lr at save time — the one the next step uses — or ``None`` when
    there is no optimizer state or its groups disagree (then read ``optimizer_state.hyper``);
    ``max_grad_norm``: as passed to :func:`load_checkpoint` (the file that holds it is a pickle);
    ``tokenizer``: from the folder, else from a local base-model folder, else ``None``;
    ``logged_lr``: the ``learning_rate`` of the last ``trainer_state.json`` ``log_history`` entry that
    has a positive one — the lr of the step that produced a trainer checkpoint (the Trainer logs the lr
    before its scheduler steps) — or ``None`` (no trainer state, or no such entry).
    """

    model: nn.Module
    tokenizer: Any | None
    optimizer_state: AdamWState | None
    lr: float | None
    kind: Kind
    path: Path
    base_model_path: str | None = None
    global_step: int | None = None
    max_grad_norm: float | None = None
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    logged_lr: float | None = None

    @property
    def is_adapter(self) -> bool:
        """Whether ``model`` is a peft model (its trainable parameters are the adapter's)."""
        return bool(self.adapters)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for logs and result manifests."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        first = next(iter(self.model.parameters()), None)
        out: dict[str, Any] = {
            "path": str(self.path), "kind": self.kind, "weights": "adapter" if self.is_adapter else "full",
            "base_model": self.base_model_path, "global_step": self.global_step, "lr": self.lr,
            "logged_lr": self.logged_lr,
            "max_grad_norm": self.max_grad_norm,
            "dtype": None if first is None else str(first.dtype).removeprefix("torch."),
            "device": None if first is None else str(first.device),
            "trainable_tensors": len(trainable), "trainable_numel": sum(p.numel() for p in trainable),
            "adapters": {k: {"peft_type": a.peft_type, "r": a.r, "alpha": a.alpha, "scaling": a.scaling}
                         for k, a in self.adapters.items()},
            "tokenizer": None if self.tokenizer is None else type(self.tokenizer).__name__,
            "optimizer": None,
        }
        st = self.optimizer_state
        if st is not None:
            hypers = list(dict.fromkeys(st.hyper.values()))
            out["optimizer"] = {
                "params": len(st.names), "fresh": len(st.fresh),
                "step_min": min(st.step.values(), default=0), "step_max": max(st.step.values(), default=0),
                "groups": [{**h._asdict(), "betas": list(h.betas),
                            "params": sum(1 for v in st.hyper.values() if v == h)} for h in hypers],
            }
        return out


# ----------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}): is it corrupt or truncated? Re-save "
                              "the checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


def _kind_of(folder: Path) -> tuple[Kind, bool]:
    """``(kind, is_adapter)`` from the folder's files; refuses pickled or ambiguous weights."""
    has = {p.name for p in folder.iterdir()}
    adapter = "adapter_config.json" in has
    full = "config.json" in has and any(f in has for f in _FULL_WEIGHTS)
    trainer = _OPTIMIZER in has or _TRAINER_STATE in has
    if adapter and any(f in has for f in _FULL_WEIGHTS):
        raise CheckpointError(
            f"{folder} holds both a peft adapter (adapter_config.json) and full model weights: a merged "
            "model saved beside its adapter? deltaH needs the LoRA parameters live (a merged adapter no "
            "longer acts). Point at a folder with only the adapter, or only the full model."
        )
    if adapter and "adapter_model.safetensors" not in has:
        raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors; deltaH "
                              "reads safetensors only (re-save with save_pretrained()).")
    if not (adapter or full):
        pickled = sorted(has & set(_PICKLED_WEIGHTS))
        why = (f"it has only pickled weights {pickled}; deltaH reads safetensors only (re-save with "
               "save_pretrained())" if pickled else "expected config.json + model.safetensors, or "
               "adapter_config.json + adapter_model.safetensors")
        raise CheckpointError(f"{folder} holds nothing deltaH can load ({why}). Files: {sorted(has)[:12]}")
    return ("trainer" if trainer else "adapter" if adapter else "model"), adapter


def _resolve_base(folder: Path, base_model: str | os.PathLike[str] | None) -> str:
    """The base model of an adapter: a local folder (absolute path) or a hub id known to be available."""
    from transformers.utils import cached_file

    cfg_path = folder / "adapter_config.json"
    if base_model is not None:
        given, source = os.fspath(base_model), "checkpoint.base_model / base_model="
    else:
        given, source = _read_json(cfg_path).get("base_model_name_or_path") or "", f"{cfg_path}"
        if not given:
            raise CheckpointError(f"{cfg_path} names no base_model_name_or_path; {_BASE_FIX}.")
    p = Path(given).expanduser()
    if base_model is None and not p.is_absolute() and (folder / p).is_dir():
        return str((folder / p).resolve())
    if p.is_dir():
        return str(p.resolve())
    try:
        cached_file(given, "config.json")
    except OSError as e:
        raise NotFoundError(
            f"base model {given!r} (from {source}) is not a local folder, and the hub cannot provide it "
            f"({'HF_HUB_OFFLINE is set' if os.environ.get('HF_HUB_OFFLINE') else str(e).splitlines()[0]}). "
            f"{_BASE_FIX}."
        ) from e
    return given


def _from_pretrained(where: str | Path, dtype: torch.dtype | str | None, attn: str,
                     trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        where, dtype="auto" if dtype is None else dtype, attn_implementation=attn,
        trust_remote_code=trust_remote_code,
    )


def tokenizer_folder(folders: Sequence[str | Path]) -> Path | None:
    """The first folder that holds tokenizer files (where :func:`load_checkpoint` loads it from)."""
    for f in folders:
        if Path(f).is_dir() and any((Path(f) / n).is_file() for n in _TOKENIZER_FILES):
            return Path(f)
    return None


def _tokenizer(folders: list[str | Path], trust_remote_code: bool) -> Any | None:
    from transformers import AutoTokenizer

    where = tokenizer_folder(folders)
    if where is None:
        return None
    return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)


def _adapter_info(model: nn.Module) -> dict[str, AdapterInfo]:
    configs = getattr(model, "peft_config", None) or {}
    out: dict[str, AdapterInfo] = {}
    for name, cfg in configs.items():
        ptype = getattr(cfg.peft_type, "value", str(cfg.peft_type))
        if ptype != "LORA":
            out[name] = AdapterInfo(ptype, None, None, None)
            continue
        scal = {m: float(mod.scaling[name]) for m, mod in model.named_modules()
                if isinstance(getattr(mod, "scaling", None), dict) and name in mod.scaling}
        uniq = set(scal.values())
        out[name] = AdapterInfo(ptype, int(cfg.r), float(cfg.lora_alpha),
                                uniq.pop() if len(uniq) == 1 else None, scal)
    return out


def _trainer_state(folder: Path) -> tuple[int | None, float | None]:
    """``global_step`` and the last positive logged ``learning_rate`` of ``trainer_state.json``."""
    path = folder / _TRAINER_STATE
    if not path.is_file():
        return None, None
    state = _read_json(path)
    step = state.get("global_step")
    history = state.get("log_history")
    entries = history if isinstance(history, list) else []
    lrs = [e.get("learning_rate") for e in entries if isinstance(e, dict)]
    positive = [float(x) for x in lrs if isinstance(x, int | float) and not isinstance(x, bool)]
    positive = [x for x in positive if 0 < x < float("inf")]
    return (None if step is None else int(step)), (positive[-1] if positive else None)


def _check_scheduler(folder: Path, group_lrs: list[float]) -> None:
    """Cross-check ``scheduler.pt``'s last lr with the optimizer's lr (weights_only; skipped if refused)."""
    path = folder / _SCHEDULER
    if not path.is_file():
        return
    try:
        sched = torch_load(path)  # a truncated or garbage file: CheckpointError naming it
    except pickle.UnpicklingError as e:  # a custom scheduler whose state is not plain data: not needed
        logger.info("%s not read (weights_only refused it: %s)", path, str(e).splitlines()[0])
        return
    last = sched.get("_last_lr") if isinstance(sched, dict) else None
    if isinstance(last, list) and len(last) == len(group_lrs):
        for gi, (a, b) in enumerate(zip(last, group_lrs, strict=True)):
            if abs(float(a) - b) > 1e-12 * max(abs(b), 1e-30):
                raise CheckpointError(
                    f"{path} says the last lr of group {gi} is {a} but {folder / _OPTIMIZER} holds lr={b}: "
                    "the files disagree, so the next step's lr is unknown."
                )


# ----------------------------------------------------------------------------------------- cheap checks
def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a ``DeviceError`` if this machine cannot use it.

    Called before anything loads, so ``device="cuda"`` on a CPU machine fails at once with a fix.
    """
    fix = "use cpu: config key checkpoint.device (cpu, or auto = cuda if available), API: device="
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"device {device!r} is not a torch device ({e}); {fix}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device {str(device)!r} is not available: {why}; {fix}")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {str(device)!r} is not available: this machine has {n} CUDA "
                              f"device(s) (cuda:0 .. cuda:{n - 1}); {fix}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} is not available (torch.backends.mps); {fix}")
    return dev


def check_checkpoint(path: str | os.PathLike[str], *, base_model: str | os.PathLike[str] | None = None,
                     optimizer: bool = True) -> tuple[Kind, str | None]:
    """Cheap checks that :func:`load_checkpoint` can read ``path``, before any weights load.

    The folder exists and holds a model or adapter (``_kind_of``); its JSON files parse; every
    ``.safetensors`` header is intact and covers the file (a truncated copy fails here); an adapter's
    base model resolves; ``optimizer.pt`` (required when ``optimizer``, for a trainer checkpoint)
    has an intact zip directory. Returns the folder's kind and an adapter's resolved base model.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NotFoundError(f"checkpoint folder {folder} does not exist (or is not a folder); check config "
                            "key checkpoint.path (API: path=)")
    kind, is_adapter = _kind_of(folder)
    for name in ("adapter_config.json", "config.json", _TRAINER_STATE):
        if (folder / name).is_file():
            _read_json(folder / name)
    for f in safetensors_files(folder):
        check_safetensors(f)
    base: str | None = None
    if is_adapter:
        base = _resolve_base(folder, base_model)
        if Path(base).is_dir():
            for f in safetensors_files(Path(base)):
                check_safetensors(f)
    elif base_model is not None:
        raise ArgumentError(
            f"base model {os.fspath(base_model)!r} was given (config key checkpoint.base_model, API: "
            f"base_model=) but {folder} holds a full model, not an adapter; drop it."
        )
    if optimizer and kind == "trainer":
        if not (folder / _OPTIMIZER).is_file():
            raise NotFoundError(
                f"{folder} is a trainer checkpoint without {_OPTIMIZER} (saved with save_only_model=True?); "
                "deltaH rebuilds the AdamW step from it: point checkpoint.path at a checkpoint saved with "
                "its optimizer state, or set checkpoint.optimizer=fresh for the first step of a new AdamW "
                "(API: pass optimizer=False to load the weights alone)."
            )
        check_torch_archive(folder / _OPTIMIZER)
    return kind, base


# ----------------------------------------------------------------------------------------- the loader
def load_checkpoint(path: str | os.PathLike[str], *, base_model: str | os.PathLike[str] | None = None,
                    dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    trust_remote_code: bool = False, attn_implementation: str = "eager",
                    optimizer: bool = True, max_grad_norm: float | None = None) -> Checkpoint:
    """Load an HF model folder, a peft adapter folder, or a Trainer/TRL ``checkpoint-N/`` folder.

    ``base_model`` overrides an adapter's ``base_model_name_or_path``; ``dtype=None`` keeps the saved
    dtype; ``optimizer=False`` skips ``optimizer.pt``. The device and the folder's files are checked
    first (:func:`check_device`, :func:`check_checkpoint`), so bad input fails before weights load.
    ``max_grad_norm`` is stored as given (the Trainer's value lives in the pickled
    ``training_args.bin``, which is never read).

    >>> ckpt = load_checkpoint("out/checkpoint-100", max_grad_norm=1.0)
    >>> delta, _ = adamw_step(lm.params, grads, ckpt.optimizer_state, ckpt.max_grad_norm)
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ArgumentError(f"max_grad_norm={max_grad_norm} must be > 0, or None for no clipping.")
    check_device(device)
    folder = Path(path).expanduser()
    kind, base_path = check_checkpoint(folder, base_model=base_model, optimizer=optimizer)
    if base_path is not None:  # a peft adapter
        from peft import PeftModel

        base = _from_pretrained(base_path, dtype, attn_implementation, trust_remote_code)
        model: nn.Module = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    else:
        model = _from_pretrained(folder, dtype, attn_implementation, trust_remote_code)
    model = model.to(device).eval()
    _check_adapters(model)

    state: AdamWState | None = None
    lr: float | None = None
    if optimizer and (folder / _OPTIMIZER).is_file():
        state, group_lrs = optimizer_state_from_file(folder / _OPTIMIZER, model, torch.device(device))
        lrs = {h.lr for h in state.hyper.values()}
        lr = lrs.pop() if len(lrs) == 1 else None
        _check_scheduler(folder, group_lrs)
    tokenizer = _tokenizer([folder] + ([base_path] if base_path else []), trust_remote_code)
    global_step, logged_lr = _trainer_state(folder)
    return Checkpoint(model=model, tokenizer=tokenizer, optimizer_state=state, lr=lr, kind=kind, path=folder,
                      base_model_path=base_path, global_step=global_step, max_grad_norm=max_grad_norm,
                      adapters=_adapter_info(model), logged_lr=logged_lr)
