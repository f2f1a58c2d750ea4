"""Shared fixtures: tiny causal LMs built from a config in code (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch
from _refs import hf_keep
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=15,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")

# Central tolerances (kronfluence style) for loop-vs-batched comparisons on the float64 toy models,
# which run float64 end to end (below): observed gaps ≤ 1e-11 relative on AVX-512, AVX2 and default.
ATOL = 1e-9
RTOL = 1e-7


# ---------------------------------------------------------------------------------------------
# HF Qwen2/Llama keep three float32 islands even in a float64 model: RMSNorm (`.to(torch.float32)`),
# the rotary cos/sin (computed from float32 frequencies) and the eager attention softmax
# (`softmax(..., dtype=torch.float32)`). Their round-off depends on the CPU's kernel set (AVX-512,
# AVX2, default) and on where an element sits in a vector, so a batched path and its per-row loop
# differ by ~1e-7..1e-5 relative on some CPUs (NOTES "CPUs differ"). The tiny float64 test models
# run these three pieces in float64 instead (same math, same masks), so loop-vs-vmap comparisons
# are exact to float64 round-off on every CPU. `exact64=False` keeps HF's own modules.
# ---------------------------------------------------------------------------------------------

_EAGER64 = "deltah_tests_eager_float64"


def _eager_attention_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' ``eager_attention_forward`` with the softmax in the query's dtype (float64)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.nn.functional.softmax(w, dim=-1)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


class _RMSNorm64:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class _Rotary64:
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def _swap_class(module: torch.nn.Module, mixin: type) -> None:
    cls = type(module)
    module.__class__ = type(f"{cls.__name__}Float64", (mixin, cls), {})


def _float64_end_to_end(model: torch.nn.Module) -> None:
    """Replace the three float32 islands of a float64 HF Qwen2/Llama in place (see above)."""
    import copy

    from transformers import AttentionInterface

    AttentionInterface.register(_EAGER64, _eager_attention_float64)
    swapped = {"norm": 0, "rotary": 0, "attn": 0}
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm"):
            _swap_class(m, _RMSNorm64)
            swapped["norm"] += 1
        elif name.endswith("RotaryEmbedding"):
            assert m.rope_type == "default", m.rope_type
            _swap_class(m, _Rotary64)
            swapped["rotary"] += 1
        elif name.endswith("Attention") and m.config._attn_implementation == "eager":
            # Only the attention modules dispatch on their own config copy; the model's config
            # still says "eager" (deltaH checks it, and HF builds the eager additive mask from it).
            m.config = copy.copy(m.config)
            m.config._attn_implementation = _EAGER64
            swapped["attn"] += 1
    assert swapped["norm"] and swapped["rotary"], f"no HF float32 islands found to replace: {swapped}"


def _tiny(arch: str, vocab: int, hidden: int, layers: int, tie: bool, attn: str, dtype: torch.dtype,
          seed: int, exact64: bool = True) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    cfg._attn_implementation = attn
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).to(dtype).eval()
    if dtype == torch.float64 and exact64:
        _float64_end_to_end(model)
    return model


def tiny_qwen2(vocab: int = 32, hidden: int = 32, layers: int = 2, tie: bool = False, attn: str = "eager",
               dtype: torch.dtype = torch.float64, seed: int = 0, exact64: bool = True) -> torch.nn.Module:
    return _tiny("Qwen2", vocab, hidden, layers, tie, attn, dtype, seed, exact64)


def tiny_llama(vocab: int = 32, hidden: int = 32, layers: int = 2, tie: bool = True, attn: str = "eager",
               dtype: torch.dtype = torch.float64, seed: int = 0, exact64: bool = True) -> torch.nn.Module:
    return _tiny("Llama", vocab, hidden, layers, tie, attn, dtype, seed, exact64)


def with_lora(model: torch.nn.Module, r: int = 4, seed: int = 1) -> torch.nn.Module:
    """peft LoRA on q/v/gate projections, with B initialised non-zero so LoRA directions matter."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"]
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm.eval()


@pytest.fixture
def qwen2() -> torch.nn.Module:
    return tiny_qwen2()


@pytest.fixture
def llama_tied() -> torch.nn.Module:
    return tiny_llama(tie=True)


@pytest.fixture
def qwen2_lora() -> torch.nn.Module:
    return with_lora(tiny_qwen2())


# ---------------------------------------------------------------------------------------------
# Plain references shared by the core correctness tests (test_policy/stats/true/distributed).
# They never call deltaH: transformers' own warpers decide the nucleus, float64 does the math.
# ---------------------------------------------------------------------------------------------


def sample_responses(model: torch.nn.Module, prompts: list[list[int]], temperature: float, top_p: float,
                     max_new_tokens: int, eos: int,
                     generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """One response per prompt drawn from q (HF warpers on float32 scores), one row at a time."""
    out = []
    for prompt in prompts:
        ids, resp = list(prompt), []
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            z = logits.float() / temperature
            z = z.masked_fill(~hf_keep(logits, temperature, top_p), float("-inf"))
            y = int(torch.multinomial(torch.softmax(z.double(), -1), 1, generator=generator))
            ids.append(y)
            resp.append(y)
            if y == eos:
                break
        out.append((list(prompt), resp))
    return out


def build_batch(rows: list[tuple[list[int], list[int]]], side: str = "right", pad: int = 0,
                extra: int = 2, generator: torch.Generator | None = None):
    """A SequenceBatch of (prompt, response) rows, padded on the ``side`` given.

    ``side``: "right", "left", or "mixed" (a random offset per row: padding on both sides).
    """
    from deltaH import SequenceBatch

    t = max(len(p) + len(r) for p, r in rows) + extra
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    am = torch.zeros(len(rows), t, dtype=torch.bool)
    rm = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        if side == "right":
            s = 0
        elif side == "left":
            s = t - n
        else:
            s = int(torch.randint(0, t - n + 1, (1,), generator=generator))
        ids[i, s : s + n] = torch.tensor(p + r)
        am[i, s : s + n] = True
        rm[i, s + len(p) : s + n] = True
    return SequenceBatch(ids, am, rm)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: with other processes on the 2 cores, OpenMP
    hand-offs cost more than the math (measured: 150 s instead of 12 s for test_integrations at load 3)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

