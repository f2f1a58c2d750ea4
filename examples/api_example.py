"""API example: true ΔH for a few random directions on a tiny random Qwen2 model (no checkpoint needed).

Builds a tiny model in code, samples an evaluation batch from its own temperature/top-p policy,
and prints ΔH, ESS and k̂ for a few random LoRA-free directions over an η grid.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import deltaH as dh


def main() -> dh.TrueDeltaH:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    lm = dh.FunctionalLM.from_model(model)
    # top_p < 1 makes ΔH(η) jump wherever a step moves a nucleus boundary; p = 1 keeps it smooth here.
    policy = dh.SamplingPolicy(temperature=0.8, top_p=1.0)

    # A small evaluation batch drawn from q itself: 8 random prompts × 4 responses, token 0 as EOS.
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 64, (8, 4), generator=gen).tolist()
    batch = dh.sample(lm, lm.params, prompts, policy=policy, max_new_tokens=12, n_per_prompt=4,
                      eos_token_id=0, pad_token_id=0, generator=gen)

    names = [k for k in lm.params if "mlp" in k][:6]
    dirs = {k: torch.randn(4, *lm.params[k].shape, generator=gen) for k in names}
    etas = [1e-5, 3e-5, 1e-4, 3e-4]
    res = dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=policy, eta=etas)
    print(f"H(θ) per sequence = {float(res.h_orig):.4f} nats  (N = {res.n_sequences})")
    print(f"{'eta':>8} " + " ".join(f"{'dir' + str(k):>12}" for k in range(4)))
    for i, e in enumerate(etas):
        print(f"{e:8.0e} " + " ".join(f"{float(v):+12.3e}" for v in res.delta_h[i]))
    print(
        f"ESS at largest eta: {[round(float(x), 1) for x in res.ess[-1]]}; k̂: "
        f"{[round(float(x), 2) for x in res.khat[-1]]} (threshold {res.khat_threshold:.2f})"
    )
    return res


if __name__ == "__main__":
    main()
