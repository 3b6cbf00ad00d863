"""Recipes: short training loops that read like the seeds' steps (sft, reward, ppo, dpo, grpo)."""
