"""Prompt sources, prompt templates and the rollout DataModule."""
