"""Checkpoint loading at the edge: HF model folders, peft adapters, HF Trainer / TRL ``checkpoint-N/``."""

from deltaH.io.checkpoint import AdapterInfo as AdapterInfo
from deltaH.io.checkpoint import Checkpoint as Checkpoint
from deltaH.io.checkpoint import load_checkpoint as load_checkpoint
