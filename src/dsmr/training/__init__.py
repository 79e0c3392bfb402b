"""Training: the run's options (`config`), the trainer in named steps (`trainer`) and its parts
(`optimization`, `inputs`, `state`), saving and resuming (`resume`), one writer per run folder (`run_lock`),
metrics (`run_log`) and torch.distributed (`distributed`)."""
