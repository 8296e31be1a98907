"""`clova train`: run configuration, pre-flight checks, the sampler, DeepSpeed engines, checkpoints, metrics, the loop, launch and plan."""
