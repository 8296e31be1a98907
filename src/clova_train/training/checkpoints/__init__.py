"""Checkpoints on disk: save and load with completion markers, the trust gate, layout-free rank-file readers (which export reads through), resharding."""
