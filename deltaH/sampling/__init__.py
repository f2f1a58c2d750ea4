"""Sampling from the policy q, E/U batch builders, prompt datasets and verifiable rewards."""
