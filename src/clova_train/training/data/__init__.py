"""The global sample order over shard dirs: blending, the memory-mapped sample indices, each rank's share of a batch."""
