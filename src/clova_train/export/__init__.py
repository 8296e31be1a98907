"""`clova export`: consolidate a DeepSpeed checkpoint under our names, write and verify a Hugging Face model dir."""
