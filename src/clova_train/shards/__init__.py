"""Megatron-format shard dirs: the on-disk format, the `clova tokenize` builder, merge and verification."""

from clova_train.shards.format import IndexedDataset, IndexedDatasetWriter, ShardConfig, open_split, read_manifest, verify_shard_dir

__all__ = ["IndexedDataset", "IndexedDatasetWriter", "ShardConfig", "open_split", "read_manifest", "verify_shard_dir"]
