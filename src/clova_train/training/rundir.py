"""The run dir: what `clova train` writes where (``clova export`` and ``clova generate`` read it).

Run dir layout (``clova export`` relies on it):

``config.json``
    The resolved configuration: "model" (ModelConfig fields), "train", "data",
    "parallel", "deepspeed" (the exact DeepSpeed config), "tokenizer" {path,
    hash, vocab_size, eod_id} and "run" (world size, steps, config hash...).
``checkpoints/<tag>/``
    ``engine.save_checkpoint(RUN_DIR/checkpoints, tag=...)`` with tags
    ``step_00000100``; ``clova_checkpoint.json`` inside is written last and
    marks the checkpoint complete; ``checkpoints/latest`` names the newest
    complete tag and is updated only after the marker.
``metrics.jsonl``, ``loss.png``, ``tensorboard/``
    One JSON object per optimizer step; the loss plot (at each checkpoint);
    TensorBoard events through DeepSpeed's monitor.
``launch.json``, ``verified_shards.json``
    The resolved run handed to the workers; the shard files last verified.
``data_cache/``
    The memory-mapped sample indices (unless ``--data-cache`` puts them elsewhere).
"""

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINT_DIR = "checkpoints"
MARKER_FILE = "clova_checkpoint.json"
LATEST_FILE = "latest"
LAUNCH_FILE = "launch.json"
VERIFIED_FILE = "verified_shards.json"
DATA_CACHE_DIR = "data_cache"
