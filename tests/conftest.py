"""Shared fixtures: tiny causal LMs built from a config in code (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch
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

# Central tolerances (kronfluence style): float64 toy models, float32 attention/norm inside HF.
ATOL = 1e-9
RTOL = 1e-7


def tiny_qwen2(
    vocab: int = 32,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = False,
    attn: str = "eager",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
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
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def tiny_llama(
    vocab: int = 32,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = True,
    attn: str = "eager",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
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
    return LlamaForCausalLM(cfg).to(dtype).eval()


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
