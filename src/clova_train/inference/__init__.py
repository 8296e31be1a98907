"""Using a trained model: loading it, and generation with a key/value cache."""
