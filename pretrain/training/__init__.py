"""Training: the Lightning module, optimisers and schedules, checkpoints and resume, speed, the `pretrain fit`
command, the run summary and loss curves."""
