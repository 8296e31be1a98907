"""Studio: what `clova serve` offers beyond completions (input gradients, p-tuning jobs, saved presets).

It sits above both inference (the server) and evaluation (tasks, p-tuning),
which is why it is its own package: the server knows nothing of p-tuning,
and p-tuning nothing of HTTP.
"""
