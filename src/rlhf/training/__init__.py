"""The machinery every training loop shares: the run config and its options, accelerator setup,
the step loop and its plan, checkpoints, the final save, logs and trackers."""
