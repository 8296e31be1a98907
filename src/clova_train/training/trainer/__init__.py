"""The training loop of one rank and its parts: the step, metrics loggers, the batch prefetcher."""
