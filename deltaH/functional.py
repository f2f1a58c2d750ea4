"""``FunctionalLM``: a Hugging Face causal LM (plain or peft) as a pure function of its parameters.

The trainable parameters (``requires_grad``) are ``θ``, a ``dict[str, Tensor]`` keyed by the
model's de-duplicated ``named_parameters()`` names (peft's in-memory names, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``). Everything else
(frozen weights, buffers) stays in the module and is shared by every call.

The model is split into a *backbone* (``ids → final hidden states``) and a *head*
(``hidden → logits``) so that logits are only ever formed for chunks of scored positions; a
one-token probe at construction checks that ``head(backbone(x))`` equals the model's own logits,
so architectures that post-process logits (soft-capping, scaling) are refused instead of being
silently wrong. This module holds the project's one call of ``torch.func.functional_call``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltaH.batch import Compact, SharePlan
from deltaH.errors import ArgumentError, BatchError, CheckpointError, ParameterNameError

_ATTN_OK = ("eager", "sdpa")


class _Split(nn.Module):
    """Holds the user's model (as a reference, nothing is copied or changed) and runs either part."""

    def __init__(self, model: nn.Module, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Plain attributes (not submodules) so parameter names stay those of ``model``.
        self._parts: dict[str, nn.Module] = {"backbone": backbone, "head": head}

    def forward(self, part: str, x: Tensor, position_ids: Tensor | None = None, **kw: Any) -> Any:
        if part == "backbone":
            out = self._parts["backbone"](input_ids=x, position_ids=position_ids, use_cache=False)
            return out[0] if isinstance(out, tuple) else out.last_hidden_state
        if part == "shared":  # prompts once, then every row's suffix against its prompt's cache
            assert position_ids is not None
            return self._shared(x, position_ids, **kw)
        if part == "step":  # incremental decoding with a KV cache (the sampler)
            out = self.model(input_ids=x, position_ids=position_ids, use_cache=True, logits_to_keep=1, **kw)
            # Read the cache back under the name it was passed as (``cache`` or ``past_key_values``).
            return out.logits[:, -1], getattr(out, "cache" if "cache" in kw else "past_key_values")
        return self._parts["head"](x)

    def _shared(self, prompt_ids: Tensor, prompt_pos: Tensor, *, suffix_ids: Tensor, suffix_pos: Tensor,
                group: Tensor, mask: Tensor, gather: Tensor, cache_kw: str) -> Tensor:
        """Hidden states ``[n, L, D]`` of a :class:`~deltaH.batch.SharePlan` (only tensors leave:
        the cache is built and consumed here, so this runs under vmap and jvp)."""
        backbone = self._parts["backbone"]
        out = backbone(input_ids=prompt_ids, position_ids=prompt_pos, use_cache=True)
        cache = getattr(out, cache_kw, None)
        layers = getattr(cache, "layers", None)
        if cache is None or layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            raise NotImplementedError(
                f"the model's KV cache ({type(cache).__name__}) is not a plain DynamicCache of full-"
                "attention layers (sliding window, linear attention or a custom cache)"
            )
        cache.batch_select_indices(group)  # every row gets its group's keys and values
        rest = backbone(input_ids=suffix_ids, position_ids=suffix_pos, attention_mask=mask,
                        use_cache=True, **{cache_kw: cache})
        hp, hs = out.last_hidden_state, rest.last_hidden_state
        n, length = suffix_ids.shape[0], gather.shape[0] // suffix_ids.shape[0]
        flat = torch.cat([hp.flatten(0, 1), hs.flatten(0, 1)], 0)
        return flat.index_select(0, gather).unflatten(0, (n, length))


def _unwrap(model: nn.Module) -> nn.Module:
    """The underlying ``PreTrainedModel`` of a peft wrapper (with LoRA layers injected), or itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _cache_kwarg(model: nn.Module) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` where it exists, else ``past_key_values``.

    transformers renamed ``past_key_values`` to ``cache`` (inputs and outputs); the old name still
    works but warns on every call and goes away in 5.40. ``inspect.signature`` follows the
    deprecation decorator's ``__wrapped__`` to the real parameters.
    """
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


def _shape_error(what: str, name: str, shape: tuple[int, ...], want: tuple[int, ...], stacked: bool) -> str:
    """The message for a tree leaf whose shape does not fit its parameter (one line)."""
    if not stacked:
        return f"{what}['{name}'] has shape {shape}; the parameter has shape {want}"
    expected = "(K, " + ", ".join(str(s) for s in want) + ")" if want else "(K,)"
    if shape == want:  # one unstacked direction, e.g. UpdateDirections.full
        return (
            f"{what}['{name}'] has shape {shape}, the parameter's own shape, but {what} holds stacked "
            f"directions with a leading direction axis K: expected shape {expected}. For one direction "
            "use delta_h_true(...) or add the axis with tensor.unsqueeze(0); UpdateDirections.stacked() "
            "stacks full, baseline, grad and baseline+grad as [4, ...]"
        )
    return f"{what}['{name}'] has shape {shape}; expected {expected} (a direction axis K, then {want})"


def _check_adapters(model: nn.Module) -> None:
    """Refuse peft adapters that would silently bypass their LoRA parameters."""
    for name, mod in model.named_modules():
        if getattr(mod, "merged", False) and hasattr(mod, "lora_A"):
            raise CheckpointError(
                f"peft adapter at '{name}' is merged into the base weights: its LoRA parameters no longer "
                "act. Load the checkpoint without merge_and_unload()/merge_adapter(), or unmerge_adapter()."
            )
        if getattr(mod, "disable_adapters", False) and hasattr(mod, "lora_A"):
            raise CheckpointError(
                f"peft adapter at '{name}' is disabled: its LoRA parameters do not act. "
                "Enable it (model.enable_adapter_layers()) before building a FunctionalLM."
            )


@dataclass
class FunctionalLM:
    """A causal LM as pure functions of its trainable parameters.

    ``params`` is ``θ`` (detached views of the trainable parameters); ``backbone(params, ids,
    position_ids) -> hidden [n, L, D]`` and ``head(params, hidden [..., D]) -> logits [..., V]``.
    No call mutates, snapshots or restores the module.
    """

    model: nn.Module
    params: dict[str, Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    head_names: frozenset[str] = frozenset()
    vocab_size: int = 0
    _split: _Split | None = field(default=None, repr=False)
    _attn: str = "eager"
    _cache_kw: str = "past_key_values"
    #: Why prompts cannot be shared (:meth:`backbone_shared`) on this model; "" when they can.
    share_unsupported: str = ""

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> FunctionalLM:
        """Wrap an HF causal LM or a peft model; trainable parameters are those with ``requires_grad``.

        The model must be in ``eval()`` mode (dropout makes ΔH random and cannot run under vmap)
        and use eager or SDPA attention (SDPA runs through its math kernel, which supports vmap and
        forward-mode AD).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"FunctionalLM.from_model expects a torch.nn.Module, got {type(model).__name__}")
        training = [n for n, m in model.named_modules() if m.training]
        if training:
            raise ArgumentError(
                "model is in training mode (dropout would make every estimate random and cannot run "
                f"under vmap; first module: '{training[0] or '<root>'}'): call model.eval() first"
            )
        _check_adapters(model)
        inner = _unwrap(model)
        cfg = getattr(inner, "config", None)
        attn = getattr(cfg, "_attn_implementation", None) or "eager"
        if attn not in _ATTN_OK:
            raise ArgumentError(
                f"attention implementation '{attn}' cannot run under torch.func (vmap/jvp); load the model "
                "with attn_implementation='eager' or 'sdpa'"
            )
        get_dec, get_out = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
        if not (callable(get_dec) and callable(get_out)) or get_out() is None:
            raise TypeError(
                f"{type(inner).__name__} is not a causal LM with get_decoder()/get_output_embeddings(); "
                "pass an AutoModelForCausalLM (optionally wrapped by peft)"
            )
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ArgumentError("model has no trainable parameters (requires_grad=True): nothing to perturb")
        canonical = {id(p): n for n, p in model.named_parameters()}
        aliases = {
            n: canonical[id(p)]
            for n, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != n
        }
        head = get_out()
        head_names = frozenset(canonical[id(p)] for p in head.parameters()) & frozenset(params)
        lm = cls(
            model=model,
            params=params,
            aliases=aliases,
            head_names=head_names,
            _split=_Split(model, get_dec(), head),
            _attn=attn,
            _cache_kw=_cache_kwarg(inner),
        )
        lm.vocab_size = lm._probe(inner)
        lm.share_unsupported = lm._probe_sharing(inner)
        return lm

    def _probe(self, inner: nn.Module) -> int:
        """Check that head(backbone(x)) reproduces the model's logits on a 3-token input; return V."""
        dev = next(iter(self.params.values())).device
        ids = torch.tensor([[0, 1, 2]], device=dev) % int(getattr(inner.config, "vocab_size", 3))
        pos = torch.arange(3, device=dev).unsqueeze(0)
        with torch.no_grad(), self._kernels():
            ref = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits
            got = self.head(self.params, self.backbone(self.params, ids, pos))
        if ref.shape != got.shape or not torch.allclose(ref.float(), got.float(), rtol=1e-3, atol=1e-4):
            raise NotImplementedError(
                f"{type(inner).__name__}: head(backbone(x)) does not reproduce the model's logits (the "
                "architecture post-processes logits, e.g. soft-capping); deltaH does not support it yet"
            )
        return int(got.shape[-1])

    def _probe_sharing(self, inner: nn.Module) -> str:
        """Why :meth:`backbone_shared` cannot run on this model ("" when it reproduces :meth:`backbone`
        on a 3-row probe: two rows with one prompt, one with a shorter prompt)."""
        cfg = inner.config
        kinds = set(getattr(cfg, "layer_types", None) or ())
        if kinds - {"full_attention"} or getattr(cfg, "use_sliding_window", False):
            return f"its layers are not all full attention ({sorted(kinds) or 'use_sliding_window'})"
        # RoPE whose frequencies depend on the longest position of the call (dynamic NTK, LongRoPE):
        # the prompt pass would be rotated differently from the plain forward of the whole rows
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_types = {str(r.get("rope_type", r.get("type", ""))) for r in
                      ([rope] if "rope_type" in rope or "type" in rope else list(rope.values()))
                      if isinstance(r, dict)}
        if any("dynamic" in t or t == "longrope" for t in rope_types):
            return f"its rotary embedding depends on the sequence length ({sorted(rope_types)})"
        from deltaH.batch import SequenceBatch, compact

        dev, vocab = self.device, int(getattr(cfg, "vocab_size", 3))
        ids = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 4, 3], [0, 1, 3, 2, 1]], device=dev) % vocab
        resp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]], device=dev).bool()
        c = compact(SequenceBatch(ids, torch.ones_like(resp), resp), share="on")
        try:
            with torch.no_grad():
                ref = self.backbone(self.params, c.ids, c.position_ids)[c.rows, c.pred_pos]
                got = self.hidden(self.params, c)[c.rows, c.pred_pos]
        except Exception as err:  # noqa: BLE001 - any failure means: do not share on this model
            return f"its forward with a shared KV cache failed ({type(err).__name__}: {err})"
        # The two forwards sum attention over different (masked) slots: rounding of the model's dtype,
        # a few ulps of the largest hidden value (bf16: 8·eps = 6%); a wrong cache or mask is O(1).
        tol = max(1e-3, 8 * torch.finfo(ref.dtype).eps) * float(ref.float().abs().max())
        if not float((ref.float() - got.float()).abs().max()) <= tol:
            return "its forward with a shared KV cache does not reproduce the plain forward"
        return ""

    # -- the functional boundary -----------------------------------------------------------
    def check_names(self, tree: Mapping[str, Tensor], what: str = "params", stacked: bool = False) -> None:
        """Raise if ``tree`` has names that are not trainable parameters, or shapes that do not fit."""
        for name, t in tree.items():
            if name in self.params:
                want = tuple(self.params[name].shape)
                got = tuple(t.shape[1:]) if stacked else tuple(t.shape)
                if got != want:
                    raise BatchError(_shape_error(what, name, tuple(t.shape), want, stacked))
                continue
            if name in self.aliases:
                raise BatchError(
                    f"{what}['{name}'] is tied to '{self.aliases[name]}' (the same tensor): use that name"
                )
            close = [p for p in self.params if name.split(".")[-2:] == p.split(".")[-2:]][:3]
            hint = (
                f"; did you mean {close}?"
                if close
                else f"; trainable names look like '{next(iter(self.params))}'"
            )
            raise ParameterNameError(f"{what}['{name}'] is not a trainable parameter of the model{hint}")

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        if self._attn == "sdpa":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield

    def _call(
        self, params: Mapping[str, Tensor], part: str, x: Tensor, position_ids: Tensor | None, **kw: Any
    ) -> Any:
        assert self._split is not None
        full = {"model." + k: v for k, v in params.items()}
        with self._kernels():
            return torch.func.functional_call(
                self._split, full, (part, x, position_ids), kw, tie_weights=True
            )

    def backbone(self, params: Mapping[str, Tensor], ids: Tensor, position_ids: Tensor) -> Tensor:
        """Final hidden states ``[n, L, D]`` (after the last norm) at parameters ``params``."""
        return self._call(params, "backbone", ids, position_ids)

    def hidden(self, params: Mapping[str, Tensor], c: Compact) -> Tensor:
        """Final hidden states ``[n, L, D]`` of a compacted chunk: :meth:`backbone`, or with the
        chunk's :class:`~deltaH.batch.SharePlan` each distinct prompt once (:meth:`backbone_shared`)."""
        if c.share is None:
            return self.backbone(params, c.ids, c.position_ids)
        return self.backbone_shared(params, c.share)

    def backbone_shared(self, params: Mapping[str, Tensor], plan: SharePlan) -> Tensor:
        """:meth:`backbone` of a chunk with each distinct prompt run once (:class:`~deltaH.batch.SharePlan`).

        The prompts ``[g, Lp]`` run with a KV cache; each row's copy of its group's keys and values
        then serves its suffix ``[n, Ls]`` under an explicit 4-D mask (own prompt slots, causal
        suffix), so every scored position sees exactly the keys and values of the plain forward.
        Returns ``[n, L]``-layout hidden states ``[n, L, D]``.
        """
        dtype = self.compute_dtype
        mask = torch.zeros(plan.keep.shape, dtype=dtype, device=plan.keep.device).masked_fill(
            ~plan.keep, torch.finfo(dtype).min)
        return self._call(params, "shared", plan.prompt_ids, plan.prompt_pos, suffix_ids=plan.suffix_ids,
                          suffix_pos=plan.suffix_pos, group=plan.group, mask=mask, gather=plan.gather,
                          cache_kw=self._cache_kw)

    def head(self, params: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        """Logits ``[..., V]`` of hidden states ``[..., D]``."""
        return self._call(params, "head", hidden, None)

    def step(
        self,
        params: Mapping[str, Tensor],
        ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor,
        past_key_values: Any = None,
    ) -> tuple[Tensor, Any]:
        """One incremental decoding step: last-position logits ``[n, V]`` and the updated KV cache.

        ``attention_mask [n, L_past + L]`` covers the cached and the new tokens (left padding ok).
        """
        kw = {"attention_mask": attention_mask, self._cache_kw: past_key_values}
        return self._call(params, "step", ids, position_ids, **kw)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the logits are computed in (the output layer's weights). It can differ from
        :attr:`dtype`: peft keeps LoRA adapters in float32 on a bfloat16 base model."""
        assert self._split is not None
        w = next(self._split._parts["head"].parameters(), None)
        return self.dtype if w is None else w.dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device
