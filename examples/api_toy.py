"""The Python API on the embedded toy checkpoint: the README's "Python API" section is this file.

Loads the toy (a Trainer checkpoint: peft LoRA model, tokenizer, AdamW state), samples an
evaluation batch E and an update batch U from the sampling policy, rebuilds the next AdamW step
on U, and measures how it changes the entropy on E: true ΔH, first-order δH₁, one direction alone.
Runs in 10-20 s on a 2-core CPU: ``python examples/api_toy.py``. The math: docs/math.md.
"""

import torch

import deltaH as dh
from deltaH.sampling.rewards import math_rewards
from deltaH.toy import load_toy, load_toy_prompts, toy_policy

ckpt = load_toy()                               # or dh.load_checkpoint("runs/x/checkpoint-500")
lm = dh.FunctionalLM.from_model(ckpt.model)     # θ = lm.params, the trainable (LoRA) parameters
policy = toy_policy()                           # dh.SamplingPolicy(temperature, top_p) of the run
tok, records = ckpt.tokenizer, load_toy_prompts()
gen = torch.Generator().manual_seed(0)
opts = dict(policy=policy, max_new_tokens=8, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, generator=gen)


def prompt_ids(recs):
    return [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in recs]


# E: 8 prompts x 4 responses drawn from q_θ itself (a dh.SequenceBatch)
batch = dh.sample(lm, lm.params, prompt_ids(records[:8]), n_per_prompt=4, **opts)

# U: 4 prompts x 4 responses, rewarded, with GRPO advantages (rows prompt-major)
u_recs = records[8:12]
u_batch = dh.sample(lm, lm.params, prompt_ids(u_recs), n_per_prompt=4, **opts)
texts = [tok.decode(ids[m], skip_special_tokens=True)
         for ids, m in zip(u_batch.input_ids, u_batch.response_mask, strict=True)]
rewards = torch.tensor(math_rewards(texts, [r for r in u_recs for _ in range(4)]))
adv = dh.advantages(rewards.view(4, 4), "group").flatten()

# The next AdamW step on U, per unit learning rate (a live optimizer: dh.AdamWState.from_optimizer)
ud = dh.update_directions(lm, lm.params, u_batch, adv, ckpt.optimizer_state,
                          loss_type="dapo", temperature=policy.temperature, max_grad_norm=1.0)
# ud.full, ud.baseline, ud.grad: one direction each (every tensor has its parameter's shape);
# the estimators take K stacked directions [K, *shape]: ud.stacked() gives full, baseline, grad and
# baseline+grad as K = 4, and ud.components is already [M, *shape] (one per update sequence).
dirs = ud.stacked()
etas = [ckpt.lr / 10, ckpt.lr, 10 * ckpt.lr]    # η = lr is the real step

res = dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=policy, eta=etas)
fo = dh.delta_h_first_order(lm.params, dirs, batch, lm=lm, policy=policy, eta=etas, mode="forward")
one = dh.delta_h_true(lm.params, ud.full, batch, lm=lm, policy=policy, eta=ckpt.lr)  # no K axis

print(f"H = {float(res.h_orig):.4f} nats per sequence (N = {res.n_sequences})")
print("η         direction       ΔH          δH₁         ESS")
for i, eta in enumerate(etas):
    for k, name in enumerate(["full", "baseline", "grad", "baseline+grad"]):
        print(f"{eta:.2e}  {name:<14} {float(res.delta_h[i, k]):+.3e}  {float(fo.delta_h[i, k]):+.3e}  "
              f"{float(res.ess[i, k]):5.1f}")
print(f"the real step alone (η = lr): ΔH = {float(one.delta_h):+.3e}, k̂ = {float(one.khat):.2f}")
