"""Sampling from q, E/U batch builders, prompt datasets and verifiable rewards."""

from deltaH.sampling.builders import EvalBatch as EvalBatch
from deltaH.sampling.builders import UpdateBatch as UpdateBatch
from deltaH.sampling.builders import build_eval_batch as build_eval_batch
from deltaH.sampling.builders import build_update_batch as build_update_batch
from deltaH.sampling.data import PromptRecord as PromptRecord
from deltaH.sampling.data import load_prompts as load_prompts
from deltaH.sampling.rewards import load_reward_fn as load_reward_fn
from deltaH.sampling.sampler import sample as sample
