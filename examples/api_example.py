"""API example: true ΔH for a few random directions on a tiny random Qwen2 model (no checkpoint needed).

Builds a tiny model in code, samples an evaluation batch from its own temperature/top-p policy,
and prints ΔH, ESS and k̂ for a few random LoRA-free directions over an η grid.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import deltaH as dh


def main() -> None:
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

    # A small evaluation batch sampled from q itself (plain loop; the batched sampler comes later).
    n, prompt_len, new = 32, 4, 12
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, prompt_len), generator=gen)
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=ids).logits[:, -1]
            keep = policy.nucleus_mask(logits)
            z = logits / policy.temperature
            if keep is not None:
                z = z.masked_fill(~keep, float("-inf"))
            nxt = torch.multinomial(torch.softmax(z, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
    attn = torch.ones_like(ids, dtype=torch.bool)
    resp = attn.clone()
    resp[:, :prompt_len] = False
    batch = dh.SequenceBatch(ids, attn, resp)

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


if __name__ == "__main__":
    main()
